//! The addresses imds-guard protects by default.

/// The EC2 Instance Metadata Service over IPv4, `169.254.169.254`.
pub const IMDS_V4: [u8; 4] = [169, 254, 169, 254];
/// The EC2 Instance Metadata Service over IPv6 (Nitro instances), `fd00:ec2::254`.
pub const IMDS_V6: [u8; 16] = [
    0xfd, 0x00, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54,
];

//! Makes sure a route that builds BPF code exists (see imds-guard/build.rs for how the build
//! picks one), installing what is missing on Debian when run as root.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// Debian's prebuilt `core` for the BPF target (package libstd-rust-web-dev-bpf).
const DEBIAN_BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";
/// LLVM that bpf-linker is built against on Debian 12 (matches rustc-web's LLVM).
const DEBIAN_LLVM: &str = "/usr/lib/llvm-22";
const DEBIAN_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
];
/// The bpf-linker release this route was verified with.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The rustup name build.rs uses for Debian's compiler.
const DEBIAN_TOOLCHAIN: &str = "debian-bpf";

const MANUAL: &str = "\
On Debian 12, as root:
    apt-get update && apt-get install -y rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev libpolly-22-dev
    LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker@0.13.0 --locked --no-default-features --features llvm-22
    rustup toolchain link debian-bpf /usr    # when you use rustup
Elsewhere, with rustup and network access:
    rustup toolchain install nightly --component rust-src && cargo install bpf-linker";

/// Ensures the eBPF build has a route, installing it where we can.
pub fn ensure() -> Result<()> {
    let debian = Path::new("/etc/debian_version").exists();
    let root = crate::is_root();
    if !Path::new(DEBIAN_BPF_CORE).is_dir() && !nightly_has_rust_src() {
        if !(debian && root) {
            bail!("no BPF-capable Rust toolchain found.\n{MANUAL}");
        }
        install_debian_packages()?;
    }
    if which("bpf-linker").is_none() {
        if !(debian && root) {
            bail!("bpf-linker is not installed.\n{MANUAL}");
        }
        if !Path::new(DEBIAN_LLVM).join("lib").is_dir() {
            install_debian_packages()?;
        }
        eprintln!(
            "xtask: installing bpf-linker {BPF_LINKER_VERSION} (builds against LLVM 22, ~1-2 min)"
        );
        run(
            Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .env("LLVM_PREFIX", DEBIAN_LLVM)
                .args([
                    "install",
                    &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                    "--locked",
                ])
                .args(["--no-default-features", "--features", "llvm-22"]),
        )?;
    }
    if Path::new(DEBIAN_BPF_CORE).is_dir() && which("rustup").is_some() && !rustup_knows_debian() {
        run(Command::new("rustup").args(["toolchain", "link", DEBIAN_TOOLCHAIN, "/usr"]))?;
    }
    Ok(())
}

/// The end-to-end tests and the demo need `ip` (iproute2) for network namespaces.
/// Commands the end-to-end tests run, and the Debian package of each.
const TEST_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("strace", "strace"),
    ("setpriv", "util-linux"),
    ("systemd-analyze", "systemd"),
    ("dpkg-deb", "dpkg"),
    ("rpm", "rpm"),
    // NAT rules in the tests' own network namespaces (the bypass tests rewrite destinations).
    ("iptables", "iptables"),
];

/// Installs the commands the end-to-end tests need (Debian, as root), or says what to run.
pub fn ensure_test_tools() -> Result<()> {
    let missing: Vec<&str> = TEST_TOOLS
        .iter()
        .filter(|(command, _)| which(command).is_none())
        .map(|&(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if Path::new("/etc/debian_version").exists() && crate::is_root() {
        eprintln!("xtask: installing {}", missing.join(" "));
        return run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"));
    }
    bail!(
        "the end-to-end tests need: apt-get install -y {}",
        missing.join(" ")
    )
}

/// Installs iptables (the benchmarks' comparison, used only in their own network namespace).
pub fn ensure_bench_tools() -> Result<()> {
    if which("iptables-restore").is_some() && which("ip6tables-restore").is_some() {
        return Ok(());
    }
    if Path::new("/etc/debian_version").exists() && crate::is_root() {
        eprintln!("xtask: installing iptables (its rules go only in the benchmark's namespace)");
        return run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "iptables"])
            .env("DEBIAN_FRONTEND", "noninteractive"));
    }
    bail!("the benchmarks compare against iptables: apt-get install -y iptables")
}

/// The cargo subcommands that build the packages, at the versions the packaging was made with.
const PACKAGING_TOOLS: &[(&str, &str)] = &[
    ("cargo-deb", "cargo-deb@3.8.0"),
    ("cargo-generate-rpm", "cargo-generate-rpm@0.21.1"),
];

/// Installs `cargo-deb` and `cargo-generate-rpm` from crates.io when missing.
pub fn ensure_packaging_tools() -> Result<()> {
    for &(command, spec) in PACKAGING_TOOLS {
        if which(command).is_none() {
            eprintln!("xtask: installing {spec} (once)");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            run(Command::new(cargo).args(["install", "--locked", spec]))?;
        }
    }
    Ok(())
}

fn install_debian_packages() -> Result<()> {
    eprintln!("xtask: installing {}", DEBIAN_PACKAGES.join(" "));
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(DEBIAN_PACKAGES)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn nightly_has_rust_src() -> bool {
    Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .is_ok_and(|out| {
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("rust-src")
        })
}

fn rustup_knows_debian() -> bool {
    Command::new("rustup")
        .args(["which", "rustc", "--toolchain", DEBIAN_TOOLCHAIN])
        .output()
        .is_ok_and(|out| out.status.success())
}

fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

/// `program` on PATH or in cargo's bin directory (where `cargo install` puts it).
fn which(program: &str) -> Option<PathBuf> {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .map(|home| home.join("bin"));
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(cargo_bin)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

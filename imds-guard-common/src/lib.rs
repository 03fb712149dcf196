//! The contract between imds-guard's kernel programs and its agent.
//!
//! Everything here crosses the user/kernel boundary, so it is `#[repr(C)]`, `Copy`, built from
//! fixed-width integers and arrays, with padding written out and sizes asserted at compile time.
//! Enumerations are `u32`/`u8` constants; the agent turns them into Rust enums with `TryFrom`.
#![cfg_attr(not(test), no_std)]

pub mod agent;
pub mod decide;
pub mod event;
pub mod http;
pub mod imds;
pub mod maps;
pub mod policy;
pub mod programs;

//! Builds the kernel programs (`imds-guard-ebpf`) and hands the object to the agent, which
//! embeds it: the release binary needs nothing else at run time.
//!
//! Two routes build BPF code, tried in this order:
//! 1. Debian 12's `rustc-web` with `libstd-rust-web-dev-bpf` (a prebuilt `core` for
//!    `bpfel-unknown-none`), registered with rustup as the `debian-bpf` toolchain, or used
//!    directly when rustup is absent;
//! 2. rustup's `nightly` with `rust-src` (`-Z build-std=core`).
//!
//! Both need `bpf-linker`. `cargo xtask bootstrap` installs whatever is missing; when neither
//! route works the build fails with the commands to run.
//!
//! `IMDS_GUARD_EBPF_OBJECT=/path/to/object` embeds a prebuilt object instead;
//! `IMDS_GUARD_EBPF_FEATURES=a,b` builds the programs with those cargo features.

use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

/// The toolchain name `cargo xtask bootstrap` links Debian's compiler under.
const DEBIAN_TOOLCHAIN: &str = "debian-bpf";
/// Where Debian's `libstd-rust-web-dev-bpf` puts the prebuilt `core` for the BPF target.
const DEBIAN_BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";

const HOW_TO_INSTALL: &str = "\
imds-guard's kernel programs need a BPF-capable Rust toolchain and bpf-linker. Run:
    cargo xtask bootstrap
or, by hand, on Debian 12 (as root):
    apt-get update && apt-get install -y rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev libpolly-22-dev
    LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --no-default-features --features llvm-22
    rustup toolchain link debian-bpf /usr    # only if you use rustup
or, with rustup and network access:
    rustup toolchain install nightly --component rust-src && cargo install bpf-linker";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR is not set")?);
    let object = out_dir.join("imds-guard-ebpf");
    println!("cargo:rerun-if-env-changed=IMDS_GUARD_EBPF_OBJECT");
    if let Some(prebuilt) = env::var_os("IMDS_GUARD_EBPF_OBJECT") {
        println!(
            "cargo:rerun-if-changed={}",
            PathBuf::from(&prebuilt).display()
        );
        fs::copy(&prebuilt, &object)
            .with_context(|| format!("copying IMDS_GUARD_EBPF_OBJECT={}", prebuilt.display()))?;
        return Ok(());
    }
    // The kernel programs also change when the shared types do.
    println!("cargo:rerun-if-changed=../imds-guard-common/src");

    let toolchain = choose_toolchain()?;
    // aya-ebpf uses `asm_experimental_arch` and our programs `core_intrinsics` (the BPF target
    // has no atomic read-modify-write types); allow unstable features for these crates alone.
    // aya-build relays every line the nested cargo prints as a build warning: keep it to
    // what matters (errors and real warnings still show).
    // SAFETY: build scripts are single-threaded.
    unsafe {
        env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf,imds_guard_ebpf");
        env::set_var("CARGO_TERM_QUIET", "true");
    }
    // `cargo xtask test` builds a second agent whose program differs, to test upgrades.
    println!("cargo:rerun-if-env-changed=IMDS_GUARD_EBPF_FEATURES");
    let features = env::var("IMDS_GUARD_EBPF_FEATURES").unwrap_or_default();
    let features: Vec<&str> = features.split(',').filter(|f| !f.is_empty()).collect();
    let package = aya_build::Package {
        name: "imds-guard-ebpf",
        root_dir: "../imds-guard-ebpf",
        features: &features,
        ..Default::default()
    };
    aya_build::build_ebpf([package], toolchain)
        .with_context(|| format!("building the kernel programs failed\n{HOW_TO_INSTALL}"))?;
    if !object.exists() {
        bail!("the eBPF build produced no {}", object.display());
    }
    Ok(())
}

/// Picks the first route whose parts are all present.
fn choose_toolchain() -> anyhow::Result<aya_build::Toolchain<'static>> {
    if which("bpf-linker").is_none() {
        bail!("bpf-linker is not installed\n{HOW_TO_INSTALL}");
    }
    let debian_core = PathBuf::from(DEBIAN_BPF_CORE).is_dir();
    if which("rustup").is_none() {
        // aya-build then runs the `cargo` on PATH, which must be Debian's.
        if debian_core {
            return Ok(aya_build::Toolchain::Custom(DEBIAN_TOOLCHAIN));
        }
        bail!("no BPF-capable toolchain (no rustup, no {DEBIAN_BPF_CORE})\n{HOW_TO_INSTALL}");
    }
    if debian_core && rustup_has(DEBIAN_TOOLCHAIN, &["which", "rustc", "--toolchain"]) {
        return Ok(aya_build::Toolchain::Custom(DEBIAN_TOOLCHAIN));
    }
    if rustup_nightly_has_rust_src() {
        return Ok(aya_build::Toolchain::Nightly);
    }
    if debian_core {
        bail!(
            "Debian's BPF core is installed but rustup does not know it: \
             run `rustup toolchain link {DEBIAN_TOOLCHAIN} /usr`\n{HOW_TO_INSTALL}"
        );
    }
    bail!("no BPF-capable toolchain found\n{HOW_TO_INSTALL}")
}

fn rustup_has(toolchain: &str, args: &[&str]) -> bool {
    Command::new("rustup")
        .args(args)
        .arg(toolchain)
        .output()
        .is_ok_and(|out| out.status.success())
}

fn rustup_nightly_has_rust_src() -> bool {
    Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .is_ok_and(|out| {
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("rust-src")
        })
}

fn which(program: &str) -> Option<PathBuf> {
    let home_bin = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .map(|cargo_home| cargo_home.join("bin"));
    env::var_os("PATH")
        .map(|path| env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(home_bin)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

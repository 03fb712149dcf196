//! `cargo xtask <task>`: the commands a newcomer and CI run.

mod bootstrap;
mod lab;

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the kernel programs needs (Debian, as root), or say what to run.
    Bootstrap,
    /// Build target/release/imds-guard, a single binary with the kernel programs inside.
    Build,
    /// Run every test: unit tests and the privileged end-to-end tests (as root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Show what imds-guard does, in a sandbox of its own (as root).
    Demo,
    /// Build the .deb and .rpm packages into target/packages/.
    Package,
    /// Boot the kernels EC2 runs under qemu, with systemd and Docker, install the .deb and live
    /// through what an operator does (as root); prints a table, a row per kernel.
    Lab {
        /// The kernel lines to run: 5.10, 6.1, 6.12 or all.
        #[arg(long, default_value = "all", value_parser = parse_lines)]
        kernel: LabLines,
        /// Keep each VM's disks under target/lab/<kernel>/.
        #[arg(long)]
        keep: bool,
        /// Boot (the first of --kernel) to a root shell on this terminal instead.
        #[arg(long)]
        shell: bool,
    },
    /// Measure imds-guard against no firewall and iptables, in a sandbox (as root); prints the
    /// tables BENCHMARKS.md holds.
    Bench {
        /// Only these tables: kernel, placement, calls, connect, scaling, throughput, pipeline,
        /// footprint, churn, http (default: all).
        tables: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Bootstrap => bootstrap::ensure(),
        Task::Build => {
            bootstrap::ensure()?;
            cargo(&["build", "--release", "--package", "imds-guard"])?;
            println!("built target/release/imds-guard");
            Ok(())
        }
        Task::Test { args } => {
            bootstrap::ensure()?;
            bootstrap::ensure_test_tools()?;
            if !is_root() {
                eprintln!(
                    "warning: not root: the privileged end-to-end tests will be skipped \
                     (run `cargo xtask test` as root for all of them)"
                );
            }
            // The end-to-end tests run the agent and client binaries: build them first.
            cargo(&["build", "--workspace", "--bins"])?;
            build_test_variants()?;
            // The packaging tests read the packages.
            package()?;
            let mut test = vec!["test", "--workspace"];
            if !args.is_empty() {
                test.push("--");
                test.extend(args.iter().map(String::as_str));
            }
            cargo_test(&test)
        }
        Task::Package => {
            bootstrap::ensure()?;
            for built in package()? {
                println!("built {}", built.display());
            }
            Ok(())
        }
        Task::Lab {
            kernel,
            keep,
            shell,
        } => {
            if !is_root() {
                bail!("the lab builds an image and boots VMs: run `cargo xtask lab` as root");
            }
            bootstrap::ensure()?;
            let packages = lab_packages()?;
            let options = lab::Options {
                lines: kernel.0,
                keep,
                shell,
            };
            lab::run(&options, &packages, &target_dir()?)
        }
        Task::Bench { tables } => run_sandboxed("imds-guard-bench", "bench", &tables),
        Task::Demo => run_sandboxed("imds-guard-demo", "demo", &[]),
    }
}

/// Runs `bin` of the tests crate, in release mode, as root: the demo and the benchmarks, which
/// load BPF programs and make network namespaces of their own.
fn run_sandboxed(bin: &str, task: &str, args: &[String]) -> Result<()> {
    if !is_root() {
        bail!(
            "the {task} loads BPF programs and makes a network namespace: run `cargo xtask {task}` as root"
        );
    }
    bootstrap::ensure()?;
    bootstrap::ensure_test_tools()?;
    if task == "bench" {
        bootstrap::ensure_bench_tools()?;
    }
    cargo(&["build", "--release", "--workspace", "--bins"])?;
    let mut run = vec![
        "run",
        "--quiet",
        "--release",
        "--package",
        "imds-guard-tests",
        "--bin",
        bin,
        "--",
    ];
    run.extend(args.iter().map(String::as_str));
    cargo(&run)
}

/// The workspace's target directory.
fn target_dir() -> Result<std::path::PathBuf> {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives in the workspace")?;
    Ok(std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), std::path::PathBuf::from))
}

/// Builds target/release/imds-guard and packs it, with the systemd unit, the default config
/// and the README, into a .deb (cargo-deb) and an .rpm (cargo-generate-rpm) in
/// target/packages/. Returns their paths.
fn package() -> Result<Vec<std::path::PathBuf>> {
    bootstrap::ensure_packaging_tools()?;
    cargo(&["build", "--release", "--package", "imds-guard"])?;
    let out = target_dir()?.join("packages");
    fresh_dir(&out)?;
    let out_arg = out.to_string_lossy().into_owned();
    build_deb(&out, None)?;
    cargo(&[
        "generate-rpm",
        "--package",
        "imds-guard",
        "--output",
        &out_arg,
    ])?;
    let mut built: Vec<std::path::PathBuf> = std::fs::read_dir(&out)?
        .flatten()
        .map(|entry| entry.path())
        .collect();
    built.sort();
    if built.len() != 2 {
        bail!(
            "expected a .deb and an .rpm in {}, found {built:?}",
            out.display()
        );
    }
    Ok(built)
}

/// Packages the release build as a .deb into `out` (at `version`, else the crate's).
fn build_deb(out: &std::path::Path, version: Option<&str>) -> Result<()> {
    let out = out.to_string_lossy();
    let mut args = vec!["deb", "--package", "imds-guard", "--no-build", "--quiet"];
    if let Some(version) = version {
        args.extend(["--deb-version", version]);
    }
    args.extend(["--output", &out]);
    cargo(&args)
}

/// `dir`, emptied: removed if it exists, then created.
fn fresh_dir(dir: &std::path::Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Kernel lines as `--kernel` takes them.
#[derive(Clone, Debug)]
struct LabLines(Vec<lab::Line>);

fn parse_lines(text: &str) -> Result<LabLines, String> {
    use clap::ValueEnum as _;
    if text == "all" {
        return Ok(LabLines(lab::Line::ALL.to_vec()));
    }
    let mut lines = Vec::new();
    for part in text.split(',') {
        let line = lab::Line::from_str(part.trim(), false)
            .map_err(|_| format!("{part:?} is not a kernel line: 5.10, 6.1, 6.12 or all"))?;
        if !lines.contains(&line) {
            lines.push(line);
        }
    }
    lines.sort_by_key(|line| lab::Line::ALL.iter().position(|l| l == line));
    Ok(LabLines(lines))
}

/// The .deb just built, and the same build packaged as a newer version (`+lab.upgrade`), for
/// the lab's upgrade step.
fn lab_packages() -> Result<lab::Packages> {
    let deb = package()?
        .into_iter()
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .context("no .deb was built")?;
    let name = deb
        .file_name()
        .and_then(|name| name.to_str())
        .context("a .deb name")?;
    // imds-guard_VERSION_amd64.deb
    let version = name
        .strip_prefix("imds-guard_")
        .and_then(|rest| rest.strip_suffix("_amd64.deb"))
        .with_context(|| format!("unexpected package name {name}"))?;
    let out = target_dir()?.join("lab/upgrade");
    fresh_dir(&out)?;
    build_deb(&out, Some(&format!("{version}+lab.upgrade")))?;
    let upgrade = std::fs::read_dir(&out)?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .context("no upgrade .deb was built")?;
    Ok(lab::Packages { deb, upgrade })
}

/// The agents `cargo xtask test` builds beside the default one, each with features of
/// `imds-guard-ebpf` that only tests use, as `target/debug/<name>`, each in a target directory
/// of its own (which keeps every build incremental):
/// - `imds-guard-upgrade-variant`, whose kernel programs differ (`upgrade-test-variant`): the
///   lifecycle tests upgrade a running enforcement to it, and the switch race test runs it for
///   its widened window (`switch-race-window`);
/// - `imds-guard-refused-reads-variant`, whose programs the verifier refuses where they read
///   tasks (`refused-task-reads-test-variant`): the agent on a kernel that refuses those reads.
const TEST_VARIANTS: [(&str, &str); 2] = [
    (
        "imds-guard-upgrade-variant",
        "upgrade-test-variant,switch-race-window",
    ),
    (
        "imds-guard-refused-reads-variant",
        "refused-task-reads-test-variant",
    ),
];

/// Builds [`TEST_VARIANTS`].
fn build_test_variants() -> Result<()> {
    let target = target_dir()?;
    let cargo_bin = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    for (name, features) in TEST_VARIANTS {
        let variant_target = target.join(name.trim_start_matches("imds-guard-"));
        let status = Command::new(&cargo_bin)
            .args(["build", "--package", "imds-guard", "--target-dir"])
            .arg(&variant_target)
            .env("IMDS_GUARD_EBPF_FEATURES", features)
            .status()
            .with_context(|| format!("building the test variant {name}"))?;
        if !status.success() {
            bail!("building the test variant {name} failed ({status})");
        }
        let built = variant_target.join("debug/imds-guard");
        let destination = target.join("debug").join(name);
        std::fs::copy(&built, &destination)
            .with_context(|| format!("copying {} to {}", built.display(), destination.display()))?;
    }
    Ok(())
}

/// Runs the cargo that runs us, failing on a non-zero exit.
fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and closes with one line totalling every
/// test binary's results (cargo's own last lines are often empty doc-test runs).
fn cargo_test(args: &[&str]) -> Result<()> {
    use std::io::BufRead as _;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Command::new(&cargo)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some((p, f)) = parse_test_result(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// `(passed, failed)` from a libtest summary line.
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |label: &str| {
        rest.split(';').find_map(|part| {
            part.trim()
                .strip_suffix(label)?
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
    };
    Some((count(" passed")?, count(" failed")?))
}

fn is_root() -> bool {
    // `id -u` keeps xtask free of libc bindings; it is in coreutils everywhere.
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_libtest_summaries() {
        let line = "test result: ok. 33 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s";
        assert_eq!(super::parse_test_result(line), Some((33, 0)));
        let line =
            "test result: FAILED. 2 passed; 13 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(super::parse_test_result(line), Some((2, 13)));
        assert_eq!(super::parse_test_result("running 15 tests"), None);
    }

    #[test]
    fn parses_kernel_lines() {
        use super::lab::Line;
        let lines = |text| super::parse_lines(text).map(|lines| lines.0);
        assert_eq!(lines("all"), Ok(Line::ALL.to_vec()));
        assert_eq!(lines("6.1"), Ok(vec![Line::V6_1]));
        // Oldest first, each once.
        assert_eq!(lines("6.12, 5.10,6.12"), Ok(vec![Line::V5_10, Line::V6_12]));
        let err = lines("6.1,6.6").unwrap_err();
        assert!(err.contains("\"6.6\" is not a kernel line"), "{err}");
        assert!(lines("").is_err());
    }
}

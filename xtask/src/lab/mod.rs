//! `cargo xtask lab`: imds-guard as users run it, on the kernels EC2 runs. A Debian image with
//! systemd and Docker boots under qemu once per kernel, with no network device (the IMDS
//! addresses are on a dummy interface inside the VM, with a mock IMDS); the freshly built .deb
//! is installed with apt and the scenario (`scenario/scenario.sh`) lives through install,
//! audit, enforce, restart, reboot, upgrade, hardening and removal. One table sums it up.
//!
//! Everything that touches the IMDS addresses or the root cgroup happens inside the VM.
//! Nothing here changes the machine's apt sources, firewall or cgroups.

mod image;
mod interrupt;
mod kernels;
mod vm;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

pub use self::kernels::Line;
use self::vm::Vm;

/// How long one kernel's run (two boots) may take before it counts as failed.
const RUN_LIMIT: Duration = Duration::from_mins(20);

/// The tools the lab runs, and the Debian package of each.
const TOOLS: [(&str, &str); 5] = [
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-img", "qemu-utils"),
    ("debootstrap", "debootstrap"),
    ("debugfs", "e2fsprogs"),
    ("unshare", "util-linux"),
];

/// What `cargo xtask lab` was asked.
pub struct Options {
    /// The kernel lines to run, oldest first.
    pub lines: Vec<Line>,
    /// Keep each VM's disks (for a look with `--shell` or by hand).
    pub keep: bool,
    /// Boot the first line to a shell instead of running the scenario.
    pub shell: bool,
}

/// The packages under test: the .deb just built, and the same build as a newer version.
pub struct Packages {
    /// The .deb to install.
    pub deb: PathBuf,
    /// The .deb to upgrade to.
    pub upgrade: PathBuf,
}

/// Runs the lab; fails when any step on any kernel failed.
pub fn run(options: &Options, packages: &Packages, target: &Path) -> Result<()> {
    interrupt::catch();
    ensure_tools()?;
    let lab = target.join("lab");
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lab");
    let kernels = kernels::fetch(&lab.join("apt"))?;
    let image = image::ensure(&lab.join("image"), &recipe, &kernels)?;
    let scenario = lab.join("scenario");
    prepare_scenario(&recipe.join("scenario"), packages, &scenario)?;
    if options.shell {
        let line = options.lines.first().copied().unwrap_or(Line::V6_1);
        let vm = Vm::new(&image, line, &lab.join(line.label()), &scenario)?;
        return vm.shell(&image);
    }
    let mut rows = Vec::new();
    for &line in &options.lines {
        eprintln!(
            "lab: {} (kernel {})",
            line.label(),
            release_of(&kernels, line)
        );
        rows.push(run_line(&image, line, &lab, &scenario, options.keep));
        interrupt::check()?;
    }
    let table = Table::new(&rows);
    print!("{table}");
    for row in &rows {
        println!("{}: {}", row.line.label(), row.notes);
    }
    if rows.iter().any(|row| !row.passed()) {
        bail!(
            "the lab failed; consoles, journals and results are under {}",
            lab.display()
        );
    }
    Ok(())
}

fn release_of(kernels: &[kernels::Kernel], line: Line) -> String {
    kernels
        .iter()
        .find(|kernel| kernel.line == line)
        .map_or_else(String::new, |kernel| kernel.release.clone())
}

/// One kernel's run: its steps' outcomes, or why it did not finish.
struct Row {
    line: Line,
    /// `(step, passed, seconds)` in the order run.
    steps: Vec<(String, bool, String)>,
    /// Why the run did not get through every step, if it did not.
    error: Option<String>,
    /// What the agent said of this kernel at start (how it tells containers, its warnings).
    notes: String,
}

impl Row {
    fn passed(&self) -> bool {
        self.error.is_none() && self.steps.iter().all(|(_, passed, _)| *passed)
    }
}

fn run_line(image: &image::Image, line: Line, lab: &Path, scenario: &Path, keep: bool) -> Row {
    let dir = lab.join(line.label());
    let mut row = Row {
        line,
        steps: Vec::new(),
        error: None,
        notes: String::new(),
    };
    let outcome = Vm::new(image, line, &dir, scenario).and_then(|vm| {
        let ran = vm.run(image, RUN_LIMIT);
        let out = vm.results();
        if !keep {
            vm.remove_disks();
        }
        ran?;
        out
    });
    match outcome {
        Ok(out) => {
            row.steps = read_results(&out);
            row.notes = notes(&out);
            if !out.join("finished").exists() {
                row.error = Some(format!(
                    "the scenario did not finish; see {}",
                    dir.join("console.log").display()
                ));
            } else if let Err(error) = containers_told_as_expected(&out, line) {
                row.error = Some(error);
            }
        }
        Err(err) => row.error = Some(format!("{err:#}")),
    }
    if let Some(error) = &row.error {
        eprintln!("lab: {}: {error}", line.label());
    }
    row
}

/// `results.tsv`: `step<TAB>pass|fail<TAB>seconds` per line.
fn read_results(out: &Path) -> Vec<(String, bool, String)> {
    std::fs::read_to_string(out.join("results.tsv"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let step = fields.next()?.to_owned();
            let passed = fields.next()? == "pass";
            let seconds = fields.next()?.to_owned();
            Some((step, passed, seconds))
        })
        .collect()
}

/// Field `name` of a log line (`name=value` or `name="a value"`).
fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let rest = line.split(&format!(" {name}=")).nth(1)?;
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next(),
        None => rest.split_whitespace().next(),
    }
}

/// Whether the agent told containers on `line`'s kernel as it must there
/// ([`Line::containers_by`]); if not, why the line fails.
fn containers_told_as_expected(out: &Path, line: Line) -> std::result::Result<(), String> {
    let start = std::fs::read_to_string(out.join("start-line.txt")).unwrap_or_default();
    let told = log_field(&start, "containers_by").unwrap_or("(no start line)");
    if told == line.containers_by() {
        return Ok(());
    }
    Err(format!(
        "the agent told containers by {told:?} where this kernel lets it tell them by {:?}:          a program was refused with the task's reads (see {})",
        line.containers_by(),
        out.join("warnings.txt").display()
    ))
}

/// How the agent tells containers and times fold windows on this kernel, and how many
/// warnings it gave at start.
fn notes(out: &Path) -> String {
    let start = std::fs::read_to_string(out.join("start-line.txt")).unwrap_or_default();
    let containers_by = log_field(&start, "containers_by").unwrap_or("?");
    let fold_clock = log_field(&start, "fold_clock").unwrap_or("?");
    let warnings = std::fs::read_to_string(out.join("warnings.txt")).map_or(0, |text| {
        text.lines().filter(|line| !line.trim().is_empty()).count()
    });
    format!(
        "containers told by {containers_by}; fold windows on {fold_clock}; {warnings} \
         warning(s) at start{}",
        if warnings > 0 {
            format!(" (see {})", out.join("warnings.txt").display())
        } else {
            String::new()
        }
    )
}

/// The table: a row per kernel, a column per step (`pass 12.3s`), a last column `pass` or
/// `FAIL`.
struct Table {
    columns: Vec<String>,
    rows: Vec<(String, BTreeMap<String, String>, &'static str)>,
}

impl Table {
    fn new(rows: &[Row]) -> Self {
        let mut columns: Vec<String> = Vec::new();
        for row in rows {
            for (step, _, _) in &row.steps {
                if !columns.contains(step) {
                    columns.push(step.clone());
                }
            }
        }
        let rows = rows
            .iter()
            .map(|row| {
                let cells = row
                    .steps
                    .iter()
                    .map(|(step, passed, seconds)| {
                        let verdict = if *passed { "pass" } else { "FAIL" };
                        (step.clone(), format!("{verdict} {seconds}s"))
                    })
                    .collect();
                let verdict = if row.passed() { "pass" } else { "FAIL" };
                (row.line.label().to_owned(), cells, verdict)
            })
            .collect();
        Self { columns, rows }
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "| kernel |")?;
        for column in &self.columns {
            write!(f, " {column} |")?;
        }
        writeln!(f, " result |")?;
        write!(f, "|---|")?;
        for _ in &self.columns {
            write!(f, "---|")?;
        }
        writeln!(f, "---|")?;
        for (line, cells, verdict) in &self.rows {
            write!(f, "| {line} |")?;
            for column in &self.columns {
                write!(f, " {} |", cells.get(column).map_or("-", String::as_str))?;
            }
            writeln!(f, " {verdict} |")?;
        }
        Ok(())
    }
}

/// The scenario disk's contents: the scenario, its helper and the two packages.
fn prepare_scenario(from: &Path, packages: &Packages, into: &Path) -> Result<()> {
    crate::fresh_dir(into)?;
    for name in ["scenario.sh", "lab.py"] {
        std::fs::copy(from.join(name), into.join(name))
            .with_context(|| format!("copying {name}"))?;
    }
    std::fs::copy(&packages.deb, into.join("imds-guard.deb"))?;
    std::fs::copy(&packages.upgrade, into.join("imds-guard-upgrade.deb"))?;
    Ok(())
}

/// Installs what the lab runs (Debian, as root), or says what to run.
///
/// Installing one package can remove another: on a machine with a backported `qemu-utils`,
/// apt removes it to install bookworm's `qemu-system-x86` (their versions conflict), and the lab
/// then failed on a missing `qemu-img`. So the tools are looked for again after each round, and
/// the lab stops with the names of what is still missing rather than fail later in each VM.
fn ensure_tools() -> Result<()> {
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    if !(Path::new("/etc/debian_version").exists() && crate::is_root()) {
        bail!(
            "the lab needs {}: as root, run\n    apt-get update && {}",
            missing.join(", "),
            missing
                .iter()
                .map(|package| format!("apt-get install -y --no-install-recommends {package}"))
                .collect::<Vec<_>>()
                .join(" && ")
        );
    }
    interrupt::run(Command::new("apt-get").args(["-qq", "update"]))?;
    // Two rounds: the second installs, from the same release, what the first one's removed.
    for _ in 0..2 {
        // One at a time: qemu-system-x86 with others in one command was refused here once.
        for package in missing_packages() {
            eprintln!("lab: installing {package}");
            interrupt::run(Command::new("apt-get").args([
                "install",
                "-qq",
                "-y",
                "--no-install-recommends",
                package,
            ]))?;
        }
    }
    let missing = missing_packages();
    if !missing.is_empty() {
        bail!(
            "the lab still lacks {} after installing it (apt removed it again?): see `apt-cache \
             policy {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    Ok(())
}

/// The packages of the lab's tools that are not on the `PATH`.
fn missing_packages() -> Vec<&'static str> {
    TOOLS
        .iter()
        .filter(|(tool, _)| !on_path(tool))
        .map(|(_, package)| *package)
        .collect()
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .any(|dir| dir.join(tool).is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::{Line, Row, Table, containers_told_as_expected, notes, read_results};

    /// A directory of its own under the system's temporary directory, removed when dropped.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("xtask-lab-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn step(name: &str, passed: bool, seconds: &str) -> (String, bool, String) {
        (name.to_owned(), passed, seconds.to_owned())
    }

    #[test]
    fn reads_the_scenarios_results() {
        let out = Scratch::new("results");
        std::fs::write(
            out.0.join("results.tsv"),
            "install\tpass\t12.3\naudit\tfail\t4.0\ntruncated\n",
        )
        .unwrap();
        assert_eq!(
            read_results(&out.0),
            [step("install", true, "12.3"), step("audit", false, "4.0")]
        );
        // No results at all (the VM never got to the scenario): no steps, not a pass.
        assert!(read_results(&out.0.join("missing")).is_empty());
    }

    #[test]
    fn notes_say_how_containers_are_told_and_count_warnings() {
        let out = Scratch::new("notes");
        std::fs::write(
            out.0.join("start-line.txt"),
            "INFO imds-guard is enforcing cgroup=/ mode=audit rules_from=\"/etc/imds-guard/imds-guard.toml\" \
             containers_by=\"BTF loads\" fold_clock=\"CLOCK_MONOTONIC_COARSE\" rules=1 \
             protected=[..]\n",
        )
        .unwrap();
        std::fs::write(out.0.join("warnings.txt"), "WARN one\n\nWARN two\n").unwrap();
        let notes = notes(&out.0);
        assert!(
            notes.starts_with(
                "containers told by BTF loads; fold windows on CLOCK_MONOTONIC_COARSE; 2 \
                 warning(s) at start (see "
            ),
            "{notes}"
        );
        std::fs::remove_file(out.0.join("warnings.txt")).unwrap();
        std::fs::write(
            out.0.join("start-line.txt"),
            "INFO imds-guard is enforcing containers_by=\"BTF loads\" fold_clock=CLOCK_BOOTTIME\n",
        )
        .unwrap();
        assert_eq!(
            super::notes(&out.0),
            "containers told by BTF loads; fold windows on CLOCK_BOOTTIME; 0 warning(s) at start"
        );
    }

    #[test]
    fn a_kernel_where_the_agent_fell_back_to_cgroup_paths_fails() {
        let out = Scratch::new("containers-by");
        let start = |containers_by: &str| {
            std::fs::write(
                out.0.join("start-line.txt"),
                format!(
                    "INFO imds-guard is enforcing cgroup=/ containers_by=\"{containers_by}\" \
                     fold_clock=\"CLOCK_MONOTONIC_COARSE\" rules=1\n"
                ),
            )
            .unwrap();
        };
        start("namespaces (BTF loads) and cgroup paths");
        assert_eq!(containers_told_as_expected(&out.0, Line::V6_1), Ok(()));
        assert_eq!(containers_told_as_expected(&out.0, Line::V6_12), Ok(()));
        // 5.10 must read tasks with probe reads; BTF loads there would be news, not a pass.
        assert!(containers_told_as_expected(&out.0, Line::V5_10).is_err());
        start("namespaces (probe reads) and cgroup paths");
        assert_eq!(containers_told_as_expected(&out.0, Line::V5_10), Ok(()));
        assert!(containers_told_as_expected(&out.0, Line::V6_1).is_err());
        start("cgroup paths only");
        for line in Line::ALL {
            let error = containers_told_as_expected(&out.0, line).unwrap_err();
            assert!(error.contains("\"cgroup paths only\""), "{error}");
        }
        std::fs::remove_file(out.0.join("start-line.txt")).unwrap();
        assert!(containers_told_as_expected(&out.0, Line::V6_1).is_err());
    }

    #[test]
    fn the_table_has_a_row_per_kernel_and_a_column_per_step() {
        let rows = [
            Row {
                line: Line::V5_10,
                steps: vec![step("install", true, "5.1"), step("audit", false, "9.0")],
                error: None,
                notes: String::new(),
            },
            Row {
                line: Line::V6_1,
                steps: vec![
                    step("install", true, "4.2"),
                    step("audit", true, "8.8"),
                    step("enforce", true, "7.0"),
                ],
                error: None,
                notes: String::new(),
            },
            Row {
                line: Line::V6_12,
                steps: vec![step("install", true, "4.0")],
                error: Some("the scenario did not finish".to_owned()),
                notes: String::new(),
            },
        ];
        assert_eq!(
            Table::new(&rows).to_string(),
            "| kernel | install | audit | enforce | result |\n\
             |---|---|---|---|---|\n\
             | 5.10 | pass 5.1s | FAIL 9.0s | - | FAIL |\n\
             | 6.1 | pass 4.2s | pass 8.8s | pass 7.0s | pass |\n\
             | 6.12 | pass 4.0s | - | - | FAIL |\n"
        );
    }
}

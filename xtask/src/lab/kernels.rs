//! The kernels EC2 hosts run, from Debian's archives: the cloud kernel of each line, found and
//! downloaded through a private apt configuration under `target/lab/apt/` (the machine's own
//! apt sources and state are never read or changed).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::interrupt;

/// Where the kernels come from.
pub const MIRROR: &str = "http://deb.debian.org/debian";

/// A kernel line and the Debian suite whose cloud kernel is of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Line {
    /// 5.10 (bullseye): Amazon Linux 2's line.
    #[value(name = "5.10")]
    V5_10,
    /// 6.1 (bookworm): Amazon Linux 2023's default line.
    #[value(name = "6.1")]
    V6_1,
    /// 6.12 (trixie): Amazon Linux 2023's newer line.
    #[value(name = "6.12")]
    V6_12,
}

impl Line {
    /// Every line, oldest first.
    pub const ALL: [Self; 3] = [Self::V5_10, Self::V6_1, Self::V6_12];

    /// `5.10`, `6.1`, `6.12`.
    pub fn label(self) -> &'static str {
        match self {
            Self::V5_10 => "5.10",
            Self::V6_1 => "6.1",
            Self::V6_12 => "6.12",
        }
    }

    /// How the agent must tell containers on this line's kernel (its start line's
    /// `containers_by`): by their namespaces, read as that kernel lets these programs read a
    /// task. Anything else means a program was refused with the task's reads and the agent fell
    /// back to cgroup paths alone, where a namespaced task in an ordinary cgroup passes for the
    /// host's: a failure of the lab, though every scenario's container (in Docker's cgroups)
    /// would still be told.
    pub fn containers_by(self) -> &'static str {
        match self {
            // `bpf_get_current_task_btf` is not offered to cgroup programs before 5.11.
            Self::V5_10 => "namespaces (probe reads) and cgroup paths",
            Self::V6_1 | Self::V6_12 => "namespaces (BTF loads) and cgroup paths",
        }
    }

    fn suite(self) -> &'static str {
        match self {
            Self::V5_10 => "bullseye",
            Self::V6_1 => "bookworm",
            Self::V6_12 => "trixie",
        }
    }
}

/// A kernel package downloaded for a line.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// Its line.
    pub line: Line,
    /// The package (`linux-image-6.1.0-50-cloud-amd64`).
    pub package: String,
    /// Its version (`6.1.176-1`).
    pub version: String,
    /// The release `uname -r` says, as in `/boot/vmlinuz-RELEASE`.
    pub release: String,
    /// The downloaded .deb.
    pub deb: PathBuf,
}

/// Finds each line's current cloud kernel and downloads it into `dir/debs/` (once).
pub fn fetch(dir: &Path) -> Result<Vec<Kernel>> {
    let apt = Apt::new(dir)?;
    apt.update()?;
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs)?;
    let mut kernels = Vec::new();
    for line in Line::ALL {
        let meta = apt.version_in("linux-image-cloud-amd64", line.suite())?;
        let depends = apt.field("linux-image-cloud-amd64", &meta, "Depends")?;
        let package = depends
            .split([',', ' ', '('])
            .find(|word| word.starts_with("linux-image-") && word.ends_with("-cloud-amd64"))
            .with_context(|| format!("no kernel in {depends:?}"))?
            .to_owned();
        let version = apt.version_in(&package, line.suite())?;
        let release = package.trim_start_matches("linux-image-").to_owned();
        let deb = deb_path(&debs, &package, &version);
        if !deb.exists() {
            apt.download(&package, &version, &debs)?;
            if !deb.exists() {
                bail!("apt downloaded no {}", deb.display());
            }
        }
        kernels.push(Kernel {
            line,
            package,
            version,
            release,
            deb,
        });
    }
    Ok(kernels)
}

/// `PACKAGE_VERSION_amd64.deb` in `dir`, as `apt-get download` names it (an epoch's colon is
/// `%3a` there).
fn deb_path(dir: &Path, package: &str, version: &str) -> PathBuf {
    dir.join(format!(
        "{package}_{}_amd64.deb",
        version.replace(':', "%3a")
    ))
}

/// apt with its own sources list, lists, cache and (empty) status.
struct Apt {
    options: Vec<String>,
}

impl Apt {
    fn new(dir: &Path) -> Result<Self> {
        for sub in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let mut sources = String::new();
        for line in Line::ALL {
            let _ = writeln!(
                sources,
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {MIRROR} {} main",
                line.suite()
            );
        }
        std::fs::write(dir.join("sources.list"), sources)?;
        let status = dir.join("status");
        if !status.exists() {
            std::fs::write(&status, "")?;
        }
        let path = |sub: &str| dir.join(sub).to_string_lossy().into_owned();
        let options = [
            ("Dir::Etc::SourceList", path("sources.list")),
            ("Dir::Etc::SourceParts", "/nonexistent".to_owned()),
            ("Dir::State::Lists", path("lists")),
            ("Dir::Cache", path("cache")),
            ("Dir::State::Status", path("status")),
            ("APT::Get::List-Cleanup", "false".to_owned()),
        ]
        .into_iter()
        .flat_map(|(key, value)| ["-o".to_owned(), format!("{key}={value}")])
        .collect();
        Ok(Self { options })
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.args(&self.options);
        command
    }

    fn update(&self) -> Result<()> {
        interrupt::run(self.command("apt-get").args(["-qq", "update"]))
            .context("apt-get update with the lab's private sources")
    }

    /// The version of `package` that `suite` holds.
    fn version_in(&self, package: &str, suite: &str) -> Result<String> {
        let out = self
            .command("apt-cache")
            .args(["madison", package])
            .output()
            .context("running apt-cache madison")?;
        // `pkg | version | http://... suite/main amd64 Packages`
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split('|').map(str::trim).collect();
                let source = fields.get(2)?;
                source
                    .split_whitespace()
                    .nth(1)?
                    .starts_with(&format!("{suite}/"))
                    .then(|| fields[1].to_owned())
            })
            .with_context(|| format!("{suite} has no {package}"))
    }

    /// Field `name` of `package` `version`.
    fn field(&self, package: &str, version: &str, name: &str) -> Result<String> {
        let out = self
            .command("apt-cache")
            .args(["show", &format!("{package}={version}")])
            .output()
            .context("running apt-cache show")?;
        let prefix = format!("{name}: ");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| line.strip_prefix(&prefix).map(str::to_owned))
            .with_context(|| format!("{package} {version} has no {name}"))
    }

    fn download(&self, package: &str, version: &str, into: &Path) -> Result<()> {
        eprintln!("lab: downloading {package} {version}");
        interrupt::run(
            self.command("apt-get")
                .args(["-qq", "download", &format!("{package}={version}")])
                .current_dir(into),
        )
        .with_context(|| format!("downloading {package} {version}"))
    }
}

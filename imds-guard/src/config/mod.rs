//! Settings: the TOML file and the command line, parsed and validated into a [`Config`].
//!
//! Parsing is strict (`deny_unknown_fields`): for a security agent a typo such as `alow_uid`
//! must be an error, never a silently wider policy. Every error names the file, line and column
//! (or the option) and the value.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Range,
    path::{Path, PathBuf},
};

use imds_guard_common::{
    imds::{IMDS_V4, IMDS_V6},
    policy::{MAX_PROTECTED_V4, MAX_PROTECTED_V6},
};
use serde::Deserialize;
use toml::Spanned;

pub mod glob;
pub mod paths;

/// Where a setting came from, for error messages: `--allow-uid` or `/etc/x.toml:3:14`.
pub type Origin = String;

/// Where the agent looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/imds-guard/imds-guard.toml";

/// What is wrong with the settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("{}: cannot read the config file: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has an unknown key or a value of the wrong type.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the parser said.
        message: String,
    },
    /// A cgroup the settings name does not exist, or is not written as one.
    #[error(transparent)]
    Cgroup(#[from] crate::host::cgroups::CgroupError),
    /// A setting (in the file or on the command line) has a value that cannot work.
    #[error("{origin}: {message}")]
    Invalid {
        /// Option or file position.
        origin: Origin,
        /// What is wrong, with the value.
        message: String,
    },
}

/// Which IMDS requests a rule's workloads may make (`imds`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Imds {
    /// IMDSv1 and IMDSv2 (v1 requests are reported, not refused).
    #[default]
    Any,
    /// IMDSv2 only: v1 requests are refused (their write fails with `EACCES`).
    V2,
}

impl Imds {
    /// As written in the config.
    #[must_use]
    pub fn as_toml(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::V2 => "v2",
        }
    }
}

/// What happens to an attempt no rule allows.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The connect or send fails with `EPERM` and is reported.
    #[default]
    Enforce,
    /// The attempt goes through and is reported.
    Audit,
}

impl Mode {
    /// As `Settings::mode` holds it: `MODE_ENFORCE` or `MODE_AUDIT`.
    #[must_use]
    pub fn kernel_value(self) -> u32 {
        match self {
            Self::Enforce => imds_guard_common::policy::MODE_ENFORCE,
            Self::Audit => imds_guard_common::policy::MODE_AUDIT,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        })
    }
}

/// Whether a rule matches tasks in containers: `containers = false`, `true` or `"only"`.
///
/// A task is in a container when the kernel finds it outside the host's initial pid or cgroup
/// namespace at the attempt (container runtimes make both; systemd services neither), or when
/// it is in a container runtime's cgroup (see [`crate::host::workload::is_container_cgroup`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Containers {
    /// Only tasks on the host: a container's root, or a container process that switched to
    /// the rule's uid, never matches (the default, unless the rule names container cgroups).
    Excluded,
    /// Tasks on the host and in containers.
    Included,
    /// Only tasks in a container runtime's cgroup. A task the kernel finds in namespaces of its
    /// own in another cgroup does not match: any local user can make such namespaces (with a
    /// user namespace of their own), so namespaces only ever take rules away.
    Only,
}

impl Containers {
    /// Whether a task in a container (`true`) or on the host matches.
    #[must_use]
    pub fn admits(self, in_container: bool) -> bool {
        match self {
            Self::Excluded => !in_container,
            Self::Included => true,
            Self::Only => in_container,
        }
    }

    /// As written in a config: `false`, `true`, `"only"`.
    #[must_use]
    pub fn as_toml(self) -> &'static str {
        match self {
            Self::Excluded => "false",
            Self::Included => "true",
            Self::Only => "\"only\"",
        }
    }
}

impl<'de> Deserialize<'de> for Containers {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Containers;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("false, true or \"only\"")
            }
            fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<Containers, E> {
                Ok(if value {
                    Containers::Included
                } else {
                    Containers::Excluded
                })
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Containers, E> {
                match value {
                    "only" => Ok(Containers::Only),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(value), &self)),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// The file as written: every key optional, nothing unknown.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    mode: Option<Spanned<Mode>>,
    cgroup: Option<Spanned<String>>,
    protect: Option<Vec<Spanned<String>>>,
    allow_uid: Option<Vec<Spanned<u32>>>,
    allow_gid: Option<Vec<Spanned<u32>>>,
    allow_cgroup: Option<Vec<Spanned<String>>>,
    allow: Option<Vec<Spanned<RawRule>>>,
    imds: Option<Spanned<Imds>>,
    posture: Option<Spanned<bool>>,
}

/// Settings given on the command line; they add to the file's lists and override its mode.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--mode`.
    pub mode: Option<Mode>,
    /// `--cgroup`.
    pub cgroup: Option<String>,
    /// `--allow-uid`.
    pub allow_uid: Vec<u32>,
    /// `--allow-gid`.
    pub allow_gid: Vec<u32>,
    /// `--allow-cgroup`.
    pub allow_cgroup: Vec<String>,
}

/// A value and where it was set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting<T> {
    /// The value.
    pub value: T,
    /// `--option`, `FILE:LINE:COL`, or `default`.
    pub origin: Origin,
}

/// A uid or gid as written: a number, or a user or group name looked up when the policy is
/// resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// A numeric id.
    Id(u32),
    /// A name from the user or group database.
    Name(String),
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id(id) => write!(f, "{id}"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

impl<'de> Deserialize<'de> for Principal {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Principal;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number (0 to 4294967295) or a name")
            }
            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Principal, E> {
                u32::try_from(value)
                    .map(Principal::Id)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(value), &self))
            }
            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Principal, E> {
                u32::try_from(value)
                    .map(Principal::Id)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(value), &self))
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Principal, E> {
                if value.is_empty() || value.contains(|c: char| c.is_whitespace() || c == ':') {
                    return Err(E::invalid_value(serde::de::Unexpected::Str(value), &self));
                }
                Ok(value
                    .parse()
                    .map_or_else(|_| Principal::Name(value.to_owned()), Principal::Id))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// One string or an array of them, each with its position when the file gives one.
#[derive(Debug)]
enum Strings {
    One(String),
    Many(Vec<Spanned<String>>),
}

impl<'de> Deserialize<'de> for Strings {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Strings;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Strings, E> {
                Ok(Strings::One(value.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Strings, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Strings::Many(items))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// One `[[allow]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<Spanned<String>>,
    uid: Option<Spanned<Principal>>,
    gid: Option<Spanned<Principal>>,
    cgroup: Option<Spanned<Strings>>,
    unit: Option<Spanned<Strings>>,
    not_cgroup: Option<Spanned<Strings>>,
    containers: Option<Spanned<Containers>>,
    mode: Option<Spanned<Mode>>,
    imds: Option<Spanned<Imds>>,
    paths: Option<Spanned<Strings>>,
    deny_paths: Option<Spanned<Strings>>,
}

/// One allow rule: every condition it has must hold for a task to match it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// The name events and `explain` use; `None` for the description of its conditions.
    pub name: Option<String>,
    /// The task's uid.
    pub uid: Option<Principal>,
    /// The task's primary gid.
    pub gid: Option<Principal>,
    /// The task is in a cgroup matching one of these paths or glob patterns, or below one.
    pub cgroup: Vec<Setting<String>>,
    /// The task is in the cgroup of one of these units of the system manager (glob patterns
    /// allowed), or below it, in any slice; never below `user.slice`, a container's or a pod's
    /// cgroup (see `policy::beyond_the_system_manager`).
    pub unit: Vec<Setting<String>>,
    /// The task is in none of the cgroups matching these, nor below one.
    pub not_cgroup: Vec<Setting<String>>,
    /// Whether tasks in containers match, as written (`None`: not written; see
    /// `PolicyRule::containers` for what that means).
    pub containers: Option<Setting<Containers>>,
    /// `allow_cgroup` and `--allow-cgroup`: the cgroup must exist when the policy is resolved.
    pub cgroup_must_exist: bool,
    /// Staged: a matching attempt is allowed but reported.
    pub audit: bool,
    /// `imds` as written in the rule (`None`: the global `imds` applies).
    pub imds: Option<Setting<Imds>>,
    /// The metadata paths its workloads may request (empty: any not denied).
    pub paths: Vec<Setting<String>>,
    /// The metadata paths its workloads must not request.
    pub deny_paths: Vec<Setting<String>>,
    /// Where it was written.
    pub origin: Origin,
}

impl Rule {
    fn uid(uid: u32, origin: Origin) -> Self {
        Self {
            uid: Some(Principal::Id(uid)),
            origin,
            ..Self::default()
        }
    }

    fn gid(gid: u32, origin: Origin) -> Self {
        Self {
            gid: Some(Principal::Id(gid)),
            origin,
            ..Self::default()
        }
    }

    fn cgroup(path: String, origin: Origin) -> Self {
        Self {
            cgroup: vec![Setting {
                value: path,
                origin: origin.clone(),
            }],
            cgroup_must_exist: true,
            origin,
            ..Self::default()
        }
    }

    /// Its conditions, as `uid 0, not cgroup /system.slice/docker-*.scope`.
    #[must_use]
    pub fn conditions(&self) -> String {
        let mut parts = Vec::new();
        if let Some(uid) = &self.uid {
            parts.push(format!("uid {uid}"));
        }
        if let Some(gid) = &self.gid {
            parts.push(format!("gid {gid}"));
        }
        let mut list = |label: &str, items: &[Setting<String>]| {
            if !items.is_empty() {
                let values: Vec<&str> = items.iter().map(|item| item.value.as_str()).collect();
                parts.push(format!("{label} {}", values.join(" | ")));
            }
        };
        list("cgroup", &self.cgroup);
        list("unit", &self.unit);
        list("not cgroup", &self.not_cgroup);
        match self.containers.as_ref().map(|setting| setting.value) {
            Some(Containers::Included) => parts.push("containers too".into()),
            Some(Containers::Only) => parts.push("containers only".into()),
            Some(Containers::Excluded) => parts.push("not containers".into()),
            None => {}
        }
        parts.join(", ")
    }

    /// The name events use: the rule's `name`, or its conditions.
    #[must_use]
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.conditions())
    }
}

/// Validated settings: everything the policy needs, nothing resolved against the host yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The config file read, if any.
    pub file: Option<PathBuf>,
    /// Global mode.
    pub mode: Mode,
    /// The cgroup the programs attach to (`/`, the whole host, by default).
    pub attach: Setting<String>,
    /// Protected destinations (any port), de-duplicated, IPv4-mapped IPv6 written as IPv4.
    pub protect: Vec<Setting<IpAddr>>,
    /// Allow rules in the order written (options last): the first that matches decides.
    pub allow: Vec<Rule>,
    /// `imds`: which requests the workloads of rules that do not say may make.
    pub imds: Imds,
    /// `posture`: check the instance's IMDS settings at start and hourly.
    pub posture: bool,
}

/// What `check-config` and `run` say of where the rules come from.
pub const BUILT_IN_DEFAULT: &str = "the built-in default (no rule in the config file or on \
    the command line): uid 0 on the host, never in a container";

impl Config {
    /// Whether the rules are the built-in default (none written anywhere).
    #[must_use]
    pub fn uses_built_in_default(&self) -> bool {
        self.allow.len() == 1 && self.allow[0].origin == "default"
    }

    /// Where the rules in force come from, in words.
    #[must_use]
    pub fn rules_source(&self) -> String {
        if self.uses_built_in_default() {
            BUILT_IN_DEFAULT.to_owned()
        } else {
            let file = self.file.as_ref().map(|file| file.display().to_string());
            let options = self.allow.iter().any(|rule| rule.origin.starts_with("--"));
            match (file, options) {
                (Some(file), true) => {
                    format!("{file} and the command line (the built-in default is replaced)")
                }
                (Some(file), false) => format!("{file} (the built-in default is replaced)"),
                (None, _) => "the command line (the built-in default is replaced)".to_owned(),
            }
        }
    }
}

impl Config {
    /// Reads `file` (or [`DEFAULT_CONFIG_PATH`] when it exists) and applies `overrides`.
    ///
    /// # Errors
    /// [`ConfigError::Read`] when an explicit file cannot be read, [`ConfigError::Parse`] for
    /// malformed TOML, unknown keys or wrong types, [`ConfigError::Invalid`] for bad values.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let (path, text) = match file {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => (Some(path.to_owned()), text),
                Err(source) => {
                    return Err(ConfigError::Read {
                        path: path.to_owned(),
                        source,
                    });
                }
            },
            None => match std::fs::read_to_string(DEFAULT_CONFIG_PATH) {
                Ok(text) => (Some(PathBuf::from(DEFAULT_CONFIG_PATH)), text),
                Err(source) if source.kind() == std::io::ErrorKind::NotFound => {
                    (None, String::new())
                }
                Err(source) => {
                    return Err(ConfigError::Read {
                        path: PathBuf::from(DEFAULT_CONFIG_PATH),
                        source,
                    });
                }
            },
        };
        Self::from_toml(path.as_deref(), &text, overrides)
    }

    /// Parses `text` (the contents of `file`, if any) and applies `overrides`.
    ///
    /// # Errors
    /// As for [`Config::load`].
    pub fn from_toml(
        file: Option<&Path>,
        text: &str,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let display_path = file.map_or_else(|| PathBuf::from("<config>"), Path::to_owned);
        let mut raw: RawConfig = toml::from_str(text).map_err(|err| {
            let (line, column) = err
                .span()
                .map_or((1, 1), |span| line_column(text, span.start));
            ConfigError::Parse {
                path: display_path.clone(),
                line,
                column,
                message: err.message().trim_end().to_owned(),
            }
        })?;
        // Every rule and setting is given its position: lines found once, not once each
        // (10,000 rules took 50 s that way).
        let lines = Lines::of(text);
        let at = |span: Range<usize>| {
            let (line, column) = lines.line_column(span.start);
            format!("{}:{line}:{column}", display_path.display())
        };

        let allow = rules(&mut raw, overrides, &at)?;
        let mode = overrides
            .mode
            .or(raw.mode.map(Spanned::into_inner))
            .unwrap_or_default();

        let attach = match (&overrides.cgroup, raw.cgroup) {
            (Some(cgroup), _) => Setting {
                value: cgroup.clone(),
                origin: "--cgroup".into(),
            },
            (None, Some(cgroup)) => Setting {
                origin: at(cgroup.span()),
                value: cgroup.into_inner(),
            },
            (None, None) => Setting {
                value: "/".into(),
                origin: "default".into(),
            },
        };

        let mut protect = Vec::new();
        if let Some(entries) = raw.protect {
            if entries.is_empty() {
                return Err(ConfigError::Invalid {
                    origin: format!("{}: protect", display_path.display()),
                    message: "protect is empty: nothing would be protected \
                              (remove the key to protect the IMDS addresses)"
                        .into(),
                });
            }
            for entry in entries {
                let origin = at(entry.span());
                let addresses =
                    protect_entry(entry.get_ref()).map_err(|message| ConfigError::Invalid {
                        origin: origin.clone(),
                        message,
                    })?;
                add_unique_in_file(&mut protect, addresses, &origin)?;
            }
        } else {
            let defaults = protect_entry("imds").unwrap_or_default();
            add_unique_in_file(&mut protect, defaults, &"default".into())?;
        }

        Ok(Self {
            file: file.map(Path::to_owned),
            mode,
            attach,
            protect,
            allow,
            imds: raw.imds.map(Spanned::into_inner).unwrap_or_default(),
            posture: raw.posture.is_some_and(Spanned::into_inner),
        })
    }
}

/// Addresses named by one `protect` entry: a preset or a literal address.
fn protect_entry(entry: &str) -> Result<Vec<IpAddr>, String> {
    let addresses = match entry {
        "imds" => vec![
            IpAddr::V4(Ipv4Addr::from(IMDS_V4)),
            IpAddr::V6(Ipv6Addr::from(IMDS_V6)),
        ],
        "ecs-credentials" => vec![IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2))],
        "eks-pod-identity" => vec![
            IpAddr::V4(Ipv4Addr::new(169, 254, 170, 23)),
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)),
        ],
        literal => {
            let address: IpAddr = literal.parse().map_err(|_| {
                format!(
                    "{literal:?} is neither a preset (imds, ecs-credentials, eks-pod-identity) \
                     nor an IPv4 or IPv6 address"
                )
            })?;
            let address = address.to_canonical();
            if address.is_unspecified() || address.is_multicast() {
                return Err(format!(
                    "{literal:?} cannot be protected: it is not a unicast address"
                ));
            }
            vec![address]
        }
    };
    Ok(addresses)
}

/// Adds addresses, refusing one the file already named, and more of a family than the
/// programs compare a destination with (`MAX_PROTECTED_V4`, `MAX_PROTECTED_V6`).
fn add_unique_in_file(
    protect: &mut Vec<Setting<IpAddr>>,
    addresses: Vec<IpAddr>,
    origin: &Origin,
) -> Result<(), ConfigError> {
    for address in addresses {
        if let Some(earlier) = protect.iter().find(|setting| setting.value == address) {
            return Err(ConfigError::Invalid {
                origin: origin.clone(),
                message: format!("{address} is already protected by {}", earlier.origin),
            });
        }
        let (family, most) = if address.is_ipv4() {
            ("IPv4", MAX_PROTECTED_V4)
        } else {
            ("IPv6", MAX_PROTECTED_V6)
        };
        let same_family = protect
            .iter()
            .filter(|setting| setting.value.is_ipv4() == address.is_ipv4())
            .count();
        if same_family == most {
            return Err(ConfigError::Invalid {
                origin: origin.clone(),
                message: format!(
                    "{address} would be protected {family} address number {}: at most {most} \
                     can be protected",
                    most + 1
                ),
            });
        }
        protect.push(Setting {
            value: address,
            origin: origin.clone(),
        });
    }
    Ok(())
}

/// The allow rules: the file's in the order written, then the options'. The first that
/// matches an attempt decides it.
fn rules(
    raw: &mut RawConfig,
    overrides: &Overrides,
    at: &impl Fn(Range<usize>) -> String,
) -> Result<Vec<Rule>, ConfigError> {
    // The default rule (uid 0) stands only where no rule is written anywhere: one in the file
    // or on the command line replaces it, so `--allow-uid 4242` alone means 4242 only.
    let defines_rules = raw.allow_uid.is_some()
        || raw.allow_gid.is_some()
        || raw.allow_cgroup.is_some()
        || raw.allow.is_some()
        || !overrides.allow_uid.is_empty()
        || !overrides.allow_gid.is_empty()
        || !overrides.allow_cgroup.is_empty();
    let mut written: Vec<(usize, Rule)> = Vec::new();
    for uid in raw.allow_uid.take().unwrap_or_default() {
        let origin = at(uid.span());
        written.push((uid.span().start, Rule::uid(uid.into_inner(), origin)));
    }
    for gid in raw.allow_gid.take().unwrap_or_default() {
        let origin = at(gid.span());
        written.push((gid.span().start, Rule::gid(gid.into_inner(), origin)));
    }
    for cgroup in raw.allow_cgroup.take().unwrap_or_default() {
        let origin = at(cgroup.span());
        written.push((
            cgroup.span().start,
            Rule::cgroup(cgroup.into_inner(), origin),
        ));
    }
    for table in raw.allow.take().unwrap_or_default() {
        let start = table.span().start;
        let origin = at(table.span());
        written.push((start, rule_from_table(table.into_inner(), origin, at)?));
    }
    written.sort_by_key(|(start, _)| *start);

    let mut allow = Vec::new();
    if !defines_rules {
        allow.push(Rule::uid(0, "default".into()));
    }
    for (_, rule) in written {
        if let Some(name) = &rule.name
            && let Some(earlier) = allow
                .iter()
                .find(|other: &&Rule| other.name.as_ref() == Some(name))
        {
            return Err(ConfigError::Invalid {
                origin: rule.origin,
                message: format!(
                    "duplicate rule name {name:?}: the rule at {} has it",
                    earlier.origin
                ),
            });
        }
        allow.push(rule);
    }
    // Options add to the file's rules; one the file already has changes nothing.
    let options = (overrides.allow_uid.iter())
        .map(|&uid| Rule::uid(uid, "--allow-uid".into()))
        .chain((overrides.allow_gid.iter()).map(|&gid| Rule::gid(gid, "--allow-gid".into())))
        .chain(
            (overrides.allow_cgroup.iter())
                .map(|cgroup| Rule::cgroup(cgroup.clone(), "--allow-cgroup".into())),
        );
    for rule in options {
        if !allow
            .iter()
            .any(|other| other.conditions() == rule.conditions() && !other.audit)
        {
            allow.push(rule);
        }
    }
    Ok(allow)
}

/// Systemd unit types that have a cgroup of their own.
const UNIT_TYPES_WITH_CGROUP: [&str; 6] =
    [".service", ".scope", ".slice", ".socket", ".mount", ".swap"];

/// Validates one `[[allow]]` table.
fn rule_from_table(
    raw: RawRule,
    origin: Origin,
    at: &impl Fn(Range<usize>) -> String,
) -> Result<Rule, ConfigError> {
    let name = raw.name.map(|name| rule_name(name, at)).transpose()?;
    let rule = Rule {
        name,
        uid: raw.uid.map(Spanned::into_inner),
        gid: raw.gid.clone().map(Spanned::into_inner),
        cgroup: string_list("cgroup", raw.cgroup, check_cgroup_pattern, at)?,
        unit: string_list("unit", raw.unit, check_unit_pattern, at)?,
        not_cgroup: string_list("not_cgroup", raw.not_cgroup, check_cgroup_pattern, at)?,
        containers: raw.containers.map(|containers| Setting {
            origin: at(containers.span()),
            value: containers.into_inner(),
        }),
        cgroup_must_exist: false,
        audit: raw.mode.is_some_and(|mode| *mode.get_ref() == Mode::Audit),
        imds: raw.imds.map(|imds| Setting {
            origin: at(imds.span()),
            value: imds.into_inner(),
        }),
        paths: string_list("paths", raw.paths, paths::check, at)?,
        deny_paths: string_list("deny_paths", raw.deny_paths, paths::check, at)?,
        origin,
    };
    // Contradictions and counts: refused here, where `check-config` sees them.
    paths::compile(&rule.paths, &rule.deny_paths)?;
    if let (Some(_), Some(gid)) = (&rule.uid, &raw.gid) {
        return Err(ConfigError::Invalid {
            origin: at(gid.span()),
            message: "a rule matches a uid or a gid, not both: the uid already names one user \
                      (write two rules to allow either)"
                .into(),
        });
    }
    let only_containers = rule
        .containers
        .as_ref()
        .is_some_and(|setting| setting.value == Containers::Only);
    if rule.uid.is_none()
        && rule.gid.is_none()
        && rule.cgroup.is_empty()
        && rule.unit.is_empty()
        && rule.not_cgroup.is_empty()
        && !only_containers
    {
        return Err(ConfigError::Invalid {
            origin: rule.origin,
            message: "this rule would match every task: give it at least one of uid, gid, \
                      cgroup, unit, not_cgroup, containers = \"only\" (to let everyone \
                      through, use mode = \"audit\")"
                .into(),
        });
    }
    Ok(rule)
}

/// A rule's `name`: not empty, and not `default` (which names the global mode in events).
fn rule_name(
    name: Spanned<String>,
    at: &impl Fn(Range<usize>) -> String,
) -> Result<String, ConfigError> {
    let origin = at(name.span());
    let name = name.into_inner();
    if name.trim().is_empty() || name == "default" {
        return Err(ConfigError::Invalid {
            origin,
            message: format!(
                "rule name {name:?} cannot be used: names must be non-empty and \"default\" \
                 names the global mode in events"
            ),
        });
    }
    Ok(name)
}

/// A key that takes one string or a list of them (`cgroup = "/a"`, `cgroup = ["/a", "/b"]`):
/// each item checked by `check`, and each with its own position for errors.
fn string_list(
    key: &str,
    value: Option<Spanned<Strings>>,
    check: fn(&str) -> Result<(), String>,
    at: &impl Fn(Range<usize>) -> String,
) -> Result<Vec<Setting<String>>, ConfigError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let whole = at(value.span());
    let items = match value.into_inner() {
        Strings::One(text) => vec![Setting {
            value: text,
            origin: whole.clone(),
        }],
        Strings::Many(items) => items
            .into_iter()
            .map(|item| Setting {
                origin: at(item.span()),
                value: item.into_inner(),
            })
            .collect(),
    };
    if items.is_empty() {
        return Err(ConfigError::Invalid {
            origin: whole,
            message: format!("{key} is empty: remove the key or give at least one value"),
        });
    }
    for item in &items {
        check(&item.value).map_err(|message| ConfigError::Invalid {
            origin: item.origin.clone(),
            message,
        })?;
    }
    Ok(items)
}

/// A cgroup path or glob pattern: absolute, without `.`/`..` or empty parts, valid glob syntax.
fn check_cgroup_pattern(text: &str) -> Result<(), String> {
    if !text.starts_with('/') {
        return Err(format!(
            "cgroup {text:?} must be absolute, as in /proc/PID/cgroup \
             (e.g. /system.slice/docker-*.scope)"
        ));
    }
    if text != "/"
        && text[1..]
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(format!("cgroup {text:?} has an empty, `.` or `..` part"));
    }
    check_glob(text)
}

/// A systemd unit name or a glob pattern of them, with a type that has a cgroup.
fn check_unit_pattern(text: &str) -> Result<(), String> {
    if text.contains('/') {
        return Err(format!(
            "unit {text:?} is a path: give the unit's name (e.g. amazon-ssm-agent.service), \
             or use cgroup for a path"
        ));
    }
    if !UNIT_TYPES_WITH_CGROUP
        .iter()
        .any(|suffix| text.len() > suffix.len() && text.ends_with(suffix))
    {
        return Err(format!(
            "unit {text:?} must end with the unit's type, one of {} (other unit types have \
             no cgroup)",
            UNIT_TYPES_WITH_CGROUP.join(" ")
        ));
    }
    check_glob(text)
}

fn check_glob(text: &str) -> Result<(), String> {
    glob::compile_glob(text)
        .map(drop)
        .map_err(|err| format!("{text:?} is not a valid glob pattern: {}", err.kind()))
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    Lines::of(text).line_column(offset)
}

/// A text and where each of its lines starts.
struct Lines<'a> {
    text: &'a str,
    /// Byte offsets of line starts, the first 0.
    starts: Vec<usize>,
}

impl<'a> Lines<'a> {
    fn of(text: &'a str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self { text, starts }
    }

    /// 1-based line and column (in characters) of a byte offset.
    fn line_column(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        // The last line starting at or before `offset`.
        let line = self.starts.partition_point(|&start| start <= offset);
        let start = self.starts[line - 1];
        (line, self.text[start..offset].chars().count() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{host::cgroups::Hierarchy, policy::Policy};

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Some(Path::new("/etc/g.toml")), text, &Overrides::default())
    }

    /// Config and policy resolution, as `check-config` does them, against a fake cgroup2 mount
    /// holding `/exists`.
    fn check(text: &str) -> Result<Policy, ConfigError> {
        let mount = tempfile::tempdir().unwrap();
        std::fs::create_dir(mount.path().join("exists")).unwrap();
        let hierarchy = Hierarchy::at(mount.path().to_owned());
        Policy::resolve(&parse(text)?, &hierarchy)
    }

    fn descriptions(config: &Config) -> Vec<String> {
        (config.allow.iter())
            .map(|rule| format!("{} @ {}", rule.display_name(), rule.origin))
            .collect()
    }

    #[test]
    fn defaults_enforce_root_only_both_imds_addresses() {
        let config = Config::from_toml(None, "", &Overrides::default()).unwrap();
        assert_eq!(config.mode, Mode::Enforce);
        assert_eq!(config.attach.value, "/");
        let protect: Vec<String> = config.protect.iter().map(|p| p.value.to_string()).collect();
        assert_eq!(protect, ["169.254.169.254", "fd00:ec2::254"]);
        assert_eq!(descriptions(&config), ["uid 0 @ default"]);
    }

    #[test]
    fn file_keys_are_read_with_positions_in_file_order() {
        let config = parse(
            "mode = \"audit\"\ncgroup = \"/workloads\"\nallow_uid = [1000]\n\
             allow_gid = [50]\nallow_cgroup = [\"/system.slice/ssm.service\"]\n\
             [[allow]]\nname = \"cw\"\nuid = \"cwagent\"\nunit = \"amazon-cloudwatch-agent.service\"\n\
             [[allow]]\nuid = 0\nnot_cgroup = [\"/system.slice/docker-*.scope\", \"/kubepods.slice/**\"]\n\
             mode = \"audit\"\n",
        )
        .unwrap();
        assert_eq!(config.mode, Mode::Audit);
        assert_eq!(config.attach.value, "/workloads");
        assert_eq!(config.attach.origin, "/etc/g.toml:2:10");
        assert_eq!(
            descriptions(&config),
            [
                "uid 1000 @ /etc/g.toml:3:14",
                "gid 50 @ /etc/g.toml:4:14",
                "cgroup /system.slice/ssm.service @ /etc/g.toml:5:17",
                "cw @ /etc/g.toml:6:1",
                "uid 0, not cgroup /system.slice/docker-*.scope | /kubepods.slice/** @ /etc/g.toml:10:1",
            ]
        );
        let last = &config.allow[4];
        assert!(last.audit);
        assert_eq!(last.not_cgroup[1].origin, "/etc/g.toml:12:47");
        assert_eq!(config.allow[3].uid, Some(Principal::Name("cwagent".into())));
        assert_eq!(
            config.allow[3].unit[0],
            Setting {
                value: "amazon-cloudwatch-agent.service".into(),
                origin: "/etc/g.toml:9:8".into()
            }
        );
    }

    #[test]
    fn options_add_to_rules_and_override_mode() {
        let overrides = Overrides {
            mode: Some(Mode::Enforce),
            cgroup: Some("/other".into()),
            allow_uid: vec![0, 1000],
            allow_gid: vec![7],
            allow_cgroup: vec!["/a".into()],
        };
        let config =
            Config::from_toml(None, "mode = \"audit\"\nallow_uid = [0]\n", &overrides).unwrap();
        assert_eq!(config.mode, Mode::Enforce);
        assert_eq!(
            config.attach,
            Setting {
                value: "/other".into(),
                origin: "--cgroup".into()
            }
        );
        assert_eq!(
            descriptions(&config),
            [
                "uid 0 @ <config>:2:14",
                "uid 1000 @ --allow-uid",
                "gid 7 @ --allow-gid",
                "cgroup /a @ --allow-cgroup"
            ]
        );
    }

    #[test]
    fn a_rule_on_the_command_line_replaces_the_default_root_rule_too() {
        let overrides = Overrides {
            allow_uid: vec![4242],
            ..Overrides::default()
        };
        let config = Config::from_toml(None, "", &overrides).unwrap();
        assert_eq!(descriptions(&config), ["uid 4242 @ --allow-uid"]);
        let config = Config::from_toml(None, "", &Overrides::default()).unwrap();
        assert_eq!(descriptions(&config), ["uid 0 @ default"]);
    }

    #[test]
    fn any_rule_in_the_file_replaces_the_default_root_rule() {
        assert!(parse("allow_uid = []\n").unwrap().allow.is_empty());
        let config = parse("[[allow]]\ngid = 50\n").unwrap();
        assert_eq!(descriptions(&config), ["gid 50 @ /etc/g.toml:1:1"]);
    }

    #[test]
    fn names_and_numbers_as_strings() {
        let config = parse("[[allow]]\nuid = \"1000\"\n[[allow]]\ngid = \"adm\"\n").unwrap();
        assert_eq!(config.allow[0].uid, Some(Principal::Id(1000)));
        assert_eq!(config.allow[1].gid, Some(Principal::Name("adm".into())));
    }

    #[test]
    fn protect_presets_and_literals() {
        let config =
            parse("protect = [\"ecs-credentials\", \"::ffff:10.0.0.1\", \"fd00:ec2::23\"]\n")
                .unwrap();
        let protect: Vec<String> = config.protect.iter().map(|p| p.value.to_string()).collect();
        assert_eq!(protect, ["169.254.170.2", "10.0.0.1", "fd00:ec2::23"]);
        let config = parse("protect = [\"eks-pod-identity\"]\n").unwrap();
        let protect: Vec<String> = config.protect.iter().map(|p| p.value.to_string()).collect();
        assert_eq!(protect, ["169.254.170.23", "fd00:ec2::23"]);
    }

    /// Configs that must be refused, and the start of the error each must give.
    const INVALID_CONFIGS: &[(&str, &str)] = &[
        // More addresses of a family than a policy holds (IMDS's and seven more).
        (
            "protect = [\"imds\", \"10.0.0.1\", \"10.0.0.2\", \"10.0.0.3\", \"10.0.0.4\", \"10.0.0.5\", \"10.0.0.6\", \"10.0.0.7\", \"fd00::1\", \"10.0.0.8\"]\n",
            "/etc/g.toml:1:115: 10.0.0.8 would be protected IPv4 address number 9: at most 8 can be protected",
        ),
        (
            "protect = [\"imds\", \"eks-pod-identity\", \"fd00::1\", \"fd00::2\", \"fd00::3\", \"fd00::4\", \"fd00::5\", \"fd00::6\", \"fd00::7\"]\n",
            "/etc/g.toml:1:106: fd00::7 would be protected IPv6 address number 9: at most 8 can be protected",
        ),
        // Unknown keys: top level and in a rule.
        (
            "alow_uid = [1]\n",
            "/etc/g.toml:1:1: unknown field `alow_uid`",
        ),
        (
            "[[allow]]\nuid = 0\nnot_cgroups = \"/x\"\n",
            "/etc/g.toml:3:1: unknown field `not_cgroups`",
        ),
        // Wrong types and values.
        (
            "mode = \"block\"\n",
            "/etc/g.toml:1:8: unknown variant `block`, expected `enforce` or `audit`",
        ),
        (
            "allow_uid = [\"root\"]\n",
            "/etc/g.toml:1:14: invalid type: string \"root\", expected u32",
        ),
        (
            "allow_uid = [-1]\n",
            "/etc/g.toml:1:14: invalid value: integer `-1`, expected u32",
        ),
        (
            "allow_uid = 5\n",
            "/etc/g.toml:1:13: invalid type: integer `5`, expected a sequence",
        ),
        ("mode = \n", "/etc/g.toml:1:8: "),
        (
            "[[allow]]\nuid = 4294967296\n",
            "/etc/g.toml:2:7: invalid value: integer `4294967296`, expected a number (0 to 4294967295) or a name",
        ),
        (
            "[[allow]]\nuid = true\n",
            "/etc/g.toml:2:7: invalid type: boolean `true`, expected a number",
        ),
        (
            "[[allow]]\ngid = \"wheel group\"\n",
            "/etc/g.toml:2:7: invalid value: string \"wheel group\", expected a number",
        ),
        (
            "[[allow]]\ncgroup = 5\n",
            "/etc/g.toml:2:10: invalid type: integer `5`, expected a string or an array of strings",
        ),
        (
            "[[allow]]\ncgroup = \"/x\"\nmode = \"allow\"\n",
            "/etc/g.toml:3:8: unknown variant `allow`, expected `enforce` or `audit`",
        ),
        (
            "allow = 1\n",
            "/etc/g.toml:1:9: invalid type: integer `1`, expected a sequence",
        ),
        // Addresses.
        (
            "protect = [\"imdz\"]\n",
            "/etc/g.toml:1:12: \"imdz\" is neither a preset",
        ),
        (
            "protect = [\"0xa9fea9fe\"]\n",
            "/etc/g.toml:1:12: \"0xa9fea9fe\" is neither a preset",
        ),
        (
            "protect = [\"0.0.0.0\"]\n",
            "/etc/g.toml:1:12: \"0.0.0.0\" cannot be protected",
        ),
        (
            "protect = [\"ff02::1\"]\n",
            "/etc/g.toml:1:12: \"ff02::1\" cannot be protected",
        ),
        (
            "protect = [\"imds\", \"169.254.169.254\"]\n",
            "/etc/g.toml:1:20: 169.254.169.254 is already protected by /etc/g.toml:1:12",
        ),
        ("protect = []\n", "/etc/g.toml: protect: protect is empty"),
        // Cgroup and unit patterns.
        (
            "[[allow]]\ncgroup = \"/system.slice/[docker\"\n",
            "/etc/g.toml:2:10: \"/system.slice/[docker\" is not a valid glob pattern: unclosed character class",
        ),
        (
            "[[allow]]\nuid = 0\nnot_cgroup = [\"/a\", \"system.slice\"]\n",
            "/etc/g.toml:3:21: cgroup \"system.slice\" must be absolute",
        ),
        (
            "[[allow]]\ncgroup = \"/a/../b\"\n",
            "/etc/g.toml:2:10: cgroup \"/a/../b\" has an empty, `.` or `..` part",
        ),
        (
            "[[allow]]\ncgroup = []\n",
            "/etc/g.toml:2:10: cgroup is empty",
        ),
        (
            "[[allow]]\nunit = \"amazon-ssm-agent\"\n",
            "/etc/g.toml:2:8: unit \"amazon-ssm-agent\" must end with the unit's type",
        ),
        (
            "[[allow]]\nunit = \"multi-user.target\"\n",
            "/etc/g.toml:2:8: unit \"multi-user.target\" must end with the unit's type",
        ),
        (
            "[[allow]]\nunit = \"/system.slice/a.service\"\n",
            "/etc/g.toml:2:8: unit \"/system.slice/a.service\" is a path",
        ),
        // Rules that cannot mean what they say.
        (
            "[[allow]]\nname = \"nobody at all\"\n",
            "/etc/g.toml:1:1: this rule would match every task",
        ),
        (
            "[[allow]]\nuid = 0\ngid = 0\n",
            "/etc/g.toml:3:7: a rule matches a uid or a gid, not both",
        ),
        (
            "[[allow]]\nname = \"a\"\nuid = 1\n[[allow]]\nname = \"a\"\nuid = 2\n",
            "/etc/g.toml:4:1: duplicate rule name \"a\": the rule at /etc/g.toml:1:1 has it",
        ),
        (
            "[[allow]]\nname = \"default\"\nuid = 1\n",
            "/etc/g.toml:2:8: rule name \"default\" cannot be used",
        ),
        // Resolved against the host.
        (
            "allow_uid = [1, 1]\n",
            "/etc/g.toml:1:17: duplicate rule: the rule at /etc/g.toml:1:14 (uid 1) already has these conditions",
        ),
        (
            "[[allow]]\nuid = 0\n[[allow]]\nuid = \"root\"\n",
            "/etc/g.toml:3:1: duplicate rule: the rule at /etc/g.toml:1:1 (uid 0)",
        ),
        (
            "[[allow]]\nuid = \"no-such-user-imdsg\"\n",
            "/etc/g.toml:1:1: unknown user \"no-such-user-imdsg\": not in the user database",
        ),
        (
            "[[allow]]\ngid = \"no-such-group-imdsg\"\n",
            "/etc/g.toml:1:1: unknown group \"no-such-group-imdsg\": not in the group database",
        ),
        (
            "allow_cgroup = [\"/missing\"]\n",
            "/etc/g.toml:1:17: cgroup \"/missing\" does not exist",
        ),
    ];

    #[test]
    fn invalid_configs_name_file_line_column_and_value() {
        assert!(INVALID_CONFIGS.len() >= 20);
        for (text, expected) in INVALID_CONFIGS {
            let message = check(text).unwrap_err().to_string();
            assert!(
                message.starts_with(expected),
                "config {text:?}\n  got:      {message}\n  expected: {expected}…"
            );
        }
    }

    #[test]
    fn a_rule_may_name_a_cgroup_that_does_not_exist_yet() {
        let policy = check("[[allow]]\ncgroup = \"/system.slice/later.service\"\n").unwrap();
        assert_eq!(policy.rules.len(), 1);
        assert!(check("allow_cgroup = [\"/exists\"]\n").is_ok());
    }

    const EXAMPLE: &str = include_str!("../../../packaging/imds-guard.toml");

    #[test]
    fn the_shipped_example_is_valid_and_keeps_container_root_out() {
        let policy = check(EXAMPLE).unwrap();
        let path = "/etc/imds-guard/imds-guard.toml";
        let config =
            Config::from_toml(Some(Path::new(path)), EXAMPLE, &Overrides::default()).unwrap();
        assert_eq!(
            config.mode,
            Mode::Audit,
            "the packages install in audit mode"
        );
        assert_eq!(policy.rules.len(), 1);
        let root = |cgroup: &str| policy.rules_at(cgroup).host;
        let id = "0123456789abcdef".repeat(4);
        assert_eq!(root("/system.slice/amazon-ssm-agent.service"), [1]);
        assert!(root(&format!("/system.slice/docker-{id}.scope")).is_empty());
        assert!(
            root(&format!(
                "/kubepods.slice/kubepods-pod1.slice/cri-containerd-{id}.scope"
            ))
            .is_empty()
        );
        assert!(root(&format!("/docker/{id}")).is_empty());
        // Root in a container the patterns do not name is a container's root all the same.
        assert!(root(&format!("/custom/docker/{}", "a".repeat(64))).is_empty());
        assert!(
            policy
                .rules_at("/system.slice/x.service")
                .container
                .is_empty()
        );
    }

    #[test]
    fn the_shipped_examples_commented_rules_parse() {
        // Uncomment every `# [[allow]]` block, as an operator would.
        let mut text = String::new();
        let mut in_block = false;
        for line in EXAMPLE.lines() {
            in_block = (in_block && line.starts_with("# ")) || line == "# [[allow]]";
            text.push_str(if in_block { &line[2..] } else { line });
            text.push('\n');
        }
        let config = parse(&text).unwrap();
        let names: Vec<String> = config.allow.iter().map(Rule::display_name).collect();
        assert_eq!(
            names,
            [
                "host root",
                "cloudwatch-agent",
                "ec2-instance-connect",
                "aws agents",
                "staged: web"
            ]
        );
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let err = Config::load(
            Some(Path::new("/nonexistent/g.toml")),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/g.toml: cannot read the config file"),
            "{err}"
        );
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("a\nbé=x", 5), (2, 3));
        assert_eq!(line_column("", 0), (1, 1));
        assert_eq!(line_column("a\n", 2), (2, 1));
        assert_eq!(line_column("a\nb\n\ncd", 6), (4, 2));
        assert_eq!(line_column("ab", 1), (1, 2));
    }
}

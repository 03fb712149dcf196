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

use imds_guard_common::imds::{IMDS_V4, IMDS_V6};
use serde::Deserialize;
use toml::Spanned;

use crate::error::{Error, Origin, Result};

/// Where the agent looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/imds-guard/imds-guard.toml";

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

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        })
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

/// What an allow rule matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    /// Tasks with this uid.
    Uid(u32),
    /// Tasks with this primary gid.
    Gid(u32),
    /// Tasks in this cgroup or below it, as given by the user (resolved later).
    Cgroup(String),
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uid(uid) => write!(f, "uid {uid}"),
            Self::Gid(gid) => write!(f, "gid {gid}"),
            Self::Cgroup(path) => write!(f, "cgroup {path}"),
        }
    }
}

/// One allow rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// What it matches.
    pub matches: Match,
    /// Where it was written.
    pub origin: Origin,
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
    /// Allow rules, in the order written: uids, gids, cgroups.
    pub allow: Vec<Rule>,
}

impl Config {
    /// Reads `file` (or [`DEFAULT_CONFIG_PATH`] when it exists) and applies `overrides`.
    ///
    /// # Errors
    /// [`Error::ReadConfig`] when an explicit file cannot be read, [`Error::ParseConfig`] for
    /// malformed TOML, unknown keys or wrong types, [`Error::InvalidSetting`] for bad values.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self> {
        let (path, text) = match file {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => (Some(path.to_owned()), text),
                Err(source) => {
                    return Err(Error::ReadConfig {
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
                    return Err(Error::ReadConfig {
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
    pub fn from_toml(file: Option<&Path>, text: &str, overrides: &Overrides) -> Result<Self> {
        let display_path = file.map_or_else(|| PathBuf::from("<config>"), Path::to_owned);
        let raw: RawConfig = toml::from_str(text).map_err(|err| {
            let (line, column) = err
                .span()
                .map_or((1, 1), |span| line_column(text, span.start));
            Error::ParseConfig {
                path: display_path.clone(),
                line,
                column,
                message: err.message().trim_end().to_owned(),
            }
        })?;
        let at = |span: Range<usize>| {
            let (line, column) = line_column(text, span.start);
            format!("{}:{line}:{column}", display_path.display())
        };

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
                return Err(Error::InvalidSetting {
                    origin: format!("{}: protect", display_path.display()),
                    message: "protect is empty: nothing would be protected \
                              (remove the key to protect the IMDS addresses)"
                        .into(),
                });
            }
            for entry in entries {
                let origin = at(entry.span());
                let addresses =
                    protect_entry(entry.get_ref()).map_err(|message| Error::InvalidSetting {
                        origin: origin.clone(),
                        message,
                    })?;
                add_unique_in_file(&mut protect, addresses, &origin)?;
            }
        } else {
            let defaults = protect_entry("imds").unwrap_or_default();
            add_unique_in_file(&mut protect, defaults, &"default".into())?;
        }

        let mut allow = Vec::new();
        let uids = match raw.allow_uid {
            Some(uids) => spanned(uids, &at),
            None => vec![(0, "default".into())],
        };
        let uid_options = overrides
            .allow_uid
            .iter()
            .map(|&uid| (uid, "--allow-uid".into()));
        push_rules(&mut allow, uids, uid_options, Match::Uid)?;
        let gids = raw
            .allow_gid
            .map(|gids| spanned(gids, &at))
            .unwrap_or_default();
        let gid_options = overrides
            .allow_gid
            .iter()
            .map(|&gid| (gid, "--allow-gid".into()));
        push_rules(&mut allow, gids, gid_options, Match::Gid)?;
        let cgroups = raw
            .allow_cgroup
            .map(|cgroups| spanned(cgroups, &at))
            .unwrap_or_default();
        let cgroup_options = overrides
            .allow_cgroup
            .iter()
            .map(|cgroup| (cgroup.clone(), "--allow-cgroup".into()));
        push_rules(&mut allow, cgroups, cgroup_options, Match::Cgroup)?;

        Ok(Self {
            file: file.map(Path::to_owned),
            mode,
            attach,
            protect,
            allow,
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

/// Adds addresses, refusing one the file already named.
fn add_unique_in_file(
    protect: &mut Vec<Setting<IpAddr>>,
    addresses: Vec<IpAddr>,
    origin: &Origin,
) -> Result<()> {
    for address in addresses {
        if let Some(earlier) = protect.iter().find(|setting| setting.value == address) {
            return Err(Error::InvalidSetting {
                origin: origin.clone(),
                message: format!("{address} is already protected by {}", earlier.origin),
            });
        }
        protect.push(Setting {
            value: address,
            origin: origin.clone(),
        });
    }
    Ok(())
}

fn spanned<T>(values: Vec<Spanned<T>>, at: &impl Fn(Range<usize>) -> String) -> Vec<(T, Origin)> {
    values
        .into_iter()
        .map(|value| {
            let origin = at(value.span());
            (value.into_inner(), origin)
        })
        .collect()
}

/// Appends the file's values (a repeated value there is an error) and then the command line's
/// (which may repeat the file's: they add, so a repeat is a no-op).
fn push_rules<T: PartialEq + fmt::Display>(
    allow: &mut Vec<Rule>,
    from_file: Vec<(T, Origin)>,
    from_cli: impl Iterator<Item = (T, Origin)>,
    to_match: impl Fn(T) -> Match,
) -> Result<()> {
    for (value, origin) in from_file {
        let matches = to_match(value);
        if let Some(earlier) = allow.iter().find(|rule| rule.matches == matches) {
            return Err(Error::InvalidSetting {
                origin,
                message: format!(
                    "duplicate rule: {matches} is already allowed at {}",
                    earlier.origin
                ),
            });
        }
        allow.push(Rule { matches, origin });
    }
    for (value, origin) in from_cli {
        let matches = to_match(value);
        if !allow.iter().any(|rule| rule.matches == matches) {
            allow.push(Rule { matches, origin });
        }
    }
    Ok(())
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::from_toml(Some(Path::new("/etc/g.toml")), text, &Overrides::default())
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_enforce_root_only_both_imds_addresses() {
        let config = Config::from_toml(None, "", &Overrides::default()).unwrap();
        assert_eq!(config.mode, Mode::Enforce);
        assert_eq!(config.attach.value, "/");
        let protect: Vec<String> = config.protect.iter().map(|p| p.value.to_string()).collect();
        assert_eq!(protect, ["169.254.169.254", "fd00:ec2::254"]);
        assert_eq!(
            config.allow,
            [Rule {
                matches: Match::Uid(0),
                origin: "default".into()
            }]
        );
    }

    #[test]
    fn file_keys_are_read_with_positions() {
        let config = parse(
            "mode = \"audit\"\ncgroup = \"/workloads\"\nallow_uid = [1000]\n\
             allow_gid = [50]\nallow_cgroup = [\"/system.slice/ssm.service\"]\n",
        )
        .unwrap();
        assert_eq!(config.mode, Mode::Audit);
        assert_eq!(config.attach.value, "/workloads");
        assert_eq!(config.attach.origin, "/etc/g.toml:2:10");
        let rules: Vec<String> = config
            .allow
            .iter()
            .map(|r| format!("{} @ {}", r.matches, r.origin))
            .collect();
        assert_eq!(
            rules,
            [
                "uid 1000 @ /etc/g.toml:3:14",
                "gid 50 @ /etc/g.toml:4:14",
                "cgroup /system.slice/ssm.service @ /etc/g.toml:5:17",
            ]
        );
    }

    #[test]
    fn options_add_to_lists_and_override_mode() {
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
        let matches: Vec<Match> = config.allow.into_iter().map(|r| r.matches).collect();
        assert_eq!(
            matches,
            [
                Match::Uid(0),
                Match::Uid(1000),
                Match::Gid(7),
                Match::Cgroup("/a".into())
            ]
        );
    }

    #[test]
    fn empty_allow_uid_removes_root() {
        let config = parse("allow_uid = []\n").unwrap();
        assert!(config.allow.is_empty());
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

    #[test]
    fn invalid_configs_name_file_line_column_and_value() {
        let cases: &[(&str, &str)] = &[
            (
                "alow_uid = [1]\n",
                "/etc/g.toml:1:1: unknown field `alow_uid`",
            ),
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
                "allow_uid = [4294967296]\n",
                "/etc/g.toml:1:14: invalid value: integer `4294967296`, expected u32",
            ),
            (
                "allow_uid = 5\n",
                "/etc/g.toml:1:13: invalid type: integer `5`, expected a sequence",
            ),
            ("mode = \n", "/etc/g.toml:1:8: "),
            (
                "allow_uid = [1, 1]\n",
                "/etc/g.toml:1:17: duplicate rule: uid 1 is already allowed at /etc/g.toml:1:14",
            ),
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
                "protect = [\"imds\", \"169.254.169.254\"]\n",
                "/etc/g.toml:1:20: 169.254.169.254 is already protected by /etc/g.toml:1:12",
            ),
            ("protect = []\n", "/etc/g.toml: protect: protect is empty"),
        ];
        for (text, expected) in cases {
            let message = err(text);
            assert!(
                message.starts_with(expected),
                "config {text:?}\n  got:      {message}\n  expected: {expected}…"
            );
        }
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
    }
}

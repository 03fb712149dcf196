//! `imds-guard report`: who touched IMDS, from the JSON-lines event stream (`run`'s stdout, a
//! file, or the unit's journal: `journalctl -u imds-guard -o cat`, `-o json` or `-o export`),
//! and a policy that would let exactly them through.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{self, BufRead, Read as _},
};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{
    cli::{ReportArgs, ReportFormat},
    config::{Config, Containers, Overrides},
    error::{ConfigError, EventsError, Result},
    events::ImdsVersion,
    host::workload::{self, Container, Placement},
};

/// The fields of an event line that the report uses (others are ignored). Lines of older
/// agents lack the enriched fields; the cgroup path gives most of them again.
#[derive(Debug, Deserialize)]
struct Line {
    time: Timestamp,
    verdict: String,
    uid: u32,
    /// A packet judged with its uid ignored (only rules on cgroups could match it); lines of
    /// older agents lack it.
    #[serde(default)]
    uid_ignored: bool,
    #[serde(default)]
    user: Option<String>,
    comm: Option<String>,
    #[serde(default)]
    exe: Option<String>,
    cgroup: Option<String>,
    dst: String,
    /// Attempts the line stands for (an aggregate's repeats); 1 when absent.
    #[serde(default = "one")]
    count: u64,
    #[serde(default)]
    first_seen: Option<Timestamp>,
    /// Whether the task was in a container; lines of older agents lack it (the cgroup path
    /// tells then).
    #[serde(default)]
    in_container: Option<bool>,
    /// The hook that reported it; lines of older agents lack it (a connect hook's then).
    #[serde(default)]
    hook: Option<String>,
    /// How an HTTP request asked (hook `http`).
    #[serde(default)]
    imds_version: Option<ImdsVersion>,
    /// The agent's own posture check (a tokenless request of its own).
    #[serde(default)]
    posture_check: bool,
}

fn one() -> u64 {
    1
}

/// One workload: what it is, and what it did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// The systemd unit its cgroup belongs to, if the path names one.
    pub unit: Option<String>,
    /// The container its cgroup belongs to.
    pub container: Option<Container>,
    /// The Kubernetes pod UID.
    pub pod_uid: Option<String>,
    /// Its cgroup path (`null` when the cgroup was gone before the event was read).
    pub cgroup: Option<String>,
    /// Its uid.
    pub uid: u32,
    /// Its attempts were packets judged with their uid ignored (the event's `uid_ignored`): a
    /// user-namespaced container's root, say, whose sockets' owner reads as uid 0 of its
    /// namespace. Only a rule on its cgroup (or unit) can let them through.
    pub uid_ignored: bool,
    /// The uid's name, when the agent found one.
    pub user: Option<String>,
    /// Executables seen.
    pub exes: Vec<String>,
    /// Thread names seen.
    pub comms: Vec<String>,
    /// Attempts were seen from its tasks on the host.
    pub on_host: bool,
    /// Attempts were seen from its tasks in a container (outside the host's namespaces, or in
    /// a container's cgroup).
    pub in_container: bool,
    /// Destinations tried.
    pub destinations: Vec<String>,
    /// Attempts denied.
    pub denied: u64,
    /// Attempts allowed but reported (audit).
    pub audited: u64,
    /// IMDSv1 requests seen (hook `http`), refused or not: while there are any, the instance
    /// cannot require IMDSv2.
    pub v1: u64,
    /// First attempt seen.
    pub first_seen: Timestamp,
    /// Last attempt seen.
    pub last_seen: Timestamp,
}

impl Workload {
    fn new(line: &Line, first_seen: Timestamp) -> Self {
        let placement = line
            .cgroup
            .as_deref()
            .map(Placement::of)
            .unwrap_or_default();
        Self {
            unit: placement.unit,
            container: placement.container,
            pod_uid: placement.pod_uid,
            cgroup: line.cgroup.clone(),
            uid: line.uid,
            uid_ignored: line.uid_ignored,
            user: line.user.clone(),
            exes: Vec::new(),
            comms: Vec::new(),
            on_host: false,
            in_container: false,
            destinations: Vec::new(),
            denied: 0,
            audited: 0,
            v1: 0,
            first_seen,
            last_seen: line.time,
        }
    }

    /// What a person calls it: pod, container, unit or cgroup.
    #[must_use]
    pub fn label(&self) -> String {
        let short = |id: &str| id.chars().take(12).collect::<String>();
        match (&self.pod_uid, &self.container, &self.unit, &self.cgroup) {
            (Some(pod), Some(container), ..) => {
                format!("pod {pod} container {}", short(&container.id))
            }
            (Some(pod), None, ..) => format!("pod {pod}"),
            (None, Some(container), ..) => format!(
                "{} container {}",
                container.runtime.as_deref().unwrap_or("a"),
                short(&container.id)
            ),
            (None, None, Some(unit), _) => format!("unit {unit}"),
            (None, None, None, Some(cgroup)) => format!("cgroup {cgroup}"),
            (None, None, None, None) => "(cgroup gone)".into(),
        }
    }
}

fn push_new(list: &mut Vec<String>, item: Option<String>) {
    if let Some(item) = item
        && !list.contains(&item)
    {
        list.push(item);
    }
}

/// Groups the events of `input` by workload (cgroup, then uid, judged or ignored), counting
/// aggregate lines by their `count`.
///
/// # Errors
/// [`EventsError::Stream`] naming the line that is an unreadable event.
pub fn workloads(input: impl BufRead, source: &str) -> Result<Vec<Workload>> {
    let mut by_key: BTreeMap<(Option<String>, u32, bool), Workload> = BTreeMap::new();
    let mut add = |number: usize, text: &[u8]| -> Result<()> {
        let line: Line = serde_json::from_slice(text).map_err(|err| EventsError::Stream {
            at: format!("{source}:{number}"),
            message: format!("not an imds-guard event: {err}"),
        })?;
        if line.posture_check {
            // The agent asking IMDS whether it answers IMDSv1: not a workload's use of it.
            return Ok(());
        }
        let first_seen = line.first_seen.unwrap_or(line.time).min(line.time);
        let workload = by_key
            .entry((line.cgroup.clone(), line.uid, line.uid_ignored))
            .or_insert_with(|| Workload::new(&line, first_seen));
        let in_container = line.in_container.unwrap_or_else(|| {
            line.cgroup
                .as_deref()
                .is_some_and(workload::is_container_cgroup)
        });
        if in_container {
            workload.in_container = true;
        } else {
            workload.on_host = true;
        }
        push_new(&mut workload.exes, line.exe);
        push_new(&mut workload.comms, line.comm);
        push_new(&mut workload.destinations, Some(line.dst));
        if workload.user.is_none() {
            workload.user = line.user;
        }
        if line.hook.as_deref() == Some("http") {
            // A request on a connection a rule let through: the connect was judged (and
            // reported, if it was) apart. A refused one counts as denied; one audit mode let
            // through needs no rule of its own (its connection had one).
            if line.imds_version == Some(ImdsVersion::V1) {
                workload.v1 += line.count;
            }
            if line.verdict == "deny" {
                workload.denied += line.count;
            }
        } else if line.verdict == "deny" {
            workload.denied += line.count;
        } else {
            workload.audited += line.count;
        }
        workload.first_seen = workload.first_seen.min(first_seen);
        workload.last_seen = workload.last_seen.max(line.time);
        Ok(())
    };
    for_each_event(input, source, &mut add)?;
    let mut workloads: Vec<Workload> = by_key.into_values().collect();
    workloads.sort_by_key(|w| std::cmp::Reverse(w.denied + w.audited + w.v1));
    Ok(workloads)
}

/// Calls `event` with each event line of `input` (and its line number), whatever wraps it:
/// plain JSON lines (log lines between them are skipped), `journalctl -o json` objects (the
/// event is their `MESSAGE`), or `journalctl -o export` entries (`MESSAGE=` fields, and
/// binary-safe `MESSAGE` fields with a length).
fn for_each_event(
    mut input: impl BufRead,
    source: &str,
    event: &mut dyn FnMut(usize, &[u8]) -> Result<()>,
) -> Result<()> {
    let read_error = |number: usize, err: io::Error| EventsError::Stream {
        at: format!("{source}:{number}"),
        message: err.to_string(),
    };
    let mut export = false;
    let mut line = Vec::new();
    let mut number = 0;
    loop {
        line.clear();
        number += 1;
        if input
            .read_until(b'\n', &mut line)
            .map_err(|err| read_error(number, err))?
            == 0
        {
            return Ok(());
        }
        let text = line.trim_ascii();
        if text.starts_with(b"__CURSOR=") || text.starts_with(b"__REALTIME_TIMESTAMP=") {
            export = true;
        }
        if text.starts_with(b"{") {
            if let Some(message) = journal_json_message(text) {
                if message.trim_start().starts_with('{') {
                    event(number, message.as_bytes())?;
                }
            } else {
                event(number, text)?;
            }
        } else if let Some(message) = text.strip_prefix(b"MESSAGE=") {
            if message.starts_with(b"{") {
                event(number, message)?;
            }
        } else if export && !text.is_empty() && !text.contains(&b'=') {
            // A binary-safe field: its name, then a little-endian 64-bit length, the data
            // and a newline.
            let mut size = [0u8; 8];
            input
                .read_exact(&mut size)
                .map_err(|err| read_error(number, err))?;
            let mut data = Vec::new();
            input
                .by_ref()
                .take(u64::from_le_bytes(size).saturating_add(1))
                .read_to_end(&mut data)
                .map_err(|err| read_error(number, err))?;
            // Lines inside the data (the last newline ends the field).
            number += data.split(|&b| b == b'\n').count().saturating_sub(2);
            let data = data.trim_ascii();
            if text == b"MESSAGE" && data.starts_with(b"{") {
                event(number, data)?;
            }
        }
    }
}

/// The `MESSAGE` of a `journalctl -o json` entry (an object without an event's `verdict`).
fn journal_json_message(text: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Entry {
        #[serde(rename = "MESSAGE")]
        message: Option<serde_json::Value>,
        verdict: Option<serde_json::Value>,
    }
    let entry: Entry = serde_json::from_slice(text).ok()?;
    if entry.verdict.is_some() {
        return None;
    }
    match entry.message? {
        serde_json::Value::String(message) => Some(message),
        // journalctl writes a message that is not valid UTF-8 as an array of bytes.
        serde_json::Value::Array(bytes) => String::from_utf8(
            bytes
                .iter()
                .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect::<Option<Vec<u8>>>()?,
        )
        .ok(),
        _ => None,
    }
}

/// The workloads as a table for people, and a line naming those that still use IMDSv1.
#[must_use]
pub fn table(workloads: &[Workload]) -> String {
    let mut out = format!(
        "{:>8}  {:>8}  {:>6}  {:<18}  {:<44}  {:<20}  {:<20}\n",
        "DENIED", "AUDITED", "V1", "UID", "WORKLOAD", "FIRST SEEN", "LAST SEEN"
    );
    let second = |t: &Timestamp| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    for w in workloads {
        let uid = match (&w.user, w.uid_ignored) {
            (Some(user), false) => format!("{} ({user})", w.uid),
            (Some(user), true) => format!("{} ({user}, ignored)", w.uid),
            (None, false) => w.uid.to_string(),
            (None, true) => format!("{} (ignored)", w.uid),
        };
        let _ = writeln!(
            out,
            "{:>8}  {:>8}  {:>6}  {:<18}  {:<44}  {:<20}  {:<20}",
            w.denied,
            w.audited,
            w.v1,
            uid,
            w.label(),
            second(&w.first_seen),
            second(&w.last_seen),
        );
        let mut details = Vec::new();
        if let Some(cgroup) = &w.cgroup {
            details.push(format!("cgroup {cgroup}"));
        }
        if !w.exes.is_empty() {
            details.push(format!("exe {}", w.exes.join(", ")));
        }
        if !w.comms.is_empty() {
            details.push(format!("comm {}", w.comms.join(", ")));
        }
        details.push(format!("to {}", w.destinations.join(", ")));
        let _ = writeln!(out, "{:>10}{}", "", details.join("; "));
    }
    out.push_str(&v1_summary(workloads));
    out
}

/// "3 workloads still use IMDSv1: ...", naming each (with its uid), or that none did: the line
/// that says whether the instance can be switched to `HttpTokens=required`.
#[must_use]
pub fn v1_summary(workloads: &[Workload]) -> String {
    let v1: Vec<String> = workloads
        .iter()
        .filter(|w| w.v1 > 0)
        .map(|w| {
            let user = w.user.as_ref().map(|u| format!(" {u}")).unwrap_or_default();
            format!("{} (uid {}{user})", w.label(), w.uid)
        })
        .collect();
    match v1.len() {
        0 => "No workload used IMDSv1 in these events.\n".into(),
        1 => format!("1 workload still uses IMDSv1: {}\n", v1[0]),
        n => format!("{n} workloads still use IMDSv1: {}\n", v1.join(", ")),
    }
}

/// The identity a suggested rule uses for a workload: the most stable one it has.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Identity {
    /// Its systemd unit, wherever its cgroup is.
    Unit(String),
    /// Its cgroup path (and those below).
    Cgroup(String),
    /// Its uid alone: its cgroup was gone before its events were read.
    Anywhere,
}

/// The config the audit ran with: its rules let through, silently, what the report never saw,
/// so a suggested policy keeps them.
pub struct Base<'a> {
    /// Where it was read (for the comment saying so).
    pub path: &'a str,
    /// Its text, kept as written (comments too).
    pub text: &'a str,
}

/// A config that keeps the policy the audit ran with (`base`, or the default policy's rule, uid 0
/// anywhere) and adds rules that would let through exactly the workloads audit mode let through and
/// reported: one per identity (its system manager's unit, else its cgroup path, else nothing more)
/// and uid, with comments saying what was seen; in enforce mode. Denied workloads get no rule.
///
/// # Errors
/// [`ConfigError::Invalid`] when `base` is not valid TOML.
pub fn suggest_policy(workloads: &[Workload], base: Option<&Base<'_>>) -> Result<String> {
    let denied: u64 = workloads.iter().map(|w| w.denied).sum();
    let mut out = String::from(
        "# Suggested by `imds-guard report --suggest-policy`: the policy the audit ran with, in\n\
         # enforce mode, and one rule per workload it let reach IMDS and reported, each by its\n\
         # most stable identity (systemd unit, else cgroup path) and its uid. Everything else is\n\
         # denied once this is in force: review it, check it with `imds-guard check-config FILE`,\n\
         # then install it and `imds-guard reload`.\n",
    );
    if denied > 0 {
        let _ = writeln!(
            out,
            "# {denied} denied attempts were seen too; they get no rule (enforcement at work)."
        );
    }
    match base {
        Some(base) => {
            let mut document: toml_edit::DocumentMut =
                base.text.parse().map_err(|err| ConfigError::Invalid {
                    origin: base.path.to_owned(),
                    message: format!("not a config: {err}"),
                })?;
            document["mode"] = toml_edit::value("enforce");
            let _ = writeln!(out, "# Kept from {}:\n", base.path);
            out.push_str(document.to_string().trim_end());
            out.push_str("\n\n# Added for what the audit reported:\n");
        }
        None => out.push_str(
            "mode = \"enforce\"\n\n\
             # The default policy's rule, written out now that the file has rules of its own.\n\
             [[allow]]\n\
             name = \"root (the default policy)\"\n\
             uid = 0\n\
             containers = false\n",
        ),
    }
    for ((identity, uid), seen) in &audited_by_identity(workloads) {
        out.push('\n');
        for w in seen {
            write_seen(&mut out, w);
        }
        if uid.is_none()
            && let Some(why) = no_rule_without_uid(identity, workloads)
        {
            // A rule on its cgroup alone would admit more than was seen: said, not written.
            let _ = writeln!(
                out,
                "# WARNING: not let through: {}, whose packets were judged without their uid \
                 (a uid rule cannot match them): {why}. If it needs IMDS, give it a cgroup of \
                 its own and allow that cgroup by hand.",
                seen[0].label()
            );
            continue;
        }
        write_rule(&mut out, identity, *uid, seen);
    }
    Ok(out)
}

/// Why no rule may let through, on `identity` alone, the packets judged there without their uid
/// (a rule without a uid admits every uid there): unless `identity` is a container's cgroup (a
/// runtime's, not one a user's manager named) where the audit saw nothing else, neither another
/// uid nor a denied attempt.
fn no_rule_without_uid(identity: &Identity, workloads: &[Workload]) -> Option<String> {
    let cgroup = match identity {
        Identity::Cgroup(cgroup) => cgroup,
        Identity::Unit(_) | Identity::Anywhere => {
            return Some("its cgroup was gone when its events were read".into());
        }
    };
    if !workload::is_container_cgroup(cgroup) {
        return Some(format!(
            "{cgroup} is not a container's cgroup, and a rule on it alone would admit every \
             uid there"
        ));
    }
    let others: Vec<String> = (workloads.iter())
        .filter(|w| w.cgroup.as_deref() == Some(cgroup.as_str()))
        .filter(|w| !w.uid_ignored || w.denied > 0)
        .map(|w| {
            let judged = if w.uid_ignored { " (not judged)" } else { "" };
            format!("uid {}{judged}, {} denied", w.uid, w.denied)
        })
        .collect();
    (!others.is_empty()).then(|| {
        format!(
            "the audit also saw {} in {cgroup}, which a rule on it alone would admit too",
            others.join("; ")
        )
    })
}

/// The workloads audit mode let through, by identity (its system manager's unit, else its
/// cgroup path, else anywhere) and uid: one rule each. Those judged with their uid ignored,
/// which a uid rule cannot match, go by their cgroup path alone (a unit's other cgroups are
/// not what was seen), with no uid.
fn audited_by_identity(
    workloads: &[Workload],
) -> BTreeMap<(Identity, Option<u32>), Vec<&Workload>> {
    let mut rules: BTreeMap<(Identity, Option<u32>), Vec<&Workload>> = BTreeMap::new();
    for w in workloads.iter().filter(|w| w.audited > 0) {
        // A unit rule names a unit of the system manager: one a user manager or a container
        // named is told by its cgroup path instead.
        let system_unit = w.unit.as_ref().filter(|_| {
            w.cgroup.as_deref().is_none_or(|cgroup| {
                let parent = cgroup.rsplit_once('/').map_or("", |(parent, _)| parent);
                !crate::policy::beyond_the_system_manager(parent)
            })
        });
        let identity = match (system_unit.filter(|_| !w.uid_ignored), &w.cgroup) {
            (Some(unit), _) => Identity::Unit(unit.clone()),
            (None, Some(cgroup)) => Identity::Cgroup(cgroup.clone()),
            (None, None) => Identity::Anywhere,
        };
        let uid = (!w.uid_ignored).then_some(w.uid);
        rules.entry((identity, uid)).or_default().push(w);
    }
    rules
}

/// The comment above a suggested rule saying what the audit saw of one workload.
fn write_seen(out: &mut String, w: &Workload) {
    let _ = writeln!(
        out,
        "# seen: {} attempts {} → {} as {}{}{}; {}; to {}",
        w.audited,
        w.first_seen.strftime("%Y-%m-%dT%H:%M:%SZ"),
        w.last_seen.strftime("%Y-%m-%dT%H:%M:%SZ"),
        w.uid,
        w.user
            .as_ref()
            .map(|u| format!(" ({u})"))
            .unwrap_or_default(),
        if w.uid_ignored {
            " (a socket's owner, not judged)"
        } else {
            ""
        },
        match (w.exes.is_empty(), w.comms.is_empty()) {
            (false, _) => format!("exe {}", w.exes.join(", ")),
            (true, false) => format!("comm {}", w.comms.join(", ")),
            (true, true) => "packets, no process known".into(),
        },
        w.destinations.join(", "),
    );
    if let Some(container) = &w.container {
        let _ = writeln!(
            out,
            "# a container ({} {}): its id, so its unit or cgroup, changes when it is \
             re-created",
            container.runtime.as_deref().unwrap_or("runtime unknown"),
            container.id
        );
    }
}

/// One suggested rule: `uid` in `identity`, for the workloads `seen` there, and never wider than
/// what was seen (where its tasks were: on the host, in containers, or both). Without `uid`
/// (packets judged with their uid ignored), the rule names a container's cgroup alone, the only
/// rule that can match them, where the audit saw nothing else ([`no_rule_without_uid`]).
fn write_rule(out: &mut String, identity: &Identity, uid: Option<u32>, seen: &[&Workload]) {
    if uid.is_none() {
        out.push_str(
            "# its packets were judged without their uid (their sender could not be confirmed \
             as the\n# socket's owner: a user-namespaced container's root, say), which no uid \
             rule matches:\n# this rule admits every uid of the container, where the audit saw \
             no other\n",
        );
    }
    out.push_str("[[allow]]\n");
    if let Some(uid) = uid {
        let _ = writeln!(out, "uid = {uid}");
    }
    match identity {
        Identity::Unit(unit) => {
            let _ = writeln!(out, "unit = {}", toml_string(unit));
        }
        Identity::Cgroup(cgroup) => {
            let _ = writeln!(out, "cgroup = {}", toml_string(cgroup));
        }
        Identity::Anywhere => {
            out.push_str("# its cgroup was gone when its events were read: any cgroup\n");
        }
    }
    // Never wider than what was seen: where its tasks were, on the host or in containers.
    let (host, container) = (
        seen.iter().any(|w| w.on_host),
        seen.iter().any(|w| w.in_container),
    );
    // "only" matches in a container runtime's cgroup alone: a workload seen in namespaces of its
    // own elsewhere needs `true`.
    let in_container_cgroups = seen.iter().all(|w| {
        w.cgroup
            .as_deref()
            .is_some_and(workload::is_container_cgroup)
    });
    let _ = writeln!(
        out,
        "containers = {}",
        match (host, container) {
            (false, true) if in_container_cgroups => Containers::Only,
            (_, true) => Containers::Included,
            _ => Containers::Excluded,
        }
        .as_toml()
    );
}

/// `text` as a TOML string, quoted and escaped.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// Reads `path` (`-` or none: stdin).
///
/// # Errors
/// [`EventsError::Stream`] when the file cannot be opened.
pub fn open(path: Option<&std::path::Path>) -> Result<(Box<dyn BufRead>, String)> {
    match path {
        None => Ok((Box::new(io::BufReader::new(io::stdin())), "<stdin>".into())),
        Some(path) if path.as_os_str() == "-" => {
            Ok((Box::new(io::BufReader::new(io::stdin())), "<stdin>".into()))
        }
        Some(path) => {
            let file = std::fs::File::open(path).map_err(|err| EventsError::Stream {
                at: path.display().to_string(),
                message: err.to_string(),
            })?;
            Ok((
                Box::new(io::BufReader::new(file)),
                path.display().to_string(),
            ))
        }
    }
}

/// `imds-guard report`: who touched IMDS, or (`--suggest-policy`) a policy for them.
///
/// # Errors
/// [`crate::error::EventsError::Stream`] for an unreadable file or a line that is not an event.
pub fn run(args: &ReportArgs) -> Result<()> {
    let (input, source) = open(args.file.as_deref())?;
    let workloads = workloads(input, &source)?;
    if args.suggest_policy {
        // The audited policy must be valid: the suggestion builds on it.
        let config = Config::load(args.config.as_deref(), &Overrides::default())?;
        let text = match &config.file {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?,
            None => String::new(),
        };
        let path = config.file.as_ref().map(|path| path.display().to_string());
        let base = path.as_deref().map(|path| Base { path, text: &text });
        let suggested = suggest_policy(&workloads, base.as_ref())?;
        for warning in suggested
            .lines()
            .filter_map(|l| l.strip_prefix("# WARNING: "))
        {
            eprintln!("imds-guard: warning: {warning}");
        }
        print!("{suggested}");
    } else if args.format == ReportFormat::Json {
        super::print_json(&workloads);
    } else {
        print!("{}", table(&workloads));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rule;

    const CONTAINER: &str = "5d1e0c4b3a29f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a392817060";

    /// A recorded stream: the SSM agent (audited, twice, then 40 repeats folded), a user's
    /// session, a log line, a denied container, and an event whose cgroup was gone.
    fn stream() -> String {
        format!(
            r#"{{"time":"2026-11-22T10:00:00Z","verdict":"audit","count":1,"aggregated":false,"first_seen":"2026-11-22T10:00:00Z","last_seen":"2026-11-22T10:00:00Z","pid":1,"tgid":1,"uid":0,"user":"root","gid":0,"comm":"amazon-ssm-agen","exe":"/usr/bin/amazon-ssm-agent","cgroup_id":9,"cgroup":"/system.slice/amazon-ssm-agent.service","family":"ipv4","protocol":"tcp","dst":"169.254.169.254","port":80,"rule":"default","hook":"connect4"}}
imds-guard log line the journal interleaves
{{"time":"2026-11-22T10:05:00.5Z","verdict":"audit","pid":2,"tgid":2,"uid":0,"gid":0,"comm":"ssm-worker","cgroup_id":9,"cgroup":"/system.slice/amazon-ssm-agent.service","family":"ipv6","protocol":"tcp","dst":"fd00:ec2::254","port":80,"rule":"default","hook":"connect6"}}
{{"time":"2026-11-22T10:05:09Z","verdict":"audit","count":40,"aggregated":true,"first_seen":"2026-11-22T10:05:00.5Z","last_seen":"2026-11-22T10:05:09Z","pid":2,"uid":0,"cgroup":"/system.slice/amazon-ssm-agent.service","dst":"fd00:ec2::254"}}
{{"time":"2026-11-22T10:06:00Z","verdict":"audit","pid":3,"tgid":3,"uid":1000,"user":"alice","gid":1000,"comm":"python3","exe":"/usr/bin/python3.11","cgroup_id":11,"cgroup":"/user.slice/user-1000.slice/session-3.scope","dst":"169.254.169.254"}}
{{"time":"2026-11-22T10:07:00Z","verdict":"deny","pid":4,"tgid":4,"uid":0,"gid":0,"comm":"curl","cgroup_id":12,"cgroup":"/system.slice/docker-{CONTAINER}.scope","dst":"169.254.169.254"}}
{{"time":"2026-11-22T10:08:00Z","verdict":"audit","pid":5,"tgid":5,"uid":1001,"gid":1001,"comm":"cron-job","cgroup_id":13,"cgroup":null,"dst":"169.254.169.254"}}
"#
        )
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn groups_by_workload_with_counts_and_times() {
        let workloads = workloads(stream().as_bytes(), "events.jsonl").unwrap();
        assert_eq!(workloads.len(), 4);
        let ssm = &workloads[0];
        assert_eq!(ssm.unit.as_deref(), Some("amazon-ssm-agent.service"));
        assert_eq!(
            (ssm.audited, ssm.denied),
            (42, 0),
            "aggregates count by `count`"
        );
        assert_eq!(ssm.comms, ["amazon-ssm-agen", "ssm-worker"]);
        assert_eq!(ssm.exes, ["/usr/bin/amazon-ssm-agent"]);
        assert_eq!(ssm.user.as_deref(), Some("root"));
        assert_eq!(ssm.destinations, ["169.254.169.254", "fd00:ec2::254"]);
        // Times compare as times: "10:05:00.5Z" sorts after "10:05:00Z" as text, not in time.
        assert_eq!(
            (ssm.first_seen, ssm.last_seen),
            (at("2026-11-22T10:00:00Z"), at("2026-11-22T10:05:09Z"))
        );
        let container = workloads.iter().find(|w| w.denied > 0).unwrap();
        assert_eq!(container.container.as_ref().unwrap().id, CONTAINER);
        assert_eq!(
            container.label(),
            format!("docker container {}", &CONTAINER[..12])
        );
        let table = table(&workloads);
        assert!(table.contains("unit amazon-ssm-agent.service"), "{table}");
        assert!(table.contains("0 (root)"), "{table}");
        assert!(table.contains("exe /usr/bin/python3.11"), "{table}");
        assert!(table.contains("(cgroup gone)"), "{table}");
    }

    fn parse(text: &str) -> crate::config::Config {
        crate::config::Config::from_toml(None, text, &crate::config::Overrides::default())
            .unwrap_or_else(|err| panic!("{err}\n{text}"))
    }

    #[test]
    fn suggested_policy_enforces_and_names_the_most_stable_identity() {
        let workloads = workloads(stream().as_bytes(), "events.jsonl").unwrap();
        let text = suggest_policy(&workloads, None).unwrap();
        let config = parse(&text);
        assert_eq!(config.mode, crate::config::Mode::Enforce, "{text}");
        // The default policy's root rule, then SSM by its unit, the session by its cgroup (a
        // unit rule does not match below user.slice), the cron job by its uid alone; the
        // container's denied attempt gets no rule.
        assert_eq!(config.allow.len(), 4, "{text}");
        assert_eq!(
            config.allow[0].name.as_deref(),
            Some("root (the default policy)")
        );
        assert!(
            text.contains("unit = \"amazon-ssm-agent.service\"\n"),
            "{text}"
        );
        assert!(
            text.contains("cgroup = \"/user.slice/user-1000.slice/session-3.scope\"\n"),
            "{text}"
        );
        assert!(
            text.contains("uid = 1001\n# its cgroup was gone when its events were read: any cgroup\ncontainers = false\n"),
            "{text}"
        );
        assert!(!text.contains(CONTAINER), "{text}");
        assert!(text.contains("# 1 denied attempts were seen too"), "{text}");
    }

    #[test]
    fn packets_judged_without_their_uid_get_a_rule_only_where_it_admits_nothing_else() {
        let line = |uid: u32, ignored: bool, verdict: &str, cgroup: &str| {
            let cgroup = if cgroup.is_empty() {
                "null".to_owned()
            } else {
                format!("\"{cgroup}\"")
            };
            format!(
                r#"{{"time":"2026-11-22T10:00:00Z","verdict":"{verdict}","uid":{uid},"uid_ignored":{ignored},"cgroup":{cgroup},"dst":"169.254.169.254","hook":"egress","in_container":true}}"#
            )
        };
        let stream = [
            // A user-namespaced container's root through a NAT: its socket's owner reads as 0.
            line(0, true, "audit", "/lxc.payload.web"),
            // The same in another container, where the audit also saw a judged uid.
            line(0, true, "audit", "/lxc.payload.db"),
            line(100_000, false, "audit", "/lxc.payload.db"),
            // And in one where an attempt was denied.
            line(0, true, "audit", "/lxc.payload.cache"),
            line(1001, false, "deny", "/lxc.payload.cache"),
            // Where a rule on the cgroup alone would admit whatever runs there: the root, a
            // system unit, a login session; and nowhere known.
            line(0, true, "audit", "/"),
            line(0, true, "audit", "/system.slice/cron.service"),
            line(
                0,
                true,
                "audit",
                "/user.slice/user-1000.slice/session-3.scope",
            ),
            line(0, true, "audit", ""),
        ]
        .join("\n");
        let workloads = workloads(stream.as_bytes(), "events.jsonl").unwrap();
        assert!(table(&workloads).contains("0 (ignored)"));
        let text = suggest_policy(&workloads, None).unwrap();
        let config = parse(&text);
        let conditions: Vec<String> = config.allow.iter().map(Rule::conditions).collect();
        // Root's default rule, the judged uid, and the one container where nothing else was
        // seen, by its cgroup alone (a uid 0 rule would never match those packets).
        assert_eq!(
            conditions,
            [
                "uid 0, not containers",
                "uid 100000, cgroup /lxc.payload.db, containers only",
                "cgroup /lxc.payload.web, containers only",
            ],
            "{text}"
        );
        let warnings: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("# WARNING: "))
            .collect();
        assert_eq!(warnings.len(), 6, "{text}");
        for (needle, why) in [
            ("/lxc.payload.db", "the audit also saw uid 100000, 0 denied"),
            (
                "/lxc.payload.cache",
                "the audit also saw uid 1001, 1 denied",
            ),
            ("cgroup /,", "/ is not a container's cgroup"),
            ("cron.service", "is not a container's cgroup"),
            ("session-3.scope", "is not a container's cgroup"),
            ("(cgroup gone)", "its cgroup was gone"),
        ] {
            assert!(
                warnings
                    .iter()
                    .any(|w| w.contains(needle) && w.contains(why)),
                "{needle}: {why}: {warnings:#?}"
            );
        }
        assert!(!text.contains("unit = \"cron.service\""), "{text}");
    }

    #[test]
    fn suggested_rules_are_never_wider_than_what_was_seen() {
        let line = |uid: u32, cgroup: &str, in_container: Option<bool>| {
            let flag = in_container.map_or(String::new(), |c| format!(r#","in_container":{c}"#));
            format!(
                r#"{{"time":"2026-11-22T10:00:00Z","verdict":"audit","uid":{uid},"comm":"x","cgroup":"{cgroup}","dst":"169.254.169.254"{flag}}}"#
            )
        };
        let stream = [
            // Host only.
            line(998, "/system.slice/cwagent.service", Some(false)),
            // In a container's cgroup (an older agent's line: no in_container).
            line(0, &format!("/system.slice/docker-{CONTAINER}.scope"), None),
            // Namespaced, in an ordinary cgroup: a container the path does not name.
            line(0, "/custom/app", Some(true)),
            // Both, in one cgroup.
            line(5, "/custom/mixed", Some(true)),
            line(5, "/custom/mixed", Some(false)),
        ]
        .join("\n");
        let workloads = workloads(stream.as_bytes(), "events.jsonl").unwrap();
        let text = suggest_policy(&workloads, None).unwrap();
        let config = parse(&text);
        let containers = |needle: &str| {
            let rule = (config.allow.iter())
                .find(|rule| rule.conditions().contains(needle))
                .unwrap_or_else(|| panic!("no rule for {needle}: {text}"));
            rule.containers.as_ref().map(|setting| setting.value)
        };
        assert_eq!(containers("cwagent.service"), Some(Containers::Excluded));
        assert_eq!(containers(CONTAINER), Some(Containers::Only));
        // Namespaced in a cgroup no runtime names: "only" would not match it there.
        assert_eq!(containers("/custom/app"), Some(Containers::Included));
        assert_eq!(containers("/custom/mixed"), Some(Containers::Included));
        assert_eq!(config.allow[0].conditions(), "uid 0, not containers");
    }

    #[test]
    fn suggested_policy_keeps_the_audited_config_and_adds_to_it() {
        let workloads = workloads(stream().as_bytes(), "events.jsonl").unwrap();
        let base = "# ours\nmode = \"audit\" # staged\ncgroup = \"/\"\n\n\
                    [[allow]]\nname = \"host root\"\nuid = 0\nnot_cgroup = \"/docker/**\"\n";
        let text = suggest_policy(
            &workloads,
            Some(&Base {
                path: "/etc/imds-guard/imds-guard.toml",
                text: base,
            }),
        )
        .unwrap();
        let config = parse(&text);
        assert_eq!(config.mode, crate::config::Mode::Enforce, "{text}");
        assert!(text.contains("# ours\n"), "comments kept: {text}");
        assert!(
            text.contains("# Kept from /etc/imds-guard/imds-guard.toml"),
            "{text}"
        );
        // Its rule first (it decides first, as it did), then the three added.
        assert_eq!(config.allow.len(), 4, "{text}");
        assert_eq!(config.allow[0].name.as_deref(), Some("host root"));
        let err = suggest_policy(
            &workloads,
            Some(&Base {
                path: "bad.toml",
                text: "mode = ",
            }),
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("bad.toml: not a config"),
            "{err}"
        );
    }

    #[test]
    fn journal_exports_carry_the_same_events() {
        let events: Vec<String> = stream()
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(str::to_owned)
            .collect();
        let plain = workloads(stream().as_bytes(), "plain").unwrap();
        // `journalctl -o json`: each entry's MESSAGE is a line the agent printed.
        let json = events.iter().fold(String::new(), |mut json, e| {
            let entry = serde_json::json!({"_PID": "7", "MESSAGE": e});
            let _ = writeln!(json, "{entry}");
            json
        });
        assert_eq!(workloads(json.as_bytes(), "json").unwrap(), plain);
        // `journalctl -o export`: text fields, and one binary-safe MESSAGE field.
        let mut export = Vec::new();
        for (i, e) in events.iter().enumerate() {
            export.extend_from_slice(b"__CURSOR=s=1;i=1\n__REALTIME_TIMESTAMP=1\n");
            if i == 1 {
                export.extend_from_slice(b"MESSAGE\n");
                export.extend_from_slice(&(e.len() as u64).to_le_bytes());
                export.extend_from_slice(e.as_bytes());
                export.push(b'\n');
                export.extend_from_slice(b"BINARY_FIELD\n");
                export.extend_from_slice(&3u64.to_le_bytes());
                export.extend_from_slice(b"a\nb\n");
            } else {
                export.extend_from_slice(format!("MESSAGE={e}\n").as_bytes());
            }
            export.extend_from_slice(b"_SYSTEMD_UNIT=imds-guard.service\n\n");
        }
        assert_eq!(workloads(export.as_slice(), "export").unwrap(), plain);
    }

    #[test]
    fn names_the_workloads_that_still_use_imdsv1() {
        let http = |verdict: &str, uid: u32, cgroup: &str, version: &str, count: u64| {
            format!(
                r#"{{"time":"2026-11-22T11:00:00Z","verdict":"{verdict}","count":{count},"uid":{uid},"comm":"x","cgroup":"{cgroup}","dst":"169.254.169.254","hook":"http","imds_version":"{version}","request":"GET /latest/meta-data/"}}"#
            )
        };
        let events = [
            // A legacy agent's v1 requests, once and then folded, let through.
            http("allow", 0, "/system.slice/legacy.service", "v1", 1),
            http("allow", 0, "/system.slice/legacy.service", "v1", 9),
            // A container's v1 request, refused (`imds = "v2"`).
            http(
                "deny",
                0,
                &format!("/system.slice/docker-{CONTAINER}.scope"),
                "v1",
                1,
            ),
            // A v2 request refused by a path rule: not a v1 user.
            http("deny", 1000, "/system.slice/app.service", "v2", 1),
            // The agent's own posture check.
            http("allow", 0, "/system.slice/imds-guard.service", "v1", 1)
                .replace(r#""hook""#, r#""posture_check":true,"hook""#),
        ]
        .join("\n");
        let workloads = workloads(events.as_bytes(), "events.jsonl").unwrap();
        let by_cgroup = |needle: &str| {
            (workloads.iter())
                .find(|w| w.cgroup.as_deref().is_some_and(|c| c.contains(needle)))
                .unwrap()
        };
        let legacy = by_cgroup("legacy");
        assert_eq!((legacy.v1, legacy.denied, legacy.audited), (10, 0, 0));
        let container = by_cgroup("docker-");
        assert_eq!(
            (container.v1, container.denied, container.audited),
            (1, 1, 0)
        );
        let app = by_cgroup("app.service");
        assert_eq!((app.v1, app.denied, app.audited), (0, 1, 0));
        assert!(
            !workloads
                .iter()
                .any(|w| w.unit.as_deref() == Some("imds-guard.service")),
            "{workloads:?}"
        );
        let table = table(&workloads);
        assert!(
            table.contains(&format!(
                "2 workloads still use IMDSv1: unit legacy.service (uid 0), docker container {} \
                 (uid 0)\n",
                &CONTAINER[..12]
            )),
            "{table}"
        );
        // Requests the connect hooks let through need no rule of their own.
        let text = suggest_policy(&workloads, None).unwrap();
        assert_eq!(parse(&text).allow.len(), 1, "{text}");
        // Connect events only: nobody used v1 as far as these events say.
        let earlier = super::workloads(stream().as_bytes(), "e").unwrap();
        assert_eq!(
            v1_summary(&earlier),
            "No workload used IMDSv1 in these events.\n"
        );
    }

    #[test]
    fn a_line_that_is_not_an_event_is_named() {
        let err = workloads("log\n{\"time\":1}\n".as_bytes(), "x.jsonl").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("x.jsonl:2: not an imds-guard event"),
            "{err}"
        );
    }
}

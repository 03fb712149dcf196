//! `imds-guard report`: who touched IMDS, from the JSON-lines event stream (`run`'s stdout, a
//! file, or the unit's journal output), and a policy that would let exactly them through.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{self, BufRead},
};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The fields of an event line that the report uses (others are ignored).
#[derive(Debug, Deserialize)]
struct Line {
    time: String,
    verdict: String,
    uid: u32,
    comm: Option<String>,
    cgroup: Option<String>,
    dst: String,
}

/// One workload: what it is, and what it did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// The systemd unit its cgroup belongs to, if the path names one.
    pub unit: Option<String>,
    /// Its cgroup path (`null` when the cgroup was gone before the event was read).
    pub cgroup: Option<String>,
    /// Its uid.
    pub uid: u32,
    /// Thread names seen.
    pub comms: Vec<String>,
    /// Destinations tried.
    pub destinations: Vec<String>,
    /// Attempts denied.
    pub denied: u64,
    /// Attempts allowed but reported (audit).
    pub audited: u64,
    /// First and last event time.
    pub first_seen: String,
    /// Last event time.
    pub last_seen: String,
}

/// Groups the events of `input` by workload (unit or cgroup, then uid).
///
/// # Errors
/// [`Error::Report`] naming the line that is not an event.
pub fn workloads(input: impl BufRead, source: &str) -> Result<Vec<Workload>> {
    let mut by_key: BTreeMap<(Option<String>, u32), Workload> = BTreeMap::new();
    for (number, line) in (1usize..).zip(input.lines()) {
        let line = line.map_err(|err| Error::Report {
            at: format!("{source}:{number}"),
            message: err.to_string(),
        })?;
        let text = line.trim();
        // The journal (`journalctl -o cat`) may interleave the agent's log lines.
        if !text.starts_with('{') {
            continue;
        }
        let event: Line = serde_json::from_str(text).map_err(|err| Error::Report {
            at: format!("{source}:{number}"),
            message: format!("not an imds-guard event: {err}"),
        })?;
        let workload = by_key
            .entry((event.cgroup.clone(), event.uid))
            .or_insert_with(|| Workload {
                unit: event.cgroup.as_deref().and_then(unit_of),
                cgroup: event.cgroup.clone(),
                uid: event.uid,
                first_seen: event.time.clone(),
                ..Workload::default()
            });
        if let Some(comm) = event.comm
            && !workload.comms.contains(&comm)
        {
            workload.comms.push(comm);
        }
        if !workload.destinations.contains(&event.dst) {
            workload.destinations.push(event.dst);
        }
        match event.verdict.as_str() {
            "deny" => workload.denied += 1,
            _ => workload.audited += 1,
        }
        workload.last_seen = event.time;
    }
    let mut workloads: Vec<Workload> = by_key.into_values().collect();
    workloads.sort_by_key(|w| std::cmp::Reverse(w.denied + w.audited));
    Ok(workloads)
}

/// The systemd unit a cgroup path belongs to: its innermost `.service` or `.scope` part.
fn unit_of(path: &str) -> Option<String> {
    // systemd unit names are case-sensitive: `.Service` is not a unit type.
    path.rsplit('/')
        .find(|part| {
            std::path::Path::new(part)
                .extension()
                .is_some_and(|ext| ext == "service" || ext == "scope")
        })
        .map(str::to_owned)
}

/// The workloads as a table for people.
#[must_use]
pub fn table(workloads: &[Workload]) -> String {
    let mut out = String::from(
        "DENIED  AUDITED  UID    WORKLOAD                                   FIRST SEEN → LAST SEEN\n",
    );
    for w in workloads {
        let name = w
            .unit
            .clone()
            .or_else(|| w.cgroup.clone())
            .unwrap_or_else(|| "(cgroup gone)".into());
        let _ = writeln!(
            out,
            "{:>6}  {:>7}  {:<5}  {:<42} {} → {}\n        comm {}; to {}",
            w.denied,
            w.audited,
            w.uid,
            name,
            w.first_seen,
            w.last_seen,
            w.comms.join(", "),
            w.destinations.join(", "),
        );
    }
    out
}

/// A config whose rules would let exactly the workloads that audit mode let through, each by its
/// uid and its most stable place: its systemd unit, else its cgroup path.
#[must_use]
pub fn suggest_policy(workloads: &[Workload]) -> String {
    let mut out = String::from(
        "# Suggested by `imds-guard report --suggest-policy` from the events seen.\n\
         # Each rule lets one workload through; review them, then set mode = \"enforce\".\n\
         mode = \"audit\"\n",
    );
    let mut written: Vec<String> = Vec::new();
    // Only what audit mode let through: a denial was enforcement doing its job.
    for w in workloads.iter().filter(|w| w.audited > 0) {
        let condition = match (&w.unit, &w.cgroup) {
            (Some(unit), _) => format!("unit = \"{unit}\""),
            (None, Some(cgroup)) => format!("cgroup = \"{cgroup}\""),
            (None, None) => String::new(),
        };
        let rule = format!("uid = {}\n{condition}", w.uid);
        if written.contains(&rule) {
            continue;
        }
        let _ = write!(
            out,
            "\n# seen: {} denied, {} audited, {} → {}; comm {}; to {}\n[[allow]]\n{}\n",
            w.denied,
            w.audited,
            w.first_seen,
            w.last_seen,
            w.comms.join(", "),
            w.destinations.join(", "),
            rule.trim_end()
        );
        written.push(rule);
    }
    out
}

/// Reads `path` (`-` or none: stdin).
///
/// # Errors
/// [`Error::Report`] when the file cannot be opened.
pub fn open(path: Option<&std::path::Path>) -> Result<(Box<dyn BufRead>, String)> {
    match path {
        None => Ok((Box::new(io::BufReader::new(io::stdin())), "<stdin>".into())),
        Some(path) if path.as_os_str() == "-" => {
            Ok((Box::new(io::BufReader::new(io::stdin())), "<stdin>".into()))
        }
        Some(path) => {
            let file = std::fs::File::open(path).map_err(|err| Error::Report {
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

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = r#"{"time":"2026-11-22T10:00:00Z","verdict":"audit","pid":1,"tgid":1,"uid":0,"gid":0,"comm":"amazon-ssm-agen","cgroup_id":9,"cgroup":"/system.slice/amazon-ssm-agent.service","family":"ipv4","protocol":"tcp","dst":"169.254.169.254","port":80,"rule":"default","hook":"connect4"}
imds-guard log line the journal interleaves
{"time":"2026-11-22T10:05:00Z","verdict":"audit","pid":2,"tgid":2,"uid":0,"gid":0,"comm":"ssm-worker","cgroup_id":9,"cgroup":"/system.slice/amazon-ssm-agent.service","family":"ipv6","protocol":"tcp","dst":"fd00:ec2::254","port":80,"rule":"default","hook":"connect6"}
{"time":"2026-11-22T10:06:00Z","verdict":"audit","pid":3,"tgid":3,"uid":1000,"gid":1000,"comm":"python3","cgroup_id":11,"cgroup":"/user.slice/user-1000.slice/session-3.scope","family":"ipv4","protocol":"tcp","dst":"169.254.169.254","port":80,"rule":"default","hook":"connect4"}
{"time":"2026-11-22T10:07:00Z","verdict":"deny","pid":4,"tgid":4,"uid":0,"gid":0,"comm":"curl","cgroup_id":12,"cgroup":"/kubepods.slice/pod1/cri-containerd-ab.scope","family":"ipv4","protocol":"tcp","dst":"169.254.169.254","port":80,"rule":"default","hook":"connect4"}
"#;

    #[test]
    fn groups_by_workload_with_counts_and_times() {
        let workloads = workloads(STREAM.as_bytes(), "events.jsonl").unwrap();
        assert_eq!(workloads.len(), 3);
        let ssm = &workloads[0];
        assert_eq!(ssm.unit.as_deref(), Some("amazon-ssm-agent.service"));
        assert_eq!((ssm.audited, ssm.denied), (2, 0));
        assert_eq!(ssm.comms, ["amazon-ssm-agen", "ssm-worker"]);
        assert_eq!(ssm.destinations, ["169.254.169.254", "fd00:ec2::254"]);
        assert_eq!(
            (ssm.first_seen.as_str(), ssm.last_seen.as_str()),
            ("2026-11-22T10:00:00Z", "2026-11-22T10:05:00Z")
        );
        let table = table(&workloads);
        assert!(table.contains("amazon-ssm-agent.service"), "{table}");
    }

    #[test]
    fn suggested_policy_parses_and_names_units_first() {
        let workloads = workloads(STREAM.as_bytes(), "events.jsonl").unwrap();
        let text = suggest_policy(&workloads);
        assert!(
            text.contains("unit = \"amazon-ssm-agent.service\""),
            "{text}"
        );
        assert!(text.contains("unit = \"session-3.scope\""), "{text}");
        let config =
            crate::config::Config::from_toml(None, &text, &crate::config::Overrides::default())
                .unwrap();
        // The container's denied attempt is not made an allow rule.
        assert_eq!(config.allow.len(), 2);
        assert!(!text.contains("kubepods"), "{text}");
    }

    #[test]
    fn a_line_that_is_not_an_event_is_named() {
        let err = workloads("{\"time\":1}\n".as_bytes(), "x.jsonl").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("x.jsonl:1: not an imds-guard event"),
            "{err}"
        );
    }
}

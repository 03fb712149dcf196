//! A [`Translation`] written out: the config (TOML, commented, loadable as is), with everything
//! the reader must know in its comments, and the same as JSON for tools.

use std::{fmt::Write as _, net::IpAddr};

use serde::Serialize;

use super::{
    logic::Term,
    save::{Family, restore_quote},
    translate::{RuleRef, Translation, describe_term},
};

/// The rule as iptables-save prints it, after `-A CHAIN`.
fn rule_text(rule: &RuleRef) -> String {
    rule.args
        .iter()
        .map(|w| restore_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

/// `line 7 (iptables, filter OUTPUT): -d 169.254.169.254/32 -j DROP`.
fn locate(rule: &RuleRef) -> String {
    format!(
        "line {} ({}, {} {}): -A {} {}",
        rule.line,
        rule.family.tool(),
        rule.table,
        rule.chain,
        rule.chain,
        rule_text(rule)
    )
}

/// The config, with the whole story in its comments. `source` names where the rules came from.
#[must_use]
pub fn config(t: &Translation, source: &str) -> String {
    let mut out = story(t, source);
    out.push('\n');
    out.push_str("mode = \"enforce\"\n");
    let protect: Vec<String> = t.protect.iter().map(|p| format!("\"{p}\"")).collect();
    let _ = writeln!(out, "protect = [{}]", protect.join(", "));
    if t.allowed.is_empty() {
        out.push_str("\n# The rules let no workload through.\nallow = []\n");
    }
    for term in &t.allowed {
        write_rule(&mut out, term);
    }
    out
}

/// What the config's comments say: what was covered, translated, not, and how to delete.
fn story(t: &Translation, source: &str) -> String {
    let mut out = String::new();
    let mut say = |text: &str| {
        for line in text.lines() {
            if line.is_empty() {
                out.push_str("#\n");
            } else {
                let _ = writeln!(out, "# {line}");
            }
        }
    };
    say(&format!(
        "imds-guard policy translated by `imds-guard migrate` from the iptables rules of: {source}.\n\
         Check it with `imds-guard check-config FILE`, install it as\n\
         /etc/imds-guard/imds-guard.toml, and `systemctl reload imds-guard`.\n"
    ));
    let covered: Vec<String> = t.covered.iter().map(ToString::to_string).collect();
    say(&format!(
        "The rules stopped workloads from reaching: {}.",
        if covered.is_empty() {
            "none of the protected addresses".to_owned()
        } else {
            covered.join(", ")
        }
    ));
    for (address, why) in &t.uncovered {
        say(&format!(
            "WARNING: {address} was not covered: {why}. This config protects it{}.",
            if protected_by(t, *address) {
                ""
            } else {
                " only if you add it to `protect`"
            }
        ));
    }
    for warning in &t.warnings {
        say(&format!("WARNING: {warning}."));
    }
    for (term, addresses) in &t.partial {
        say(&format!("WARNING: {}.", partial_warning(term, addresses)));
    }
    for (term, why) in &t.lost {
        say(&format!(
            "WARNING: not translated, so no longer let through: {} ({why}); add a rule by hand \
             if it needs IMDS.",
            describe_term(term)
        ));
    }
    say(
        "Containers behind a bridge never crossed these OUTPUT rules (their packets are\n\
         forwarded): imds-guard judges their connects by cgroup, and lets none through here\n\
         (containers = false); root in a container is not `uid = 0` on the host.",
    );
    if !t.untranslated.is_empty() {
        say("\nRules not translated (they stay in the firewall):");
        for rule in &t.untranslated {
            say(&format!(
                "  {}\n    why: {}",
                locate(&rule.rule),
                rule.reason
            ));
        }
    }
    if !t.translated.is_empty() {
        say("\nRules translated:");
        for rule in &t.translated {
            say(&format!("  {}", locate(rule)));
        }
    }
    if !t.kept.is_empty() {
        say("\nTranslated rules to keep in the firewall all the same:");
        for (rule, why) in &t.kept {
            say(&format!("  {}\n    why: {why}", locate(rule)));
        }
    }
    if !t.deletions.is_empty() {
        say(
            "\nOnce this policy is enforcing, these commands delete the translated rules\n\
             (`imds-guard migrate --apply` runs them, after checking that it is):",
        );
        for deletion in &t.deletions {
            say(&format!("  {}", deletion.command()));
        }
    }
    out
}

/// One `[[allow]]` table.
fn write_rule(out: &mut String, term: &Term) {
    out.push_str("\n[[allow]]\n");
    if let Some(uid) = single(term.uid.ranges()) {
        let _ = writeln!(out, "uid = {uid}{}", name_comment(true, uid));
    }
    if let Some(gid) = single(term.gid.ranges()) {
        let _ = writeln!(out, "gid = {gid}{}", name_comment(false, gid));
    }
    if let Some(cgroup) = &term.cgroup {
        let _ = writeln!(out, "cgroup = {}", toml_string(cgroup));
    } else if term.is_any() {
        out.push_str("# Every workload on the host (the rules stopped none of them).\n");
        out.push_str("cgroup = \"/\"\n");
    }
    if !term.not_cgroup.is_empty() {
        let list: Vec<String> = term.not_cgroup.iter().map(|p| toml_string(p)).collect();
        let _ = writeln!(out, "not_cgroup = [{}]", list.join(", "));
    }
}

/// What the config does not let through that the rules did, on some ports or interfaces.
fn partial_warning(term: &Term, addresses: &[IpAddr]) -> String {
    let addresses: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    format!(
        "not let through: {}, which the rules let reach {} only under conditions imds-guard \
         cannot judge (see the rules not translated); add a rule by hand if it needs IMDS",
        describe_term(term),
        addresses.join(", ")
    )
}

/// Whether the config's `protect` holds `address`.
fn protected_by(t: &Translation, address: IpAddr) -> bool {
    super::translate::presets()
        .into_iter()
        .any(|(name, addresses)| t.protect.contains(&name) && addresses.contains(&address))
}

/// `  # root`, when this host knows the id's name.
fn name_comment(user: bool, id: u32) -> String {
    let name = if user {
        nix::unistd::User::from_uid(id.into())
            .ok()
            .flatten()
            .map(|u| u.name)
    } else {
        nix::unistd::Group::from_gid(id.into())
            .ok()
            .flatten()
            .map(|g| g.name)
    };
    name.map_or_else(String::new, |name| format!("  # {name} on this host"))
}

fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// `migrate --format json`.
#[derive(Debug, Serialize)]
pub struct Json {
    /// Where the rules came from.
    pub source: String,
    /// The config, as the default format prints it.
    pub config: String,
    /// The `protect` entries of the config.
    pub protect: Vec<&'static str>,
    /// The protected addresses the rules stopped some workload from reaching.
    pub covered: Vec<IpAddr>,
    /// The others, and why each is not covered.
    pub uncovered: Vec<Uncovered>,
    /// The config's rules.
    pub allow: Vec<Allow>,
    /// What the rules let through that the config cannot, and why.
    pub lost: Vec<Lost>,
    /// What the rules let through only on some ports, protocols or interfaces.
    pub partial: Vec<Partial>,
    /// Everything else the reader must know.
    pub warnings: Vec<String>,
    /// The rules translated.
    pub translated: Vec<JsonRule>,
    /// The rules that bear on a protected address and were not translated.
    pub untranslated: Vec<JsonRule>,
    /// Translated rules that should stay in the firewall.
    pub kept: Vec<JsonRule>,
    /// How many rules bear on no protected address.
    pub unrelated: usize,
    /// The commands that delete the translated rules.
    pub delete: Vec<String>,
}

/// A protected address the rules did not cover.
#[derive(Debug, Serialize)]
pub struct Uncovered {
    /// The address.
    pub address: IpAddr,
    /// Why.
    pub why: String,
}

/// One `[[allow]]` of the config.
#[derive(Debug, Serialize)]
pub struct Allow {
    /// `uid`.
    pub uid: Option<u32>,
    /// `gid`.
    pub gid: Option<u32>,
    /// `cgroup`.
    pub cgroup: Option<String>,
    /// `not_cgroup`.
    pub not_cgroup: Vec<String>,
}

/// Workloads lost in translation.
#[derive(Debug, Serialize)]
pub struct Lost {
    /// Which.
    pub workloads: String,
    /// Why.
    pub why: String,
}

/// Workloads the rules let through only under conditions imds-guard cannot judge.
#[derive(Debug, Serialize)]
pub struct Partial {
    /// Which.
    pub workloads: String,
    /// To which addresses.
    pub addresses: Vec<IpAddr>,
}

/// A rule of the input.
#[derive(Debug, Serialize)]
pub struct JsonRule {
    /// Its line.
    pub line: usize,
    /// `ipv4` or `ipv6`.
    pub family: &'static str,
    /// Its table.
    pub table: String,
    /// Its chain.
    pub chain: String,
    /// The rule, after `-A CHAIN`.
    pub rule: String,
    /// Why it was not translated, or is kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

fn json_rule(rule: &RuleRef, why: Option<&str>) -> JsonRule {
    JsonRule {
        line: rule.line,
        family: family_name(rule.family),
        table: rule.table.clone(),
        chain: rule.chain.clone(),
        rule: rule_text(rule),
        why: why.map(str::to_owned),
    }
}

/// The translation for tools.
#[must_use]
pub fn json(t: &Translation, source: &str) -> Json {
    Json {
        source: source.to_owned(),
        config: config(t, source),
        protect: t.protect.clone(),
        covered: t.covered.clone(),
        uncovered: (t.uncovered.iter())
            .map(|(address, why)| Uncovered {
                address: *address,
                why: why.clone(),
            })
            .collect(),
        allow: (t.allowed.iter())
            .map(|term| Allow {
                uid: single(term.uid.ranges()),
                gid: single(term.gid.ranges()),
                cgroup: term.cgroup.clone(),
                not_cgroup: term.not_cgroup.iter().cloned().collect(),
            })
            .collect(),
        lost: (t.lost.iter())
            .map(|(term, why)| Lost {
                workloads: describe_term(term),
                why: why.clone(),
            })
            .collect(),
        partial: (t.partial.iter())
            .map(|(term, addresses)| Partial {
                workloads: describe_term(term),
                addresses: addresses.clone(),
            })
            .collect(),
        warnings: t.warnings.clone(),
        translated: t.translated.iter().map(|r| json_rule(r, None)).collect(),
        untranslated: (t.untranslated.iter())
            .map(|u| json_rule(&u.rule, Some(&u.reason)))
            .collect(),
        kept: (t.kept.iter())
            .map(|(r, why)| json_rule(r, Some(why)))
            .collect(),
        unrelated: t.unrelated,
        delete: (t.deletions.iter())
            .map(super::delete::Deletion::command)
            .collect(),
    }
}

fn single(ranges: &[(u32, u32)]) -> Option<u32> {
    match ranges {
        [(low, high)] if low == high => Some(*low),
        _ => None,
    }
}

/// The lines `migrate` puts on standard error beside the config: the warnings, so that they
/// are seen when the config goes to a file.
#[must_use]
pub fn warnings(t: &Translation) -> Vec<String> {
    let mut out: Vec<String> = (t.uncovered.iter())
        .map(|(address, why)| format!("{address} was not covered by the rules: {why}"))
        .collect();
    out.extend(t.warnings.iter().cloned());
    out.extend((t.partial.iter()).map(|(term, addresses)| partial_warning(term, addresses)));
    out.extend(t.lost.iter().map(|(term, why)| {
        format!(
            "not translated, so no longer let through: {} ({why})",
            describe_term(term)
        )
    }));
    out.extend(
        t.untranslated
            .iter()
            .map(|u| format!("not translated: {}: {}", locate(&u.rule), u.reason)),
    );
    out
}

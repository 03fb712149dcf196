//! Which translated rules may go, and the commands that delete them: only rules the host's own
//! connections alone cross, that judge protected addresses alone, and whose deletion leaves
//! every workload the policy lets through let through by what stays.

use std::{collections::BTreeSet, net::IpAddr};

use super::{
    logic::{self, Term},
    save::{Family, Match, Rule, Ruleset, Target},
    translate::{Names, Notes, RuleRef, Translation, allowed_to, presets, reached_by},
};

/// An iptables (or ip6tables) command, as words, that deletes a translated rule or chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deletion {
    /// Its family.
    pub family: Family,
    /// Its table.
    pub table: String,
    /// `-D CHAIN args…` or `-X CHAIN`.
    pub words: Vec<String>,
}

impl Deletion {
    /// As a shell command: `iptables -D OUTPUT -d 169.254.169.254/32 … -j DROP`.
    #[must_use]
    pub fn command(&self) -> String {
        let mut words = vec![self.family.tool().to_owned()];
        if self.table != "filter" {
            words.extend(["-t".to_owned(), self.table.clone()]);
        }
        words.extend(self.words.iter().map(|w| shell_quote(w)));
        words.join(" ")
    }
}

/// `word`, quoted for a POSIX shell when it needs it.
#[must_use]
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:,=+@!%".contains(c))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// `translation` with its deletions planned again for a policy that lets through `allowed`
/// (the policy in force, which may let through more than the printed config: the rules that
/// stay must not stop what it lets through).
///
/// # Errors
/// As for [`translate`].
pub fn replan(
    ruleset: &Ruleset,
    names: &dyn Names,
    translation: &Translation,
    allowed: &[Term],
) -> Result<Translation, (usize, String)> {
    let mut out = translation.clone();
    out.deletions.clear();
    out.kept.clear();
    let protected: Vec<IpAddr> = presets()
        .into_iter()
        .filter(|(name, _)| out.protect.contains(name))
        .flat_map(|(_, a)| a)
        .collect();
    plan(ruleset, &protected, names, allowed, &mut out)?;
    Ok(out)
}

/// The commands that delete the translated rules, and only those whose deletion leaves every
/// workload the config lets through still let through by what remains (else the operator would
/// lose access they kept), and that judge protected addresses alone (else other traffic's
/// firewall would change).
pub(super) fn plan(
    ruleset: &Ruleset,
    protected: &[IpAddr],
    names: &dyn Names,
    allowed: &[Term],
    out: &mut Translation,
) -> Result<(), (usize, String)> {
    let candidates = candidates(ruleset, protected, out);
    // What the policy lets through must still pass what is left; first try deleting every
    // candidate, then the ones that only ever stop workloads (deleting those widens iptables).
    let still_passes = |deleted: &[usize]| -> Result<bool, (usize, String)> {
        for &address in protected {
            let family = if address.is_ipv4() {
                Family::V4
            } else {
                Family::V6
            };
            if !out.families.contains(&family) {
                continue;
            }
            let mut notes = Notes::default();
            let left = allowed_to(ruleset, family, address, names, &mut notes, deleted)?
                .for_every_unknown()
                .map_err(|message| (0, message))?;
            if !logic::within(allowed, &left).map_err(|m| (0, m))? {
                return Ok(false);
            }
        }
        Ok(true)
    };
    let stops_only = |line: &usize| {
        ruleset
            .rule_at(*line)
            .is_some_and(|(_, _, rule)| matches!(rule.target, Target::Drop | Target::Log))
    };
    let mut deleted = candidates.clone();
    if !still_passes(&deleted)? {
        deleted.retain(stops_only);
        if !still_passes(&deleted)? {
            deleted.clear();
        }
    }
    for line in &candidates {
        if !deleted.contains(line)
            && let Some(reference) = out.translated.iter().find(|r| r.line == *line)
        {
            out.kept.push((
                reference.clone(),
                "rules that stay (not translated) would then stop workloads this config lets \
                 through"
                    .into(),
            ));
        }
    }
    // Built-in chains first, so that a user chain is unreferenced when it is removed.
    let mut order: Vec<&RuleRef> = out
        .translated
        .iter()
        .filter(|r| deleted.contains(&r.line))
        .collect();
    order.sort_by_key(|r| (r.family, r.table.clone(), !is_builtin(ruleset, r), r.line));
    for reference in &order {
        let mut words = vec!["-D".to_owned(), reference.chain.clone()];
        words.extend(reference.args.iter().cloned());
        out.deletions.push(Deletion {
            family: reference.family,
            table: reference.table.clone(),
            words,
        });
    }
    out.deletions.extend(emptied_chains(ruleset, &deleted));
    Ok(())
}

/// The translated rules that may go: seen only by the host's own packets, only to
/// `protected` addresses, and, for a jump, with its whole chain. Records in `out.kept` why the
/// others stay.
fn candidates(ruleset: &Ruleset, protected: &[IpAddr], out: &mut Translation) -> Vec<usize> {
    let confined = confined_rules(ruleset, protected);
    let mut candidates: Vec<usize> = Vec::new();
    for reference in &out.translated {
        let elsewhere = ruleset
            .tables
            .iter()
            .find(|t| t.family == reference.family && t.name == reference.table)
            .and_then(|t| reached_by(t).remove(&reference.chain))
            .unwrap_or_default()
            .into_iter()
            // POSTROUTING sees forwarded packets too.
            .find(|from| from != "OUTPUT");
        if let Some(from) = elsewhere {
            out.kept.push((
                reference.clone(),
                format!(
                    "it (or its chain) also judges packets of {from}, forwarded ones among \
                     them, which imds-guard does not"
                ),
            ));
        } else if confined.contains(&reference.line) {
            candidates.push(reference.line);
        } else {
            out.kept.push((
                reference.clone(),
                "it also judges addresses imds-guard does not protect".into(),
            ));
        }
    }
    let before = candidates.clone();
    // Rules that stay for FORWARD's (or INPUT's) sake go on judging those packets: a jump
    // from OUTPUT into their chain can go without them.
    let shared: Vec<usize> = out.kept.iter().map(|(r, _)| r.line).collect();
    with_whole_chains(ruleset, &mut candidates, &shared);
    for line in before.iter().filter(|l| !candidates.contains(l)) {
        if let Some(reference) = out.translated.iter().find(|r| r.line == *line) {
            out.kept.push((
                reference.clone(),
                "the chain it jumps to holds rules that are not translated".into(),
            ));
        }
    }
    candidates
}

/// Leaves out of `candidates` the jumps to chains not every rule of which goes (or stays, in
/// `shared`, for another built-in chain's sake).
fn with_whole_chains(ruleset: &Ruleset, candidates: &mut Vec<usize>, shared: &[usize]) {
    loop {
        let before = candidates.clone();
        candidates.retain(|line| {
            let Some((table, _, rule)) = ruleset.rule_at(*line) else {
                return false;
            };
            match &rule.target {
                Target::Jump(name) | Target::Goto(name) => table.chain(name).is_some_and(|c| {
                    (c.rules.iter()).all(|r| before.contains(&r.line) || shared.contains(&r.line))
                }),
                _ => true,
            }
        });
        if *candidates == before {
            return;
        }
    }
}

/// `-X` for the user chains the `deleted` lines leave empty and unreferenced.
fn emptied_chains(ruleset: &Ruleset, deleted: &[usize]) -> Vec<Deletion> {
    let mut out = Vec::new();
    for table in &ruleset.tables {
        for chain in table.chains.iter().filter(|c| c.policy.is_none()) {
            let emptied =
                !chain.rules.is_empty() && chain.rules.iter().all(|r| deleted.contains(&r.line));
            let unreferenced = table.chains.iter().all(|c| {
                c.rules.iter().all(|r| match &r.target {
                    Target::Jump(n) | Target::Goto(n) if *n == chain.name => {
                        deleted.contains(&r.line)
                    }
                    _ => true,
                })
            });
            if emptied && unreferenced {
                out.push(Deletion {
                    family: table.family,
                    table: table.name.clone(),
                    words: vec!["-X".into(), chain.name.clone()],
                });
            }
        }
    }
    out
}

fn is_builtin(ruleset: &Ruleset, reference: &RuleRef) -> bool {
    ruleset
        .tables
        .iter()
        .find(|t| t.family == reference.family && t.name == reference.table)
        .and_then(|t| t.chain(&reference.chain))
        .is_some_and(|c| c.policy.is_some())
}

/// The rules that see only packets to `protected` addresses: by their own `-d`, or because
/// every rule that jumps to their chain does.
fn confined_rules(ruleset: &Ruleset, protected: &[IpAddr]) -> BTreeSet<usize> {
    let mut confined = BTreeSet::new();
    for table in &ruleset.tables {
        // User chains whose every caller is confined; start from all and take away.
        let mut chains: BTreeSet<&str> = (table.chains.iter())
            .filter(|c| c.policy.is_none())
            .map(|c| c.name.as_str())
            .collect();
        loop {
            let callers_confined = |name: &str| {
                let mut callers = table.chains.iter().flat_map(|c| {
                    c.rules.iter().filter_map(move |r| match &r.target {
                        Target::Jump(n) | Target::Goto(n) if n == name => Some((c, r)),
                        _ => None,
                    })
                });
                let mut any = false;
                let all = callers.all(|(c, r)| {
                    any = true;
                    has_confined_destination(r, protected) || chains.contains(c.name.as_str())
                });
                any && all
            };
            let next: BTreeSet<&str> = chains
                .iter()
                .copied()
                .filter(|name| callers_confined(name))
                .collect();
            if next == chains {
                break;
            }
            chains = next;
        }
        for chain in &table.chains {
            for rule in &chain.rules {
                if has_confined_destination(rule, protected) || chains.contains(chain.name.as_str())
                {
                    confined.insert(rule.line);
                }
            }
        }
    }
    confined
}

/// Whether `rule` matches only packets to `protected` addresses: a `-d` whose every prefix
/// holds one of them alone.
fn has_confined_destination(rule: &Rule, protected: &[IpAddr]) -> bool {
    rule.matches.iter().any(|m| match m {
        Match::Destination {
            prefixes,
            negated: false,
        } => prefixes
            .iter()
            .all(|p| p.is_host() && protected.contains(&p.address)),
        _ => false,
    })
}

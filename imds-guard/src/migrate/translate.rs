//! iptables rules → the workloads they let through to each protected address → imds-guard
//! rules, the rules translated and not, and the commands that delete the translated ones.
//!
//! A locally made packet crosses `OUTPUT` in the raw, mangle, filter and security tables, then
//! mangle's `POSTROUTING`; it gets through when each lets it. Each chain is walked as iptables
//! does (first match decides, jumps and gotos into user chains, `RETURN`, the policy at the
//! end) into a formula over what imds-guard can judge: uid, primary gid, cgroup. A condition it
//! cannot judge (a port, a mark, an interface) is an unknown, and only what holds however it
//! turns out is kept: the translation never lets through a workload the rules might have
//! stopped, and names each rule it could not translate, with why.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use imds_guard_common::imds::{IMDS_V4, IMDS_V6};

use super::{
    delete::Deletion,
    logic::{self, Atom, Formula, IdSet, Term},
    save::{Chain, Family, Ids, Match, Rule, Ruleset, Table, Target},
};

/// The addresses `protect` presets name, by preset, as the config reads them.
#[must_use]
pub fn presets() -> [(&'static str, Vec<IpAddr>); 3] {
    [
        (
            "imds",
            vec![
                IpAddr::V4(Ipv4Addr::from(IMDS_V4)),
                IpAddr::V6(Ipv6Addr::from(IMDS_V6)),
            ],
        ),
        (
            "ecs-credentials",
            vec![IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2))],
        ),
        (
            "eks-pod-identity",
            vec![
                IpAddr::V4(Ipv4Addr::new(169, 254, 170, 23)),
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)),
            ],
        ),
    ]
}

/// A workload set the config cannot hold more of than this many uids (or gids) rules.
pub const MAX_IDS_PER_TERM: u64 = 1024;

/// The chains a locally made packet crosses, by table, in order.
const OUTPUT_PATH: &[(&str, &str)] = &[
    ("raw", "OUTPUT"),
    ("mangle", "OUTPUT"),
    ("filter", "OUTPUT"),
    ("security", "OUTPUT"),
    ("mangle", "POSTROUTING"),
];

/// One rule, where it is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuleRef {
    /// Its line in the input.
    pub line: usize,
    /// Its family.
    pub family: Family,
    /// Its table.
    pub table: String,
    /// Its chain.
    pub chain: String,
    /// Its words after `-A CHAIN`.
    pub args: Vec<String>,
}

/// A rule that bears on a protected address and that the policy does not carry.
#[derive(Clone, Debug)]
pub struct Untranslated {
    /// The rule.
    pub rule: RuleRef,
    /// Why: the condition or target imds-guard has no counterpart for, and what the translation
    /// did instead.
    pub reason: String,
}

/// Everything the rules say, translated.
#[derive(Clone, Debug, Default)]
pub struct Translation {
    /// The families the input had rules of.
    pub families: Vec<Family>,
    /// The protected addresses the rules stop some workload from reaching.
    pub covered: Vec<IpAddr>,
    /// The other protected addresses: what is wrong with each.
    pub uncovered: Vec<(IpAddr, String)>,
    /// The `protect` entries the config needs: presets, `imds` always.
    pub protect: Vec<&'static str>,
    /// The workloads the config lets through, one rule each.
    pub allowed: Vec<Term>,
    /// Workloads the rules let through that the config cannot name, and why.
    pub lost: Vec<(Term, String)>,
    /// The workloads the rules may have let through to every protected address (under some
    /// value of the conditions imds-guard cannot judge): a policy that lets through more lets
    /// through what the rules stopped.
    pub possible: Vec<Term>,
    /// Workloads the rules let through to these addresses only under conditions imds-guard
    /// cannot judge (a port, an interface): the config does not let them through.
    pub partial: Vec<(Term, Vec<IpAddr>)>,
    /// Other things the reader must know: addresses the rules treat differently, notices of
    /// the tools.
    pub warnings: Vec<String>,
    /// The rules translated (they bear on a protected address and the config carries them).
    pub translated: Vec<RuleRef>,
    /// The rules that bear on a protected address and are not translated.
    pub untranslated: Vec<Untranslated>,
    /// How many rules bear on no protected address (left alone).
    pub unrelated: usize,
    /// The commands that delete the translated rules, when deleting them changes nothing but
    /// who enforces.
    pub deletions: Vec<Deletion>,
    /// Translated rules kept, and why.
    pub kept: Vec<(RuleRef, String)>,
}

/// Looks up user and group names (`--uid-owner nobody`).
pub trait Names {
    /// The uid of user `name`.
    fn uid(&self, name: &str) -> Option<u32>;
    /// The gid of group `name`.
    fn gid(&self, name: &str) -> Option<u32>;
}

/// This host's user and group databases.
pub struct HostNames;

impl Names for HostNames {
    fn uid(&self, name: &str) -> Option<u32> {
        nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    }
    fn gid(&self, name: &str) -> Option<u32> {
        nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    }
}

/// Translates `ruleset`.
///
/// # Errors
/// `(line, message)` for a name this host does not know, a jump loop, or rules too complex to
/// translate.
pub fn translate(ruleset: &Ruleset, names: &dyn Names) -> Result<Translation, (usize, String)> {
    let mut out = Translation {
        families: ruleset.families(),
        warnings: ruleset.notices.clone(),
        ..Translation::default()
    };
    let known: Vec<IpAddr> = presets().into_iter().flat_map(|(_, a)| a).collect();
    let mut notes = Notes::default();
    let allowed_by_address = judge_addresses(ruleset, &known, names, &mut notes, &mut out)?;

    // One set of rules for every protected address: what reached each of them (every
    // workload reached the addresses the rules did not cover).
    let mut allowed = vec![Term::any()];
    for terms in allowed_by_address.values() {
        allowed = logic::formula_of(&allowed)
            .and(logic::formula_of(terms))
            .terms()
            .map_err(|message| (0, message))?;
    }
    let distinct: BTreeSet<&Vec<Term>> = allowed_by_address.values().collect();
    if distinct.len() > 1 {
        let per_address: Vec<String> = allowed_by_address
            .iter()
            .map(|(address, terms)| format!("{address}: {}", describe_terms(terms)))
            .collect();
        out.warnings.push(format!(
            "the rules let different workloads reach different addresses ({}); imds-guard's \
             rules hold for every protected address, so the config lets through only what \
             reached all of them",
            per_address.join("; ")
        ));
    }
    for term in allowed {
        match expressible(&term) {
            Ok(rules) => out.allowed.extend(rules),
            Err(why) => out.lost.push((term, why)),
        }
    }

    out.protect = presets()
        .into_iter()
        .filter(|(name, addresses)| {
            *name == "imds" || addresses.iter().any(|a| out.covered.contains(a))
        })
        .map(|(name, _)| name)
        .collect();
    let protected: Vec<IpAddr> = presets()
        .into_iter()
        .filter(|(name, _)| out.protect.contains(name))
        .flat_map(|(_, a)| a)
        .collect();
    // Only the addresses the config protects are worth a warning: the IMDS addresses always,
    // the others when their preset's twin was covered.
    out.uncovered
        .retain(|(address, _)| protected.contains(address));

    classify(ruleset, &known, &protected, &notes, &mut out);
    let allowed = out.allowed.clone();
    super::delete::plan(ruleset, &protected, names, &allowed, &mut out)?;
    Ok(out)
}

/// For each `known` address the rules cover: the workloads they let reach it whatever the
/// conditions imds-guard cannot judge. Records in `out` the addresses not covered, what was let
/// through only under such conditions, and what may have reached every address.
fn judge_addresses(
    ruleset: &Ruleset,
    known: &[IpAddr],
    names: &dyn Names,
    notes: &mut Notes,
    out: &mut Translation,
) -> Result<BTreeMap<IpAddr, Vec<Term>>, (usize, String)> {
    // Per protected address: the workloads let through, when the rules stop someone.
    let mut allowed_by_address: BTreeMap<IpAddr, Vec<Term>> = BTreeMap::new();
    // What may have reached every covered address, whatever the unknowns.
    let mut possible = vec![Term::any()];
    for &address in known {
        let family = if address.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        };
        if !out.families.contains(&family) {
            out.uncovered.push((
                address,
                format!(
                    "no {}-save output was read: nothing stopped any workload from reaching it",
                    family.tool()
                ),
            ));
            continue;
        }
        let allowed = allowed_to(ruleset, family, address, names, notes, &[])?;
        let terms = allowed
            .for_every_unknown()
            .map_err(|message| (0, format!("{address}: {message}")))?;
        let imds = presets()[0].1.contains(&address);
        if terms == [Term::any()] {
            out.uncovered.push((
                address,
                format!(
                    "the {} rules stop no workload from reaching it",
                    family.tool()
                ),
            ));
        } else if !imds && !named(ruleset, family, address) {
            // A default-deny chain or a rule for every address stops it: those stay (chain
            // policies and rules for other addresses are never deleted), and one set of rules
            // for every protected address would let through only what reached all of them.
            out.uncovered.push((
                address,
                format!(
                    "only {} rules for every address stop workloads from reaching it, and \
                     they stay: add its preset to `protect` if imds-guard should guard it",
                    family.tool()
                ),
            ));
        } else {
            // What the rules let through only under conditions imds-guard cannot judge.
            let maybe = allowed
                .for_some_unknown()
                .map_err(|message| (0, format!("{address}: {message}")))?;
            possible = logic::formula_of(&possible)
                .and(logic::formula_of(&maybe))
                .terms()
                .map_err(|message| (0, message))?;
            let partial = logic::difference(&maybe, &terms).map_err(|message| (0, message))?;
            for term in partial {
                if !out.partial.iter().any(|(t, _)| *t == term) {
                    out.partial.push((term, vec![address]));
                } else if let Some((_, addresses)) =
                    out.partial.iter_mut().find(|(t, _)| *t == term)
                {
                    addresses.push(address);
                }
            }
            out.covered.push(address);
            allowed_by_address.insert(address, terms);
        }
    }

    out.possible = possible;
    Ok(allowed_by_address)
}

/// Whether a rule of `family` names `address` in its `-d` (as opposed to reaching it by
/// matching everything).
fn named(ruleset: &Ruleset, family: Family, address: IpAddr) -> bool {
    (ruleset.tables.iter())
        .filter(|t| t.family == family)
        .flat_map(|t| t.chains.iter().flat_map(|c| &c.rules))
        .any(|r| names(r, address))
}

/// Whether `rule`'s `-d` names `address`.
fn names(rule: &Rule, address: IpAddr) -> bool {
    rule.matches.iter().any(|m| match m {
        Match::Destination {
            prefixes,
            negated: false,
        } => prefixes.iter().any(|p| p.len > 0 && p.contains(address)),
        _ => false,
    })
}

/// What walking the chains learnt: the lines whose conditions or targets imds-guard cannot
/// judge, with why.
#[derive(Default)]
pub(super) struct Notes {
    unknown: BTreeMap<usize, BTreeSet<String>>,
}

/// The workloads `family`'s rules let reach `address` (unknowns left in), with the rules at
/// `deleted` lines left out: a connection gets through when its first packet (`NEW`) and the
/// ones after it (`ESTABLISHED`; `UNTRACKED` too where a raw rule stops tracking) all do.
pub(super) fn allowed_to(
    ruleset: &Ruleset,
    family: Family,
    address: IpAddr,
    names: &dyn Names,
    notes: &mut Notes,
    deleted: &[usize],
) -> Result<Formula, (usize, String)> {
    let untracked = (ruleset.tables.iter())
        .filter(|t| t.family == family && t.name == "raw")
        .flat_map(|t| t.chains.iter().flat_map(|c| &c.rules))
        .any(|r| matches!(&r.target, Target::Other(name) if name == "CT" || name == "NOTRACK"));
    let states: &[&'static str] = if untracked {
        &["NEW", "ESTABLISHED", "UNTRACKED"]
    } else {
        &["NEW", "ESTABLISHED"]
    };
    let mut unknowns = BTreeMap::new();
    let mut allowed = Formula::True;
    for state in states {
        let mut walk = Walk {
            address,
            state,
            loopback_impossible: loopback_impossible(ruleset, family, address),
            before_conntrack: false,
            names,
            notes: &mut *notes,
            deleted,
            unknowns: &mut unknowns,
            chains: BTreeMap::new(),
            active: Vec::new(),
        };
        for (table_name, chain_name) in OUTPUT_PATH {
            let Some(table) =
                (ruleset.tables.iter()).find(|t| t.family == family && t.name == *table_name)
            else {
                continue;
            };
            let Some(chain) = table.chain(chain_name) else {
                continue;
            };
            let outcome = walk.chain(table, chain)?;
            let passes = match chain.policy {
                Some(Target::Drop) => outcome.accept,
                _ => outcome.drop.negate(),
            };
            allowed = allowed.and(passes);
        }
    }
    Ok(allowed)
}

/// Whether packets to `address` never leave by the loopback interface: true of the IMDS
/// addresses (IMDS is never on the host) unless a nat rule rewrites their destination; never
/// assumed of the ECS and EKS addresses, whose agents serve them on the host.
fn loopback_impossible(ruleset: &Ruleset, family: Family, address: IpAddr) -> bool {
    let imds = presets()[0].1.contains(&address);
    imds && !(ruleset.tables.iter())
        .filter(|t| t.family == family && t.name == "nat")
        .flat_map(|t| t.chains.iter().flat_map(|c| &c.rules))
        .filter(|r| matches!(&r.target, Target::Other(t) if matches!(t.as_str(), "DNAT" | "REDIRECT" | "NETMAP")))
        .any(|r| rewrites(r, address) || packet_may_match(r, address, "", false))
}

/// Whether `rule` (of the nat table) rewrites destinations to `address`.
fn rewrites(rule: &Rule, address: IpAddr) -> bool {
    let Some(to) = &rule.rewrites_to else {
        return false;
    };
    // `a.b.c.d[-e.f.g.h][:port[-port]]`, `[v6][:port]`, `v6`, or a prefix (`NETMAP --to`).
    let hosts = to.trim_start_matches('[');
    let hosts = match hosts.split_once(']') {
        Some((inside, _)) => inside,
        None if address.is_ipv4() => hosts.split(':').next().unwrap_or(hosts),
        None => hosts,
    };
    if hosts.contains('/') {
        // NETMAP's prefix.
        return super::save::parse_prefix(hosts).map_or(true, |p| p.contains(address));
    }
    let (low, high) = hosts.split_once('-').unwrap_or((hosts, hosts));
    match (low.parse::<IpAddr>(), high.parse::<IpAddr>()) {
        (Ok(low), Ok(high)) => low <= address && address <= high,
        // Unreadable: assume it may.
        _ => true,
    }
}

/// Whether a `--state`/`--ctstate` list holds for a packet in `state`: `None` when it depends
/// on the connection's address translation (`SNAT`, `DNAT`).
fn state_matches(states: &[String], negated: bool, state: &str) -> Option<bool> {
    let listed = states.iter().any(|s| s == state);
    let translation = states.iter().any(|s| s == "SNAT" || s == "DNAT");
    match (listed, translation) {
        (true, _) => Some(!negated),
        (false, false) => Some(negated),
        (false, true) => None,
    }
}

/// When a chain accepts and when it drops; otherwise it falls through (returns).
#[derive(Clone)]
struct Outcome {
    accept: Formula,
    drop: Formula,
}

struct Walk<'a> {
    address: IpAddr,
    /// The connection state of the packet judged: `NEW`, `ESTABLISHED` or `UNTRACKED`.
    state: &'static str,
    /// Packets to the address never leave by loopback (see [`loopback_impossible`]).
    loopback_impossible: bool,
    /// The chain walked is the raw table's, which runs before connection tracking: states
    /// cannot be told there.
    before_conntrack: bool,
    names: &'a dyn Names,
    notes: &'a mut Notes,
    deleted: &'a [usize],
    /// Shared by the walks of one formula: the unknown each condition is, by its text and, for
    /// a condition that may differ between the packets of one connection, the state.
    unknowns: &'a mut BTreeMap<(String, &'static str), usize>,
    /// Chains walked, by table and name: a chain jumped to twice is the same conditions.
    chains: BTreeMap<(String, String), Outcome>,
    active: Vec<String>,
}

impl Walk<'_> {
    fn chain(&mut self, table: &Table, chain: &Chain) -> Result<Outcome, (usize, String)> {
        self.before_conntrack = table.name == "raw";
        let key = (table.name.clone(), chain.name.clone());
        if let Some(done) = self.chains.get(&key) {
            return Ok(done.clone());
        }
        if self.active.contains(&chain.name) {
            return Err((
                table.line,
                format!("chain {} jumps back into itself", chain.name),
            ));
        }
        self.active.push(chain.name.clone());
        // Two reaches: packets not yet dropped (for what the chain accepts) and not yet
        // accepted (for what it drops). Each leaves out only what decides the other way, so a
        // list of ACCEPTs stays a list, not every combination of their negations.
        let mut accept = Formula::False;
        let mut drop = Formula::False;
        let mut reach_accept = Formula::True;
        let mut reach_drop = Formula::True;
        for rule in &chain.rules {
            if self.deleted.contains(&rule.line) {
                continue;
            }
            match &rule.target {
                Target::Other(name) if !matches!(name.as_str(), "QUEUE" | "NFQUEUE") => {
                    if packet_may_match(rule, self.address, "", false) {
                        self.note(
                            rule.line,
                            format!(
                                "-j {name}: imds-guard has no counterpart (it does not decide)"
                            ),
                        );
                    }
                    continue;
                }
                // Records or counts, decides nothing: its conditions do not matter.
                Target::Log | Target::None => continue,
                _ => {}
            }
            let matched = self.rule_matches(rule)?;
            if matched == Formula::False {
                continue;
            }
            match &rule.target {
                Target::Accept => {
                    accept = accept.or(reach_accept.clone().and(matched.clone()));
                    reach_drop = reach_drop.and(matched.negate());
                }
                Target::Drop => {
                    drop = drop.or(reach_drop.clone().and(matched.clone()));
                    reach_accept = reach_accept.and(matched.negate());
                }
                Target::Jump(name) | Target::Goto(name) => {
                    let target = table
                        .chain(name)
                        .ok_or_else(|| (rule.line, format!("-j {name}: no such chain")))?;
                    let inner = self.chain(table, target)?;
                    accept = accept.or(reach_accept
                        .clone()
                        .and(matched.clone())
                        .and(inner.accept.clone()));
                    drop = drop.or(reach_drop
                        .clone()
                        .and(matched.clone())
                        .and(inner.drop.clone()));
                    if matches!(rule.target, Target::Goto(_)) {
                        // Decided there, or back to this chain's caller: not here.
                        reach_accept = reach_accept.and(matched.clone().negate());
                        reach_drop = reach_drop.and(matched.negate());
                    } else {
                        reach_accept = reach_accept.and(matched.clone().and(inner.drop).negate());
                        reach_drop = reach_drop.and(matched.and(inner.accept).negate());
                    }
                }
                Target::Other(name) => {
                    // A program in user space decides (QUEUE, NFQUEUE): either way.
                    self.note(rule.line, format!("-j {name}: a program decides"));
                    let verdict = self.unknown(&format!("-j {name} of line {}", rule.line), true);
                    accept = accept.or(reach_accept
                        .clone()
                        .and(matched.clone())
                        .and(verdict.clone()));
                    drop = drop.or(reach_drop
                        .clone()
                        .and(matched.clone())
                        .and(verdict.negate()));
                    reach_accept = reach_accept.and(matched.clone().negate());
                    reach_drop = reach_drop.and(matched.negate());
                }
                Target::Return => {
                    reach_accept = reach_accept.and(matched.clone().negate());
                    reach_drop = reach_drop.and(matched.negate());
                }
                Target::Log | Target::None => {}
            }
        }
        self.active.pop();
        let outcome = Outcome { accept, drop };
        self.chains.insert(key, outcome.clone());
        Ok(outcome)
    }

    /// When `rule`'s conditions hold for a packet to the address.
    fn rule_matches(&mut self, rule: &Rule) -> Result<Formula, (usize, String)> {
        // The conditions on the packet alone first: a rule for other addresses adds nothing.
        let state = if self.before_conntrack {
            ""
        } else {
            self.state
        };
        if !packet_may_match(rule, self.address, state, self.loopback_impossible) {
            return Ok(Formula::False);
        }
        let mut formula = Formula::True;
        // What imds-guard cannot judge of this rule: one unknown per condition, the same for
        // the same condition in every rule (`--dport 80` here and `! --dport 80` there never
        // both hold), per state for a condition that may differ between the packets of one
        // connection (a mark, a rate, a length).
        let mut whys: Vec<String> = Vec::new();
        for m in &rule.matches {
            let (atom, negated) = match m {
                Match::Destination { .. } => continue,
                Match::OutInterface { name, .. }
                    if is_loopback(name) && self.loopback_impossible =>
                {
                    continue;
                }
                Match::ConnState { states, negated } if self.before_conntrack => {
                    let text = format!("--ctstate {}", states.join(","));
                    whys.push(format!(
                        "{}{text} in the raw table: before connection tracking",
                        not(*negated)
                    ));
                    (self.unknown(&text, true), *negated)
                }
                Match::ConnState { states, negated } => {
                    if state_matches(states, *negated, self.state).is_some() {
                        continue;
                    }
                    let text = format!("--ctstate {}", states.join(","));
                    whys.push(format!(
                        "{}{text}: a connection's address translation",
                        not(*negated)
                    ));
                    (self.unknown(&text, false), *negated)
                }
                Match::OutInterface { name, negated } => {
                    let text = format!("-o {name}");
                    whys.push(format!("{}{text}: an outgoing interface", not(*negated)));
                    (self.unknown(&text, false), *negated)
                }
                Match::Other {
                    text,
                    negated,
                    what,
                } => {
                    whys.push(format!("{}{text}: {what}", not(*negated)));
                    (
                        self.unknown(text, !CONNECTION_CONSTANT.contains(what)),
                        *negated,
                    )
                }
                Match::UidOwner { ids, negated } => (
                    Formula::Atom(Atom::Uid(self.ids(ids, rule.line, true)?)),
                    *negated,
                ),
                Match::GidOwner {
                    ids,
                    suppl_groups,
                    negated,
                } => {
                    let mut gid = Formula::Atom(Atom::Gid(self.ids(ids, rule.line, false)?));
                    if *suppl_groups {
                        whys.push(
                            "--suppl-groups: supplementary groups (imds-guard matches the \
                             primary gid)"
                                .into(),
                        );
                        // Each task's own groups: one unknown for this rule.
                        let groups = format!("--suppl-groups of line {}", rule.line);
                        gid = gid.or(self.unknown(&groups, false));
                    }
                    (gid, *negated)
                }
                Match::CgroupPath { path, negated } => {
                    (Formula::Atom(Atom::Cgroup(path.clone())), *negated)
                }
            };
            formula = formula.and(if negated { atom.negate() } else { atom });
        }
        for why in whys {
            self.note(rule.line, why);
        }
        Ok(formula)
    }

    fn ids(&self, ids: &Ids, line: usize, user: bool) -> Result<IdSet, (usize, String)> {
        match ids {
            Ids::Range(low, high) => Ok(IdSet::range(*low, *high)),
            Ids::Name(name) => {
                let id = if user {
                    self.names.uid(name)
                } else {
                    self.names.gid(name)
                };
                id.map(|id| IdSet::range(id, id)).ok_or_else(|| {
                    (
                        line,
                        format!(
                            "{} {name:?} does not exist on this host: run migrate where the \
                             rules were saved, or write the number",
                            if user { "user" } else { "group" }
                        ),
                    )
                })
            }
        }
    }

    /// The unknown condition `text` (as written, without `!`): the same for every packet of a
    /// connection (`per_packet` false: a port, an interface), or one per state.
    fn unknown(&mut self, text: &str, per_packet: bool) -> Formula {
        let key = (text.to_owned(), if per_packet { self.state } else { "" });
        let next = self.unknowns.len();
        let n = *self.unknowns.entry(key).or_insert(next);
        Formula::Atom(Atom::Unknown(n))
    }

    fn note(&mut self, line: usize, why: String) {
        self.notes.unknown.entry(line).or_default().insert(why);
    }
}

/// `! ` for a negated condition.
fn not(negated: bool) -> &'static str {
    if negated { "! " } else { "" }
}

/// Conditions imds-guard cannot judge that hold alike for every packet of a connection.
const CONNECTION_CONSTANT: &[&str] = &[
    "ports",
    "a protocol",
    "a source address",
    "an incoming interface",
    "a process owner",
    "a cgroup v1 net_cls class",
];

/// `lo`, or a `+` pattern only loopback names match.
fn is_loopback(name: &str) -> bool {
    name == "lo"
}

/// The rules a uid/gid/cgroup term needs: one per uid (or gid), with its cgroup conditions.
fn expressible(term: &Term) -> Result<Vec<Term>, String> {
    let what = describe_term(term);
    if !term.uid.is_all() && !term.gid.is_all() {
        return Err(format!(
            "{what}: an imds-guard rule names a uid or a gid, not both"
        ));
    }
    if let Some(path) = term
        .cgroup
        .iter()
        .chain(&term.not_cgroup)
        .find(|p| p.contains(|c: char| "*?[]{}\\".contains(c)))
    {
        return Err(format!(
            "{what}: the cgroup path {path:?} has characters imds-guard reads as a pattern"
        ));
    }
    let (ids, set_uid) = if term.uid.is_all() {
        (&term.gid, false)
    } else {
        (&term.uid, true)
    };
    if ids.is_all() {
        return Ok(vec![term.clone()]);
    }
    if ids.len() > MAX_IDS_PER_TERM {
        return Err(format!(
            "{what}: imds-guard rules list who may, one {} per rule, and this is {} of them",
            if set_uid { "uid" } else { "gid" },
            ids.len()
        ));
    }
    Ok(ids
        .ranges()
        .iter()
        .flat_map(|&(low, high)| low..=high)
        .map(|id| {
            let mut rule = term.clone();
            if set_uid {
                rule.uid = IdSet::range(id, id);
            } else {
                rule.gid = IdSet::range(id, id);
            }
            rule
        })
        .collect())
}

/// `uid 1000-1010, cgroup /system.slice (not /system.slice/x)`.
#[must_use]
pub fn describe_term(term: &Term) -> String {
    let ids = |set: &IdSet| {
        let complement = set.complement();
        let (set, not) = if complement.len() < set.len() {
            (complement, "not ")
        } else {
            (set.clone(), "")
        };
        let list: Vec<String> = set
            .ranges()
            .iter()
            .map(|&(low, high)| {
                if low == high {
                    low.to_string()
                } else {
                    format!("{low}-{high}")
                }
            })
            .collect();
        format!("{not}{}", list.join(","))
    };
    let mut parts = Vec::new();
    if !term.uid.is_all() {
        parts.push(format!("uid {}", ids(&term.uid)));
    }
    if !term.gid.is_all() {
        parts.push(format!("gid {}", ids(&term.gid)));
    }
    if let Some(cgroup) = &term.cgroup {
        parts.push(format!("cgroup {cgroup}"));
    }
    for excluded in &term.not_cgroup {
        parts.push(format!("not cgroup {excluded}"));
    }
    if parts.is_empty() {
        "every workload".into()
    } else {
        parts.join(", ")
    }
}

/// `uid 0 | gid 50`, or `no workload`.
fn describe_terms(terms: &[Term]) -> String {
    if terms.is_empty() {
        return "no workload".into();
    }
    terms
        .iter()
        .map(describe_term)
        .collect::<Vec<_>>()
        .join(" | ")
}

fn rule_ref(table: &Table, chain: &Chain, rule: &Rule) -> RuleRef {
    RuleRef {
        line: rule.line,
        family: table.family,
        table: table.name.clone(),
        chain: chain.name.clone(),
        args: rule.args.clone(),
    }
}

/// Sorts every rule that bears on an address the config protects into translated or not (and
/// lists the nat rules that bear on any `known` one: they stay).
fn classify(
    ruleset: &Ruleset,
    known: &[IpAddr],
    protected: &[IpAddr],
    notes: &Notes,
    out: &mut Translation,
) {
    for table in &ruleset.tables {
        let reached_by = reached_by(table);
        for chain in &table.chains {
            for rule in &chain.rules {
                let family = table.family;
                let relevant = if table.name == "nat" {
                    known
                } else {
                    protected
                };
                let addresses = || relevant.iter().copied().filter(|a| family.holds(*a));
                let rewrites_to_protected =
                    table.name == "nat" && addresses().any(|a| rewrites(rule, a));
                let from = reached_by.get(&chain.name).cloned().unwrap_or_default();
                let on_output_path = table.name != "nat"
                    && (OUTPUT_PATH.iter()).any(|(t, c)| *t == table.name && from.contains(*c));
                // A rule the host's connections cross bears on the addresses it may match; any
                // other (forwarded packets, address translation) only where it names one: the
                // rest is the host's firewall, which migrate leaves alone.
                let bears = rewrites_to_protected
                    || addresses().any(|a| {
                        if on_output_path {
                            packet_may_match(rule, a, "", loopback_impossible(ruleset, family, a))
                        } else {
                            names(rule, a)
                        }
                    });
                if !bears {
                    out.unrelated += 1;
                    continue;
                }
                let reference = rule_ref(table, chain, rule);
                let reason = if rewrites_to_protected {
                    Some(
                        "it rewrites destinations to a protected address: imds-guard judges \
                         the rewritten packets at its packet hook (cgroup_skb/egress), not by \
                         this rule; keep it"
                            .to_owned(),
                    )
                } else if table.name == "nat" {
                    Some(
                        "the nat table rewrites addresses, it does not decide who may connect \
                         (the ECS agent's credential redirect lives here): keep it"
                            .to_owned(),
                    )
                } else if from.is_empty() {
                    Some(format!(
                        "never reached: no rule jumps to chain {}",
                        chain.name
                    ))
                } else if !on_output_path && from.contains("FORWARD") {
                    Some(
                        "it judges forwarded packets (containers behind a bridge, pods), not \
                         the host's own connections: imds-guard judges a container's connects \
                         by its cgroup, and this config lets no container through \
                         (containers = false); keep the rule until you have checked that"
                            .to_owned(),
                    )
                } else if !on_output_path {
                    let chains: Vec<&str> = from.iter().map(String::as_str).collect();
                    Some(format!(
                        "it judges packets arriving here ({}), not the host's own connections: \
                         keep it",
                        chains.join(", ")
                    ))
                } else {
                    notes.unknown.get(&rule.line).map(|whys| {
                        format!(
                            "{} (imds-guard judges every port, protocol and interface of a \
                             protected address alike); translated as if it could match or not, \
                             whichever lets through less",
                            whys.iter().cloned().collect::<Vec<_>>().join("; ")
                        )
                    })
                };
                match reason {
                    Some(reason) => out.untranslated.push(Untranslated {
                        rule: reference,
                        reason,
                    }),
                    None => out.translated.push(reference),
                }
            }
        }
    }
}

/// Whether the packet conditions of `rule` (destination, loopback, connection state) may hold
/// for a packet to `address` in connection `state` (any state: `""`).
fn packet_may_match(rule: &Rule, address: IpAddr, state: &str, loopback_impossible: bool) -> bool {
    rule.matches.iter().all(|m| match m {
        Match::Destination { prefixes, negated } => {
            prefixes.iter().any(|p| p.contains(address)) != *negated
        }
        Match::OutInterface { name, negated } if is_loopback(name) && loopback_impossible => {
            *negated
        }
        Match::ConnState { states, negated } if !state.is_empty() => {
            state_matches(states, *negated, state) != Some(false)
        }
        _ => true,
    })
}

/// For each chain of `table`, the built-in chains whose packets reach it.
pub(super) fn reached_by(table: &Table) -> BTreeMap<String, BTreeSet<String>> {
    let mut reached: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for builtin in table.chains.iter().filter(|c| c.policy.is_some()) {
        let mut stack = vec![builtin.name.clone()];
        let mut seen = BTreeSet::new();
        while let Some(name) = stack.pop() {
            if !seen.insert(name.clone()) {
                continue;
            }
            reached
                .entry(name.clone())
                .or_default()
                .insert(builtin.name.clone());
            if let Some(chain) = table.chain(&name) {
                for rule in &chain.rules {
                    if let Target::Jump(next) | Target::Goto(next) = &rule.target {
                        stack.push(next.clone());
                    }
                }
            }
        }
    }
    reached
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;
    use crate::migrate::{render, save};

    /// The names the fixtures use, whatever this host's databases hold.
    struct Fixed;

    impl Names for Fixed {
        fn uid(&self, name: &str) -> Option<u32> {
            (name == "root").then_some(0)
        }
        fn gid(&self, name: &str) -> Option<u32> {
            (name == "root").then_some(0)
        }
    }

    /// What a translation says, in the words an operator reads.
    #[derive(Debug, PartialEq, Eq)]
    struct Said {
        covered: Vec<&'static str>,
        uncovered: Vec<&'static str>,
        protect: Vec<&'static str>,
        allow: Vec<&'static str>,
        lost: Vec<&'static str>,
        untranslated: Vec<usize>,
        delete: Vec<&'static str>,
    }

    fn translated(file: &str) -> Translation {
        let text = std::fs::read_to_string(format!(
            "{}/testdata/migrate/{file}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let ruleset = save::parse(&text, file).unwrap();
        translate(&ruleset, &Fixed).unwrap()
    }

    fn check(file: &str, expected: &Said) {
        let t = translated(file);
        let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let strings = |v: &mut dyn Iterator<Item = String>| v.collect::<Vec<_>>();
        let got = (
            strings(&mut t.covered.iter().map(ToString::to_string)),
            strings(&mut t.uncovered.iter().map(|(a, _)| a.to_string())),
            strings(&mut t.protect.iter().map(|p| (*p).to_owned())),
            strings(&mut t.allowed.iter().map(describe_term)),
            strings(&mut t.lost.iter().map(|(term, _)| describe_term(term))),
            t.untranslated
                .iter()
                .map(|u| u.rule.line)
                .collect::<Vec<_>>(),
            strings(&mut t.deletions.iter().map(Deletion::command)),
        );
        let want = (
            owned(&expected.covered),
            owned(&expected.uncovered),
            owned(&expected.protect),
            owned(&expected.allow),
            owned(&expected.lost),
            expected.untranslated.clone(),
            owned(&expected.delete),
        );
        assert_eq!(got, want, "{file}");
        if !file.starts_with("port") {
            assert!(t.partial.is_empty(), "{file}: {:?}", t.partial);
        }
        // The config it prints loads as is, with one rule per allowed workload (or none).
        let config = render::config(&t, file);
        let loaded =
            crate::config::Config::from_toml(None, &config, &crate::config::Overrides::default())
                .unwrap_or_else(|err| panic!("{file}: the config does not load: {err}\n{config}"));
        assert_eq!(loaded.mode, crate::config::Mode::Enforce, "{file}");
        assert_eq!(loaded.allow.len(), t.allowed.len(), "{file}:\n{config}");
        assert!(
            !loaded.uses_built_in_default(),
            "{file}: the default would widen it"
        );
    }

    const IMDS6: &str = "fd00:ec2::254";

    #[test]
    fn the_seeds_root_only_rule() {
        check(
            "seed.rules",
            &Said {
                covered: vec!["169.254.169.254"],
                // The classic gap: no ip6tables rule.
                uncovered: vec![IMDS6],
                protect: vec!["imds"],
                allow: vec!["uid 0"],
                lost: vec![],
                untranslated: vec![],
                delete: vec![
                    "iptables -D OUTPUT -d 169.254.169.254/32 -m owner ! --uid-owner 0 -j DROP",
                ],
            },
        );
        check(
            "seed-both.rules",
            &Said {
                covered: vec!["169.254.169.254", IMDS6],
                uncovered: vec![],
                protect: vec!["imds"],
                allow: vec!["uid 0"],
                lost: vec![],
                untranslated: vec![],
                delete: vec![
                    "iptables -D OUTPUT -d 169.254.169.254/32 -m owner ! --uid-owner 0 -j DROP",
                    "ip6tables -D OUTPUT -d fd00:ec2::254/128 -m owner ! --uid-owner 0 -j DROP",
                ],
            },
        );
        // The legacy backend, saved with counters.
        check(
            "legacy-counters.rules",
            &Said {
                covered: vec!["169.254.169.254"],
                uncovered: vec![IMDS6],
                protect: vec!["imds"],
                allow: vec!["uid 0"],
                lost: vec![],
                untranslated: vec![],
                delete: vec![
                    "iptables -D OUTPUT -d 169.254.169.254/32 -m owner ! --uid-owner 0 -j DROP",
                ],
            },
        );
    }

    #[test]
    fn ecs_rules_redirect_and_forward_and_are_kept() {
        check(
            "ecs.rules",
            &Said {
                covered: vec![],
                uncovered: vec!["169.254.169.254", IMDS6],
                protect: vec!["imds"],
                // No host workload was stopped: every one stays let through, containers not.
                allow: vec!["every workload"],
                lost: vec![],
                // The bridge rule that names IMDS and the two nat redirects; the FORWARD jump and
                // the RETURN are the host's firewall, named nowhere.
                untranslated: vec![9, 19, 20],
                delete: vec![],
            },
        );
    }

    #[test]
    fn eks_forward_rule_is_named_not_translated() {
        let t = translated("eks.rules");
        assert_eq!(t.untranslated.len(), 1);
        assert_eq!(t.untranslated[0].rule.line, 6);
        assert!(
            t.untranslated[0].reason.contains("forwarded"),
            "{:?}",
            t.untranslated
        );
        check(
            "eks.rules",
            &Said {
                covered: vec![],
                uncovered: vec!["169.254.169.254", IMDS6],
                protect: vec!["imds"],
                allow: vec!["every workload"],
                lost: vec![],
                untranslated: vec![6],
                delete: vec![],
            },
        );
    }

    #[test]
    fn a_user_chain_with_returns_and_a_log() {
        check(
            "chain.rules",
            &Said {
                covered: vec!["169.254.169.254"],
                uncovered: vec![IMDS6],
                protect: vec!["imds"],
                allow: vec!["uid 0", "gid 27"],
                lost: vec![],
                // The conntrack and loopback ACCEPTs never see a new connection to IMDS.
                untranslated: vec![],
                delete: vec![
                    "iptables -D OUTPUT -d 169.254.169.254/32 -j IMDS",
                    "iptables -D IMDS -m owner --uid-owner 0 -j RETURN",
                    "iptables -D IMDS -m owner --gid-owner 27 -j RETURN",
                    "iptables -D IMDS -j LOG --log-prefix 'imds denied: '",
                    "iptables -D IMDS -j REJECT --reject-with icmp-port-unreachable",
                    "iptables -X IMDS",
                ],
            },
        );
        // The loopback ACCEPT never sees IMDS's packets; the conntrack one sees its later
        // packets, and stays (it judges every address).
        let t = translated("chain.rules");
        assert_eq!(t.unrelated, 1);
        assert_eq!(t.kept.len(), 1, "{:?}", t.kept);
    }

    #[test]
    fn ranges_cgroups_and_both_families() {
        let t = translated("ranges.rules");
        // The cgroup rule is IPv4 only: one set of rules for both addresses drops it, and says so.
        assert!(
            t.warnings.iter().any(|w| w.contains("different workloads")),
            "{:?}",
            t.warnings
        );
        check(
            "ranges.rules",
            &Said {
                covered: vec!["169.254.169.254", IMDS6],
                uncovered: vec![],
                protect: vec!["imds"],
                allow: vec!["uid 0", "uid 1000", "uid 1001", "uid 1002"],
                lost: vec![],
                untranslated: vec![],
                delete: vec![
                    "iptables -D OUTPUT -d 169.254.169.254/32 -m owner --uid-owner 1000-1002 -j ACCEPT",
                    "iptables -D OUTPUT -d 169.254.169.254/32 -m owner --uid-owner 1001 -j ACCEPT",
                    "iptables -D OUTPUT -d 169.254.169.254/32 -m cgroup --path /system.slice/amazon-ssm-agent.service -j ACCEPT",
                    "iptables -D OUTPUT -d 169.254.169.254/32 -m owner ! --uid-owner 0 -j DROP",
                    "ip6tables -D OUTPUT -d fd00:ec2::254/128 -m owner --uid-owner 1000-1002 -j ACCEPT",
                    "ip6tables -D OUTPUT -d fd00:ec2::254/128 -m owner ! --uid-owner 0 -j DROP",
                ],
            },
        );
    }

    #[test]
    fn names_and_the_nft_backends_warning() {
        let t = translated("names-nft.rules");
        assert!(
            t.warnings
                .iter()
                .any(|w| w.contains("iptables-legacy tables present")),
            "{:?}",
            t.warnings
        );
        check(
            "names-nft.rules",
            &Said {
                covered: vec!["169.254.169.254"],
                uncovered: vec![IMDS6],
                protect: vec!["imds"],
                allow: vec!["uid 0", "gid 0"],
                lost: vec![],
                untranslated: vec![],
                delete: vec![
                    "iptables -D OUTPUT -d 169.254.169.254/32 -m owner --uid-owner root -j ACCEPT",
                    "iptables -D OUTPUT -d 169.254.169.254/32 -m owner --gid-owner root -j ACCEPT",
                    "iptables -D OUTPUT -d 169.254.169.254/32 -j DROP",
                ],
            },
        );
    }

    #[test]
    fn a_port_is_named_and_the_narrower_reading_kept() {
        // ACCEPT uid 1000 on TCP port 80, then DROP all but root on TCP port 80: whatever the
        // port, uid 1000 gets through (the same condition decides both rules), root too; the
        // others only on other ports, which the config does not allow. Both rules stay.
        let t = translated("port.rules");
        assert!(
            t.untranslated[0].reason.contains("--dport 80"),
            "{:?}",
            t.untranslated
        );
        let partial: Vec<String> = t
            .partial
            .iter()
            .map(|(term, _)| describe_term(term))
            .collect();
        assert_eq!(partial, ["uid not 0,1000"]);
        check(
            "port.rules",
            &Said {
                covered: vec!["169.254.169.254"],
                uncovered: vec![IMDS6],
                protect: vec!["imds"],
                allow: vec!["uid 0", "uid 1000"],
                lost: vec![],
                untranslated: vec![6, 7],
                delete: vec![],
            },
        );
    }

    #[test]
    fn a_deny_list_cannot_be_said_and_is_not_widened() {
        // iptables stopped uid 33 and gid 1000 and let everyone else through: imds-guard rules
        // say who may, so nothing is let through, and the loss is named.
        check(
            "denylist.rules",
            &Said {
                covered: vec!["169.254.169.254", "169.254.170.2", "169.254.170.23"],
                uncovered: vec![IMDS6, "fd00:ec2::23"],
                protect: vec!["imds", "ecs-credentials", "eks-pod-identity"],
                allow: vec![],
                lost: vec!["uid not 33, gid not 1000"],
                untranslated: vec![],
                // The /16 rule judges other addresses too: it stays.
                delete: vec![
                    "iptables -D OUTPUT -d 169.254.169.254/32 -m owner --uid-owner 33 -j REJECT --reject-with icmp-admin-prohibited",
                ],
            },
        );
    }

    #[test]
    fn deleting_an_accept_that_untranslated_rules_need_is_refused() {
        // The ACCEPT is translated, the port DROP after it is not: deleting the ACCEPT alone
        // would let the DROP stop root on port 80, which the config lets through.
        let text = "# Generated by iptables-save v1.8.9 (nf_tables)\n*filter\n\
                    :INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
                    -A OUTPUT -d 169.254.169.254/32 -m owner --uid-owner 0 -j ACCEPT\n\
                    -A OUTPUT -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DROP\n\
                    -A OUTPUT -d 169.254.169.254/32 -m owner --uid-owner 7 -j DROP\n\
                    COMMIT\n";
        let t = translate(&save::parse(text, "t").unwrap(), &Fixed).unwrap();
        assert_eq!(
            t.allowed.iter().map(describe_term).collect::<Vec<_>>(),
            ["uid 0"]
        );
        assert_eq!(
            t.deletions
                .iter()
                .map(Deletion::command)
                .collect::<Vec<_>>(),
            ["iptables -D OUTPUT -d 169.254.169.254/32 -m owner --uid-owner 7 -j DROP"]
        );
        assert_eq!(t.kept.len(), 1, "{:?}", t.kept);
        assert_eq!(t.kept[0].0.line, 6);
    }

    #[test]
    fn rules_for_every_destination_are_translated_and_kept() {
        // No -d: the rule also stops root-less traffic everywhere; deleting it would change
        // the firewall for other addresses.
        let text = "# Generated by iptables-save v1.8.9 (nf_tables)\n*filter\n\
                    :INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT DROP [0:0]\n\
                    -A OUTPUT -m owner --uid-owner 0 -j ACCEPT\n\
                    -A OUTPUT -m cgroup ! --path /a -m cgroup --path /a/b -j ACCEPT\n\
                    COMMIT\n";
        let t = translate(&save::parse(text, "t").unwrap(), &Fixed).unwrap();
        // The cgroup rule can never match (/a/b is below /a): only uid 0.
        assert_eq!(
            t.allowed.iter().map(describe_term).collect::<Vec<_>>(),
            ["uid 0"]
        );
        assert!(t.deletions.is_empty(), "{:?}", t.deletions);
        assert_eq!(t.kept.len(), 2);
        // The DROP policy stops everyone from reaching ECS's and EKS's addresses too, but no
        // rule names them and the policy stays: the config does not take them over.
        assert_eq!(t.protect, ["imds"]);
        assert_eq!(t.covered, [IpAddr::V4(Ipv4Addr::from(IMDS_V4))]);
    }

    #[test]
    fn unknown_names_are_errors_with_the_line() {
        let text = "# Generated by iptables-save v1.8.9\n*filter\n:OUTPUT ACCEPT [0:0]\n\
                    -A OUTPUT -d 169.254.169.254/32 -m owner ! --uid-owner cwagent -j DROP\nCOMMIT\n";
        let err = translate(&save::parse(text, "t").unwrap(), &Fixed).unwrap_err();
        assert_eq!(err.0, 4);
        assert!(err.1.contains("\"cwagent\" does not exist"), "{}", err.1);
    }

    fn of(rules: &str) -> Translation {
        let text = format!(
            "# Generated by iptables-save v1.8.9 (nf_tables)\n*filter\n:INPUT ACCEPT [0:0]\n\
             :FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n{rules}COMMIT\n"
        );
        translate(&save::parse(&text, "t").unwrap(), &Fixed).unwrap()
    }

    fn allowed(t: &Translation) -> Vec<String> {
        t.allowed.iter().map(describe_term).collect()
    }

    #[test]
    fn a_comment_that_looks_like_an_option_is_a_comment() {
        // iptables-save does not quote `-c`: it is the comment, not counters.
        let t = of(
            "-A OUTPUT -d 169.254.169.254/32 -m owner ! --uid-owner 0 -m comment \
                    --comment -c -j DROP\n",
        );
        assert_eq!(allowed(&t), ["uid 0"]);
        assert_eq!(
            t.deletions
                .iter()
                .map(Deletion::command)
                .collect::<Vec<_>>(),
            [
                "iptables -D OUTPUT -d 169.254.169.254/32 -m owner ! --uid-owner 0 -m comment \
              --comment -c -j DROP"
            ]
        );
    }

    #[test]
    fn a_connection_gets_through_when_every_packet_of_it_does() {
        // Only the first packet is NEW: the ones after it hit the DROP (watched in a netns).
        let t = of(
            "-A OUTPUT -d 169.254.169.254/32 -m conntrack --ctstate NEW -m owner \
                    --uid-owner 1000 -j ACCEPT\n-A OUTPUT -d 169.254.169.254/32 -j DROP\n",
        );
        assert_eq!(allowed(&t), Vec::<String>::new());
        // The packets after the first are judged too.
        let t = of(
            "-A OUTPUT -d 169.254.169.254/32 -m conntrack ! --ctstate NEW -m owner \
                    ! --uid-owner 0 -j DROP\n",
        );
        assert_eq!(allowed(&t), ["uid 0"]);
        // The usual ESTABLISHED shortcut changes nothing.
        let t = of("-A OUTPUT -m state --state related,established -j ACCEPT\n\
                    -A OUTPUT -d 169.254.169.254/32 -m owner ! --uid-owner 0 -j DROP\n");
        assert_eq!(allowed(&t), ["uid 0"]);
        // Untracked packets are neither NEW nor ESTABLISHED.
        let text = "# Generated by iptables-save v1.8.9\n*raw\n:OUTPUT ACCEPT [0:0]\n\
                    -A OUTPUT -d 169.254.169.254/32 -j CT --notrack\nCOMMIT\n\
                    *filter\n:OUTPUT ACCEPT [0:0]\n\
                    -A OUTPUT -d 169.254.169.254/32 -m conntrack --ctstate UNTRACKED -m owner \
                    ! --uid-owner 0 -j DROP\nCOMMIT\n";
        let t = translate(&save::parse(text, "t").unwrap(), &Fixed).unwrap();
        assert_eq!(allowed(&t), ["uid 0"]);
    }

    #[test]
    fn cgroup_paths_are_read_as_the_kernel_walks_them() {
        // `/system.slice/` is `/system.slice`: the DROP holds below it.
        let t = of(
            "-A OUTPUT -d 169.254.169.254/32 -m cgroup --path /system.slice/ -j DROP\n\
                    -A OUTPUT -d 169.254.169.254/32 -m cgroup --path system.slice//x.service \
                    -j ACCEPT\n-A OUTPUT -d 169.254.169.254/32 -j DROP\n",
        );
        assert_eq!(allowed(&t), Vec::<String>::new());
    }

    #[test]
    fn a_chain_forward_reaches_too_is_not_emptied() {
        let t = of(":IMDS - [0:0]\n-A FORWARD -d 169.254.169.254/32 -j IMDS\n\
                    -A OUTPUT -d 169.254.169.254/32 -j IMDS\n-A IMDS -j DROP\n");
        assert_eq!(t.allowed.len(), 0);
        let deletions: Vec<String> = t.deletions.iter().map(Deletion::command).collect();
        assert_eq!(
            deletions,
            ["iptables -D OUTPUT -d 169.254.169.254/32 -j IMDS"]
        );
        assert!(
            t.kept
                .iter()
                .any(|(r, why)| r.line == 9 && why.contains("FORWARD")),
            "{:?}",
            t.kept
        );
    }

    #[test]
    fn a_rewrite_to_a_protected_address_is_named() {
        let text = "# Generated by iptables-save v1.8.9\n*nat\n:OUTPUT ACCEPT [0:0]\n\
                    -A OUTPUT -d 10.99.0.9/32 -p tcp -j DNAT --to-destination 169.254.169.254:80\n\
                    COMMIT\n*filter\n:OUTPUT ACCEPT [0:0]\n\
                    -A OUTPUT -d 169.254.169.254/32 -m owner ! --uid-owner 0 -j DROP\nCOMMIT\n";
        let t = translate(&save::parse(text, "t").unwrap(), &Fixed).unwrap();
        let dnat = t
            .untranslated
            .iter()
            .find(|u| u.rule.line == 4)
            .expect("the DNAT is named");
        assert!(
            dnat.reason
                .contains("rewrites destinations to a protected address"),
            "{dnat:?}"
        );
        assert_eq!(allowed(&t), ["uid 0"]);
    }

    #[test]
    fn loopback_is_judged_for_addresses_served_on_the_host() {
        // EKS Pod Identity's address is served on the host: `-o lo` may hold for it.
        let t = of(
            "-A OUTPUT -d 169.254.170.23/32 ! -o lo -m owner --uid-owner 1000 -j ACCEPT\n\
                    -A OUTPUT -d 169.254.170.23/32 -j DROP\n",
        );
        assert_eq!(allowed(&t), Vec::<String>::new());
        assert_eq!(t.untranslated.len(), 1);
        // IMDS is not: the loopback rule never sees its packets.
        let t = of("-A OUTPUT -o lo -j ACCEPT\n\
                    -A OUTPUT -d 169.254.169.254/32 -m owner ! --uid-owner 0 -j DROP\n");
        assert_eq!(allowed(&t), ["uid 0"]);
        assert!(t.untranslated.is_empty(), "{:?}", t.untranslated);
    }

    #[test]
    fn second_review_routes() {
        // mangle POSTROUTING sees forwarded packets too: translated, never deleted.
        let text = "# Generated by iptables-save v1.8.9\n*mangle\n:POSTROUTING ACCEPT [0:0]\n\
                    -A POSTROUTING -d 169.254.169.254/32 -m owner ! --uid-owner 0 -j DROP\n\
                    COMMIT\n";
        let t = translate(&save::parse(text, "t").unwrap(), &Fixed).unwrap();
        assert_eq!(allowed(&t), ["uid 0"]);
        assert!(t.deletions.is_empty(), "{:?}", t.deletions);
        // The raw table runs before connection tracking: its states are unknown, and the
        // reading that lets through less holds (a real netns let root alone through).
        let text = "# Generated by iptables-save v1.8.9\n*raw\n:OUTPUT ACCEPT [0:0]\n\
                    -A OUTPUT -d 169.254.169.254/32 -m conntrack --ctstate NEW -m owner \
                    --uid-owner 1000 -j ACCEPT\n\
                    -A OUTPUT -d 169.254.169.254/32 -m conntrack ! --ctstate ESTABLISHED -m owner \
                    ! --uid-owner 0 -j DROP\nCOMMIT\n";
        let t = translate(&save::parse(text, "t").unwrap(), &Fixed).unwrap();
        assert_eq!(allowed(&t), ["uid 0"]);
        assert_eq!(t.untranslated.len(), 2, "{:?}", t.untranslated);
        assert!(t.deletions.is_empty(), "{:?}", t.deletions);
        // Rules that decide nothing spend no unknowns: seven rate-limited LOGs and a port.
        let mut rules = String::new();
        for n in 0..7 {
            let _ = writeln!(
                rules,
                "-A OUTPUT -m limit --limit {n}/min -j LOG --log-prefix \"n{n} \""
            );
        }
        rules.push_str("-A OUTPUT -p udp -m udp --dport 53 -j ACCEPT\n");
        rules.push_str("-A OUTPUT -d 169.254.169.254/32 -m owner ! --uid-owner 0 -j DROP\n");
        assert_eq!(allowed(&of(&rules)), ["uid 0"]);
        // A port is the same for every packet of a connection: port 80 on the first packet and
        // not port 80 on the others never happen together, so nobody but root ever got through.
        let t = of(
            "-A OUTPUT -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -m conntrack \
                    --ctstate NEW -j ACCEPT\n\
                    -A OUTPUT -d 169.254.169.254/32 -p tcp -m tcp ! --dport 80 -m conntrack \
                    --ctstate ESTABLISHED -j ACCEPT\n\
                    -A OUTPUT -d 169.254.169.254/32 -m owner ! --uid-owner 0 -j DROP\n",
        );
        assert_eq!(allowed(&t), ["uid 0"]);
        assert_eq!(
            t.possible.iter().map(describe_term).collect::<Vec<_>>(),
            ["uid 0"]
        );
        // NETMAP onto IMDS's prefix is a rewrite to a protected address.
        let text = "# Generated by iptables-save v1.8.9\n*nat\n:OUTPUT ACCEPT [0:0]\n\
                    -A OUTPUT -d 10.9.9.0/24 -j NETMAP --to 169.254.169.0/24\nCOMMIT\n";
        let t = translate(&save::parse(text, "t").unwrap(), &Fixed).unwrap();
        assert!(
            t.untranslated[0].reason.contains("rewrites destinations"),
            "{t:?}"
        );
    }

    #[test]
    fn a_default_deny_output_with_root_allowed_to_imds() {
        let text = "# Generated by iptables-save v1.8.9\n*filter\n:OUTPUT DROP [0:0]\n\
                    -A OUTPUT -o lo -j ACCEPT\n\
                    -A OUTPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
                    -A OUTPUT -p tcp -m tcp --dport 443 -j ACCEPT\n\
                    -A OUTPUT -d 169.254.169.254/32 -m owner --uid-owner 0 -j ACCEPT\nCOMMIT\n";
        let t = translate(&save::parse(text, "t").unwrap(), &Fixed).unwrap();
        assert_eq!(allowed(&t), ["uid 0"]);
        assert_eq!(t.protect, ["imds"]);
        // Everyone else reached IMDS on port 443: named, for the address the config protects.
        let partial: Vec<(String, Vec<IpAddr>)> = (t.partial.iter())
            .map(|(term, addresses)| (describe_term(term), addresses.clone()))
            .collect();
        assert_eq!(
            partial,
            [(
                "uid not 0".to_owned(),
                vec![IpAddr::V4(Ipv4Addr::from(IMDS_V4))]
            )]
        );
    }
}

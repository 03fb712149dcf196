//! The set of workloads a chain lets through, as logic: formulas over what a rule can say of a
//! workload (its uid, gid, cgroup), and their disjunctive normal form, a list of [`Term`]s that
//! each become imds-guard rules.
//!
//! Conditions imds-guard has no counterpart for (ports, marks, interfaces) are `Unknown` atoms:
//! [`Formula::for_every_unknown`] keeps only what holds however they turn out, so a translation
//! never lets through a workload the rules might have stopped.

use std::collections::BTreeSet;

/// Formulas bigger than this many terms are refused rather than computed.
pub const MAX_TERMS: usize = 4096;

/// Formulas with more conditions imds-guard cannot judge than this are refused: each doubles
/// the work.
pub const MAX_UNKNOWNS: usize = 12;

fn too_many_unknowns(unknowns: usize) -> String {
    format!(
        "{unknowns} conditions imds-guard cannot judge bear on one address (at most \
         {MAX_UNKNOWNS}): too many to translate"
    )
}

/// A set of ids (uids or gids): sorted, disjoint, non-adjacent inclusive ranges.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdSet(Vec<(u32, u32)>);

impl IdSet {
    /// Every id.
    #[must_use]
    pub fn all() -> Self {
        Self(vec![(0, u32::MAX)])
    }

    /// No id.
    #[must_use]
    pub fn none() -> Self {
        Self(Vec::new())
    }

    /// `low..=high`.
    #[must_use]
    pub fn range(low: u32, high: u32) -> Self {
        Self(vec![(low, high)])
    }

    /// Whether it holds no id.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether it holds every id.
    #[must_use]
    pub fn is_all(&self) -> bool {
        self.0 == [(0, u32::MAX)]
    }

    /// Its ranges.
    #[must_use]
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.0
    }

    /// How many ids it holds.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.0
            .iter()
            .map(|&(low, high)| u64::from(high - low) + 1)
            .sum()
    }

    /// The ids in both.
    #[must_use]
    pub fn intersect(&self, other: &Self) -> Self {
        let mut out = Vec::new();
        for &(a_low, a_high) in &self.0 {
            for &(b_low, b_high) in &other.0 {
                let (low, high) = (a_low.max(b_low), a_high.min(b_high));
                if low <= high {
                    out.push((low, high));
                }
            }
        }
        Self::normalized(out)
    }

    /// The ids not in it.
    #[must_use]
    pub fn complement(&self) -> Self {
        let mut out = Vec::new();
        let mut next: u64 = 0;
        for &(low, high) in &self.0 {
            if u64::from(low) > next {
                out.push((u32::try_from(next).unwrap_or(u32::MAX), low - 1));
            }
            next = u64::from(high) + 1;
        }
        if u32::try_from(next).is_ok() {
            out.push((u32::try_from(next).unwrap_or(u32::MAX), u32::MAX));
        }
        Self(out)
    }

    /// The ids in either.
    #[must_use]
    pub fn union(&self, other: &Self) -> Self {
        Self::normalized(self.0.iter().chain(&other.0).copied().collect())
    }

    /// Whether every id of `self` is in `other`.
    #[must_use]
    pub fn within(&self, other: &Self) -> bool {
        self.intersect(other) == *self
    }

    fn normalized(mut ranges: Vec<(u32, u32)>) -> Self {
        ranges.sort_unstable();
        let mut out: Vec<(u32, u32)> = Vec::new();
        for (low, high) in ranges {
            match out.last_mut() {
                Some(last) if u64::from(low) <= u64::from(last.1) + 1 => last.1 = last.1.max(high),
                _ => out.push((low, high)),
            }
        }
        Self(out)
    }
}

/// What one rule condition says of a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Atom {
    /// Its uid is in the set.
    Uid(IdSet),
    /// Its primary gid is in the set.
    Gid(IdSet),
    /// It is in this cgroup (a path, `/a/b`) or below it.
    Cgroup(String),
    /// A condition imds-guard cannot judge, numbered.
    Unknown(usize),
}

/// A formula over [`Atom`]s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Formula {
    /// Always.
    True,
    /// Never.
    False,
    /// The atom holds.
    Atom(Atom),
    /// It does not hold.
    Not(Box<Formula>),
    /// All hold.
    And(Vec<Formula>),
    /// One holds.
    Or(Vec<Formula>),
}

impl Formula {
    /// `a ∧ b`, simplified where one is a constant.
    #[must_use]
    pub fn and(self, other: Self) -> Self {
        match (self, other) {
            (Self::False, _) | (_, Self::False) => Self::False,
            (Self::True, x) | (x, Self::True) => x,
            (Self::And(mut a), Self::And(b)) => {
                a.extend(b);
                Self::And(a)
            }
            (Self::And(mut a), x) | (x, Self::And(mut a)) => {
                a.push(x);
                Self::And(a)
            }
            (a, b) => Self::And(vec![a, b]),
        }
    }

    /// `a ∨ b`, simplified where one is a constant.
    #[must_use]
    pub fn or(self, other: Self) -> Self {
        match (self, other) {
            (Self::True, _) | (_, Self::True) => Self::True,
            (Self::False, x) | (x, Self::False) => x,
            (Self::Or(mut a), Self::Or(b)) => {
                a.extend(b);
                Self::Or(a)
            }
            (Self::Or(mut a), x) | (x, Self::Or(mut a)) => {
                a.push(x);
                Self::Or(a)
            }
            (a, b) => Self::Or(vec![a, b]),
        }
    }

    /// `¬a`.
    #[must_use]
    pub fn negate(self) -> Self {
        match self {
            Self::True => Self::False,
            Self::False => Self::True,
            Self::Not(inner) => *inner,
            other => Self::Not(Box::new(other)),
        }
    }

    /// The highest `Unknown` number in it, plus one.
    #[must_use]
    pub fn unknowns(&self) -> usize {
        match self {
            Self::Atom(Atom::Unknown(n)) => n + 1,
            Self::Not(inner) => inner.unknowns(),
            Self::And(items) | Self::Or(items) => {
                items.iter().map(Self::unknowns).max().unwrap_or(0)
            }
            _ => 0,
        }
    }

    /// It with `Unknown(n)` set to bit `n` of `values`.
    #[must_use]
    pub fn assume(&self, values: u64) -> Self {
        match self {
            Self::Atom(Atom::Unknown(n)) => {
                if values >> n & 1 == 1 {
                    Self::True
                } else {
                    Self::False
                }
            }
            Self::Not(inner) => inner.assume(values).negate(),
            Self::And(items) => items
                .iter()
                .fold(Self::True, |acc, item| acc.and(item.assume(values))),
            Self::Or(items) => items
                .iter()
                .fold(Self::False, |acc, item| acc.or(item.assume(values))),
            other => other.clone(),
        }
    }

    /// The workloads for which it holds whatever its unknowns are, as terms: the largest set a
    /// translation may let through.
    ///
    /// # Errors
    /// When it has too many unknowns or terms to compute (`MAX_TERMS`).
    pub fn for_every_unknown(&self) -> Result<Vec<Term>, String> {
        let unknowns = self.unknowns();
        if unknowns > MAX_UNKNOWNS {
            return Err(too_many_unknowns(unknowns));
        }
        let mut result = vec![Term::any()];
        for values in 0..(1_u64 << unknowns) {
            let terms = self.assume(values).terms()?;
            result = conjunction(&result, &terms)?;
            if result.is_empty() {
                break;
            }
        }
        Ok(result)
    }

    /// The workloads for which it holds for some value of its unknowns: the most the rules
    /// may have let through.
    ///
    /// # Errors
    /// As for [`Formula::for_every_unknown`].
    pub fn for_some_unknown(&self) -> Result<Vec<Term>, String> {
        let unknowns = self.unknowns();
        if unknowns > MAX_UNKNOWNS {
            return Err(too_many_unknowns(unknowns));
        }
        let mut result = Vec::new();
        for values in 0..(1_u64 << unknowns) {
            result.extend(self.assume(values).terms()?);
            result = simplify(result);
        }
        Ok(result)
    }

    /// Its disjunctive normal form, without unknowns (assume them first).
    ///
    /// # Errors
    /// When it has more than [`MAX_TERMS`] terms, or unknowns.
    pub fn terms(&self) -> Result<Vec<Term>, String> {
        self.dnf(false)
    }

    fn dnf(&self, negated: bool) -> Result<Vec<Term>, String> {
        match (self, negated) {
            (Self::True, false) | (Self::False, true) => Ok(vec![Term::any()]),
            (Self::False, false) | (Self::True, true) => Ok(Vec::new()),
            (Self::Atom(atom), negated) => {
                Ok(Term::any().with(atom, negated)?.into_iter().collect())
            }
            (Self::Not(inner), negated) => inner.dnf(!negated),
            (Self::And(items), false) | (Self::Or(items), true) => {
                let mut result = vec![Term::any()];
                for item in items {
                    result = conjunction(&result, &item.dnf(negated)?)?;
                    if result.is_empty() {
                        break;
                    }
                }
                Ok(result)
            }
            (Self::Or(items), false) | (Self::And(items), true) => {
                let mut result = Vec::new();
                for item in items {
                    result.extend(item.dnf(negated)?);
                }
                Ok(simplify(result))
            }
        }
    }
}

/// A conjunction of conditions on a workload: its uid in a set, its gid in a set, in or below
/// a cgroup, and in or below none of some others.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Term {
    /// The uids it holds.
    pub uid: IdSet,
    /// The primary gids it holds.
    pub gid: IdSet,
    /// In or below this cgroup; `None`: any.
    pub cgroup: Option<String>,
    /// Not in or below any of these (each below `cgroup`, none below another).
    pub not_cgroup: BTreeSet<String>,
}

/// Whether `path` is `ancestor` or below it.
#[must_use]
pub fn is_within(path: &str, ancestor: &str) -> bool {
    ancestor == "/"
        || path == ancestor
        || path
            .strip_prefix(ancestor)
            .is_some_and(|rest| rest.starts_with('/'))
}

impl Term {
    /// Every workload.
    #[must_use]
    pub fn any() -> Self {
        Self {
            uid: IdSet::all(),
            gid: IdSet::all(),
            cgroup: None,
            not_cgroup: BTreeSet::new(),
        }
    }

    /// Whether it says nothing (every workload).
    #[must_use]
    pub fn is_any(&self) -> bool {
        *self == Self::any()
    }

    /// It, and `atom` (or its negation); `None` when no workload is left.
    fn with(mut self, atom: &Atom, negated: bool) -> Result<Option<Self>, String> {
        match atom {
            Atom::Uid(set) => {
                self.uid = self.uid.intersect(&if negated {
                    set.complement()
                } else {
                    set.clone()
                });
            }
            Atom::Gid(set) => {
                self.gid = self.gid.intersect(&if negated {
                    set.complement()
                } else {
                    set.clone()
                });
            }
            Atom::Cgroup(path) if negated => {
                self.not_cgroup.insert(path.clone());
            }
            Atom::Cgroup(path) => match &self.cgroup {
                Some(current) if is_within(current, path) => {}
                Some(current) if is_within(path, current) => self.cgroup = Some(path.clone()),
                Some(_) => return Ok(None),
                None => self.cgroup = Some(path.clone()),
            },
            Atom::Unknown(_) => return Err("an unknown condition left in a formula".into()),
        }
        Ok(self.normalized())
    }

    /// Both.
    fn intersect(&self, other: &Self) -> Option<Self> {
        let mut term = self.clone();
        term.uid = term.uid.intersect(&other.uid);
        term.gid = term.gid.intersect(&other.gid);
        if let Some(path) = &other.cgroup {
            term = term.with(&Atom::Cgroup(path.clone()), false).ok()??;
        }
        term.not_cgroup.extend(other.not_cgroup.iter().cloned());
        term.normalized()
    }

    /// With exclusions that cannot matter dropped; `None` when it holds no workload.
    fn normalized(mut self) -> Option<Self> {
        if self.uid.is_empty() || self.gid.is_empty() {
            return None;
        }
        let mut kept: BTreeSet<String> = BTreeSet::new();
        for excluded in &self.not_cgroup {
            if let Some(cgroup) = &self.cgroup {
                if is_within(cgroup, excluded) {
                    return None;
                }
                if !is_within(excluded, cgroup) {
                    continue;
                }
            }
            if excluded == "/" {
                return None;
            }
            kept.insert(excluded.clone());
        }
        let all: Vec<String> = kept.iter().cloned().collect();
        kept.retain(|p| !all.iter().any(|q| q != p && is_within(p, q)));
        self.not_cgroup = kept;
        Some(self)
    }

    /// Whether every workload of `self` is in `other`.
    #[must_use]
    pub fn within(&self, other: &Self) -> bool {
        if !self.uid.within(&other.uid) || !self.gid.within(&other.gid) {
            return false;
        }
        match (&self.cgroup, &other.cgroup) {
            (_, None) => {}
            (Some(mine), Some(theirs)) if is_within(mine, theirs) => {}
            _ => return false,
        }
        // Each of `other`'s exclusions must be outside `self`: excluded by `self` too, or off
        // its subtree.
        other.not_cgroup.iter().all(|excluded| {
            self.not_cgroup.iter().any(|mine| is_within(excluded, mine))
                || self
                    .cgroup
                    .as_ref()
                    .is_some_and(|mine| !is_within(excluded, mine) && !is_within(mine, excluded))
        })
    }
}

/// The pairwise intersections of two term lists.
fn conjunction(a: &[Term], b: &[Term]) -> Result<Vec<Term>, String> {
    let mut out = Vec::new();
    for x in a {
        for y in b {
            if let Some(term) = x.intersect(y) {
                out.push(term);
            }
        }
        if out.len() > MAX_TERMS * 4 {
            out = simplify(out);
        }
    }
    let out = simplify(out);
    if out.len() > MAX_TERMS {
        return Err(format!(
            "the rules' conditions make more than {MAX_TERMS} combinations: too many to translate"
        ));
    }
    Ok(out)
}

/// Sorted, without duplicates or terms another one holds, terms that differ only in their uids
/// (or only in their gids) merged.
#[must_use]
pub fn simplify(terms: Vec<Term>) -> Vec<Term> {
    let mut terms = merge(
        terms,
        |t| &mut t.uid,
        |t| (t.gid.clone(), t.cgroup.clone(), t.not_cgroup.clone()),
    );
    terms = merge(
        terms,
        |t| &mut t.gid,
        |t| (t.uid.clone(), t.cgroup.clone(), t.not_cgroup.clone()),
    );
    terms.sort();
    terms.dedup();
    let all = terms.clone();
    terms.retain(|t| {
        !all.iter()
            .any(|other| other != t && t.within(other) && !(other.within(t) && other > t))
    });
    terms
}

/// Terms equal in `rest`, merged by the union of their `ids`.
fn merge<K: Ord>(
    terms: Vec<Term>,
    ids: impl Fn(&mut Term) -> &mut IdSet,
    rest: impl Fn(&Term) -> K,
) -> Vec<Term> {
    let mut by_rest: std::collections::BTreeMap<K, Term> = std::collections::BTreeMap::new();
    for mut term in terms {
        match by_rest.entry(rest(&term)) {
            std::collections::btree_map::Entry::Occupied(mut entry) => {
                let merged = ids(entry.get_mut()).union(ids(&mut term));
                *ids(entry.get_mut()) = merged;
            }
            std::collections::btree_map::Entry::Vacant(entry) => {
                entry.insert(term);
            }
        }
    }
    by_rest.into_values().collect()
}

/// The workloads of `a` not in `b`, taking `b`'s terms away one at a time (negating `b` whole
/// would multiply out every combination of its terms' conditions).
///
/// # Errors
/// When the difference has more than [`MAX_TERMS`] terms.
pub fn difference(a: &[Term], b: &[Term]) -> Result<Vec<Term>, String> {
    let mut left = a.to_vec();
    for term in b {
        let not_term = formula_of(std::slice::from_ref(term)).negate().terms()?;
        left = conjunction(&left, &not_term)?;
        if left.is_empty() {
            break;
        }
    }
    Ok(left)
}

/// Whether every workload of `a` is in `b`.
///
/// # Errors
/// As for [`difference`].
pub fn within(a: &[Term], b: &[Term]) -> Result<bool, String> {
    Ok(difference(a, b)?.is_empty())
}

/// The formula of a list of terms.
#[must_use]
pub fn formula_of(terms: &[Term]) -> Formula {
    terms.iter().fold(Formula::False, |acc, term| {
        let mut f = Formula::True;
        if !term.uid.is_all() {
            f = f.and(Formula::Atom(Atom::Uid(term.uid.clone())));
        }
        if !term.gid.is_all() {
            f = f.and(Formula::Atom(Atom::Gid(term.gid.clone())));
        }
        if let Some(cgroup) = &term.cgroup {
            f = f.and(Formula::Atom(Atom::Cgroup(cgroup.clone())));
        }
        for excluded in &term.not_cgroup {
            f = f.and(Formula::Atom(Atom::Cgroup(excluded.clone())).negate());
        }
        acc.or(f)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_do_not_multiply_out() {
        // Two hundred rules of uid and cgroup: negating their union whole would make 2^200
        // terms; taking them away one by one stays linear.
        let rules: Vec<Term> = (0..200)
            .flat_map(|n| uid(n, n).and(cgroup(&format!("/s/a{n}"))).terms().unwrap())
            .collect();
        assert!(within(&rules, &rules).unwrap());
        let extra = uid(5000, 5000).terms().unwrap();
        let mut more = rules.clone();
        more.extend(extra.clone());
        assert_eq!(difference(&more, &rules).unwrap(), extra);
        assert!(!within(&more, &rules).unwrap());
    }

    fn uid(low: u32, high: u32) -> Formula {
        Formula::Atom(Atom::Uid(IdSet::range(low, high)))
    }

    fn cgroup(path: &str) -> Formula {
        Formula::Atom(Atom::Cgroup(path.into()))
    }

    #[test]
    fn id_sets() {
        let a = IdSet::range(10, 20);
        assert_eq!(a.complement().ranges(), [(0, 9), (21, u32::MAX)]);
        assert_eq!(a.complement().complement(), a);
        assert!(IdSet::all().complement().is_empty());
        assert_eq!(IdSet::none().complement(), IdSet::all());
        assert_eq!(a.intersect(&IdSet::range(15, 30)), IdSet::range(15, 20));
        assert_eq!(a.len(), 11);
        assert!(IdSet::range(12, 13).within(&a));
        assert!(!IdSet::range(12, 23).within(&a));
    }

    #[test]
    fn not_root_then_drop_leaves_root() {
        // `! --uid-owner 0 -j DROP` before an ACCEPT policy: what is left is uid 0.
        let allowed = uid(0, 0).negate().negate();
        assert_eq!(
            allowed.terms().unwrap(),
            [Term {
                uid: IdSet::range(0, 0),
                ..Term::any()
            }]
        );
    }

    #[test]
    fn unknowns_keep_what_holds_either_way() {
        // ACCEPT uid 1000 on port 80 only (unknown), then DROP everyone but root.
        let port = Formula::Atom(Atom::Unknown(0));
        let allowed = uid(1000, 1000).and(port).or(uid(0, 0));
        assert_eq!(
            allowed.for_every_unknown().unwrap(),
            [Term {
                uid: IdSet::range(0, 0),
                ..Term::any()
            }]
        );
        // A DROP on port 80 for uid 1000 before an ACCEPT policy: uid 1000 is refused.
        let allowed = uid(1000, 1000)
            .and(Formula::Atom(Atom::Unknown(0)))
            .negate();
        let terms = allowed.for_every_unknown().unwrap();
        assert_eq!(terms.len(), 1);
        assert_eq!(terms[0].uid, IdSet::range(1000, 1000).complement());
    }

    #[test]
    fn cgroups_nest_and_exclude() {
        let f = cgroup("/a").and(cgroup("/a/b"));
        assert_eq!(f.terms().unwrap()[0].cgroup.as_deref(), Some("/a/b"));
        assert!(cgroup("/a").and(cgroup("/b")).terms().unwrap().is_empty());
        assert!(
            cgroup("/a/b")
                .and(cgroup("/a").negate())
                .terms()
                .unwrap()
                .is_empty()
        );
        let t = &cgroup("/a").and(cgroup("/a/b").negate()).terms().unwrap()[0];
        assert_eq!(t.not_cgroup.iter().collect::<Vec<_>>(), ["/a/b"]);
        // An exclusion elsewhere in the tree says nothing.
        let t = &cgroup("/a").and(cgroup("/c").negate()).terms().unwrap()[0];
        assert!(t.not_cgroup.is_empty());
        let terms = |f: Formula| f.terms().unwrap();
        assert!(within(&terms(cgroup("/a/b")), &terms(cgroup("/a"))).unwrap());
        assert!(!within(&terms(cgroup("/a")), &terms(cgroup("/a/b"))).unwrap());
        assert!(!within(&terms(cgroup("/ab")), &terms(cgroup("/a"))).unwrap());
    }

    #[test]
    fn subsumed_terms_go() {
        let f = uid(0, 0).or(uid(0, 10)).or(uid(5, 5).and(cgroup("/x")));
        assert_eq!(
            f.terms().unwrap(),
            [Term {
                uid: IdSet::range(0, 10),
                ..Term::any()
            }]
        );
        // Terms that differ in one id set merge.
        assert_eq!(
            uid(0, 0).or(uid(0, 0).negate()).terms().unwrap(),
            [Term::any()]
        );
        assert_eq!(
            uid(0, 3).or(uid(4, 9)).terms().unwrap(),
            [Term {
                uid: IdSet::range(0, 9),
                ..Term::any()
            }]
        );
    }
}

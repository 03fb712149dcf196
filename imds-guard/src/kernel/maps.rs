//! The one place that knows each map's layout: typed handles on imds-guard's maps, taken from
//! the loaded object (the agent) or from the pin directory (`status`, the test harness), and
//! what they hold read back as the agent's own types.

use std::{collections::HashMap as StdHashMap, net::IpAddr};

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, RingBuf},
};
use imds_guard_common::{
    agent::AgentInfo,
    event::{FoldKey, FoldValue},
    http::{PathRules, PathRulesKey},
    maps::{
        AGENT, ALLOW, CGROUP_RULESETS, COUNTER_EVENTS_LOST, COUNTER_FOLDED, COUNTER_HTTP_REFUSED,
        COUNTER_HTTP_UNFOLLOWED, COUNTER_HTTP_UNJUDGED, COUNTERS, EVENTS, FOLDS, GENERATION,
        HTTP_COUNTERS, PATH_RULES, PROTECTED, PROTECTED_FILTER, RULE_COUNTER_SLOTS, RULE_COUNTERS,
        RuleCounts, SETTINGS,
    },
    policy::{CgroupKey, ProtectedFilter, ProtectedSet, RuleKey, RuleValue, Settings},
};

use tracing::info;

use super::{KernelError, pins::PinDir, sys};

/// Where the maps come from.
pub trait Source {
    /// The map named `name` (one of `imds_guard_common::maps`).
    ///
    /// # Errors
    /// When there is no such map, or it cannot be opened.
    fn map(&mut self, name: &'static str) -> Result<&mut Map, KernelError>;
}

impl Source for Ebpf {
    fn map(&mut self, name: &'static str) -> Result<&mut Map, KernelError> {
        self.map_mut(name)
            .ok_or(KernelError::MissingInObject { kind: "map", name })
    }
}

/// The maps pinned in a pin directory, each opened when first asked for.
pub struct Pinned {
    pins: PinDir,
    open: StdHashMap<&'static str, Map>,
}

impl Pinned {
    /// The maps pinned in `pins` (nothing is opened yet).
    #[must_use]
    pub fn new(pins: &PinDir) -> Self {
        Self {
            pins: pins.clone(),
            open: StdHashMap::new(),
        }
    }
}

impl Source for Pinned {
    fn map(&mut self, name: &'static str) -> Result<&mut Map, KernelError> {
        if !self.open.contains_key(name) {
            let path = self.pins.map(name);
            let opened = MapData::from_pin(&path)
                .map_err(|source| KernelError::OpenPinnedMap {
                    path: path.clone(),
                    source,
                })
                .and_then(|data| {
                    Map::from_map_data(data)
                        .map_err(|source| KernelError::OpenPinnedMap { path, source })
                })?;
            self.open.insert(name, opened);
        }
        self.open
            .get_mut(name)
            .ok_or(KernelError::MissingInObject { kind: "map", name })
    }
}

fn typed<'a, T>(source: &'a mut impl Source, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<&'a mut Map, Error = aya::maps::MapError>,
{
    T::try_from(source.map(name)?).map_err(|source| KernelError::OpenMap { map: name, source })
}

/// `GENERATION`: the generation in force, at index 0.
///
/// # Errors
/// When the map is missing or not of this layout.
pub fn generation(source: &mut impl Source) -> Result<Array<&mut MapData, u32>, KernelError> {
    typed(source, GENERATION)
}

/// `SETTINGS`, by generation.
///
/// # Errors
/// As for [`generation`].
pub fn settings(source: &mut impl Source) -> Result<Array<&mut MapData, Settings>, KernelError> {
    typed(source, SETTINGS)
}

/// `CGROUP_RULESETS`.
///
/// # Errors
/// As for [`generation`].
pub fn cgroup_rulesets(
    source: &mut impl Source,
) -> Result<HashMap<&mut MapData, CgroupKey, u32>, KernelError> {
    typed(source, CGROUP_RULESETS)
}

/// `ALLOW`.
///
/// # Errors
/// As for [`generation`].
pub fn allow(
    source: &mut impl Source,
) -> Result<HashMap<&mut MapData, RuleKey, RuleValue>, KernelError> {
    typed(source, ALLOW)
}

/// `PATH_RULES`.
///
/// # Errors
/// As for [`generation`].
pub fn path_rules(
    source: &mut impl Source,
) -> Result<HashMap<&mut MapData, PathRulesKey, PathRules>, KernelError> {
    typed(source, PATH_RULES)
}

/// `PROTECTED`, indexed by generation.
///
/// # Errors
/// As for [`generation`].
pub fn protected(
    source: &mut impl Source,
) -> Result<Array<&mut MapData, ProtectedSet>, KernelError> {
    typed(source, PROTECTED)
}

/// `PROTECTED_FILTER`, at index 0.
///
/// # Errors
/// As for [`generation`].
pub fn protected_filter(
    source: &mut impl Source,
) -> Result<Array<&mut MapData, ProtectedFilter>, KernelError> {
    typed(source, PROTECTED_FILTER)
}

/// `RULE_COUNTERS`, indexed by `imds_guard_common::maps::rule_counter_index`.
///
/// # Errors
/// As for [`generation`].
pub fn rule_counters(
    source: &mut impl Source,
) -> Result<PerCpuArray<&mut MapData, RuleCounts>, KernelError> {
    typed(source, RULE_COUNTERS)
}

/// Indices of `RULE_COUNTERS` the kernel hands over per call of a batch read: its 2,050 slots
/// in 9 calls, each copying 256 × 24 bytes per possible CPU (768 KiB with 128 CPUs).
const RULE_COUNTERS_BATCH: usize = 256;

/// Every slot of `RULE_COUNTERS` (by `rule_counter_index`), summed over CPUs: in batches, or,
/// where the kernel has no batch reads of a per-CPU array (Linux 5.10; said once), slot by
/// slot.
///
/// # Errors
/// As for [`generation`]; [`KernelError::ReadMap`] when a slot cannot be read.
pub fn rule_counts(source: &mut impl Source) -> Result<Vec<RuleCounts>, KernelError> {
    let map = rule_counters(source)?;
    match sys::per_cpu_sums(&map, RULE_COUNTERS_BATCH, RuleCounts::plus) {
        Ok(sums) => return Ok(sums),
        Err(err) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                info!("no batch read of {RULE_COUNTERS} here ({err}): it is read slot by slot");
            });
        }
    }
    (0..RULE_COUNTER_SLOTS)
        .map(|index| rule_count(&map, index))
        .collect()
}

/// The slots of `RULE_COUNTERS` at `indices`, summed over CPUs, one lookup each: for the few
/// slots of one generation's rules.
///
/// # Errors
/// As for [`rule_counts`].
pub fn rule_counts_at(
    source: &mut impl Source,
    indices: impl Iterator<Item = u32>,
) -> Result<Vec<RuleCounts>, KernelError> {
    let map = rule_counters(source)?;
    indices.map(|index| rule_count(&map, index)).collect()
}

/// Slot `index` of `RULE_COUNTERS`, summed over CPUs.
fn rule_count(
    map: &PerCpuArray<&mut MapData, RuleCounts>,
    index: u32,
) -> Result<RuleCounts, KernelError> {
    map.get(&index, 0)
        .map(|values| {
            values
                .iter()
                .copied()
                .fold(RuleCounts::default(), RuleCounts::plus)
        })
        .map_err(|source| KernelError::ReadMap {
            map: RULE_COUNTERS,
            source,
        })
}

/// `COUNTERS`, indexed by the `imds_guard_common::maps::COUNTER_*` constants.
///
/// # Errors
/// As for [`generation`].
pub fn counters_map(
    source: &mut impl Source,
) -> Result<PerCpuArray<&mut MapData, u64>, KernelError> {
    typed(source, COUNTERS)
}

/// `HTTP_COUNTERS`, indexed by `imds_guard_common::http::http_counter_index`.
///
/// # Errors
/// As for [`generation`].
pub fn http_counters(
    source: &mut impl Source,
) -> Result<PerCpuArray<&mut MapData, u64>, KernelError> {
    typed(source, HTTP_COUNTERS)
}

/// `AGENT`, at index 0.
///
/// # Errors
/// As for [`generation`].
pub fn agent(source: &mut impl Source) -> Result<Array<&mut MapData, AgentInfo>, KernelError> {
    typed(source, AGENT)
}

/// `FOLDS`.
///
/// # Errors
/// As for [`generation`].
pub fn folds(
    source: &mut impl Source,
) -> Result<HashMap<&mut MapData, FoldKey, FoldValue>, KernelError> {
    typed(source, FOLDS)
}

/// Takes `EVENTS`, the ring buffer, out of the loaded object (the event loop owns it).
///
/// # Errors
/// When it was taken already, or is not of this layout.
pub fn take_events(ebpf: &mut Ebpf) -> Result<RingBuf<MapData>, KernelError> {
    take(ebpf, EVENTS)
}

/// Takes `FOLDS` out of the loaded object (the programs keep using it; the reporter owns this
/// handle).
///
/// # Errors
/// As for [`take_events`].
pub fn take_folds(ebpf: &mut Ebpf) -> Result<HashMap<MapData, FoldKey, FoldValue>, KernelError> {
    take(ebpf, FOLDS)
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(KernelError::MissingInObject { kind: "map", name })?;
    T::try_from(map).map_err(|source| KernelError::OpenMap { map: name, source })
}

/// The kernel's totals, summed over CPUs (and, for the attempts by verdict, over rules and
/// generations: see [`counters`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Attempts to protected addresses that a rule allowed.
    pub allowed: u64,
    /// Attempts refused.
    pub denied: u64,
    /// Attempts allowed and reported.
    pub audited: u64,
    /// Events that did not fit in the ring buffer.
    pub events_lost: u64,
    /// Denied or audited attempts folded as repeats of an identical one instead of queued.
    pub folded: u64,
    /// HTTP requests refused (`imds = "v2"`, `paths`, `deny_paths`), audited ones not counted.
    pub http_refused: u64,
    /// Writes on a followed connection that could not be judged (no record of its connect, a
    /// policy switch since, a request too long to read): refused where a rule judges requests.
    pub http_unjudged: u64,
    /// Connections to a protected address's port 80 that the message layer could not follow
    /// (its socket map was full): their requests were not read.
    pub http_unfollowed: u64,
}

/// The kernel's totals: `RULE_COUNTERS` summed over rules, generations and CPUs for the
/// attempts by verdict, and `COUNTERS` summed over CPUs for the rest.
///
/// # Errors
/// When a map is missing, not of this layout, or a value cannot be read.
pub fn counters(source: &mut impl Source) -> Result<Counters, KernelError> {
    // Each attempt is counted in its rule's slot alone, and no slot is ever zeroed.
    let judged = rule_counts(source)?
        .into_iter()
        .fold(RuleCounts::default(), RuleCounts::plus);
    let mut total = |index| counter(source, index);
    Ok(Counters {
        allowed: judged.allowed,
        denied: judged.denied,
        audited: judged.audited,
        events_lost: total(COUNTER_EVENTS_LOST)?,
        folded: total(COUNTER_FOLDED)?,
        http_refused: total(COUNTER_HTTP_REFUSED)?,
        http_unjudged: total(COUNTER_HTTP_UNJUDGED)?,
        http_unfollowed: total(COUNTER_HTTP_UNFOLLOWED)?,
    })
}

/// `COUNTERS`' counter `index` (`imds_guard_common::maps::COUNTER_*`), summed over CPUs: one
/// lookup, for what is read often (the folded repeats every second, the lost events).
///
/// # Errors
/// When the map is missing, not of this layout, or the value cannot be read.
pub fn counter(source: &mut impl Source, index: u32) -> Result<u64, KernelError> {
    counters_map(source)?
        .get(&index, 0)
        .map(|values| values.iter().sum::<u64>())
        .map_err(|source| KernelError::ReadMap {
            map: COUNTERS,
            source,
        })
}

/// The generation in force.
///
/// # Errors
/// When `GENERATION` cannot be opened or read.
pub fn generation_in_force(source: &mut impl Source) -> Result<u32, KernelError> {
    generation(source)?
        .get(&0, 0)
        .map_err(|source| KernelError::ReadMap {
            map: GENERATION,
            source,
        })
}

/// The addresses `generation` protects, sorted.
///
/// # Errors
/// When a map cannot be opened.
pub fn protected_addresses(
    source: &mut impl Source,
    generation: u32,
) -> Result<Vec<IpAddr>, KernelError> {
    let set = protected(source)?
        .get(&generation, 0)
        .map_err(|source| KernelError::ReadMap {
            map: PROTECTED,
            source,
        })?;
    let mut addresses: Vec<IpAddr> = set
        .v4()
        .map(|addr| IpAddr::from(addr.to_ne_bytes()))
        .collect();
    for addr in set.v6() {
        let mut octets = [0u8; 16];
        for (i, word) in addr.iter().enumerate() {
            octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        addresses.push(IpAddr::from(octets));
    }
    addresses.sort();
    Ok(addresses)
}

/// How many `ALLOW` and `CGROUP_RULESETS` entries `generation` has.
///
/// # Errors
/// When a map cannot be opened.
pub fn entries_of(
    source: &mut impl Source,
    generation: u32,
) -> Result<(usize, usize), KernelError> {
    let allow = (allow(source)?.keys().flatten())
        .filter(|key| key.generation == generation)
        .count();
    let cgroups = (cgroup_rulesets(source)?.keys().flatten())
        .filter(|key| key.generation == generation)
        .count();
    Ok((allow, cgroups))
}

/// The rule set cgroup `id` has an entry for in `generation`, if it has one.
///
/// # Errors
/// When `CGROUP_RULESETS` cannot be opened.
pub fn cgroup_ruleset(
    source: &mut impl Source,
    generation: u32,
    id: u64,
) -> Result<Option<u32>, KernelError> {
    let key = CgroupKey {
        generation,
        _pad: 0,
        cgroup_id: id,
    };
    Ok(cgroup_rulesets(source)?.get(&key, 0).ok())
}

/// What the agent last recorded of itself, if an agent ever did.
///
/// # Errors
/// When `AGENT` cannot be opened.
pub fn agent_info(source: &mut impl Source) -> Result<Option<AgentInfo>, KernelError> {
    Ok(agent(source)?
        .get(&0, 0)
        .ok()
        .filter(|info| info.started_ns != 0))
}

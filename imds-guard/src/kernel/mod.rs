//! The kernel side as the agent sees it: checks that the programs can run here and loads the
//! embedded object (`load.rs`), writes a policy into its maps (here), attaches the programs
//! (`links.rs`) and keeps them pinned ([`pins`]).

pub mod btf;
pub mod in_force;
mod links;
mod load;
pub mod maps;
pub mod pins;
pub mod sys;

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
};
use imds_guard_common::{
    agent::AgentInfo,
    event::{FoldKey, FoldValue},
    http::{COUNTED_VERSIONS, IMDS_VERSIONS, PathRules, PathRulesKey, http_counter_index},
    maps::{
        AGENT, ALLOW, CGROUP_RULESETS, GENERATION, HTTP_COUNTERS, MAX_RULES, PATH_RULES, PROTECTED,
        PROTECTED_FILTER, RuleCounts, SETTINGS, rule_counter_index,
    },
    policy::{
        CgroupKey, ProtectedFilter, ProtectedSet, RuleKey, RuleValue, Settings, filter_set,
        filter_slot_v4, filter_slot_v6,
    },
};
use tracing::{debug, warn};

pub use self::{
    links::Attached,
    load::{OBJECT, TASK_READS_ENV, preflight},
    maps::Counters,
};
use crate::{
    kernel::pins::{PinDir, PinError},
    policy::compile::{Compiled, Delta, MapEntries},
};

/// The `cgroup_skb/egress` program (raw sockets); the others are `cgroup/sock_addr` programs.
const PACKET_PROGRAM: &str = imds_guard_common::programs::EGRESS;

/// What went wrong loading, attaching or using the programs and their maps.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The process lacks the capabilities to load and attach BPF programs.
    #[error(
        "imds-guard needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN) to load and attach its \
         programs, and this process lacks {missing}: run it as root"
    )]
    MissingCapabilities {
        /// The missing capabilities, by name.
        missing: String,
    },
    /// The process's capabilities could not be read.
    #[error("cannot read this process's capabilities (capget): {source}")]
    ReadCapabilities {
        /// Why.
        source: std::io::Error,
    },
    /// The kernel lacks a BPF feature imds-guard needs.
    #[error("this kernel does not support {feature}, which imds-guard needs ({needs})")]
    Feature {
        /// The feature.
        feature: &'static str,
        /// The kernel version and config that provide it.
        needs: &'static str,
    },
    /// Probing a kernel feature failed unexpectedly.
    #[error("probing the kernel for {feature} failed: {message}")]
    Probe {
        /// The feature.
        feature: &'static str,
        /// What the probe reported.
        message: String,
    },
    /// The embedded object could not be loaded (maps created, BTF parsed).
    #[error("loading the kernel object failed: {source}")]
    LoadObject {
        /// Why.
        source: aya::EbpfError,
    },
    /// The embedded object lacks a map or program the agent expects.
    #[error("the embedded kernel object has no {kind} named {name}: the build is broken")]
    MissingInObject {
        /// "map" or "program".
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// A map could not be opened with the expected type.
    #[error("map {map} has an unexpected type or layout: {source}")]
    OpenMap {
        /// The map.
        map: &'static str,
        /// Why.
        source: aya::maps::MapError,
    },
    /// A pinned map could not be opened.
    #[error("cannot open the pinned map {}: {source}", path.display())]
    OpenPinnedMap {
        /// Its pin.
        path: std::path::PathBuf,
        /// Why.
        source: aya::maps::MapError,
    },
    /// Writing the policy into a map failed.
    #[error("writing {what} to map {map} failed: {source}")]
    WriteMap {
        /// The map.
        map: &'static str,
        /// The entry.
        what: String,
        /// Why.
        source: aya::maps::MapError,
    },
    /// Reading a map failed.
    #[error("reading map {map} failed: {source}")]
    ReadMap {
        /// The map.
        map: &'static str,
        /// Why.
        source: aya::maps::MapError,
    },
    /// The number of possible CPUs, which sizes per-CPU values, could not be read.
    #[error("cannot count the possible CPUs (/sys/devices/system/cpu/possible): {source}")]
    PossibleCpus {
        /// Why.
        source: std::io::Error,
    },
    /// A policy was not compiled as the generation not in force: switching to it would
    /// overwrite the rules the programs are reading. A bug in the caller.
    #[error(
        "internal error: a policy compiled as generation {compiled} cannot replace generation \
         {in_force}, only the generation not in force can (nothing was changed; please report \
         this)"
    )]
    NotTheInactiveGeneration {
        /// The generation the policy was compiled as.
        compiled: u32,
        /// The generation in force.
        in_force: u32,
    },
    /// The verifier (or the kernel) refused a program.
    #[error(
        "loading program {program} failed: {source}{}",
        load::verifier_hint(source)
    )]
    LoadProgram {
        /// The program.
        program: &'static str,
        /// Why, with the verifier log.
        source: aya::programs::ProgramError,
    },
    /// This agent would tell containers by their cgroup path alone, where the programs in force
    /// tell them (or may) by more: it does not start, and they stay.
    #[error(
        "{why}. Without those reads containers would be known by their cgroup path alone (root \
         in a namespaced task outside a container runtime's cgroup taken for the host's root), \
         where the programs in force, linked through {}, tell them by {in_force}: they stay in \
         force, and this agent does not start. To run without reading tasks, set {}=none",
        pin_dir.display(),
        load::TASK_READS_ENV
    )]
    WeakerThanInForce {
        /// Why this agent cannot read tasks.
        why: String,
        /// The pin directory.
        pin_dir: std::path::PathBuf,
        /// How the programs in force tell containers (`InForce::describe`).
        in_force: String,
    },
    /// A program could not be attached to the cgroup.
    #[error("attaching program {program} to cgroup {} failed: {source}", cgroup.display())]
    Attach {
        /// The program.
        program: &'static str,
        /// The cgroup directory.
        cgroup: std::path::PathBuf,
        /// Why.
        source: aya::programs::ProgramError,
    },
    /// The cgroup to attach to could not be opened.
    #[error("cannot inspect cgroup {}: {source}", dir.display())]
    OpenCgroup {
        /// The cgroup directory.
        dir: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The pinned maps or links refuse the load (see [`PinError`]).
    #[error(transparent)]
    Pin(#[from] PinError),
    /// A program link could not be created, adopted or replaced.
    #[error("program {program}: {action} failed: {source}")]
    Link {
        /// The program.
        program: &'static str,
        /// What was being done.
        action: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// `imds-guard run`'s exit status when it does not start rather than weaken the programs in
/// force ([`KernelError::WeakerThanInForce`]); the unit's `RestartPreventExitStatus=`.
pub const WEAKER_THAN_IN_FORCE_EXIT: u8 = 4;

/// The loaded object: maps created or adopted from the pins, programs verified.
pub struct Kernel {
    ebpf: Ebpf,
    pins: PinDir,
    /// The maps were pinned already: a policy may be in force, and programs reading them.
    adopted: bool,
    /// `LAYOUT_*` bits of what the loaded programs read of tasks.
    task_layout: u32,
    /// The clock that times fold windows.
    fold_clock: crate::host::clock::Clock,
}

/// A random 32-bit number, from the standard library's per-process random hash keys.
fn random_epoch() -> u32 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the low half of a random word"
    )]
    let epoch = random as u32;
    epoch
}

impl Kernel {
    /// Whether the maps were adopted from an earlier agent: then a policy is (or may be) in
    /// force, and the first policy must be switched to, not installed.
    #[must_use]
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Installs the first policy before the programs are attached: `compiled` (which must be
    /// generation 0) is written and put in force.
    ///
    /// # Errors
    /// [`KernelError::OpenMap`] or [`KernelError::WriteMap`].
    pub fn install(&mut self, compiled: &Compiled) -> Result<(), KernelError> {
        self.zero_http_counts(compiled.generation())?;
        self.write_generation(&compiled.entries(), compiled.generation())?;
        self.activate(compiled.generation())
    }

    /// The generation a new policy must be compiled as: the one not in force.
    ///
    /// # Errors
    /// [`KernelError::OpenMap`] or [`KernelError::ReadMap`].
    pub fn inactive_generation(&mut self) -> Result<u32, KernelError> {
        Ok(self.active_generation()? ^ 1)
    }

    /// Replaces the policy in force with `compiled` (compiled as
    /// [`Kernel::inactive_generation`]), so that no attempt is ever judged by a mix of the two:
    /// the new policy is written as the inactive generation, put in force with one 32-bit store,
    /// and the old generation is removed only once no program can still be reading it.
    ///
    /// An error means the old policy is still in force (what was written of the new one is
    /// removed); `Ok` means the new one is, even if removing the old one then failed: its
    /// leftovers are only logged, and the next switch clears them before reusing the slot.
    ///
    /// # Errors
    /// [`KernelError::OpenMap`], [`KernelError::ReadMap`] or [`KernelError::WriteMap`];
    /// [`KernelError::NotTheInactiveGeneration`] when `compiled` is of the generation in force.
    pub fn switch_to(&mut self, compiled: &Compiled) -> Result<(), KernelError> {
        let old = self.active_generation()?;
        let new = compiled.generation();
        if new != old ^ 1 {
            return Err(KernelError::NotTheInactiveGeneration {
                compiled: new,
                in_force: old,
            });
        }
        // Leftovers of an earlier switch whose clean-up failed.
        self.clear_generation(new)?;
        self.zero_http_counts(new)?;
        let written = self
            .write_generation(&compiled.entries(), new)
            .and_then(|()| self.activate(new));
        if let Err(err) = written {
            if let Err(cleanup) = self.clear_generation(new) {
                warn!("removing the unused new policy failed: {cleanup}");
            }
            return Err(err);
        }
        wait_for_running_programs();
        if let Err(err) = self.clear_generation(old) {
            warn!("the new policy is in force, but removing the old one failed: {err}");
        }
        Ok(())
    }

    /// Applies changes to the generation in force, each entry a single atomic update, in the
    /// order [`Delta`] gives: new rule sets before the cgroups that use them, and the `ALLOW`
    /// entries of retired rule sets only after a grace period, when no program that read a
    /// removed cgroup entry can still be looking them up.
    ///
    /// # Errors
    /// [`KernelError::OpenMap`] or [`KernelError::WriteMap`] (a full map, typically); the entries
    /// already written stay, and the caller must rewrite the generation to be sure of the maps
    /// again.
    pub fn apply(&mut self, delta: &Delta) -> Result<(), KernelError> {
        insert_all(
            &mut maps::allow(&mut self.ebpf)?,
            ALLOW,
            &delta.allow_insert,
        )?;
        let mut cgroups: HashMap<_, CgroupKey, u32> = maps::cgroup_rulesets(&mut self.ebpf)?;
        insert_all(&mut cgroups, CGROUP_RULESETS, &delta.cgroup_upsert)?;
        for key in &delta.cgroup_remove {
            remove(cgroups.remove(key), CGROUP_RULESETS, key)?;
        }
        if !delta.allow_remove.is_empty() {
            wait_for_running_programs();
            let mut allow: HashMap<_, RuleKey, RuleValue> = maps::allow(&mut self.ebpf)?;
            for key in &delta.allow_remove {
                remove(allow.remove(key), ALLOW, key)?;
            }
        }
        Ok(())
    }

    /// The generation in force.
    ///
    /// # Errors
    /// [`KernelError::OpenMap`] or [`KernelError::ReadMap`].
    pub fn active_generation(&mut self) -> Result<u32, KernelError> {
        maps::generation_in_force(&mut self.ebpf)
    }

    /// Writes every entry of one generation; the generation in force is not touched.
    fn write_generation(
        &mut self,
        entries: &MapEntries,
        generation: u32,
    ) -> Result<(), KernelError> {
        // Before the rules that send the message layer to them.
        insert_all(
            &mut maps::path_rules(&mut self.ebpf)?,
            PATH_RULES,
            &entries.path_rules,
        )?;
        insert_all(&mut maps::allow(&mut self.ebpf)?, ALLOW, &entries.allow)?;
        insert_all(
            &mut maps::cgroup_rulesets(&mut self.ebpf)?,
            CGROUP_RULESETS,
            &entries.cgroup_rulesets,
        )?;
        let mut settings: Array<_, Settings> = maps::settings(&mut self.ebpf)?;
        // A number neither slot has: the one after the other slot's (the policy in force at a
        // switch), unless that is the number of the policy this one replaces (only after the
        // numbers wrap, or in maps an agent left half-removed, which an install reuses).
        let [replaced, other] = [generation, generation ^ 1].map(|slot| {
            settings
                .get(&slot, 0)
                .map(|held| held.epoch)
                .map_err(|source| KernelError::ReadMap {
                    map: SETTINGS,
                    source,
                })
        });
        let (replaced, other) = (replaced?, other?);
        // A first policy starts from a random number: sockets may still carry the numbers of
        // maps an agent left half-removed (their settings gone, their socket verdicts pinned).
        let other = if other == 0 && replaced == 0 {
            random_epoch()
        } else {
            other
        };
        let value = Settings {
            epoch: Settings::epoch_after(other, replaced),
            ..entries.settings
        };
        settings
            .set(generation, value, 0)
            .map_err(|source| KernelError::WriteMap {
                map: SETTINGS,
                what: format!("{value:?}"),
                source,
            })?;
        // The filter first: it must cover every protected address before a program can meet it.
        let mut filter = self.filter()?;
        cover(&mut filter, &entries.protected);
        self.write_filter(filter)?;
        self.write_protected(generation, &entries.protected)
    }

    /// Sets `Settings::unseen_after` of `generation` (the one in force): cgroups newer than
    /// `unseen_after` are judged by the rules that hold wherever they are until it is raised.
    ///
    /// # Errors
    /// [`KernelError::OpenMap`], [`KernelError::ReadMap`] or [`KernelError::WriteMap`].
    pub fn set_unseen_after(
        &mut self,
        generation: u32,
        unseen_after: u64,
    ) -> Result<(), KernelError> {
        self.update_settings(generation, |settings| settings.unseen_after = unseen_after)
    }

    /// Sets `Settings::entry_levels` of `generation`: the levels the ancestor walk looks at.
    ///
    /// # Errors
    /// [`KernelError::OpenMap`], [`KernelError::ReadMap`] or [`KernelError::WriteMap`].
    pub fn set_entry_levels(
        &mut self,
        generation: u32,
        entry_levels: u64,
    ) -> Result<(), KernelError> {
        self.update_settings(generation, |settings| settings.entry_levels = entry_levels)
    }

    /// Changes one aligned 8-byte field of `SETTINGS[generation]`; the others are written back
    /// as they were, so a program reading concurrently sees each field whole, old or new.
    fn update_settings(
        &mut self,
        generation: u32,
        change: impl FnOnce(&mut Settings),
    ) -> Result<(), KernelError> {
        let mut settings: Array<_, Settings> = maps::settings(&mut self.ebpf)?;
        let mut value = settings
            .get(&generation, 0)
            .map_err(|source| KernelError::ReadMap {
                map: SETTINGS,
                source,
            })?;
        change(&mut value);
        settings
            .set(generation, value, 0)
            .map_err(|source| KernelError::WriteMap {
                map: SETTINGS,
                what: format!("{value:?}"),
                source,
            })
    }

    /// `PROTECTED_FILTER[0]`.
    fn filter(&mut self) -> Result<ProtectedFilter, KernelError> {
        let map: Array<_, ProtectedFilter> = maps::protected_filter(&mut self.ebpf)?;
        map.get(&0, 0).map_err(|source| KernelError::ReadMap {
            map: PROTECTED_FILTER,
            source,
        })
    }

    fn write_filter(&mut self, filter: ProtectedFilter) -> Result<(), KernelError> {
        let mut map: Array<_, ProtectedFilter> = maps::protected_filter(&mut self.ebpf)?;
        map.set(0, filter, 0)
            .map_err(|source| KernelError::WriteMap {
                map: PROTECTED_FILTER,
                what: "the protected-address filter".into(),
                source,
            })
    }

    /// `PROTECTED[generation]`.
    fn write_protected(&mut self, generation: u32, set: &ProtectedSet) -> Result<(), KernelError> {
        let mut map: Array<_, ProtectedSet> = maps::protected(&mut self.ebpf)?;
        map.set(generation, set, 0)
            .map_err(|source| KernelError::WriteMap {
                map: PROTECTED,
                what: format!("{set:?}"),
                source,
            })
    }

    /// Puts `generation` in force: one aligned 32-bit store the programs read once per attempt.
    fn activate(&mut self, generation: u32) -> Result<(), KernelError> {
        let mut active: Array<_, u32> = maps::generation(&mut self.ebpf)?;
        active
            .set(0, generation, 0)
            .map_err(|source| KernelError::WriteMap {
                map: GENERATION,
                what: format!("generation {generation}"),
                source,
            })
    }

    /// Removes every entry of `generation` (which must not be in force).
    fn clear_generation(&mut self, generation: u32) -> Result<(), KernelError> {
        let of_generation = |key_generation: u32| key_generation == generation;
        remove_where::<RuleKey, RuleValue>(&mut maps::allow(&mut self.ebpf)?, ALLOW, |key| {
            of_generation(key.generation)
        })?;
        remove_where::<CgroupKey, u32>(
            &mut maps::cgroup_rulesets(&mut self.ebpf)?,
            CGROUP_RULESETS,
            |key| of_generation(key.generation),
        )?;
        remove_where::<PathRulesKey, PathRules>(
            &mut maps::path_rules(&mut self.ebpf)?,
            PATH_RULES,
            |key| of_generation(key.generation),
        )?;
        self.write_protected(generation, &ProtectedSet::default())?;
        // Only now may the filter forget those addresses: it is rebuilt from the other
        // generation's.
        let mut filter = ProtectedFilter::default();
        let other = maps::protected(&mut self.ebpf)?
            .get(&(1 - generation), 0)
            .map_err(|source| KernelError::ReadMap {
                map: PROTECTED,
                source,
            })?;
        cover(&mut filter, &other);
        self.write_filter(filter)
    }

    /// Writes what the agent says about itself.
    ///
    /// # Errors
    /// [`KernelError::OpenMap`] or [`KernelError::WriteMap`].
    pub fn set_agent_info(&mut self, info: &AgentInfo) -> Result<(), KernelError> {
        let mut map: Array<_, AgentInfo> = maps::agent(&mut self.ebpf)?;
        map.set(0, info, 0).map_err(|source| KernelError::WriteMap {
            map: AGENT,
            what: "the agent's record".into(),
            source,
        })
    }

    /// Attempts decided by each rule of `generation` (index 0: by no rule), whatever their
    /// verdict, summed over CPUs.
    ///
    /// # Errors
    /// [`KernelError::OpenMap`] or [`KernelError::ReadMap`].
    pub fn rule_counts(&mut self, generation: u32, rules: u32) -> Result<Vec<u64>, KernelError> {
        let slots = (0..=rules.min(MAX_RULES)).map(|rule| rule_counter_index(generation, rule));
        Ok(maps::rule_counts_at(&mut self.ebpf, slots)?
            .iter()
            .map(RuleCounts::total)
            .collect())
    }

    /// HTTP requests decided by each rule of `generation` (index 0: by no rule), by version
    /// (`[v1, v2, token]`), summed over CPUs.
    ///
    /// # Errors
    /// [`KernelError::OpenMap`] or [`KernelError::ReadMap`].
    pub fn http_counts(
        &mut self,
        generation: u32,
        rules: u32,
    ) -> Result<Vec<[u64; IMDS_VERSIONS as usize]>, KernelError> {
        let map: PerCpuArray<_, u64> = maps::http_counters(&mut self.ebpf)?;
        let count = |index: u32| {
            map.get(&index, 0)
                .map(|values| values.iter().sum::<u64>())
                .map_err(|source| KernelError::ReadMap {
                    map: HTTP_COUNTERS,
                    source,
                })
        };
        (0..=rules.min(MAX_RULES))
            .map(|rule| {
                let mut counts = [0; IMDS_VERSIONS as usize];
                for (slot, version) in counts.iter_mut().zip(COUNTED_VERSIONS) {
                    *slot = count(http_counter_index(generation, rule, version))?;
                }
                Ok(counts)
            })
            .collect()
    }

    /// Zeroes `generation`'s per-rule counts of HTTP requests before it is reused. (Its counts
    /// of attempts are never zeroed: the totals by verdict are their sum.)
    fn zero_http_counts(&mut self, generation: u32) -> Result<(), KernelError> {
        let cpus =
            aya::util::nr_cpus().map_err(|(_, source)| KernelError::PossibleCpus { source })?;
        // One value per possible CPU, as many as were just counted: only a wrong count fails.
        let zeroes = || {
            aya::maps::PerCpuValues::try_from(vec![0u64; cpus])
                .map_err(|source| KernelError::PossibleCpus { source })
        };
        let mut map: PerCpuArray<_, u64> = maps::http_counters(&mut self.ebpf)?;
        for rule in 0..=MAX_RULES {
            for version in COUNTED_VERSIONS {
                map.set(http_counter_index(generation, rule, version), zeroes()?, 0)
                    .map_err(|source| KernelError::WriteMap {
                        map: HTTP_COUNTERS,
                        what: format!("zero HTTP count of rule {rule}"),
                        source,
                    })?;
            }
        }
        Ok(())
    }

    /// Takes the event ring buffer out of the object, for the event loop.
    ///
    /// # Errors
    /// [`KernelError::MissingInObject`] when already taken, [`KernelError::OpenMap`].
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, KernelError> {
        maps::take_events(&mut self.ebpf)
    }

    /// Takes the fold map out of the object (the programs keep using it), for the reporter.
    ///
    /// # Errors
    /// [`KernelError::MissingInObject`] or [`KernelError::OpenMap`].
    pub fn take_folds(&mut self) -> Result<HashMap<MapData, FoldKey, FoldValue>, KernelError> {
        maps::take_folds(&mut self.ebpf)
    }

    /// The kernel's totals ([`maps::counters`]).
    ///
    /// # Errors
    /// [`KernelError::OpenMap`] or [`KernelError::ReadMap`].
    pub fn counters(&mut self) -> Result<Counters, KernelError> {
        maps::counters(&mut self.ebpf)
    }

    /// One of `COUNTERS`' counters, summed over CPUs ([`maps::counter`]).
    ///
    /// # Errors
    /// [`KernelError::OpenMap`] or [`KernelError::ReadMap`].
    pub fn counter(&mut self, index: u32) -> Result<u64, KernelError> {
        maps::counter(&mut self.ebpf, index)
    }
}

/// Inserts (or replaces) every entry; stops at the first the kernel refuses.
fn insert_all<K: aya::Pod + std::fmt::Debug, V: aya::Pod>(
    map: &mut HashMap<&mut MapData, K, V>,
    name: &'static str,
    entries: &[(K, V)],
) -> Result<(), KernelError> {
    for (key, value) in entries {
        map.insert(key, value, 0)
            .map_err(|source| KernelError::WriteMap {
                map: name,
                what: format!("{key:?}"),
                source,
            })?;
    }
    Ok(())
}

/// Sets the filter slots of these protected addresses.
fn cover(filter: &mut ProtectedFilter, set: &ProtectedSet) {
    for addr in set.v4() {
        filter_set(&mut filter.v4, filter_slot_v4(addr));
    }
    for addr in set.v6() {
        filter_set(&mut filter.v6, filter_slot_v6(addr));
    }
}

/// Removes the entries whose key `remove` picks; returns the keys left.
fn remove_where<K: aya::Pod + std::fmt::Debug, V: aya::Pod>(
    map: &mut HashMap<&mut MapData, K, V>,
    name: &'static str,
    remove: impl Fn(&K) -> bool,
) -> Result<Vec<K>, KernelError> {
    let (removed, kept): (Vec<K>, Vec<K>) = collect_keys(map.keys(), name)?
        .into_iter()
        .partition(|key| remove(key));
    for key in &removed {
        self::remove(map.remove(key), name, key)?;
    }
    Ok(kept)
}

fn collect_keys<K>(
    keys: impl Iterator<Item = std::result::Result<K, aya::maps::MapError>>,
    map: &'static str,
) -> Result<Vec<K>, KernelError> {
    keys.collect::<std::result::Result<_, _>>()
        .map_err(|source| KernelError::ReadMap { map, source })
}

fn remove<K: std::fmt::Debug>(
    result: std::result::Result<(), aya::maps::MapError>,
    map: &'static str,
    key: &K,
) -> Result<(), KernelError> {
    result.map_err(|source| KernelError::WriteMap {
        map,
        what: format!("removal of {key:?}"),
        source,
    })
}

/// Returns once every program that might have read the previous generation has finished.
///
/// cgroup programs run inside an RCU read-side section, and `membarrier(MEMBARRIER_CMD_GLOBAL)`
/// waits for an RCU grace period (`synchronize_rcu`). Where membarrier is refused (`nohz_full`
/// kernels), a pause thousands of times longer than a program run stands in.
fn wait_for_running_programs() {
    use rustix::thread::{MembarrierCommand, membarrier};
    if let Err(errno) = membarrier(MembarrierCommand::Global) {
        debug!("membarrier refused ({errno}); pausing instead");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

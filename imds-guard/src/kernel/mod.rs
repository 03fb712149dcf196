//! The kernel side as the agent sees it: checks that the programs can run here, loads the
//! embedded object, writes a policy into its maps, attaches and detaches the programs.

pub mod btf;
pub mod maps;
pub mod pins;
pub mod sys;

use std::{fs::File, os::fd::AsFd as _};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramType,
        links::FdLink,
    },
};
use imds_guard_common::{
    agent::AgentInfo,
    event::{
        FOLD_WINDOW_GLOBAL, FoldKey, FoldValue, LAYOUT_BTF_TASK, LAYOUT_NAMESPACES,
        TASK_LAYOUT_GLOBAL, TaskLayout,
    },
    maps::{
        AGENT, ALLOW, CGROUP_RULESETS, GENERATION, MAX_RULES, PROTECTED_FILTER, PROTECTED_V4,
        PROTECTED_V6, RULE_COUNTERS, SETTINGS, rule_counter_index,
    },
    policy::{
        CgroupKey, ProtectedFilter, ProtectedV4Key, ProtectedV6Key, RuleKey, RuleValue, Settings,
        filter_set, filter_slot_v4, filter_slot_v6,
    },
};
use rustix::thread::CapabilitySet;
use tracing::{debug, info, warn};

pub use self::maps::Counters;
use crate::{
    error::{CgroupError, PinError, Result},
    host::cgroups::Cgroup,
    kernel::pins::PinDir,
    policy::compile::{Compiled, Delta, MapEntries},
};

/// The kernel object built by `build.rs` from `imds-guard-ebpf` (public for the benchmarks,
/// which attach its `bench_noop4` baseline program).
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/imds-guard-ebpf"));

/// The programs in the object, named after their attach points.
pub const PROGRAMS: [&str; 5] = [
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    PACKET_PROGRAM,
];

/// The `cgroup_skb/egress` program (raw sockets); the others are `cgroup/sock_addr` programs.
const PACKET_PROGRAM: &str = "egress";

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
        crate::error::verifier_hint(source)
    )]
    LoadProgram {
        /// The program.
        program: &'static str,
        /// Why, with the verifier log.
        source: aya::programs::ProgramError,
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

/// Checks, before anything is loaded, that this process and kernel can run the programs.
///
/// # Errors
/// [`KernelError::MissingCapabilities`] or [`KernelError::Feature`], naming what is missing.
pub fn preflight() -> Result<(), KernelError> {
    let sets =
        rustix::thread::capabilities(None).map_err(|errno| KernelError::ReadCapabilities {
            source: errno.into(),
        })?;
    if let Some(missing) = missing_capabilities(sets.effective) {
        return Err(KernelError::MissingCapabilities { missing });
    }
    raise_memlock_limit();
    probe(
        "cgroup sock_addr programs",
        "Linux 4.17+ with CONFIG_CGROUP_BPF=y",
        aya::sys::is_program_supported(ProgramType::CgroupSockAddr).map_err(|err| err.to_string()),
    )?;
    probe(
        "BPF ring buffers",
        "Linux 5.8+",
        aya::sys::is_map_supported(aya::maps::MapType::RingBuf).map_err(|err| err.to_string()),
    )
}

fn probe(
    feature: &'static str,
    needs: &'static str,
    result: std::result::Result<bool, String>,
) -> Result<(), KernelError> {
    match result {
        Ok(true) => Ok(()),
        Ok(false) => Err(KernelError::Feature { feature, needs }),
        Err(message) => Err(KernelError::Probe { feature, message }),
    }
}

/// The capabilities missing from `effective` to load and attach cgroup programs, by name.
fn missing_capabilities(effective: CapabilitySet) -> Option<String> {
    if effective.contains(CapabilitySet::SYS_ADMIN)
        || effective.contains(CapabilitySet::BPF | CapabilitySet::NET_ADMIN)
    {
        return None;
    }
    let missing: Vec<&str> = [
        (CapabilitySet::BPF, "CAP_BPF"),
        (CapabilitySet::NET_ADMIN, "CAP_NET_ADMIN"),
    ]
    .into_iter()
    .filter(|&(cap, _)| !effective.contains(cap))
    .map(|(_, name)| name)
    .collect();
    Some(missing.join(" and "))
}

/// Kernels before 5.11 charge BPF memory to `RLIMIT_MEMLOCK`; later ones ignore it.
fn raise_memlock_limit() {
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    if let Err(err) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        debug!("could not raise RLIMIT_MEMLOCK ({err}); fine on Linux 5.11+");
    }
}

/// The environment variable that, set to `probe`, makes the programs read tasks with
/// `bpf_probe_read_kernel` even where the kernel offers BTF-typed loads.
pub const TASK_READS_ENV: &str = "IMDS_GUARD_TASK_READS";

/// The loaded object: maps created or adopted from the pins, programs verified.
pub struct Kernel {
    ebpf: Ebpf,
    pins: PinDir,
    /// The maps were pinned already: a policy may be in force, and programs reading them.
    adopted: bool,
    /// `LAYOUT_*` bits of what the loaded programs read of tasks.
    task_layout: u32,
}

/// What [`Kernel::attach`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attached {
    /// Links created (and pinned).
    pub created: usize,
    /// Pinned links switched to the new program in place.
    pub updated: usize,
    /// Pinned links on another cgroup, replaced by new ones.
    pub moved: usize,
}

impl Kernel {
    /// Loads the embedded object with its maps pinned in `pins` (reusing those already pinned
    /// there) and runs every program through the verifier.
    ///
    /// # Errors
    /// [`PinError::MapMismatch`] when pinned maps differ from this build's,
    /// [`KernelError::LoadObject`], [`KernelError::MissingInObject`] or
    /// [`KernelError::LoadProgram`] (with the verifier log).
    pub fn load(pins: &PinDir, fold_window_ns: u64) -> Result<Self> {
        check_pinned_layouts(pins)?;
        // Before loading, which pins the maps: a retry must not take its own pins for a
        // predecessor's.
        let adopted = pins.map(GENERATION).exists();
        let found = crate::kernel::btf::task_layout();
        for why in &found.missing {
            warn!("{why}");
        }
        // Three tries, each verified whole: the task read through its BTF-typed pointer
        // (plain loads), then through `bpf_probe_read_kernel`, then not at all. Some kernels
        // do not offer `bpf_get_current_task_btf`, or `bpf_get_current_task` and
        // `bpf_probe_read_kernel`, to these program types; with the layout's bits clear the
        // programs never reach those calls, and the verifier never sees them.
        let btf = TaskLayout {
            known: found.layout.known | LAYOUT_BTF_TASK,
            ..found.layout
        };
        // `IMDS_GUARD_TASK_READS=probe` skips the first try (to compare, or on a kernel whose
        // BTF loads misbehave).
        let first = if std::env::var(TASK_READS_ENV).as_deref() == Ok("probe") {
            found.layout
        } else {
            btf
        };
        let loaded = match Self::load_with(pins, adopted, fold_window_ns, first) {
            Err(KernelError::LoadProgram { program, source })
                if first.known & LAYOUT_BTF_TASK != 0 && found.layout.known != 0 =>
            {
                warn!(
                    "the kernel refused program {program} reading tasks through their BTF \
                     pointer ({source}); trying again with bpf_probe_read_kernel (slower)"
                );
                Self::load_with(pins, adopted, fold_window_ns, found.layout)
            }
            loaded => loaded,
        };
        let loaded = match loaded {
            Err(KernelError::LoadProgram { program, source }) if found.layout.known != 0 => {
                warn!(
                    "the kernel refused program {program} ({source}); trying again without \
                     reading tasks' parents, namespaces and executables, in case those reads \
                     are what it refused: events will not name them, and containers will be \
                     known by their cgroup path alone"
                );
                Self::load_with(pins, adopted, fold_window_ns, TaskLayout::default())
            }
            loaded => loaded,
        };
        Ok(loaded?)
    }

    fn load_with(
        pins: &PinDir,
        adopted: bool,
        fold_window_ns: u64,
        task_layout: TaskLayout,
    ) -> Result<Self, KernelError> {
        let mut loader = EbpfLoader::new();
        for name in imds_guard_common::maps::ALL {
            loader.map_pin_path(name, pins.map(name));
        }
        loader.override_global(TASK_LAYOUT_GLOBAL, &task_layout, true);
        loader.override_global(FOLD_WINDOW_GLOBAL, &fold_window_ns, true);
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|source| KernelError::LoadObject { source })?;
        for name in imds_guard_common::maps::ALL {
            if ebpf.map(name).is_none() {
                return Err(KernelError::MissingInObject { kind: "map", name });
            }
        }
        for name in PROGRAMS {
            let verified = if name == PACKET_PROGRAM {
                program_mut::<CgroupSkb>(&mut ebpf, name)?.load()
            } else {
                program_mut::<CgroupSockAddr>(&mut ebpf, name)?.load()
            };
            verified.map_err(|source| KernelError::LoadProgram {
                program: name,
                source,
            })?;
        }
        Ok(Self {
            ebpf,
            pins: pins.clone(),
            adopted,
            task_layout: task_layout.known,
        })
    }

    /// How the programs tell a container's task: by its namespaces (the kernel's view, at the
    /// attempt, read with plain BTF-checked loads or `bpf_probe_read_kernel`) and cgroup path,
    /// or by its cgroup path alone (the kernel refused the reads, or its BTF lacks the fields).
    #[must_use]
    pub fn container_detection(&self) -> &'static str {
        match (
            self.task_layout & LAYOUT_NAMESPACES != 0,
            self.task_layout & LAYOUT_BTF_TASK != 0,
        ) {
            (true, true) => "namespaces (BTF loads) and cgroup paths",
            (true, false) => "namespaces (probe reads) and cgroup paths",
            (false, _) => "cgroup paths only",
        }
    }

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
        self.zero_rule_counts(compiled.generation())?;
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
        self.zero_rule_counts(new)?;
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
        insert_all(&mut maps::allow(&mut self.ebpf)?, ALLOW, &entries.allow)?;
        insert_all(
            &mut maps::cgroup_rulesets(&mut self.ebpf)?,
            CGROUP_RULESETS,
            &entries.cgroup_rulesets,
        )?;
        let mut settings: Array<_, Settings> = maps::settings(&mut self.ebpf)?;
        settings
            .set(generation, entries.settings, 0)
            .map_err(|source| KernelError::WriteMap {
                map: SETTINGS,
                what: format!("{:?}", entries.settings),
                source,
            })?;
        // The filter first: it must cover every protected address before a program can meet it.
        let mut filter = self.filter()?;
        cover(&mut filter, &entries.protected_v4, &entries.protected_v6);
        self.write_filter(filter)?;
        let protected: Vec<_> = entries
            .protected_v4
            .iter()
            .map(|&key| (key, 0u32))
            .collect();
        insert_all(
            &mut maps::protected_v4(&mut self.ebpf)?,
            PROTECTED_V4,
            &protected,
        )?;
        let protected: Vec<_> = entries
            .protected_v6
            .iter()
            .map(|&key| (key, 0u32))
            .collect();
        insert_all(
            &mut maps::protected_v6(&mut self.ebpf)?,
            PROTECTED_V6,
            &protected,
        )?;
        Ok(())
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
        let v4 = remove_where::<ProtectedV4Key, u32>(
            &mut maps::protected_v4(&mut self.ebpf)?,
            PROTECTED_V4,
            |key| of_generation(key.generation),
        )?;
        let v6 = remove_where::<ProtectedV6Key, u32>(
            &mut maps::protected_v6(&mut self.ebpf)?,
            PROTECTED_V6,
            |key| of_generation(key.generation),
        )?;
        // Only now may the filter forget those addresses: it is rebuilt from what is left.
        let mut filter = ProtectedFilter::default();
        cover(&mut filter, &v4, &v6);
        self.write_filter(filter)
    }

    /// Makes every program judge the tasks of `cgroup`, through links pinned in the pin
    /// directory so that they outlive this process. A link already pinned there for the same
    /// cgroup is switched to the new program in place (`BPF_LINK_UPDATE`: every attempt is
    /// judged by the old program or the new one, never by none). A pinned link on another
    /// cgroup (the attach point changed, or its cgroup is gone) is replaced: the new link is
    /// attached before the old one is detached.
    ///
    /// Links are multi-attach: a delegated subtree can add its own programs, and ours still run.
    ///
    /// # Errors
    /// [`KernelError::Attach`] or [`KernelError::Link`]; links attached before the failure stay.
    pub fn attach(&mut self, cgroup: &Cgroup) -> Result<Attached> {
        let mut attached = Attached::default();
        for name in PROGRAMS {
            let pin = self.pins.link(name);
            let link_error = |action: &'static str| {
                move |source| KernelError::Link {
                    program: name,
                    action,
                    source,
                }
            };
            let Some(old) =
                sys::open_pinned(&pin).map_err(link_error("opening the pinned link"))?
            else {
                let link = self.new_link(name, cgroup)?;
                link.pin(&pin).map_err(|source| KernelError::Link {
                    program: name,
                    action: "pinning the link",
                    source: std::io::Error::other(source),
                })?;
                attached.created += 1;
                continue;
            };
            let state = sys::link_info(old.as_fd_borrowed())
                .map_err(link_error("reading the pinned link"))?;
            if state.cgroup_id == cgroup.id {
                let program = self
                    .ebpf
                    .program(name)
                    .ok_or(KernelError::MissingInObject {
                        kind: "program",
                        name,
                    })?
                    .fd()
                    .map_err(|source| KernelError::LoadProgram {
                        program: name,
                        source,
                    })?;
                sys::link_update(old.as_fd_borrowed(), program.as_fd())
                    .map_err(link_error("switching the pinned link to the new program"))?;
                attached.updated += 1;
                continue;
            }
            // bpffs refuses names with a dot (`EPERM`: reserved by the kernel).
            let staging = pin.with_file_name(format!("{name}-staging"));
            let _ = std::fs::remove_file(&staging);
            let link = self.new_link(name, cgroup)?;
            link.pin(&staging).map_err(|source| KernelError::Link {
                program: name,
                action: "pinning the new link",
                source: std::io::Error::other(source),
            })?;
            if let Err(err) = sys::link_detach(old.as_fd_borrowed()) {
                // Its cgroup is gone already: nothing to detach.
                debug!(program = name, "old link not detached: {err}");
            }
            std::fs::rename(&staging, &pin).map_err(link_error("replacing the pinned link"))?;
            info!(
                program = name,
                from_cgroup_id = state.cgroup_id,
                to = %cgroup.path,
                "replaced the pinned link"
            );
            attached.moved += 1;
        }
        for dir in self.pins.other_map_dirs() {
            // Maps of another layout: no program of ours reads them any more.
            let removed = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .try_for_each(|entry| std::fs::remove_file(entry.path()))
                .and_then(|()| std::fs::remove_dir(&dir));
            match removed {
                Ok(()) => info!(dir = %dir.display(), "removed the maps of another layout"),
                Err(err) => warn!("cannot remove the old maps in {}: {err}", dir.display()),
            }
        }
        Ok(attached)
    }

    fn new_link(&mut self, name: &'static str, cgroup: &Cgroup) -> Result<FdLink> {
        let file = File::open(&cgroup.dir).map_err(|source| CgroupError::Inspect {
            dir: cgroup.dir.clone(),
            source,
        })?;
        let attach_error = |source| KernelError::Attach {
            program: name,
            cgroup: cgroup.dir.clone(),
            source,
        };
        let pinnable = |source: aya::programs::links::LinkError| KernelError::Link {
            program: name,
            action: "making the link pinnable (needs Linux 5.7+)",
            source: std::io::Error::other(source),
        };
        if name == PACKET_PROGRAM {
            let program: &mut CgroupSkb = program_mut(&mut self.ebpf, name)?;
            let id = program
                .attach(
                    file.as_fd(),
                    CgroupSkbAttachType::Egress,
                    multi_attach_mode(),
                )
                .map_err(attach_error)?;
            let link = program.take_link(id).map_err(attach_error)?;
            return Ok(FdLink::try_from(link).map_err(pinnable)?);
        }
        let program: &mut CgroupSockAddr = program_mut(&mut self.ebpf, name)?;
        let id = program
            .attach(file.as_fd(), multi_attach_mode())
            .map_err(attach_error)?;
        let link = program.take_link(id).map_err(attach_error)?;
        Ok(FdLink::try_from(link).map_err(pinnable)?)
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

    /// Attempts decided by each rule of `generation` (index 0: by no rule), summed over CPUs.
    ///
    /// # Errors
    /// [`KernelError::OpenMap`] or [`KernelError::ReadMap`].
    pub fn rule_counts(&mut self, generation: u32, rules: u32) -> Result<Vec<u64>, KernelError> {
        let map: PerCpuArray<_, u64> = maps::rule_counters(&mut self.ebpf)?;
        (0..=rules.min(MAX_RULES))
            .map(|rule| {
                map.get(&rule_counter_index(generation, rule), 0)
                    .map(|values| values.iter().sum())
                    .map_err(|source| KernelError::ReadMap {
                        map: RULE_COUNTERS,
                        source,
                    })
            })
            .collect()
    }

    fn zero_rule_counts(&mut self, generation: u32) -> Result<(), KernelError> {
        let mut map: PerCpuArray<_, u64> = maps::rule_counters(&mut self.ebpf)?;
        let cpus =
            aya::util::nr_cpus().map_err(|(_, source)| KernelError::PossibleCpus { source })?;
        for rule in 0..=MAX_RULES {
            // One value per possible CPU, as many as were just counted: only a wrong count fails.
            let zeroes = aya::maps::PerCpuValues::try_from(vec![0u64; cpus])
                .map_err(|source| KernelError::PossibleCpus { source })?;
            map.set(rule_counter_index(generation, rule), zeroes, 0)
                .map_err(|source| KernelError::WriteMap {
                    map: RULE_COUNTERS,
                    what: format!("zero count of rule {rule}"),
                    source,
                })?;
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

    /// Sums the per-CPU counters.
    ///
    /// # Errors
    /// [`KernelError::OpenMap`] or [`KernelError::ReadMap`].
    pub fn counters(&mut self) -> Result<Counters, KernelError> {
        maps::counters(&mut self.ebpf)
    }
}

/// Refuses pinned maps whose type or sizes differ from this build's: they belong to a build
/// that changed the layout without changing `MAPS_LAYOUT_VERSION`, and reading them would be
/// reading garbage.
fn check_pinned_layouts(pins: &PinDir) -> Result<()> {
    let object = aya_obj::Object::parse(OBJECT).map_err(|source| KernelError::LoadObject {
        source: aya::EbpfError::ParseError(source),
    })?;
    for name in imds_guard_common::maps::ALL {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let Some(expected) = object.maps.get(name) else {
            return Err(KernelError::MissingInObject { kind: "map", name }.into());
        };
        let pinned = aya::maps::MapInfo::from_pin(&path)
            .map_err(|source| KernelError::OpenMap { map: name, source })?;
        let layout = |key: u32, value: u32, entries: u32| format!("{key}/{value}/{entries}");
        let (have, want) = (
            layout(pinned.key_size(), pinned.value_size(), pinned.max_entries()),
            layout(
                expected.key_size(),
                expected.value_size(),
                expected.max_entries(),
            ),
        );
        if have != want {
            return Err(PinError::MapMismatch {
                map: name,
                path,
                pinned: have,
                expected: want,
            }
            .into());
        }
    }
    Ok(())
}

/// The attach mode that gives `BPF_F_ALLOW_MULTI` semantics.
///
/// From Linux 5.7 aya attaches with `bpf_link_create`, whose links are always multi-attach and
/// which refuses any flag (`EINVAL`): that is aya's `Single` (flags 0). Before 5.7 it uses
/// `bpf_prog_attach`, where multi-attach must be asked for.
fn multi_attach_mode() -> CgroupAttachMode {
    use aya::util::KernelVersion;
    // The same test aya makes, where an unreadable version counts as old.
    let links =
        KernelVersion::current().is_ok_and(|version| version >= KernelVersion::new(5, 7, 0));
    if links {
        CgroupAttachMode::Single
    } else {
        CgroupAttachMode::AllowMultiple
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
fn cover(filter: &mut ProtectedFilter, v4: &[ProtectedV4Key], v6: &[ProtectedV6Key]) {
    for key in v4 {
        filter_set(&mut filter.v4, filter_slot_v4(key.addr));
    }
    for key in v6 {
        filter_set(&mut filter.v6, filter_slot_v6(key.addr));
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

/// Program `name` of the object, as its type (`CgroupSockAddr`, `CgroupSkb`).
fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, KernelError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(KernelError::MissingInObject {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| KernelError::LoadProgram {
            program: name,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_capabilities_are_missing() {
        assert_eq!(missing_capabilities(CapabilitySet::SYS_ADMIN), None);
        assert_eq!(
            missing_capabilities(CapabilitySet::BPF | CapabilitySet::NET_ADMIN),
            None
        );
        assert_eq!(
            missing_capabilities(CapabilitySet::BPF | CapabilitySet::SYS_PTRACE).as_deref(),
            Some("CAP_NET_ADMIN")
        );
        assert_eq!(
            missing_capabilities(CapabilitySet::empty()).as_deref(),
            Some("CAP_BPF and CAP_NET_ADMIN")
        );
    }

    /// The names the agent uses exist in the embedded object, with the expected types.
    #[test]
    fn object_has_every_map_and_program() {
        let object = aya_obj::Object::parse(OBJECT).expect("embedded object parses");
        for name in imds_guard_common::maps::ALL {
            assert!(
                object.maps.contains_key(name),
                "map {name} missing from the object"
            );
        }
        for name in PROGRAMS {
            assert!(object.programs.contains_key(name), "program {name} missing");
        }
    }
}

//! Loading: whether this process and kernel can run the programs ([`preflight`]), and the
//! embedded object loaded with its maps pinned (or adopted from the pins) and every program
//! through the verifier ([`Kernel::load`]), retrying with fewer task reads where a kernel
//! refuses them.

use aya::{
    Ebpf, EbpfLoader,
    programs::{Program, ProgramType},
    sys::BpfHelper,
};
use imds_guard_common::{
    event::{
        CONTAINERS_BY_CGROUP_PATHS, FOLD_CLOCK_GLOBAL, FOLD_WINDOW_GLOBAL, LAYOUT_BTF_TASK,
        TASK_LAYOUT_GLOBAL, TaskLayout, containers_by_names, containers_by_of,
    },
    maps::GENERATION,
    programs,
};
use rustix::thread::CapabilitySet;
use tracing::{debug, info, warn};

use super::{Kernel, KernelError, PACKET_PROGRAM, in_force::InForce};
use crate::{
    host::clock::Clock,
    kernel::pins::{PinDir, PinError},
};

/// The kernel object built by `build.rs` from `imds-guard-ebpf` (public for the benchmarks,
/// which attach its `bench_noop4` baseline program).
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/imds-guard-ebpf"));

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
/// `bpf_probe_read_kernel` even where the kernel offers BTF-typed loads; set to `none`, read
/// nothing of tasks, as on a kernel that refuses both (containers known by their cgroup path
/// alone): to compare, or to test that mode.
pub const TASK_READS_ENV: &str = "IMDS_GUARD_TASK_READS";

impl Kernel {
    /// Loads the embedded object with its maps pinned in `pins` (reusing those already pinned
    /// there) and runs every program through the verifier.
    ///
    /// # Errors
    /// [`PinError::MapMismatch`] when pinned maps differ from this build's,
    /// [`KernelError::LoadObject`], [`KernelError::MissingInObject`],
    /// [`KernelError::LoadProgram`] (with the verifier log) or
    /// [`KernelError::WeakerThanInForce`]. The maps a failed load pinned where none were (its
    /// own) are removed again: nothing may take them for a policy in force.
    pub fn load(pins: &PinDir, fold_window_ns: u64) -> Result<Self, KernelError> {
        check_pinned_layouts(pins)?;
        // Before loading, which pins the maps: a retry must not take its own pins for a
        // predecessor's.
        let adopted = pins.map(GENERATION).exists();
        let loaded = Self::load_tries(pins, fold_window_ns, adopted);
        if loaded.is_err() && !adopted {
            let maps = pins.maps_dir();
            if let Err(err) = std::fs::remove_dir_all(&maps)
                && err.kind() != std::io::ErrorKind::NotFound
            {
                warn!(
                    "cannot remove the maps this start pinned in {}: {err}",
                    maps.display()
                );
            }
        }
        loaded
    }

    /// [`Kernel::load`]'s tries.
    fn load_tries(pins: &PinDir, fold_window_ns: u64, adopted: bool) -> Result<Self, KernelError> {
        let clock = fold_clock();
        let folding = Folding {
            window_ns: fold_window_ns,
            clock,
            clock_global: clock.fold_clock_global(),
        };
        // The kernel's BTF is read twice, for the task layout and by aya's loader (for its
        // relocations): at once, on two threads.
        // A thread that cannot be made (the agent at its pids limit) is not a reason to fail:
        // then one after the other.
        let (found, prepared) = std::thread::scope(|scope| {
            let layout = std::thread::Builder::new()
                .name("task-layout".into())
                .spawn_scoped(scope, crate::kernel::btf::task_layout);
            let prepared = EbpfLoader::new();
            let found = match layout {
                Ok(layout) => layout
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                Err(_) => crate::kernel::btf::task_layout(),
            };
            (found, prepared)
        });
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
        // BTF loads misbehave); `none` the first two.
        let asked = std::env::var(TASK_READS_ENV);
        let first = match asked.as_deref() {
            Ok("probe") => found.layout,
            Ok("none") => TaskLayout {
                known: 0,
                ..found.layout
            },
            _ => btf,
        };
        let loaded = match Self::load_with(prepared, pins, adopted, &folding, &first) {
            Err(KernelError::LoadProgram { program, source })
                if first.known & LAYOUT_BTF_TASK != 0 && found.layout.known != 0 =>
            {
                warn!(
                    "the kernel refused program {program} reading tasks through their BTF \
                     pointer ({}); trying again with bpf_probe_read_kernel (slower)",
                    refusal(&source)
                );
                Self::load_with(EbpfLoader::new(), pins, adopted, &folding, &found.layout)
            }
            loaded => loaded,
        };
        let kernel = match loaded {
            Err(KernelError::LoadProgram { program, source }) if found.layout.known != 0 => {
                // Before a third try: what would not start is not loaded.
                weaker_than_in_force(pins, || {
                    format!(
                        "the kernel refused program {program} as it reads tasks, perhaps for \
                         those reads ({})",
                        refusal(&source)
                    )
                })?;
                warn!(
                    "the kernel refused program {program} ({}); trying again without \
                     reading tasks' parents, namespaces and executables, in case those reads \
                     are what it refused: events will not name them, and containers will be \
                     known by their cgroup path alone",
                    refusal(&source)
                );
                Self::load_with(
                    EbpfLoader::new(),
                    pins,
                    adopted,
                    &folding,
                    &TaskLayout::default(),
                )
            }
            loaded => loaded,
        }?;
        // Without the reads by the third try (checked above), or because they were never
        // tried: this kernel's BTF lacks their fields.
        if kernel.containers_by() == CONTAINERS_BY_CGROUP_PATHS && asked.as_deref() != Ok("none") {
            weaker_than_in_force(pins, || {
                format!(
                    "this kernel's BTF lacks what the programs read of tasks ({})",
                    found.missing.join("; ")
                )
            })?;
        }
        Ok(kernel)
    }

    fn load_with<'a>(
        mut loader: EbpfLoader<'a>,
        pins: &PinDir,
        adopted: bool,
        folding: &'a Folding,
        task_layout: &'a TaskLayout,
    ) -> Result<Self, KernelError> {
        for name in imds_guard_common::maps::ALL {
            loader.map_pin_path(name, pins.map(name));
        }
        loader.override_global(TASK_LAYOUT_GLOBAL, task_layout, true);
        loader.override_global(FOLD_WINDOW_GLOBAL, &folding.window_ns, true);
        loader.override_global(FOLD_CLOCK_GLOBAL, &folding.clock_global, true);
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|source| KernelError::LoadObject { source })?;
        for name in imds_guard_common::maps::ALL {
            if ebpf.map(name).is_none() {
                return Err(KernelError::MissingInObject { kind: "map", name });
            }
        }
        verify_all(&mut ebpf)?;
        Ok(Self {
            ebpf,
            pins: pins.clone(),
            adopted,
            task_layout: task_layout.known,
            fold_clock: folding.clock,
        })
    }

    /// The clock that times the programs' fold windows (the times in `FOLDS`).
    #[must_use]
    pub fn fold_clock(&self) -> Clock {
        self.fold_clock
    }

    /// How the programs tell a container's task (`CONTAINERS_BY_*`): by its namespaces (the
    /// kernel's view, at the attempt, read with plain BTF-checked loads or
    /// `bpf_probe_read_kernel`) and cgroup path, or by its cgroup path alone (the kernel refused
    /// the reads, or its BTF lacks the fields).
    #[must_use]
    pub fn containers_by(&self) -> u32 {
        containers_by_of(self.task_layout)
    }

    /// [`Kernel::containers_by`] in words.
    #[must_use]
    pub fn container_detection(&self) -> &'static str {
        containers_by_names(self.containers_by()).0
    }
}

/// Refuses to run with containers known by their cgroup path alone (`why`) where the programs
/// in force tell (or may tell) them by more: those stay, as strong as they are
/// ([`KernelError::WeakerThanInForce`]). Falling back to the cgroup paths weakens nothing on a
/// first start (nothing is enforced until this agent attaches, and weaker enforcement beats
/// none), nor after an agent that ran so; `IMDS_GUARD_TASK_READS=none` asks for it anyway.
///
/// The programs in force are read here, only when this agent would run without the reads (a
/// load neither reads nor changes the links), not at every start.
fn weaker_than_in_force(pins: &PinDir, why: impl FnOnce() -> String) -> Result<(), KernelError> {
    let in_force = InForce::read(pins);
    if !in_force.stronger_than_cgroup_paths() {
        return Ok(());
    }
    Err(KernelError::WeakerThanInForce {
        why: why(),
        pin_dir: pins.root().to_owned(),
        in_force: in_force.describe().unwrap_or_default(),
    })
}

/// The globals every try sets alike (aya's loader keeps a reference to each value until it
/// loads).
struct Folding {
    /// `FOLD_WINDOW_NS`.
    window_ns: u64,
    /// The clock that times fold windows, and its `FOLD_CLOCK`.
    clock: Clock,
    clock_global: u32,
}

/// The program types that fold repeats (every one that reports an attempt).
const FOLDING_PROGRAM_TYPES: [ProgramType; 3] = [
    ProgramType::CgroupSockAddr,
    ProgramType::CgroupSkb,
    ProgramType::SkMsg,
];

/// The clock to time fold windows with: the coarse one where each program type that folds may
/// call `bpf_ktime_get_coarse_ns` (Linux 5.11+), else the boot clock (a repeat then costs the
/// clock source's read, about 40 ns on a virtual machine's).
fn fold_clock() -> Clock {
    let refused: Vec<String> = FOLDING_PROGRAM_TYPES
        .into_iter()
        .filter_map(|program_type| {
            match aya::sys::is_helper_supported(
                program_type,
                BpfHelper::BPF_FUNC_ktime_get_coarse_ns,
            ) {
                Ok(true) => None,
                Ok(false) => Some(format!("{program_type:?}: no")),
                Err(err) => Some(format!("{program_type:?}: {err}")),
            }
        })
        .collect();
    if refused.is_empty() {
        debug!("fold windows are timed by CLOCK_MONOTONIC_COARSE");
        Clock::MonotonicCoarse
    } else {
        info!(
            "the kernel offers no coarse clock to these programs ({}; Linux 5.11+ does): fold \
             windows are timed by CLOCK_BOOTTIME, which costs each folded repeat more",
            refused.join(", ")
        );
        Clock::Boot
    }
}

/// Refuses pinned maps whose type or sizes differ from this build's: they belong to a build
/// that changed the layout without changing `MAPS_LAYOUT_VERSION`, and reading them would be
/// reading garbage.
fn check_pinned_layouts(pins: &PinDir) -> Result<(), KernelError> {
    let object = aya_obj::Object::parse(OBJECT).map_err(|source| KernelError::LoadObject {
        source: aya::EbpfError::ParseError(source),
    })?;
    for name in imds_guard_common::maps::ALL {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let Some(expected) = object.maps.get(name) else {
            return Err(KernelError::MissingInObject { kind: "map", name });
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

/// Program `name` of the object, as its type (`CgroupSockAddr`, `CgroupSkb`).
pub(super) fn program_mut<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut P, KernelError>
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

/// Why the kernel refused a program, in a line: the error, and the verifier's last words
/// (its whole log, thousands of lines when a program is too complex, is for the fatal error).
pub(super) fn refusal(source: &aya::programs::ProgramError) -> String {
    match source {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            // Its last line before the statistics (`processed N insns ...`, `stack depth`).
            let said = log
                .lines()
                .map(str::trim)
                .rev()
                .find(|line| {
                    !(line.is_empty()
                        || line.starts_with("processed ")
                        || line.starts_with("stack depth")
                        || line.starts_with("verification time"))
                })
                .unwrap_or("nothing");
            format!("{io_error}; the verifier said: {said}")
        }
        other => other.to_string(),
    }
}

/// The programs, the longest to verify first: they are verified on every CPU at once (each
/// `BPF_PROG_LOAD` runs the verifier in the calling thread). On 6.18: `http_msg` 33,000
/// instructions, `egress` 24,000, each socket hook 18,000, `sock_ops` 200.
const VERIFY_ORDER: [&str; 7] = [
    programs::HTTP_MSG,
    PACKET_PROGRAM,
    programs::CONNECT6,
    programs::SENDMSG6,
    programs::CONNECT4,
    programs::SENDMSG4,
    programs::SOCK_OPS,
];

/// Runs every program of `ebpf` through the verifier, on up to as many threads as CPUs. A
/// program refused there is verified again alone, once the others are done: verifications at
/// once need more kernel memory at once, and a refusal for that (`ENOMEM`) must not send the
/// caller down to fewer task reads. A refusal alone is the error (the first in
/// [`VERIFY_ORDER`]); the caller then drops `ebpf`, which unloads what was loaded.
fn verify_all(ebpf: &mut Ebpf) -> Result<(), KernelError> {
    use std::sync::{Mutex, PoisonError};
    let mut found: Vec<Mutex<(&'static str, &mut Program)>> = Vec::new();
    let mut all: Vec<(&str, &mut Program)> = ebpf.programs_mut().collect();
    for name in VERIFY_ORDER {
        let index = all
            .iter()
            .position(|(candidate, _)| *candidate == name)
            .ok_or(KernelError::MissingInObject {
                kind: "program",
                name,
            })?;
        found.push(Mutex::new((name, all.swap_remove(index).1)));
    }
    let next = Mutex::new(0..found.len());
    let threads =
        std::thread::available_parallelism().map_or(1, |n| n.get().min(VERIFY_ORDER.len()));
    // The calling thread is one of the workers: a thread that cannot be made (the agent at
    // its pids limit) only means fewer at once.
    let work = || {
        let mut refused = Vec::new();
        loop {
            let taken = next.lock().unwrap_or_else(PoisonError::into_inner).next();
            let Some(index) = taken else {
                return refused;
            };
            // Each program is taken by one thread: its lock is never contended.
            let mut entry = found[index].lock().unwrap_or_else(PoisonError::into_inner);
            let (name, program) = &mut *entry;
            if verify(name, program).is_err() {
                refused.push(index);
            }
        }
    };
    let mut refused: Vec<usize> = std::thread::scope(|scope| {
        let others: Vec<_> = (1..threads)
            .filter_map(|_| std::thread::Builder::new().spawn_scoped(scope, work).ok())
            .collect();
        let mut refused = work();
        for other in others {
            refused.extend(
                other
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            );
        }
        refused
    });
    refused.sort_unstable();
    for index in refused {
        let mut entry = found[index].lock().unwrap_or_else(PoisonError::into_inner);
        let (name, program) = &mut *entry;
        verify(name, program)?;
    }
    drop(found);
    for name in programs::ALL.into_iter().chain([programs::HTTP_MSG]) {
        log_verified(ebpf, name);
    }
    Ok(())
}

/// Loads one program: the verifier runs in this thread.
fn verify(name: &'static str, program: &mut Program) -> Result<(), KernelError> {
    let refused = |source| KernelError::LoadProgram {
        program: name,
        source,
    };
    match program {
        Program::CgroupSkb(program) => program.load().map_err(refused),
        Program::SockOps(program) => program.load().map_err(refused),
        Program::SkMsg(program) => program.load().map_err(refused),
        Program::CgroupSockAddr(program) => program.load().map_err(refused),
        _ => Err(KernelError::MissingInObject {
            kind: "program of its kind",
            name,
        }),
    }
}

/// How many instructions the verifier went through for `name` (Linux 5.16+), at debug level:
/// the headroom below its limit of a million on this kernel.
fn log_verified(ebpf: &Ebpf, name: &str) {
    let count = ebpf
        .program(name)
        .and_then(|program| program.info().ok())
        .and_then(|info| info.verified_instruction_count());
    if let Some(count) = count {
        debug!(program = name, verified_instructions = count, "verified");
    }
}

/// The verifier's hint after a refused program (for [`KernelError::LoadProgram`]).
pub(super) fn verifier_hint(source: &aya::programs::ProgramError) -> &'static str {
    if matches!(source, aya::programs::ProgramError::LoadError { .. }) {
        "\n(the verifier log above says which instruction it refused; a kernel older than \
         Linux 5.8 lacks helpers these programs use)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_is_verified_once() {
        let mut wanted: Vec<&str> = programs::ALL
            .into_iter()
            .chain([programs::HTTP_MSG])
            .collect();
        let mut ordered = VERIFY_ORDER.to_vec();
        wanted.sort_unstable();
        ordered.sort_unstable();
        assert_eq!(ordered, wanted);
    }

    #[test]
    fn a_refusal_is_one_line_with_the_verifiers_last_words() {
        let refused = |log: &str, errno: i32| aya::programs::ProgramError::LoadError {
            io_error: std::io::Error::from_raw_os_error(errno),
            verifier_log: aya_obj::VerifierLog::new(log.to_owned()),
        };
        // Linux 6.1 on a program too complex for it: thousands of lines, then these.
        let too_large = "0: R1=ctx(off=0,imm=0) R10=fp0\n; if x {\n1: (61) r2 = *(u32 *)(r6 +80)\n\
            BPF program is too large. Processed 1000001 insn\n\
            processed 1000001 insns (limit 1000000) max_states_per_insn 67 total_states 17606\n\
            stack depth 248+48+24+72+0+0\n";
        assert_eq!(
            refusal(&refused(too_large, 7)),
            "Argument list too long (os error 7); the verifier said: BPF program is too large. \
             Processed 1000001 insn"
        );
        // Linux 5.10, which lacks bpf_get_current_task_btf (helper 158), as its lab VM said.
        let unknown = "0: R1=ctx(off=0,imm=0) R10=fp0\n\
            134: (85) call unknown#158\ninvalid func unknown#158\n\
            processed 134 insns (limit 1000000) max_states_per_insn 0 total_states 6\n\n";
        assert_eq!(
            refusal(&refused(unknown, 22)),
            "Invalid argument (os error 22); the verifier said: invalid func unknown#158"
        );
        assert_eq!(
            refusal(&refused("", 1)),
            "Operation not permitted (os error 1); the verifier said: nothing"
        );
    }

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
        for name in programs::ALL {
            assert!(object.programs.contains_key(name), "program {name} missing");
        }
    }
}

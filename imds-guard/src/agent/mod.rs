//! `imds-guard run`: settings → policy → maps → attached programs, then events until a signal.
//!
//! [`run`] validates everything before the first program is attached, then starts: loads the
//! programs, reports what an earlier agent left in the ring, puts the policy in force (adopting
//! a pinned one as a reload would), attaches. [`serve::serve`] runs the agent from there;
//! [`enforcement::Enforcement`] keeps the policy in force and follows the cgroup tree.

pub mod enforcement;
pub mod metrics;
pub mod serve;

use tracing::info;

use self::{
    enforcement::{Enforcement, newest, warn_of_room, warn_of_weak_rules, warn_too_deep},
    metrics::Metrics,
    serve::Running,
};
use crate::{
    cli::RunArgs,
    config::Config,
    error::{CgroupError, Error, Result},
    events::reporter::{FoldMap, Reporter, delete_fold, fold_entries},
    host::{
        cgroups::{Cgroup, Hierarchy},
        follow::Watcher,
        pidfile::PidFile,
    },
    kernel::{self, Kernel, pins::PinDir},
    policy::{Policy, compile::Compiled},
};

/// Everything checked and taken before anything changes on the host.
struct Prepared {
    config: Config,
    hierarchy: Hierarchy,
    attach: Cgroup,
    policy: Policy,
    metrics_listener: Option<std::net::TcpListener>,
    pid_file: PidFile,
    pins: PinDir,
    watcher: Watcher,
}

/// Runs the agent until SIGTERM or SIGINT.
///
/// Everything is validated and resolved before the first program is attached: bad settings,
/// missing capabilities or kernel features fail here with nothing changed on the host.
///
/// # Errors
/// Any [`crate::error::Error`]; when it happens after attaching, the programs stay attached
/// (enforcement outlives the agent), with the policy last put in force.
pub fn run(args: &RunArgs) -> Result<()> {
    let mut prepared = prepare(args)?;
    let fold_window_ns = u64::from(args.aggregate_window) * 1_000_000_000;
    let mut kernel = Kernel::load(&prepared.pins, fold_window_ns)?;
    // Events raised while no agent ran wait in the pinned ring: report them before a new
    // policy reuses their generation's slot (their rules are named by number).
    let mut events = kernel.take_events()?;
    let fold_map = fold_map(&mut kernel, fold_window_ns)?;
    // Before the walk that takes the map's counts as reported: what is folded after it is
    // this agent's to report.
    let folded_at_start = kernel.counters()?.folded;
    let mut reporter = Reporter::new(
        Hierarchy::at(prepared.hierarchy.mount().to_owned()),
        fold_map,
        fold_window_ns,
        kernel.fold_clock(),
        folded_at_start,
    );
    let earlier = reporter.drain_all(&mut events);
    if earlier > 0 {
        info!(
            events = earlier,
            "reported the events raised while no agent ran"
        );
    }
    let enforcement = start(args, &mut prepared, kernel, &mut reporter)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Runtime { source })?;
    let running = Running {
        enforcement,
        reporter,
    };
    let served = runtime.block_on(serve::serve(
        running,
        events,
        prepared.watcher,
        prepared.pid_file,
        prepared.metrics_listener,
        prepared.config.posture,
    ));
    // A posture check under way (blocking, seconds at most) is not waited for.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    served
}

/// Reads and checks everything the agent needs, and takes what it must hold (the pid file, the
/// metrics address): nothing on the host changes yet.
fn prepare(args: &RunArgs) -> Result<Prepared> {
    let config = Config::load(args.config.as_deref(), &args.overrides())?;
    let hierarchy = Hierarchy::discover()?;
    let attach = hierarchy.resolve(&config.attach.origin, &config.attach.value)?;
    let policy = Policy::resolve(&config, &hierarchy)?;
    warn_of_weak_rules(&policy);
    kernel::preflight()?;
    let metrics_listener = args.metrics_addr.map(metrics::bind).transpose()?;
    let pid_file = PidFile::lock(&args.pid_file)?;
    let pins = PinDir::new(&args.pin_dir);
    pins.prepare()?;
    pins.check_takeover(&attach, &hierarchy)?;
    let watcher = Watcher::new().map_err(|source| CgroupError::Watch { source })?;
    Ok(Prepared {
        config,
        hierarchy,
        attach,
        policy,
        metrics_listener,
        pid_file,
        pins,
        watcher,
    })
}

/// Puts the policy in force for the cgroups that exist (switching from a pinned one, as a
/// reload does) and attaches the programs.
fn start<'a>(
    args: &'a RunArgs,
    prepared: &mut Prepared,
    mut kernel: Kernel,
    reporter: &mut Reporter,
) -> Result<Enforcement<'a>> {
    let generation = if kernel.adopted() {
        kernel.inactive_generation()?
    } else {
        0
    };
    let dirs = prepared
        .watcher
        .scan(&prepared.hierarchy, &prepared.attach.path);
    let policy = prepared.policy.clone();
    let (compiled, too_deep) = Compiled::new(policy, generation, &prepared.attach.path, &dirs);
    warn_too_deep(&too_deep);
    warn_of_room(&compiled);
    if kernel.adopted() {
        // The previous agent's policy is in force: switch from it, as a reload does.
        kernel.switch_to(&compiled)?;
        reporter.set_policy(generation, compiled.policy.clone());
        reporter.retire(generation ^ 1);
    } else {
        kernel.install(&compiled)?;
        reporter.set_policy(generation, compiled.policy.clone());
    }
    let mut metrics = Metrics::new(kernel.counters()?);
    metrics.set_containers_by(kernel.containers_by());
    metrics.start_generation(&mut kernel, generation, compiled.policy.rules.len());
    let links = kernel.attach(&prepared.attach)?;
    info!(
        cgroup = %prepared.attach.path,
        mode = %compiled.policy.mode,
        rules_from = %prepared.config.rules_source(),
        containers_by = kernel.container_detection(),
        fold_clock = kernel.fold_clock().name(),
        rules = compiled.policy.rules.len(),
        protected = ?compiled.policy.protect,
        cgroup_entries = compiled.cgroup_entries(),
        watched_cgroups = prepared.watcher.watched(),
        pins = %prepared.pins.root().display(),
        links_created = links.created,
        links_updated = links.updated,
        links_moved = links.moved,
        adopted = kernel.adopted(),
        "imds-guard is enforcing"
    );
    Ok(Enforcement::new(
        args,
        prepared.config.attach.clone(),
        prepared.attach.path.clone(),
        Hierarchy::at(prepared.hierarchy.mount().to_owned()),
        kernel,
        compiled,
        (newest(&dirs), prepared.watcher.take_unwatched()),
        metrics,
    ))
}

/// The kernel's fold map when repeats are folded (`fold_window_ns` > 0). When they are not,
/// what an earlier agent's programs folded is deleted, or the next agent that folds again could
/// count a later policy's attempts as repeats of those bursts.
fn fold_map(kernel: &mut Kernel, fold_window_ns: u64) -> Result<Option<FoldMap>> {
    let mut map = kernel.take_folds()?;
    if fold_window_ns > 0 {
        return Ok(Some(map));
    }
    for (key, _) in fold_entries(&map).entries {
        delete_fold(&mut map, &key);
    }
    Ok(None)
}

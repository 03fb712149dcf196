//! Prometheus metrics (`--metrics-addr`, off by default), encoded by `prometheus-client` and
//! served over HTTP by `hyper`.
//!
//! The numbers come from the kernel's per-CPU counters, read by the agent's loop when a scrape
//! asks (so the reply is as fresh as the kernel): the HTTP task sends the request over a channel
//! and the loop answers with the encoded text. Counters count since this agent started. Label
//! values are bounded: verdicts are three, and rule names come from the config (at most
//! `MAX_RULES`, plus `default`).

use std::net::SocketAddr;

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use imds_guard_common::{
    decide::verdict_of,
    event::{VERDICT_ALLOW, VERDICT_AUDIT},
    policy::{RULE_FLAG_AUDIT, RuleValue},
};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::{
    error::{Error, Result},
    host::posture::{HttpTokens, Posture},
    kernel::{Counters, Kernel},
    policy::Policy,
    policy::compile::Compiled,
};

/// A scrape waiting for the loop to answer with the encoded metrics.
pub type Scrape = oneshot::Sender<String>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule: String,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PostureLabels {
    http_tokens: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ContainersByLabels {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    rule: String,
    imds_version: &'static str,
}

/// The `imds_version` label of each slot of [`Kernel::http_counts`]' arrays (the order of
/// `imds_guard_common::http::COUNTED_VERSIONS`).
const IMDS_VERSION_LABELS: [&str; 3] = ["v1", "v2", "token"];

/// The agent's metrics and what the kernel's counters said last.
pub struct Metrics {
    registry: Registry,
    attempts: Family<VerdictLabels, Counter>,
    by_rule: Family<RuleLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    http: HttpMetrics,
    posture: Family<PostureLabels, Gauge>,
    hop_limit: Gauge,
    containers_by: Family<ContainersByLabels, Gauge>,
    events: EventMetrics,
    reloads: Counter,
    failed_reloads: Counter,
    policy: PolicyMetrics,
    /// Kernel totals at the last update.
    seen: Counters,
    /// Per-rule counts of each generation at the last update.
    seen_by_rule: [Vec<u64>; 2],
    /// Per-rule HTTP request counts (v1, v2, token) of each generation at the last update.
    seen_requests: [Vec<[u64; 3]>; 2],
    /// The generation before the one in force, and its policy: its open connections' requests.
    retired: Option<(u32, Policy)>,
    /// Events reported, repeats aggregated and repeats found evicted unreported at the last
    /// update.
    events_seen: (u64, u64, u64),
    reloads_seen: (u32, u32),
}

/// Where every denied or audited attempt went: reported, aggregated, unreported or lost.
struct EventMetrics {
    lost: Counter,
    reported: Counter,
    aggregated: Counter,
    unreported: Counter,
}

impl EventMetrics {
    fn register(registry: &mut Registry) -> Self {
        Self {
            lost: counter(
                registry,
                "events_lost",
                "Denied or audited attempts whose event did not fit in the ring buffer",
            ),
            reported: counter(
                registry,
                "events_reported",
                "Attempts reported at once, each as an event",
            ),
            aggregated: counter(
                registry,
                "events_aggregated",
                "Repeats of a reported attempt, reported as counts in aggregate events (with \
                 events_reported, events_lost and repeats_unreported: every denied or audited \
                 attempt)",
            ),
            unreported: counter(
                registry,
                "repeats_unreported",
                "Repeats whose fold entry was evicted before the agent reported them (found \
                 when the agent walks the fold map; exact in the log when it stops)",
            ),
        }
    }
}

/// What the message layer could not judge or follow, and what it refused.
struct HttpMetrics {
    refused: Counter,
    unjudged: Counter,
    unfollowed: Counter,
}

impl HttpMetrics {
    fn register(registry: &mut Registry) -> Self {
        Self {
            refused: counter(
                registry,
                "http_refused",
                "HTTP requests to protected addresses refused (imds = \"v2\", paths, deny_paths)",
            ),
            unjudged: counter(
                registry,
                "http_unjudged",
                "Writes, and segments carrying bytes no write was read for (each retransmission \
                 too), on followed connections that could not be judged: refused where the rule \
                 judges requests",
            ),
            unfollowed: counter(
                registry,
                "http_unfollowed",
                "Connections to a protected port 80 the message layer could not follow (its \
                 socket map was full): their requests were not read",
            ),
        }
    }
}

/// The policy in force and how much of the cgroup tree it covers.
struct PolicyMetrics {
    rules: Gauge,
    cgroup_entries: Gauge,
    cgroups_dropped: Gauge,
    cgroups_unseen: Gauge,
    rulesets: Gauge,
    protected: Gauge,
}

impl PolicyMetrics {
    fn register(registry: &mut Registry) -> Self {
        Self {
            rules: gauge(registry, "policy_rules", "Rules in the policy in force"),
            cgroup_entries: gauge(
                registry,
                "policy_cgroup_entries",
                "Cgroups with an entry in the policy in force",
            ),
            cgroups_dropped: gauge(
                registry,
                "policy_cgroups_dropped",
                "Cgroups whose rules would add to their parent's but found no room in the map \
                 (they keep their parent's: fail closed)",
            ),
            cgroups_unseen: gauge(
                registry,
                "cgroups_unseen",
                "1 while cgroups newer than the agent's last complete view get only the rules \
                 that hold in every cgroup (lost notifications being rescanned, or a full map)",
            ),
            rulesets: gauge(
                registry,
                "policy_rulesets",
                "Distinct rule sets in the policy in force",
            ),
            protected: gauge(
                registry,
                "policy_protected_addresses",
                "Protected destination addresses",
            ),
        }
    }

    fn set(&self, compiled: &Compiled, unseen: bool) {
        let set = |gauge: &Gauge, value: usize| {
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        };
        set(&self.rules, compiled.policy.rules.len());
        set(&self.cgroup_entries, compiled.cgroup_entries());
        set(&self.cgroups_dropped, compiled.dropped());
        set(&self.cgroups_unseen, usize::from(unseen));
        set(&self.rulesets, compiled.rulesets());
        set(&self.protected, compiled.policy.protect.len());
    }
}

/// A counter registered as `name`.
fn counter(registry: &mut Registry, name: &str, help: &str) -> Counter {
    let counter = Counter::default();
    registry.register(name, help, counter.clone());
    counter
}

/// A gauge registered as `name`.
fn gauge(registry: &mut Registry, name: &str, help: &str) -> Gauge {
    let gauge = Gauge::default();
    registry.register(name, help, gauge.clone());
    gauge
}

impl Metrics {
    /// Metrics that count from the kernel's totals now.
    #[must_use]
    pub fn new(start: Counters) -> Self {
        let mut registry = Registry::with_prefix("imds_guard");
        let attempts = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "attempts",
            "Connects and datagrams to protected addresses, by verdict",
            attempts.clone(),
        );
        let by_rule = Family::<RuleLabels, Counter>::default();
        registry.register(
            "rule_attempts",
            "Connects and datagrams to protected addresses, by deciding rule (default: none)",
            by_rule.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests to protected addresses on connections a rule let through, by deciding \
             rule and IMDS version (v1: neither a token nor a token request)",
            requests.clone(),
        );
        let http = HttpMetrics::register(&mut registry);
        let posture = Family::<PostureLabels, Gauge>::default();
        registry.register(
            "posture_http_tokens",
            "1 for what the last posture check (posture = true) found of HttpTokens: optional \
             (IMDSv1 answered), required, or unknown (no answer); absent before the first check",
            posture.clone(),
        );
        let hop_limit = gauge(
            &mut registry,
            "posture_hop_limit",
            "The hop limit of IMDS's token responses at the last posture check; 0 when unread",
        );
        let containers_by = Family::<ContainersByLabels, Gauge>::default();
        registry.register(
            "containers_by",
            "1 for how the programs tell a container's task: namespaces_btf or namespaces_probe \
             (its namespaces, and cgroup paths), cgroup_paths (its cgroup path alone: the kernel \
             refused the task's reads or its BTF lacks them; root in a namespaced task outside a \
             container runtime's cgroup passes for the host's root)",
            containers_by.clone(),
        );
        let events = EventMetrics::register(&mut registry);
        let reloads = counter(&mut registry, "reloads", "Policy reloads that took effect");
        let failed_reloads = counter(
            &mut registry,
            "reloads_failed",
            "Policy reloads refused (the policy in force stayed)",
        );
        let policy = PolicyMetrics::register(&mut registry);
        Self {
            registry,
            attempts,
            by_rule,
            requests,
            http,
            posture,
            hop_limit,
            containers_by,
            events,
            reloads,
            failed_reloads,
            policy,
            seen: start,
            seen_by_rule: [Vec::new(), Vec::new()],
            seen_requests: [Vec::new(), Vec::new()],
            retired: None,
            events_seen: (0, 0, 0),
            reloads_seen: (0, 0),
        }
    }

    /// Forgets what a generation counted before this agent wrote it (an adopted generation,
    /// or one about to be reused): only its counts from now on are added.
    pub fn start_generation(&mut self, kernel: &mut Kernel, generation: u32, rules: usize) {
        let rules = u32::try_from(rules).unwrap_or(u32::MAX);
        let slot = usize::from(generation != 0);
        self.seen_by_rule[slot] = kernel.rule_counts(generation, rules).unwrap_or_default();
        self.seen_requests[slot] = kernel.http_counts(generation, rules).unwrap_or_default();
        if self
            .retired
            .as_ref()
            .is_some_and(|(retired, _)| *retired == generation)
        {
            // Its slot is reused: what it counted is final.
            self.retired = None;
        }
    }

    /// `generation` of `policy` is no longer in force. Its connects are final, but connections
    /// it let through that stay open (keep-alive, under rules that do not refuse requests)
    /// still count their requests in its slot: they are added until the slot is reused.
    pub fn retire_generation(&mut self, generation: u32, policy: Policy) {
        self.retired = Some((generation, policy));
    }

    /// Adds what the retired generation's open connections requested since the last update:
    /// at each update, and before a switch zeroes its slot for reuse.
    pub fn fold_retired(&mut self, kernel: &mut Kernel) {
        if let Some((generation, policy)) = self.retired.take() {
            self.fold_requests(kernel, generation, &policy);
            self.retired = Some((generation, policy));
        }
    }

    /// Adds what the kernel counted since the last update for `generation`, under the names
    /// of its `policy`.
    pub fn fold_generation(&mut self, kernel: &mut Kernel, generation: u32, policy: &Policy) {
        let rules = u32::try_from(policy.rules.len()).unwrap_or(u32::MAX);
        let Ok(counts) = kernel.rule_counts(generation, rules) else {
            return;
        };
        let seen = &mut self.seen_by_rule[usize::from(generation != 0)];
        for (id, &count) in (0u32..).zip(&counts) {
            let before = seen.get(id as usize).copied().unwrap_or(0);
            if count > before {
                self.by_rule
                    .get_or_create(&RuleLabels {
                        rule: policy.rule_name(id).to_owned(),
                        verdict: rule_verdict(policy, id),
                    })
                    .inc_by(count - before);
            }
        }
        *seen = counts;
        self.fold_requests(kernel, generation, policy);
    }

    /// Adds the HTTP requests the kernel counted since the last update for `generation`, under
    /// the names of its `policy`.
    fn fold_requests(&mut self, kernel: &mut Kernel, generation: u32, policy: &Policy) {
        let rules = u32::try_from(policy.rules.len()).unwrap_or(u32::MAX);
        let Ok(counts) = kernel.http_counts(generation, rules) else {
            return;
        };
        let seen = &mut self.seen_requests[usize::from(generation != 0)];
        for (id, by_version) in (0u32..).zip(&counts) {
            let before = seen.get(id as usize).copied().unwrap_or_default();
            for ((imds_version, &count), before) in
                IMDS_VERSION_LABELS.into_iter().zip(by_version).zip(before)
            {
                if count > before {
                    self.requests
                        .get_or_create(&RequestLabels {
                            rule: policy.rule_name(id).to_owned(),
                            imds_version,
                        })
                        .inc_by(count - before);
                }
            }
        }
        *seen = counts;
    }

    /// Brings every metric up to the kernel and the agent now.
    pub fn update(
        &mut self,
        kernel: &mut Kernel,
        compiled: &Compiled,
        events: (u64, u64, u64),
        reloads: (u32, u32),
        unseen: bool,
    ) {
        if let Ok(now) = kernel.counters() {
            let add = |verdict, now: u64, before: u64| {
                self.attempts
                    .get_or_create(&VerdictLabels { verdict })
                    .inc_by(now.saturating_sub(before));
            };
            add("allow", now.allowed, self.seen.allowed);
            add("deny", now.denied, self.seen.denied);
            add("audit", now.audited, self.seen.audited);
            (self.events.lost).inc_by(now.events_lost.saturating_sub(self.seen.events_lost));
            (self.http.refused).inc_by(now.http_refused.saturating_sub(self.seen.http_refused));
            (self.http.unjudged).inc_by(now.http_unjudged.saturating_sub(self.seen.http_unjudged));
            (self.http.unfollowed).inc_by(
                now.http_unfollowed
                    .saturating_sub(self.seen.http_unfollowed),
            );
            self.seen = now;
        }
        self.fold_generation(kernel, compiled.generation(), &compiled.policy);
        self.fold_retired(kernel);
        (self.events.reported).inc_by(events.0.saturating_sub(self.events_seen.0));
        (self.events.aggregated).inc_by(events.1.saturating_sub(self.events_seen.1));
        (self.events.unreported).inc_by(events.2.saturating_sub(self.events_seen.2));
        self.events_seen = events;
        self.reloads
            .inc_by(u64::from(reloads.0.saturating_sub(self.reloads_seen.0)));
        self.failed_reloads
            .inc_by(u64::from(reloads.1.saturating_sub(self.reloads_seen.1)));
        self.reloads_seen = reloads;
        self.policy.set(compiled, unseen);
    }

    /// Shows how the programs tell a container's task (`CONTAINERS_BY_*`).
    pub fn set_containers_by(&self, containers_by: u32) {
        let (_, mode) = imds_guard_common::event::containers_by_names(containers_by);
        self.containers_by.clear();
        self.containers_by
            .get_or_create(&ContainersByLabels { mode })
            .set(1);
    }

    /// Shows what a posture check found.
    pub fn set_posture(&self, posture: &Posture) {
        for state in [
            HttpTokens::Optional,
            HttpTokens::Required,
            HttpTokens::Unknown,
        ] {
            self.posture
                .get_or_create(&PostureLabels {
                    http_tokens: state.as_str(),
                })
                .set(i64::from(state == posture.http_tokens));
        }
        self.hop_limit.set(posture.hop_limit.map_or(0, i64::from));
    }

    /// Shows no posture (checks turned off).
    pub fn clear_posture(&self) {
        self.posture.clear();
        self.hop_limit.set(0);
    }

    /// The metrics in the `OpenMetrics` text format.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(err) = encode(&mut text, &self.registry) {
            warn!("encoding the metrics failed: {err}");
        }
        text
    }
}

/// The verdict rule `id` of `policy` gives (0: none, the mode's), as the kernel decides it.
fn rule_verdict(policy: &Policy, id: u32) -> &'static str {
    let rule = policy.rule(id).map(|rule| RuleValue {
        rule: id,
        flags: if rule.audit { RULE_FLAG_AUDIT } else { 0 },
    });
    match verdict_of(rule, policy.mode.kernel_value()).0 {
        VERDICT_ALLOW => "allow",
        VERDICT_AUDIT => "audit",
        _ => "deny",
    }
}

/// Binds the metrics address now, so that a bad one fails before anything is attached.
///
/// # Errors
/// [`Error::Metrics`] when the address cannot be bound.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| Error::Metrics { addr, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| Error::Metrics { addr, source })?;
    Ok(listener)
}

/// Serves `GET /metrics` on `listener`, asking the agent's loop for each reply.
pub async fn serve(listener: std::net::TcpListener, scrapes: mpsc::Sender<Scrape>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            warn!("metrics disabled: {err}");
            return;
        }
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                debug!("metrics accept failed: {err}");
                continue;
            }
        };
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let scrapes = scrapes.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&request, &scrapes).await) }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, "metrics connection: {err}");
            }
        });
    }
}

async fn respond(
    request: &Request<hyper::body::Incoming>,
    scrapes: &mpsc::Sender<Scrape>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    if request.method() != hyper::Method::GET || request.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try GET /metrics\n".into(),
        );
    }
    let (sender, receiver) = oneshot::channel();
    if scrapes.send(sender).await.is_err() {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "stopping\n".into(),
        );
    }
    match receiver.await {
        Ok(text) => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text,
        ),
        Err(_) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "stopping\n".into(),
        ),
    }
}

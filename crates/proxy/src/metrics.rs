//! Proxy metrics: a small registry rendered as Prometheus text format 0.0.4.
//!
//! Purpose: count what the data path does (requests, latencies, responses the
//! proxy made itself, TCP connections and bytes, listener connections,
//! config updates) so it can be scraped from the admin port's `/metrics`.
//!
//! Contract:
//! - The hot path asks once for a handle per label set (`Metrics::http`,
//!   `Metrics::tcp`, `Metrics::listener`) and keeps it; recording through a
//!   handle touches only atomics (no lock, no allocation).
//! - Handles live as long as the registry: a series, once created, is
//!   exported until the process exits (counters must not go backwards).
//! - Latency histograms use one fixed bucket layout (`LATENCY_BUCKETS`) so
//!   they aggregate across proxies.
//! - `Metrics::render` writes each family once with `# HELP` and `# TYPE`,
//!   series sorted by labels, label values escaped; `promtool check metrics`
//!   accepts the output.
//!
//! Non-goals: OpenMetrics exposition, summaries, metric removal, an
//! Istio-named compatibility mode (can be layered on `render` later), a
//! general-purpose metrics library.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::hash::Hash;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use serde::Serialize;

use crate::accesslog::ResponseFlag;

/// Upper bounds of the latency histogram buckets: nanoseconds and the `le`
/// label text. `+Inf` is implicit (the last bucket).
pub const LATENCY_BUCKETS: [(u64, &str); 14] = [
    (500_000, "0.0005"),
    (1_000_000, "0.001"),
    (2_500_000, "0.0025"),
    (5_000_000, "0.005"),
    (10_000_000, "0.01"),
    (25_000_000, "0.025"),
    (50_000_000, "0.05"),
    (100_000_000, "0.1"),
    (250_000_000, "0.25"),
    (500_000_000, "0.5"),
    (1_000_000_000, "1"),
    (2_500_000_000, "2.5"),
    (5_000_000_000, "5"),
    (10_000_000_000, "10"),
];

/// Which side of the proxy the traffic is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic from another proxy (or client) to the local application.
    Inbound,
    /// Traffic from the local application to a mesh service.
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// Labels of one HTTP series. Empty strings are exported as empty labels
/// (Prometheus treats them like absent ones).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HttpLabels {
    pub direction: Direction,
    /// Mesh service (`name.namespace`) of the client, `unknown` if unknown.
    pub source_service: String,
    /// Mesh service (`name.namespace`) the request is for.
    pub destination_service: String,
    /// Route name (`<namespace>/<route>/<rule>`), empty when none matched.
    pub route: String,
    /// SPIFFE id of the mTLS peer (inbound); empty (label omitted) for
    /// plaintext and outbound traffic. Istio's name.
    pub source_principal: String,
}

/// Labels of one `meshwork_tls_handshake_failures_total` series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TlsLabels {
    pub direction: Direction,
    /// Why: see `docs/mtls.md` (`no_client_certificate`, `unknown_issuer`,
    /// `certificate_expired`, `identity_mismatch`, `plaintext_refused`, ...).
    pub reason: &'static str,
}

/// Labels of one `meshwork_authz_decisions_total` series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuthzLabels {
    pub direction: Direction,
    /// Mesh service (`name.namespace`) the request or connection is for.
    pub destination_service: String,
    pub decision: AuthzOutcome,
    /// The deciding RBAC policy (`<namespace>/<policy>/rules[<i>]`); for
    /// `audit_deny` the audit policy that matched; empty when none decided
    /// (no ALLOW filter, or no ALLOW policy matched).
    pub policy: String,
}

/// The `decision` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AuthzOutcome {
    Allow,
    Deny,
    /// An AUDIT policy matched: it would have denied.
    AuditDeny,
}

impl AuthzOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthzOutcome::Allow => "allow",
            AuthzOutcome::Deny => "deny",
            AuthzOutcome::AuditDeny => "audit_deny",
        }
    }
}

/// One counter of `meshwork_authz_decisions_total`.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The resilience mechanisms' counters, one metric family each. Every
/// family has the labels `destination_service` and the event's `detail`
/// label (named by [`Event::detail_label`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Event {
    /// `meshwork_retries_total{reason}`: a retry was sent (reason: the
    /// condition that triggered it, e.g. `5xx`, `reset`, `connect-failure`).
    Retry,
    /// `meshwork_retries_skipped_total{reason}`: a retry was wanted but not
    /// sent (`retry_limit_exceeded`: the attempts are used up;
    /// `budget_exhausted`, `max_retries`: the circuit breaker refused;
    /// `body_not_replayable`).
    RetrySkipped,
    /// `meshwork_upstream_overflow_total{limit}`: a circuit breaker shed a
    /// request (`connections`, `pending_requests`, `requests`, `retries`).
    Overflow,
    /// `meshwork_outlier_ejections_total{detector}`: an endpoint was ejected
    /// (`consecutive_5xx`, `consecutive_gateway_failure`, `success_rate`,
    /// `failure_percentage`).
    Ejection,
    /// `meshwork_health_checks_total{result}`: an active health check ran
    /// (`success`, `failure`, `timeout`).
    HealthCheck,
    /// `meshwork_rate_limited_total{scope}`: a request was refused by a
    /// local rate limit (`route`, `listener`, `source`).
    RateLimited,
    /// `meshwork_faults_injected_total{kind}`: a fault fired (`delay`,
    /// `abort`).
    FaultInjected,
}

impl Event {
    const ALL: [Event; 7] = [
        Event::Retry,
        Event::RetrySkipped,
        Event::Overflow,
        Event::Ejection,
        Event::HealthCheck,
        Event::RateLimited,
        Event::FaultInjected,
    ];

    /// The metric family name.
    pub fn metric(self) -> &'static str {
        match self {
            Event::Retry => "meshwork_retries_total",
            Event::RetrySkipped => "meshwork_retries_skipped_total",
            Event::Overflow => "meshwork_upstream_overflow_total",
            Event::Ejection => "meshwork_outlier_ejections_total",
            Event::HealthCheck => "meshwork_health_checks_total",
            Event::RateLimited => "meshwork_rate_limited_total",
            Event::FaultInjected => "meshwork_faults_injected_total",
        }
    }

    /// The name of the label that carries `detail`.
    pub fn detail_label(self) -> &'static str {
        match self {
            Event::Retry | Event::RetrySkipped => "reason",
            Event::Overflow => "limit",
            Event::Ejection => "detector",
            Event::HealthCheck => "result",
            Event::RateLimited => "scope",
            Event::FaultInjected => "kind",
        }
    }

    fn help(self) -> &'static str {
        match self {
            Event::Retry => "Retries sent to an upstream, by the condition that triggered them.",
            Event::RetrySkipped => "Retries wanted but not sent: budget exhausted, attempts used up, or a body that cannot be replayed.",
            Event::Overflow => "Requests shed by a circuit breaker, by the limit that overflowed.",
            Event::Ejection => "Endpoints ejected by outlier detection, by detector.",
            Event::HealthCheck => "Active health checks, by result.",
            Event::RateLimited => "Requests refused by a local rate limit (429), by scope.",
            Event::FaultInjected => "Faults injected (delays and aborts), by kind.",
        }
    }
}

/// Labels of one resilience counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventLabels {
    pub event: Event,
    /// Mesh service (`name.namespace`), or the cluster name when unknown.
    pub destination_service: String,
    pub detail: &'static str,
}

/// Labels of one TCP series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpLabels {
    pub direction: Direction,
    pub source_service: String,
    pub destination_service: String,
    /// SPIFFE id of the mTLS peer (inbound); empty (label omitted) otherwise.
    pub source_principal: String,
}

/// The registry. Share it as `Arc<Metrics>`.
#[derive(Debug, Default)]
pub struct Metrics {
    http: Family<HttpLabels, HttpSeries>,
    tcp: Family<TcpLabels, TcpSeries>,
    listeners: Family<String, ListenerSeries>,
    authz: Family<AuthzLabels, Counter>,
    tls_failures: Family<TlsLabels, Counter>,
    /// The resilience counters (retries, overflows, ejections, ...).
    events: Family<EventLabels, Counter>,
    /// Config updates are rare (seconds apart), so a mutex is fine here.
    config: Mutex<BTreeMap<String, ConfigState>>,
    /// `meshwork_dns_queries_total`, rendered once the DNS server runs.
    dns: DnsCounters,
}

/// The `result` label of `meshwork_dns_queries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DnsResult {
    /// Answered from the mesh's names (VIPs).
    Mesh,
    /// Answered by the upstream resolver.
    Forwarded,
    /// Malformed, unsupported, or the upstream failed (FORMERR, NOTIMP,
    /// SERVFAIL, or no answer at all).
    Error,
}

impl DnsResult {
    const ALL: [DnsResult; 3] = [DnsResult::Mesh, DnsResult::Forwarded, DnsResult::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            DnsResult::Mesh => "mesh",
            DnsResult::Forwarded => "forwarded",
            DnsResult::Error => "error",
        }
    }
}

#[derive(Debug, Default)]
struct DnsCounters {
    enabled: std::sync::atomic::AtomicBool,
    by_result: [Counter; 3],
}

/// Counters of one HTTP label set. Get it from [`Metrics::http`].
#[derive(Debug, Default)]
pub struct HttpSeries {
    /// `meshwork_requests_total`, keyed by `request_key(code, grpc_status)`.
    requests: KeyedCounters,
    /// `meshwork_responses_total`, keyed by `response_key(flag, code)`.
    local: KeyedCounters,
    duration: Histogram,
}

/// Counters of one TCP label set. Get it from [`Metrics::tcp`].
#[derive(Debug, Default)]
pub struct TcpSeries {
    opened: AtomicU64,
    closed: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
}

/// Counters of one listener. Get it from [`Metrics::listener`].
#[derive(Debug, Default)]
pub struct ListenerSeries {
    active: AtomicI64,
    accepted: AtomicU64,
    detection_timeouts: AtomicU64,
}

/// Counts one open downstream connection in
/// `meshwork_downstream_connections_active` until dropped.
#[derive(Debug)]
#[must_use = "the connection is counted as active only while this guard lives"]
pub struct ActiveConnection {
    series: Arc<ListenerSeries>,
}

/// Handles by label set. Lookups take a read lock; only the first use of a
/// label set takes the write lock.
#[derive(Debug)]
struct Family<K, V> {
    series: RwLock<HashMap<K, Arc<V>>>,
}

#[derive(Debug, Default)]
struct ConfigState {
    accepted: u64,
    rejected: u64,
    version: Option<String>,
}

/// Counters keyed by a small non-zero `u32` (e.g. status code + gRPC status),
/// lock-free for the first `SLOTS` distinct keys. A series sees few distinct
/// codes in practice; the mutex-guarded overflow only keeps exotic traffic
/// correct.
#[derive(Debug, Default)]
struct KeyedCounters {
    slots: [Slot; SLOTS],
    overflow: Mutex<HashMap<u32, u64>>,
}

#[derive(Debug, Default)]
struct Slot {
    /// 0 = free; claimed once with a CAS and never changed again.
    key: AtomicU32,
    count: AtomicU64,
}

/// Non-cumulative bucket counts (the last one is `+Inf`); rendering sums them.
/// `_count` is derived from the buckets so it always equals the `+Inf` bucket.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// Picks one counter of a TCP series, to render the four families in a loop.
type TcpField = fn(&TcpSeries) -> &AtomicU64;

const SLOTS: usize = 16;
/// Marks a key as used, so no valid key is 0 (0 means "free slot").
const KEY_TAG: u32 = 1 << 31;
const NO_GRPC: u32 = 0x100;

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// The handle for one HTTP label set (created on first use). Keep it.
    pub fn http(&self, labels: &HttpLabels) -> Arc<HttpSeries> {
        self.http.get(labels)
    }

    /// The handle for one TCP label set (created on first use). Keep it.
    pub fn tcp(&self, labels: &TcpLabels) -> Arc<TcpSeries> {
        self.tcp.get(labels)
    }

    /// The counter of one authorization decision label set.
    pub fn authz(&self, labels: &AuthzLabels) -> Arc<Counter> {
        self.authz.get(labels)
    }

    /// The counter of one resilience event label set (created on first
    /// use). Keep it when counting on a hot path.
    pub fn event(
        &self,
        event: Event,
        destination_service: &str,
        detail: &'static str,
    ) -> Arc<Counter> {
        let labels = EventLabels {
            event,
            destination_service: destination_service.to_owned(),
            detail,
        };
        self.events.get(&labels)
    }

    /// The count of one resilience event label set (tests, admin).
    pub fn event_count(
        &self,
        event: Event,
        destination_service: &str,
        detail: &'static str,
    ) -> u64 {
        self.events
            .lookup(&EventLabels {
                event,
                destination_service: destination_service.to_owned(),
                detail,
            })
            .map_or(0, |c| c.get())
    }

    /// Counts one failed (or refused) TLS handshake.
    pub fn tls_handshake_failed(&self, direction: Direction, reason: &'static str) {
        self.tls_failures
            .get(&TlsLabels { direction, reason })
            .inc();
    }

    /// The count of failed TLS handshakes for one label set (tests, admin).
    pub fn tls_handshake_failures(&self, direction: Direction, reason: &'static str) -> u64 {
        self.tls_failures
            .lookup(&TlsLabels { direction, reason })
            .map_or(0, |c| c.get())
    }

    /// The handle for one listener (by listener name). Keep it.
    pub fn listener(&self, name: &str) -> Arc<ListenerSeries> {
        if let Some(series) = self.listeners.lookup(name) {
            return series;
        }
        self.listeners.get(&name.to_owned())
    }

    /// Counts an accepted config update of one xDS type (`listeners`,
    /// `routes`, `clusters`, `endpoints`) and records its version.
    pub fn config_accepted(&self, kind: &str, version: &str) {
        let mut config = self.config.lock().unwrap_or_else(PoisonError::into_inner);
        let state = config.entry(kind.to_owned()).or_default();
        state.accepted += 1;
        state.version = Some(version.to_owned());
    }

    /// Counts a rejected (NACKed) config update of one xDS type.
    pub fn config_rejected(&self, kind: &str) {
        let mut config = self.config.lock().unwrap_or_else(PoisonError::into_inner);
        config.entry(kind.to_owned()).or_default().rejected += 1;
    }

    /// Exports `meshwork_dns_queries_total` (the DNS server calls this when
    /// it starts; proxies without one do not show the family).
    pub fn dns_enabled(&self) {
        self.dns.enabled.store(true, Ordering::Relaxed);
    }

    /// Counts one DNS query by how it was answered.
    pub fn dns_query(&self, result: DnsResult) {
        self.dns.by_result[result as usize].inc();
    }

    /// The count of DNS queries with `result` (tests, admin).
    pub fn dns_queries(&self, result: DnsResult) -> u64 {
        self.dns.by_result[result as usize].get()
    }

    fn render_dns(&self, out: &mut String) {
        if !self.dns.enabled.load(Ordering::Relaxed) {
            return;
        }
        header(
            out,
            "meshwork_dns_queries_total",
            "DNS queries to the proxy's DNS server, by result: mesh (a mesh name, answered here), forwarded (answered by the upstream resolver), error.",
            "counter",
        );
        for r in DnsResult::ALL {
            sample(
                out,
                "meshwork_dns_queries_total",
                &[("result", r.as_str())],
                self.dns_queries(r),
            );
        }
    }

    /// Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        self.render_http(&mut out);
        self.render_tcp(&mut out);
        self.render_listeners(&mut out);
        self.render_authz(&mut out);
        self.render_tls(&mut out);
        self.render_events(&mut out);
        self.render_config(&mut out);
        self.render_dns(&mut out);
        out
    }

    fn render_tls(&self, out: &mut String) {
        let failures = self.tls_failures.sorted();
        header(
            out,
            "meshwork_tls_handshake_failures_total",
            "mTLS handshakes that failed, and plaintext connections a strict listener refused, by reason.",
            "counter",
        );
        for (l, c) in &failures {
            let labels = [("direction", l.direction.as_str()), ("reason", l.reason)];
            sample(
                out,
                "meshwork_tls_handshake_failures_total",
                &labels,
                c.get(),
            );
        }
    }

    fn render_events(&self, out: &mut String) {
        let all = self.events.sorted();
        for event in Event::ALL {
            header(out, event.metric(), event.help(), "counter");
            for (l, c) in all.iter().filter(|(l, _)| l.event == event) {
                let labels = [
                    ("destination_service", l.destination_service.as_str()),
                    (event.detail_label(), l.detail),
                ];
                sample(out, event.metric(), &labels, c.get());
            }
        }
    }

    fn render_authz(&self, out: &mut String) {
        let authz = self.authz.sorted();
        header(
            out,
            "meshwork_authz_decisions_total",
            "Authorization decisions (allow, deny, audit_deny: an AUDIT policy would have denied), by deciding policy.",
            "counter",
        );
        for (l, c) in &authz {
            let labels = [
                ("direction", l.direction.as_str()),
                ("destination_service", l.destination_service.as_str()),
                ("decision", l.decision.as_str()),
                ("policy", l.policy.as_str()),
            ];
            sample(out, "meshwork_authz_decisions_total", &labels, c.get());
        }
    }

    fn render_http(&self, out: &mut String) {
        let http = self.http.sorted();

        header(
            out,
            "meshwork_requests_total",
            "HTTP/gRPC requests completed, by response code.",
            "counter",
        );
        for (labels, series) in &http {
            for (key, count) in series.requests.snapshot() {
                let (code, grpc) = decode_request_key(key);
                let code = code.to_string();
                let grpc = grpc.map(|g| g.to_string());
                let mut l = http_labels(labels);
                l.push(("code", &code));
                if let Some(grpc) = &grpc {
                    l.push(("grpc_status", grpc));
                }
                sample(out, "meshwork_requests_total", &l, count);
            }
        }

        header(
            out,
            "meshwork_request_duration_seconds",
            "Time from request start to response end, in seconds.",
            "histogram",
        );
        for (labels, series) in &http {
            let h = &series.duration;
            let mut cumulative = 0u64;
            for (i, bucket) in h.buckets.iter().enumerate() {
                cumulative += bucket.load(Ordering::Relaxed);
                let le = LATENCY_BUCKETS.get(i).map_or("+Inf", |(_, le)| *le);
                let mut l = http_labels(labels);
                l.push(("le", le));
                sample(
                    out,
                    "meshwork_request_duration_seconds_bucket",
                    &l,
                    cumulative,
                );
            }
            let l = http_labels(labels);
            let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
            sample(out, "meshwork_request_duration_seconds_sum", &l, sum);
            sample(
                out,
                "meshwork_request_duration_seconds_count",
                &l,
                cumulative,
            );
        }

        header(
            out,
            "meshwork_responses_total",
            "Responses the proxy generated itself instead of forwarding, by reason.",
            "counter",
        );
        for (labels, series) in &http {
            for (key, count) in series.local.snapshot() {
                let Some((flag, code)) = decode_response_key(key) else {
                    continue;
                };
                let code = code.to_string();
                let mut l = http_labels(labels);
                l.push(("code", &code));
                l.push(("reason", flag.reason()));
                sample(out, "meshwork_responses_total", &l, count);
            }
        }
    }

    fn render_tcp(&self, out: &mut String) {
        let tcp = self.tcp.sorted();
        let families: [(&str, &str, TcpField); 4] = [
            (
                "meshwork_tcp_connections_opened_total",
                "TCP connections opened.",
                |s| &s.opened,
            ),
            (
                "meshwork_tcp_connections_closed_total",
                "TCP connections closed.",
                |s| &s.closed,
            ),
            (
                "meshwork_tcp_sent_bytes_total",
                "Bytes sent to the downstream (response direction) on TCP connections.",
                |s| &s.sent,
            ),
            (
                "meshwork_tcp_received_bytes_total",
                "Bytes received from the downstream (request direction) on TCP connections.",
                |s| &s.received,
            ),
        ];
        for (name, help, field) in families {
            header(out, name, help, "counter");
            for (labels, series) in &tcp {
                let mut l = vec![
                    ("direction", labels.direction.as_str()),
                    ("source_service", labels.source_service.as_str()),
                    ("destination_service", labels.destination_service.as_str()),
                ];
                if !labels.source_principal.is_empty() {
                    l.push(("source_principal", labels.source_principal.as_str()));
                }
                sample(out, name, &l, field(series).load(Ordering::Relaxed));
            }
        }
    }

    fn render_listeners(&self, out: &mut String) {
        let listeners = self.listeners.sorted();
        header(
            out,
            "meshwork_downstream_connections_active",
            "Downstream connections currently open, per listener.",
            "gauge",
        );
        for (name, series) in &listeners {
            let active = series.active.load(Ordering::Relaxed).max(0);
            sample(
                out,
                "meshwork_downstream_connections_active",
                &[("listener", name)],
                active,
            );
        }
        header(
            out,
            "meshwork_downstream_connections_total",
            "Downstream connections accepted, per listener.",
            "counter",
        );
        for (name, series) in &listeners {
            let n = series.accepted.load(Ordering::Relaxed);
            sample(
                out,
                "meshwork_downstream_connections_total",
                &[("listener", name)],
                n,
            );
        }
        header(
            out,
            "meshwork_protocol_detection_timeouts_total",
            "Connections whose protocol detection timed out, per listener.",
            "counter",
        );
        for (name, series) in &listeners {
            let n = series.detection_timeouts.load(Ordering::Relaxed);
            sample(
                out,
                "meshwork_protocol_detection_timeouts_total",
                &[("listener", name)],
                n,
            );
        }
    }

    fn render_config(&self, out: &mut String) {
        // Copy out so the lock is not held while formatting.
        let config: Vec<(String, u64, u64, Option<String>)> = self
            .config
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, s)| (k.clone(), s.accepted, s.rejected, s.version.clone()))
            .collect();
        header(
            out,
            "meshwork_config_updates_total",
            "xDS config updates applied (accepted) or refused (rejected), per type.",
            "counter",
        );
        for (kind, accepted, rejected, _) in &config {
            for (result, n) in [("accepted", accepted), ("rejected", rejected)] {
                let l = [("type", kind.as_str()), ("result", result)];
                sample(out, "meshwork_config_updates_total", &l, *n);
            }
        }
        header(
            out,
            "meshwork_config_version_info",
            "Version of the config in use, per xDS type (always 1).",
            "gauge",
        );
        for (kind, _, _, version) in &config {
            if let Some(version) = version {
                let l = [("type", kind.as_str()), ("version", version.as_str())];
                sample(out, "meshwork_config_version_info", &l, 1u64);
            }
        }
    }
}

impl HttpSeries {
    /// Records one completed request: its response status, gRPC status
    /// (when the response carried `grpc-status`) and total duration.
    /// Call it for every request, including those the proxy answered itself.
    pub fn observe(&self, code: u16, grpc_status: Option<u8>, duration: Duration) {
        self.requests.add(request_key(code, grpc_status));
        self.duration.observe(duration);
    }

    /// Additionally counts a response the proxy generated itself (no route,
    /// no endpoint, upstream failure, ...), with the status it sent.
    pub fn local_response(&self, flag: ResponseFlag, code: u16) {
        self.local.add(response_key(flag, code));
    }
}

impl TcpSeries {
    pub fn opened(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
    }

    pub fn closed(&self) {
        self.closed.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes sent to the downstream (from the upstream, response direction).
    pub fn sent(&self, bytes: u64) {
        self.sent.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes received from the downstream (to the upstream, request direction).
    pub fn received(&self, bytes: u64) {
        self.received.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl ListenerSeries {
    /// Counts an accepted connection; it stays active until the guard drops.
    pub fn connection(self: &Arc<Self>) -> ActiveConnection {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveConnection {
            series: Arc::clone(self),
        }
    }

    pub fn detection_timeout(&self) {
        self.detection_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections currently open on this listener.
    pub fn active(&self) -> i64 {
        self.active.load(Ordering::Relaxed)
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.series.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<K, V> Default for Family<K, V> {
    fn default() -> Self {
        Self {
            series: RwLock::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone + Ord, V: Default> Family<K, V> {
    fn lookup<Q>(&self, key: &Q) -> Option<Arc<V>>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        // A poisoned lock only means another thread panicked while holding
        // it; the map itself is always valid, so keep serving it.
        let map = self.series.read().unwrap_or_else(PoisonError::into_inner);
        map.get(key).cloned()
    }

    fn get(&self, key: &K) -> Arc<V> {
        if let Some(series) = self.lookup(key) {
            return series;
        }
        let mut map = self.series.write().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(map.entry(key.clone()).or_default())
    }

    fn sorted(&self) -> Vec<(K, Arc<V>)> {
        let map = self.series.read().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<(K, Arc<V>)> = map
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        drop(map);
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

impl KeyedCounters {
    fn add(&self, key: u32) {
        for slot in &self.slots {
            let current = slot.key.load(Ordering::Acquire);
            let claimed = current == key
                || (current == 0
                    && match slot
                        .key
                        .compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire)
                    {
                        Ok(_) => true,
                        // Another thread claimed it first, maybe for our key.
                        Err(actual) => actual == key,
                    });
            if claimed {
                slot.count.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let mut overflow = self.overflow.lock().unwrap_or_else(PoisonError::into_inner);
        *overflow.entry(key).or_default() += 1;
    }

    /// `(key, count)` sorted by key.
    fn snapshot(&self) -> Vec<(u32, u64)> {
        let mut all: Vec<(u32, u64)> = self
            .slots
            .iter()
            .filter_map(|slot| {
                let key = slot.key.load(Ordering::Acquire);
                (key != 0).then(|| (key, slot.count.load(Ordering::Relaxed)))
            })
            .collect();
        let overflow = self.overflow.lock().unwrap_or_else(PoisonError::into_inner);
        all.extend(overflow.iter().map(|(k, v)| (*k, *v)));
        drop(overflow);
        all.sort_unstable();
        all
    }
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let index = LATENCY_BUCKETS
            .iter()
            .position(|(bound, _)| nanos <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        if let Some(bucket) = self.buckets.get(index) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

fn request_key(code: u16, grpc_status: Option<u8>) -> u32 {
    KEY_TAG | (u32::from(code) << 9) | grpc_status.map_or(NO_GRPC, u32::from)
}

fn decode_request_key(key: u32) -> (u16, Option<u8>) {
    let code = ((key & !KEY_TAG) >> 9) as u16;
    let grpc = key & 0x1ff;
    (code, u8::try_from(grpc).ok())
}

fn response_key(flag: ResponseFlag, code: u16) -> u32 {
    KEY_TAG | (flag.index() << 16) | u32::from(code)
}

fn decode_response_key(key: u32) -> Option<(ResponseFlag, u16)> {
    let flag = ResponseFlag::from_index((key & !KEY_TAG) >> 16)?;
    Some((flag, (key & 0xffff) as u16))
}

fn http_labels(l: &HttpLabels) -> Vec<(&'static str, &str)> {
    let mut v = vec![
        ("direction", l.direction.as_str()),
        ("source_service", &l.source_service),
        ("destination_service", &l.destination_service),
        ("route", &l.route),
    ];
    if !l.source_principal.is_empty() {
        v.push(("source_principal", &l.source_principal));
    }
    v
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    escape_help(out, help);
    out.push_str("\n# TYPE ");
    out.push_str(name);
    out.push(' ');
    out.push_str(kind);
    out.push('\n');
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            escape_label(out, v);
            out.push('"');
        }
        out.push('}');
    }
    // Writing to a String cannot fail.
    let _ = writeln!(out, " {value}");
}

/// Label values escape backslash, double quote and line feed.
fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// HELP text escapes backslash and line feed.
fn escape_help(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests;

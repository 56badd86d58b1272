//! `TrafficPolicy`: how clients reach one destination Service, one of its
//! ports, or the requests of one HTTPRoute (rule).
//!
//! Every section is optional. A policy on a Service (`targetRef.kind:
//! Service`, optionally `sectionName: <port name>`) may set all of them; a
//! policy on an HTTPRoute (optionally `sectionName: <rule name>`) only the
//! per-request ones: `timeouts`, `retries` (without `budget`), `rateLimit`
//! and `fault`. The most specific policy wins section by section: an
//! HTTPRoute rule's own `timeouts`, then a policy on the rule, on the route,
//! on the Service port, on the Service. See `docs/resilience.md`.

use serde::{Deserialize, Serialize};

use super::{GwDuration, Metadata};

/// `meshwork.dev/v1alpha1 TrafficPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: TrafficPolicySpec,
}

/// `TrafficPolicy.spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    /// The Service or HTTPRoute (same namespace) this policy applies to.
    pub target_ref: TargetRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<LocalityLb>,
}

/// `spec.targetRef`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetRef {
    /// `""`, `core` or `meshwork.dev` for a Service,
    /// `gateway.networking.k8s.io` for an HTTPRoute (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `Service` or `HTTPRoute`.
    pub kind: String,
    pub name: String,
    /// A port name of the Service, or a rule name of the HTTPRoute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

/// Load-balancing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum LbAlgorithm {
    /// Power of two choices over peak-EWMA latency (meshwork's default).
    #[default]
    PeakEwma,
    RoundRobin,
    LeastRequest,
    Random,
    RingHash,
    Maglev,
}

impl LbAlgorithm {
    /// Consistent-hash algorithms, which use `hash`.
    pub fn is_hash(self) -> bool {
        matches!(self, LbAlgorithm::RingHash | LbAlgorithm::Maglev)
    }

    /// The YAML spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LbAlgorithm::PeakEwma => "peakEwma",
            LbAlgorithm::RoundRobin => "roundRobin",
            LbAlgorithm::LeastRequest => "leastRequest",
            LbAlgorithm::Random => "random",
            LbAlgorithm::RingHash => "ringHash",
            LbAlgorithm::Maglev => "maglev",
        }
    }
}

/// `spec.loadBalancer`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancer {
    #[serde(default)]
    pub algorithm: LbAlgorithm,
    /// `leastRequest` only: endpoints compared per pick (default 2, at least 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choice_count: Option<u32>,
    /// `ringHash`/`maglev` only: what to hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<HashConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_hash: Option<RingHashConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maglev: Option<MaglevConfig>,
}

/// Default `choiceCount`.
pub const DEFAULT_CHOICE_COUNT: u32 = 2;
/// Default ring hash `minimumRingSize` (Envoy's).
pub const DEFAULT_MIN_RING: u64 = 1024;
/// Default ring hash `maximumRingSize` (Envoy's).
pub const DEFAULT_MAX_RING: u64 = 8 * 1024 * 1024;
/// Default maglev `tableSize` (Envoy's, prime).
pub const DEFAULT_MAGLEV_TABLE: u64 = 65537;

/// `loadBalancer.hash`: exactly one of the fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HashConfig {
    /// Hash this request header's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Hash this cookie (set with `ttl` when the request has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<CookieHash>,
    /// Hash the client's IP address.
    #[serde(default, rename = "sourceIP", skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<bool>,
}

/// `hash.cookie`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CookieHash {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<GwDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// `loadBalancer.ringHash`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RingHashConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_ring_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_ring_size: Option<u64>,
}

/// `loadBalancer.maglev`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MaglevConfig {
    /// A prime, at most 5000011 (default 65537).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_size: Option<u64>,
}

/// `spec.connectionPool`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPool {
    /// Close pooled connections idle this long (HTTP default 60s; TCP: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<GwDuration>,
    /// Give up connecting after this long (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<GwDuration>,
    /// Circuit breaker: upstream connections (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Circuit breaker: requests waiting for a connection (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Circuit breaker: requests in flight (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Circuit breaker: retries in flight (default 3; ignored with a
    /// `retries.budget`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

/// `spec.timeouts` (connect and idle timeouts are in `connectionPool`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Timeouts {
    /// The whole request and response, retries included; `0s` disables it
    /// (default: none, as the Gateway API's unset `timeouts.request`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<GwDuration>,
    /// One attempt (`0s` or unset: each attempt may use the whole `request`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try: Option<GwDuration>,
    /// A stream with no bytes in either direction for this long is reset
    /// (default 5m, Envoy's; `0s` disables it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_idle: Option<GwDuration>,
}

/// `spec.retries`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retries {
    /// Retries after the first attempt (1..=10).
    pub attempts: u32,
    /// Conditions (Envoy's `retry_on` names): `5xx`, `gateway-error`,
    /// `reset`, `connect-failure`, `refused-stream` (default, Istio's:
    /// `connect-failure`, `refused-stream`, gRPC `unavailable` and
    /// `cancelled`, and HTTP 503; see [`DEFAULT_RETRY_ON`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<String>,
    /// Also retry these HTTP statuses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status_codes: Vec<u16>,
    /// Also retry these gRPC statuses: `cancelled`, `deadline-exceeded`,
    /// `internal`, `resource-exhausted`, `unavailable`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grpc_statuses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Service targets only: caps retries in flight for the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
}

/// `retries.backoff`: exponential with full jitter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Backoff {
    /// Default 25ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_interval: Option<GwDuration>,
    /// Default 10 x `baseInterval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<GwDuration>,
}

/// `retries.budget`: retries in flight are at most `percent` of the requests
/// in flight, but `minConcurrency` are always allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudget {
    /// More than 0, at most 100 (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<Percent>,
    /// Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_concurrency: Option<u32>,
}

/// `spec.outlierDetection`: passive health checking.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Eject after this many 5xx (or resets, connect failures) in a row
    /// (default 5; `0` turns the detector off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive5xx: Option<u32>,
    /// Eject after this many 502/503/504 (or resets, connect failures) in a
    /// row (default: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// How often statistics are evaluated (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<GwDuration>,
    /// First ejection's length, multiplied by the number of ejections
    /// (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<GwDuration>,
    /// Longest ejection (default 300s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_time: Option<GwDuration>,
    /// At most this share of the endpoints is ejected at once (default 50;
    /// with 2 endpoints, 50 lets one be ejected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<Percent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<SuccessRate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_percentage: Option<FailurePercentage>,
}

/// `outlierDetection.successRate`: eject endpoints whose success rate is
/// below the mean minus `stdevFactor` standard deviations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SuccessRate {
    /// Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_hosts: Option<u32>,
    /// Requests per interval an endpoint needs to be judged (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_volume: Option<u32>,
    /// Default 1.9 (a decimal, in thousandths).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdev_factor: Option<Percent>,
}

/// `outlierDetection.failurePercentage`: eject endpoints whose failure
/// percentage is at least `threshold`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FailurePercentage {
    /// Default 85.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<Percent>,
    /// Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_hosts: Option<u32>,
    /// Default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_volume: Option<u32>,
}

/// `spec.healthCheck`: active health checking; exactly one of `http`,
/// `tcp`, `grpc`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheck {
    /// Default 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<GwDuration>,
    /// Default 1s; less than `interval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<GwDuration>,
    /// Successes in a row to become healthy (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    /// Failures in a row to become unhealthy (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpHealthCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpHealthCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcHealthCheck>,
}

/// `healthCheck.http`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpHealthCheck {
    /// Must start with `/`.
    pub path: String,
    /// Default: the service's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Default `[200]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected_statuses: Vec<u16>,
}

/// `healthCheck.tcp`: healthy when a connection opens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpHealthCheck {}

/// `healthCheck.grpc`: the gRPC health protocol (`grpc.health.v1`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcHealthCheck {
    /// The service name asked about (default `""`: the server as a whole).
    #[serde(default)]
    pub service: String,
}

/// `spec.rateLimit`: a local token bucket. On a Service it is enforced by
/// the service's own sidecars (each instance has its own bucket); on an
/// HTTPRoute by the callers' sidecars.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimit {
    /// Tokens added every `interval` (at least 1).
    pub requests: u32,
    /// Default 1s; at least 50ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<GwDuration>,
    /// Bucket size (default `requests`; at least `requests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// One bucket per calling identity (per client address for plaintext).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_source: bool,
}

/// `spec.fault`: injected on the callers' side.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
    /// Only requests with all these headers (exact values) get faults.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<FaultHeader>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelay {
    pub fixed_delay: GwDuration,
    /// Share of requests delayed (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<Percent>,
}

/// Exactly one of `httpStatus` and `grpcStatus`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbort {
    /// 200..=599.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// 1..=16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    /// Share of requests aborted (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<Percent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultHeader {
    pub name: String,
    pub value: String,
}

/// `spec.locality`: prefer endpoints near the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalityLb {
    /// Same zone first, then same region, then the rest (default true when
    /// the section is present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// When a region has no healthy endpoint, go to `to` before any other.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<LocalityFailover>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalityFailover {
    pub from: String,
    pub to: String,
}

/// A percentage written as a YAML number (`20`, `0.5`, `100`), kept in
/// millionths of the whole (so `20` is 200000) to stay exact and `Eq`.
/// Range checks (0..=100) are validation's job, with the field path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Percent(pub i64);

impl Percent {
    /// Parts per million of the whole (100% is 1_000_000).
    pub fn per_million(self) -> i64 {
        self.0
    }

    /// As a number of percent (`20.0`).
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / 10_000.0
    }
}

impl Serialize for Percent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 % 10_000 == 0 {
            s.serialize_i64(self.0 / 10_000)
        } else {
            s.serialize_f64(self.as_f64())
        }
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if !v.is_finite() || v.abs() > 1e9 {
            return Err(serde::de::Error::custom(format!(
                "{v} is not a usable percentage (expected a number from 0 to 100)"
            )));
        }
        // Millionths of the whole: 1% is 10_000.
        Ok(Percent((v * 10_000.0).round() as i64))
    }
}

/// Default `connectTimeout`.
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Default `idleTimeout` of pooled HTTP connections.
pub const DEFAULT_HTTP_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Default `retries.backoff.baseInterval` (Envoy's); `maxInterval` defaults
/// to 10 times the base.
pub const DEFAULT_BACKOFF_BASE: std::time::Duration = std::time::Duration::from_millis(25);
/// Default `retries.budget.percent`.
pub const DEFAULT_BUDGET_PERCENT: u32 = 20;
/// Default `retries.budget.minConcurrency`.
pub const DEFAULT_BUDGET_MIN_CONCURRENCY: u32 = 3;
/// Default `outlierDetection.consecutive5xx`.
pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
/// Default `outlierDetection.interval`.
pub const DEFAULT_OUTLIER_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// Default `outlierDetection.baseEjectionTime`.
pub const DEFAULT_BASE_EJECTION_TIME: std::time::Duration = std::time::Duration::from_secs(30);
/// Default `outlierDetection.maxEjectionTime`.
pub const DEFAULT_MAX_EJECTION_TIME: std::time::Duration = std::time::Duration::from_secs(300);
/// Default `outlierDetection.maxEjectionPercent`: never a majority. Envoy's
/// own default (10) ejects nothing in a service with fewer than ten
/// endpoints, because an ejection must keep the ejected share within it.
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 50;
/// Default `healthCheck.interval`.
pub const DEFAULT_HC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// Default `healthCheck.timeout`.
pub const DEFAULT_HC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
/// Default `healthCheck.healthyThreshold`.
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 1;
/// Default `healthCheck.unhealthyThreshold`.
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 2;
/// Default `rateLimit.interval`.
pub const DEFAULT_RATE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// Smallest `rateLimit.interval` (Envoy's token bucket refuses less).
pub const MIN_RATE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);
/// The `retry_on` conditions of `retries` when `on` is empty (Istio's
/// default), with `retriable_status_codes: [503]` unless `statusCodes` lists
/// others.
pub const DEFAULT_RETRY_ON: &[&str] = &[
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
    "retriable-status-codes",
];

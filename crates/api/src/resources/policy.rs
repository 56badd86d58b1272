//! `TrafficPolicy`: how clients reach one destination Service.
//!
//! Only load balancing and the connection pool exist so far; circuit
//! breaking, outlier detection, retries, timeouts, rate limits and faults
//! arrive later as more optional sections of [`TrafficPolicySpec`]. Until
//! then they are unknown fields, and unknown fields are errors.

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
    /// The Service (same namespace) this policy applies to.
    pub target_ref: TargetRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
}

/// `spec.targetRef`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetRef {
    /// `""`, `core` or `meshwork.dev` (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Must be `Service`.
    pub kind: String,
    pub name: String,
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
}

/// Default `connectTimeout`.
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Default `idleTimeout` of pooled HTTP connections.
pub const DEFAULT_HTTP_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

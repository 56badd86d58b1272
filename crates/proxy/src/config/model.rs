//! The proxy's runtime configuration: plain data derived from xDS resources.
//!
//! Every field here comes from an Envoy xDS v3 resource (see `docs/xds.md` for
//! the subset). `config::xds` builds these types and refuses (NACKs) anything
//! it cannot represent; the data path trusts them without further checks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, StatusCode};
use regex::Regex;
use serde::Serialize;

/// One complete, consistent configuration. Swapped atomically on update.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// Version of each resource type, as delivered (`version_info`).
    pub versions: Versions,
    /// Listeners by name.
    pub listeners: HashMap<String, Arc<Listener>>,
    /// RouteConfigurations by name.
    pub routes: HashMap<String, Arc<RouteTable>>,
    /// Clusters by name.
    pub clusters: HashMap<String, Arc<Cluster>>,
    /// ClusterLoadAssignments by cluster (EDS service) name.
    pub endpoints: HashMap<String, Arc<LoadAssignment>>,
}

/// `version_info` per xDS type.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Versions {
    pub listeners: String,
    pub routes: String,
    pub clusters: String,
    pub endpoints: String,
}

/// An `envoy.config.listener.v3.Listener`.
#[derive(Debug, Clone, Serialize)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    /// `additional_addresses`: more sockets serving the same chains (a
    /// capture listener's IPv6 twin, `[::1]` or `[::]`). An IPv6 one is
    /// bound IPv6-only (Envoy's default), so it sits beside an IPv4
    /// `address` of the same port. A `[::1]` or `[::]` twin that cannot be
    /// bound because the host has no IPv6 is skipped with a warning; any
    /// other bind error refuses the config like one on `address`.
    pub additional_addresses: Vec<SocketAddr>,
    /// `listener_filters: [envoy.filters.listener.http_inspector]` with
    /// `listener_filters_timeout`: sniff HTTP/1.1 vs h2c for at most this long.
    /// `None`: no detection; the first filter chain applies to every connection.
    pub detect_timeout: Option<Duration>,
    /// Filter chain matched when detection finds `http/1.1` or `h2c`.
    pub http: Option<HttpConnectionManager>,
    /// The chain for everything else (`default_filter_chain`, or the only
    /// chain without `filter_chain_match`). `None`: close such connections.
    pub tcp: Option<TcpProxy>,
    /// Chains with `transport_protocol: "tls"` (mTLS terminated here, behind
    /// `tls_inspector`). With `tls` set and neither `http` nor `tcp`, the
    /// listener is strict: plaintext connections are refused.
    pub tls: Option<Arc<ListenerTls>>,
    /// `use_original_dst: true` (transparent capture): a connection whose
    /// original destination (`SO_ORIGINAL_DST`) is another address goes to
    /// the `bind_to_port: false` listener at that address, else to
    /// [`Listener::captured_default`]. The chains above then serve only
    /// connections addressed to this listener itself (they match its
    /// `destination_port`).
    pub use_original_dst: bool,
    /// `default_filter_chain` of a `use_original_dst` listener: captured
    /// connections no listener claims (`PassthroughCluster`, an
    /// ORIGINAL_DST cluster, or `BlackHoleCluster`). `None`: closed.
    pub captured_default: Option<TcpProxy>,
    /// `bind_to_port` (default true). `false`: no socket; the listener only
    /// receives connections handed over by a `use_original_dst` listener
    /// (whose original destination is `address` or one of
    /// `additional_addresses`).
    pub bind_to_port: bool,
    /// `metadata.filter_metadata["meshwork"]`: the Service a VIP listener
    /// stands for.
    pub service: Option<Arc<ListenerService>>,
}

/// `metadata.filter_metadata["meshwork"]` of a listener:
/// `{service: "name.namespace", hostnames: [...]}`. The mesh DNS answers
/// these names (plus the DNS domain) with the listener's address.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerService {
    /// `name.namespace`.
    pub service: String,
    /// Host names of the Service (`name` for clients in its namespace,
    /// `name.namespace`, `name.namespace.svc`), without the DNS domain.
    pub hostnames: Vec<String>,
}

impl Listener {
    /// `address`, then `additional_addresses`.
    pub fn addresses(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        std::iter::once(self.address).chain(self.additional_addresses.iter().copied())
    }

    /// mTLS only: plaintext connections are refused (and counted).
    pub fn is_strict_mtls(&self) -> bool {
        self.tls.is_some() && self.http.is_none() && self.tcp.is_none()
    }
}

/// The TLS filter chains of a listener (a `DownstreamTlsContext` with
/// `require_client_certificate`, certificates by SDS from the proxy's own
/// identity). The chain is chosen by the ALPN negotiated in the handshake,
/// as Envoy matches `application_protocols` on the ClientHello.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerTls {
    /// Offered ALPN values, in preference order (HTTP chain's first).
    pub alpn: Vec<String>,
    /// Chain with `application_protocols` (h2, http/1.1): HTTP over TLS.
    pub http: Option<HttpConnectionManager>,
    /// The ALPN values the HTTP chain matches.
    pub http_alpn: Vec<String>,
    /// Chain without `application_protocols`: opaque TCP over TLS.
    pub tcp: Option<TcpProxy>,
    /// Built once per config from the proxy's identity (which it reads at
    /// each handshake, so certificate rotation needs no rebuild).
    #[serde(skip)]
    pub server: Arc<rustls::ServerConfig>,
}

/// `envoy.filters.network.http_connection_manager` (router filter only).
#[derive(Debug, Clone, Serialize)]
pub struct HttpConnectionManager {
    pub stat_prefix: String,
    /// Name of the RouteConfiguration (RDS) or of the inline `route_config`.
    pub route_config_name: String,
    /// Inline `route_config`, when not fetched by RDS.
    pub inline_routes: Option<Arc<RouteTable>>,
    /// `stream_idle_timeout`.
    pub stream_idle_timeout: Option<Duration>,
    /// `request_timeout`.
    pub request_timeout: Option<Duration>,
    /// `common_http_protocol_options.idle_timeout` (downstream keep-alive idle).
    pub idle_timeout: Option<Duration>,
    /// `upgrade_configs: [{upgrade_type: websocket}]`: WebSocket upgrades are
    /// proxied. Without it Envoy refuses upgrade requests (403).
    pub websocket: bool,
    /// `envoy.filters.http.rbac` filters before the router, in order.
    pub authz: Option<Arc<crate::authz::Authz>>,
    /// `envoy.filters.http.local_ratelimit` is in the filter chain, with this
    /// listener-wide configuration (routes may override it with
    /// `typed_per_filter_config`). `None`: no rate limit filter, and route
    /// overrides have no effect (as in Envoy).
    pub rate_limit: Option<Arc<LocalRateLimit>>,
    /// `envoy.filters.http.fault` is in the filter chain, with this default
    /// configuration (routes may override it). `None`: no fault filter.
    pub fault: Option<Arc<Fault>>,
}

/// `envoy.filters.network.tcp_proxy`.
#[derive(Debug, Clone, Serialize)]
pub struct TcpProxy {
    pub stat_prefix: String,
    /// `cluster` (one entry, weight 1) or `weighted_clusters`.
    pub clusters: Vec<WeightedCluster>,
    /// `idle_timeout`.
    pub idle_timeout: Option<Duration>,
    /// `envoy.filters.network.rbac` filters before tcp_proxy, in order.
    pub authz: Option<Arc<crate::authz::Authz>>,
}

/// A `RouteConfiguration`.
#[derive(Debug, Clone, Serialize)]
pub struct RouteTable {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
    /// Lookup structure over `virtual_hosts[].domains`; build the table with
    /// [`RouteTable::new`] so it is consistent.
    #[serde(skip)]
    pub index: DomainIndex,
}

/// Envoy's virtual host lookup tables (see `router::select_vhost`). Domains
/// are stored lower-cased; values are indices into `RouteTable::virtual_hosts`.
#[derive(Debug, Clone, Default)]
pub struct DomainIndex {
    /// Exact domains (`foo.com`, `foo.com:8080`).
    pub exact: HashMap<String, usize>,
    /// `*suffix` wildcards, grouped by suffix length, longest first.
    pub suffixes: Vec<(usize, HashMap<String, usize>)>,
    /// `prefix*` wildcards, grouped by prefix length, longest first.
    pub prefixes: Vec<(usize, HashMap<String, usize>)>,
    /// The virtual host with the domain `*`.
    pub default: Option<usize>,
}

/// Two virtual hosts (or one, twice) claim the same domain: Envoy rejects the
/// RouteConfiguration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("duplicate domain \"{domain}\" (already in virtual_hosts[{first}])")]
pub struct DomainConflict {
    /// The domain, lower-cased.
    pub domain: String,
    /// Index of the virtual host that listed it first.
    pub first: usize,
    /// Index of the virtual host that lists it again.
    pub vhost: usize,
    /// Position of the duplicate inside that virtual host's `domains`.
    pub position: usize,
}

impl RouteTable {
    /// A route table with its domain index. Fails like Envoy when a domain
    /// (compared case-insensitively) appears twice.
    pub fn new(name: String, virtual_hosts: Vec<VirtualHost>) -> Result<Self, DomainConflict> {
        let index = DomainIndex::build(&virtual_hosts)?;
        Ok(RouteTable {
            name,
            virtual_hosts,
            index,
        })
    }
}

impl DomainIndex {
    /// Index the domains of `virtual_hosts` following Envoy's classification:
    /// `*` is the default, a leading `*` a suffix wildcard, a trailing `*` a
    /// prefix wildcard, anything else exact.
    pub fn build(virtual_hosts: &[VirtualHost]) -> Result<Self, DomainConflict> {
        let mut index = DomainIndex::default();
        let mut suffixes: HashMap<usize, HashMap<String, usize>> = HashMap::new();
        let mut prefixes: HashMap<usize, HashMap<String, usize>> = HashMap::new();
        for (vh_idx, vh) in virtual_hosts.iter().enumerate() {
            for (position, domain) in vh.domains.iter().enumerate() {
                let domain = domain.to_ascii_lowercase();
                let conflict = |first: usize, domain: String| DomainConflict {
                    domain,
                    first,
                    vhost: vh_idx,
                    position,
                };
                if domain == "*" {
                    if let Some(first) = index.default {
                        return Err(conflict(first, domain));
                    }
                    index.default = Some(vh_idx);
                    continue;
                }
                let (map, key) = if let Some(suffix) = domain.strip_prefix('*') {
                    (
                        suffixes.entry(suffix.len()).or_default(),
                        suffix.to_string(),
                    )
                } else if let Some(prefix) = domain.strip_suffix('*') {
                    (
                        prefixes.entry(prefix.len()).or_default(),
                        prefix.to_string(),
                    )
                } else {
                    (&mut index.exact, domain.clone())
                };
                if let Some(&first) = map.get(&key) {
                    return Err(conflict(first, domain));
                }
                map.insert(key, vh_idx);
            }
        }
        index.suffixes = suffixes.into_iter().collect();
        index
            .suffixes
            .sort_by_key(|entry| std::cmp::Reverse(entry.0));
        index.prefixes = prefixes.into_iter().collect();
        index
            .prefixes
            .sort_by_key(|entry| std::cmp::Reverse(entry.0));
        Ok(index)
    }
}

/// A `VirtualHost`: `domains` follow Envoy's rules (exact, `*.suffix`,
/// `prefix*`, `*`; an optional `:port` is part of the domain).
#[derive(Debug, Clone, Serialize)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    /// First match wins (the translator sorts by Gateway API precedence).
    pub routes: Vec<Route>,
    pub request_headers: HeaderMods,
    pub response_headers: HeaderMods,
}

/// A `Route`.
#[derive(Debug, Clone, Serialize)]
pub struct Route {
    /// `name`: for meshwork output `<namespace>/<route>/<rule index>`.
    pub name: String,
    pub matcher: RouteMatch,
    pub action: RouteAction,
    pub request_headers: HeaderMods,
    pub response_headers: HeaderMods,
    /// `typed_per_filter_config["envoy.filters.http.local_ratelimit"]`.
    pub rate_limit: Option<Arc<LocalRateLimit>>,
    /// `typed_per_filter_config["envoy.filters.http.fault"]`.
    pub fault: Option<Arc<Fault>>,
}

/// `envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit`: a token
/// bucket. Only enforced configurations are represented (`filter_enabled`
/// and `filter_enforced` at 100%); a bucket without them is refused.
#[derive(Debug, Clone, Serialize)]
pub struct LocalRateLimit {
    pub stat_prefix: String,
    /// `token_bucket.max_tokens`: the burst.
    pub max_tokens: u32,
    /// `token_bucket.tokens_per_fill` (default 1).
    pub tokens_per_fill: u32,
    /// `token_bucket.fill_interval`. Zero only on a connection manager's
    /// filter without `token_bucket` (as in Envoy, whose filter then reads a
    /// zero interval): the filter is there so that route overrides apply,
    /// and requests without one are not limited.
    pub fill_interval: Duration,
    /// `status.code` (default 429).
    pub status: u16,
    /// `enable_retry_after_header`: 429 responses carry `retry-after`, the
    /// seconds until the next token (at least 1).
    pub retry_after: bool,
    /// `enable_x_ratelimit_headers: DRAFT_VERSION_03`: `x-ratelimit-limit`,
    /// `-remaining`, `-reset` on responses.
    pub rate_limit_headers: bool,
    /// `response_headers_to_add` (on rate-limited responses).
    #[serde(serialize_with = "ser_pairs")]
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
    /// One bucket per source: a `descriptors` entry keyed `remote_address`
    /// with an empty (wildcard) value, fed by a `remote_address` rate limit
    /// action. meshwork keys the bucket by the peer's SPIFFE id when the
    /// connection is mTLS, else by the client IP.
    pub per_source: bool,
}

/// `envoy.extensions.filters.http.fault.v3.HTTPFault`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Fault {
    /// `delay.fixed_delay` and `delay.percentage`.
    pub delay: Option<FaultDelay>,
    /// `abort`.
    pub abort: Option<FaultAbort>,
    /// `headers`: the fault applies only to requests matching all of them.
    pub headers: Vec<HeaderMatch>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultDelay {
    pub fixed: Duration,
    /// Fraction of requests, per million.
    pub per_million: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultAbort {
    pub status: AbortStatus,
    /// Fraction of requests, per million.
    pub per_million: u32,
}

/// `abort.http_status` or `abort.grpc_status`.
#[derive(Debug, Clone, Copy, Serialize)]
pub enum AbortStatus {
    Http(u16),
    /// A trailers-only gRPC response with this `grpc-status`.
    Grpc(u32),
}

/// `RetryPolicy` of a route.
#[derive(Debug, Clone, Serialize)]
pub struct RetryPolicy {
    /// `retry_on`, parsed.
    pub on: RetryOn,
    /// `num_retries` (default 1): retries after the first attempt.
    pub num_retries: u32,
    /// `per_try_timeout` (`None`: each try may use the whole route timeout).
    pub per_try_timeout: Option<Duration>,
    /// `retriable_status_codes` (used with `retriable-status-codes`).
    pub retriable_status_codes: Vec<u16>,
    /// `retry_back_off.base_interval` (default 25 ms).
    pub backoff_base: Duration,
    /// `retry_back_off.max_interval` (default 10 x base).
    pub backoff_max: Duration,
    /// `retry_host_predicate: [envoy.retry_host_predicates.previous_hosts]`:
    /// a retry avoids endpoints already tried when another one is available.
    pub avoid_previous_hosts: bool,
}

/// The `retry_on` conditions meshwork implements (Envoy's names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RetryOn {
    /// `5xx`: any 5xx response, a reset, a connect failure or a per-try timeout.
    pub five_xx: bool,
    /// `gateway-error`: 502, 503, 504 (and per-try timeouts).
    pub gateway_error: bool,
    /// `reset`: the upstream reset or closed before answering, or a per-try timeout.
    pub reset: bool,
    /// `connect-failure`: no connection could be made.
    pub connect_failure: bool,
    /// `retriable-status-codes`: a status in `retriable_status_codes`.
    pub retriable_status_codes: bool,
    /// `refused-stream`: an HTTP/2 stream refused with REFUSED_STREAM.
    pub refused_stream: bool,
    /// gRPC `cancelled` (1).
    pub grpc_cancelled: bool,
    /// gRPC `deadline-exceeded` (4).
    pub grpc_deadline_exceeded: bool,
    /// gRPC `internal` (13).
    pub grpc_internal: bool,
    /// gRPC `resource-exhausted` (8).
    pub grpc_resource_exhausted: bool,
    /// gRPC `unavailable` (14).
    pub grpc_unavailable: bool,
}

/// `RouteMatch`.
#[derive(Debug, Clone, Serialize)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// `headers`; a method match is a header match on `:method`.
    pub headers: Vec<HeaderMatch>,
    /// `query_parameters`.
    pub query: Vec<QueryMatch>,
    /// `headers` entries naming a pseudo-header (`:method`), which
    /// `http::HeaderName` cannot hold. All of them must match too.
    pub pseudo_headers: Vec<PseudoHeaderMatch>,
}

/// A `HeaderMatcher` on a pseudo-header.
#[derive(Debug, Clone, Serialize)]
pub struct PseudoHeaderMatch {
    pub header: PseudoHeader,
    pub matcher: StringMatch,
    pub invert: bool,
}

/// The pseudo-headers a route may match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PseudoHeader {
    /// `:method`: the request method.
    Method,
}

/// `RouteMatch.path_specifier`.
#[derive(Debug, Clone, Serialize)]
pub enum PathMatch {
    /// `prefix`: plain string prefix.
    Prefix(String),
    /// `path`: the whole path (without query) equals.
    Exact(String),
    /// `path_separated_prefix`: equal, or a prefix followed by `/`.
    SeparatedPrefix(String),
    /// `safe_regex`: the regex must match the whole path. `config::xds`
    /// compiles it anchored (`^(?:...)$`), so `is_match` is a full match.
    Regex(#[serde(serialize_with = "ser_regex")] Regex),
}

/// A `HeaderMatcher` (`string_match` or `present_match`, optional `invert_match`).
#[derive(Debug, Clone, Serialize)]
pub struct HeaderMatch {
    #[serde(serialize_with = "ser_display")]
    pub name: HeaderName,
    pub matcher: StringMatch,
    pub invert: bool,
}

/// A `QueryParameterMatcher`.
#[derive(Debug, Clone, Serialize)]
pub struct QueryMatch {
    pub name: String,
    pub matcher: StringMatch,
}

/// `envoy.type.matcher.v3.StringMatcher`, or presence.
#[derive(Debug, Clone, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    /// Must match the whole value; compiled anchored like `PathMatch::Regex`.
    Regex(#[serde(serialize_with = "ser_regex")] Regex),
    Present,
}

/// `Route.action`.
#[derive(Debug, Clone, Serialize)]
pub enum RouteAction {
    Forward(Forward),
    Redirect(Redirect),
    Direct { status: u16, body: String },
}

/// `RouteAction` (the `route` field).
#[derive(Debug, Clone, Serialize)]
pub struct Forward {
    /// `cluster` (one entry, weight 1) or `weighted_clusters`.
    pub clusters: Vec<WeightedCluster>,
    /// `timeout` (`None`: Envoy's default 15 s; `Some(ZERO)`: disabled).
    pub timeout: Option<Duration>,
    /// `prefix_rewrite`: replaces the matched path prefix.
    pub prefix_rewrite: Option<String>,
    /// `regex_rewrite`: pattern and substitution over the path.
    pub regex_rewrite: Option<RegexRewrite>,
    /// `host_rewrite_literal`.
    pub host_rewrite: Option<String>,
    /// `request_mirror_policies`.
    pub mirrors: Vec<Mirror>,
    /// `hash_policy`, for ring hash and maglev clusters.
    pub hash_policy: Vec<HashPolicy>,
    /// `retry_policy`.
    pub retry: Option<Arc<RetryPolicy>>,
    /// `idle_timeout`: the stream idle timeout of this route (overrides the
    /// connection manager's `stream_idle_timeout`; zero disables it).
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RegexRewrite {
    #[serde(serialize_with = "ser_regex")]
    pub pattern: Regex,
    /// Replacement in `regex` crate syntax (`${1}`, `$$`): `config::xds`
    /// converts Envoy's RE2 form (`\1`, `\\`) once, when the route is loaded.
    pub substitution: String,
}

/// One backend of a split, with its own header filters.
#[derive(Debug, Clone, Serialize)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
    pub request_headers: HeaderMods,
    pub response_headers: HeaderMods,
}

/// `RequestMirrorPolicy`: fire-and-forget copy; the response is discarded.
#[derive(Debug, Clone, Serialize)]
pub struct Mirror {
    pub cluster: String,
    /// `runtime_fraction` as a fraction of 1_000_000 (`None`: every request).
    pub per_million: Option<u32>,
}

/// `RouteAction.HashPolicy`.
#[derive(Debug, Clone, Serialize)]
pub enum HashPolicy {
    Header {
        #[serde(serialize_with = "ser_display")]
        name: HeaderName,
        terminal: bool,
    },
    /// With a `ttl`, the proxy sets the cookie when the request has none.
    Cookie {
        name: String,
        ttl: Option<Duration>,
        path: Option<String>,
        terminal: bool,
    },
    SourceIp {
        terminal: bool,
    },
}

/// `RedirectAction`. `None` fields keep the request's value.
#[derive(Debug, Clone, Serialize)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathRedirect>,
    pub status: u16,
}

#[derive(Debug, Clone, Serialize)]
pub enum PathRedirect {
    /// `path_redirect`.
    Full(String),
    /// `prefix_rewrite`: replaces the matched prefix.
    Prefix(String),
}

/// `request_headers_to_add/remove` or `response_headers_to_add/remove`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HeaderMods {
    /// `OVERWRITE_IF_EXISTS_OR_ADD`.
    #[serde(serialize_with = "ser_pairs")]
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// `APPEND_IF_EXISTS_OR_ADD`.
    #[serde(serialize_with = "ser_pairs")]
    pub add: Vec<(HeaderName, HeaderValue)>,
    #[serde(serialize_with = "ser_names")]
    pub remove: Vec<HeaderName>,
}

impl HeaderMods {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// A `Cluster` (type EDS, or STATIC with inline `load_assignment`).
#[derive(Debug, Clone, Serialize)]
pub struct Cluster {
    pub name: String,
    /// The EDS `service_name` (defaults to the cluster name).
    pub eds_name: String,
    /// Inline `load_assignment` of a STATIC cluster.
    pub static_endpoints: Option<Arc<LoadAssignment>>,
    pub lb: LbPolicy,
    /// `typed_extension_protocol_options` says HTTP/2 to the upstream.
    pub http2: bool,
    /// `type: ORIGINAL_DST` with `lb_policy: CLUSTER_PROVIDED`: no endpoints;
    /// a connection goes to its own original destination (passthrough).
    pub original_dst: bool,
    pub connect_timeout: Duration,
    /// `common_http_protocol_options.idle_timeout` for pooled connections.
    pub idle_timeout: Option<Duration>,
    /// `metadata.filter_metadata["meshwork"]["service"]`: the mesh service
    /// (`name.namespace`) for metric labels.
    pub service: Option<String>,
    /// `transport_socket_matches`: mTLS to endpoints whose metadata says
    /// `tlsMode: meshwork`, plaintext to the others. `None`: all plaintext.
    pub tls: Option<Arc<UpstreamTls>>,
    /// `circuit_breakers.thresholds` of priority DEFAULT (Envoy's defaults
    /// when absent).
    pub circuit_breakers: CircuitBreakers,
    /// `outlier_detection` (`None`: no passive health checking).
    pub outlier_detection: Option<Arc<OutlierDetection>>,
    /// `health_checks` (active health checking).
    pub health_checks: Vec<Arc<HealthCheck>>,
    /// `common_lb_config.healthy_panic_threshold` in percent (default 50;
    /// 0 disables panic mode): when fewer endpoints than this are healthy,
    /// requests go to all endpoints, healthy or not.
    pub panic_threshold: f64,
}

/// `circuit_breakers.thresholds[]` (priority DEFAULT).
#[derive(Debug, Clone, Serialize)]
pub struct CircuitBreakers {
    /// `max_connections` (default 1024): upstream connections of the cluster.
    pub max_connections: u32,
    /// `max_pending_requests` (default 1024): requests waiting for a connection.
    pub max_pending_requests: u32,
    /// `max_requests` (default 1024): requests in flight.
    pub max_requests: u32,
    /// `max_retries` (default 3): retries in flight (ignored when a budget is set).
    pub max_retries: u32,
    /// `retry_budget`.
    pub retry_budget: Option<RetryBudget>,
}

impl Default for CircuitBreakers {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
        }
    }
}

/// `retry_budget`: retries in flight may be at most `budget_percent` of the
/// requests in flight (active and pending), but at least
/// `min_retry_concurrency`.
#[derive(Debug, Clone, Serialize)]
pub struct RetryBudget {
    /// `budget_percent` (default 20).
    pub budget_percent: f64,
    /// `min_retry_concurrency` (default 3).
    pub min_retry_concurrency: u32,
}

/// `outlier_detection`. A detector is `Some` when its enforcing percentage is
/// non-zero (Envoy still counts the others; meshwork does not run them).
#[derive(Debug, Clone, Serialize)]
pub struct OutlierDetection {
    /// `consecutive_5xx` with `enforcing_consecutive_5xx` (default 5 / 100%).
    pub consecutive_5xx: Option<Detector>,
    /// `consecutive_gateway_failure` with `enforcing_consecutive_gateway_failure`
    /// (default 5 / 0%: off).
    pub consecutive_gateway_failure: Option<Detector>,
    /// `success_rate_*` with `enforcing_success_rate` (default 100%).
    pub success_rate: Option<SuccessRate>,
    /// `failure_percentage_*` with `enforcing_failure_percentage` (default 0%: off).
    pub failure_percentage: Option<FailurePercentage>,
    /// `interval` (default 10 s): how often success rate and failure
    /// percentage are computed and ejections expire.
    pub interval: Duration,
    /// `base_ejection_time` (default 30 s): an ejection lasts this times the
    /// number of times the endpoint has been ejected.
    pub base_ejection_time: Duration,
    /// `max_ejection_time` (default 300 s).
    pub max_ejection_time: Duration,
    /// `max_ejection_percent` (default 10).
    pub max_ejection_percent: u32,
}

/// A consecutive-failure detector.
#[derive(Debug, Clone, Serialize)]
pub struct Detector {
    pub consecutive: u32,
    /// Percent chance that a detection ejects (1..=100).
    pub enforcing: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct SuccessRate {
    /// `success_rate_minimum_hosts` (default 5).
    pub minimum_hosts: u32,
    /// `success_rate_request_volume` (default 100) per interval.
    pub request_volume: u32,
    /// `success_rate_stdev_factor` / 1000 (default 1.9).
    pub stdev_factor: f64,
    /// Percent chance that a detection ejects (1..=100).
    pub enforcing: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailurePercentage {
    /// `failure_percentage_threshold` (default 85).
    pub threshold: u32,
    /// `failure_percentage_minimum_hosts` (default 5).
    pub minimum_hosts: u32,
    /// `failure_percentage_request_volume` (default 50) per interval.
    pub request_volume: u32,
    /// Percent chance that a detection ejects (1..=100).
    pub enforcing: u32,
}

/// One of `health_checks`.
#[derive(Debug, Clone, Serialize)]
pub struct HealthCheck {
    pub timeout: Duration,
    pub interval: Duration,
    /// Failures in a row that mark an endpoint unhealthy.
    pub unhealthy_threshold: u32,
    /// Successes in a row that mark an unhealthy endpoint healthy again.
    pub healthy_threshold: u32,
    pub kind: HealthCheckKind,
}

/// `health_checker`.
#[derive(Debug, Clone, Serialize)]
pub enum HealthCheckKind {
    /// `http_health_check`: `GET path` (HTTP/2 when the cluster is), healthy
    /// when the status is in one of the `expected` ranges (`[start, end)`,
    /// default `[200, 201)`).
    Http {
        path: String,
        /// `host` (default: the cluster name).
        host: Option<String>,
        expected: Vec<(u16, u16)>,
    },
    /// `tcp_health_check` without payloads: healthy when a connection opens.
    Tcp,
    /// `grpc_health_check`: `grpc.health.v1.Health/Check` for `service_name`;
    /// healthy on `SERVING`.
    Grpc {
        service: String,
        authority: Option<String>,
    },
}

/// Upstream mTLS (an `UpstreamTlsContext` with SDS `default`/`ROOTCA`).
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamTls {
    /// `match_typed_subject_alt_names` (URI, exact): the SPIFFE ids the
    /// server may present.
    pub expected_ids: Vec<String>,
    /// `alpn_protocols`, offered in order.
    pub alpn: Vec<String>,
    /// Identifies the TLS settings for connection pooling (ids and ALPN):
    /// equal settings share pooled connections across config updates.
    pub pool_key: Arc<str>,
    /// Built once per config (cached for the cluster's lifetime).
    #[serde(skip)]
    pub client: Arc<rustls::ClientConfig>,
}

/// `lb_policy` (with its config), or meshwork's peak-EWMA, which xDS carries as
/// `LEAST_REQUEST` plus `metadata.filter_metadata["meshwork"]["lb"] = "peak_ewma"`.
#[derive(Debug, Clone, Serialize)]
pub enum LbPolicy {
    PeakEwma,
    RoundRobin,
    LeastRequest {
        choice_count: u32,
    },
    Random,
    RingHash {
        minimum_ring_size: u64,
        maximum_ring_size: u64,
    },
    Maglev {
        table_size: u64,
    },
}

/// A `ClusterLoadAssignment`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadAssignment {
    pub cluster_name: String,
    pub localities: Vec<LocalityEndpoints>,
}

impl LoadAssignment {
    /// Every endpoint with its effective weight.
    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.localities.iter().flat_map(|l| l.endpoints.iter())
    }
}

/// `LocalityLbEndpoints`.
#[derive(Debug, Clone, Serialize)]
pub struct LocalityEndpoints {
    pub region: String,
    pub zone: String,
    pub weight: u32,
    pub priority: u32,
    pub endpoints: Vec<Endpoint>,
}

/// `LbEndpoint`.
#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// `load_balancing_weight` (default 1).
    pub weight: u32,
    /// `metadata.filter_metadata["envoy.transport_socket_match"].tlsMode ==
    /// "meshwork"`: the endpoint is a sidecar that terminates mTLS.
    pub mtls: bool,
    /// `health_status` is UNHEALTHY, DRAINING or TIMEOUT: the control plane
    /// says not to send new requests here.
    pub unhealthy: bool,
}

fn ser_regex<S: serde::Serializer>(r: &Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

fn ser_display<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn ser_pairs<S: serde::Serializer>(
    v: &[(HeaderName, HeaderValue)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(
        v.iter()
            .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v.as_bytes()))),
    )
}

fn ser_names<S: serde::Serializer>(v: &[HeaderName], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|n| n.as_str()))
}

/// Redirect status codes Envoy's `RedirectAction.response_code` allows.
pub fn redirect_status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::MOVED_PERMANENTLY)
}

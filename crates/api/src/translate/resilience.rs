//! The resilience sections of an effective TrafficPolicy as Envoy xDS:
//! circuit breakers, outlier detection and health checks on clusters; retry
//! policies and timeouts on routes; the fault and local rate limit HTTP
//! filters with their per-route configurations. Contract: `docs/xds.md`.
//!
//! Choices where Envoy leaves room (each so that Envoy and meshwork's proxy
//! mean the same thing):
//! - outlier detection sets every `enforcing_*` explicitly: 100 for the
//!   detectors the policy turns on, 0 for the others (Envoy's defaults
//!   enforce success rate even when unasked);
//! - health checks set `no_traffic_interval` to `interval`, so a cluster
//!   nobody calls yet is checked as often as a busy one (Envoy's default
//!   is 60 s);
//! - per-source rate limits set `always_consume_default_token_bucket:
//!   false`, so each source has its own bucket and no shared one, and carry
//!   their `remote_address` action in the filter's own `rate_limits` (Envoy
//!   warns that route `rate_limits` will stop feeding local rate limits);
//! - rate-limited responses carry `retry-after` (`enable_retry_after_header`).

use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::{thresholds, Thresholds};
use envoy_types::pb::envoy::config::cluster::v3::{CircuitBreakers, OutlierDetection as PbOutlier};
use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, health_check, HeaderValue, HeaderValueOption,
    HealthCheck as PbHealthCheck, RoutingPriority, RuntimeFractionalPercent,
};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher, rate_limit, retry_policy, HeaderMatcher, RateLimit as PbRateLimit, RetryPolicy,
    RouteConfiguration,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor, LocalRateLimitDescriptor, XRateLimitHeadersRfcVersion,
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{fault_delay, FaultDelay};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
    fault_abort, FaultAbort, HttpFault,
};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter, HttpFilter,
};
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::r#type::v3::{
    fractional_percent::DenominatorType, CodecClientType, FractionalPercent, Int64Range, Percent,
    TokenBucket,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue};

use super::util::{any, exact, pb_duration, u32v};
use crate::resources::{
    ConnectionPool, Fault, HealthCheck, OutlierDetection, RateLimit, Retries, RetryBudget, Service,
    ServicePort, Timeouts, DEFAULT_BACKOFF_BASE, DEFAULT_BASE_EJECTION_TIME,
    DEFAULT_BUDGET_MIN_CONCURRENCY, DEFAULT_BUDGET_PERCENT, DEFAULT_CONSECUTIVE_5XX,
    DEFAULT_HC_INTERVAL, DEFAULT_HC_TIMEOUT, DEFAULT_HEALTHY_THRESHOLD,
    DEFAULT_MAX_EJECTION_PERCENT, DEFAULT_MAX_EJECTION_TIME, DEFAULT_OUTLIER_INTERVAL,
    DEFAULT_RATE_INTERVAL, DEFAULT_RETRY_ON, DEFAULT_UNHEALTHY_THRESHOLD,
};

/// Name of the fault injection HTTP filter.
pub(crate) const FAULT: &str = "envoy.filters.http.fault";
/// Name of the local rate limit HTTP filter.
pub(crate) const LOCAL_RATE_LIMIT: &str = "envoy.filters.http.local_ratelimit";
/// Name of the retry host predicate that avoids endpoints already tried.
pub(crate) const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";
/// How many times a retry picks again to find an endpoint not tried yet.
pub(crate) const HOST_SELECTION_ATTEMPTS: i64 = 3;
/// Per-source buckets kept per rate limit (least recently used dropped):
/// meshwork's proxy keeps as many (`proxy::ratelimit::MAX_SOURCES`).
pub(crate) const MAX_SOURCES: u32 = 4096;
/// Descriptor key of the per-source bucket (Envoy's `remote_address` action).
pub(crate) const REMOTE_ADDRESS: &str = "remote_address";
/// Header on meshwork's own rate-limited responses (and Envoy's, configured).
pub(crate) const ERROR_HEADER: &str = "x-meshwork-error";

/// `circuit_breakers` when the pool sets a limit or a retry budget applies.
pub(crate) fn circuit_breakers(
    pool: Option<&ConnectionPool>,
    budget: Option<&RetryBudget>,
) -> Option<CircuitBreakers> {
    let t = Thresholds {
        priority: RoutingPriority::Default as i32,
        max_connections: pool.and_then(|p| p.max_connections).map(u32v),
        max_pending_requests: pool.and_then(|p| p.max_pending_requests).map(u32v),
        max_requests: pool.and_then(|p| p.max_requests).map(u32v),
        max_retries: pool.and_then(|p| p.max_retries).map(u32v),
        retry_budget: budget.map(|b| thresholds::RetryBudget {
            budget_percent: Some(Percent {
                value: b
                    .percent
                    .map(|p| p.as_f64())
                    .unwrap_or(f64::from(DEFAULT_BUDGET_PERCENT)),
            }),
            min_retry_concurrency: Some(u32v(
                b.min_concurrency.unwrap_or(DEFAULT_BUDGET_MIN_CONCURRENCY),
            )),
            ..Default::default()
        }),
        ..Default::default()
    };
    let set = t.max_connections.is_some()
        || t.max_pending_requests.is_some()
        || t.max_requests.is_some()
        || t.max_retries.is_some()
        || t.retry_budget.is_some();
    set.then(|| CircuitBreakers {
        thresholds: vec![t],
        ..Default::default()
    })
}

/// A whole percentage (validated 0..=100) as Envoy's integer percent.
fn whole(p: crate::resources::Percent) -> u32 {
    u32::try_from(p.per_million() / 10_000).unwrap_or(0)
}

/// `outlier_detection`, every detector's enforcement explicit.
pub(crate) fn outlier_detection(o: &OutlierDetection) -> PbOutlier {
    let c5 = o.consecutive5xx.unwrap_or(DEFAULT_CONSECUTIVE_5XX);
    let gw = o.consecutive_gateway_errors.unwrap_or(0);
    let on = |b: bool| Some(u32v(if b { 100 } else { 0 }));
    let mut pb = PbOutlier {
        interval: Some(pb_duration(
            o.interval
                .map(|d| d.get())
                .unwrap_or(DEFAULT_OUTLIER_INTERVAL),
        )),
        base_ejection_time: Some(pb_duration(
            o.base_ejection_time
                .map(|d| d.get())
                .unwrap_or(DEFAULT_BASE_EJECTION_TIME),
        )),
        max_ejection_time: Some(pb_duration(
            o.max_ejection_time
                .map(|d| d.get())
                .unwrap_or(DEFAULT_MAX_EJECTION_TIME),
        )),
        max_ejection_percent: Some(u32v(
            o.max_ejection_percent
                .map(whole)
                .unwrap_or(DEFAULT_MAX_EJECTION_PERCENT),
        )),
        enforcing_consecutive_5xx: on(c5 > 0),
        enforcing_consecutive_gateway_failure: on(gw > 0),
        enforcing_success_rate: on(o.success_rate.is_some()),
        enforcing_failure_percentage: on(o.failure_percentage.is_some()),
        ..Default::default()
    };
    if c5 > 0 {
        pb.consecutive_5xx = Some(u32v(c5));
    }
    if gw > 0 {
        pb.consecutive_gateway_failure = Some(u32v(gw));
    }
    if let Some(sr) = &o.success_rate {
        pb.success_rate_minimum_hosts = sr.minimum_hosts.map(u32v);
        pb.success_rate_request_volume = sr.request_volume.map(u32v);
        // Envoy's factor is in thousandths; ours in millionths of one.
        pb.success_rate_stdev_factor = sr
            .stdev_factor
            .map(|f| u32v(u32::try_from(f.per_million() / 10).unwrap_or(u32::MAX)));
    }
    if let Some(fp) = &o.failure_percentage {
        pb.failure_percentage_threshold = fp.threshold.map(|t| u32v(whole(t)));
        pb.failure_percentage_minimum_hosts = fp.minimum_hosts.map(u32v);
        pb.failure_percentage_request_volume = fp.request_volume.map(u32v);
    }
    pb
}

/// `health_checks[0]` for service port `sp` of `svc`.
pub(crate) fn health_check(h: &HealthCheck, svc: &Service, sp: &ServicePort) -> PbHealthCheck {
    let interval = h.interval.map(|d| d.get()).unwrap_or(DEFAULT_HC_INTERVAL);
    let checker = if let Some(http) = &h.http {
        let codes = if http.expected_statuses.is_empty() {
            vec![200]
        } else {
            http.expected_statuses.clone()
        };
        health_check::HealthChecker::HttpHealthCheck(health_check::HttpHealthCheck {
            host: http
                .host
                .clone()
                .unwrap_or_else(|| svc.metadata.name.clone()),
            path: http.path.clone(),
            expected_statuses: status_ranges(&codes),
            codec_client_type: if sp.app_protocol.is_http2() {
                CodecClientType::Http2 as i32
            } else {
                CodecClientType::Http1 as i32
            },
            ..Default::default()
        })
    } else if let Some(g) = &h.grpc {
        health_check::HealthChecker::GrpcHealthCheck(health_check::GrpcHealthCheck {
            service_name: g.service.clone(),
            // As the HTTP check's host: the service's name, which a gRPC
            // server may route on (Envoy defaults to the cluster name).
            authority: svc.metadata.name.clone(),
            ..Default::default()
        })
    } else {
        health_check::HealthChecker::TcpHealthCheck(health_check::TcpHealthCheck::default())
    };
    PbHealthCheck {
        timeout: Some(pb_duration(
            h.timeout.map(|d| d.get()).unwrap_or(DEFAULT_HC_TIMEOUT),
        )),
        interval: Some(pb_duration(interval)),
        no_traffic_interval: Some(pb_duration(interval)),
        healthy_threshold: Some(u32v(
            h.healthy_threshold.unwrap_or(DEFAULT_HEALTHY_THRESHOLD),
        )),
        unhealthy_threshold: Some(u32v(
            h.unhealthy_threshold.unwrap_or(DEFAULT_UNHEALTHY_THRESHOLD),
        )),
        health_checker: Some(checker),
        ..Default::default()
    }
}

/// Status codes as `[start, end)` ranges, consecutive codes merged.
fn status_ranges(codes: &[u16]) -> Vec<Int64Range> {
    let mut sorted: Vec<i64> = codes.iter().map(|c| i64::from(*c)).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<Int64Range> = Vec::new();
    for c in sorted {
        match out.last_mut() {
            Some(r) if r.end == c => r.end = c + 1,
            _ => out.push(Int64Range {
                start: c,
                end: c + 1,
            }),
        }
    }
    out
}

/// The route's `retry_policy`: from `retries`, with `timeouts.perTry` as
/// `per_try_timeout`. A per-try timeout without retries is a policy of no
/// retries (`num_retries: 0`), which is how Envoy carries it.
pub(crate) fn retry_policy(r: Option<&Retries>, t: Option<&Timeouts>) -> Option<RetryPolicy> {
    let per_try = t
        .and_then(|t| t.per_try)
        .map(|d| d.get())
        .filter(|d| !d.is_zero())
        .map(pb_duration);
    let Some(r) = r else {
        return per_try.map(|p| RetryPolicy {
            num_retries: Some(u32v(0)),
            per_try_timeout: Some(p),
            ..Default::default()
        });
    };
    let mut on: Vec<&str> = if r.on.is_empty() {
        DEFAULT_RETRY_ON.to_vec()
    } else {
        r.on.iter().map(String::as_str).collect()
    };
    on.extend(r.grpc_statuses.iter().map(String::as_str));
    if !r.status_codes.is_empty() {
        on.push("retriable-status-codes");
    }
    let mut seen = Vec::new();
    on.retain(|c| {
        let new = !seen.contains(c);
        seen.push(*c);
        new
    });
    let codes: Vec<u32> = if !r.status_codes.is_empty() {
        r.status_codes.iter().map(|c| u32::from(*c)).collect()
    } else if r.on.is_empty() {
        vec![503]
    } else {
        Vec::new()
    };
    Some(RetryPolicy {
        retry_on: on.join(","),
        num_retries: Some(u32v(r.attempts)),
        per_try_timeout: per_try,
        retriable_status_codes: codes,
        retry_back_off: r.backoff.as_ref().map(|b| {
            let base = b
                .base_interval
                .map(|d| d.get())
                .unwrap_or(DEFAULT_BACKOFF_BASE);
            retry_policy::RetryBackOff {
                base_interval: Some(pb_duration(base)),
                max_interval: Some(pb_duration(
                    b.max_interval.map(|d| d.get()).unwrap_or(base * 10),
                )),
            }
        }),
        retry_host_predicate: vec![retry_policy::RetryHostPredicate {
            name: PREVIOUS_HOSTS.to_string(),
            config_type: Some(retry_policy::retry_host_predicate::ConfigType::TypedConfig(
                any(&PreviousHostsPredicate {}),
            )),
        }],
        host_selection_retry_max_attempts: HOST_SELECTION_ATTEMPTS,
        ..Default::default()
    })
}

fn per_million(p: Option<crate::resources::Percent>) -> FractionalPercent {
    FractionalPercent {
        numerator: p
            .map(|p| u32::try_from(p.per_million()).unwrap_or(0))
            .unwrap_or(1_000_000),
        denominator: DenominatorType::Million as i32,
    }
}

/// The per-route `HTTPFault` of a `fault` section.
pub(crate) fn http_fault(f: &Fault) -> HttpFault {
    HttpFault {
        delay: f.delay.as_ref().map(|d| FaultDelay {
            fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(pb_duration(
                d.fixed_delay.get(),
            ))),
            percentage: Some(per_million(d.percent)),
        }),
        abort: f.abort.as_ref().map(|a| FaultAbort {
            error_type: match (a.http_status, a.grpc_status) {
                (Some(s), _) => Some(fault_abort::ErrorType::HttpStatus(u32::from(s))),
                (None, Some(s)) => Some(fault_abort::ErrorType::GrpcStatus(s)),
                (None, None) => None,
            },
            percentage: Some(per_million(a.percent)),
            ..Default::default()
        }),
        headers: f
            .headers
            .iter()
            .map(|h| HeaderMatcher {
                name: h.name.to_ascii_lowercase(),
                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
                    exact(&h.value),
                )),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn hundred() -> RuntimeFractionalPercent {
    RuntimeFractionalPercent {
        default_value: Some(FractionalPercent {
            numerator: 100,
            denominator: DenominatorType::Hundred as i32,
        }),
        ..Default::default()
    }
}

/// A `LocalRateLimit` enforcing `r` (`None`: the filter's own config with no
/// bucket, which routes override).
pub(crate) fn local_rate_limit(stat_prefix: &str, r: Option<&RateLimit>) -> LocalRateLimit {
    let Some(r) = r else {
        return LocalRateLimit {
            stat_prefix: stat_prefix.to_string(),
            ..Default::default()
        };
    };
    let bucket = TokenBucket {
        max_tokens: r.burst.unwrap_or(r.requests),
        tokens_per_fill: Some(u32v(r.requests)),
        fill_interval: Some(pb_duration(
            r.interval.map(|d| d.get()).unwrap_or(DEFAULT_RATE_INTERVAL),
        )),
    };
    let mut l = LocalRateLimit {
        stat_prefix: stat_prefix.to_string(),
        token_bucket: Some(bucket),
        filter_enabled: Some(hundred()),
        filter_enforced: Some(hundred()),
        enable_x_ratelimit_headers: XRateLimitHeadersRfcVersion::DraftVersion03 as i32,
        response_headers_to_add: vec![HeaderValueOption {
            header: Some(HeaderValue {
                key: ERROR_HEADER.to_string(),
                value: "rate_limited".to_string(),
                ..Default::default()
            }),
            append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
            ..Default::default()
        }],
        enable_retry_after_header: true,
        ..Default::default()
    };
    if r.per_source {
        l.descriptors = vec![LocalRateLimitDescriptor {
            entries: vec![rate_limit_descriptor::Entry {
                key: REMOTE_ADDRESS.to_string(),
                value: String::new(),
            }],
            token_bucket: Some(bucket),
            ..Default::default()
        }];
        // The filter's own `rate_limits`, not the route's: Envoy 1.40 warns
        // that route `rate_limits` will stop feeding local rate limits.
        l.rate_limits = per_source_actions();
        l.always_consume_default_token_bucket = Some(BoolValue { value: false });
        l.max_dynamic_descriptors = Some(u32v(MAX_SOURCES));
    }
    l
}

/// The `rate_limits` that feed a per-source bucket: the caller's address
/// as descriptor `remote_address`.
fn per_source_actions() -> Vec<PbRateLimit> {
    vec![PbRateLimit {
        actions: vec![rate_limit::Action {
            action_specifier: Some(rate_limit::action::ActionSpecifier::RemoteAddress(
                rate_limit::action::RemoteAddress {},
            )),
        }],
        ..Default::default()
    }]
}

/// An HTTP filter with a typed config.
pub(crate) fn http_filter(name: &str, config: Any) -> HttpFilter {
    HttpFilter {
        name: name.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    }
}

/// The fault filter of an HCM: no fault of its own, routes say which.
pub(crate) fn fault_filter() -> HttpFilter {
    http_filter(FAULT, any(&HttpFault::default()))
}

/// Stat prefix of the outbound rate limit filter (which holds no bucket:
/// each limited route has its own).
pub(crate) const OUTBOUND_RATE_LIMIT: &str = "outbound_rate_limit";

/// The HTTP filters the outbound HCM needs before the router: the local
/// rate limit filter when a route is rate limited, then the fault filter
/// when a route injects faults (so a request over the limit is refused
/// before any fault, and injected faults act like the upstream behind the
/// limit). Neither has a configuration of its own; the routes' per-filter
/// configs say what to do.
pub(crate) fn outbound_filters(rc: &RouteConfiguration) -> Vec<HttpFilter> {
    let uses = |name: &str| {
        rc.virtual_hosts
            .iter()
            .flat_map(|v| &v.routes)
            .any(|r| r.typed_per_filter_config.contains_key(name))
    };
    let mut out = Vec::new();
    if uses(LOCAL_RATE_LIMIT) {
        out.push(http_filter(
            LOCAL_RATE_LIMIT,
            any(&local_rate_limit(OUTBOUND_RATE_LIMIT, None)),
        ));
    }
    if uses(FAULT) {
        out.push(fault_filter());
    }
    out
}

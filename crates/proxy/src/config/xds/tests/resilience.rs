//! Decoding of the resilience fields: retry policies, route idle timeouts,
//! rate limit and fault filters (connection manager and per route), route
//! `rate_limits`, circuit breakers, outlier detection, health checks, the
//! panic threshold and endpoint health.

use std::time::Duration;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3 as crl;
use envoy_types::pb::envoy::extensions::filters::common::fault::v3 as common_fault;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3 as lrl;
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;

use super::*;
use crate::config::model::{AbortStatus, HealthCheckKind};

// ---------------------------------------------------------------------------
// Builders shaped like the translator's output (see the brief's mapping).

fn percent(value: u32) -> etype::FractionalPercent {
    etype::FractionalPercent {
        numerator: value,
        denominator: etype::fractional_percent::DenominatorType::Hundred as i32,
    }
}

fn runtime_percent(value: u32) -> core::RuntimeFractionalPercent {
    core::RuntimeFractionalPercent {
        default_value: Some(percent(value)),
        runtime_key: "local_rate_limit_enforced".into(),
    }
}

fn bucket(max: u32, per_fill: u32, interval_ms: i64) -> etype::TokenBucket {
    let nanos = i32::try_from(interval_ms % 1000 * 1_000_000).unwrap();
    etype::TokenBucket {
        max_tokens: max,
        tokens_per_fill: Some(u32v(per_fill)),
        fill_interval: Some(dur(interval_ms / 1000, nanos)),
    }
}

/// A Service's limit: 10 requests per second, burst 20, enforced, with the
/// draft-03 headers, `retry-after` and `x-meshwork-error`.
fn service_limit() -> lrl::LocalRateLimit {
    lrl::LocalRateLimit {
        stat_prefix: "http_local_rate_limiter".into(),
        token_bucket: Some(etype::TokenBucket {
            max_tokens: 20,
            tokens_per_fill: Some(u32v(10)),
            fill_interval: Some(dur(1, 0)),
        }),
        filter_enabled: Some(runtime_percent(100)),
        filter_enforced: Some(runtime_percent(100)),
        enable_x_ratelimit_headers: crl::XRateLimitHeadersRfcVersion::DraftVersion03 as i32,
        enable_retry_after_header: true,
        response_headers_to_add: vec![header_opt("x-meshwork-error", "rate_limited", OVERWRITE)],
        ..Default::default()
    }
}

/// The same limit per source: a wildcard `remote_address` descriptor.
fn per_source_limit() -> lrl::LocalRateLimit {
    lrl::LocalRateLimit {
        token_bucket: None,
        descriptors: vec![crl::LocalRateLimitDescriptor {
            entries: vec![crl::rate_limit_descriptor::Entry {
                key: "remote_address".into(),
                value: String::new(),
            }],
            token_bucket: Some(bucket(5, 5, 500)),
            shadow_mode: false,
        }],
        max_dynamic_descriptors: Some(u32v(1000)),
        ..service_limit()
    }
}

fn remote_address_action() -> rpb::RateLimit {
    rpb::RateLimit {
        actions: vec![rpb::rate_limit::Action {
            action_specifier: Some(rpb::rate_limit::action::ActionSpecifier::RemoteAddress(
                Default::default(),
            )),
        }],
        ..Default::default()
    }
}

fn http_filter(name: &str, config: pbuf::Any) -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: name.into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    }
}

fn ratelimit_filter(l: &lrl::LocalRateLimit) -> hcm::HttpFilter {
    http_filter("envoy.filters.http.local_ratelimit", any(l))
}

fn fault_filter(f: &fault::HttpFault) -> hcm::HttpFilter {
    http_filter("envoy.filters.http.fault", any(f))
}

/// The outbound listener with these filters before the router.
fn listener_with(filters: Vec<hcm::HttpFilter>) -> lpb::Listener {
    let mut h = hcm_rds("outbound_http");
    h.http_filters = filters.into_iter().chain([router_filter()]).collect();
    let mut l = outbound_http();
    l.filter_chains = vec![http_chain(&h)];
    l
}

fn hcm_with(filters: Vec<hcm::HttpFilter>) -> model::HttpConnectionManager {
    let snap = listeners_only(vec![listener_with(filters)]).unwrap();
    snap.listeners["outbound_http"].http.clone().unwrap()
}

fn hcm_nack(filters: Vec<hcm::HttpFilter>) -> String {
    nack(listeners_only(vec![listener_with(filters)]))
}

const HCM_AT: &str = "listener \"outbound_http\": filter_chains[0].filters[0].typed_config.";

fn chaos() -> fault::HttpFault {
    fault::HttpFault {
        delay: Some(common_fault::FaultDelay {
            percentage: Some(percent(50)),
            fault_delay_secifier: Some(common_fault::fault_delay::FaultDelaySecifier::FixedDelay(
                dur(0, 200_000_000),
            )),
        }),
        abort: Some(fault::FaultAbort {
            percentage: Some(etype::FractionalPercent {
                numerator: 25_000,
                denominator: etype::fractional_percent::DenominatorType::Million as i32,
            }),
            error_type: Some(fault::fault_abort::ErrorType::HttpStatus(503)),
            ..Default::default()
        }),
        headers: vec![header(
            "x-chaos",
            rpb::header_matcher::HeaderMatchSpecifier::StringMatch(string_match(
                matcher::string_matcher::MatchPattern::Exact("on".into()),
            )),
            false,
        )],
        ..Default::default()
    }
}

fn with_per_filter(configs: Vec<(&str, pbuf::Any)>) -> rpb::Route {
    rpb::Route {
        typed_per_filter_config: configs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        ..route_to("r", "/", "c")
    }
}

fn retry(p: rpb::RetryPolicy) -> rpb::Route {
    forward_action(rpb::RouteAction {
        retry_policy: Some(p),
        ..Default::default()
    })
}

fn retry_of(p: rpb::RetryPolicy) -> model::RetryPolicy {
    (*forward_of(retry(p)).retry.unwrap()).clone()
}

/// The translator's retry policy for `retries: {attempts: 3, ...}`.
fn translated_retry() -> rpb::RetryPolicy {
    rpb::RetryPolicy {
        retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
            .into(),
        num_retries: Some(u32v(3)),
        per_try_timeout: Some(dur(0, 500_000_000)),
        retriable_status_codes: vec![503],
        retry_back_off: Some(rpb::retry_policy::RetryBackOff {
            base_interval: Some(dur(0, 50_000_000)),
            max_interval: Some(dur(1, 0)),
        }),
        retry_host_predicate: vec![rpb::retry_policy::RetryHostPredicate {
            name: "envoy.retry_host_predicates.previous_hosts".into(),
            config_type: Some(
                rpb::retry_policy::retry_host_predicate::ConfigType::TypedConfig(any(
                    &PreviousHostsPredicate {},
                )),
            ),
        }],
        host_selection_retry_max_attempts: 3,
        ..Default::default()
    }
}

fn cluster_with(f: impl FnOnce(&mut cpb::Cluster)) -> cpb::Cluster {
    let mut c = eds_cluster("c");
    f(&mut c);
    c
}

fn converted_cluster(c: cpb::Cluster) -> model::Cluster {
    let snap = clusters_only(vec![c]).unwrap();
    (*snap.clusters["c"]).clone()
}

fn http2(c: &mut cpb::Cluster) {
    let options = uhttp::HttpProtocolOptions {
        upstream_protocol_options: Some(
            uhttp::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                uhttp::http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(
                        uhttp::http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                            Default::default(),
                        ),
                    ),
                },
            ),
        ),
        ..Default::default()
    };
    c.typed_extension_protocol_options = [(HTTP_PROTOCOL_OPTIONS.to_string(), any(&options))]
        .into_iter()
        .collect();
}

/// The translator's HTTP health check.
fn http_check() -> core::HealthCheck {
    core::HealthCheck {
        timeout: Some(dur(1, 0)),
        interval: Some(dur(5, 0)),
        no_traffic_interval: Some(dur(5, 0)),
        unhealthy_threshold: Some(u32v(2)),
        healthy_threshold: Some(u32v(1)),
        health_checker: Some(core::health_check::HealthChecker::HttpHealthCheck(
            core::health_check::HttpHealthCheck {
                path: "/healthz".into(),
                expected_statuses: vec![etype::Int64Range {
                    start: 200,
                    end: 300,
                }],
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

fn outlier(f: impl FnOnce(&mut cpb::OutlierDetection)) -> cpb::Cluster {
    let mut o = cpb::OutlierDetection::default();
    f(&mut o);
    cluster_with(|c| c.outlier_detection = Some(o))
}

// ---------------------------------------------------------------------------
// Retry policy and idle timeout

#[test]
fn retry_policy_converts_the_translators_shape() {
    let p = retry_of(translated_retry());
    assert!(p.on.connect_failure && p.on.refused_stream && p.on.retriable_status_codes);
    assert!(p.on.grpc_unavailable && p.on.grpc_cancelled);
    assert!(!p.on.five_xx && !p.on.reset && !p.on.gateway_error);
    assert_eq!(p.num_retries, 3);
    assert_eq!(p.per_try_timeout, Some(Duration::from_millis(500)));
    assert_eq!(p.retriable_status_codes, vec![503]);
    assert_eq!(p.backoff_base, Duration::from_millis(50));
    assert_eq!(p.backoff_max, Duration::from_secs(1));
    assert!(p.avoid_previous_hosts);
}

#[test]
fn retry_policy_defaults_are_envoys() {
    let p = retry_of(rpb::RetryPolicy {
        retry_on: "5xx,gateway-error,reset".into(),
        ..Default::default()
    });
    assert!(p.on.five_xx && p.on.gateway_error && p.on.reset);
    assert_eq!(p.num_retries, 1);
    assert_eq!(p.per_try_timeout, None);
    assert_eq!(
        (p.backoff_base, p.backoff_max),
        (Duration::from_millis(25), Duration::from_millis(250))
    );
    assert!(!p.avoid_previous_hosts);
    // Only a base: the maximum is ten times it. A zero per-try timeout is none.
    let p = retry_of(rpb::RetryPolicy {
        per_try_timeout: Some(dur(0, 0)),
        num_retries: Some(u32v(0)),
        retry_back_off: Some(rpb::retry_policy::RetryBackOff {
            base_interval: Some(dur(0, 100_000_000)),
            max_interval: None,
        }),
        ..Default::default()
    });
    assert_eq!(p.per_try_timeout, None);
    assert_eq!(p.num_retries, 0);
    assert_eq!(p.backoff_max, Duration::from_secs(1));
    assert!(forward_of(route_to("r", "/", "c")).retry.is_none());
}

#[test]
fn route_idle_timeout_converts() {
    let f = forward_of(forward_action(rpb::RouteAction {
        idle_timeout: Some(dur(30, 0)),
        ..Default::default()
    }));
    assert_eq!(f.idle_timeout, Some(Duration::from_secs(30)));
    let f = forward_of(forward_action(rpb::RouteAction {
        idle_timeout: Some(dur(0, 0)),
        ..Default::default()
    }));
    assert_eq!(f.idle_timeout, Some(Duration::ZERO));
    assert!(route_nack(forward_action(rpb::RouteAction {
        idle_timeout: Some(dur(-1, 0)),
        ..Default::default()
    }))
    .ends_with("route.idle_timeout: negative duration"));
}

#[test]
fn retry_policy_nacks_name_the_field() {
    type Case = (&'static str, fn(&mut rpb::RetryPolicy));
    let cases: Vec<Case> = vec![
        (
            "retry_on: unknown retry condition \"5xx \" (supported: 5xx, gateway-error",
            |p| p.retry_on = "5xx ,reset".into(),
        ),
        (
            "retry_on: \"retriable-4xx\" is not implemented by meshwork",
            |p| p.retry_on = "retriable-4xx".into(),
        ),
        (
            "retry_on: \"envoy-ratelimited\" is not implemented by meshwork",
            |p| p.retry_on = "5xx,envoy-ratelimited".into(),
        ),
        (
            "retriable_status_codes[1]: 700 is not an HTTP status",
            |p| p.retriable_status_codes = vec![503, 700],
        ),
        ("retry_back_off.base_interval: required", |p| {
            p.retry_back_off.as_mut().unwrap().base_interval = None
        }),
        (
            "retry_back_off.base_interval: must be greater than 0",
            |p| p.retry_back_off.as_mut().unwrap().base_interval = Some(dur(0, 0)),
        ),
        (
            "retry_back_off.max_interval: must be greater than or equal to base_interval",
            |p| p.retry_back_off.as_mut().unwrap().max_interval = Some(dur(0, 1_000_000)),
        ),
        (
            "retry_host_predicate[0].typed_config: unsupported type",
            |p| {
                p.retry_host_predicate[0].config_type = Some(
                    rpb::retry_policy::retry_host_predicate::ConfigType::TypedConfig(any(
                        &Router::default(),
                    )),
                )
            },
        ),
        ("retry_host_predicate[0].typed_config: required", |p| {
            p.retry_host_predicate[0].config_type = None
        }),
        (
            "host_selection_retry_max_attempts: must not be negative",
            |p| p.host_selection_retry_max_attempts = -1,
        ),
        ("per_try_timeout: negative duration", |p| {
            p.per_try_timeout = Some(dur(-1, 0))
        }),
        ("per_try_idle_timeout: unsupported field", |p| {
            p.per_try_idle_timeout = Some(dur(1, 0))
        }),
        ("retry_priority: unsupported field", |p| {
            p.retry_priority = Some(Default::default())
        }),
        ("retriable_headers: unsupported field", |p| {
            p.retriable_headers = vec![Default::default()]
        }),
        ("rate_limited_retry_back_off: unsupported field", |p| {
            p.rate_limited_retry_back_off = Some(Default::default())
        }),
    ];
    for (want, mutate) in cases {
        let mut p = translated_retry();
        mutate(&mut p);
        let got = route_nack(retry(p));
        let want = format!("route \"rc\": virtual_hosts[0].routes[0].route.retry_policy.{want}");
        assert!(got.starts_with(&want), "expected {want:?}, got {got:?}");
    }
}

#[test]
#[allow(deprecated)]
fn route_rate_limits_accept_only_remote_address() {
    let ok = forward_action(rpb::RouteAction {
        rate_limits: vec![remote_address_action()],
        ..Default::default()
    });
    converted_route(ok);
    type Case = (&'static str, fn(&mut rpb::RateLimit));
    let cases: Vec<Case> = vec![
        ("actions: only [{remote_address: {}}] is supported", |r| {
            r.actions[0].action_specifier = Some(
                rpb::rate_limit::action::ActionSpecifier::GenericKey(Default::default()),
            )
        }),
        ("actions: only [{remote_address: {}}] is supported", |r| {
            r.actions.push(r.actions[0].clone())
        }),
        ("stage: only stage 0 is supported", |r| {
            r.stage = Some(u32v(1))
        }),
        ("disable_key: unsupported field", |r| {
            r.disable_key = "k".into()
        }),
        ("limit: unsupported field", |r| {
            r.limit = Some(Default::default())
        }),
    ];
    for (want, mutate) in cases {
        let mut r = remote_address_action();
        mutate(&mut r);
        let got = route_nack(forward_action(rpb::RouteAction {
            rate_limits: vec![r],
            ..Default::default()
        }));
        let want = format!("virtual_hosts[0].routes[0].route.rate_limits[0].{want}");
        assert!(got.contains(&want), "expected {want:?}, got {got:?}");
    }
    assert!(route_nack(forward_action(rpb::RouteAction {
        include_vh_rate_limits: Some(pbuf::BoolValue { value: true }),
        ..Default::default()
    }))
    .contains("route.include_vh_rate_limits: unsupported field"));
}

// ---------------------------------------------------------------------------
// Per-route filter configs

#[test]
fn route_overrides_convert() {
    let r = converted_route(with_per_filter(vec![
        ("envoy.filters.http.fault", any(&chaos())),
        (
            "envoy.filters.http.local_ratelimit",
            any(&lrl::LocalRateLimit {
                token_bucket: Some(bucket(3, 1, 100)),
                ..service_limit()
            }),
        ),
    ]));
    let f = r.fault.unwrap();
    let delay = f.delay.as_ref().unwrap();
    assert_eq!(delay.fixed, Duration::from_millis(200));
    assert_eq!(delay.per_million, 500_000);
    let abort = f.abort.as_ref().unwrap();
    assert!(matches!(abort.status, AbortStatus::Http(503)));
    assert_eq!(abort.per_million, 25_000);
    assert_eq!(f.headers.len(), 1);
    assert_eq!(f.headers[0].name, "x-chaos");
    let l = r.rate_limit.unwrap();
    assert_eq!(
        (l.max_tokens, l.tokens_per_fill, l.fill_interval),
        (3, 1, Duration::from_millis(100))
    );
    assert_eq!(l.status, 429);
    assert!(l.rate_limit_headers && l.retry_after && !l.per_source);
    assert_eq!(l.stat_prefix, "http_local_rate_limiter");
    assert_eq!(
        l.response_headers,
        vec![(
            HeaderName::from_static("x-meshwork-error"),
            HeaderValue::from_static("rate_limited")
        )]
    );
}

#[test]
fn fault_abort_kinds_and_defaults() {
    let grpc = fault::HttpFault {
        abort: Some(fault::FaultAbort {
            percentage: Some(percent(100)),
            error_type: Some(fault::fault_abort::ErrorType::GrpcStatus(14)),
            ..Default::default()
        }),
        ..Default::default()
    };
    let r = converted_route(with_per_filter(vec![(
        "envoy.filters.http.fault",
        any(&grpc),
    )]));
    let f = r.fault.unwrap();
    assert!(matches!(
        f.abort.as_ref().unwrap().status,
        AbortStatus::Grpc(14)
    ));
    assert_eq!(f.abort.as_ref().unwrap().per_million, 1_000_000);
    assert!(f.delay.is_none() && f.headers.is_empty());
    // An unset percentage is 0% in Envoy: the fault never fires.
    let mut unset = chaos();
    unset.delay.as_mut().unwrap().percentage = None;
    unset.abort.as_mut().unwrap().percentage = None;
    let r = converted_route(with_per_filter(vec![(
        "envoy.filters.http.fault",
        any(&unset),
    )]));
    let f = r.fault.unwrap();
    assert_eq!(f.delay.as_ref().unwrap().per_million, 0);
    assert_eq!(f.abort.as_ref().unwrap().per_million, 0);
}

#[test]
fn route_override_nacks_name_the_field() {
    let at = "route \"rc\": virtual_hosts[0].routes[0].typed_per_filter_config";
    let cases: Vec<(String, rpb::Route)> = vec![
        (
            format!("{at}[\"envoy.filters.http.cors\"]: unsupported filter (only envoy.filters.http.local_ratelimit and envoy.filters.http.fault)"),
            with_per_filter(vec![("envoy.filters.http.cors", any(&chaos()))]),
        ),
        (
            format!("{at}[\"envoy.filters.http.fault\"].typed_config: unsupported type \"type.googleapis.com/envoy.config.route.v3.FilterConfig\" (filter \"envoy.filters.http.fault\"): an HTTPFault (not wrapped in a FilterConfig)"),
            with_per_filter(vec![(
                "envoy.filters.http.fault",
                any(&rpb::FilterConfig::default()),
            )]),
        ),
        (
            format!("{at}[\"envoy.filters.http.local_ratelimit\"].token_bucket: required in a route's typed_per_filter_config"),
            with_per_filter(vec![(
                "envoy.filters.http.local_ratelimit",
                any(&lrl::LocalRateLimit {
                    token_bucket: None,
                    ..service_limit()
                }),
            )]),
        ),
        (
            format!("{at}[\"envoy.filters.http.fault\"].abort.http_status: 600 is not in [200, 600)"),
            with_per_filter(vec![("envoy.filters.http.fault", {
                let mut f = chaos();
                f.abort.as_mut().unwrap().error_type =
                    Some(fault::fault_abort::ErrorType::HttpStatus(600));
                any(&f)
            })]),
        ),
        (
            format!("{at}[\"envoy.filters.http.fault\"].abort.error_type: http_status or grpc_status is required"),
            with_per_filter(vec![("envoy.filters.http.fault", {
                let mut f = chaos();
                f.abort.as_mut().unwrap().error_type = None;
                any(&f)
            })]),
        ),
        (
            format!("{at}[\"envoy.filters.http.fault\"].abort.header_abort: unsupported field"),
            with_per_filter(vec![("envoy.filters.http.fault", {
                let mut f = chaos();
                f.abort.as_mut().unwrap().error_type = Some(
                    fault::fault_abort::ErrorType::HeaderAbort(Default::default()),
                );
                any(&f)
            })]),
        ),
        (
            format!("{at}[\"envoy.filters.http.fault\"].abort.response_body: unsupported field"),
            with_per_filter(vec![("envoy.filters.http.fault", {
                let mut f = chaos();
                f.abort.as_mut().unwrap().response_body = "oops".into();
                any(&f)
            })]),
        ),
        (
            format!("{at}[\"envoy.filters.http.fault\"].delay.fixed_delay: must be greater than 0"),
            with_per_filter(vec![("envoy.filters.http.fault", {
                let mut f = chaos();
                f.delay.as_mut().unwrap().fault_delay_secifier = Some(
                    common_fault::fault_delay::FaultDelaySecifier::FixedDelay(dur(0, 0)),
                );
                any(&f)
            })]),
        ),
        (
            format!("{at}[\"envoy.filters.http.fault\"].delay.header_delay: unsupported field"),
            with_per_filter(vec![("envoy.filters.http.fault", {
                let mut f = chaos();
                f.delay.as_mut().unwrap().fault_delay_secifier = Some(
                    common_fault::fault_delay::FaultDelaySecifier::HeaderDelay(Default::default()),
                );
                any(&f)
            })]),
        ),
        (
            format!("{at}[\"envoy.filters.http.fault\"].headers[0].name: pseudo-headers are not supported in fault headers"),
            with_per_filter(vec![("envoy.filters.http.fault", {
                let mut f = chaos();
                f.headers[0].name = ":method".into();
                any(&f)
            })]),
        ),
        (
            format!("{at}[\"envoy.filters.http.fault\"].max_active_faults: unsupported field"),
            with_per_filter(vec![("envoy.filters.http.fault", {
                let mut f = chaos();
                f.max_active_faults = Some(u32v(10));
                any(&f)
            })]),
        ),
        (
            format!("{at}[\"envoy.filters.http.fault\"].upstream_cluster: unsupported field"),
            with_per_filter(vec![("envoy.filters.http.fault", {
                let mut f = chaos();
                f.upstream_cluster = "c".into();
                any(&f)
            })]),
        ),
    ];
    for (want, r) in cases {
        let got = route_nack(r);
        assert!(got.starts_with(&want), "expected {want:?}, got {got:?}");
    }
    // Virtual hosts still take no per-filter configs.
    let mut vh = vhost("vh", &["*"], vec![route_to("r", "/", "c")]);
    vh.typed_per_filter_config = [("envoy.filters.http.fault".to_string(), any(&chaos()))]
        .into_iter()
        .collect();
    assert!(nack(routes_only(vec![route_config("rc", vec![vh])]))
        .contains("virtual_hosts[0].typed_per_filter_config: unsupported field"));
}

// ---------------------------------------------------------------------------
// Connection manager filters

#[test]
fn connection_manager_rate_limit_and_fault_convert() {
    let h = hcm_with(vec![
        ratelimit_filter(&service_limit()),
        fault_filter(&fault::HttpFault::default()),
    ]);
    let l = h.rate_limit.unwrap();
    assert_eq!(
        (l.max_tokens, l.tokens_per_fill, l.fill_interval),
        (20, 10, Duration::from_secs(1))
    );
    assert!(!l.per_source);
    // The translator's empty HTTPFault: the filter is there, nothing fires.
    let f = h.fault.unwrap();
    assert!(f.delay.is_none() && f.abort.is_none());
    let h = hcm_with(vec![]);
    assert!(h.rate_limit.is_none() && h.fault.is_none());
}

#[test]
fn connection_manager_rate_limit_without_bucket_limits_nothing() {
    // An HTTPRoute's limit: the filter at the manager only enables overrides.
    let bare = lrl::LocalRateLimit {
        stat_prefix: "http_local_rate_limiter".into(),
        ..Default::default()
    };
    let l = hcm_with(vec![ratelimit_filter(&bare)]).rate_limit.unwrap();
    assert!(l.fill_interval.is_zero());
    assert_eq!(l.max_tokens, 0);
    // Enabled at 100% without a bucket: Envoy keeps no default bucket either.
    let enabled = lrl::LocalRateLimit {
        token_bucket: None,
        ..service_limit()
    };
    let l = hcm_with(vec![ratelimit_filter(&enabled)])
        .rate_limit
        .unwrap();
    assert!(l.fill_interval.is_zero());
}

#[test]
fn per_source_limit_converts() {
    let l = hcm_with(vec![ratelimit_filter(&per_source_limit())])
        .rate_limit
        .unwrap();
    assert!(l.per_source);
    assert_eq!(
        (l.max_tokens, l.tokens_per_fill, l.fill_interval),
        (5, 5, Duration::from_millis(500))
    );
    // With a default bucket too, it must not be consumed as well.
    let both = lrl::LocalRateLimit {
        token_bucket: Some(bucket(100, 100, 1000)),
        always_consume_default_token_bucket: Some(pbuf::BoolValue { value: false }),
        rate_limits: vec![remote_address_action()],
        ..per_source_limit()
    };
    let l = hcm_with(vec![ratelimit_filter(&both)]).rate_limit.unwrap();
    assert!(l.per_source);
    assert_eq!(l.max_tokens, 5);
    // And per route, where Envoy requires the default bucket.
    let r = converted_route(with_per_filter(vec![(
        "envoy.filters.http.local_ratelimit",
        any(&both),
    )]));
    assert!(r.rate_limit.unwrap().per_source);
}

#[test]
fn status_below_400_means_429_like_envoy() {
    let mut l = service_limit();
    l.status = Some(etype::HttpStatus { code: 200 });
    assert_eq!(
        hcm_with(vec![ratelimit_filter(&l)])
            .rate_limit
            .unwrap()
            .status,
        429
    );
    l.status = Some(etype::HttpStatus { code: 503 });
    assert_eq!(
        hcm_with(vec![ratelimit_filter(&l)])
            .rate_limit
            .unwrap()
            .status,
        503
    );
}

#[test]
fn connection_manager_filter_nacks_name_the_field() {
    let rl = |f: fn(&mut lrl::LocalRateLimit)| {
        let mut l = service_limit();
        f(&mut l);
        ratelimit_filter(&l)
    };
    let ps = |f: fn(&mut lrl::LocalRateLimit)| {
        let mut l = per_source_limit();
        f(&mut l);
        ratelimit_filter(&l)
    };
    let empty_fault = || fault_filter(&fault::HttpFault::default());
    let cases: Vec<(&str, Vec<hcm::HttpFilter>)> = vec![
        (
            "http_filters[1]: out of order or repeated: the filters before the router must be envoy.filters.http.rbac (any number), then at most one envoy.filters.http.local_ratelimit, then at most one envoy.filters.http.fault",
            vec![empty_fault(), rl(|_| {})],
        ),
        (
            "http_filters[1]: out of order or repeated",
            vec![empty_fault(), empty_fault()],
        ),
        (
            "http_filters[1]: out of order or repeated",
            vec![
                rl(|_| {}),
                http_filter(
                    "envoy.filters.http.rbac",
                    any(&envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac::default()),
                ),
            ],
        ),
        (
            "http_filters[1]: out of order or repeated",
            vec![rl(|_| {}), rl(|_| {})],
        ),
        (
            "http_filters[0].name: must be \"envoy.filters.http.fault\" (routes' typed_per_filter_config refers to it by that name)",
            vec![http_filter("fault", any(&fault::HttpFault::default()))],
        ),
        (
            "http_filters[0].name: must be \"envoy.filters.http.local_ratelimit\"",
            vec![http_filter("rl", any(&service_limit()))],
        ),
        (
            "http_filters[0].typed_config.filter_enforced: required at 100% with a token bucket (meshwork does not run shadow or partial limits)",
            vec![rl(|l| l.filter_enforced = None)],
        ),
        (
            "http_filters[0].typed_config.filter_enabled: required at 100% with a token bucket",
            vec![rl(|l| l.filter_enabled = None)],
        ),
        (
            "http_filters[0].typed_config.filter_enforced.default_value: only 100% is supported",
            vec![rl(|l| l.filter_enforced = Some(runtime_percent(50)))],
        ),
        (
            "http_filters[0].typed_config.filter_enabled.default_value: required",
            vec![rl(|l| l.filter_enabled.as_mut().unwrap().default_value = None)],
        ),
        (
            "http_filters[0].typed_config.token_bucket.fill_interval: must be at least 50ms",
            vec![rl(|l| l.token_bucket = Some(bucket(1, 1, 10)))],
        ),
        (
            "http_filters[0].typed_config.token_bucket.max_tokens: must be greater than 0",
            vec![rl(|l| l.token_bucket = Some(bucket(0, 1, 100)))],
        ),
        (
            "http_filters[0].typed_config.token_bucket.tokens_per_fill: must be greater than 0",
            vec![rl(|l| l.token_bucket = Some(bucket(1, 0, 100)))],
        ),
        (
            "http_filters[0].typed_config.token_bucket.fill_interval: required",
            vec![rl(|l| l.token_bucket.as_mut().unwrap().fill_interval = None)],
        ),
        (
            "http_filters[0].typed_config.stat_prefix: must not be empty",
            vec![rl(|l| l.stat_prefix.clear())],
        ),
        (
            "http_filters[0].typed_config.status.code: 700 is not an HTTP status",
            vec![rl(|l| l.status = Some(etype::HttpStatus { code: 700 }))],
        ),
        (
            "http_filters[0].typed_config.enable_x_ratelimit_headers: unknown version 7",
            vec![rl(|l| l.enable_x_ratelimit_headers = 7)],
        ),
        (
            "http_filters[0].typed_config.response_headers_to_add[0].header.key: header \"host\" may not be modified",
            vec![rl(|l| l.response_headers_to_add = vec![header_opt("host", "x", APPEND)])],
        ),
        (
            "http_filters[0].typed_config.stage: unsupported field",
            vec![rl(|l| l.stage = 1)],
        ),
        (
            "http_filters[0].typed_config.local_rate_limit_per_downstream_connection: unsupported field",
            vec![rl(|l| l.local_rate_limit_per_downstream_connection = true)],
        ),
        (
            "http_filters[0].typed_config.rate_limited_as_resource_exhausted: unsupported field",
            vec![rl(|l| l.rate_limited_as_resource_exhausted = true)],
        ),
        (
            "http_filters[0].typed_config.request_headers_to_add_when_not_enforced: unsupported field",
            vec![rl(|l| {
                l.request_headers_to_add_when_not_enforced = vec![header_opt("x", "y", APPEND)]
            })],
        ),
        (
            "http_filters[0].typed_config.max_dynamic_descriptors: only applies with a per-source descriptor",
            vec![rl(|l| l.max_dynamic_descriptors = Some(u32v(10)))],
        ),
        (
            "http_filters[0].typed_config.rate_limits[0].actions: only [{remote_address: {}}] is supported",
            vec![rl(|l| {
                let mut r = remote_address_action();
                r.actions.clear();
                l.rate_limits = vec![r]
            })],
        ),
        (
            "http_filters[0].typed_config.descriptors[0].entries: only [{key: remote_address}] (one bucket per source) is supported",
            vec![ps(|l| l.descriptors[0].entries[0].key = "header_match".into())],
        ),
        (
            "http_filters[0].typed_config.descriptors[0].entries: only [{key: remote_address}]",
            vec![ps(|l| l.descriptors[0].entries[0].value = "10.0.0.1".into())],
        ),
        (
            "http_filters[0].typed_config.descriptors[0].shadow_mode: unsupported field",
            vec![ps(|l| l.descriptors[0].shadow_mode = true)],
        ),
        (
            "http_filters[0].typed_config.descriptors[0].token_bucket: required",
            vec![ps(|l| l.descriptors[0].token_bucket = None)],
        ),
        (
            "http_filters[0].typed_config.descriptors: at most one descriptor (the per-source bucket) is supported",
            vec![ps(|l| l.descriptors.push(l.descriptors[0].clone()))],
        ),
        (
            "http_filters[0].typed_config.max_dynamic_descriptors: must be at least 1",
            vec![ps(|l| l.max_dynamic_descriptors = Some(u32v(0)))],
        ),
        (
            "http_filters[0].typed_config.always_consume_default_token_bucket: must be false with a per-source descriptor and a token_bucket",
            vec![ps(|l| l.token_bucket = Some(bucket(1, 1, 100)))],
        ),
        (
            "http_filters[0].typed_config.filter_enabled: required at 100% with a token bucket",
            vec![ps(|l| l.filter_enabled = None)],
        ),
        (
            "http_filters[0].typed_config.abort.http_status: 100 is not in [200, 600)",
            vec![fault_filter(&fault::HttpFault {
                abort: Some(fault::FaultAbort {
                    error_type: Some(fault::fault_abort::ErrorType::HttpStatus(100)),
                    ..Default::default()
                }),
                ..Default::default()
            })],
        ),
        (
            "http_filters[0].typed_config.response_rate_limit: unsupported field",
            vec![fault_filter(&fault::HttpFault {
                response_rate_limit: Some(Default::default()),
                ..Default::default()
            })],
        ),
    ];
    for (want, filters) in cases {
        let got = hcm_nack(filters);
        let want = format!("{HCM_AT}{want}");
        assert!(got.starts_with(&want), "expected {want:?}, got {got:?}");
    }
}

// ---------------------------------------------------------------------------
// Clusters

#[test]
fn circuit_breakers_convert_with_envoy_defaults() {
    use cpb::circuit_breakers::{thresholds::RetryBudget, Thresholds};
    let c = converted_cluster(cluster_with(|c| {
        c.circuit_breakers = Some(cpb::CircuitBreakers {
            thresholds: vec![
                Thresholds {
                    priority: core::RoutingPriority::Default as i32,
                    max_connections: Some(u32v(10)),
                    max_pending_requests: Some(u32v(5)),
                    max_requests: Some(u32v(20)),
                    max_retries: Some(u32v(2)),
                    retry_budget: Some(RetryBudget {
                        budget_percent: Some(etype::Percent { value: 25.0 }),
                        min_retry_concurrency: Some(u32v(4)),
                        budget_interval: None,
                    }),
                    track_remaining: true,
                    max_connection_pools: None,
                },
                // HIGH is accepted and has no effect: no route asks for it.
                Thresholds {
                    priority: core::RoutingPriority::High as i32,
                    max_connections: Some(u32v(1)),
                    ..Default::default()
                },
            ],
            per_host_thresholds: vec![],
        })
    }));
    let cb = &c.circuit_breakers;
    assert_eq!(
        (
            cb.max_connections,
            cb.max_pending_requests,
            cb.max_requests,
            cb.max_retries
        ),
        (10, 5, 20, 2)
    );
    let budget = cb.retry_budget.as_ref().unwrap();
    assert_eq!(
        (budget.budget_percent, budget.min_retry_concurrency),
        (25.0, 4)
    );
    // Unset fields take Envoy's defaults; an empty budget is 20% / 3.
    let c = converted_cluster(cluster_with(|c| {
        c.circuit_breakers = Some(cpb::CircuitBreakers {
            thresholds: vec![Thresholds {
                retry_budget: Some(Default::default()),
                ..Default::default()
            }],
            per_host_thresholds: vec![],
        })
    }));
    let cb = &c.circuit_breakers;
    assert_eq!(
        (
            cb.max_connections,
            cb.max_pending_requests,
            cb.max_requests,
            cb.max_retries
        ),
        (1024, 1024, 1024, 3)
    );
    let budget = cb.retry_budget.as_ref().unwrap();
    assert_eq!(
        (budget.budget_percent, budget.min_retry_concurrency),
        (20.0, 3)
    );
    // No circuit_breakers at all: Envoy's defaults, no budget.
    let c = converted_cluster(eds_cluster("c"));
    assert_eq!(c.circuit_breakers.max_retries, 3);
    assert!(c.circuit_breakers.retry_budget.is_none());
}

#[test]
fn outlier_detection_converts_with_envoy_defaults() {
    // Empty: Envoy's defaults (consecutive 5xx and success rate enforced).
    let o = converted_cluster(outlier(|_| {}))
        .outlier_detection
        .unwrap();
    let c5 = o.consecutive_5xx.as_ref().unwrap();
    assert_eq!((c5.consecutive, c5.enforcing), (5, 100));
    assert!(o.consecutive_gateway_failure.is_none());
    let sr = o.success_rate.as_ref().unwrap();
    assert_eq!(
        (sr.minimum_hosts, sr.request_volume, sr.enforcing),
        (5, 100, 100)
    );
    assert!((sr.stdev_factor - 1.9).abs() < 1e-9);
    assert!(o.failure_percentage.is_none());
    assert_eq!(o.interval, Duration::from_secs(10));
    assert_eq!(o.base_ejection_time, Duration::from_secs(30));
    assert_eq!(o.max_ejection_time, Duration::from_secs(300));
    assert_eq!(o.max_ejection_percent, 10);

    // The translator's shape: explicit enforcing for every detector.
    let o = converted_cluster(outlier(|o| {
        o.consecutive_5xx = Some(u32v(3));
        o.enforcing_consecutive_5xx = Some(u32v(0));
        o.consecutive_gateway_failure = Some(u32v(2));
        o.enforcing_consecutive_gateway_failure = Some(u32v(100));
        o.enforcing_success_rate = Some(u32v(0));
        o.failure_percentage_threshold = Some(u32v(50));
        o.failure_percentage_minimum_hosts = Some(u32v(2));
        o.failure_percentage_request_volume = Some(u32v(10));
        o.enforcing_failure_percentage = Some(u32v(100));
        o.interval = Some(dur(1, 0));
        o.base_ejection_time = Some(dur(400, 0));
        o.max_ejection_percent = Some(u32v(50));
    }))
    .outlier_detection
    .unwrap();
    assert!(o.consecutive_5xx.is_none() && o.success_rate.is_none());
    let gw = o.consecutive_gateway_failure.as_ref().unwrap();
    assert_eq!((gw.consecutive, gw.enforcing), (2, 100));
    let fp = o.failure_percentage.as_ref().unwrap();
    assert_eq!(
        (
            fp.threshold,
            fp.minimum_hosts,
            fp.request_volume,
            fp.enforcing
        ),
        (50, 2, 10, 100)
    );
    // Unset max ejection time: 300 s or the base, whichever is larger.
    assert_eq!(o.max_ejection_time, Duration::from_secs(400));
    assert_eq!(o.max_ejection_percent, 50);

    // Every detector off: no outlier detection at all.
    let c = converted_cluster(outlier(|o| {
        o.enforcing_consecutive_5xx = Some(u32v(0));
        o.enforcing_success_rate = Some(u32v(0));
    }));
    assert!(c.outlier_detection.is_none());
}

#[test]
fn outlier_detection_nacks_name_the_field() {
    type Case = (&'static str, fn(&mut cpb::OutlierDetection));
    let cases: Vec<Case> = vec![
        ("enforcing_consecutive_5xx: 101 is more than 100", |o| {
            o.enforcing_consecutive_5xx = Some(u32v(101))
        }),
        ("max_ejection_percent: 150 is more than 100", |o| {
            o.max_ejection_percent = Some(u32v(150))
        }),
        ("consecutive_5xx: must be at least 1", |o| {
            o.consecutive_5xx = Some(u32v(0))
        }),
        ("interval: must be greater than 0", |o| {
            o.interval = Some(dur(0, 0))
        }),
        (
            "max_ejection_time: must not be smaller than base_ejection_time",
            |o| {
                o.base_ejection_time = Some(dur(60, 0));
                o.max_ejection_time = Some(dur(30, 0));
            },
        ),
        (
            "split_external_local_origin_errors: unsupported field",
            |o| o.split_external_local_origin_errors = true,
        ),
        ("max_ejection_time_jitter: unsupported field", |o| {
            o.max_ejection_time_jitter = Some(dur(1, 0))
        }),
        (
            "successful_active_health_check_uneject_host: only true (Envoy's default) is supported",
            |o| {
                o.successful_active_health_check_uneject_host =
                    Some(pbuf::BoolValue { value: false })
            },
        ),
        (
            "always_eject_one_host: only false (Envoy's default) is supported",
            |o| o.always_eject_one_host = Some(pbuf::BoolValue { value: true }),
        ),
    ];
    for (want, mutate) in cases {
        let got = cluster_nack(outlier(mutate));
        let want = format!("cluster \"c\": outlier_detection.{want}");
        assert!(got.starts_with(&want), "expected {want:?}, got {got:?}");
    }
}

#[test]
fn health_checks_convert() {
    let tcp = core::HealthCheck {
        health_checker: Some(core::health_check::HealthChecker::TcpHealthCheck(
            Default::default(),
        )),
        ..http_check()
    };
    let c = converted_cluster(cluster_with(|c| c.health_checks = vec![http_check(), tcp]));
    assert_eq!(c.health_checks.len(), 2);
    let h = &c.health_checks[0];
    assert_eq!(h.timeout, Duration::from_secs(1));
    assert_eq!(h.interval, Duration::from_secs(5));
    assert_eq!((h.unhealthy_threshold, h.healthy_threshold), (2, 1));
    match &h.kind {
        HealthCheckKind::Http {
            path,
            host,
            expected,
        } => {
            assert_eq!(path, "/healthz");
            assert_eq!(host, &None);
            assert_eq!(expected, &vec![(200, 300)]);
        }
        other => panic!("not HTTP: {other:?}"),
    }
    assert!(matches!(c.health_checks[1].kind, HealthCheckKind::Tcp));

    // Defaults: expected [200, 201); host as given.
    let mut check = http_check();
    if let Some(core::health_check::HealthChecker::HttpHealthCheck(h)) = &mut check.health_checker {
        h.expected_statuses.clear();
        h.host = "web.default".into();
    }
    let c = converted_cluster(cluster_with(|c| c.health_checks = vec![check]));
    match &c.health_checks[0].kind {
        HealthCheckKind::Http { host, expected, .. } => {
            assert_eq!(host.as_deref(), Some("web.default"));
            assert_eq!(expected, &vec![(200, 201)]);
        }
        other => panic!("not HTTP: {other:?}"),
    }

    // gRPC on an HTTP/2 cluster; an HTTP check there must say HTTP2.
    let grpc = core::HealthCheck {
        health_checker: Some(core::health_check::HealthChecker::GrpcHealthCheck(
            core::health_check::GrpcHealthCheck {
                service_name: "echo.Echo".into(),
                authority: "echo.default".into(),
                initial_metadata: vec![],
            },
        )),
        ..http_check()
    };
    let mut h2_check = http_check();
    if let Some(core::health_check::HealthChecker::HttpHealthCheck(h)) =
        &mut h2_check.health_checker
    {
        h.codec_client_type = etype::CodecClientType::Http2 as i32;
    }
    let c = converted_cluster(cluster_with(|c| {
        http2(c);
        c.health_checks = vec![grpc, h2_check];
    }));
    match &c.health_checks[0].kind {
        HealthCheckKind::Grpc { service, authority } => {
            assert_eq!(service, "echo.Echo");
            assert_eq!(authority.as_deref(), Some("echo.default"));
        }
        other => panic!("not gRPC: {other:?}"),
    }
}

#[test]
fn health_check_nacks_name_the_field() {
    type Case = (&'static str, fn(&mut core::HealthCheck));
    fn http(h: &mut core::HealthCheck) -> &mut core::health_check::HttpHealthCheck {
        match &mut h.health_checker {
            Some(core::health_check::HealthChecker::HttpHealthCheck(c)) => c,
            _ => unreachable!(),
        }
    }
    let cases: Vec<Case> = vec![
        ("timeout: required", |h| h.timeout = None),
        ("interval: must be greater than 0", |h| {
            h.interval = Some(dur(0, 0))
        }),
        ("unhealthy_threshold: required", |h| {
            h.unhealthy_threshold = None
        }),
        ("healthy_threshold: must be at least 1", |h| {
            h.healthy_threshold = Some(u32v(0))
        }),
        (
            "no_traffic_interval: must equal interval (5s): meshwork checks at one interval",
            |h| h.no_traffic_interval = None,
        ),
        (
            "unhealthy_interval: must equal interval (5s) or be unset",
            |h| h.unhealthy_interval = Some(dur(1, 0)),
        ),
        ("interval_jitter: unsupported field", |h| {
            h.interval_jitter = Some(dur(1, 0))
        }),
        ("reuse_connection: only true (Envoy's default) is supported", |h| {
            h.reuse_connection = Some(pbuf::BoolValue { value: false })
        }),
        (
            "health_checker: http_health_check, tcp_health_check or grpc_health_check is required",
            |h| h.health_checker = None,
        ),
        ("custom_health_check: unsupported field", |h| {
            h.health_checker = Some(core::health_check::HealthChecker::CustomHealthCheck(
                Default::default(),
            ))
        }),
        ("http_health_check.path: required", |h| http(h).path.clear()),
        ("http_health_check.path: \"healthz\" is not a request path", |h| {
            http(h).path = "healthz".into()
        }),
        (
            "http_health_check.codec_client_type: must be HTTP1 like the cluster's upstream protocol",
            |h| http(h).codec_client_type = etype::CodecClientType::Http2 as i32,
        ),
        ("http_health_check.method: only GET is supported", |h| {
            http(h).method = core::RequestMethod::Post as i32
        }),
        (
            "http_health_check.expected_statuses[0]: [300, 200) is not a range of HTTP statuses within [100, 600)",
            |h| {
                http(h).expected_statuses = vec![etype::Int64Range {
                    start: 300,
                    end: 200,
                }]
            },
        ),
        ("http_health_check.expected_statuses[0]: [99, 200)", |h| {
            http(h).expected_statuses = vec![etype::Int64Range {
                start: 99,
                end: 200,
            }]
        }),
        ("http_health_check.send: unsupported field", |h| {
            http(h).send = Some(Default::default())
        }),
        ("tcp_health_check.send: unsupported field", |h| {
            h.health_checker = Some(core::health_check::HealthChecker::TcpHealthCheck(
                core::health_check::TcpHealthCheck {
                    send: Some(Default::default()),
                    ..Default::default()
                },
            ))
        }),
        ("grpc_health_check.initial_metadata: unsupported field", |h| {
            h.health_checker = Some(core::health_check::HealthChecker::GrpcHealthCheck(
                core::health_check::GrpcHealthCheck {
                    initial_metadata: vec![header_opt("x", "y", APPEND)],
                    ..Default::default()
                },
            ))
        }),
    ];
    for (want, mutate) in cases {
        let mut h = http_check();
        mutate(&mut h);
        let got = cluster_nack(cluster_with(|c| c.health_checks = vec![h]));
        let want = format!("cluster \"c\": health_checks[0].{want}");
        assert!(got.starts_with(&want), "expected {want:?}, got {got:?}");
    }
    // An HTTP/1.1 check on an HTTP/2 cluster.
    let got = cluster_nack(cluster_with(|c| {
        http2(c);
        c.health_checks = vec![http_check()];
    }));
    assert!(
        got.contains("health_checks[0].http_health_check.codec_client_type: must be HTTP2"),
        "{got}"
    );
}

#[test]
fn panic_threshold_converts() {
    assert_eq!(converted_cluster(eds_cluster("c")).panic_threshold, 50.0);
    let with = |value: Option<f64>| {
        cluster_with(|c| {
            c.common_lb_config = Some(cpb::cluster::CommonLbConfig {
                healthy_panic_threshold: value.map(|value| etype::Percent { value }),
                update_merge_window: Some(dur(1, 0)),
                ..Default::default()
            })
        })
    };
    assert_eq!(converted_cluster(with(Some(0.0))).panic_threshold, 0.0);
    assert_eq!(converted_cluster(with(None)).panic_threshold, 50.0);
    assert_eq!(
        cluster_nack(with(Some(120.0))),
        "cluster \"c\": common_lb_config.healthy_panic_threshold.value: 120 is not in [0, 100]"
    );
    let zone_aware = cluster_with(|c| {
        c.common_lb_config = Some(cpb::cluster::CommonLbConfig {
            locality_config_specifier: Some(
                cpb::cluster::common_lb_config::LocalityConfigSpecifier::ZoneAwareLbConfig(
                    Default::default(),
                ),
            ),
            ..Default::default()
        })
    });
    assert!(cluster_nack(zone_aware).starts_with(
        "cluster \"c\": common_lb_config.locality_config_specifier: unsupported field"
    ));
}

#[test]
fn circuit_breaker_nacks_name_the_field() {
    use cpb::circuit_breakers::{thresholds::RetryBudget, Thresholds};
    type Case = (&'static str, fn(&mut cpb::CircuitBreakers));
    let cases: Vec<Case> = vec![
        ("thresholds[1].priority: a second DEFAULT threshold", |cb| {
            cb.thresholds.push(Thresholds::default())
        }),
        ("thresholds[0].priority: unknown priority 7", |cb| {
            cb.thresholds[0].priority = 7
        }),
        (
            "thresholds[0].max_connection_pools: unsupported field",
            |cb| cb.thresholds[0].max_connection_pools = Some(u32v(1)),
        ),
        (
            "thresholds[0].retry_budget.budget_percent.value: 101 is not in [0, 100]",
            |cb| {
                cb.thresholds[0].retry_budget = Some(RetryBudget {
                    budget_percent: Some(etype::Percent { value: 101.0 }),
                    ..Default::default()
                })
            },
        ),
        (
            "thresholds[0].retry_budget.budget_interval: unsupported field",
            |cb| {
                cb.thresholds[0].retry_budget = Some(RetryBudget {
                    budget_interval: Some(dur(1, 0)),
                    ..Default::default()
                })
            },
        ),
    ];
    for (want, mutate) in cases {
        let mut cb = cpb::CircuitBreakers {
            thresholds: vec![Thresholds::default()],
            per_host_thresholds: vec![],
        };
        mutate(&mut cb);
        let got = cluster_nack(cluster_with(|c| c.circuit_breakers = Some(cb)));
        let want = format!("cluster \"c\": circuit_breakers.{want}");
        assert!(got.starts_with(&want), "expected {want:?}, got {got:?}");
    }
}

#[test]
fn endpoint_health_status_marks_unhealthy() {
    let with = |status: core::HealthStatus| epb::LbEndpoint {
        health_status: status as i32,
        ..lb_endpoint("10.0.0.1", 80, None)
    };
    let snap = from_resources(
        "1",
        vec![],
        vec![],
        vec![],
        vec![cla(
            "c",
            vec![group(
                "z",
                None,
                vec![
                    with(core::HealthStatus::Unknown),
                    with(core::HealthStatus::Healthy),
                    with(core::HealthStatus::Unhealthy),
                    with(core::HealthStatus::Draining),
                    with(core::HealthStatus::Timeout),
                ],
            )],
        )],
    )
    .unwrap();
    let unhealthy: Vec<bool> = snap.endpoints["c"].localities[0]
        .endpoints
        .iter()
        .map(|e| e.unhealthy)
        .collect();
    assert_eq!(unhealthy, vec![false, false, true, true, true]);
    assert_eq!(
        cla_nack(cla(
            "c",
            vec![group(
                "z",
                None,
                vec![epb::LbEndpoint {
                    health_status: 42,
                    ..lb_endpoint("10.0.0.1", 80, None)
                }]
            )]
        )),
        "endpoints \"c\": endpoints[0].lb_endpoints[0].health_status: unknown health status 42"
    );
}

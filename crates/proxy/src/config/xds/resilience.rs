//! The resilience settings of routes and clusters: `RetryPolicy`,
//! `circuit_breakers`, `outlier_detection`, `health_checks` and
//! `common_lb_config.healthy_panic_threshold`, with Envoy's defaults for
//! unset fields and Envoy's validation.
//!
//! Fields that would make Envoy behave in ways the data path does not
//! implement are refused with their path; fields that only name stats or
//! tune logging are ignored.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cpb;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as rpb;
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::r#type::v3 as etype;
use envoy_types::pb::google::protobuf as pbuf;

use super::{decode_only, is_default, opt_duration, At, FieldError, Res};
use crate::config::model::{
    CircuitBreakers, Detector, FailurePercentage, HealthCheck, HealthCheckKind, OutlierDetection,
    RetryBudget, RetryOn, RetryPolicy, SuccessRate,
};

/// Envoy's `retry_back_off.base_interval` default; the maximum defaults to
/// ten times the base.
const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
/// The `retry_on` names meshwork implements, for error messages.
const RETRY_ON_NAMES: &str = "5xx, gateway-error, reset, connect-failure, retriable-status-codes, refused-stream, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable";

// ---------------------------------------------------------------------------
// RetryPolicy

pub(super) fn retry_policy(p: &rpb::RetryPolicy) -> Res<RetryPolicy> {
    let rpb::RetryPolicy {
        retry_on,
        num_retries,
        per_try_timeout,
        per_try_idle_timeout,
        retry_priority,
        retry_host_predicate,
        retry_options_predicates,
        host_selection_retry_max_attempts,
        retriable_status_codes,
        retry_back_off,
        rate_limited_retry_back_off,
        retriable_headers,
        retriable_request_headers,
        refresh_cluster_on_retry,
    } = p;
    deny!(
        per_try_idle_timeout,
        retry_priority,
        retry_options_predicates,
        rate_limited_retry_back_off,
        retriable_headers,
        retriable_request_headers,
        refresh_cluster_on_retry,
    );
    let on = self::retry_on(retry_on).at("retry_on")?;
    let mut codes = Vec::with_capacity(retriable_status_codes.len());
    for (i, c) in retriable_status_codes.iter().enumerate() {
        match u16::try_from(*c) {
            Ok(c) if (100..600).contains(&c) => codes.push(c),
            _ => {
                return Err(FieldError::new(
                    format!("retriable_status_codes[{i}]"),
                    format!("{c} is not an HTTP status"),
                ))
            }
        }
    }
    let (backoff_base, backoff_max) = match retry_back_off {
        None => (DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_BASE * 10),
        Some(b) => backoff(b).at("retry_back_off")?,
    };
    let mut avoid_previous_hosts = false;
    for (i, h) in retry_host_predicate.iter().enumerate() {
        host_predicate(h).at(format_args!("retry_host_predicate[{i}]"))?;
        avoid_previous_hosts = true;
    }
    // A retry picks again up to 3 times to find an endpoint not tried yet
    // (the translator's value); another count is accepted and the data path
    // still uses 3.
    if *host_selection_retry_max_attempts < 0 {
        return Err(FieldError::new(
            "host_selection_retry_max_attempts",
            "must not be negative",
        ));
    }
    // Envoy: a zero per-try timeout is no per-try timeout.
    let per_try_timeout =
        opt_duration(per_try_timeout, "per_try_timeout")?.filter(|t| !t.is_zero());
    Ok(RetryPolicy {
        on,
        num_retries: num_retries.as_ref().map_or(1, |n| n.value),
        per_try_timeout,
        retriable_status_codes: codes,
        backoff_base,
        backoff_max,
        avoid_previous_hosts,
    })
}

/// `retry_on`: comma-separated Envoy condition names (HTTP and gRPC ones
/// share the field). Names Envoy knows but meshwork does not implement are
/// refused rather than ignored.
fn retry_on(s: &str) -> Res<RetryOn> {
    let mut on = RetryOn::default();
    // Envoy splits on ',' and skips empty tokens; it does not trim spaces.
    for name in s.split(',').filter(|n| !n.is_empty()) {
        let flag = match name {
            "5xx" => &mut on.five_xx,
            "gateway-error" => &mut on.gateway_error,
            "reset" => &mut on.reset,
            "connect-failure" => &mut on.connect_failure,
            "retriable-status-codes" => &mut on.retriable_status_codes,
            "refused-stream" => &mut on.refused_stream,
            "cancelled" => &mut on.grpc_cancelled,
            "deadline-exceeded" => &mut on.grpc_deadline_exceeded,
            "internal" => &mut on.grpc_internal,
            "resource-exhausted" => &mut on.grpc_resource_exhausted,
            "unavailable" => &mut on.grpc_unavailable,
            "retriable-4xx"
            | "envoy-ratelimited"
            | "retriable-headers"
            | "reset-before-request"
            | "http3-post-connect-failure" => {
                return Err(FieldError::msg(format!(
                    "{name:?} is not implemented by meshwork (supported: {RETRY_ON_NAMES})"
                )))
            }
            _ => {
                return Err(FieldError::msg(format!(
                    "unknown retry condition {name:?} (supported: {RETRY_ON_NAMES})"
                )))
            }
        };
        *flag = true;
    }
    Ok(on)
}

fn backoff(b: &rpb::retry_policy::RetryBackOff) -> Res<(Duration, Duration)> {
    let rpb::retry_policy::RetryBackOff {
        base_interval,
        max_interval,
    } = b;
    let Some(base) = opt_duration(base_interval, "base_interval")? else {
        return Err(FieldError::new("base_interval", "required"));
    };
    if base.is_zero() {
        return Err(FieldError::new("base_interval", "must be greater than 0"));
    }
    let max = match opt_duration(max_interval, "max_interval")? {
        None => base * 10,
        Some(m) if m.is_zero() => {
            return Err(FieldError::new("max_interval", "must be greater than 0"))
        }
        Some(m) if m < base => {
            return Err(FieldError::new(
                "max_interval",
                "must be greater than or equal to base_interval",
            ))
        }
        Some(m) => m,
    };
    Ok((base, max))
}

fn host_predicate(h: &rpb::retry_policy::RetryHostPredicate) -> Res<()> {
    use rpb::retry_policy::retry_host_predicate::ConfigType;
    let rpb::retry_policy::RetryHostPredicate { name, config_type } = h;
    match config_type {
        Some(ConfigType::TypedConfig(any)) => {
            // PreviousHostsPredicate has no fields; decoding proves the bytes.
            decode_only::<PreviousHostsPredicate>(
                any,
                name,
                "only envoy.retry_host_predicates.previous_hosts is supported",
            )?;
            Ok(())
        }
        None => Err(FieldError::new("typed_config", "required")),
    }
}

// ---------------------------------------------------------------------------
// Cluster: circuit breakers

pub(super) fn circuit_breakers(c: &cpb::CircuitBreakers) -> Res<CircuitBreakers> {
    let cpb::CircuitBreakers {
        thresholds,
        per_host_thresholds,
    } = c;
    deny!(per_host_thresholds);
    let mut out = CircuitBreakers::default();
    let mut seen_default = false;
    for (i, t) in thresholds.iter().enumerate() {
        let at = format!("thresholds[{i}]");
        match core::RoutingPriority::try_from(t.priority) {
            Ok(core::RoutingPriority::Default) => {
                if std::mem::replace(&mut seen_default, true) {
                    return Err(FieldError::new(
                        format!("{at}.priority"),
                        "a second DEFAULT threshold",
                    ));
                }
                out = threshold(t).at(&at)?;
            }
            // Accepted and ignored: routes cannot ask for HIGH priority
            // (`RouteAction.priority` is refused), so no request is ever
            // counted against these limits, in Envoy either.
            Ok(core::RoutingPriority::High) => {
                threshold(t).at(&at)?;
            }
            Err(_) => {
                return Err(FieldError::new(
                    format!("{at}.priority"),
                    format!("unknown priority {}", t.priority),
                ))
            }
        }
    }
    Ok(out)
}

fn threshold(t: &cpb::circuit_breakers::Thresholds) -> Res<CircuitBreakers> {
    let cpb::circuit_breakers::Thresholds {
        priority: _,
        max_connections,
        max_pending_requests,
        max_requests,
        max_retries,
        retry_budget,
        // Stats only (`remaining_*` gauges).
        track_remaining: _,
        max_connection_pools,
    } = t;
    deny!(max_connection_pools);
    let defaults = CircuitBreakers::default();
    let or = |v: &Option<pbuf::UInt32Value>, d: u32| v.as_ref().map_or(d, |v| v.value);
    Ok(CircuitBreakers {
        max_connections: or(max_connections, defaults.max_connections),
        max_pending_requests: or(max_pending_requests, defaults.max_pending_requests),
        max_requests: or(max_requests, defaults.max_requests),
        max_retries: or(max_retries, defaults.max_retries),
        retry_budget: retry_budget
            .as_ref()
            .map(self::retry_budget)
            .transpose()
            .at("retry_budget")?,
    })
}

fn retry_budget(b: &cpb::circuit_breakers::thresholds::RetryBudget) -> Res<RetryBudget> {
    let cpb::circuit_breakers::thresholds::RetryBudget {
        budget_percent,
        budget_interval,
        min_retry_concurrency,
    } = b;
    deny!(budget_interval);
    Ok(RetryBudget {
        budget_percent: match budget_percent {
            None => 20.0,
            Some(p) => percent(p).at("budget_percent")?,
        },
        min_retry_concurrency: min_retry_concurrency.as_ref().map_or(3, |v| v.value),
    })
}

/// `envoy.type.v3.Percent`: 0..=100.
fn percent(p: &etype::Percent) -> Res<f64> {
    if !(0.0..=100.0).contains(&p.value) {
        return Err(FieldError::new(
            "value",
            format!("{} is not in [0, 100]", p.value),
        ));
    }
    Ok(p.value)
}

// ---------------------------------------------------------------------------
// Cluster: outlier detection

/// `outlier_detection` with Envoy's defaults. `None` when every detector's
/// enforcing percentage is 0: nothing would ever be ejected.
#[allow(deprecated)]
pub(super) fn outlier_detection(o: &cpb::OutlierDetection) -> Res<Option<OutlierDetection>> {
    let cpb::OutlierDetection {
        consecutive_5xx,
        interval,
        base_ejection_time,
        max_ejection_percent,
        enforcing_consecutive_5xx,
        enforcing_success_rate,
        success_rate_minimum_hosts,
        success_rate_request_volume,
        success_rate_stdev_factor,
        consecutive_gateway_failure,
        enforcing_consecutive_gateway_failure,
        split_external_local_origin_errors,
        consecutive_local_origin_failure,
        enforcing_consecutive_local_origin_failure,
        enforcing_local_origin_success_rate,
        failure_percentage_threshold,
        enforcing_failure_percentage,
        enforcing_failure_percentage_local_origin,
        failure_percentage_minimum_hosts,
        failure_percentage_request_volume,
        max_ejection_time,
        max_ejection_time_jitter,
        successful_active_health_check_uneject_host,
        monitors,
        always_eject_one_host,
        detect_degraded_hosts,
    } = o;
    deny!(
        split_external_local_origin_errors,
        consecutive_local_origin_failure,
        enforcing_consecutive_local_origin_failure,
        enforcing_local_origin_success_rate,
        enforcing_failure_percentage_local_origin,
        max_ejection_time_jitter,
        monitors,
    );
    // Optional booleans whose Envoy default is the only supported value.
    let only = |v: &Option<pbuf::BoolValue>, supported: bool, field: &str| match v {
        Some(b) if b.value != supported => Err(FieldError::new(
            field,
            format!("only {supported} (Envoy's default) is supported"),
        )),
        _ => Ok(()),
    };
    only(
        successful_active_health_check_uneject_host,
        true,
        "successful_active_health_check_uneject_host",
    )?;
    only(always_eject_one_host, false, "always_eject_one_host")?;
    only(detect_degraded_hosts, false, "detect_degraded_hosts")?;

    let u = |v: &Option<pbuf::UInt32Value>, d: u32| v.as_ref().map_or(d, |v| v.value);
    let pct = |v: &Option<pbuf::UInt32Value>, d: u32, field: &str| {
        let p = u(v, d);
        if p > 100 {
            return Err(FieldError::new(field, format!("{p} is more than 100")));
        }
        Ok(p)
    };
    let positive = |v: u32, field: &str| {
        if v == 0 {
            return Err(FieldError::new(field, "must be at least 1"));
        }
        Ok(v)
    };
    let positive_duration = |d: &Option<pbuf::Duration>, default: Duration, field: &str| {
        let d = opt_duration(d, field)?.unwrap_or(default);
        if d.is_zero() {
            return Err(FieldError::new(field, "must be greater than 0"));
        }
        Ok(d)
    };

    let detector = |consecutive: &Option<pbuf::UInt32Value>,
                    enforcing: &Option<pbuf::UInt32Value>,
                    default_enforcing: u32,
                    names: (&str, &str)| {
        let enforcing = pct(enforcing, default_enforcing, names.1)?;
        let consecutive = positive(u(consecutive, 5), names.0)?;
        Ok::<_, FieldError>((enforcing > 0).then_some(Detector {
            consecutive,
            enforcing,
        }))
    };
    let consecutive_5xx = detector(
        consecutive_5xx,
        enforcing_consecutive_5xx,
        100,
        ("consecutive_5xx", "enforcing_consecutive_5xx"),
    )?;
    let consecutive_gateway_failure = detector(
        consecutive_gateway_failure,
        enforcing_consecutive_gateway_failure,
        0,
        (
            "consecutive_gateway_failure",
            "enforcing_consecutive_gateway_failure",
        ),
    )?;
    let enforcing = pct(enforcing_success_rate, 100, "enforcing_success_rate")?;
    let success_rate = (enforcing > 0).then(|| SuccessRate {
        minimum_hosts: u(success_rate_minimum_hosts, 5),
        request_volume: u(success_rate_request_volume, 100),
        stdev_factor: f64::from(u(success_rate_stdev_factor, 1900)) / 1000.0,
        enforcing,
    });
    let enforcing = pct(
        enforcing_failure_percentage,
        0,
        "enforcing_failure_percentage",
    )?;
    let threshold = pct(
        failure_percentage_threshold,
        85,
        "failure_percentage_threshold",
    )?;
    let failure_percentage = (enforcing > 0).then(|| FailurePercentage {
        threshold,
        minimum_hosts: u(failure_percentage_minimum_hosts, 5),
        request_volume: u(failure_percentage_request_volume, 50),
        enforcing,
    });

    let interval = positive_duration(interval, Duration::from_secs(10), "interval")?;
    let base_ejection_time = positive_duration(
        base_ejection_time,
        Duration::from_secs(30),
        "base_ejection_time",
    )?;
    // Envoy: unset means 300 s or the base ejection time, whichever is larger.
    let max_ejection_time = positive_duration(
        max_ejection_time,
        base_ejection_time.max(Duration::from_secs(300)),
        "max_ejection_time",
    )?;
    if max_ejection_time < base_ejection_time {
        return Err(FieldError::new(
            "max_ejection_time",
            "must not be smaller than base_ejection_time",
        ));
    }
    let max_ejection_percent = pct(max_ejection_percent, 10, "max_ejection_percent")?;

    if consecutive_5xx.is_none()
        && consecutive_gateway_failure.is_none()
        && success_rate.is_none()
        && failure_percentage.is_none()
    {
        return Ok(None);
    }
    Ok(Some(OutlierDetection {
        consecutive_5xx,
        consecutive_gateway_failure,
        success_rate,
        failure_percentage,
        interval,
        base_ejection_time,
        max_ejection_time,
        max_ejection_percent,
    }))
}

// ---------------------------------------------------------------------------
// Cluster: active health checks

/// One of `health_checks`. `http2`: the cluster speaks HTTP/2 upstream; an
/// HTTP check must use the same protocol (meshwork's checker speaks the
/// cluster's protocol, Envoy the check's `codec_client_type`).
#[allow(deprecated)]
pub(super) fn health_check(h: &core::HealthCheck, http2: bool) -> Res<HealthCheck> {
    use core::health_check::HealthChecker;
    let core::HealthCheck {
        timeout,
        interval,
        initial_jitter,
        interval_jitter,
        interval_jitter_percent,
        unhealthy_threshold,
        healthy_threshold,
        alt_port,
        reuse_connection,
        no_traffic_interval,
        no_traffic_healthy_interval,
        unhealthy_interval,
        unhealthy_edge_interval,
        healthy_edge_interval,
        event_log_path,
        event_logger,
        event_service,
        // Logging only.
        always_log_health_check_failures: _,
        always_log_health_check_success: _,
        tls_options,
        transport_socket_match_criteria,
        health_checker,
    } = h;
    deny!(
        initial_jitter,
        interval_jitter,
        interval_jitter_percent,
        alt_port,
        event_log_path,
        event_logger,
        event_service,
        tls_options,
        transport_socket_match_criteria,
    );
    if reuse_connection.as_ref().is_some_and(|r| !r.value) {
        return Err(FieldError::new(
            "reuse_connection",
            "only true (Envoy's default) is supported",
        ));
    }
    let required = |d: &Option<pbuf::Duration>, field: &str| {
        let Some(d) = opt_duration(d, field)? else {
            return Err(FieldError::new(field, "required"));
        };
        if d.is_zero() {
            return Err(FieldError::new(field, "must be greater than 0"));
        }
        Ok(d)
    };
    let timeout = required(timeout, "timeout")?;
    let interval = required(interval, "interval")?;
    // meshwork checks every `interval`, whatever the endpoint's state or the
    // cluster's traffic. Envoy's special intervals default to `interval`,
    // except `no_traffic_interval` (60 s), which must therefore be spelled
    // out for Envoy to behave the same.
    let same =
        |d: &Option<pbuf::Duration>, field: &str, unset_ok: bool| match opt_duration(d, field)? {
            None if unset_ok => Ok(()),
            Some(d) if d == interval => Ok(()),
            _ => Err(FieldError::new(
                field,
                format!(
                    "must equal interval ({interval:?}){}: meshwork checks at one interval",
                    if unset_ok { " or be unset" } else { "" }
                ),
            )),
        };
    same(no_traffic_interval, "no_traffic_interval", false)?;
    same(
        no_traffic_healthy_interval,
        "no_traffic_healthy_interval",
        true,
    )?;
    same(unhealthy_interval, "unhealthy_interval", true)?;
    same(unhealthy_edge_interval, "unhealthy_edge_interval", true)?;
    same(healthy_edge_interval, "healthy_edge_interval", true)?;
    let threshold = |v: &Option<pbuf::UInt32Value>, field: &str| match v {
        None => Err(FieldError::new(field, "required")),
        Some(v) if v.value == 0 => Err(FieldError::new(field, "must be at least 1")),
        Some(v) => Ok(v.value),
    };
    let unhealthy_threshold = threshold(unhealthy_threshold, "unhealthy_threshold")?;
    let healthy_threshold = threshold(healthy_threshold, "healthy_threshold")?;
    let kind = match health_checker {
        Some(HealthChecker::HttpHealthCheck(c)) => {
            http_health_check(c, http2).at("http_health_check")?
        }
        Some(HealthChecker::TcpHealthCheck(c)) => {
            let core::health_check::TcpHealthCheck {
                send,
                receive,
                proxy_protocol_config,
            } = c;
            (|| {
                deny!(send, receive, proxy_protocol_config);
                Ok(())
            })()
            .at("tcp_health_check")?;
            HealthCheckKind::Tcp
        }
        Some(HealthChecker::GrpcHealthCheck(c)) => {
            let core::health_check::GrpcHealthCheck {
                service_name,
                authority,
                initial_metadata,
            } = c;
            (|| {
                deny!(initial_metadata);
                Ok(())
            })()
            .at("grpc_health_check")?;
            HealthCheckKind::Grpc {
                service: service_name.clone(),
                authority: (!authority.is_empty()).then(|| authority.clone()),
            }
        }
        Some(HealthChecker::CustomHealthCheck(_)) => {
            return Err(FieldError::unsupported("custom_health_check"))
        }
        None => {
            return Err(FieldError::new(
                "health_checker",
                "http_health_check, tcp_health_check or grpc_health_check is required",
            ))
        }
    };
    Ok(HealthCheck {
        timeout,
        interval,
        unhealthy_threshold,
        healthy_threshold,
        kind,
    })
}

fn http_health_check(c: &core::health_check::HttpHealthCheck, http2: bool) -> Res<HealthCheckKind> {
    let core::health_check::HttpHealthCheck {
        host,
        path,
        send,
        receive,
        response_buffer_size,
        request_headers_to_add,
        request_headers_to_remove,
        expected_statuses,
        retriable_statuses,
        codec_client_type,
        service_name_matcher,
        method,
    } = c;
    deny!(
        send,
        receive,
        response_buffer_size,
        request_headers_to_add,
        request_headers_to_remove,
        retriable_statuses,
        service_name_matcher,
    );
    if path.is_empty() {
        return Err(FieldError::new("path", "required"));
    }
    if !path.starts_with('/') || http::uri::PathAndQuery::try_from(path.as_str()).is_err() {
        return Err(FieldError::new(
            "path",
            format!("{path:?} is not a request path"),
        ));
    }
    if !host.is_empty() && http::HeaderValue::from_str(host).is_err() {
        return Err(FieldError::new("host", format!("invalid host {host:?}")));
    }
    match core::RequestMethod::try_from(*method) {
        Ok(core::RequestMethod::MethodUnspecified | core::RequestMethod::Get) => {}
        _ => return Err(FieldError::new("method", "only GET is supported")),
    }
    let codec = etype::CodecClientType::try_from(*codec_client_type);
    let matches = match codec {
        Ok(etype::CodecClientType::Http1) => !http2,
        Ok(etype::CodecClientType::Http2) => http2,
        _ => false,
    };
    if !matches {
        return Err(FieldError::new(
            "codec_client_type",
            format!(
                "must be {} like the cluster's upstream protocol (meshwork checks over the cluster's protocol)",
                if http2 { "HTTP2" } else { "HTTP1" }
            ),
        ));
    }
    let mut expected = Vec::with_capacity(expected_statuses.len());
    for (i, r) in expected_statuses.iter().enumerate() {
        let etype::Int64Range { start, end } = *r;
        // Envoy's validation: 100 <= start < end <= 600.
        let range = match (u16::try_from(start), u16::try_from(end)) {
            (Ok(s), Ok(e)) if s >= 100 && e <= 600 && s < e => (s, e),
            _ => {
                return Err(FieldError::new(
                    format!("expected_statuses[{i}]"),
                    format!("[{start}, {end}) is not a range of HTTP statuses within [100, 600)"),
                ))
            }
        };
        expected.push(range);
    }
    if expected.is_empty() {
        expected.push((200, 201));
    }
    Ok(HealthCheckKind::Http {
        path: path.clone(),
        host: (!host.is_empty()).then(|| host.clone()),
        expected,
    })
}

// ---------------------------------------------------------------------------
// Cluster: common_lb_config

/// `healthy_panic_threshold` in percent (default 50).
pub(super) fn panic_threshold(c: &cpb::cluster::CommonLbConfig) -> Res<f64> {
    let cpb::cluster::CommonLbConfig {
        healthy_panic_threshold,
        // Batches host updates in Envoy; no effect on what is routed where.
        update_merge_window: _,
        ignore_new_hosts_until_first_hc,
        close_connections_on_host_set_change,
        consistent_hashing_lb_config,
        override_host_status,
        locality_config_specifier,
    } = c;
    deny!(
        ignore_new_hosts_until_first_hc,
        close_connections_on_host_set_change,
        consistent_hashing_lb_config,
        override_host_status,
        locality_config_specifier,
    );
    match healthy_panic_threshold {
        None => Ok(50.0),
        Some(p) => percent(p).at("healthy_panic_threshold"),
    }
}

/// `LbEndpoint.health_status`: `true` for the states in which Envoy sends
/// no new requests (UNHEALTHY, DRAINING, TIMEOUT).
pub(super) fn endpoint_unhealthy(status: i32) -> Res<bool> {
    match core::HealthStatus::try_from(status) {
        Ok(core::HealthStatus::Unknown | core::HealthStatus::Healthy) => Ok(false),
        Ok(
            core::HealthStatus::Unhealthy
            | core::HealthStatus::Draining
            | core::HealthStatus::Timeout,
        ) => Ok(true),
        Ok(core::HealthStatus::Degraded) => Err(FieldError::msg(
            "DEGRADED is not supported (only UNKNOWN, HEALTHY, UNHEALTHY, DRAINING, TIMEOUT)",
        )),
        Err(_) => Err(FieldError::msg(format!("unknown health status {status}"))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn retry_on_parses_envoy_names() {
        let on = retry_on("5xx,gateway-error,reset,connect-failure,retriable-status-codes,refused-stream,cancelled,deadline-exceeded,internal,resource-exhausted,unavailable").unwrap();
        assert!(on.five_xx && on.gateway_error && on.reset && on.connect_failure);
        assert!(on.retriable_status_codes && on.refused_stream);
        assert!(on.grpc_cancelled && on.grpc_deadline_exceeded && on.grpc_internal);
        assert!(on.grpc_resource_exhausted && on.grpc_unavailable);
        assert_eq!(retry_on("").unwrap(), RetryOn::default());
        assert_eq!(
            retry_on("reset,,").unwrap(),
            RetryOn {
                reset: true,
                ..Default::default()
            }
        );
        let e = retry_on("retriable-4xx").unwrap_err();
        assert!(
            e.message.contains("not implemented by meshwork"),
            "{}",
            e.message
        );
        let e = retry_on("5xx, reset").unwrap_err();
        assert!(
            e.message.contains("unknown retry condition \" reset\""),
            "{}",
            e.message
        );
    }
}

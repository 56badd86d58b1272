//! The HTTP filters that sit between RBAC and the router and that routes
//! may configure for themselves (`typed_per_filter_config`):
//! `envoy.filters.http.local_ratelimit` ([`model::LocalRateLimit`]) and
//! `envoy.filters.http.fault` ([`model::Fault`]), plus the route
//! `rate_limits` actions that feed the rate limit's descriptors.
//!
//! Only the shapes meshwork's translator emits are accepted:
//! - A rate limit is either fully enforced (`filter_enabled` and
//!   `filter_enforced` at 100%) or absent; shadow and partial limits are
//!   refused. Its bucket is the filter's `token_bucket`, or, per source, one
//!   `descriptors` entry `[{key: remote_address}]` (empty value: one bucket
//!   per distinct value, Envoy's dynamic descriptors).
//! - Descriptors come only from a `remote_address` action.
//! - A fault is a fixed delay and/or an HTTP or gRPC abort, each with a
//!   percentage, for requests matching `headers`.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as rpb;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3 as crl;
use envoy_types::pb::envoy::extensions::filters::common::fault::v3 as common_fault;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3 as lrl;
use envoy_types::pb::envoy::r#type::v3 as etype;

use super::route::{header_matcher, header_mods, per_million, HeaderCondition};
use super::{duration, is_default, At, FieldError, Res};
use crate::config::model::{self, AbortStatus, FaultAbort, FaultDelay};

/// The filter names routes use as `typed_per_filter_config` keys. Envoy
/// looks per-route configs up by the filter's name in the connection
/// manager, so meshwork requires these names there too.
pub(super) const FAULT: &str = "envoy.filters.http.fault";
pub(super) const LOCAL_RATELIMIT: &str = "envoy.filters.http.local_ratelimit";

/// Envoy refuses token buckets that refill faster than this.
const MIN_FILL_INTERVAL: Duration = Duration::from_millis(50);
/// The descriptor key a `remote_address` action produces.
const REMOTE_ADDRESS: &str = "remote_address";

/// `HTTPFault`, at the connection manager or per route (same shape).
#[allow(deprecated)]
pub(super) fn http_fault(f: &fault::HttpFault) -> Res<model::Fault> {
    let fault::HttpFault {
        delay,
        abort,
        upstream_cluster,
        headers,
        downstream_nodes,
        max_active_faults,
        response_rate_limit,
        // Runtime keys: meshwork has no runtime layer, so the configured
        // values apply (as in Envoy without runtime overrides).
        delay_percent_runtime: _,
        abort_percent_runtime: _,
        delay_duration_runtime: _,
        abort_http_status_runtime: _,
        max_active_faults_runtime: _,
        response_rate_limit_percent_runtime: _,
        abort_grpc_status_runtime: _,
        // Stats only.
        disable_downstream_cluster_stats: _,
        filter_metadata,
    } = f;
    deny!(
        upstream_cluster,
        downstream_nodes,
        max_active_faults,
        response_rate_limit,
        filter_metadata,
    );
    let delay = delay.as_ref().map(fault_delay).transpose().at("delay")?;
    let abort = abort.as_ref().map(fault_abort).transpose().at("abort")?;
    let mut matchers = Vec::with_capacity(headers.len());
    for (i, h) in headers.iter().enumerate() {
        match header_matcher(h).at(format_args!("headers[{i}]"))? {
            HeaderCondition::Regular(m) => matchers.push(m),
            HeaderCondition::Pseudo(_) => {
                return Err(FieldError::new(
                    format!("headers[{i}].name"),
                    "pseudo-headers are not supported in fault headers",
                ))
            }
        }
    }
    Ok(model::Fault {
        delay,
        abort,
        headers: matchers,
    })
}

/// An unset `percentage` is 0% (Envoy reads the proto default): the fault
/// never fires.
fn percentage(p: &Option<etype::FractionalPercent>) -> Res<u32> {
    p.as_ref()
        .map(per_million)
        .transpose()
        .at("percentage")
        .map(|p| p.unwrap_or(0))
}

fn fault_delay(d: &common_fault::FaultDelay) -> Res<FaultDelay> {
    use common_fault::fault_delay::FaultDelaySecifier;
    let common_fault::FaultDelay {
        percentage,
        fault_delay_secifier,
    } = d;
    let fixed = match fault_delay_secifier {
        Some(FaultDelaySecifier::FixedDelay(d)) => duration(d).at("fixed_delay")?,
        Some(FaultDelaySecifier::HeaderDelay(_)) => {
            return Err(FieldError::unsupported("header_delay"))
        }
        None => return Err(FieldError::new("fixed_delay", "required")),
    };
    if fixed.is_zero() {
        return Err(FieldError::new("fixed_delay", "must be greater than 0"));
    }
    Ok(FaultDelay {
        fixed,
        per_million: self::percentage(percentage)?,
    })
}

fn fault_abort(a: &fault::FaultAbort) -> Res<FaultAbort> {
    use fault::fault_abort::ErrorType;
    let fault::FaultAbort {
        percentage,
        response_body,
        error_type,
    } = a;
    deny!(response_body);
    let status = match error_type {
        Some(ErrorType::HttpStatus(s)) => match u16::try_from(*s) {
            // Envoy's validation: 200 <= http_status < 600.
            Ok(s) if (200..600).contains(&s) => AbortStatus::Http(s),
            _ => {
                return Err(FieldError::new(
                    "http_status",
                    format!("{s} is not in [200, 600)"),
                ))
            }
        },
        Some(ErrorType::GrpcStatus(s)) => AbortStatus::Grpc(*s),
        Some(ErrorType::HeaderAbort(_)) => return Err(FieldError::unsupported("header_abort")),
        None => {
            return Err(FieldError::new(
                "error_type",
                "http_status or grpc_status is required",
            ))
        }
    };
    Ok(FaultAbort {
        status,
        per_million: self::percentage(percentage)?,
    })
}

/// `LocalRateLimit`; `per_route` for `typed_per_filter_config` (where Envoy
/// requires a `token_bucket`).
pub(super) fn local_rate_limit(
    l: &lrl::LocalRateLimit,
    per_route: bool,
) -> Res<model::LocalRateLimit> {
    let lrl::LocalRateLimit {
        stat_prefix,
        status,
        token_bucket,
        filter_enabled,
        filter_enforced,
        request_headers_to_add_when_not_enforced,
        response_headers_to_add,
        descriptors,
        stage,
        local_rate_limit_per_downstream_connection,
        local_cluster_rate_limit,
        enable_x_ratelimit_headers,
        vh_rate_limits,
        always_consume_default_token_bucket,
        rate_limited_as_resource_exhausted,
        rate_limits,
        max_dynamic_descriptors,
        enable_retry_after_header,
    } = l;
    deny!(
        request_headers_to_add_when_not_enforced,
        stage,
        local_rate_limit_per_downstream_connection,
        local_cluster_rate_limit,
        vh_rate_limits,
        rate_limited_as_resource_exhausted,
    );
    if stat_prefix.is_empty() {
        return Err(FieldError::new("stat_prefix", "must not be empty"));
    }
    let status = match status {
        None => 429,
        Some(etype::HttpStatus { code }) => match u16::try_from(*code) {
            // Envoy: a status below 400 means 429.
            Ok(c) if (100..400).contains(&c) => 429,
            Ok(c) if (400..600).contains(&c) => c,
            _ => {
                return Err(FieldError::new(
                    "status.code",
                    format!("{code} is not an HTTP status"),
                ))
            }
        },
    };
    let rate_limit_headers =
        match crl::XRateLimitHeadersRfcVersion::try_from(*enable_x_ratelimit_headers) {
            Ok(crl::XRateLimitHeadersRfcVersion::Off) => false,
            Ok(crl::XRateLimitHeadersRfcVersion::DraftVersion03) => true,
            Err(_) => {
                return Err(FieldError::new(
                    "enable_x_ratelimit_headers",
                    format!("unknown version {enable_x_ratelimit_headers}"),
                ))
            }
        };
    let mods = header_mods(
        response_headers_to_add,
        &[],
        "response_headers_to_add",
        "response_headers_to_remove",
    )?;
    // Local replies start without these headers, so appending and
    // overwriting come to the same.
    let response_headers = mods.set.into_iter().chain(mods.add).collect();
    for (i, r) in rate_limits.iter().enumerate() {
        remote_address_rate_limit(r).at(format_args!("rate_limits[{i}]"))?;
    }

    let default_bucket = token_bucket
        .as_ref()
        .map(self::token_bucket)
        .transpose()
        .at("token_bucket")?;
    if per_route && default_bucket.is_none() {
        return Err(FieldError::new(
            "token_bucket",
            "required in a route's typed_per_filter_config (Envoy refuses a route override without one)",
        ));
    }
    let source_bucket = match descriptors.as_slice() {
        [] => None,
        [d] => Some(source_descriptor(d).at("descriptors[0]")?),
        _ => {
            return Err(FieldError::new(
                "descriptors",
                "at most one descriptor (the per-source bucket) is supported",
            ))
        }
    };
    match (&source_bucket, max_dynamic_descriptors) {
        // meshwork keeps its own bound (`ratelimit::MAX_SOURCES`, the value
        // the translator sends) and evicts idle (full) buckets first, which
        // is indistinguishable from a fresh bucket.
        (Some(_), Some(m)) if m.value == 0 => {
            return Err(FieldError::new(
                "max_dynamic_descriptors",
                "must be at least 1",
            ))
        }
        (None, Some(_)) => {
            return Err(FieldError::new(
                "max_dynamic_descriptors",
                "only applies with a per-source descriptor",
            ))
        }
        _ => {}
    }
    // Envoy consumes the default bucket too unless told otherwise; meshwork
    // represents one bucket per request, so both may not count at once.
    if source_bucket.is_some()
        && default_bucket.is_some()
        && always_consume_default_token_bucket
            .as_ref()
            .is_none_or(|v| v.value)
    {
        return Err(FieldError::new(
            "always_consume_default_token_bucket",
            "must be false with a per-source descriptor and a token_bucket (a request takes a token from one bucket only)",
        ));
    }
    let enabled = full_fraction(filter_enabled).at("filter_enabled")?;
    let enforced = full_fraction(filter_enforced).at("filter_enforced")?;
    let (bucket, per_source) = match (source_bucket, default_bucket) {
        (Some(b), _) => (Some(b), true),
        (None, b) => (b, false),
    };
    let (max_tokens, tokens_per_fill, fill_interval) = match bucket {
        Some(b) => {
            if !enabled || !enforced {
                return Err(FieldError::new(
                    if enabled {
                        "filter_enforced"
                    } else {
                        "filter_enabled"
                    },
                    "required at 100% with a token bucket (meshwork does not run shadow or partial limits)",
                ));
            }
            b
        }
        // No bucket: nothing is limited here; the filter only lets routes
        // override it (Envoy keeps no default bucket either).
        None => (0, 0, Duration::ZERO),
    };
    Ok(model::LocalRateLimit {
        stat_prefix: stat_prefix.clone(),
        max_tokens,
        tokens_per_fill,
        fill_interval,
        status,
        retry_after: *enable_retry_after_header,
        rate_limit_headers,
        response_headers,
        per_source,
    })
}

/// `(max_tokens, tokens_per_fill, fill_interval)` with Envoy's validation.
fn token_bucket(b: &etype::TokenBucket) -> Res<(u32, u32, Duration)> {
    let etype::TokenBucket {
        max_tokens,
        tokens_per_fill,
        fill_interval,
    } = b;
    if *max_tokens == 0 {
        return Err(FieldError::new("max_tokens", "must be greater than 0"));
    }
    let per_fill = tokens_per_fill.as_ref().map_or(1, |v| v.value);
    if per_fill == 0 {
        return Err(FieldError::new("tokens_per_fill", "must be greater than 0"));
    }
    let Some(interval) = fill_interval else {
        return Err(FieldError::new("fill_interval", "required"));
    };
    let interval = duration(interval).at("fill_interval")?;
    if interval < MIN_FILL_INTERVAL {
        return Err(FieldError::new(
            "fill_interval",
            "must be at least 50ms (Envoy refuses faster refills)",
        ));
    }
    Ok((*max_tokens, per_fill, interval))
}

/// `filter_enabled` / `filter_enforced`: unset (false) or 100% (true).
fn full_fraction(p: &Option<core::RuntimeFractionalPercent>) -> Res<bool> {
    let Some(core::RuntimeFractionalPercent {
        default_value,
        // No runtime layer: the default value applies.
        runtime_key: _,
    }) = p
    else {
        return Ok(false);
    };
    let Some(value) = default_value else {
        return Err(FieldError::new("default_value", "required"));
    };
    if per_million(value).at("default_value")? != 1_000_000 {
        return Err(FieldError::new(
            "default_value",
            "only 100% is supported (meshwork enforces a limit on every request or not at all)",
        ));
    }
    Ok(true)
}

/// The per-source descriptor: `entries: [{key: remote_address}]` (empty
/// value: a bucket per address) with its own `token_bucket`.
fn source_descriptor(d: &crl::LocalRateLimitDescriptor) -> Res<(u32, u32, Duration)> {
    let crl::LocalRateLimitDescriptor {
        entries,
        token_bucket,
        shadow_mode,
    } = d;
    deny!(shadow_mode);
    match entries.as_slice() {
        [crl::rate_limit_descriptor::Entry { key, value }]
            if key == REMOTE_ADDRESS && value.is_empty() => {}
        _ => {
            return Err(FieldError::new(
                "entries",
                "only [{key: remote_address}] (one bucket per source) is supported",
            ))
        }
    }
    let Some(b) = token_bucket else {
        return Err(FieldError::new("token_bucket", "required"));
    };
    self::token_bucket(b).at("token_bucket")
}

/// A `RateLimit` (route `rate_limits` or the filter's own): only
/// `{actions: [{remote_address: {}}]}`, which produces the descriptor a
/// per-source bucket is keyed by. meshwork keys per-source buckets by the
/// source whether or not the route carries the action; the translator
/// always emits both.
pub(super) fn remote_address_rate_limit(r: &rpb::RateLimit) -> Res<()> {
    use rpb::rate_limit::action::ActionSpecifier;
    let rpb::RateLimit {
        stage,
        disable_key,
        actions,
        limit,
        hits_addend,
        apply_on_stream_done,
        x_ratelimit_option,
    } = r;
    if stage.as_ref().is_some_and(|s| s.value != 0) {
        return Err(FieldError::new("stage", "only stage 0 is supported"));
    }
    deny!(
        disable_key,
        limit,
        hits_addend,
        apply_on_stream_done,
        x_ratelimit_option
    );
    match actions.as_slice() {
        [rpb::rate_limit::Action {
            action_specifier: Some(ActionSpecifier::RemoteAddress(_)),
        }] => Ok(()),
        _ => Err(FieldError::new(
            "actions",
            "only [{remote_address: {}}] is supported",
        )),
    }
}

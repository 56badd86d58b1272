//! Cluster and ClusterLoadAssignment -> [`model::Cluster`] and
//! [`LoadAssignment`]: discovery type, load balancing, upstream HTTP options,
//! localities and endpoints.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cpb;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as epb;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as uhttp;
use envoy_types::pb::google::protobuf as pbuf;

use super::listener::common_protocol_idle_timeout;
use super::resilience;
use super::{
    ads_source, decode, is_default, is_type, opt_duration, socket_address, At, FieldError, Res,
};
use crate::config::model::{self, Endpoint, LbPolicy, LoadAssignment, LocalityEndpoints};

/// `typed_extension_protocol_options` key for upstream HTTP settings.
pub(super) const HTTP_PROTOCOL_OPTIONS: &str =
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
/// Envoy's defaults and limits.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_MIN_RING: u64 = 1024;
const MAX_RING: u64 = 8 * 1024 * 1024;
const DEFAULT_MAGLEV_TABLE: u64 = 65537;
const MAX_MAGLEV_TABLE: u64 = 5_000_011;

#[allow(deprecated)]
pub(super) fn cluster(c: &cpb::Cluster, env: &super::Env) -> Res<model::Cluster> {
    use cpb::cluster::{ClusterDiscoveryType, DiscoveryType};
    let cpb::Cluster {
        transport_socket_matches,
        transport_socket_matcher,
        name,
        alt_stat_name: _,
        stats_matcher: _,
        eds_cluster_config,
        connect_timeout,
        per_connection_buffer_limit_bytes: _,
        per_connection_buffer_high_watermark_timeout: _,
        lb_policy,
        load_assignment,
        health_checks,
        max_requests_per_connection,
        circuit_breakers,
        upstream_http_protocol_options,
        common_http_protocol_options,
        http_protocol_options,
        http2_protocol_options,
        typed_extension_protocol_options,
        // DNS settings: no effect on STATIC and EDS clusters.
        dns_refresh_rate: _,
        dns_jitter: _,
        dns_failure_refresh_rate: _,
        respect_dns_ttl: _,
        dns_lookup_family: _,
        dns_resolvers: _,
        use_tcp_for_dns_lookups: _,
        dns_resolution_config: _,
        typed_dns_resolver_config: _,
        // Envoy start-up sequencing and stats.
        wait_for_warm_on_init: _,
        outlier_detection,
        cleanup_interval: _,
        upstream_bind_config,
        lb_subset_config,
        common_lb_config,
        transport_socket,
        metadata,
        protocol_selection,
        upstream_connection_options,
        close_connections_on_host_health_failure,
        ignore_health_on_host_removal,
        filters,
        load_balancing_policy,
        lrs_server,
        lrs_report_endpoint_metrics,
        track_timeout_budgets: _,
        upstream_config,
        track_cluster_stats: _,
        preconnect_policy,
        connection_pool_per_downstream_connection,
        queuing_policies,
        cluster_discovery_type,
        lb_config,
    } = c;
    deny!(
        transport_socket_matcher,
        max_requests_per_connection,
        upstream_http_protocol_options,
        common_http_protocol_options,
        http_protocol_options,
        http2_protocol_options,
        upstream_bind_config,
        lb_subset_config,
        transport_socket,
        protocol_selection,
        upstream_connection_options,
        close_connections_on_host_health_failure,
        ignore_health_on_host_removal,
        filters,
        load_balancing_policy,
        lrs_server,
        lrs_report_endpoint_metrics,
        upstream_config,
        preconnect_policy,
        connection_pool_per_downstream_connection,
        queuing_policies,
    );
    let discovery = match cluster_discovery_type {
        // proto3 default of `type`.
        None => DiscoveryType::Static,
        Some(ClusterDiscoveryType::Type(t)) => DiscoveryType::try_from(*t)
            .map_err(|_| FieldError::new("type", format!("unknown type {t}")))?,
        Some(ClusterDiscoveryType::ClusterType(_)) => {
            return Err(FieldError::unsupported("cluster_type"))
        }
    };
    let (eds_name, static_endpoints) = match discovery {
        DiscoveryType::Eds => {
            if load_assignment.is_some() {
                return Err(FieldError::new(
                    "load_assignment",
                    "not allowed on an EDS cluster",
                ));
            }
            let Some(cpb::cluster::EdsClusterConfig {
                eds_config,
                service_name,
            }) = eds_cluster_config
            else {
                return Err(FieldError::new(
                    "eds_cluster_config",
                    "required for type EDS",
                ));
            };
            ads_source(eds_config).at("eds_cluster_config.eds_config")?;
            let eds_name = if service_name.is_empty() {
                name.clone()
            } else {
                service_name.clone()
            };
            (eds_name, None)
        }
        DiscoveryType::Static => {
            if eds_cluster_config.is_some() {
                return Err(FieldError::new(
                    "eds_cluster_config",
                    "only allowed on an EDS cluster",
                ));
            }
            let mut assignment = match load_assignment {
                Some(la) => self::load_assignment(la).at("load_assignment")?,
                None => LoadAssignment::default(),
            };
            if assignment.cluster_name.is_empty() {
                assignment.cluster_name = name.clone();
            }
            (name.clone(), Some(Arc::new(assignment)))
        }
        // Transparent capture's PassthroughCluster: every connection goes to
        // its own original destination, so there is nothing to balance.
        DiscoveryType::OriginalDst => {
            if load_assignment.is_some() || eds_cluster_config.is_some() {
                return Err(FieldError::new(
                    if load_assignment.is_some() {
                        "load_assignment"
                    } else {
                        "eds_cluster_config"
                    },
                    "not allowed on an ORIGINAL_DST cluster",
                ));
            }
            if *lb_policy != cpb::cluster::LbPolicy::ClusterProvided as i32 || lb_config.is_some() {
                return Err(FieldError::new(
                    "lb_policy",
                    "an ORIGINAL_DST cluster needs lb_policy CLUSTER_PROVIDED (and no lb_config)",
                ));
            }
            (
                name.clone(),
                Some(Arc::new(LoadAssignment {
                    cluster_name: name.clone(),
                    localities: Vec::new(),
                })),
            )
        }
        other => {
            return Err(FieldError::new(
                "type",
                format!(
                    "unsupported type {} (only EDS, STATIC and ORIGINAL_DST)",
                    other.as_str_name()
                ),
            ))
        }
    };

    let connect_timeout =
        opt_duration(connect_timeout, "connect_timeout")?.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    if connect_timeout.is_zero() {
        return Err(FieldError::new("connect_timeout", "must be greater than 0"));
    }

    let meshwork = match metadata {
        Some(m) => meshwork_metadata(m).at("metadata")?,
        None => MeshworkMetadata::default(),
    };
    let original_dst = discovery == DiscoveryType::OriginalDst;
    let mut lb = if original_dst {
        // Not used: the destination is the connection's own.
        LbPolicy::RoundRobin
    } else {
        lb_policy_of(*lb_policy, lb_config)?
    };
    if meshwork.peak_ewma {
        if !matches!(lb, LbPolicy::LeastRequest { .. }) {
            return Err(FieldError::new(
                "metadata.filter_metadata[\"meshwork\"].lb",
                "peak_ewma requires lb_policy LEAST_REQUEST",
            ));
        }
        lb = LbPolicy::PeakEwma;
    }

    let mut http2 = false;
    let mut idle_timeout = None;
    for (key, any) in typed_extension_protocol_options {
        let at = format!("typed_extension_protocol_options[{key:?}]");
        if key != HTTP_PROTOCOL_OPTIONS {
            return Err(FieldError::new(at, "unsupported extension"));
        }
        if !is_type::<uhttp::HttpProtocolOptions>(any) {
            return Err(FieldError::new(
                at,
                format!("unsupported type {:?}", any.type_url),
            ));
        }
        let options = decode::<uhttp::HttpProtocolOptions>(any).at(&at)?;
        (http2, idle_timeout) = upstream_http_options(&options).at(&at)?;
    }

    let tls = super::tls::cluster_matches(transport_socket_matches, env)
        .at("transport_socket_matches")?;

    let circuit_breakers = match circuit_breakers {
        Some(cb) => resilience::circuit_breakers(cb).at("circuit_breakers")?,
        None => model::CircuitBreakers::default(),
    };
    let outlier_detection = match outlier_detection {
        Some(o) => resilience::outlier_detection(o)
            .at("outlier_detection")?
            .map(Arc::new),
        None => None,
    };
    let mut checks = Vec::with_capacity(health_checks.len());
    for (i, h) in health_checks.iter().enumerate() {
        checks.push(Arc::new(
            resilience::health_check(h, http2).at(format_args!("health_checks[{i}]"))?,
        ));
    }
    let panic_threshold = match common_lb_config {
        Some(c) => resilience::panic_threshold(c).at("common_lb_config")?,
        None => 50.0,
    };

    Ok(model::Cluster {
        name: name.clone(),
        eds_name,
        static_endpoints,
        lb,
        http2,
        original_dst,
        connect_timeout,
        idle_timeout,
        service: meshwork.service,
        tls,
        circuit_breakers,
        outlier_detection,
        health_checks: checks,
        panic_threshold,
    })
}

#[derive(Default)]
struct MeshworkMetadata {
    peak_ewma: bool,
    service: Option<String>,
}

/// `metadata.filter_metadata["meshwork"]`; other namespaces belong to other
/// software and are ignored.
fn meshwork_metadata(m: &core::Metadata) -> Res<MeshworkMetadata> {
    use pbuf::value::Kind;
    let mut out = MeshworkMetadata::default();
    let Some(fields) = m.filter_metadata.get("meshwork") else {
        return Ok(out);
    };
    for (key, value) in &fields.fields {
        let at = format!("filter_metadata[\"meshwork\"].{key}");
        let text = match &value.kind {
            Some(Kind::StringValue(s)) => s,
            _ => return Err(FieldError::new(at, "must be a string")),
        };
        match key.as_str() {
            "lb" if text == "peak_ewma" => out.peak_ewma = true,
            "lb" => {
                return Err(FieldError::new(
                    at,
                    format!("unknown balancer {text:?} (only peak_ewma)"),
                ))
            }
            "service" => out.service = Some(text.clone()),
            _ => return Err(FieldError::new(at, "unknown meshwork metadata key")),
        }
    }
    Ok(out)
}

fn lb_policy_of(policy: i32, config: &Option<cpb::cluster::LbConfig>) -> Res<LbPolicy> {
    use cpb::cluster::{LbConfig, LbPolicy as P};
    let policy = P::try_from(policy)
        .map_err(|_| FieldError::new("lb_policy", format!("unknown policy {policy}")))?;
    let mismatch = || {
        FieldError::new(
            "lb_config",
            format!("does not apply to lb_policy {}", policy.as_str_name()),
        )
    };
    match (policy, config) {
        (P::RoundRobin, None) => Ok(LbPolicy::RoundRobin),
        (P::RoundRobin, Some(LbConfig::RoundRobinLbConfig(c))) => {
            if !is_default(c) {
                return Err(FieldError::unsupported(
                    "round_robin_lb_config.slow_start_config",
                ));
            }
            Ok(LbPolicy::RoundRobin)
        }
        (P::Random, None) => Ok(LbPolicy::Random),
        (P::LeastRequest, None) => Ok(LbPolicy::LeastRequest { choice_count: 2 }),
        (P::LeastRequest, Some(LbConfig::LeastRequestLbConfig(c))) => {
            let cpb::cluster::LeastRequestLbConfig {
                choice_count,
                active_request_bias,
                slow_start_config,
            } = c;
            (|| {
                deny!(active_request_bias, slow_start_config);
                let choice_count = choice_count.as_ref().map_or(2, |c| c.value);
                if choice_count < 2 {
                    return Err(FieldError::new("choice_count", "must be at least 2"));
                }
                Ok(LbPolicy::LeastRequest { choice_count })
            })()
            .at("least_request_lb_config")
        }
        (P::RingHash, None) => Ok(LbPolicy::RingHash {
            minimum_ring_size: DEFAULT_MIN_RING,
            maximum_ring_size: MAX_RING,
        }),
        (P::RingHash, Some(LbConfig::RingHashLbConfig(c))) => {
            let cpb::cluster::RingHashLbConfig {
                minimum_ring_size,
                hash_function,
                maximum_ring_size,
            } = c;
            (|| {
                if *hash_function != cpb::cluster::ring_hash_lb_config::HashFunction::XxHash as i32
                {
                    return Err(FieldError::new(
                        "hash_function",
                        "only XX_HASH is supported",
                    ));
                }
                let min = minimum_ring_size
                    .as_ref()
                    .map_or(DEFAULT_MIN_RING, |v| v.value);
                let max = maximum_ring_size.as_ref().map_or(MAX_RING, |v| v.value);
                if min == 0 || min > MAX_RING {
                    return Err(FieldError::new(
                        "minimum_ring_size",
                        format!("must be in [1, {MAX_RING}]"),
                    ));
                }
                if max > MAX_RING || max < min {
                    return Err(FieldError::new(
                        "maximum_ring_size",
                        format!("must be in [minimum_ring_size, {MAX_RING}]"),
                    ));
                }
                Ok(LbPolicy::RingHash {
                    minimum_ring_size: min,
                    maximum_ring_size: max,
                })
            })()
            .at("ring_hash_lb_config")
        }
        (P::Maglev, None) => Ok(LbPolicy::Maglev {
            table_size: DEFAULT_MAGLEV_TABLE,
        }),
        (P::Maglev, Some(LbConfig::MaglevLbConfig(c))) => {
            let table_size = c
                .table_size
                .as_ref()
                .map_or(DEFAULT_MAGLEV_TABLE, |v| v.value);
            if table_size > MAX_MAGLEV_TABLE || !is_prime(table_size) {
                return Err(FieldError::new(
                    "maglev_lb_config.table_size",
                    format!("must be a prime number no larger than {MAX_MAGLEV_TABLE}"),
                ));
            }
            Ok(LbPolicy::Maglev { table_size })
        }
        (P::ClusterProvided | P::LoadBalancingPolicyConfig, _) => Err(FieldError::new(
            "lb_policy",
            format!("unsupported policy {}", policy.as_str_name()),
        )),
        (_, Some(_)) => Err(mismatch()),
    }
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d <= n / d {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Returns (HTTP/2 upstream, pooled connection idle timeout).
fn upstream_http_options(o: &uhttp::HttpProtocolOptions) -> Res<(bool, Option<Duration>)> {
    use uhttp::http_protocol_options::{
        explicit_http_config::ProtocolConfig, UpstreamProtocolOptions,
    };
    let uhttp::HttpProtocolOptions {
        common_http_protocol_options,
        upstream_http_protocol_options,
        http_filters,
        header_validation_config,
        outlier_detection,
        request_mirror_policies,
        hash_policy,
        retry_policy,
        upstream_protocol_options,
    } = o;
    deny!(
        upstream_http_protocol_options,
        http_filters,
        header_validation_config,
        outlier_detection,
        request_mirror_policies,
        hash_policy,
        retry_policy,
    );
    let idle_timeout = match common_http_protocol_options {
        None => None,
        Some(c) => common_protocol_idle_timeout(c).at("common_http_protocol_options")?,
    };
    let http2 = match upstream_protocol_options {
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => match &e.protocol_config {
            Some(ProtocolConfig::HttpProtocolOptions(h1)) => {
                if !is_default(h1) {
                    return Err(FieldError::new(
                        "explicit_http_config.http_protocol_options",
                        "settings are not supported (use {})",
                    ));
                }
                false
            }
            Some(ProtocolConfig::Http2ProtocolOptions(h2)) => {
                if !is_default(h2) {
                    return Err(FieldError::new(
                        "explicit_http_config.http2_protocol_options",
                        "settings are not supported (use {})",
                    ));
                }
                true
            }
            Some(ProtocolConfig::Http3ProtocolOptions(_)) => {
                return Err(FieldError::unsupported(
                    "explicit_http_config.http3_protocol_options",
                ))
            }
            None => {
                return Err(FieldError::new(
                    "explicit_http_config",
                    "http_protocol_options or http2_protocol_options is required",
                ))
            }
        },
        Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(_)) => {
            return Err(FieldError::unsupported("use_downstream_protocol_config"))
        }
        Some(UpstreamProtocolOptions::AutoConfig(_)) => {
            return Err(FieldError::unsupported("auto_config"))
        }
        None => {
            return Err(FieldError::new(
                "upstream_protocol_options",
                "explicit_http_config is required",
            ))
        }
    };
    Ok((http2, idle_timeout))
}

// ---------------------------------------------------------------------------
// ClusterLoadAssignment

pub(super) fn load_assignment(la: &epb::ClusterLoadAssignment) -> Res<LoadAssignment> {
    let epb::ClusterLoadAssignment {
        cluster_name,
        endpoints,
        named_endpoints,
        policy,
    } = la;
    deny!(named_endpoints);
    if let Some(p) = policy {
        let epb::cluster_load_assignment::Policy {
            drop_overloads,
            overprovisioning_factor,
            endpoint_stale_after,
            weighted_priority_health,
        } = p;
        (|| {
            // The balancer's priority failover uses Envoy's default factor
            // (140, i.e. 1.4); another one would be silently misread.
            if let Some(f) = overprovisioning_factor {
                if f.value != 140 {
                    return Err(FieldError::new(
                        "overprovisioning_factor",
                        format!("{} is not supported: meshwork's priority failover uses Envoy's default, 140", f.value),
                    ));
                }
            }
            deny!(
                drop_overloads,
                endpoint_stale_after,
                weighted_priority_health
            );
            Ok(())
        })()
        .at("policy")?;
    }
    let mut localities = Vec::with_capacity(endpoints.len());
    for (i, group) in endpoints.iter().enumerate() {
        localities.push(locality_endpoints(group).at(format_args!("endpoints[{i}]"))?);
    }
    Ok(LoadAssignment {
        cluster_name: cluster_name.clone(),
        localities,
    })
}

#[allow(deprecated)]
fn locality_endpoints(group: &epb::LocalityLbEndpoints) -> Res<LocalityEndpoints> {
    let epb::LocalityLbEndpoints {
        locality,
        metadata: _,
        lb_endpoints,
        load_balancing_weight,
        priority,
        proximity: _,
        lb_config,
    } = group;
    deny!(lb_config);
    let (region, zone) = match locality {
        Some(core::Locality {
            region,
            zone,
            sub_zone: _,
        }) => (region.clone(), zone.clone()),
        None => (String::new(), String::new()),
    };
    let mut endpoints = Vec::with_capacity(lb_endpoints.len());
    for (i, e) in lb_endpoints.iter().enumerate() {
        endpoints.push(lb_endpoint(e).at(format_args!("lb_endpoints[{i}]"))?);
    }
    let weight = match load_balancing_weight {
        Some(w) if w.value == 0 => {
            return Err(FieldError::new(
                "load_balancing_weight",
                "must be at least 1",
            ))
        }
        Some(w) => w.value,
        // Unset: the group weighs what its endpoints weigh.
        None => endpoints
            .iter()
            .fold(0u32, |acc, e: &Endpoint| acc.saturating_add(e.weight)),
    };
    Ok(LocalityEndpoints {
        region,
        zone,
        weight,
        priority: *priority,
        endpoints,
    })
}

fn lb_endpoint(e: &epb::LbEndpoint) -> Res<Endpoint> {
    let epb::LbEndpoint {
        health_status,
        metadata,
        load_balancing_weight,
        host_identifier,
    } = e;
    let unhealthy = resilience::endpoint_unhealthy(*health_status).at("health_status")?;
    let endpoint = match host_identifier {
        Some(epb::lb_endpoint::HostIdentifier::Endpoint(ep)) => ep,
        Some(epb::lb_endpoint::HostIdentifier::EndpointName(_)) => {
            return Err(FieldError::unsupported("endpoint_name"))
        }
        None => return Err(FieldError::new("endpoint", "required")),
    };
    let epb::Endpoint {
        address,
        health_check_config,
        // Used by Envoy for auto host rewrite and health checks only.
        hostname: _,
        additional_addresses,
        observability_name: _,
    } = endpoint;
    (|| {
        deny!(health_check_config, additional_addresses);
        Ok(())
    })()
    .at("endpoint")?;
    let address = socket_address(address).at("endpoint.address")?;
    let weight = match load_balancing_weight {
        None => 1,
        Some(w) if w.value == 0 => {
            return Err(FieldError::new(
                "load_balancing_weight",
                "must be at least 1",
            ))
        }
        Some(w) => w.value,
    };
    let mtls = match metadata {
        Some(m) => super::tls::endpoint_mtls(m).at("metadata")?,
        None => false,
    };
    Ok(Endpoint {
        address,
        weight,
        mtls,
        unhealthy,
    })
}

//! Clusters (one per service port, plus the proxy's inbound clusters) and
//! their ClusterLoadAssignments.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use envoy_types::pb::envoy::config::cluster::v3::{
    cluster::{self, DiscoveryType, LbPolicy},
    Cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address, Address, HealthStatus, HttpProtocolOptions as CommonHttpOptions,
    Locality, Metadata, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options::{
        explicit_http_config::ProtocolConfig, ExplicitHttpConfig, UpstreamProtocolOptions,
    },
    HttpProtocolOptions,
};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{value, Struct, Value};

use super::names;
use super::resilience;
use super::util::{ads_source, any, pb_duration, u32v, u64v};
use crate::effective::EffectivePolicy;
use crate::mesh::Mesh;
use crate::resources::{
    AppProtocol, LbAlgorithm, Locality as WorkloadLocality, LocalityFailover, Service, ServicePort,
    Workload, DEFAULT_CHOICE_COUNT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_HTTP_IDLE_TIMEOUT,
    DEFAULT_MAGLEV_TABLE, DEFAULT_MAX_RING, DEFAULT_MIN_RING, WORKLOAD_STATE_ANNOTATION,
};
use crate::source::Sourced;

/// Type URL key of the upstream HTTP protocol options.
pub(crate) const HTTP_PROTOCOL_OPTIONS: &str =
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// The EDS cluster of service port `sp` of `svc`, with `policy` the
/// port's effective TrafficPolicy.
pub(crate) fn service_cluster(
    svc: &Service,
    sp: &ServicePort,
    policy: &EffectivePolicy,
) -> Cluster {
    let name = names::cluster(sp.port, &svc.metadata.name, &svc.metadata.namespace);
    let pool = policy.connection_pool.as_ref().map(|s| &s.value);
    let connect = pool
        .and_then(|p| p.connect_timeout)
        .map(|d| d.get())
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let idle = pool.and_then(|p| p.idle_timeout).map(|d| d.get());
    let lb = policy
        .load_balancer
        .as_ref()
        .map(|s| s.value.clone())
        .unwrap_or_default();

    let mut meta_fields = HashMap::new();
    meta_fields.insert(
        "service".to_string(),
        string_value(&format!("{}.{}", svc.metadata.name, svc.metadata.namespace)),
    );
    let mut c = Cluster {
        name: name.clone(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads_source()),
            service_name: name,
        }),
        connect_timeout: Some(pb_duration(connect)),
        ..Default::default()
    };
    match lb.algorithm {
        LbAlgorithm::PeakEwma => {
            c.lb_policy = LbPolicy::LeastRequest as i32;
            c.lb_config = Some(cluster::LbConfig::LeastRequestLbConfig(
                cluster::LeastRequestLbConfig {
                    choice_count: Some(u32v(DEFAULT_CHOICE_COUNT)),
                    ..Default::default()
                },
            ));
            meta_fields.insert("lb".to_string(), string_value("peak_ewma"));
        }
        LbAlgorithm::LeastRequest => {
            c.lb_policy = LbPolicy::LeastRequest as i32;
            c.lb_config = Some(cluster::LbConfig::LeastRequestLbConfig(
                cluster::LeastRequestLbConfig {
                    choice_count: Some(u32v(lb.choice_count.unwrap_or(DEFAULT_CHOICE_COUNT))),
                    ..Default::default()
                },
            ));
        }
        LbAlgorithm::RoundRobin => c.lb_policy = LbPolicy::RoundRobin as i32,
        LbAlgorithm::Random => c.lb_policy = LbPolicy::Random as i32,
        LbAlgorithm::RingHash => {
            let rh = lb.ring_hash.clone().unwrap_or_default();
            c.lb_policy = LbPolicy::RingHash as i32;
            c.lb_config = Some(cluster::LbConfig::RingHashLbConfig(
                cluster::RingHashLbConfig {
                    minimum_ring_size: Some(u64v(rh.minimum_ring_size.unwrap_or(DEFAULT_MIN_RING))),
                    maximum_ring_size: Some(u64v(rh.maximum_ring_size.unwrap_or(DEFAULT_MAX_RING))),
                    ..Default::default()
                },
            ));
        }
        LbAlgorithm::Maglev => {
            let m = lb.maglev.clone().unwrap_or_default();
            c.lb_policy = LbPolicy::Maglev as i32;
            c.lb_config = Some(cluster::LbConfig::MaglevLbConfig(cluster::MaglevLbConfig {
                table_size: Some(u64v(m.table_size.unwrap_or(DEFAULT_MAGLEV_TABLE))),
            }));
        }
    }
    c.metadata = Some(meshwork_metadata(meta_fields));
    let budget = policy
        .retries
        .as_ref()
        .and_then(|r| r.value.budget.as_ref());
    c.circuit_breakers = resilience::circuit_breakers(pool, budget);
    c.outlier_detection = policy
        .outlier_detection
        .as_ref()
        .map(|o| resilience::outlier_detection(&o.value));
    if let Some(h) = &policy.health_check {
        c.health_checks = vec![resilience::health_check(&h.value, svc, sp)];
    }
    if c.outlier_detection.is_some() || !c.health_checks.is_empty() {
        // Panic mode off (as Istio): unhealthy and ejected endpoints stay
        // out even when most are, rather than all taking traffic again.
        c.common_lb_config = Some(cluster::CommonLbConfig {
            healthy_panic_threshold: Some(Percent { value: 0.0 }),
            ..Default::default()
        });
    }
    if sp.app_protocol.is_http() {
        set_http_options(
            &mut c,
            sp.app_protocol,
            Some(idle.unwrap_or(DEFAULT_HTTP_IDLE_TIMEOUT)),
        );
    }
    c
}

/// The STATIC cluster that reaches the local application on `port`.
pub(crate) fn inbound_cluster(
    w: &Workload,
    svc: &Service,
    port: u32,
    proto: AppProtocol,
) -> Cluster {
    let name = names::inbound_cluster(port);
    let mut fields = HashMap::new();
    fields.insert(
        "service".to_string(),
        string_value(&format!("{}.{}", svc.metadata.name, svc.metadata.namespace)),
    );
    let mut c = Cluster {
        name: name.clone(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            DiscoveryType::Static as i32,
        )),
        connect_timeout: Some(pb_duration(DEFAULT_CONNECT_TIMEOUT)),
        lb_policy: LbPolicy::RoundRobin as i32,
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name,
            endpoints: vec![LocalityLbEndpoints {
                locality: Some(locality(w)),
                lb_endpoints: vec![lb_endpoint(w.spec.address, port, 1)],
                load_balancing_weight: Some(u32v(1)),
                priority: 0,
                ..Default::default()
            }],
            ..Default::default()
        }),
        metadata: Some(meshwork_metadata(fields)),
        ..Default::default()
    };
    if proto.is_http() {
        set_http_options(&mut c, proto, Some(DEFAULT_HTTP_IDLE_TIMEOUT));
    }
    c
}

fn set_http_options(c: &mut Cluster, proto: AppProtocol, idle: Option<std::time::Duration>) {
    let protocol = if proto.is_http2() {
        ProtocolConfig::Http2ProtocolOptions(Default::default())
    } else {
        ProtocolConfig::HttpProtocolOptions(Default::default())
    };
    let opts = HttpProtocolOptions {
        common_http_protocol_options: idle.map(|d| CommonHttpOptions {
            idle_timeout: Some(pb_duration(d)),
            ..Default::default()
        }),
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(protocol),
            },
        )),
        ..Default::default()
    };
    c.typed_extension_protocol_options
        .insert(HTTP_PROTOCOL_OPTIONS.to_string(), any(&opts));
}

/// The endpoints of service port `sp`: one group per locality (sorted), each
/// weighted by the sum of its endpoints' weights. When the port's
/// TrafficPolicy enables `locality` and the proxy's own locality `at` is
/// known, each group gets a priority (see [`locality_priorities`]);
/// otherwise all are priority 0.
pub(crate) fn load_assignment(
    mesh: &Mesh,
    svc: &Service,
    sp: &ServicePort,
    mtls: bool,
    at: Option<&WorkloadLocality>,
) -> ClusterLoadAssignment {
    let ns = &svc.metadata.namespace;
    let mut groups: BTreeMap<(String, String), Vec<&Sourced<Workload>>> = BTreeMap::new();
    for w in mesh.workloads_of(ns, &svc.metadata.name) {
        // Not accepting yet: not an endpoint.
        if workload_state(&w.value) == Some("starting") {
            continue;
        }
        let l = w.value.spec.locality.clone().unwrap_or_default();
        groups.entry((l.region, l.zone)).or_default().push(w);
    }
    let priorities = at
        .and_then(|me| {
            let policy = mesh.port_policy(ns, &svc.metadata.name, &sp.name);
            let lb = policy
                .locality
                .filter(|l| l.value.enabled.unwrap_or(true))?;
            Some(locality_priorities(groups.keys(), me, &lb.value.failover))
        })
        .unwrap_or_default();
    let endpoints = groups
        .into_iter()
        .map(|(key, ws)| {
            let total = ws
                .iter()
                .fold(0u32, |acc, w| acc.saturating_add(w.value.spec.weight));
            LocalityLbEndpoints {
                locality: ws.first().map(|w| locality(&w.value)),
                lb_endpoints: ws
                    .iter()
                    .map(|w| {
                        let (ip, port) = w.value.endpoint_for(sp);
                        let mut e = lb_endpoint(ip, port, w.value.spec.weight);
                        if mtls && super::mtls::has_sidecar(&w.value) {
                            e.metadata = Some(super::mtls::endpoint_metadata());
                        }
                        if workload_state(&w.value) == Some("draining") {
                            e.health_status = HealthStatus::Draining as i32;
                        }
                        e
                    })
                    .collect(),
                load_balancing_weight: Some(u32v(total.max(1))),
                priority: priorities.get(&key).copied().unwrap_or(0),
                ..Default::default()
            }
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: names::cluster(sp.port, &svc.metadata.name, ns),
        endpoints,
        ..Default::default()
    }
}

/// Priorities of endpoint localities `(region, zone)` for a proxy in `me`
/// (Istio's scheme): 0 for its own zone, 1 for the rest of its region, then
/// the `failover` targets of its region in order, then everything else.
/// Levels nobody is in are left out, so the priorities that exist are
/// 0, 1, 2... without gaps (Envoy fails over level by level).
pub(crate) fn locality_priorities<'a>(
    localities: impl Iterator<Item = &'a (String, String)>,
    me: &WorkloadLocality,
    failover: &[LocalityFailover],
) -> BTreeMap<(String, String), u32> {
    let targets: Vec<&str> = failover
        .iter()
        .filter(|f| f.from == me.region)
        .map(|f| f.to.as_str())
        .collect();
    let raw: Vec<((String, String), usize)> = localities
        .map(|(region, zone)| {
            let level = if *region == me.region && *zone == me.zone {
                0
            } else if *region == me.region {
                1
            } else if let Some(i) = targets.iter().position(|t| t == region) {
                2 + i
            } else {
                2 + targets.len()
            };
            ((region.clone(), zone.clone()), level)
        })
        .collect();
    let mut levels: Vec<usize> = raw.iter().map(|(_, l)| *l).collect();
    levels.sort_unstable();
    levels.dedup();
    raw.into_iter()
        .map(|(k, l)| {
            let p = levels.iter().position(|x| *x == l).unwrap_or(0);
            (k, u32::try_from(p).unwrap_or(u32::MAX))
        })
        .collect()
}

fn locality(w: &Workload) -> Locality {
    let l = w.spec.locality.clone().unwrap_or_default();
    Locality {
        region: l.region,
        zone: l.zone,
        ..Default::default()
    }
}

/// The [`WORKLOAD_STATE_ANNOTATION`] of a workload, if any.
fn workload_state(w: &Workload) -> Option<&str> {
    w.metadata
        .annotations
        .get(WORKLOAD_STATE_ANNOTATION)
        .map(String::as_str)
}

fn lb_endpoint(ip: IpAddr, port: u32, weight: u32) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(socket_address(ip, port)),
            ..Default::default()
        })),
        load_balancing_weight: Some(u32v(weight.max(1))),
        ..Default::default()
    }
}

/// `address.socket_address` for `ip:port`.
pub(crate) fn socket_address(ip: IpAddr, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(value::Kind::StringValue(s.to_string())),
    }
}

fn meshwork_metadata(fields: HashMap<String, Value>) -> Metadata {
    let mut m = Metadata::default();
    m.filter_metadata
        .insert("meshwork".to_string(), Struct { fields });
    m
}

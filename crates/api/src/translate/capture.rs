//! Transparent capture (a proxy whose [`super::ProxyContext::capture`] is set):
//! Istio's model, so Envoy reads the output the same way.
//!
//! - The outbound listener gets `use_original_dst: true`. Its own chains
//!   (HTTP, and a loop guard to `BlackHoleCluster` for anything else) match
//!   `destination_port: <its port>`, so they serve only connections
//!   addressed to the listener itself (explicit mode); captured connections
//!   whose original destination matches no listener take the
//!   `default_filter_chain`: `PassthroughCluster` (ORIGINAL_DST) or, with
//!   `outboundTrafficPolicy.mode: REGISTRY_ONLY`, `BlackHoleCluster` (STATIC,
//!   no endpoints: closed).
//! - Every Service port gets a listener `<vip>_<port>` at the Service's VIP
//!   with `bind_to_port: false`: the outbound listener hands it the
//!   connections whose original destination is that address. HTTP ports run
//!   the outbound route table (whose virtual hosts also list the VIP), TCP
//!   ports the same tcp_proxy as the explicit `outbound_tcp|...` listener.
//!   Its `metadata.filter_metadata.meshwork` says which Service it is
//!   (`service: name.namespace`) and under which names
//!   (`hostnames`), which the proxy's mesh DNS answers from.
//!
//! - IPv6: ip6tables REDIRECTs locally generated IPv6 connections to
//!   `[::1]:<port>` and incoming ones to an address of the incoming
//!   interface, which an IPv4 socket never sees. So the outbound and the
//!   inbound listener each get the IPv6 twin of their IPv4 address as an
//!   `additional_addresses` entry ([`ipv6_twin`]: `127.0.0.1` -> `::1`,
//!   `0.0.0.0` -> `::`; Istio's dual-stack listeners do the same). A proxy
//!   that cannot bind it (IPv6 disabled on the host) warns and serves IPv4.
//!
//! Non-goals: IPv6 VIPs (mesh DNS answers A records only; IPv6 destinations
//! outside the mesh pass through or are refused like IPv4 ones); inbound
//! capture needs no chains here (redirected inbound connections reach the
//! inbound listener like explicit ones).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, LbPolicy,
};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::config::listener::v3::{
    AdditionalAddress, Filter, FilterChain, Listener,
};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::{value, BoolValue, ListValue, Struct, Value};

use super::clusters::socket_address;
use super::util::{pb_duration, u32v};
use super::{listeners, names};
use crate::mesh::Mesh;
use crate::resources::{OutboundMode, Service, ServicePort};

/// Cluster of captured connections to destinations outside the mesh
/// (`ALLOW_ANY`): connects to the original destination.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// Cluster that refuses every connection (`REGISTRY_ONLY`, and the loop
/// guard of the outbound listener).
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";

/// Same as Envoy's default; passthrough connections are not pooled.
const PASSTHROUGH_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `PassthroughCluster` and `BlackHoleCluster`.
pub(crate) fn clusters() -> Vec<Cluster> {
    vec![
        Cluster {
            name: PASSTHROUGH_CLUSTER.to_string(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(
                DiscoveryType::OriginalDst as i32,
            )),
            lb_policy: LbPolicy::ClusterProvided as i32,
            connect_timeout: Some(pb_duration(PASSTHROUGH_CONNECT_TIMEOUT)),
            ..Default::default()
        },
        Cluster {
            name: BLACKHOLE_CLUSTER.to_string(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
            connect_timeout: Some(pb_duration(PASSTHROUGH_CONNECT_TIMEOUT)),
            ..Default::default()
        },
    ]
}

/// Turns the outbound listener into the capture listener (see the module
/// docs). Its port must not be 0 (`destination_port` cannot say "any").
pub(crate) fn capture_listener(mesh: &Mesh, l: &mut Listener, port: u16) {
    l.use_original_dst = Some(BoolValue { value: true });
    for fc in &mut l.filter_chains {
        fc.filter_chain_match
            .get_or_insert_with(Default::default)
            .destination_port = Some(u32v(u32::from(port)));
    }
    // Loop guard: a non-HTTP connection addressed to the listener itself
    // would otherwise "pass through" to the listener again.
    l.filter_chains.push(FilterChain {
        filter_chain_match: Some(
            envoy_types::pb::envoy::config::listener::v3::FilterChainMatch {
                destination_port: Some(u32v(u32::from(port))),
                ..Default::default()
            },
        ),
        filters: vec![listeners::tcp_proxy(
            BLACKHOLE_CLUSTER,
            vec![(BLACKHOLE_CLUSTER.to_string(), 1)],
            None,
        )],
        ..Default::default()
    });
    let default = match mesh.outbound_mode() {
        OutboundMode::AllowAny => PASSTHROUGH_CLUSTER,
        OutboundMode::RegistryOnly => BLACKHOLE_CLUSTER,
    };
    l.default_filter_chain = Some(FilterChain {
        filters: vec![listeners::tcp_proxy(
            default,
            vec![(default.to_string(), 1)],
            None,
        )],
        ..Default::default()
    });
}

/// The IPv6 address where ip6tables delivers what `addr` (an IPv4 listener
/// address) receives over IPv4: loopback for loopback (outbound REDIRECT
/// goes to `::1`), any for any (inbound REDIRECT goes to an address of the
/// incoming interface). `None` for IPv6 addresses (they already are) and
/// for specific IPv4 addresses (no IPv6 counterpart to guess).
pub fn ipv6_twin(addr: SocketAddr) -> Option<SocketAddr> {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_loopback() => Ipv6Addr::LOCALHOST,
        IpAddr::V4(v4) if v4.is_unspecified() => Ipv6Addr::UNSPECIFIED,
        _ => return None,
    };
    Some(SocketAddr::new(IpAddr::V6(ip), addr.port()))
}

/// Adds the [`ipv6_twin`] of `l`'s address `addr`, if it has one, to its
/// `additional_addresses`.
pub(crate) fn add_ipv6_twin(l: &mut Listener, addr: SocketAddr) {
    if let Some(twin) = ipv6_twin(addr) {
        l.additional_addresses.push(AdditionalAddress {
            address: Some(socket_address(twin.ip(), u32::from(twin.port()))),
            ..Default::default()
        });
    }
}

/// `<vip>_<port>`.
pub fn vip_listener_name(vip: IpAddr, port: u32) -> String {
    format!("{vip}_{port}")
}

/// Marks `l` as the VIP listener of `svc`'s port: not bound, with the
/// service metadata.
pub(crate) fn vip_listener(mut l: Listener, svc: &Service, client_ns: &str) -> Listener {
    l.bind_to_port = Some(BoolValue { value: false });
    l.metadata = Some(service_metadata(svc, client_ns));
    l
}

/// The address of `svc`'s VIP listener for port `sp`, if it has a VIP.
pub(crate) fn vip_addr(mesh: &Mesh, svc: &Service, sp: &ServicePort) -> Option<SocketAddr> {
    let vip = mesh.service_vip(&svc.metadata.namespace, &svc.metadata.name)?;
    let port = u16::try_from(sp.port).ok()?;
    Some(SocketAddr::new(IpAddr::V4(vip), port))
}

/// `filter_metadata.meshwork {service: "name.namespace", hostnames: [...]}`:
/// the names a client in `client_ns` may use (the short name only in its
/// own namespace, as Kubernetes DNS resolves it). The DNS domain
/// (`cluster.local`) is the proxy's to append.
fn service_metadata(svc: &Service, client_ns: &str) -> Metadata {
    let (n, ns) = (&svc.metadata.name, &svc.metadata.namespace);
    let s = |v: String| Value {
        kind: Some(value::Kind::StringValue(v)),
    };
    let mut hostnames = Vec::new();
    if ns == client_ns {
        hostnames.push(s(n.clone()));
    }
    hostnames.push(s(format!("{n}.{ns}")));
    hostnames.push(s(format!("{n}.{ns}.svc")));
    let mut fields = HashMap::new();
    fields.insert("service".to_string(), s(format!("{n}.{ns}")));
    fields.insert(
        "hostnames".to_string(),
        Value {
            kind: Some(value::Kind::ListValue(ListValue { values: hostnames })),
        },
    );
    let mut m = Metadata::default();
    m.filter_metadata
        .insert("meshwork".to_string(), Struct { fields });
    m
}

/// Adds each HTTP Service port's VIP (`<vip>:<port>`, and the bare `<vip>`
/// for the first HTTP port, like the portless host names) to its virtual
/// host, so a client calling the address rather than a name is routed too.
pub(crate) fn add_vip_domains(mesh: &Mesh, rc: &mut RouteConfiguration) {
    for s in mesh.services() {
        let svc = &s.value;
        let (n, ns) = (&svc.metadata.name, &svc.metadata.namespace);
        let Some(vip) = mesh.service_vip(ns, n) else {
            continue;
        };
        let first_http = svc.first_http_port().map(|p| p.port);
        for sp in svc.spec.ports.iter().filter(|p| p.app_protocol.is_http()) {
            let vname = names::vhost(n, ns, sp.port);
            if let Some(vh) = rc.virtual_hosts.iter_mut().find(|v| v.name == vname) {
                if first_http == Some(sp.port) {
                    vh.domains.push(vip.to_string());
                }
                vh.domains.push(format!("{vip}:{}", sp.port));
            }
        }
    }
}

/// The tcp_proxy filter of a TCP VIP listener: the explicit listener's.
pub(crate) fn tcp_vip_listener(name: &str, addr: SocketAddr, filter: Filter) -> Listener {
    listeners::plain(name, addr, vec![filter])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::translate::{names, translate, ProxyContext};
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address};

    const MESH: &str = "\
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {name: web}
spec:
  vip: 240.240.7.1
  ports: [{name: http, port: 80, appProtocol: http}]
---
apiVersion: meshwork.dev/v1alpha1
kind: Workload
metadata: {name: web-0}
spec: {service: web, address: 10.0.0.7, ports: {http: 8080}}
";

    fn mesh() -> Mesh {
        crate::validate(crate::load_str("mesh.yaml", MESH).unwrap()).unwrap()
    }

    fn ctx(outbound: &str, inbound: &str, capture: bool) -> ProxyContext {
        ProxyContext {
            outbound_addr: outbound.parse().unwrap(),
            inbound_addr: inbound.parse().unwrap(),
            workload: Some(("default".into(), "web-0".into())),
            capture,
            ..Default::default()
        }
    }

    /// `ip:port` of each additional address.
    fn additional(l: &Listener) -> Vec<String> {
        l.additional_addresses
            .iter()
            .map(|a| {
                let Some(address::Address::SocketAddress(sa)) =
                    a.address.as_ref().and_then(|a| a.address.as_ref())
                else {
                    panic!("{a:?}")
                };
                assert!(a.socket_options.is_none() && a.tcp_keepalive.is_none());
                let Some(socket_address::PortSpecifier::PortValue(p)) = sa.port_specifier else {
                    panic!("{sa:?}")
                };
                SocketAddr::new(sa.address.parse().unwrap(), p as u16).to_string()
            })
            .collect()
    }

    #[test]
    fn ipv6_twins_of_loopback_and_any_only() {
        let twin = |a: &str| ipv6_twin(a.parse().unwrap()).map(|t| t.to_string());
        assert_eq!(twin("127.0.0.1:15001").as_deref(), Some("[::1]:15001"));
        assert_eq!(twin("127.0.0.2:15001").as_deref(), Some("[::1]:15001"));
        assert_eq!(twin("0.0.0.0:15006").as_deref(), Some("[::]:15006"));
        assert_eq!(twin("10.0.0.7:15006"), None);
        assert_eq!(twin("[::1]:15001"), None);
        assert_eq!(twin("[::]:15001"), None);
    }

    #[test]
    fn capture_listeners_also_listen_on_ipv6() {
        let x = translate(&mesh(), &ctx("127.0.0.1:15001", "0.0.0.0:15006", true));
        let out = x.listener(names::OUTBOUND_HTTP).unwrap();
        assert_eq!(additional(out), ["[::1]:15001"]);
        let inbound = x.listener(names::INBOUND).unwrap();
        assert_eq!(additional(inbound), ["[::]:15006"]);
        // VIP listeners are IPv4 only (no IPv6 VIPs).
        assert!(x
            .listeners
            .iter()
            .filter(|l| l.name != names::OUTBOUND_HTTP && l.name != names::INBOUND)
            .all(|l| l.additional_addresses.is_empty()));
    }

    #[test]
    fn no_ipv6_twin_for_ipv6_or_specific_addresses_or_explicit_mode() {
        let x = translate(&mesh(), &ctx("[::]:15001", "10.0.0.7:15006", true));
        assert!(x
            .listeners
            .iter()
            .all(|l| l.additional_addresses.is_empty()));
        let x = translate(&mesh(), &ctx("127.0.0.1:15001", "0.0.0.0:15006", false));
        assert!(x
            .listeners
            .iter()
            .all(|l| l.additional_addresses.is_empty()));
    }
}

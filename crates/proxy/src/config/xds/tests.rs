#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as uhttp;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::envoy::r#type::v3 as etype;
use http::{HeaderName, HeaderValue};
use prost::Message;

use super::cluster::HTTP_PROTOCOL_OPTIONS;
use super::route::per_million;
use super::*;
use crate::config::model::{
    self, HashPolicy, LbPolicy, PathMatch, PathRedirect, PseudoHeader, RouteAction, StringMatch,
};

// ---------------------------------------------------------------------------
// Builders: hand-made resources shaped like meshwork's translator output.

fn any<M: prost::Message + prost::Name>(m: &M) -> pbuf::Any {
    pbuf::Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn dur(seconds: i64, nanos: i32) -> pbuf::Duration {
    pbuf::Duration { seconds, nanos }
}

fn u32v(value: u32) -> pbuf::UInt32Value {
    pbuf::UInt32Value { value }
}

fn sock(ip: &str, port: u32) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip.into(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn ads() -> core::ConfigSource {
    core::ConfigSource {
        resource_api_version: core::ApiVersion::V3 as i32,
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn router_filter() -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
            &Router::default(),
        ))),
        ..Default::default()
    }
}

fn hcm_rds(route_name: &str) -> hcm::HttpConnectionManager {
    hcm::HttpConnectionManager {
        stat_prefix: "outbound_http".into(),
        http_filters: vec![router_filter()],
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                config_source: Some(ads()),
                route_config_name: route_name.into(),
            },
        )),
        ..Default::default()
    }
}

fn tcp_to(cluster: &str) -> tcp::TcpProxy {
    tcp::TcpProxy {
        stat_prefix: "tcp".into(),
        cluster_specifier: Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    }
}

fn net_filter(name: &str, config: pbuf::Any) -> lpb::Filter {
    lpb::Filter {
        name: name.into(),
        config_type: Some(lpb::filter::ConfigType::TypedConfig(config)),
    }
}

fn hcm_filter(h: &hcm::HttpConnectionManager) -> lpb::Filter {
    net_filter("envoy.filters.network.http_connection_manager", any(h))
}

fn tcp_filter(t: &tcp::TcpProxy) -> lpb::Filter {
    net_filter("envoy.filters.network.tcp_proxy", any(t))
}

fn http_chain(h: &hcm::HttpConnectionManager) -> lpb::FilterChain {
    lpb::FilterChain {
        filter_chain_match: Some(lpb::FilterChainMatch {
            application_protocols: vec!["http/1.1".into(), "h2c".into()],
            ..Default::default()
        }),
        filters: vec![hcm_filter(h)],
        ..Default::default()
    }
}

fn plain_chain(f: lpb::Filter) -> lpb::FilterChain {
    lpb::FilterChain {
        filters: vec![f],
        ..Default::default()
    }
}

fn inspector() -> lpb::ListenerFilter {
    lpb::ListenerFilter {
        name: "envoy.filters.listener.http_inspector".into(),
        config_type: Some(lpb::listener_filter::ConfigType::TypedConfig(any(
            &HttpInspector {},
        ))),
        ..Default::default()
    }
}

fn outbound_http() -> lpb::Listener {
    lpb::Listener {
        name: "outbound_http".into(),
        address: Some(sock("127.0.0.1", 15001)),
        listener_filters: vec![inspector()],
        listener_filters_timeout: Some(dur(1, 0)),
        continue_on_listener_filters_timeout: true,
        filter_chains: vec![http_chain(&hcm_rds("outbound_http"))],
        ..Default::default()
    }
}

fn inbound() -> lpb::Listener {
    let mut h = hcm_rds("inbound");
    h.stat_prefix = "inbound".into();
    lpb::Listener {
        name: "inbound".into(),
        address: Some(sock("0.0.0.0", 15006)),
        listener_filters: vec![inspector()],
        listener_filters_timeout: Some(dur(1, 0)),
        continue_on_listener_filters_timeout: true,
        filter_chains: vec![http_chain(&h)],
        default_filter_chain: Some(plain_chain(tcp_filter(&tcp_to("inbound|8080")))),
        ..Default::default()
    }
}

fn outbound_tcp() -> lpb::Listener {
    lpb::Listener {
        name: "outbound_tcp|5432|db.default".into(),
        address: Some(sock("127.0.0.1", 5432)),
        filter_chains: vec![plain_chain(tcp_filter(&tcp_to(
            "outbound|5432||db.default",
        )))],
        ..Default::default()
    }
}

fn route_to(name: &str, prefix: &str, cluster: &str) -> rpb::Route {
    rpb::Route {
        name: name.into(),
        r#match: Some(rpb::RouteMatch {
            path_specifier: Some(rpb::route_match::PathSpecifier::Prefix(prefix.into())),
            ..Default::default()
        }),
        action: Some(rpb::route::Action::Route(rpb::RouteAction {
            cluster_specifier: Some(rpb::route_action::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn vhost(name: &str, domains: &[&str], routes: Vec<rpb::Route>) -> rpb::VirtualHost {
    rpb::VirtualHost {
        name: name.into(),
        domains: domains.iter().map(|d| d.to_string()).collect(),
        routes,
        ..Default::default()
    }
}

fn route_config(name: &str, virtual_hosts: Vec<rpb::VirtualHost>) -> rpb::RouteConfiguration {
    rpb::RouteConfiguration {
        name: name.into(),
        virtual_hosts,
        ..Default::default()
    }
}

fn simple_routes() -> rpb::RouteConfiguration {
    route_config(
        "outbound_http",
        vec![vhost(
            "web.default:80",
            &["web.default", "web.default:80"],
            vec![route_to("default/web/0", "/", "outbound|80||web.default")],
        )],
    )
}

fn eds_cluster(name: &str) -> cpb::Cluster {
    cpb::Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cpb::cluster::ClusterDiscoveryType::Type(
            cpb::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cpb::cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.into(),
        }),
        connect_timeout: Some(dur(2, 0)),
        ..Default::default()
    }
}

fn lb_endpoint(ip: &str, port: u32, weight: Option<u32>) -> epb::LbEndpoint {
    epb::LbEndpoint {
        host_identifier: Some(epb::lb_endpoint::HostIdentifier::Endpoint(epb::Endpoint {
            address: Some(sock(ip, port)),
            ..Default::default()
        })),
        load_balancing_weight: weight.map(u32v),
        ..Default::default()
    }
}

fn cla(name: &str, groups: Vec<epb::LocalityLbEndpoints>) -> epb::ClusterLoadAssignment {
    epb::ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: groups,
        ..Default::default()
    }
}

fn group(zone: &str, weight: Option<u32>, eps: Vec<epb::LbEndpoint>) -> epb::LocalityLbEndpoints {
    epb::LocalityLbEndpoints {
        locality: Some(core::Locality {
            region: "r1".into(),
            zone: zone.into(),
            sub_zone: String::new(),
        }),
        load_balancing_weight: weight.map(u32v),
        lb_endpoints: eps,
        ..Default::default()
    }
}

fn listeners_only(ls: Vec<lpb::Listener>) -> Result<Snapshot, NackError> {
    from_resources("1", ls, vec![], vec![], vec![])
}

fn routes_only(rs: Vec<rpb::RouteConfiguration>) -> Result<Snapshot, NackError> {
    from_resources("1", vec![], rs, vec![], vec![])
}

fn clusters_only(cs: Vec<cpb::Cluster>) -> Result<Snapshot, NackError> {
    from_resources("1", vec![], vec![], cs, vec![])
}

fn nack<T: fmt::Debug>(r: Result<T, NackError>) -> String {
    r.expect_err("expected a NACK").to_string()
}

fn one_route(r: rpb::Route) -> rpb::RouteConfiguration {
    route_config("rc", vec![vhost("vh", &["*"], vec![r])])
}

fn converted_route(r: rpb::Route) -> model::Route {
    let snap = routes_only(vec![one_route(r)]).unwrap();
    snap.routes["rc"].virtual_hosts[0].routes[0].clone()
}

fn route_nack(r: rpb::Route) -> String {
    nack(routes_only(vec![one_route(r)]))
}

fn with_action(action: rpb::route::Action) -> rpb::Route {
    rpb::Route {
        action: Some(action),
        ..route_to("r", "/", "c")
    }
}

fn forward_action(ra: rpb::RouteAction) -> rpb::Route {
    let mut ra = ra;
    if ra.cluster_specifier.is_none() {
        ra.cluster_specifier = Some(rpb::route_action::ClusterSpecifier::Cluster("c".into()));
    }
    with_action(rpb::route::Action::Route(ra))
}

fn forward_of(r: rpb::Route) -> model::Forward {
    match converted_route(r).action {
        RouteAction::Forward(f) => f,
        other => panic!("not a forward: {other:?}"),
    }
}

fn with_match(m: rpb::RouteMatch) -> rpb::Route {
    rpb::Route {
        r#match: Some(m),
        ..route_to("r", "/", "c")
    }
}

fn prefix_match() -> rpb::RouteMatch {
    rpb::RouteMatch {
        path_specifier: Some(rpb::route_match::PathSpecifier::Prefix("/".into())),
        ..Default::default()
    }
}

fn header_opt(key: &str, value: &str, action: i32) -> core::HeaderValueOption {
    core::HeaderValueOption {
        header: Some(core::HeaderValue {
            key: key.into(),
            value: value.into(),
            raw_value: vec![],
        }),
        append_action: action,
        ..Default::default()
    }
}

const APPEND: i32 = core::header_value_option::HeaderAppendAction::AppendIfExistsOrAdd as i32;
const OVERWRITE: i32 = core::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32;

fn string_match(p: matcher::string_matcher::MatchPattern) -> matcher::StringMatcher {
    matcher::StringMatcher {
        ignore_case: false,
        match_pattern: Some(p),
    }
}

fn regex(r: &str) -> matcher::RegexMatcher {
    matcher::RegexMatcher {
        regex: r.into(),
        engine_type: None,
    }
}

fn header(
    name: &str,
    spec: rpb::header_matcher::HeaderMatchSpecifier,
    invert: bool,
) -> rpb::HeaderMatcher {
    rpb::HeaderMatcher {
        name: name.into(),
        invert_match: invert,
        header_match_specifier: Some(spec),
        ..Default::default()
    }
}

fn cluster_nack(c: cpb::Cluster) -> String {
    nack(clusters_only(vec![c]))
}

fn cla_nack(e: epb::ClusterLoadAssignment) -> String {
    nack(from_resources("1", vec![], vec![], vec![], vec![e]))
}

// ---------------------------------------------------------------------------
// Listeners

#[test]
fn outbound_http_listener_detects_http_and_closes_the_rest() {
    let snap = listeners_only(vec![outbound_http()]).unwrap();
    let l = &snap.listeners["outbound_http"];
    assert_eq!(l.name, "outbound_http");
    assert_eq!(l.address, "127.0.0.1:15001".parse().unwrap());
    assert_eq!(l.detect_timeout, Some(Duration::from_secs(1)));
    let h = l.http.as_ref().unwrap();
    assert_eq!(h.route_config_name, "outbound_http");
    assert_eq!(h.stat_prefix, "outbound_http");
    assert!(h.inline_routes.is_none());
    assert!(!h.websocket);
    assert!(l.tcp.is_none());
    assert_eq!(snap.versions.listeners, "1");
}

#[test]
fn inbound_listener_has_http_chain_and_default_tcp_chain() {
    let snap = listeners_only(vec![inbound()]).unwrap();
    let l = &snap.listeners["inbound"];
    assert_eq!(l.address, "0.0.0.0:15006".parse().unwrap());
    assert_eq!(l.http.as_ref().unwrap().route_config_name, "inbound");
    let tcp = l.tcp.as_ref().unwrap();
    assert_eq!(tcp.clusters.len(), 1);
    assert_eq!(tcp.clusters[0].name, "inbound|8080");
    assert_eq!(tcp.clusters[0].weight, 1);
}

#[test]
fn outbound_tcp_listener_has_no_detection() {
    let mut l = outbound_tcp();
    let t = tcp::TcpProxy {
        stat_prefix: "db".into(),
        idle_timeout: Some(dur(3600, 0)),
        cluster_specifier: Some(tcp::tcp_proxy::ClusterSpecifier::WeightedClusters(
            tcp::tcp_proxy::WeightedCluster {
                clusters: vec![
                    tcp::tcp_proxy::weighted_cluster::ClusterWeight {
                        name: "a".into(),
                        weight: 90,
                        metadata_match: None,
                    },
                    tcp::tcp_proxy::weighted_cluster::ClusterWeight {
                        name: "b".into(),
                        weight: 10,
                        metadata_match: None,
                    },
                ],
            },
        )),
        ..Default::default()
    };
    l.filter_chains = vec![plain_chain(tcp_filter(&t))];
    let snap = listeners_only(vec![l]).unwrap();
    let l = &snap.listeners["outbound_tcp|5432|db.default"];
    assert_eq!(l.detect_timeout, None);
    assert!(l.http.is_none());
    let tcp = l.tcp.as_ref().unwrap();
    assert_eq!(tcp.stat_prefix, "db");
    assert_eq!(tcp.idle_timeout, Some(Duration::from_secs(3600)));
    let weights: Vec<_> = tcp
        .clusters
        .iter()
        .map(|c| (c.name.as_str(), c.weight))
        .collect();
    assert_eq!(weights, [("a", 90), ("b", 10)]);
}

#[test]
fn hcm_options_are_converted() {
    let mut h = hcm_rds("outbound_http");
    h.upgrade_configs = vec![hcm::http_connection_manager::UpgradeConfig {
        upgrade_type: "websocket".into(),
        ..Default::default()
    }];
    let mut l = outbound_http();
    l.filter_chains = vec![http_chain(&h)];
    let snap = listeners_only(vec![l]).unwrap();
    let h = snap.listeners["outbound_http"].http.clone().unwrap();
    assert!(h.websocket);
}

#[test]
fn inline_route_config_is_converted_and_indexed() {
    let mut h = hcm_rds("unused");
    h.route_specifier = Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
        simple_routes(),
    ));
    let mut l = outbound_http();
    l.filter_chains = vec![http_chain(&h)];
    let snap = listeners_only(vec![l]).unwrap();
    let h = snap.listeners["outbound_http"].http.clone().unwrap();
    assert_eq!(h.route_config_name, "outbound_http");
    let table = h.inline_routes.unwrap();
    assert_eq!(table.virtual_hosts[0].name, "web.default:80");
    assert_eq!(table.index.exact.get("web.default:80"), Some(&0));
}

#[test]
fn http1_0_may_be_listed_with_the_required_protocols() {
    let mut l = outbound_http();
    l.filter_chains[0]
        .filter_chain_match
        .as_mut()
        .unwrap()
        .application_protocols = vec!["http/1.0".into(), "http/1.1".into(), "h2c".into()];
    assert!(listeners_only(vec![l]).is_ok());
}

#[test]
fn detection_timeout_defaults_to_envoys_15s() {
    let mut l = outbound_http();
    l.listener_filters_timeout = None;
    let snap = listeners_only(vec![l]).unwrap();
    assert_eq!(
        snap.listeners["outbound_http"].detect_timeout,
        Some(Duration::from_secs(15))
    );
}

#[test]
fn api_listeners_are_skipped_like_envoy_does() {
    let l = lpb::Listener {
        name: "web.default:80".into(),
        api_listener: Some(lpb::ApiListener {
            api_listener: Some(any(&hcm_rds("outbound_http"))),
        }),
        ..Default::default()
    };
    let snap = listeners_only(vec![l, outbound_http()]).unwrap();
    assert_eq!(snap.listeners.len(), 1);
    assert!(snap.listeners.contains_key("outbound_http"));
}

fn additional(ip: &str, port: u32) -> lpb::AdditionalAddress {
    lpb::AdditionalAddress {
        address: Some(sock(ip, port)),
        ..Default::default()
    }
}

/// A capture listener's IPv6 twin: same chains, its own socket (the set
/// binds every address; see `listener.rs`).
#[test]
fn additional_addresses_are_kept_in_order() {
    let mut l = outbound_http();
    l.additional_addresses = vec![additional("::1", 15001), additional("10.0.0.1", 15001)];
    let snap = listeners_only(vec![l]).unwrap();
    let l = &snap.listeners["outbound_http"];
    assert_eq!(l.address, "127.0.0.1:15001".parse().unwrap());
    assert_eq!(
        l.additional_addresses,
        [
            "[::1]:15001".parse::<SocketAddr>().unwrap(),
            "10.0.0.1:15001".parse().unwrap()
        ]
    );
    assert_eq!(l.addresses().count(), 3);
    // Port 0 (any free port) may repeat, as in Envoy.
    let mut l = outbound_http();
    l.address = Some(sock("127.0.0.1", 0));
    l.additional_addresses = vec![additional("127.0.0.1", 0), additional("::1", 0)];
    assert!(listeners_only(vec![l]).is_ok());
}

#[test]
fn plain_http_listener_without_detection() {
    let l = lpb::Listener {
        name: "plain".into(),
        address: Some(sock("::1", 8080)),
        filter_chains: vec![plain_chain(hcm_filter(&hcm_rds("rc")))],
        ..Default::default()
    };
    let snap = listeners_only(vec![l]).unwrap();
    let l = &snap.listeners["plain"];
    assert_eq!(l.address, "[::1]:8080".parse().unwrap());
    assert!(l.detect_timeout.is_none() && l.http.is_some() && l.tcp.is_none());
}

#[test]
fn unsupported_network_filter_is_nacked_with_its_type() {
    let mut l = inbound();
    let redis = pbuf::Any {
        type_url: "type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProxy"
            .into(),
        value: vec![],
    };
    l.filter_chains.push(plain_chain(net_filter(
        "envoy.filters.network.redis_proxy",
        redis,
    )));
    l.default_filter_chain = None;
    assert_eq!(
        nack(listeners_only(vec![l])),
        "listener \"inbound\": filter_chains[1].filters[0].typed_config: unsupported type \
         \"type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProxy\" \
         (filter \"envoy.filters.network.redis_proxy\")"
    );
}

#[test]
fn listener_nacks_name_the_field() {
    type Case = (&'static str, fn(&mut lpb::Listener));
    let cases: Vec<Case> = vec![
        ("transparent: unsupported field", |l| {
            l.transparent = Some(pbuf::BoolValue { value: true })
        }),
        (
            "filter_chains[0].filter_chain_match.destination_port: required on a use_original_dst listener",
            |l| l.use_original_dst = Some(pbuf::BoolValue { value: true }),
        ),
        ("address: required", |l| l.address = None),
        (
            "additional_addresses[0].address: 127.0.0.1:15001 is already the listener's address",
            |l| l.additional_addresses = vec![additional("127.0.0.1", 15001)],
        ),
        (
            "additional_addresses[1]: [::1]:15001 is listed twice",
            |l| {
                l.additional_addresses =
                    vec![additional("::1", 15001), additional("::1", 15001)]
            },
        ),
        (
            "additional_addresses[0].address.socket_address.address: not an IP address",
            |l| l.additional_addresses = vec![additional("localhost", 15001)],
        ),
        ("additional_addresses[0].socket_options: unsupported field", |l| {
            let mut a = additional("::1", 15001);
            a.socket_options = Some(Default::default());
            l.additional_addresses = vec![a];
        }),
        (
            "additional_addresses[0]: port 15002 differs from the address's 15001",
            |l| {
                l.use_original_dst = Some(pbuf::BoolValue { value: true });
                l.filter_chains[0]
                    .filter_chain_match
                    .as_mut()
                    .unwrap()
                    .destination_port = Some(u32v(15001));
                l.additional_addresses = vec![additional("::1", 15002)];
            },
        ),
        ("address.socket_address.address: not an IP address: \"localhost\"", |l| {
            l.address = Some(sock("localhost", 80))
        }),
        ("address.socket_address.port_value: 70000 is not a port", |l| {
            l.address = Some(sock("127.0.0.1", 70000))
        }),
        (
            "filter_chains[0].filter_chain_match.server_names: unsupported field",
            |l| {
                l.filter_chains[0]
                    .filter_chain_match
                    .as_mut()
                    .unwrap()
                    .server_names = vec!["x".into()]
            },
        ),
        (
            "filter_chains[0].filter_chain_match.application_protocols: must include \"h2c\"",
            |l| {
                l.filter_chains[0]
                    .filter_chain_match
                    .as_mut()
                    .unwrap()
                    .application_protocols = vec!["http/1.1".into()]
            },
        ),
        (
            "filter_chains[0].filter_chain_match.application_protocols[2]: unsupported value \"h2\"",
            |l| {
                l.filter_chains[0]
                    .filter_chain_match
                    .as_mut()
                    .unwrap()
                    .application_protocols
                    .push("h2".into())
            },
        ),
        (
            "filter_chains[0].filter_chain_match.application_protocols: requires the envoy.filters.listener.http_inspector",
            |l| l.listener_filters.clear(),
        ),
        ("filter_chains[0].filters[0].typed_config: unsupported type \"type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\" (filter \"envoy.filters.network.http_connection_manager\"): only envoy.filters.network.rbac may come before the terminal filter", |l| {
            let f = l.filter_chains[0].filters[0].clone();
            l.filter_chains[0].filters.push(f)
        }),
        ("filter_chains[0].transport_socket.typed_config: required", |l| {
            l.filter_chains[0].transport_socket = Some(core::TransportSocket {
                name: "tls".into(),
                config_type: None,
            })
        }),
        ("filter_chains[0].filters[0].typed_config: required", |l| {
            l.filter_chains[0].filters[0].config_type = None
        }),
        (
            "filter_chains[0].filters[0].typed_config: invalid HttpConnectionManager",
            |l| {
                if let Some(lpb::filter::ConfigType::TypedConfig(a)) =
                    &mut l.filter_chains[0].filters[0].config_type
                {
                    a.value = vec![0xff, 0xff, 0xff];
                }
            },
        ),
        (
            "filter_chains[0].filters[0]: a chain matching HTTP protocols must hold http_connection_manager",
            |l| l.filter_chains[0].filters[0] = tcp_filter(&tcp_to("c")),
        ),
        (
            "filter_chains[1].filter_chain_match: same match as filter_chains[0]",
            |l| {
                let c = l.filter_chains[0].clone();
                l.filter_chains.push(c)
            },
        ),
        (
            "filter_chains[2]: a second chain without filter_chain_match (first: filter_chains[1])",
            |l| {
                l.filter_chains.push(plain_chain(tcp_filter(&tcp_to("a"))));
                l.filter_chains.push(plain_chain(tcp_filter(&tcp_to("b"))));
            },
        ),
        (
            "filter_chains[1].filters[0]: with http_inspector, http_connection_manager must be in a chain matching",
            |l| {
                l.filter_chains.push(plain_chain(hcm_filter(&hcm_rds("x"))));
            },
        ),
        (
            "default_filter_chain.filters[0]: the default chain must hold tcp_proxy",
            |l| l.default_filter_chain = Some(plain_chain(hcm_filter(&hcm_rds("x")))),
        ),
        (
            "default_filter_chain: unreachable: filter_chains[1] already matches every connection",
            |l| {
                l.filter_chains.push(plain_chain(tcp_filter(&tcp_to("a"))));
                l.default_filter_chain = Some(plain_chain(tcp_filter(&tcp_to("b"))));
            },
        ),
        ("filter_chains: at least one filter chain", |l| {
            l.filter_chains.clear()
        }),
        (
            "listener_filters_timeout: 0 (no timeout) is not supported",
            |l| l.listener_filters_timeout = Some(dur(0, 0)),
        ),
        ("listener_filters_timeout: negative duration", |l| {
            l.listener_filters_timeout = Some(dur(-1, 0))
        }),
        ("continue_on_listener_filters_timeout: must be true", |l| {
            l.default_filter_chain = Some(plain_chain(tcp_filter(&tcp_to("b"))));
            l.continue_on_listener_filters_timeout = false;
        }),
        ("listener_filters[1]: http_inspector listed twice", |l| {
            l.listener_filters.push(inspector())
        }),
        (
            "listener_filters[0].typed_config: unsupported type \"type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst\"",
            |l| {
                l.listener_filters[0].config_type =
                    Some(lpb::listener_filter::ConfigType::TypedConfig(pbuf::Any {
                        type_url: "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst".into(),
                        value: vec![],
                    }))
            },
        ),
    ];
    for (expected, mutate) in cases {
        let mut l = outbound_http();
        mutate(&mut l);
        let msg = nack(listeners_only(vec![l]));
        assert!(
            msg.starts_with(&format!("listener \"outbound_http\": {expected}")),
            "expected {expected:?}, got {msg:?}"
        );
    }
}

#[test]
fn hcm_nacks_name_the_field() {
    type Case = (&'static str, fn(&mut hcm::HttpConnectionManager));
    let cases: Vec<Case> = vec![
        ("codec_type: only AUTO is supported", |h| {
            h.codec_type = hcm::http_connection_manager::CodecType::Http2 as i32
        }),
        ("use_remote_address: unsupported field", |h| {
            h.use_remote_address = Some(pbuf::BoolValue { value: true })
        }),
        ("strip_matching_host_port: unsupported field", |h| {
            h.strip_matching_host_port = true
        }),
        ("via: unsupported field", |h| h.via = "meshwork".into()),
        ("http_filters[0].typed_config: unsupported type \"type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\" (filter \"envoy.filters.http.router\"): only envoy.filters.http.rbac, envoy.filters.http.local_ratelimit and envoy.filters.http.fault may come before envoy.filters.http.router", |h| {
            h.http_filters.push(router_filter())
        }),
        ("http_filters[0].typed_config: unsupported type", |h| {
            h.http_filters[0].config_type =
                Some(hcm::http_filter::ConfigType::TypedConfig(pbuf::Any {
                    type_url:
                        "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
                            .into(),
                    value: vec![],
                }))
        }),
        (
            "http_filters[0].typed_config.upstream_log: unsupported field",
            |h| {
                let r = Router {
                    upstream_log: vec![Default::default()],
                    ..Default::default()
                };
                h.http_filters[0].config_type =
                    Some(hcm::http_filter::ConfigType::TypedConfig(any(&r)))
            },
        ),
        ("rds.config_source: only ads is supported", |h| {
            if let Some(hcm::http_connection_manager::RouteSpecifier::Rds(r)) =
                &mut h.route_specifier
            {
                r.config_source.as_mut().unwrap().config_source_specifier = None;
            }
        }),
        ("rds.route_config_name: required", |h| {
            if let Some(hcm::http_connection_manager::RouteSpecifier::Rds(r)) =
                &mut h.route_specifier
            {
                r.route_config_name.clear();
            }
        }),
        ("route_specifier: rds or route_config is required", |h| {
            h.route_specifier = None
        }),
        ("request_timeout: unsupported field", |h| {
            h.request_timeout = Some(dur(0, 500_000_000))
        }),
        ("common_http_protocol_options: unsupported field", |h| {
            h.common_http_protocol_options = Some(core::HttpProtocolOptions {
                idle_timeout: Some(dur(60, 0)),
                ..Default::default()
            })
        }),
        (
            "upgrade_configs[0].upgrade_type: unsupported upgrade \"CONNECT\"",
            |h| {
                h.upgrade_configs = vec![hcm::http_connection_manager::UpgradeConfig {
                    upgrade_type: "CONNECT".into(),
                    ..Default::default()
                }]
            },
        ),
        (
            "route_config.virtual_hosts[0].routes[0].match.safe_regex: invalid regex",
            |h| {
                let mut r = route_to("r", "/", "c");
                r.r#match.as_mut().unwrap().path_specifier =
                    Some(rpb::route_match::PathSpecifier::SafeRegex(regex("(")));
                h.route_specifier = Some(
                    hcm::http_connection_manager::RouteSpecifier::RouteConfig(one_route(r)),
                );
            },
        ),
    ];
    for (expected, mutate) in cases {
        let mut h = hcm_rds("outbound_http");
        mutate(&mut h);
        let mut l = outbound_http();
        l.filter_chains = vec![http_chain(&h)];
        let msg = nack(listeners_only(vec![l]));
        let full = format!(
            "listener \"outbound_http\": filter_chains[0].filters[0].typed_config.{expected}"
        );
        assert!(msg.starts_with(&full), "expected {full:?}, got {msg:?}");
    }
}

#[test]
fn tcp_proxy_nacks_name_the_field() {
    type Case = (&'static str, fn(&mut tcp::TcpProxy));
    let cases: Vec<Case> = vec![
        ("cluster: must not be empty", |t| {
            t.cluster_specifier = Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(String::new()))
        }),
        (
            "cluster_specifier: cluster or weighted_clusters is required",
            |t| t.cluster_specifier = None,
        ),
        (
            "weighted_clusters.clusters[0].weight: must be at least 1",
            |t| {
                t.cluster_specifier = Some(tcp::tcp_proxy::ClusterSpecifier::WeightedClusters(
                    tcp::tcp_proxy::WeightedCluster {
                        clusters: vec![tcp::tcp_proxy::weighted_cluster::ClusterWeight {
                            name: "a".into(),
                            weight: 0,
                            metadata_match: None,
                        }],
                    },
                ))
            },
        ),
        ("max_connect_attempts: unsupported field", |t| {
            t.max_connect_attempts = Some(u32v(3))
        }),
        ("idle_timeout: negative duration", |t| {
            t.idle_timeout = Some(dur(-3, 0))
        }),
    ];
    for (expected, mutate) in cases {
        let mut t = tcp_to("c");
        mutate(&mut t);
        let mut l = outbound_tcp();
        l.filter_chains = vec![plain_chain(tcp_filter(&t))];
        let msg = nack(listeners_only(vec![l]));
        let full = format!(
            "listener \"outbound_tcp|5432|db.default\": filter_chains[0].filters[0].typed_config.{expected}"
        );
        assert!(msg.starts_with(&full), "expected {full:?}, got {msg:?}");
    }
}

// ---------------------------------------------------------------------------
// Routes

#[test]
fn route_configuration_converts_vhosts_and_builds_the_index() {
    let rc = route_config(
        "outbound_http",
        vec![
            vhost(
                "a",
                &["a.default", "a.default:80"],
                vec![route_to("r1", "/", "ca")],
            ),
            vhost(
                "b",
                &["*.example.com", "B.Example.*"],
                vec![route_to("r2", "/", "cb")],
            ),
            vhost("any", &["*"], vec![route_to("r3", "/", "cc")]),
        ],
    );
    let snap = routes_only(vec![rc]).unwrap();
    let t = &snap.routes["outbound_http"];
    assert_eq!(t.name, "outbound_http");
    assert_eq!(t.virtual_hosts.len(), 3);
    assert_eq!(t.virtual_hosts[1].domains, ["*.example.com", "B.Example.*"]);
    assert_eq!(t.index.exact.get("a.default:80"), Some(&0));
    assert_eq!(t.index.default, Some(2));
    assert_eq!(t.index.suffixes[0].1.get(".example.com"), Some(&1));
    // Domains are indexed lower-cased.
    assert_eq!(t.index.prefixes[0].1.get("b.example."), Some(&1));
}

#[test]
fn every_path_specifier_converts() {
    use rpb::route_match::PathSpecifier as P;
    let cases = [
        (P::Prefix("/api".into()), "Prefix(\"/api\")"),
        (P::Path("/exact".into()), "Exact(\"/exact\")"),
        (
            P::PathSeparatedPrefix("/api".into()),
            "SeparatedPrefix(\"/api\")",
        ),
    ];
    for (spec, debug) in cases {
        let r = with_match(rpb::RouteMatch {
            path_specifier: Some(spec),
            ..Default::default()
        });
        assert_eq!(format!("{:?}", converted_route(r).matcher.path), debug);
    }
    let r = with_match(rpb::RouteMatch {
        path_specifier: Some(P::SafeRegex(regex("/v[0-9]+/.*"))),
        ..Default::default()
    });
    let PathMatch::Regex(re) = converted_route(r).matcher.path else {
        panic!("not a regex")
    };
    // Compiled for a full match.
    assert!(re.is_match("/v1/x"));
    assert!(!re.is_match("/api/v1/x"));
    assert!(!re.is_match("/v1"));
}

#[test]
fn header_and_query_matchers_convert() {
    use matcher::string_matcher::MatchPattern as M;
    use rpb::header_matcher::HeaderMatchSpecifier as H;
    let m = rpb::RouteMatch {
        case_sensitive: Some(pbuf::BoolValue { value: true }),
        headers: vec![
            header(
                "X-Exact",
                H::StringMatch(string_match(M::Exact("v".into()))),
                false,
            ),
            header(
                "x-prefix",
                H::StringMatch(string_match(M::Prefix("p".into()))),
                true,
            ),
            header(
                "x-suffix",
                H::StringMatch(string_match(M::Suffix("s".into()))),
                false,
            ),
            header(
                "x-contains",
                H::StringMatch(string_match(M::Contains("c".into()))),
                false,
            ),
            header(
                "x-regex",
                H::StringMatch(string_match(M::SafeRegex(regex("a+")))),
                false,
            ),
            header("x-present", H::PresentMatch(true), false),
            header("x-absent", H::PresentMatch(false), false),
            header(
                ":method",
                H::StringMatch(string_match(M::Exact("GET".into()))),
                false,
            ),
            rpb::HeaderMatcher {
                name: "x-bare".into(),
                ..Default::default()
            },
        ],
        query_parameters: vec![
            rpb::QueryParameterMatcher {
                name: "q".into(),
                query_parameter_match_specifier: Some(
                    rpb::query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                        string_match(M::Exact("1".into())),
                    ),
                ),
            },
            rpb::QueryParameterMatcher {
                name: "p".into(),
                query_parameter_match_specifier: Some(
                    rpb::query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(true),
                ),
            },
        ],
        ..prefix_match()
    };
    let got = converted_route(with_match(m)).matcher;
    let summary: Vec<String> = got
        .headers
        .iter()
        .map(|h| format!("{} {:?} {}", h.name, h.matcher, h.invert))
        .collect();
    assert_eq!(summary[0], "x-exact Exact(\"v\") false");
    assert_eq!(summary[1], "x-prefix Prefix(\"p\") true");
    assert_eq!(summary[2], "x-suffix Suffix(\"s\") false");
    assert_eq!(summary[3], "x-contains Contains(\"c\") false");
    assert!(summary[4].contains("\"^(?:a+)$\""), "{}", summary[4]);
    assert_eq!(summary[5], "x-present Present false");
    // present_match: false is presence, inverted.
    assert_eq!(summary[6], "x-absent Present true");
    assert_eq!(summary[7], "x-bare Present false");
    assert_eq!(got.headers.len(), 8);
    assert_eq!(got.pseudo_headers.len(), 1);
    assert_eq!(got.pseudo_headers[0].header, PseudoHeader::Method);
    assert!(matches!(&got.pseudo_headers[0].matcher, StringMatch::Exact(m) if m == "GET"));
    assert_eq!(got.query.len(), 2);
    assert!(matches!(&got.query[0].matcher, StringMatch::Exact(v) if v == "1"));
    assert!(matches!(got.query[1].matcher, StringMatch::Present));
}

#[test]
fn forward_action_converts_every_field() {
    use rpb::route_action::hash_policy::{self as hp, PolicySpecifier};
    let ra = rpb::RouteAction {
        cluster_specifier: Some(rpb::route_action::ClusterSpecifier::WeightedClusters(
            rpb::WeightedCluster {
                clusters: vec![
                    rpb::weighted_cluster::ClusterWeight {
                        name: "v1".into(),
                        weight: Some(u32v(80)),
                        request_headers_to_add: vec![header_opt("x-version", "v1", OVERWRITE)],
                        response_headers_to_remove: vec!["x-internal".into()],
                        ..Default::default()
                    },
                    rpb::weighted_cluster::ClusterWeight {
                        name: "v2".into(),
                        weight: Some(u32v(20)),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        )),
        timeout: Some(dur(5, 0)),
        prefix_rewrite: "/v2/".into(),
        host_rewrite_specifier: Some(rpb::route_action::HostRewriteSpecifier::HostRewriteLiteral(
            "backend.local".into(),
        )),
        request_mirror_policies: vec![
            rpb::route_action::RequestMirrorPolicy {
                cluster: "shadow".into(),
                runtime_fraction: Some(core::RuntimeFractionalPercent {
                    default_value: Some(etype::FractionalPercent {
                        numerator: 25,
                        denominator: etype::fractional_percent::DenominatorType::Hundred as i32,
                    }),
                    runtime_key: "ignored".into(),
                }),
                ..Default::default()
            },
            rpb::route_action::RequestMirrorPolicy {
                cluster: "always".into(),
                ..Default::default()
            },
        ],
        hash_policy: vec![
            rpb::route_action::HashPolicy {
                terminal: true,
                policy_specifier: Some(PolicySpecifier::Header(hp::Header {
                    header_name: "X-User".into(),
                    regex_rewrite: None,
                })),
            },
            rpb::route_action::HashPolicy {
                terminal: false,
                policy_specifier: Some(PolicySpecifier::Cookie(hp::Cookie {
                    name: "session".into(),
                    ttl: Some(dur(3600, 0)),
                    path: "/".into(),
                    attributes: vec![],
                })),
            },
            rpb::route_action::HashPolicy {
                terminal: false,
                policy_specifier: Some(PolicySpecifier::ConnectionProperties(
                    hp::ConnectionProperties { source_ip: true },
                )),
            },
        ],
        ..Default::default()
    };
    let f = forward_of(forward_action(ra));
    assert_eq!(f.clusters.len(), 2);
    assert_eq!(
        (f.clusters[0].name.as_str(), f.clusters[0].weight),
        ("v1", 80)
    );
    assert_eq!(f.clusters[0].request_headers.set[0].0, "x-version");
    assert_eq!(f.clusters[0].response_headers.remove[0], "x-internal");
    assert_eq!(
        (f.clusters[1].name.as_str(), f.clusters[1].weight),
        ("v2", 20)
    );
    assert_eq!(f.timeout, Some(Duration::from_secs(5)));
    assert_eq!(f.prefix_rewrite.as_deref(), Some("/v2/"));
    assert!(f.regex_rewrite.is_none());
    assert_eq!(f.host_rewrite.as_deref(), Some("backend.local"));
    assert_eq!(f.mirrors[0].cluster, "shadow");
    assert_eq!(f.mirrors[0].per_million, Some(250_000));
    assert_eq!(f.mirrors[1].per_million, None);
    assert!(
        matches!(&f.hash_policy[0], HashPolicy::Header { name, terminal: true } if name == "x-user")
    );
    assert!(matches!(
        &f.hash_policy[1],
        HashPolicy::Cookie { name, ttl: Some(t), path: Some(p), terminal: false }
            if name == "session" && *t == Duration::from_secs(3600) && p == "/"
    ));
    assert!(matches!(
        f.hash_policy[2],
        HashPolicy::SourceIp { terminal: false }
    ));
}

#[test]
fn single_cluster_is_weight_one_and_defaults_are_unset() {
    let f = forward_of(route_to("r", "/", "outbound|80||web.default"));
    assert_eq!(f.clusters.len(), 1);
    assert_eq!(f.clusters[0].name, "outbound|80||web.default");
    assert_eq!(f.clusters[0].weight, 1);
    assert!(f.timeout.is_none() && f.prefix_rewrite.is_none() && f.host_rewrite.is_none());
    assert!(f.mirrors.is_empty() && f.hash_policy.is_empty());
}

#[test]
fn regex_rewrite_substitution_is_converted_from_re2() {
    let ra = rpb::RouteAction {
        regex_rewrite: Some(matcher::RegexMatchAndSubstitute {
            pattern: Some(regex("^/service/([^/]+)(/.*)$")),
            substitution: "\\2/instance/\\1$\\\\".into(),
        }),
        ..Default::default()
    };
    let rr = forward_of(forward_action(ra)).regex_rewrite.unwrap();
    assert_eq!(rr.substitution, "${2}/instance/${1}$$\\");
    assert_eq!(
        rr.pattern
            .replace_all("/service/foo/v1/api", rr.substitution.as_str()),
        "/v1/api/instance/foo$\\"
    );
}

#[test]
fn fractional_percent_denominators() {
    use etype::fractional_percent::DenominatorType as D;
    let cases = [
        (1, D::Hundred, 10_000),
        (3, D::TenThousand, 300),
        (7, D::Million, 7),
        (500, D::Hundred, 1_000_000),
    ];
    for (numerator, denominator, expected) in cases {
        let p = etype::FractionalPercent {
            numerator,
            denominator: denominator as i32,
        };
        assert_eq!(per_million(&p).unwrap(), expected);
    }
}

#[test]
fn redirect_action_converts() {
    use rpb::redirect_action::{
        PathRewriteSpecifier as P, RedirectResponseCode as C, SchemeRewriteSpecifier as S,
    };
    let cases = [
        (C::MovedPermanently, 301),
        (C::Found, 302),
        (C::SeeOther, 303),
        (C::TemporaryRedirect, 307),
        (C::PermanentRedirect, 308),
    ];
    for (code, status) in cases {
        let r = with_action(rpb::route::Action::Redirect(rpb::RedirectAction {
            host_redirect: "example.com".into(),
            port_redirect: 8443,
            response_code: code as i32,
            scheme_rewrite_specifier: Some(S::HttpsRedirect(true)),
            path_rewrite_specifier: Some(P::PathRedirect("/new".into())),
            ..Default::default()
        }));
        let RouteAction::Redirect(red) = converted_route(r).action else {
            panic!("not a redirect")
        };
        assert_eq!(red.status, status);
        assert_eq!(red.scheme.as_deref(), Some("https"));
        assert_eq!(red.host.as_deref(), Some("example.com"));
        assert_eq!(red.port, Some(8443));
        assert!(matches!(red.path, Some(PathRedirect::Full(ref p)) if p == "/new"));
    }
    let r = with_action(rpb::route::Action::Redirect(rpb::RedirectAction {
        scheme_rewrite_specifier: Some(S::SchemeRedirect("http".into())),
        path_rewrite_specifier: Some(P::PrefixRewrite("/v2".into())),
        ..Default::default()
    }));
    let RouteAction::Redirect(red) = converted_route(r).action else {
        panic!("not a redirect")
    };
    assert_eq!(
        (red.status, red.scheme.as_deref(), red.host, red.port),
        (301, Some("http"), None, None)
    );
    assert!(matches!(red.path, Some(PathRedirect::Prefix(ref p)) if p == "/v2"));
}

#[test]
fn direct_response_converts() {
    let r = with_action(rpb::route::Action::DirectResponse(
        rpb::DirectResponseAction {
            status: 503,
            body: Some(core::DataSource {
                watched_directory: None,
                specifier: Some(core::data_source::Specifier::InlineString(
                    "no backends".into(),
                )),
            }),
            body_format: None,
        },
    ));
    assert!(matches!(
        converted_route(r).action,
        RouteAction::Direct { status: 503, ref body } if body == "no backends"
    ));
    let r = with_action(rpb::route::Action::DirectResponse(
        rpb::DirectResponseAction {
            status: 200,
            body: Some(core::DataSource {
                watched_directory: None,
                specifier: Some(core::data_source::Specifier::InlineBytes(b"ok".to_vec())),
            }),
            body_format: None,
        },
    ));
    assert!(matches!(
        converted_route(r).action,
        RouteAction::Direct { status: 200, ref body } if body == "ok"
    ));
}

#[test]
fn header_mods_convert_with_envoy_rules() {
    let mut keep_empty = header_opt("x-empty-kept", "", APPEND);
    keep_empty.keep_empty_value = true;
    #[allow(deprecated)]
    let legacy_overwrite = core::HeaderValueOption {
        append: Some(pbuf::BoolValue { value: false }),
        ..header_opt("x-legacy", "v", APPEND)
    };
    let raw = core::HeaderValueOption {
        header: Some(core::HeaderValue {
            key: "x-raw".into(),
            value: String::new(),
            raw_value: b"bytes".to_vec(),
        }),
        ..Default::default()
    };
    let r = rpb::Route {
        request_headers_to_add: vec![
            header_opt("X-Set", "1", OVERWRITE),
            header_opt("x-add", "50%%", APPEND),
            header_opt("x-empty-dropped", "", APPEND),
            keep_empty,
            legacy_overwrite,
            raw,
        ],
        request_headers_to_remove: vec!["X-Remove".into()],
        response_headers_to_add: vec![header_opt("x-served-by", "meshwork", APPEND)],
        response_headers_to_remove: vec!["server".into()],
        ..route_to("r", "/", "c")
    };
    let got = converted_route(r);
    let pairs = |v: &[(HeaderName, HeaderValue)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect()
    };
    let req = &got.request_headers;
    assert_eq!(
        pairs(&req.set),
        [
            ("x-set".into(), "1".into()),
            ("x-legacy".into(), "v".into())
        ]
    );
    assert_eq!(
        pairs(&req.add),
        [
            ("x-add".into(), "50%".into()),
            ("x-empty-kept".into(), String::new()),
            ("x-raw".into(), "bytes".into())
        ]
    );
    assert_eq!(req.remove, ["x-remove"]);
    assert_eq!(
        pairs(&got.response_headers.add),
        [("x-served-by".into(), "meshwork".into())]
    );
    assert_eq!(got.response_headers.remove, ["server"]);

    // Virtual host level too.
    let mut vh = vhost("vh", &["*"], vec![route_to("r", "/", "c")]);
    vh.request_headers_to_add = vec![header_opt("x-vh", "1", APPEND)];
    vh.response_headers_to_remove = vec!["x-vh-out".into()];
    let snap = routes_only(vec![route_config("rc", vec![vh])]).unwrap();
    let v = &snap.routes["rc"].virtual_hosts[0];
    assert_eq!(pairs(&v.request_headers.add), [("x-vh".into(), "1".into())]);
    assert_eq!(v.response_headers.remove, ["x-vh-out"]);
}

#[test]
fn route_nacks_name_the_field() {
    use matcher::string_matcher::MatchPattern as M;
    use rpb::header_matcher::HeaderMatchSpecifier as H;
    type Case = (&'static str, fn(&mut rpb::Route));
    let cases: Vec<Case> = vec![
        ("match.safe_regex: invalid regex: ", |r| {
            r.r#match.as_mut().unwrap().path_specifier =
                Some(rpb::route_match::PathSpecifier::SafeRegex(regex("a)|(b")))
        }),
        ("match.safe_regex: invalid regex: empty", |r| {
            r.r#match.as_mut().unwrap().path_specifier =
                Some(rpb::route_match::PathSpecifier::SafeRegex(regex("")))
        }),
        (
            "match.case_sensitive: case-insensitive path matching is not supported",
            |r| r.r#match.as_mut().unwrap().case_sensitive = Some(pbuf::BoolValue { value: false }),
        ),
        ("match.path_separated_prefix: invalid \"/api/\"", |r| {
            r.r#match.as_mut().unwrap().path_specifier = Some(
                rpb::route_match::PathSpecifier::PathSeparatedPrefix("/api/".into()),
            )
        }),
        ("match.path_specifier: one of prefix", |r| {
            r.r#match.as_mut().unwrap().path_specifier = None
        }),
        ("match.runtime_fraction: unsupported field", |r| {
            r.r#match.as_mut().unwrap().runtime_fraction = Some(Default::default())
        }),
        (
            "match.headers[0].string_match.ignore_case: unsupported field",
            |r| {
                r.r#match.as_mut().unwrap().headers = vec![header(
                    "x",
                    H::StringMatch(matcher::StringMatcher {
                        ignore_case: true,
                        match_pattern: Some(M::Exact("a".into())),
                    }),
                    false,
                )]
            },
        ),
        (
            "match.headers[0].string_match.prefix: must not be empty",
            |r| {
                r.r#match.as_mut().unwrap().headers = vec![header(
                    "x",
                    H::StringMatch(string_match(M::Prefix(String::new()))),
                    false,
                )]
            },
        ),
        (
            "match.headers[0].string_match.safe_regex: invalid regex",
            |r| {
                r.r#match.as_mut().unwrap().headers = vec![header(
                    "x",
                    H::StringMatch(string_match(M::SafeRegex(regex("[")))),
                    false,
                )]
            },
        ),
        (
            "match.headers[0].name: unsupported pseudo-header \":path\"",
            |r| {
                r.r#match.as_mut().unwrap().headers =
                    vec![header(":path", H::PresentMatch(true), false)]
            },
        ),
        (
            "match.headers[0].name: invalid header name \"bad header\"",
            |r| {
                r.r#match.as_mut().unwrap().headers =
                    vec![header("bad header", H::PresentMatch(true), false)]
            },
        ),
        ("match.headers[0].range_match: unsupported field", |r| {
            r.r#match.as_mut().unwrap().headers =
                vec![header("x", H::RangeMatch(Default::default()), false)]
        }),
        (
            "match.headers[0].treat_missing_header_as_empty: unsupported field",
            |r| {
                let mut h = header("x", H::PresentMatch(true), false);
                h.treat_missing_header_as_empty = true;
                r.r#match.as_mut().unwrap().headers = vec![h]
            },
        ),
        (
            "match.query_parameters[0].present_match: false is not supported",
            |r| {
                r.r#match.as_mut().unwrap().query_parameters = vec![rpb::QueryParameterMatcher {
                    name: "q".into(),
                    query_parameter_match_specifier: Some(
                        rpb::query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(
                            false,
                        ),
                    ),
                }]
            },
        ),
        ("match.cookies: unsupported field", |r| {
            r.r#match.as_mut().unwrap().cookies = vec![Default::default()]
        }),
        ("match: required", |r| r.r#match = None),
        (
            "action: one of route, redirect, direct_response is required",
            |r| r.action = None,
        ),
        ("decorator: unsupported field", |r| {
            r.decorator = Some(Default::default())
        }),
        (
            "route.retry_policy.per_try_idle_timeout: unsupported field",
            |r| {
                if let Some(rpb::route::Action::Route(ra)) = &mut r.action {
                    ra.retry_policy = Some(rpb::RetryPolicy {
                        per_try_idle_timeout: Some(dur(1, 0)),
                        ..Default::default()
                    });
                }
            },
        ),
        ("route.cluster: must not be empty", |r| {
            if let Some(rpb::route::Action::Route(ra)) = &mut r.action {
                ra.cluster_specifier =
                    Some(rpb::route_action::ClusterSpecifier::Cluster(String::new()));
            }
        }),
        ("route.cluster_header: unsupported field", |r| {
            if let Some(rpb::route::Action::Route(ra)) = &mut r.action {
                ra.cluster_specifier = Some(rpb::route_action::ClusterSpecifier::ClusterHeader(
                    "x".into(),
                ));
            }
        }),
        (
            "route.weighted_clusters.clusters: the sum of weights must be greater than 0",
            |r| {
                if let Some(rpb::route::Action::Route(ra)) = &mut r.action {
                    ra.cluster_specifier =
                        Some(rpb::route_action::ClusterSpecifier::WeightedClusters(
                            rpb::WeightedCluster {
                                clusters: vec![rpb::weighted_cluster::ClusterWeight {
                                    name: "a".into(),
                                    weight: Some(u32v(0)),
                                    ..Default::default()
                                }],
                                ..Default::default()
                            },
                        ));
                }
            },
        ),
        (
            "route.weighted_clusters.clusters[0].host_rewrite_specifier: unsupported field",
            |r| {
                if let Some(rpb::route::Action::Route(ra)) = &mut r.action {
                    ra.cluster_specifier = Some(rpb::route_action::ClusterSpecifier::WeightedClusters(
                    rpb::WeightedCluster {
                        clusters: vec![rpb::weighted_cluster::ClusterWeight {
                            name: "a".into(),
                            weight: Some(u32v(1)),
                            host_rewrite_specifier: Some(
                                rpb::weighted_cluster::cluster_weight::HostRewriteSpecifier::HostRewriteLiteral("h".into()),
                            ),
                            ..Default::default()
                        }],
                        ..Default::default()
                    },
                ));
                }
            },
        ),
        (
            "route.regex_rewrite: only one of prefix_rewrite and regex_rewrite",
            |r| {
                if let Some(rpb::route::Action::Route(ra)) = &mut r.action {
                    ra.prefix_rewrite = "/x".into();
                    ra.regex_rewrite = Some(matcher::RegexMatchAndSubstitute {
                        pattern: Some(regex("a")),
                        substitution: "b".into(),
                    });
                }
            },
        ),
        (
            "route.regex_rewrite.substitution: \\2 refers to a missing capture group",
            |r| {
                if let Some(rpb::route::Action::Route(ra)) = &mut r.action {
                    ra.regex_rewrite = Some(matcher::RegexMatchAndSubstitute {
                        pattern: Some(regex("/(a)")),
                        substitution: "/\\2".into(),
                    });
                }
            },
        ),
        ("route.regex_rewrite.substitution: invalid rewrite", |r| {
            if let Some(rpb::route::Action::Route(ra)) = &mut r.action {
                ra.regex_rewrite = Some(matcher::RegexMatchAndSubstitute {
                    pattern: Some(regex("/(a)")),
                    substitution: "/\\x".into(),
                });
            }
        }),
        (
            "route.prefix_rewrite: \"/a b\" is not valid in a request path",
            |r| {
                if let Some(rpb::route::Action::Route(ra)) = &mut r.action {
                    ra.prefix_rewrite = "/a b".into();
                }
            },
        ),
        ("route.timeout: negative duration", |r| {
            if let Some(rpb::route::Action::Route(ra)) = &mut r.action {
                ra.timeout = Some(dur(-1, 0));
            }
        }),
        (
            "route.request_mirror_policies[0].runtime_fraction.default_value: required",
            |r| {
                if let Some(rpb::route::Action::Route(ra)) = &mut r.action {
                    ra.request_mirror_policies = vec![rpb::route_action::RequestMirrorPolicy {
                        cluster: "m".into(),
                        runtime_fraction: Some(Default::default()),
                        ..Default::default()
                    }];
                }
            },
        ),
        (
            "route.hash_policy[0].query_parameter: unsupported field",
            |r| {
                if let Some(rpb::route::Action::Route(ra)) = &mut r.action {
                    ra.hash_policy = vec![rpb::route_action::HashPolicy {
                        terminal: false,
                        policy_specifier: Some(
                            rpb::route_action::hash_policy::PolicySpecifier::QueryParameter(
                                Default::default(),
                            ),
                        ),
                    }];
                }
            },
        ),
        ("route.auto_host_rewrite: unsupported field", |r| {
            if let Some(rpb::route::Action::Route(ra)) = &mut r.action {
                ra.host_rewrite_specifier =
                    Some(rpb::route_action::HostRewriteSpecifier::AutoHostRewrite(
                        pbuf::BoolValue { value: true },
                    ));
            }
        }),
        ("redirect.strip_query: unsupported field", |r| {
            r.action = Some(rpb::route::Action::Redirect(rpb::RedirectAction {
                strip_query: true,
                ..Default::default()
            }))
        }),
        ("redirect.response_code: unknown code 9", |r| {
            r.action = Some(rpb::route::Action::Redirect(rpb::RedirectAction {
                response_code: 9,
                ..Default::default()
            }))
        }),
        ("redirect.port_redirect: 65536 is not a port", |r| {
            r.action = Some(rpb::route::Action::Redirect(rpb::RedirectAction {
                port_redirect: 65536,
                ..Default::default()
            }))
        }),
        ("redirect.scheme_redirect: invalid scheme \"ht tp\"", |r| {
            r.action = Some(rpb::route::Action::Redirect(rpb::RedirectAction {
                scheme_rewrite_specifier: Some(
                    rpb::redirect_action::SchemeRewriteSpecifier::SchemeRedirect("ht tp".into()),
                ),
                ..Default::default()
            }))
        }),
        ("redirect.host_redirect: invalid", |r| {
            r.action = Some(rpb::route::Action::Redirect(rpb::RedirectAction {
                host_redirect: "a\r\nb".into(),
                ..Default::default()
            }))
        }),
        ("redirect.regex_rewrite: unsupported field", |r| {
            r.action = Some(rpb::route::Action::Redirect(rpb::RedirectAction {
                path_rewrite_specifier: Some(
                    rpb::redirect_action::PathRewriteSpecifier::RegexRewrite(Default::default()),
                ),
                ..Default::default()
            }))
        }),
        ("direct_response.status: 100 is not in [200, 600)", |r| {
            r.action = Some(rpb::route::Action::DirectResponse(
                rpb::DirectResponseAction {
                    status: 100,
                    ..Default::default()
                },
            ))
        }),
        (
            "direct_response.body: 5000 bytes exceed max_direct_response_body_size_bytes (4096)",
            |r| {
                r.action = Some(rpb::route::Action::DirectResponse(
                    rpb::DirectResponseAction {
                        status: 200,
                        body: Some(core::DataSource {
                            watched_directory: None,
                            specifier: Some(core::data_source::Specifier::InlineString(
                                "x".repeat(5000),
                            )),
                        }),
                        body_format: None,
                    },
                ))
            },
        ),
        ("direct_response.body.filename: unsupported field", |r| {
            r.action = Some(rpb::route::Action::DirectResponse(
                rpb::DirectResponseAction {
                    status: 200,
                    body: Some(core::DataSource {
                        watched_directory: None,
                        specifier: Some(core::data_source::Specifier::Filename(
                            "/etc/passwd".into(),
                        )),
                    }),
                    body_format: None,
                },
            ))
        }),
        (
            "request_headers_to_add[0].header.key: header \"Host\" may not be modified",
            |r| r.request_headers_to_add = vec![header_opt("Host", "x", APPEND)],
        ),
        (
            "request_headers_to_remove[0]: header \":path\" may not be modified",
            |r| r.request_headers_to_remove = vec![":path".into()],
        ),
        (
            "response_headers_to_add[0].header.value: substitution formatters",
            |r| {
                r.response_headers_to_add =
                    vec![header_opt("x-ip", "%DOWNSTREAM_REMOTE_ADDRESS%", APPEND)]
            },
        ),
        (
            "response_headers_to_add[0].header.value: invalid header value",
            |r| r.response_headers_to_add = vec![header_opt("x", "a\nb", APPEND)],
        ),
        (
            "response_headers_to_add[0].append_action: only APPEND_IF_EXISTS_OR_ADD",
            |r| {
                r.response_headers_to_add = vec![header_opt(
                    "x",
                    "1",
                    core::header_value_option::HeaderAppendAction::AddIfAbsent as i32,
                )]
            },
        ),
        (
            "response_headers_to_add[0]: append and append_action cannot both be set",
            |r| {
                #[allow(deprecated)]
                let h = core::HeaderValueOption {
                    append: Some(pbuf::BoolValue { value: true }),
                    ..header_opt("x", "1", OVERWRITE)
                };
                r.response_headers_to_add = vec![h]
            },
        ),
    ];
    for (expected, mutate) in cases {
        let mut r = route_to("r", "/", "c");
        mutate(&mut r);
        let msg = route_nack(r);
        let full = format!("route \"rc\": virtual_hosts[0].routes[0].{expected}");
        assert!(msg.starts_with(&full), "expected {full:?}, got {msg:?}");
    }
}

#[test]
fn route_configuration_nacks_name_the_field() {
    let dup = route_config(
        "rc",
        vec![
            vhost("a", &["a.default"], vec![]),
            vhost("b", &["x", "A.Default"], vec![]),
        ],
    );
    assert_eq!(
        nack(routes_only(vec![dup])),
        "route \"rc\": virtual_hosts[1].domains[1]: duplicate domain \"a.default\" (already in virtual_hosts[0])"
    );
    let two_defaults = route_config(
        "rc",
        vec![vhost("a", &["*"], vec![]), vhost("b", &["*"], vec![])],
    );
    assert!(nack(routes_only(vec![two_defaults]))
        .starts_with("route \"rc\": virtual_hosts[1].domains[0]: duplicate domain \"*\""));
    let same_suffix = route_config("rc", vec![vhost("a", &["*.a.com", "*.A.com"], vec![])]);
    assert!(nack(routes_only(vec![same_suffix])).contains("virtual_hosts[0].domains[1]"));
    let empty = route_config("rc", vec![vhost("a", &[], vec![])]);
    assert_eq!(
        nack(routes_only(vec![empty])),
        "route \"rc\": virtual_hosts[0].domains: at least one domain is required"
    );
    let mut vh_retry = vhost("a", &["*"], vec![]);
    vh_retry.retry_policy = Some(Default::default());
    assert_eq!(
        nack(routes_only(vec![route_config("rc", vec![vh_retry])])),
        "route \"rc\": virtual_hosts[0].retry_policy: unsupported field (not in meshwork's xDS subset)"
    );
    let mut rc_headers = simple_routes();
    rc_headers.request_headers_to_add = vec![header_opt("x", "1", APPEND)];
    assert!(nack(routes_only(vec![rc_headers]))
        .starts_with("route \"outbound_http\": request_headers_to_add: unsupported field"));
    let mut port_blind = simple_routes();
    port_blind.ignore_port_in_host_matching = true;
    assert!(nack(routes_only(vec![port_blind])).contains("ignore_port_in_host_matching"));
}

#[test]
fn max_direct_response_body_size_is_honoured() {
    let body = |n: usize| {
        with_action(rpb::route::Action::DirectResponse(
            rpb::DirectResponseAction {
                status: 200,
                body: Some(core::DataSource {
                    watched_directory: None,
                    specifier: Some(core::data_source::Specifier::InlineString("x".repeat(n))),
                }),
                body_format: None,
            },
        ))
    };
    let mut rc = one_route(body(6000));
    rc.max_direct_response_body_size_bytes = Some(u32v(8192));
    assert!(routes_only(vec![rc]).is_ok());
    let mut rc = one_route(body(20));
    rc.max_direct_response_body_size_bytes = Some(u32v(10));
    assert!(nack(routes_only(vec![rc])).contains("max_direct_response_body_size_bytes (10)"));
}

// ---------------------------------------------------------------------------
// Clusters

#[test]
fn eds_cluster_converts_with_meshwork_metadata() {
    let mut c = eds_cluster("outbound|80||web.default");
    c.lb_policy = cpb::cluster::LbPolicy::LeastRequest as i32;
    c.lb_config = Some(cpb::cluster::LbConfig::LeastRequestLbConfig(
        cpb::cluster::LeastRequestLbConfig {
            choice_count: Some(u32v(2)),
            ..Default::default()
        },
    ));
    let meshwork = pbuf::Struct {
        fields: [("lb", "peak_ewma"), ("service", "web.default")]
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    pbuf::Value {
                        kind: Some(pbuf::value::Kind::StringValue(v.into())),
                    },
                )
            })
            .collect(),
    };
    c.metadata = Some(core::Metadata {
        filter_metadata: [
            ("meshwork".to_string(), meshwork),
            ("istio".to_string(), pbuf::Struct::default()),
        ]
        .into_iter()
        .collect(),
        ..Default::default()
    });
    let options = uhttp::HttpProtocolOptions {
        common_http_protocol_options: Some(core::HttpProtocolOptions {
            idle_timeout: Some(dur(90, 0)),
            ..Default::default()
        }),
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
    let snap = clusters_only(vec![c]).unwrap();
    let c = &snap.clusters["outbound|80||web.default"];
    assert_eq!(c.eds_name, "outbound|80||web.default");
    assert!(c.static_endpoints.is_none());
    assert!(matches!(c.lb, LbPolicy::PeakEwma));
    assert!(c.http2);
    assert_eq!(c.idle_timeout, Some(Duration::from_secs(90)));
    assert_eq!(c.connect_timeout, Duration::from_secs(2));
    assert_eq!(c.service.as_deref(), Some("web.default"));
}

#[test]
fn eds_service_name_defaults_to_cluster_name_and_timeout_to_5s() {
    let mut c = eds_cluster("c");
    c.eds_cluster_config.as_mut().unwrap().service_name.clear();
    c.connect_timeout = None;
    let snap = clusters_only(vec![c]).unwrap();
    let c = &snap.clusters["c"];
    assert_eq!(c.eds_name, "c");
    assert_eq!(c.connect_timeout, Duration::from_secs(5));
    assert!(matches!(c.lb, LbPolicy::RoundRobin));
    assert!(!c.http2 && c.idle_timeout.is_none() && c.service.is_none());
}

#[test]
fn http1_upstream_options() {
    let mut c = eds_cluster("c");
    let options = uhttp::HttpProtocolOptions {
        upstream_protocol_options: Some(
            uhttp::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                uhttp::http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(
                        uhttp::http_protocol_options::explicit_http_config::ProtocolConfig::HttpProtocolOptions(
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
    assert!(!clusters_only(vec![c]).unwrap().clusters["c"].http2);
}

#[test]
fn every_lb_policy_converts() {
    use cpb::cluster::{LbConfig, LbPolicy as P};
    let cases: Vec<(P, Option<LbConfig>, &str)> = vec![
        (P::RoundRobin, None, "RoundRobin"),
        (P::Random, None, "Random"),
        (P::LeastRequest, None, "LeastRequest { choice_count: 2 }"),
        (
            P::LeastRequest,
            Some(LbConfig::LeastRequestLbConfig(
                cpb::cluster::LeastRequestLbConfig {
                    choice_count: Some(u32v(3)),
                    ..Default::default()
                },
            )),
            "LeastRequest { choice_count: 3 }",
        ),
        (
            P::RingHash,
            None,
            "RingHash { minimum_ring_size: 1024, maximum_ring_size: 8388608 }",
        ),
        (
            P::RingHash,
            Some(LbConfig::RingHashLbConfig(cpb::cluster::RingHashLbConfig {
                minimum_ring_size: Some(pbuf::UInt64Value { value: 64 }),
                maximum_ring_size: Some(pbuf::UInt64Value { value: 4096 }),
                hash_function: 0,
            })),
            "RingHash { minimum_ring_size: 64, maximum_ring_size: 4096 }",
        ),
        (P::Maglev, None, "Maglev { table_size: 65537 }"),
        (
            P::Maglev,
            Some(LbConfig::MaglevLbConfig(cpb::cluster::MaglevLbConfig {
                table_size: Some(pbuf::UInt64Value { value: 251 }),
            })),
            "Maglev { table_size: 251 }",
        ),
    ];
    for (policy, config, expected) in cases {
        let mut c = eds_cluster("c");
        c.lb_policy = policy as i32;
        c.lb_config = config;
        let snap = clusters_only(vec![c]).unwrap();
        assert_eq!(format!("{:?}", snap.clusters["c"].lb), expected);
    }
}

#[test]
fn static_cluster_with_inline_endpoints() {
    let c = cpb::Cluster {
        name: "inbound|8080".into(),
        cluster_discovery_type: Some(cpb::cluster::ClusterDiscoveryType::Type(
            cpb::cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(epb::ClusterLoadAssignment {
            cluster_name: String::new(),
            endpoints: vec![group("", None, vec![lb_endpoint("127.0.0.1", 8080, None)])],
            ..Default::default()
        }),
        ..Default::default()
    };
    let snap = clusters_only(vec![c]).unwrap();
    let c = &snap.clusters["inbound|8080"];
    let la = c.static_endpoints.as_ref().unwrap();
    assert_eq!(la.cluster_name, "inbound|8080");
    let eps: Vec<_> = la.endpoints().map(|e| e.address).collect();
    assert_eq!(eps, ["127.0.0.1:8080".parse::<SocketAddr>().unwrap()]);
}

#[test]
fn cluster_nacks_name_the_field() {
    type Case = (&'static str, fn(&mut cpb::Cluster));
    let cases: Vec<Case> = vec![
        ("transport_socket: unsupported field", |c| {
            c.transport_socket = Some(core::TransportSocket {
                name: "tls".into(),
                config_type: None,
            })
        }),
        ("circuit_breakers.per_host_thresholds: unsupported field", |c| {
            c.circuit_breakers = Some(cpb::CircuitBreakers {
                per_host_thresholds: vec![Default::default()],
                ..Default::default()
            })
        }),
        ("type: unsupported type STRICT_DNS (only EDS, STATIC and ORIGINAL_DST)", |c| {
            c.cluster_discovery_type = Some(cpb::cluster::ClusterDiscoveryType::Type(
                cpb::cluster::DiscoveryType::StrictDns as i32,
            ))
        }),
        ("type: unknown type 42", |c| {
            c.cluster_discovery_type = Some(cpb::cluster::ClusterDiscoveryType::Type(42))
        }),
        ("eds_cluster_config: required for type EDS", |c| c.eds_cluster_config = None),
        ("eds_cluster_config.eds_config: required", |c| {
            c.eds_cluster_config.as_mut().unwrap().eds_config = None
        }),
        ("eds_cluster_config.eds_config.resource_api_version: must be V3", |c| {
            c.eds_cluster_config
                .as_mut()
                .unwrap()
                .eds_config
                .as_mut()
                .unwrap()
                .resource_api_version = 1
        }),
        ("load_assignment: not allowed on an EDS cluster", |c| {
            c.load_assignment = Some(Default::default())
        }),
        ("connect_timeout: must be greater than 0", |c| c.connect_timeout = Some(dur(0, 0))),
        ("connect_timeout: negative duration", |c| c.connect_timeout = Some(dur(-1, 0))),
        ("lb_policy: unknown policy 4", |c| c.lb_policy = 4),
        ("lb_policy: unsupported policy CLUSTER_PROVIDED", |c| {
            c.lb_policy = cpb::cluster::LbPolicy::ClusterProvided as i32
        }),
        ("lb_config: does not apply to lb_policy ROUND_ROBIN", |c| {
            c.lb_config = Some(cpb::cluster::LbConfig::MaglevLbConfig(Default::default()))
        }),
        ("maglev_lb_config.table_size: must be a prime number", |c| {
            c.lb_policy = cpb::cluster::LbPolicy::Maglev as i32;
            c.lb_config = Some(cpb::cluster::LbConfig::MaglevLbConfig(
                cpb::cluster::MaglevLbConfig {
                    table_size: Some(pbuf::UInt64Value { value: 1000 }),
                },
            ))
        }),
        ("ring_hash_lb_config.maximum_ring_size: must be in [minimum_ring_size", |c| {
            c.lb_policy = cpb::cluster::LbPolicy::RingHash as i32;
            c.lb_config = Some(cpb::cluster::LbConfig::RingHashLbConfig(
                cpb::cluster::RingHashLbConfig {
                    minimum_ring_size: Some(pbuf::UInt64Value { value: 100 }),
                    maximum_ring_size: Some(pbuf::UInt64Value { value: 10 }),
                    hash_function: 0,
                },
            ))
        }),
        ("ring_hash_lb_config.hash_function: only XX_HASH", |c| {
            c.lb_policy = cpb::cluster::LbPolicy::RingHash as i32;
            c.lb_config = Some(cpb::cluster::LbConfig::RingHashLbConfig(
                cpb::cluster::RingHashLbConfig {
                    hash_function: 1,
                    ..Default::default()
                },
            ))
        }),
        ("least_request_lb_config.choice_count: must be at least 2", |c| {
            c.lb_policy = cpb::cluster::LbPolicy::LeastRequest as i32;
            c.lb_config = Some(cpb::cluster::LbConfig::LeastRequestLbConfig(
                cpb::cluster::LeastRequestLbConfig {
                    choice_count: Some(u32v(1)),
                    ..Default::default()
                },
            ))
        }),
        ("metadata.filter_metadata[\"meshwork\"].lb: peak_ewma requires lb_policy LEAST_REQUEST", |c| {
            c.metadata = Some(meshwork_meta("lb", "peak_ewma"))
        }),
        ("metadata.filter_metadata[\"meshwork\"].lb: unknown balancer \"fastest\"", |c| {
            c.metadata = Some(meshwork_meta("lb", "fastest"))
        }),
        ("metadata.filter_metadata[\"meshwork\"].color: unknown meshwork metadata key", |c| {
            c.metadata = Some(meshwork_meta("color", "blue"))
        }),
        ("typed_extension_protocol_options[\"envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions\"]: unsupported extension", |c| {
            c.typed_extension_protocol_options = [(
                "envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions".to_string(),
                pbuf::Any::default(),
            )]
            .into_iter()
            .collect()
        }),
        ("typed_extension_protocol_options[\"envoy.extensions.upstreams.http.v3.HttpProtocolOptions\"].upstream_protocol_options: explicit_http_config is required", |c| {
            c.typed_extension_protocol_options = [(
                HTTP_PROTOCOL_OPTIONS.to_string(),
                any(&uhttp::HttpProtocolOptions::default()),
            )]
            .into_iter()
            .collect()
        }),
        ("typed_extension_protocol_options[\"envoy.extensions.upstreams.http.v3.HttpProtocolOptions\"].explicit_http_config.http2_protocol_options: settings are not supported", |c| {
            let options = uhttp::HttpProtocolOptions {
                upstream_protocol_options: Some(
                    uhttp::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                        uhttp::http_protocol_options::ExplicitHttpConfig {
                            protocol_config: Some(
                                uhttp::http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                                    core::Http2ProtocolOptions {
                                        max_concurrent_streams: Some(u32v(10)),
                                        ..Default::default()
                                    },
                                ),
                            ),
                        },
                    ),
                ),
                ..Default::default()
            };
            c.typed_extension_protocol_options =
                [(HTTP_PROTOCOL_OPTIONS.to_string(), any(&options))].into_iter().collect()
        }),
    ];
    for (expected, mutate) in cases {
        let mut c = eds_cluster("c");
        mutate(&mut c);
        let msg = cluster_nack(c);
        let full = format!("cluster \"c\": {expected}");
        assert!(msg.starts_with(&full), "expected {full:?}, got {msg:?}");
    }
}

fn meshwork_meta(key: &str, value: &str) -> core::Metadata {
    let s = pbuf::Struct {
        fields: [(
            key.to_string(),
            pbuf::Value {
                kind: Some(pbuf::value::Kind::StringValue(value.into())),
            },
        )]
        .into_iter()
        .collect(),
    };
    core::Metadata {
        filter_metadata: [("meshwork".to_string(), s)].into_iter().collect(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------
// Endpoints

#[test]
fn load_assignment_converts_localities_and_weights() {
    let e = cla(
        "outbound|80||web.default",
        vec![
            group(
                "z1",
                Some(5),
                vec![
                    lb_endpoint("10.0.0.1", 8080, None),
                    lb_endpoint("10.0.0.2", 8080, Some(4)),
                ],
            ),
            epb::LocalityLbEndpoints {
                priority: 1,
                ..group("z2", None, vec![lb_endpoint("fd00::1", 9090, Some(3))])
            },
        ],
    );
    let snap = from_resources("7", vec![], vec![], vec![], vec![e]).unwrap();
    assert_eq!(snap.versions.endpoints, "7");
    let la = &snap.endpoints["outbound|80||web.default"];
    assert_eq!(la.localities.len(), 2);
    let z1 = &la.localities[0];
    assert_eq!(
        (z1.region.as_str(), z1.zone.as_str(), z1.weight, z1.priority),
        ("r1", "z1", 5, 0)
    );
    assert_eq!(
        z1.endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.weight))
            .collect::<Vec<_>>(),
        [
            ("10.0.0.1:8080".to_string(), 1),
            ("10.0.0.2:8080".to_string(), 4)
        ]
    );
    let z2 = &la.localities[1];
    // Unset group weight: the sum of its endpoints' weights.
    assert_eq!((z2.zone.as_str(), z2.weight, z2.priority), ("z2", 3, 1));
    assert_eq!(z2.endpoints[0].address, "[fd00::1]:9090".parse().unwrap());
    assert_eq!(la.endpoints().count(), 3);
}

#[test]
fn load_assignment_nacks_name_the_field() {
    let degraded = epb::LbEndpoint {
        health_status: core::HealthStatus::Degraded as i32,
        ..lb_endpoint("10.0.0.1", 80, None)
    };
    assert_eq!(
        cla_nack(cla("c", vec![group("z", None, vec![degraded])])),
        "endpoints \"c\": endpoints[0].lb_endpoints[0].health_status: DEGRADED is not supported (only UNKNOWN, HEALTHY, UNHEALTHY, DRAINING, TIMEOUT)"
    );
    assert_eq!(
        cla_nack(cla(
            "c",
            vec![group("z", None, vec![lb_endpoint("10.0.0.1", 80, Some(0))])]
        )),
        "endpoints \"c\": endpoints[0].lb_endpoints[0].load_balancing_weight: must be at least 1"
    );
    assert_eq!(
        cla_nack(cla("c", vec![group("z", None, vec![lb_endpoint("db.internal", 80, None)])])),
        "endpoints \"c\": endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address: not an IP address: \"db.internal\""
    );
    assert!(cla_nack(cla("c", vec![group("z", Some(0), vec![])]))
        .starts_with("endpoints \"c\": endpoints[0].load_balancing_weight: must be at least 1"));
    let named = epb::LbEndpoint {
        host_identifier: Some(epb::lb_endpoint::HostIdentifier::EndpointName("n".into())),
        ..Default::default()
    };
    assert!(
        cla_nack(cla("c", vec![group("z", None, vec![named])])).starts_with(
            "endpoints \"c\": endpoints[0].lb_endpoints[0].endpoint_name: unsupported field"
        )
    );
    let mut drops = cla("c", vec![]);
    drops.policy = Some(epb::cluster_load_assignment::Policy {
        drop_overloads: vec![Default::default()],
        ..Default::default()
    });
    assert!(
        cla_nack(drops).starts_with("endpoints \"c\": policy.drop_overloads: unsupported field")
    );
    let mut hc = lb_endpoint("10.0.0.1", 80, None);
    if let Some(epb::lb_endpoint::HostIdentifier::Endpoint(e)) = &mut hc.host_identifier {
        e.health_check_config = Some(Default::default());
    }
    assert!(cla_nack(cla("c", vec![group("z", None, vec![hc])]))
        .starts_with("endpoints \"c\": endpoints[0].lb_endpoints[0].endpoint.health_check_config: unsupported field"));
}

// ---------------------------------------------------------------------------
// Snapshots

#[test]
fn apply_replaces_only_the_types_sent() {
    let first = from_resources(
        "1",
        vec![outbound_http()],
        vec![simple_routes()],
        vec![eds_cluster("outbound|80||web.default")],
        vec![cla("outbound|80||web.default", vec![])],
    )
    .unwrap();
    let next = apply(
        &first,
        Update {
            clusters: Some(("2".into(), vec![eds_cluster("other")])),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(next.versions.clusters, "2");
    assert_eq!(next.versions.listeners, "1");
    assert_eq!(next.clusters.keys().collect::<Vec<_>>(), ["other"]);
    // Untouched types are shared, not rebuilt.
    assert!(Arc::ptr_eq(
        &first.listeners["outbound_http"],
        &next.listeners["outbound_http"]
    ));
    assert!(next.routes.contains_key("outbound_http"));
    assert!(next.endpoints.contains_key("outbound|80||web.default"));
    // An empty list removes every resource of that type.
    let emptied = apply(
        &next,
        Update {
            routes: Some(("3".into(), vec![])),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(emptied.routes.is_empty());
    assert_eq!(emptied.versions.routes, "3");
}

#[test]
fn a_bad_resource_rejects_the_whole_update() {
    let first = listeners_only(vec![outbound_http()]).unwrap();
    let mut bad = inbound();
    bad.transparent = Some(pbuf::BoolValue { value: true });
    let mut bad_cluster = eds_cluster("broken");
    bad_cluster.health_checks = vec![Default::default()];
    let err = apply(
        &first,
        Update {
            listeners: Some(("2".into(), vec![outbound_http(), bad])),
            clusters: Some(("2".into(), vec![eds_cluster("fine"), bad_cluster])),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(err.reasons.len(), 2);
    assert!(err.concerns(ResourceKind::Listener));
    assert!(err.concerns(ResourceKind::Cluster));
    assert!(!err.concerns(ResourceKind::RouteConfiguration));
    assert_eq!(
        err.to_string(),
        "listener \"inbound\": transparent: unsupported field (not in meshwork's xDS subset); \
         cluster \"broken\": health_checks[0].timeout: required"
    );
    assert_eq!(err.reasons[0].resource, "inbound");
    assert_eq!(err.reasons[0].path, "transparent");
}

#[test]
fn duplicate_and_unnamed_resources_are_nacked() {
    assert_eq!(
        nack(listeners_only(vec![outbound_http(), outbound_http()])),
        "listener \"outbound_http\": duplicate resource name"
    );
    let mut unnamed = eds_cluster("x");
    unnamed.name.clear();
    assert_eq!(
        cluster_nack(unnamed),
        "cluster \"#0\": resource name must not be empty"
    );
    assert_eq!(
        nack(from_resources(
            "1",
            vec![],
            vec![],
            vec![],
            vec![cla("c", vec![]), cla("c", vec![])]
        )),
        "endpoints \"c\": duplicate resource name"
    );
}

#[test]
fn dangling_references_are_not_errors() {
    // The HCM names a missing RouteConfiguration, the route a missing
    // cluster, the cluster has no endpoints: all resolved at request time.
    let snap = from_resources(
        "1",
        vec![outbound_http()],
        vec![route_config(
            "outbound_http",
            vec![vhost("a", &["*"], vec![route_to("r", "/", "missing")])],
        )],
        vec![eds_cluster("lonely")],
        vec![cla("no-such-cluster", vec![])],
    );
    assert!(snap.is_ok());
    let snap = from_resources("1", vec![outbound_http()], vec![], vec![], vec![]);
    assert!(snap.is_ok());
}

#[test]
fn durations_convert() {
    assert_eq!(duration(&dur(1, 500)).unwrap(), Duration::new(1, 500));
    assert_eq!(duration(&dur(0, 0)).unwrap(), Duration::ZERO);
    assert_eq!(
        duration(&dur(-1, 0)).unwrap_err().message,
        "negative duration"
    );
    assert_eq!(
        duration(&dur(1, -1)).unwrap_err().message,
        "negative duration"
    );
    assert_eq!(
        duration(&dur(MAX_DURATION_SECONDS + 1, 0))
            .unwrap_err()
            .message,
        "duration out of range"
    );
    assert_eq!(
        duration(&dur(i64::MAX, 999_999_999)).unwrap_err().message,
        "duration out of range"
    );
}

#[test]
fn type_urls_are_matched_on_the_message_name() {
    let mut a = any(&hcm_rds("x"));
    assert!(is_type::<hcm::HttpConnectionManager>(&a));
    a.type_url = "example.com/custom/prefix/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager".into();
    assert!(is_type::<hcm::HttpConnectionManager>(&a));
    a.type_url =
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager".into();
    assert!(is_type::<hcm::HttpConnectionManager>(&a));
    a.type_url = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManagerX".into();
    assert!(!is_type::<hcm::HttpConnectionManager>(&a));
}

// ---------------------------------------------------------------------------
// Robustness: arbitrary bytes never panic the conversion.

/// Flip, insert and drop random bytes of valid encodings (which reach deep
/// into the converters, unlike pure noise), plus pure noise, and convert
/// whatever still decodes.
#[test]
fn arbitrary_protobuf_bytes_never_panic() {
    let mut rng = fastrand::Rng::with_seed(0x6d65_7368_776f_726b);
    let listeners: Vec<Vec<u8>> = [outbound_http(), inbound(), outbound_tcp()]
        .iter()
        .map(Message::encode_to_vec)
        .collect();
    let mut rich = one_route(forward_action(rpb::RouteAction {
        regex_rewrite: Some(matcher::RegexMatchAndSubstitute {
            pattern: Some(regex("^/(a+)/(.*)$")),
            substitution: "/\\2/\\1".into(),
        }),
        ..Default::default()
    }));
    rich.virtual_hosts.push(vhost(
        "h",
        &["*.x.com", "y.*"],
        vec![with_match(rpb::RouteMatch {
            headers: vec![header(
                ":method",
                rpb::header_matcher::HeaderMatchSpecifier::PresentMatch(true),
                true,
            )],
            ..prefix_match()
        })],
    ));
    let routes: Vec<Vec<u8>> = [simple_routes(), rich]
        .iter()
        .map(Message::encode_to_vec)
        .collect();
    let clusters: Vec<Vec<u8>> = [eds_cluster("c")]
        .iter()
        .map(Message::encode_to_vec)
        .collect();
    let endpoints: Vec<Vec<u8>> = [cla(
        "c",
        vec![group(
            "z",
            Some(2),
            vec![lb_endpoint("10.0.0.1", 80, Some(2))],
        )],
    )]
    .iter()
    .map(Message::encode_to_vec)
    .collect();

    let mutate = |rng: &mut fastrand::Rng, seed: &[u8]| -> Vec<u8> {
        if rng.u8(..) < 16 {
            return (0..rng.usize(0..200)).map(|_| rng.u8(..)).collect();
        }
        let mut bytes = seed.to_vec();
        for _ in 0..rng.usize(1..4) {
            if bytes.is_empty() {
                break;
            }
            let i = rng.usize(..bytes.len());
            // Mostly overwrite (keeps lengths consistent, so more inputs
            // still decode); sometimes shift everything after `i`.
            match rng.u8(0..8) {
                0 => bytes.insert(i, rng.u8(..)),
                1 => {
                    bytes.remove(i);
                }
                _ => bytes[i] = rng.u8(..),
            }
        }
        bytes
    };
    let (mut decoded, mut accepted) = (0usize, 0usize);
    for _ in 0..4000 {
        let mut update = Update::default();
        let pick = rng.usize(..listeners.len());
        let l = mutate(&mut rng, &listeners[pick]);
        if let Ok(l) = lpb::Listener::decode(l.as_slice()) {
            update.listeners = Some(("v".into(), vec![l]));
            decoded += 1;
        }
        let pick = rng.usize(..routes.len());
        let r = mutate(&mut rng, &routes[pick]);
        if let Ok(r) = rpb::RouteConfiguration::decode(r.as_slice()) {
            update.routes = Some(("v".into(), vec![r]));
            decoded += 1;
        }
        let c = mutate(&mut rng, &clusters[0]);
        if let Ok(c) = cpb::Cluster::decode(c.as_slice()) {
            update.clusters = Some(("v".into(), vec![c]));
            decoded += 1;
        }
        let e = mutate(&mut rng, &endpoints[0]);
        if let Ok(e) = epb::ClusterLoadAssignment::decode(e.as_slice()) {
            update.endpoints = Some(("v".into(), vec![e]));
            decoded += 1;
        }
        // Ok or a NACK: both fine, as long as it returns.
        match apply(&Snapshot::default(), update) {
            Ok(_) => accepted += 1,
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
    // The mutations must actually exercise the converters, down to
    // accepting some of their output.
    assert!(decoded > 1000, "only {decoded} mutated resources decoded");
    assert!(accepted > 50, "only {accepted} updates accepted");
}

mod resilience;

//! Listeners: `outbound_http`, one `outbound_tcp|...` per TCP service port,
//! and `inbound` when the proxy fronts a workload.

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::listener::v3::{
    filter, listener_filter, Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{self, CodecType, UpgradeConfig},
    http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    tcp_proxy::{self, weighted_cluster::ClusterWeight},
    TcpProxy,
};

use super::clusters::socket_address;
use super::mtls::{Mtls, ALPN_H2, ALPN_HTTP1, ALPN_MESH_TCP};
use super::util::{ads_source, any, pb_duration};
use crate::resources::MtlsMode;

pub(crate) const HCM: &str = "envoy.filters.network.http_connection_manager";
pub(crate) const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
const HTTP_INSPECTOR: &str = "envoy.filters.listener.http_inspector";
const ROUTER: &str = "envoy.filters.http.router";
/// `filter_chain_match.transport_protocol` set by `tls_inspector`.
const TRANSPORT_TLS: &str = "tls";
const TRANSPORT_RAW: &str = "raw_buffer";

/// A listener that sniffs HTTP (http/1.1 or h2c) for at most `detect`, sends
/// it through an HCM fed by RDS `route_config` (with `http_filters` before
/// the router), and the rest through `tcp` (a chain of network filters
/// ending in tcp_proxy; empty: closed).
pub(crate) fn detecting(
    name: &str,
    addr: SocketAddr,
    detect: Duration,
    route_config: &str,
    http_filters: Vec<HttpFilter>,
    tcp: Vec<Filter>,
) -> Listener {
    Listener {
        name: name.to_string(),
        address: Some(socket_address(addr.ip(), u32::from(addr.port()))),
        listener_filters: vec![http_inspector()],
        listener_filters_timeout: Some(pb_duration(detect)),
        continue_on_listener_filters_timeout: true,
        filter_chains: vec![FilterChain {
            filter_chain_match: Some(FilterChainMatch {
                application_protocols: plaintext_http_protocols(),
                ..Default::default()
            }),
            filters: vec![hcm(name, route_config, http_filters)],
            ..Default::default()
        }],
        default_filter_chain: (!tcp.is_empty()).then(|| FilterChain {
            filters: tcp,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The inbound listener when the mesh enables mTLS: TLS chains (HTTP by
/// ALPN h2/http/1.1, everything else to `tcp`) terminating mTLS; in
/// permissive mode also the plaintext chains of [`detecting`] (HTTP
/// sniffed, the rest to `tcp`) behind a `tls_inspector`. `http`: the HTTP
/// filters before the router, when the service has HTTP ports.
pub(crate) fn inbound_mtls(
    mtls: &Mtls,
    addr: SocketAddr,
    detect: Duration,
    http: Option<Vec<HttpFilter>>,
    tcp: Vec<Filter>,
) -> Listener {
    let name = super::names::INBOUND;
    let permissive = mtls.mode == MtlsMode::Permissive;
    let mut listener_filters = vec![super::mtls::tls_inspector()];
    let mut filter_chains = Vec::new();
    if let Some(filters) = &http {
        filter_chains.push(FilterChain {
            filter_chain_match: Some(FilterChainMatch {
                transport_protocol: TRANSPORT_TLS.to_string(),
                application_protocols: vec![ALPN_H2.to_string(), ALPN_HTTP1.to_string()],
                ..Default::default()
            }),
            filters: vec![hcm(name, name, filters.clone())],
            transport_socket: Some(mtls.downstream(&[ALPN_H2, ALPN_HTTP1])),
            ..Default::default()
        });
    }
    filter_chains.push(FilterChain {
        filter_chain_match: Some(FilterChainMatch {
            transport_protocol: TRANSPORT_TLS.to_string(),
            ..Default::default()
        }),
        filters: tcp.clone(),
        transport_socket: Some(mtls.downstream(&[ALPN_MESH_TCP])),
        ..Default::default()
    });
    let mut default_filter_chain = None;
    if permissive {
        if let Some(filters) = http {
            listener_filters.push(http_inspector());
            filter_chains.push(FilterChain {
                filter_chain_match: Some(FilterChainMatch {
                    transport_protocol: TRANSPORT_RAW.to_string(),
                    application_protocols: plaintext_http_protocols(),
                    ..Default::default()
                }),
                filters: vec![hcm(name, name, filters)],
                ..Default::default()
            });
        }
        default_filter_chain = Some(FilterChain {
            filters: tcp,
            ..Default::default()
        });
    }
    Listener {
        name: name.to_string(),
        address: Some(socket_address(addr.ip(), u32::from(addr.port()))),
        listener_filters,
        listener_filters_timeout: Some(pb_duration(detect)),
        // Permissive: a silent client (server-first protocol) is plaintext
        // TCP. Strict: it has no chain, so it is closed.
        continue_on_listener_filters_timeout: permissive,
        filter_chains,
        default_filter_chain,
        ..Default::default()
    }
}

fn http_inspector() -> ListenerFilter {
    ListenerFilter {
        name: HTTP_INSPECTOR.to_string(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(any(
            &HttpInspector {},
        ))),
        ..Default::default()
    }
}

fn plaintext_http_protocols() -> Vec<String> {
    vec![
        "http/1.0".to_string(),
        "http/1.1".to_string(),
        "h2c".to_string(),
    ]
}

/// A plain TCP listener: every connection goes through `filters` (network
/// filters ending in tcp_proxy).
pub(crate) fn plain(name: &str, addr: SocketAddr, filters: Vec<Filter>) -> Listener {
    Listener {
        name: name.to_string(),
        address: Some(socket_address(addr.ip(), u32::from(addr.port()))),
        filter_chains: vec![FilterChain {
            filters,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn hcm(stat_prefix: &str, route_config: &str, mut http_filters: Vec<HttpFilter>) -> Filter {
    http_filters.push(HttpFilter {
        name: ROUTER.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(
            any(&Router::default()),
        )),
        ..Default::default()
    });
    let m = HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads_source()),
            route_config_name: route_config.to_string(),
        })),
        http_filters,
        upgrade_configs: vec![UpgradeConfig {
            upgrade_type: "websocket".to_string(),
            ..Default::default()
        }],
        ..Default::default()
    };
    Filter {
        name: HCM.to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(any(&m))),
    }
}

/// A `tcp_proxy` filter to `clusters` (name, weight); `cluster` when there is
/// one, `weighted_clusters` otherwise.
pub(crate) fn tcp_proxy(
    stat_prefix: &str,
    clusters: Vec<(String, u32)>,
    idle: Option<Duration>,
) -> Filter {
    let spec = if clusters.len() == 1 {
        clusters
            .into_iter()
            .next()
            .map(|(c, _)| tcp_proxy::ClusterSpecifier::Cluster(c))
    } else {
        Some(tcp_proxy::ClusterSpecifier::WeightedClusters(
            tcp_proxy::WeightedCluster {
                clusters: clusters
                    .into_iter()
                    .map(|(name, weight)| ClusterWeight {
                        name,
                        weight,
                        ..Default::default()
                    })
                    .collect(),
            },
        ))
    };
    let t = TcpProxy {
        stat_prefix: stat_prefix.to_string(),
        cluster_specifier: spec,
        idle_timeout: idle.map(pb_duration),
        ..Default::default()
    };
    Filter {
        name: TCP_PROXY.to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(any(&t))),
    }
}

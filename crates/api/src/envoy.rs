//! A static Envoy bootstrap holding the translator's output.
//!
//! Contract: [`envoy_bootstrap`] puts every listener and cluster of an
//! [`Xds`] into `static_resources`, with the same names, matches and actions,
//! changing only how they are delivered: each HTTP connection manager gets
//! its RouteConfiguration inline (`route_config`) instead of by RDS, and each
//! EDS cluster becomes STATIC with its ClusterLoadAssignment inline. The
//! result can be written as a binary `.pb` (`prost::Message::encode_to_vec`)
//! and given to `envoy --mode validate -c file.pb` or a real Envoy. The admin
//! interface listens on 127.0.0.1 only.
//!
//! Non-goals: TLS, ADS bootstraps (the control plane writes those).

use std::net::{IpAddr, Ipv4Addr};

use envoy_types::pb::envoy::config::bootstrap::v3::{bootstrap::StaticResources, Admin, Bootstrap};
use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, Listener};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use prost::Message;

use crate::translate::{Xds, HCM};

/// The whole of `xds` as a static bootstrap, admin on `127.0.0.1:admin_port`.
pub fn envoy_bootstrap(xds: &Xds, admin_port: u16) -> Bootstrap {
    Bootstrap {
        node: Some(Node {
            id: "meshwork".to_string(),
            cluster: "meshwork".to_string(),
            ..Default::default()
        }),
        admin: Some(Admin {
            address: Some(crate::translate::socket_address(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                u32::from(admin_port),
            )),
            ..Default::default()
        }),
        static_resources: Some(StaticResources {
            listeners: xds
                .listeners
                .iter()
                .map(|l| inline_listener(xds, l))
                .collect(),
            clusters: xds
                .clusters
                .iter()
                .map(|c| static_cluster(xds, c))
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn inline_listener(xds: &Xds, l: &Listener) -> Listener {
    let mut l = l.clone();
    for chain in l
        .filter_chains
        .iter_mut()
        .chain(l.default_filter_chain.iter_mut())
    {
        for f in chain.filters.iter_mut() {
            inline_routes(xds, f);
        }
    }
    l
}

/// Replaces an HCM's RDS reference by the RouteConfiguration itself.
fn inline_routes(xds: &Xds, f: &mut Filter) {
    if f.name != HCM {
        return;
    }
    let Some(filter::ConfigType::TypedConfig(any)) = &mut f.config_type else {
        return;
    };
    // Our own encoding of an HttpConnectionManager: decoding cannot fail, and
    // if it somehow did we leave the filter unchanged.
    let Ok(mut hcm) = HttpConnectionManager::decode(any.value.as_slice()) else {
        return;
    };
    if let Some(RouteSpecifier::Rds(rds)) = &hcm.route_specifier {
        let rc = xds
            .route_config(&rds.route_config_name)
            .cloned()
            .unwrap_or_else(|| RouteConfiguration {
                name: rds.route_config_name.clone(),
                ..Default::default()
            });
        hcm.route_specifier = Some(RouteSpecifier::RouteConfig(rc));
        any.value = hcm.encode_to_vec();
    }
}

fn static_cluster(xds: &Xds, c: &Cluster) -> Cluster {
    let mut c = c.clone();
    if let Some(eds) = c.eds_cluster_config.take() {
        let name = if eds.service_name.is_empty() {
            c.name.clone()
        } else {
            eds.service_name
        };
        let cla = xds
            .load_assignment(&name)
            .cloned()
            .unwrap_or_else(|| ClusterLoadAssignment {
                cluster_name: name.clone(),
                ..Default::default()
            });
        c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        ));
        c.load_assignment = Some(ClusterLoadAssignment {
            cluster_name: c.name.clone(),
            ..cla
        });
    }
    c
}

//! Listeners for proxyless gRPC clients (`xds:///NAME` targets).
//!
//! Contract: a gRPC channel to `xds:///NAME` asks the control plane for a
//! Listener named exactly `NAME` holding an `api_listener`: an
//! HttpConnectionManager whose routes come by RDS over ADS and whose only
//! HTTP filter is the router. The client then picks, in that
//! RouteConfiguration, the virtual host whose domains contain `NAME`. The
//! outbound RouteConfiguration (`outbound_http`) already carries every
//! host-name form of every service port (`svc`, `svc.ns`, `svc.ns:port`,
//! ...) in its virtual hosts, so the control plane can serve it whole, or
//! cut to the virtual host of `NAME` under another name.
//!
//! Non-goals: deciding which names exist (the control plane checks the name
//! against the route configuration's domains), binding an address (an API
//! listener has none), and gRPC-specific filters (fault, RBAC).

use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{self, CodecType},
    http_filter, HttpConnectionManager, HttpFilter, Rds,
};

use super::util::{ads_source, any};

/// A Listener named `name` with an `api_listener` for proxyless gRPC:
/// HttpConnectionManager, routes by RDS over ADS from the RouteConfiguration
/// `route_config` (e.g. [`crate::names::OUTBOUND_HTTP`]), the router filter.
pub fn grpc_api_listener(name: &str, route_config: &str) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: name.to_string(),
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads_source()),
            route_config_name: route_config.to_string(),
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".to_string(),
            config_type: Some(http_filter::ConfigType::TypedConfig(
                any(&Router::default()),
            )),
            ..Default::default()
        }],
        ..Default::default()
    };
    Listener {
        name: name.to_string(),
        api_listener: Some(ApiListener {
            api_listener: Some(any(&hcm)),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use prost::Message;

    #[test]
    fn api_listener_routes_by_rds_over_ads_through_the_router() {
        let l = grpc_api_listener("catalog.shop:50051", "outbound_http");
        assert_eq!(l.name, "catalog.shop:50051");
        assert!(l.address.is_none() && l.filter_chains.is_empty());
        let any = l.api_listener.unwrap().api_listener.unwrap();
        assert!(any.type_url.ends_with("HttpConnectionManager"));
        let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
        let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = hcm.route_specifier else {
            panic!("expected RDS");
        };
        assert_eq!(rds.route_config_name, "outbound_http");
        assert!(rds.config_source.unwrap().config_source_specifier.is_some());
        assert_eq!(hcm.http_filters.len(), 1);
        assert_eq!(hcm.http_filters[0].name, "envoy.filters.http.router");
    }
}

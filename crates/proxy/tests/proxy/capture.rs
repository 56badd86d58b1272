//! Transparent capture config: the translator's capture output (outbound
//! listener with `use_original_dst`, unbound VIP listeners, passthrough and
//! blackhole clusters) is accepted and understood; what the proxy cannot
//! honour is refused with the field named. The data path through real
//! iptables is tested in the `meshwork` binary's tests (`cli/capture.rs`),
//! which run the proxy inside a network namespace.

use std::time::Duration;

use api::ProxyContext;
use proxy::config::model::Snapshot;
use proxy::config::xds::from_resources;

const MESH: &str = "\
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {name: web}
spec:
  vip: 240.240.7.1
  ports: [{name: http, port: 80, appProtocol: http}]
---
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {name: echo}
spec:
  vip: 240.240.7.2
  ports: [{name: tcp, port: 7000, appProtocol: tcp, localPort: 0}]
";

fn capture_xds(extra: &str) -> api::Xds {
    let text = format!("{MESH}{extra}");
    let mesh = api::validate(api::load_str("mesh.yaml", &text).unwrap()).unwrap();
    let ctx = ProxyContext {
        outbound_addr: "127.0.0.1:15001".parse().unwrap(),
        detect_timeout: Duration::from_millis(300),
        capture: true,
        ..Default::default()
    };
    api::translate(&mesh, &ctx)
}

fn decode(x: api::Xds) -> Result<Snapshot, String> {
    from_resources("1", x.listeners, x.routes, x.clusters, x.endpoints).map_err(|e| e.to_string())
}

#[test]
fn the_capture_output_is_accepted_and_understood() {
    let s = decode(capture_xds("")).unwrap();
    let out = &s.listeners["outbound_http"];
    assert!(out.use_original_dst && out.bind_to_port);
    assert!(out.http.is_some(), "explicit HTTP still served");
    let default = out
        .captured_default
        .as_ref()
        .expect("captured default chain");
    assert_eq!(default.clusters[0].name, "PassthroughCluster");
    assert!(s.clusters["PassthroughCluster"].original_dst);
    assert!(!s.clusters["BlackHoleCluster"].original_dst);

    let web = &s.listeners["240.240.7.1_80"];
    assert!(!web.bind_to_port && !web.use_original_dst);
    assert_eq!(web.address, "240.240.7.1:80".parse().unwrap());
    assert!(web.http.is_some());
    let meta = web.service.as_ref().unwrap();
    assert_eq!(meta.service, "web.default");
    assert_eq!(meta.hostnames, ["web", "web.default", "web.default.svc"]);

    let echo = &s.listeners["240.240.7.2_7000"];
    assert!(!echo.bind_to_port);
    assert_eq!(
        echo.tcp.as_ref().unwrap().clusters[0].name,
        "outbound|7000||echo.default"
    );
}

#[test]
fn registry_only_blackholes_captured_connections() {
    let s = decode(capture_xds(
        "---\napiVersion: meshwork.dev/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n",
    ))
    .unwrap();
    let default = s.listeners["outbound_http"]
        .captured_default
        .clone()
        .unwrap();
    assert_eq!(default.clusters[0].name, "BlackHoleCluster");
}

#[test]
fn what_the_proxy_cannot_honour_is_refused_by_field() {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy;

    // A chain of a use_original_dst listener must be scoped to its own port.
    let mut x = capture_xds("");
    let out = x
        .listeners
        .iter_mut()
        .find(|l| l.name == "outbound_http")
        .unwrap();
    out.filter_chains[0]
        .filter_chain_match
        .as_mut()
        .unwrap()
        .destination_port = None;
    let e = decode(x).unwrap_err();
    assert!(
        e.contains("filter_chains[0].filter_chain_match.destination_port"),
        "{e}"
    );

    // ...and only there.
    let mut x = capture_xds("");
    let web = x
        .listeners
        .iter_mut()
        .find(|l| l.name == "240.240.7.1_80")
        .unwrap();
    web.filter_chains[0]
        .filter_chain_match
        .as_mut()
        .unwrap()
        .destination_port = Some(envoy_types::pb::google::protobuf::UInt32Value { value: 80 });
    let e = decode(x).unwrap_err();
    assert!(
        e.contains("only supported on a use_original_dst listener"),
        "{e}"
    );

    // ORIGINAL_DST needs CLUSTER_PROVIDED.
    let mut x = capture_xds("");
    let p = x
        .clusters
        .iter_mut()
        .find(|c| c.name == "PassthroughCluster")
        .unwrap();
    p.lb_policy = LbPolicy::RoundRobin as i32;
    let e = decode(x).unwrap_err();
    assert!(e.contains("CLUSTER_PROVIDED"), "{e}");

    // An unbound listener cannot be the capture listener.
    let mut x = capture_xds("");
    let out = x
        .listeners
        .iter_mut()
        .find(|l| l.name == "outbound_http")
        .unwrap();
    out.bind_to_port = Some(envoy_types::pb::google::protobuf::BoolValue { value: false });
    let e = decode(x).unwrap_err();
    assert!(e.contains("bind_to_port"), "{e}");
}

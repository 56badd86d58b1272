//! The xDS server against real clients: Envoy (SotW ADS), a proxyless
//! grpcio client (`xds:///NAME`), and raw tonic clients for the protocol
//! corners (ACK/NACK tracking, delta, malformed requests).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use api::Mesh;
use control::registry::Registry;
use control::xds::XdsServer;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
    DiscoveryRequest,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// Long enough for Envoy to start on a loaded 2-core machine; tests poll
/// for the behaviour and only fail when it never comes.
const PATIENCE: Duration = Duration::from_secs(30);

fn mesh(yaml: &str) -> Arc<Mesh> {
    let resources = api::load_str("test.yaml", yaml).unwrap();
    Arc::new(api::validate(resources).unwrap_or_else(|e| panic!("{e}")))
}

/// A control plane (xDS part) on 127.0.0.1:0.
struct Cp {
    addr: SocketAddr,
    mesh: watch::Sender<Arc<Mesh>>,
    server: XdsServer,
    _stop: oneshot::Sender<()>,
}

impl Cp {
    async fn start(yaml: &str) -> Cp {
        Cp::start_with_grace(yaml, Duration::from_secs(30)).await
    }

    async fn start_with_grace(yaml: &str, grace: Duration) -> Cp {
        let (tx, rx) = watch::channel(mesh(yaml));
        let server = XdsServer::new(rx, Registry::new(grace));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let s = server.clone();
        tokio::spawn(async move {
            s.serve(listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Cp {
            addr,
            mesh: tx,
            server,
            _stop: stop,
        }
    }

    fn set(&self, yaml: &str) {
        self.mesh.send_replace(mesh(yaml));
    }

    async fn client(&self) -> AggregatedDiscoveryServiceClient<Channel> {
        AggregatedDiscoveryServiceClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    /// Polls the status JSON until `pred` holds.
    async fn status_until(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let s = self.server.status_json();
            if pred(&s) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: status never matched:\n{s:#}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn node(id: &str) -> Node {
    Node {
        id: id.to_string(),
        cluster: "test".to_string(),
        ..Default::default()
    }
}

fn two_services(port_a: u16, port_b: u16) -> String {
    format!(
        r#"
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {{name: web}}
spec:
  ports: [{{name: http, port: 80}}]
---
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {{name: web-v2}}
spec:
  ports: [{{name: http, port: 80}}]
---
apiVersion: meshwork.dev/v1alpha1
kind: Workload
metadata: {{name: web-0}}
spec: {{service: web, address: 127.0.0.1, ports: {{http: {port_a}}}}}
---
apiVersion: meshwork.dev/v1alpha1
kind: Workload
metadata: {{name: web-v2-0}}
spec: {{service: web-v2, address: 127.0.0.1, ports: {{http: {port_b}}}}}
"#
    )
}

const ROUTE_TO_V2: &str = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-to-v2}
spec:
  parentRefs: [{kind: Service, group: "", name: web, port: 80}]
  rules:
  - backendRefs: [{name: web-v2, port: 80}]
"#;

// ------------------------------------------------------------------ Envoy

/// The Envoy binary (`$MESHWORK_ENVOY`, set by `scripts/test.sh`).
fn envoy_binary() -> PathBuf {
    match std::env::var_os("MESHWORK_ENVOY") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "MESHWORK_ENVOY is not set: run ./scripts/test.sh, or `eval \"$(./scripts/test.sh --env)\"`"
        ),
    }
}

/// A running Envoy, killed on drop; its log is kept for failure messages.
struct Envoy {
    child: Child,
    log: PathBuf,
    config: PathBuf,
}

impl Envoy {
    /// Envoy bootstrapped to `xds` over ADS (`api_type` GRPC or DELTA_GRPC),
    /// node `id`, its outbound listener on `outbound`.
    fn start(xds: SocketAddr, api_type: &str, id: &str, outbound: SocketAddr) -> Envoy {
        let bootstrap = format!(
            r#"
node:
  id: {id}
  cluster: test
  metadata:
    outbound_addr: "{outbound}"
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services:
    - envoy_grpc: {{cluster_name: xds}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: {port}}}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
"#,
            port = xds.port()
        );
        let base =
            std::env::temp_dir().join(format!("meshwork-control-xds-{}-{id}", std::process::id()));
        let config = base.with_extension("yaml");
        let log = base.with_extension("log");
        std::fs::write(&config, bootstrap).unwrap();
        let envoy = envoy_binary();
        let child = Command::new(&envoy)
            .args(["--disable-hot-restart", "-l", "warning", "--log-path"])
            .arg(&log)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run Envoy {envoy:?}: {e}; run ./scripts/test.sh"));
        Envoy { child, log, config }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::remove_file(&self.config).ok();
        std::fs::remove_file(&self.log).ok();
    }
}

/// GET `/` with `Host: host` through `addr` on a fresh connection; the
/// answering backend's name.
async fn backend_via(addr: SocketAddr, host: &str) -> Option<String> {
    let mut c = testkit::H1Client::connect(addr).await.ok()?;
    let reply = c.get(host, "/").await.ok()?;
    reply.backend().map(str::to_string)
}

/// Polls requests through Envoy until `host` is served by `want`.
async fn until_served(envoy: &Envoy, addr: SocketAddr, host: &str, want: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let got = backend_via(addr, host).await;
        if got.as_deref() == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Envoy never routed {host} to {want} (last: {got:?}); Envoy log:\n{}",
            envoy.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn envoy_follows_a_route_change(api_type: &str, id: &str) {
    let web = testkit::Backend::http("web-0").await;
    let v2 = testkit::Backend::http("web-v2-0").await;
    let services = two_services(web.port(), v2.port());
    let cp = Cp::start(&services).await;
    let outbound: SocketAddr = format!("127.0.0.1:{}", testkit::free_port())
        .parse()
        .unwrap();
    let envoy = Envoy::start(cp.addr, api_type, id, outbound);

    until_served(&envoy, outbound, "web", "web-0").await;
    until_served(&envoy, outbound, "web-v2.default:80", "web-v2-0").await;

    // The route change reaches Envoy and changes live traffic.
    cp.set(&(services + ROUTE_TO_V2));
    until_served(&envoy, outbound, "web", "web-v2-0").await;

    // Envoy ACKed every type it was sent, and NACKed nothing.
    cp.status_until("Envoy in sync", |s| {
        let Some(p) = s.as_array().and_then(|a| a.iter().find(|p| p["id"] == id)) else {
            return false;
        };
        ["clusters", "endpoints", "listeners", "routes"]
            .iter()
            .all(|t| p["types"][t]["in_sync"] == true && p["types"][t]["last_nack"].is_null())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_sotw_routes_to_workloads_and_follows_a_route_change() {
    envoy_follows_a_route_change("GRPC", "envoy-sotw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_delta_routes_to_workloads_and_follows_a_route_change() {
    envoy_follows_a_route_change("DELTA_GRPC", "envoy-delta").await;
}

// ------------------------------------------------------------------ proxyless gRPC

/// A Python peer (`tests/peers/xds_peer.py`); closing its stdin (on drop)
/// ends it. Its stdout lines arrive on `lines`.
struct Py {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Py {
    fn start(args: &[&str], env: &[(&str, &std::path::Path)]) -> Py {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/xds_peer.py");
        let mut cmd = Command::new(testkit::python());
        cmd.arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Py { child, lines }
    }

    async fn line(&mut self) -> String {
        tokio::time::timeout(PATIENCE, self.lines.recv())
            .await
            .expect("python peer said nothing")
            .expect("python peer exited")
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn health_server(name: &str) -> (Py, u16) {
    let mut p = Py::start(&["server", name], &[]);
    let port = p.line().await.trim().parse().unwrap();
    (p, port)
}

fn greeter(workload: &str, port: u16) -> String {
    format!(
        r#"
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {{name: greeter}}
spec:
  ports: [{{name: grpc, port: 50051, appProtocol: grpc}}]
---
apiVersion: meshwork.dev/v1alpha1
kind: Workload
metadata: {{name: greeter-{workload}}}
spec: {{service: greeter, address: 127.0.0.1, ports: {{grpc: {port}}}}}
"#
    )
}

/// Reads the client's rounds until one was served by `want`.
async fn until_grpc_served(client: &mut Py, want: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        let line = client.line().await;
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["serving"] == want {
            return;
        }
        last = line;
    }
    panic!("the grpcio client never reached backend {want}; last round: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_client_on_xds_target_follows_an_endpoint_change() {
    let (_a, port_a) = health_server("a").await;
    let (_b, port_b) = health_server("b").await;
    let cp = Cp::start(&greeter("a", port_a)).await;
    let bootstrap = std::env::temp_dir().join(format!(
        "meshwork-control-xds-{}-grpc-bootstrap.json",
        std::process::id()
    ));
    std::fs::write(
        &bootstrap,
        serde_json::json!({
            "xds_servers": [{
                "server_uri": cp.addr.to_string(),
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }],
            "node": {"id": "grpc-client", "cluster": "test", "locality": {"zone": "z1"}},
        })
        .to_string(),
    )
    .unwrap();
    let mut client = Py::start(
        &["client", "xds:///greeter", "a,b"],
        &[("GRPC_XDS_BOOTSTRAP", bootstrap.as_path())],
    );
    until_grpc_served(&mut client, "a").await;

    // The workload moves: the client follows the new endpoint.
    cp.set(&greeter("b", port_b));
    until_grpc_served(&mut client, "b").await;

    cp.status_until("grpc client in sync", |s| {
        let Some(p) = s
            .as_array()
            .and_then(|a| a.iter().find(|p| p["id"] == "grpc-client"))
        else {
            return false;
        };
        p["proxyless"] == true
            && ["clusters", "endpoints", "listeners", "routes"]
                .iter()
                .all(|t| p["types"][t]["in_sync"] == true && p["types"][t]["last_nack"].is_null())
    })
    .await;
    let detail = cp.server.proxy_json("grpc-client").unwrap();
    assert_eq!(
        detail["types"]["listeners"]["resources"][0]["name"],
        "greeter"
    );
    std::fs::remove_file(&bootstrap).ok();
}

// ------------------------------------------------------------------ raw clients

#[tokio::test]
async fn nack_reason_shows_in_status_and_a_later_ack_records_the_version() {
    let cp = Cp::start(&two_services(1001, 1002)).await;
    let mut client = cp.client().await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(DiscoveryRequest {
        node: Some(node("raw-1")),
        type_url: CDS.to_string(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = responses.message().await.unwrap().unwrap();
    assert_eq!(first.type_url, CDS);
    assert_eq!(first.resources.len(), 2, "two service ports, two clusters");
    assert!(!first.nonce.is_empty() && !first.version_info.is_empty());

    // NACK it: the reason must be visible, nothing acked yet.
    tx.send(DiscoveryRequest {
        type_url: CDS.to_string(),
        response_nonce: first.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "cluster \"outbound|80||web.default\": lb_policy: not supported here"
                .to_string(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    cp.status_until("NACK recorded", |s| {
        s[0]["id"] == "raw-1"
            && s[0]["types"]["clusters"]["last_nack"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("lb_policy: not supported here"))
            && s[0]["types"]["clusters"]["acked_version"].is_null()
    })
    .await;

    // A change to the mesh produces a new CDS push (web-v2 gone: one cluster)...
    cp.set(
        &two_services(1001, 1002)
            .split("---")
            .filter(|d| !d.contains("web-v2"))
            .collect::<Vec<_>>()
            .join("---"),
    );
    let second = responses.message().await.unwrap().unwrap();
    assert_eq!(second.resources.len(), 1);
    assert_ne!(second.version_info, first.version_info);
    // ...which the proxy ACKs: acked version recorded, last NACK kept.
    tx.send(DiscoveryRequest {
        type_url: CDS.to_string(),
        version_info: second.version_info.clone(),
        response_nonce: second.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let v = second.version_info.clone();
    cp.status_until("ACK recorded", |s| {
        s[0]["types"]["clusters"]["acked_version"] == v.as_str()
            && s[0]["types"]["clusters"]["in_sync"] == true
            && !s[0]["types"]["clusters"]["last_nack"].is_null()
    })
    .await;
    let detail = cp.server.proxy_json("raw-1").unwrap();
    assert_eq!(
        detail["types"]["clusters"]["resources"][0]["name"],
        "outbound|80||web.default"
    );
    assert!(cp.server.proxy_json("nobody").is_none());

    // The stream ends: the proxy disappears from the status.
    drop(tx);
    drop(responses);
    cp.status_until("disconnect", |s| s.as_array().is_some_and(|a| a.is_empty()))
        .await;
}

#[tokio::test]
async fn delta_sends_only_changed_resources_and_removals() {
    let cp = Cp::start(&two_services(1001, 1002)).await;
    let mut client = cp.client().await;
    let (tx, rx) = mpsc::channel(8);
    let names = vec![
        "outbound|80||web.default".to_string(),
        "outbound|80||web-v2.default".to_string(),
    ];
    tx.send(DeltaDiscoveryRequest {
        node: Some(node("delta-1")),
        type_url: EDS.to_string(),
        resource_names_subscribe: names.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut responses = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = responses.message().await.unwrap().unwrap();
    let mut got: Vec<&str> = first.resources.iter().map(|r| r.name.as_str()).collect();
    got.sort();
    assert_eq!(
        got,
        vec!["outbound|80||web-v2.default", "outbound|80||web.default"]
    );
    tx.send(DeltaDiscoveryRequest {
        type_url: EDS.to_string(),
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Only web's endpoint moves: only web's assignment is sent.
    cp.set(&two_services(2001, 1002));
    let second = responses.message().await.unwrap().unwrap();
    assert_eq!(second.resources.len(), 1, "{second:?}");
    assert_eq!(second.resources[0].name, "outbound|80||web.default");
    let cla = ClusterLoadAssignment::decode(
        second.resources[0]
            .resource
            .as_ref()
            .unwrap()
            .value
            .as_slice(),
    )
    .unwrap();
    let text = format!("{cla:?}");
    assert!(text.contains("2001"), "{text}");
    assert!(second.removed_resources.is_empty());

    // web-v2 disappears: its assignment is removed.
    cp.set(
        &two_services(2001, 1002)
            .split("---")
            .filter(|d| !d.contains("web-v2"))
            .collect::<Vec<_>>()
            .join("---"),
    );
    let third = responses.message().await.unwrap().unwrap();
    assert!(third.resources.is_empty());
    assert_eq!(third.removed_resources, vec!["outbound|80||web-v2.default"]);
    let status = cp.server.status_json();
    assert_eq!(status[0]["protocol"], "delta");

    // A reconnecting client that declares what it holds gets nothing again.
    let held = second.resources[0].clone();
    let (tx2, rx2) = mpsc::channel(8);
    tx2.send(DeltaDiscoveryRequest {
        node: Some(node("delta-1")),
        type_url: EDS.to_string(),
        resource_names_subscribe: vec![held.name.clone()],
        initial_resource_versions: [(held.name.clone(), held.version.clone())].into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut again = cp
        .client()
        .await
        .delta_aggregated_resources(ReceiverStream::new(rx2))
        .await
        .unwrap()
        .into_inner();
    let fresh = again.message().await.unwrap().unwrap();
    assert!(fresh.resources.is_empty(), "{fresh:?}");
    assert!(fresh.removed_resources.is_empty());
}

#[tokio::test]
async fn unknown_type_urls_and_missing_nodes_get_a_clear_error() {
    let cp = Cp::start(&two_services(1001, 1002)).await;
    for (req, expect) in [
        (
            DiscoveryRequest {
                node: Some(node("x")),
                // Extension config discovery (ECDS): not served.
                type_url: "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
                    .to_string(),
                ..Default::default()
            },
            "unknown type URL",
        ),
        (
            DiscoveryRequest {
                node: Some(node("x")),
                ..Default::default()
            },
            "type_url is required",
        ),
        (
            DiscoveryRequest {
                type_url: CDS.to_string(),
                ..Default::default()
            },
            "must carry node.id",
        ),
        (
            DiscoveryRequest {
                node: Some(Node {
                    metadata: Some(Struct {
                        fields: [
                            ("service".to_string(), sv("web")),
                            ("address".to_string(), sv("not-an-ip")),
                        ]
                        .into(),
                    }),
                    ..node("web-9.default")
                }),
                type_url: CDS.to_string(),
                ..Default::default()
            },
            "metadata.address: \"not-an-ip\" is not an IP address",
        ),
    ] {
        let mut client = cp.client().await;
        let (tx, rx) = mpsc::channel(1);
        tx.send(req).await.unwrap();
        let mut responses = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let err = responses.message().await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains(expect), "{}", err.message());
        if expect == "unknown type URL" {
            assert!(err.message().contains(CDS), "lists what is served");
        }
    }
}

#[tokio::test]
async fn undecodable_requests_get_a_clear_error_and_the_server_keeps_serving() {
    let cp = Cp::start(&two_services(1001, 1002)).await;
    let channel = Channel::from_shared(format!("http://{}", cp.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // 0xff... is not a valid protobuf tag; 5 MiB is over the request limit.
    for (garbage, expect) in [
        (vec![0xffu8, 0xff, 0xff, 0xff], "malformed xDS request"),
        (vec![0u8; 5 << 20], "malformed xDS request"),
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
        );
        let result = grpc
            .streaming(
                tonic::Request::new(tokio_stream::iter(vec![garbage])),
                path,
                raw::RawCodec,
            )
            .await;
        let err = match result {
            Err(e) => e,
            Ok(resp) => resp.into_inner().message().await.unwrap_err(),
        };
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(expect), "{}", err.message());
    }

    // Still serving.
    let mut client = cp.client().await;
    let (tx, rx) = mpsc::channel(1);
    tx.send(DiscoveryRequest {
        node: Some(node("after")),
        type_url: CDS.to_string(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        responses.message().await.unwrap().unwrap().resources.len(),
        2
    );
}

fn sv(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

/// A SotW stream subscribed to `type_url` (`names`: none = wildcard).
async fn subscribe(
    cp: &Cp,
    node: Node,
    type_url: &str,
    names: &[&str],
) -> (
    mpsc::Sender<DiscoveryRequest>,
    tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse>,
) {
    let (tx, rx) = mpsc::channel(8);
    tx.send(DiscoveryRequest {
        node: Some(node),
        type_url: type_url.to_string(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let responses = cp
        .client()
        .await
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, responses)
}

fn names_of(r: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .map(|a| match a.type_url.as_str() {
            CDS => {
                envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(a.value.as_slice())
                    .unwrap()
                    .name
            }
            EDS => {
                ClusterLoadAssignment::decode(a.value.as_slice())
                    .unwrap()
                    .cluster_name
            }
            _ => {
                envoy_types::pb::envoy::config::listener::v3::Listener::decode(a.value.as_slice())
                    .unwrap()
                    .name
            }
        })
        .collect()
}

fn endpoint_count(r: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse) -> usize {
    r.resources
        .iter()
        .map(|a| {
            ClusterLoadAssignment::decode(a.value.as_slice())
                .unwrap()
                .endpoints
                .iter()
                .map(|g| g.lb_endpoints.len())
                .sum::<usize>()
        })
        .sum()
}

#[tokio::test]
async fn a_connected_proxy_registers_its_workload_until_the_grace_period_ends() {
    let cp = Cp::start_with_grace(&two_services(1001, 1002), Duration::from_millis(200)).await;
    // An observer watching web's endpoints: the static web-0 only.
    let (_otx, mut observer) =
        subscribe(&cp, node("observer"), EDS, &["outbound|80||web.default"]).await;
    assert_eq!(
        endpoint_count(&observer.message().await.unwrap().unwrap()),
        1
    );

    // A sidecar of web joins, saying it only calls web-v2.
    let mut sidecar = node("web-1.default");
    sidecar.metadata = Some(Struct {
        fields: [
            ("service", sv("web")),
            ("namespace", sv("default")),
            ("address", sv("127.0.0.2")),
            ("app_port", sv("8080")),
            ("upstreams", sv("web-v2")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    });
    let (stx, mut cds) = subscribe(&cp, sidecar, CDS, &[]).await;
    // Its workload reaches the observer: two endpoints now.
    let update = observer.message().await.unwrap().unwrap();
    assert_eq!(endpoint_count(&update), 2);

    // The sidecar's clusters are scoped: what it calls, and its inbound side.
    let mut clusters = names_of(&cds.message().await.unwrap().unwrap());
    if !clusters.iter().any(|c| c.starts_with("inbound|")) {
        // The first answer came before its registration was merged.
        clusters = names_of(&cds.message().await.unwrap().unwrap());
    }
    clusters.sort();
    assert_eq!(
        clusters,
        vec!["inbound|8080", "outbound|80||web-v2.default"]
    );
    cp.status_until("sidecar listed", |s| {
        s.as_array().is_some_and(|a| {
            a.iter().any(|p| {
                p["id"] == "web-1.default"
                    && p["service"] == "web.default"
                    && p["workload"] == "default/web-1"
                    && p["registration"] == "registered"
                    && p["address"] == "127.0.0.2"
            })
        })
    })
    .await;

    // It disconnects: after the grace period its endpoint is withdrawn.
    drop(stx);
    drop(cds);
    let update = observer.message().await.unwrap().unwrap();
    assert_eq!(endpoint_count(&update), 1);
}

/// The endpoints in an EDS response, as `(address, health_status)`.
fn endpoints_of(
    r: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
) -> Vec<(String, i32)> {
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    let mut out = Vec::new();
    for a in &r.resources {
        let cla = ClusterLoadAssignment::decode(a.value.as_slice()).unwrap();
        for e in cla.endpoints.iter().flat_map(|g| &g.lb_endpoints) {
            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                panic!("endpoint without an address")
            };
            let Some(address::Address::SocketAddress(sa)) =
                ep.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                panic!("not a socket address")
            };
            let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
                panic!("no port")
            };
            out.push((format!("{}:{port}", sa.address), e.health_status));
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn a_sidecar_announces_starting_serving_and_draining_on_its_open_stream() {
    use envoy_types::pb::envoy::config::core::v3::HealthStatus;
    // A long grace period: the draining workload must leave without it.
    let cp = Cp::start_with_grace(&two_services(1001, 1002), Duration::from_secs(300)).await;
    let (_otx, mut observer) =
        subscribe(&cp, node("observer"), EDS, &["outbound|80||web.default"]).await;
    let first = observer.message().await.unwrap().unwrap();
    let static_only = endpoints_of(&first);
    assert_eq!(static_only.len(), 1);

    let sidecar = |state: &str| {
        let mut n = node("web-1.default");
        n.metadata = Some(Struct {
            fields: [
                ("service", sv("web")),
                ("namespace", sv("default")),
                ("address", sv("127.0.0.2")),
                ("app_port", sv("8080")),
                ("state", sv(state)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        });
        n
    };
    // Starting: registered (its own config is translated) but no endpoint.
    let (stx, mut cds) = subscribe(&cp, sidecar("starting"), CDS, &[]).await;
    let _ = cds.message().await.unwrap().unwrap();
    cp.status_until("starting sidecar listed", |s| {
        s.as_array().is_some_and(|a| {
            a.iter()
                .any(|p| p["id"] == "web-1.default" && p["registration"] == "registered (starting)")
        })
    })
    .await;
    // The node again, on the same stream, with a nonce that answers nothing.
    let announce = |state: &str| DiscoveryRequest {
        node: Some(sidecar(state)),
        type_url: CDS.to_string(),
        response_nonce: "meshwork-node-update".to_string(),
        ..Default::default()
    };
    stx.send(announce("serving")).await.unwrap();
    let serving = endpoints_of(&observer.message().await.unwrap().unwrap());
    assert_eq!(serving.len(), 2, "{serving:?}");
    assert!(serving.iter().all(|(_, h)| *h == 0), "{serving:?}");

    stx.send(announce("draining")).await.unwrap();
    let draining = endpoints_of(&observer.message().await.unwrap().unwrap());
    cp.status_until("draining sidecar listed", |s| {
        s.as_array().is_some_and(|a| {
            a.iter()
                .any(|p| p["id"] == "web-1.default" && p["registration"] == "registered (draining)")
        })
    })
    .await;
    assert_eq!(
        draining
            .iter()
            .filter(|(_, h)| *h == HealthStatus::Draining as i32)
            .map(|(a, _)| a.as_str())
            .collect::<Vec<_>>(),
        ["127.0.0.2:8080"],
        "{draining:?}"
    );
    // An unknown state ends the stream with the field named.
    stx.send(announce("resting")).await.unwrap();
    let e = loop {
        // Config pushed before the refusal comes first.
        match cds.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without an error"),
            Err(e) => break e,
        }
    };
    assert!(e.message().contains("state"), "{e}");
    // The stream is gone and it was draining: withdrawn at once.
    let gone = endpoints_of(&observer.message().await.unwrap().unwrap());
    assert_eq!(gone, static_only);
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_serve_returns() {
    let (_tx, rx) = watch::channel(mesh(&two_services(1001, 1002)));
    let server = XdsServer::new(rx, Registry::new(Duration::from_secs(30)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(1);
    tx.send(DiscoveryRequest {
        node: Some(node("stays")),
        type_url: CDS.to_string(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    responses.message().await.unwrap().unwrap();
    stop.send(()).unwrap();
    // The open stream ends (the client keeps its request side open)...
    let end = tokio::time::timeout(PATIENCE, responses.message())
        .await
        .expect("stream still open after shutdown");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    // ...and serve returns cleanly.
    tokio::time::timeout(PATIENCE, serving)
        .await
        .expect("serve did not return")
        .unwrap()
        .unwrap();
    drop(tx);
}

/// A codec that sends bytes as they are (to send what no typed client would).
mod raw {
    use bytes::{Buf, BufMut};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::Status;

    #[derive(Debug, Clone, Default)]
    pub struct RawCodec;

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawCodec;
        type Decoder = RawCodec;
        fn encoder(&mut self) -> RawCodec {
            RawCodec
        }
        fn decoder(&mut self) -> RawCodec {
            RawCodec
        }
    }

    impl Encoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            let v = src.chunk().to_vec();
            src.advance(v.len());
            Ok(Some(v))
        }
    }
}

/// A proxy started with `--capture` says so in its node metadata
/// (`meshwork.capture: true`) and gets the transparent-capture output: VIP
/// listeners and the passthrough cluster. Others get explicit mode's.
#[tokio::test]
async fn node_metadata_capture_selects_the_capture_output() {
    let cp = Cp::start(&two_services(1001, 1002)).await;
    let lds = "type.googleapis.com/envoy.config.listener.v3.Listener";
    let names = |capture: bool, kind: &'static str| {
        let mut n = node(if capture { "cap-1" } else { "explicit-1" });
        if capture {
            n.metadata = Some(Struct {
                fields: [(
                    api::CAPTURE_METADATA.to_string(),
                    Value {
                        kind: Some(Kind::BoolValue(true)),
                    },
                )]
                .into(),
            });
        }
        let cp = &cp;
        async move {
            let (_tx, mut rx) = subscribe(cp, n, kind, &[]).await;
            let r = tokio::time::timeout(PATIENCE, rx.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            names_of(&r)
        }
    };
    let vip = cp_mesh_vip(&two_services(1001, 1002), "web");
    let listeners = names(true, lds).await;
    assert!(listeners.contains(&format!("{vip}_80")), "{listeners:?}");
    assert!(names(true, CDS)
        .await
        .contains(&"PassthroughCluster".to_string()));
    let listeners = names(false, lds).await;
    assert!(
        !listeners.iter().any(|l| l.ends_with("_80")),
        "{listeners:?}"
    );
    assert!(!names(false, CDS)
        .await
        .contains(&"PassthroughCluster".to_string()));
}

fn cp_mesh_vip(yaml: &str, service: &str) -> std::net::Ipv4Addr {
    mesh(yaml).service_vip("default", service).unwrap()
}

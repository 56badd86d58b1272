//! Protocols through the proxy with real peers: gRPC (grpcio, unary and
//! server streaming, status in trailers), WebSocket (the `websockets`
//! library), HTTP/1.1 upstream pooling, opaque TCP services and TCPRoute
//! splits, and the inbound listener's protocol detection (HTTP to the local
//! application, server-first TCP after the detection bound, non-HTTP bytes
//! on the outbound HTTP listener closed).
//!
//! The Python peers live in `tests/peers/` and run under `MESHWORK_PYTHON`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use testkit::{Backend, H2Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

/// Bound on anything a peer does, so a broken proxy fails the test instead
/// of hanging it.
const PEER_BOUND: Duration = Duration::from_secs(30);

fn peer_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/peers")
        .join(name)
}

/// A Python peer server; killed when dropped (also when the test panics).
pub(crate) struct PeerServer {
    child: Child,
    port: u16,
}

impl PeerServer {
    /// Runs `script server` and waits for the port it prints.
    pub(crate) async fn start(script: &str) -> PeerServer {
        let mut child = Command::new(testkit::python())
            .arg(peer_script(script))
            .arg("server")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {script}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let line = tokio::time::timeout(
            PEER_BOUND,
            tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                BufReader::new(stdout).read_line(&mut line).map(|_| line)
            }),
        )
        .await
        .expect("peer printed its port")
        .unwrap()
        .unwrap();
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{script} printed {line:?} instead of a port"));
        PeerServer { child, port }
    }

    pub(crate) fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `script client args..` to completion and parses the JSON it prints.
pub(crate) async fn run_peer_client(script: &str, args: &[String]) -> serde_json::Value {
    let mut cmd = Command::new(testkit::python());
    cmd.arg(peer_script(script)).arg("client").args(args);
    let out = tokio::time::timeout(
        PEER_BOUND,
        tokio::task::spawn_blocking(move || cmd.output()),
    )
    .await
    .unwrap_or_else(|_| panic!("{script} client did not finish"))
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} client failed: {stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("{script} client printed {stdout:?} ({e}); stderr: {stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_server_streaming_with_grpcio() {
    let server = PeerServer::start("health_peer.py").await;
    let yaml =
        service("health", 50051, "grpc") + &workload("health-0", "health", 50051, server.addr());
    let h = Harness::start(&yaml).await;

    let seen = run_peer_client(
        "health_peer.py",
        &[h.outbound().to_string(), "health".into()],
    )
    .await;
    assert_eq!(seen["check:"], "SERVING", "{seen}");
    assert_eq!(seen["check:meshwork.test"], "SERVING", "{seen}");
    assert_eq!(seen["check:no.such.Service"], "error:NOT_FOUND", "{seen}");
    assert_eq!(seen.get("watch_error"), None, "{seen}");
    let watch: Vec<&str> = seen["watch"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        watch.len(),
        3,
        "the first status and two updates streamed: {seen}"
    );
    assert!(
        watch.windows(2).all(|w| w[0] != w[1]),
        "each update is a change: {watch:?}"
    );

    // The same unknown-service error seen on the wire: HTTP 200 with the gRPC
    // status in trailers (here a trailers-only response), counted by status.
    let mut c = H2Client::connect(h.outbound()).await.unwrap();
    let name = b"no.such.Service";
    let mut msg = vec![0u8, 0, 0, 0, name.len() as u8 + 2, 0x0a, name.len() as u8];
    msg.extend_from_slice(name);
    let req = http::Request::builder()
        .method("POST")
        .uri("http://health/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(msg)))
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 200);
    let status = r.header("grpc-status").map(str::to_owned).or_else(|| {
        r.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status")?.to_str().ok().map(str::to_owned))
    });
    assert_eq!(
        status.as_deref(),
        Some("5"),
        "NOT_FOUND: {:?} {:?}",
        r.headers,
        r.trailers
    );
    let n = h
        .metric(
            "meshwork_requests_total",
            &[
                ("destination_service", "health.default"),
                ("grpc_status", "5"),
            ],
        )
        .await;
    assert!(
        n >= 2.0,
        "grpc_status=5 counted for both NOT_FOUND calls: {n}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_with_websockets_peer() {
    let server = PeerServer::start("ws_peer.py").await;
    let yaml = service("chat", 80, "http") + &workload("chat-0", "chat", 80, server.addr());
    let h = Harness::start(&yaml).await;
    let seen = run_peer_client("ws_peer.py", &[h.outbound().to_string(), "chat".into()]).await;
    assert_eq!(
        seen["received"],
        serde_json::json!([
            "echo:one",
            "hello from server",
            "echo:two",
            "bytes:000162696e617279ff",
            "echo:three"
        ]),
        "{seen}"
    );
    let n = h
        .metric(
            "meshwork_requests_total",
            &[("destination_service", "chat.default"), ("code", "101")],
        )
        .await;
    assert_eq!(n, 1.0, "the upgrade is one request with status 101");
}

#[tokio::test]
async fn http1_upstream_connections_are_pooled() {
    let b = Backend::http("pooled").await;
    let h = Harness::start(&http_service("api", &[&b])).await;
    // A new downstream connection per request: the upstream side still reuses.
    for i in 0..20 {
        let r = h.get("api", &format!("/r/{i}")).await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(b.hits(), 20);
    assert!(
        b.connections() <= 2,
        "20 requests over {} upstream connections",
        b.connections()
    );
}

async fn echo_roundtrip(addr: std::net::SocketAddr, payload: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(PEER_BOUND, s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, payload);
    s
}

#[tokio::test]
async fn tcp_service_echoes_both_ways_and_is_counted() {
    let b = Backend::tcp_echo("db").await;
    let yaml = tcp_service("db", 5432, 0) + &workload("db-0", "db", 5432, b.addr);
    let h = Harness::start(&yaml).await;
    let addr = h.listener("outbound_tcp|5432|db.default");
    assert_eq!(
        addr.ip().to_string(),
        "127.0.0.1",
        "on the outbound address's IP"
    );

    let first: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut s = echo_roundtrip(addr, &first).await;
    s.write_all(b"second message").await.unwrap();
    let mut back = [0u8; 14];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"second message");
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    drop(s);

    let total = (first.len() + 14) as f64;
    let labels = [("destination_service", "db.default")];
    let mut closed = 0.0;
    for _ in 0..100 {
        closed = h
            .metric("meshwork_tcp_connections_closed_total", &labels)
            .await;
        if closed >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(closed, 1.0);
    assert_eq!(
        h.metric("meshwork_tcp_connections_opened_total", &labels)
            .await,
        1.0
    );
    assert_eq!(
        h.metric("meshwork_tcp_received_bytes_total", &labels).await,
        total
    );
    assert_eq!(
        h.metric("meshwork_tcp_sent_bytes_total", &labels).await,
        total
    );
    assert_eq!(b.hits(), 1);
}

#[tokio::test]
async fn tcp_route_splits_connections_by_weight() {
    let a = Backend::tcp_echo("db-a").await;
    let b = Backend::tcp_echo("db-b").await;
    let mut yaml = tcp_service("db", 5432, 0);
    yaml += &tcp_service("db-a", 5432, 0);
    yaml += &workload("db-a-0", "db-a", 5432, a.addr);
    yaml += &tcp_service("db-b", 5432, 0);
    yaml += &workload("db-b-0", "db-b", 5432, b.addr);
    yaml += "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {name: db-split}\nspec:\n  \
             parentRefs: [{kind: Service, name: db, port: 5432}]\n  \
             rules: [{backendRefs: [{name: db-a, port: 5432, weight: 3}, {name: db-b, port: 5432, weight: 1}]}]\n---\n";
    let h = Harness::start(&yaml).await;
    let addr = h.listener("outbound_tcp|5432|db.default");
    for i in 0..400u32 {
        echo_roundtrip(addr, &i.to_be_bytes()).await;
    }
    // 300 expected, standard deviation ~9.
    let (na, nb) = (a.hits(), b.hits());
    assert_eq!(na + nb, 400);
    assert!((260..=340).contains(&na), "3:1 split: db-a {na}, db-b {nb}");
}

#[tokio::test]
async fn inbound_listener_forwards_http_to_the_local_app() {
    let app = Backend::http("web-app").await;
    let yaml = http_service("web", &[&app]);
    let h = Harness::start_with(&yaml, Some("web-0")).await;
    let mut c = testkit::H1Client::connect(h.inbound()).await.unwrap();
    for i in 0..3 {
        let r = c.get("web", &format!("/inbound/{i}")).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.backend(), Some("web-app"));
        assert_eq!(r.json()["path"], format!("/inbound/{i}"));
    }
    let n = h
        .metric(
            "meshwork_requests_total",
            &[("direction", "inbound"), ("code", "200")],
        )
        .await;
    assert_eq!(n, 3.0);
}

#[tokio::test]
async fn inbound_server_first_app_gets_through_after_detection_timeout() {
    // A mail server with an HTTP admin port: the inbound listener must sniff
    // (HTTP goes to the admin port), and the TCP fallback goes to the first
    // port, where the application speaks first.
    let smtp = Backend::server_first("mail", b"220 mail.example ESMTP ready\r\n").await;
    let admin = Backend::http("mail-admin").await;
    let yaml = format!(
        "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {{name: mail}}\nspec:\n  ports:\n  \
         - {{name: smtp, port: 25, appProtocol: tcp, localPort: 0}}\n  \
         - {{name: admin, port: 8080, appProtocol: http}}\n---\n\
         apiVersion: meshwork.dev/v1alpha1\nkind: Workload\nmetadata: {{name: mail-0}}\n\
         spec: {{service: mail, address: 127.0.0.1, ports: {{smtp: {}, admin: {}}}}}\n---\n",
        smtp.port(),
        admin.port()
    );
    let h = Harness::start_with(&yaml, Some("mail-0")).await;
    let mut s = TcpStream::connect(h.inbound()).await.unwrap();
    // The client says nothing until greeted; the proxy gives up sniffing and
    // proxies the connection as TCP.
    let mut greeting = [0u8; 30];
    tokio::time::timeout(PEER_BOUND, s.read_exact(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&greeting, b"220 mail.example ESMTP ready\r\n");
    s.write_all(b"EHLO client\r\n").await.unwrap();
    let mut echo = [0u8; 13];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"EHLO client\r\n");
    let n = h
        .metric(
            "meshwork_protocol_detection_timeouts_total",
            &[("listener", "inbound")],
        )
        .await;
    assert_eq!(n, 1.0);
    // HTTP on the same listener is still detected as HTTP.
    let mut c = testkit::H1Client::connect(h.inbound()).await.unwrap();
    let r = c.get("mail", "/status").await.unwrap();
    assert_eq!(r.backend(), Some("mail-admin"), "{}", r.text());
    assert_eq!(smtp.hits(), 1);
}

#[tokio::test]
async fn opaque_bytes_on_the_outbound_http_listener_are_closed() {
    let b = Backend::http("a").await;
    let h = Harness::start(&http_service("api", &[&b])).await;
    let inputs: [&[u8]; 3] = [
        // A TLS ClientHello.
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        // A silent client: closed once detection gives up.
        b"",
    ];
    for input in inputs {
        let mut s = TcpStream::connect(h.outbound()).await.unwrap();
        s.write_all(input).await.unwrap();
        let mut out = Vec::new();
        match tokio::time::timeout(PEER_BOUND, s.read_to_end(&mut out)).await {
            Err(_) => panic!("{input:?}: the connection stays open"),
            // Closed with unread input is a reset: closed all the same.
            Ok(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{input:?}"),
            Ok(Ok(_)) => assert!(
                out.is_empty(),
                "{input:?}: got {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    assert_eq!(b.hits(), 0);
    assert_eq!(h.get("api", "/").await.status, 200, "still serving");
}

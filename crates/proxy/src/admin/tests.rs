#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::*;
use crate::logging::{self, BoxedSubscriber, LogHandle};
use crate::metrics::{Direction, HttpLabels, Metrics};

#[derive(Default)]
struct FakeSource {
    ready: AtomicBool,
    /// The last `drain_listeners` call's `inbound_only`.
    drained: std::sync::Mutex<Option<bool>>,
    /// The last state announced through `/healthcheck/*`.
    state: std::sync::Mutex<Option<crate::xds_client::WorkloadState>>,
}

impl AdminSource for FakeSource {
    fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    fn config_dump(&self) -> Value {
        json!({"versions": {"listeners": "3"}, "listeners": ["outbound_http"]})
    }

    fn listeners(&self) -> Vec<(String, SocketAddr)> {
        vec![
            ("outbound_http".into(), "127.0.0.1:15001".parse().unwrap()),
            ("inbound".into(), "[::1]:15006".parse().unwrap()),
        ]
    }

    fn drain_listeners(self: Arc<Self>, inbound_only: bool) -> DrainFuture {
        *self.drained.lock().unwrap() = Some(inbound_only);
        let names = if inbound_only {
            vec!["inbound".to_owned()]
        } else {
            vec!["inbound".to_owned(), "outbound_http".to_owned()]
        };
        Box::pin(async move { Some(names) })
    }

    fn set_workload_state(&self, state: crate::xds_client::WorkloadState) -> Option<bool> {
        *self.state.lock().unwrap() = Some(state);
        Some(true)
    }

    fn draining(&self) -> bool {
        *self.state.lock().unwrap() == Some(crate::xds_client::WorkloadState::Draining)
    }
}

struct Server {
    addr: SocketAddr,
    source: Arc<FakeSource>,
    log: LogHandle,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    // Keeps the reloadable filter alive (not installed globally).
    _subscriber: BoxedSubscriber,
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

async fn start() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let source = Arc::new(FakeSource::default());
    let metrics = Arc::new(Metrics::new());
    metrics
        .http(&HttpLabels {
            direction: Direction::Inbound,
            source_service: "web.default".into(),
            destination_service: "api.default".into(),
            route: "default/api/0".into(),
            source_principal: String::new(),
        })
        .observe(200, None, Duration::from_millis(3));
    let (subscriber, log) = logging::build("info", false).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        listener,
        Arc::clone(&source) as Arc<dyn AdminSource>,
        metrics,
        log.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    Server {
        addr,
        source,
        log,
        stop: Some(stop),
        task,
        _subscriber: subscriber,
    }
}

/// Sends raw bytes and reads until the server closes.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    // A reset instead of a clean close is also an answer to garbage.
    let _ = stream.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn request(addr: SocketAddr, method: &str, target: &str) -> Reply {
    let text = raw(
        addr,
        format!("{method} {target} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Reply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

impl Server {
    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.await.unwrap();
    }
}

#[tokio::test]
async fn ready_and_live() {
    let s = start().await;
    let r = request(s.addr, "GET", "/ready").await;
    assert_eq!((r.status, r.body.as_str()), (503, "not ready\n"));
    s.source.ready.store(true, Ordering::SeqCst);
    let r = request(s.addr, "GET", "/ready").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
    let r = request(s.addr, "GET", "/live").await;
    assert_eq!(r.status, 200);
    let r = request(s.addr, "HEAD", "/live").await;
    assert_eq!((r.status, r.body.as_str()), (200, ""));
    s.stop().await;
}

#[tokio::test]
async fn metrics_endpoint() {
    let s = start().await;
    let r = request(s.addr, "GET", "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert!(r
        .body
        .contains("# TYPE meshwork_request_duration_seconds histogram"));
    assert!(r.body.contains(
        r#"meshwork_requests_total{direction="inbound",source_service="web.default",destination_service="api.default",route="default/api/0",code="200"} 1"#
    ), "{}", r.body);
    s.stop().await;
}

#[tokio::test]
async fn config_dump_and_listeners() {
    let s = start().await;
    let r = request(s.addr, "GET", "/config_dump").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v, s.source.config_dump());

    let r = request(s.addr, "GET", "/listeners").await;
    assert_eq!(r.status, 200);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        v,
        json!({"outbound_http": "127.0.0.1:15001", "inbound": "[::1]:15006"})
    );
    s.stop().await;
}

#[tokio::test]
async fn logging_get_and_change() {
    let s = start().await;
    let r = request(s.addr, "GET", "/logging").await;
    assert_eq!((r.status, r.body.as_str()), (200, "info\n"));

    let r = request(s.addr, "POST", "/logging?level=debug").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(s.log.current(), "debug");
    let r = request(s.addr, "GET", "/logging").await;
    assert_eq!(r.body, "debug\n");

    // Percent-encoded directives.
    let r = request(
        s.addr,
        "POST",
        "/logging?filter=proxy%3A%3Aadmin%3Dtrace%2Cwarn",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let current = s.log.current();
    assert!(
        current.contains("proxy::admin=trace") && current.contains("warn"),
        "{current}"
    );

    // Refused changes say why and keep the filter.
    let r = request(s.addr, "POST", "/logging?level=loud").await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("unknown level"), "{}", r.body);
    let r = request(s.addr, "POST", "/logging?filter=proxy=loud").await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("invalid log filter"), "{}", r.body);
    let r = request(s.addr, "POST", "/logging").await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("?level="), "{}", r.body);
    let r = request(s.addr, "POST", "/logging?filter=%zz").await;
    assert_eq!(r.status, 400);
    let r = request(s.addr, "POST", "/logging?verbose=1").await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("unknown parameter"), "{}", r.body);
    assert_eq!(s.log.current(), current);

    // A browser-sent POST is refused.
    let text = raw(
        s.addr,
        b"POST /logging?level=trace HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert_eq!(s.log.current(), current);
    s.stop().await;
}

#[tokio::test]
async fn index_404_and_405() {
    let s = start().await;
    let r = request(s.addr, "GET", "/").await;
    assert_eq!(r.status, 200);
    for path in [
        "/ready",
        "/live",
        "/metrics",
        "/config_dump",
        "/listeners",
        "/logging",
    ] {
        assert!(r.body.contains(path), "index lacks {path}: {}", r.body);
    }

    let r = request(s.addr, "GET", "/stats").await;
    assert_eq!(r.status, 404);
    assert!(
        r.body.contains("no such endpoint: \"/stats\""),
        "{}",
        r.body
    );
    assert!(r.body.contains("/config_dump"));

    let r = request(s.addr, "POST", "/metrics").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = request(s.addr, "DELETE", "/logging").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, POST, HEAD"));
    s.stop().await;
}

#[tokio::test]
async fn garbage_gets_400_or_close_and_the_server_lives_on() {
    let s = start().await;
    for garbage in [
        &b"\x00\x01\x02\xff\xfe garbage\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /\x7f HTTP/1.1\r\nHost: \xff\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", // a TLS ClientHello start
    ] {
        let reply = raw(s.addr, garbage).await;
        assert!(
            reply.is_empty() || reply.starts_with("HTTP/1.1 400"),
            "{garbage:?} got {reply:?}"
        );
    }
    let r = request(s.addr, "GET", "/live").await;
    assert_eq!(r.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_stops_accepting() {
    let s = start().await;
    let addr = s.addr;
    // A client that connected but never sent a request.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    // Make sure the server has accepted it before shutting down.
    let r = request(addr, "GET", "/live").await;
    assert_eq!(r.status, 200);
    s.stop().await;
    let mut buf = Vec::new();
    let _ = idle.read_to_end(&mut buf).await;
    assert!(buf.is_empty() || String::from_utf8_lossy(&buf).starts_with("HTTP/1.1"));
    assert!(TcpStream::connect(addr).await.is_err());
}

#[test]
fn percent_decoding() {
    assert_eq!(percent_decode("a%3Db+c").as_deref(), Some("a=b c"));
    assert_eq!(percent_decode("%e2%9c%93").as_deref(), Some("✓"));
    assert_eq!(percent_decode("%"), None);
    assert_eq!(percent_decode("%4"), None);
    assert_eq!(percent_decode("%gg"), None);
    assert_eq!(percent_decode("%ff"), None);
}

#[tokio::test]
async fn healthcheck_fail_and_ok_announce_the_workload_state() {
    use crate::xds_client::WorkloadState;
    let s = start().await;
    let r = request(s.addr, "POST", "/healthcheck/fail").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body
            .starts_with("draining: announced to the control plane"),
        "{}",
        r.body
    );
    assert_eq!(
        *s.source.state.lock().unwrap(),
        Some(WorkloadState::Draining)
    );
    let r = request(s.addr, "GET", "/ready").await;
    assert_eq!((r.status, r.body.as_str()), (503, "draining\n"));
    let r = request(s.addr, "POST", "/healthcheck/ok").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        *s.source.state.lock().unwrap(),
        Some(WorkloadState::Serving)
    );
    s.source.ready.store(true, Ordering::SeqCst);
    let r = request(s.addr, "GET", "/ready").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
    let r = request(s.addr, "GET", "/healthcheck/fail").await;
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));
    // Not from a web page.
    let text = raw(
        s.addr,
        b"POST /healthcheck/fail HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert_eq!(
        *s.source.state.lock().unwrap(),
        Some(WorkloadState::Serving)
    );
}

#[tokio::test]
async fn drain_listeners_inbound_only_or_all() {
    let s = start().await;
    let r = request(s.addr, "POST", "/drain_listeners?inboundonly").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "OK: stopped accepting on [inbound]\n")
    );
    assert_eq!(*s.source.drained.lock().unwrap(), Some(true));
    let r = request(s.addr, "POST", "/drain_listeners?graceful").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "OK: stopped accepting on [inbound, outbound_http]\n")
    );
    assert_eq!(*s.source.drained.lock().unwrap(), Some(false));

    *s.source.drained.lock().unwrap() = None;
    let r = request(s.addr, "POST", "/drain_listeners?outboundonly").await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("outboundonly"), "{}", r.body);
    let r = request(s.addr, "GET", "/drain_listeners").await;
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));
    // A web page cannot take the proxy out of service either.
    let text = raw(
        s.addr,
        b"POST /drain_listeners HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert_eq!(*s.source.drained.lock().unwrap(), None);
    s.stop().await;
}

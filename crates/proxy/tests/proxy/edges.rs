//! Edge cases from review: half-closed TCP clients, upgrades other than
//! WebSocket, the route timeout over a slow body, and the source service
//! label of a sidecar that fronts a workload.

use std::time::Duration;

use testkit::Backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

/// A service with a TCP port first (the inbound fallback) and an HTTP port.
fn mixed(tcp: &Backend, http: &Backend) -> String {
    format!(
        "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {{name: app}}\nspec:\n  ports:\n  \
         - {{name: raw, port: 9000, appProtocol: tcp, localPort: 0}}\n  \
         - {{name: web, port: 8080, appProtocol: http}}\n---\n\
         apiVersion: meshwork.dev/v1alpha1\nkind: Workload\nmetadata: {{name: app-0}}\n\
         spec: {{service: app, address: 127.0.0.1, ports: {{raw: {}, web: {}}}}}\n---\n",
        tcp.port(),
        http.port()
    )
}

#[tokio::test]
async fn a_short_payload_then_half_close_still_reaches_the_app() {
    let echo = Backend::tcp_echo("raw").await;
    let web = Backend::http("web").await;
    let h = Harness::start_with(&mixed(&echo, &web), Some("app-0")).await;
    let mut s = TcpStream::connect(h.inbound()).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("answered before the bound")
        .unwrap();
    assert_eq!(
        got, b"hello",
        "`nc -N` style clients get their bytes through"
    );
}

#[tokio::test]
async fn h2c_upgrade_is_served_as_http1_and_other_upgrades_are_refused() {
    let b = Backend::http("web").await;
    let h = Harness::start(&http_service("web", &[&b])).await;
    let mut c = h.client().await;
    for _ in 0..3 {
        let req = http::Request::builder()
            .uri("/x")
            .header("host", "web")
            .header("connection", "Upgrade, HTTP2-Settings")
            .header("upgrade", "h2c")
            .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let r = c.send(req).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            r.json()["headers"]["upgrade"].is_null(),
            "hop-by-hop upgrade dropped"
        );
    }
    assert_eq!(b.connections(), 1, "h2c upgrade attempts reuse the pool");

    let req = http::Request::builder()
        .uri("/x")
        .header("host", "web")
        .header("connection", "upgrade")
        .header("upgrade", "foo/1")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(
        r.header("x-meshwork-error"),
        Some("downstream_protocol_error")
    );
    assert!(r.text().contains("foo/1"), "{}", r.text());
}

#[tokio::test]
async fn the_route_timeout_covers_a_slowly_streamed_body() {
    let slow = Backend::slow_body("slow", Duration::from_secs(3)).await;
    let yaml = service("slow", 80, "http")
        + &workload("slow-0", "slow", 80, slow.addr)
        + "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: slow}\nspec:\n  \
           parentRefs: [{kind: Service, name: slow, port: 80}]\n  rules:\n  \
           - timeouts: {request: 300ms}\n    backendRefs: [{name: slow, port: 80}]\n";
    let h = Harness::start(&yaml).await;
    let mut c = h.client().await;
    let started = std::time::Instant::now();
    let r = c.get("slow", "/").await;
    assert!(
        r.is_err(),
        "an incomplete body must not look complete: {r:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cut at the route timeout, not at the backend's pace"
    );
    let log = h.access_log().await;
    assert!(
        log.iter().any(|l| l["response_flags"] == "UT"),
        "timed out mid-body is logged as UT: {log:?}"
    );
}

#[tokio::test]
async fn a_sidecar_labels_outbound_traffic_with_its_own_service() {
    let b = Backend::http("reviews-0").await;
    let me = Backend::http("productpage-0").await;
    let yaml = http_service("reviews", &[&b]) + &http_service("productpage", &[&me]);
    let h = Harness::start_with(&yaml, Some("productpage-0")).await;
    assert_eq!(h.get("reviews", "/").await.status, 200);
    let n = h
        .metric(
            "meshwork_requests_total",
            &[
                ("source_service", "productpage.default"),
                ("destination_service", "reviews.default"),
            ],
        )
        .await;
    assert_eq!(n, 1.0);
}

#[tokio::test]
async fn the_access_log_counts_chunked_request_bodies() {
    let b = Backend::http("web").await;
    let h = Harness::start(&http_service("web", &[&b])).await;
    // Raw HTTP/1.1 with a chunked body of 5000 bytes (no content-length).
    let mut s = TcpStream::connect(h.outbound()).await.unwrap();
    let chunk = vec![b'x'; 1000];
    let mut req = b"POST /upload HTTP/1.1\r\nhost: web\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    for _ in 0..5 {
        req.extend_from_slice(b"3e8\r\n");
        req.extend_from_slice(&chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(b.seen()[0].body.len(), 5000);
    let log = h.access_log().await;
    let line = log.iter().find(|l| l["path"] == "/upload").expect("logged");
    assert_eq!(line["bytes_received"], 5000);
}

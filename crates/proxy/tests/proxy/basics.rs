//! Host-based routing, local replies with reasons, HTTP/2, keep-alive,
//! garbage input, and the admin server.

use testkit::{Backend, H2Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

#[tokio::test]
async fn routes_by_every_host_form() {
    let b = Backend::http("reviews-0").await;
    let h = Harness::start(&http_service("reviews", &[&b])).await;
    let mut c = h.client().await;
    for host in [
        "reviews",
        "reviews:80",
        "reviews.default",
        "reviews.default:80",
        "reviews.default.svc.cluster.local",
        "REVIEWS.default:80",
    ] {
        let r = c.get(host, "/a/b?x=1").await.unwrap();
        assert_eq!(r.status, 200, "host {host}: {}", r.text());
        assert_eq!(r.backend(), Some("reviews-0"));
        let seen = r.json();
        assert_eq!(seen["path"], "/a/b");
        assert_eq!(seen["query"], "x=1");
        assert!(
            seen["headers"]["x-request-id"].is_string(),
            "x-request-id added"
        );
    }
    // All of them went over one downstream connection and were pooled upstream.
    assert_eq!(b.hits(), 6);
}

#[tokio::test]
async fn unknown_host_is_404_with_reason_in_header_and_log() {
    let b = Backend::http("a").await;
    let h = Harness::start(&http_service("reviews", &[&b])).await;
    let r = h.get("ratings", "/").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-meshwork-error"), Some("no_route"));
    assert!(
        r.text().contains("ratings"),
        "body names the host: {}",
        r.text()
    );
    let log = h.access_log().await;
    let line = log
        .iter()
        .find(|l| l["authority"] == "ratings")
        .expect("logged");
    assert_eq!(line["response_flags"], "NR");
    assert_eq!(line["status"], 404);
}

#[tokio::test]
async fn no_endpoint_connect_refused_and_reset_say_why() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let resetter = Backend::resetter("crash").await;
    let yaml = [
        service("empty", 80, "http"),
        service("down", 80, "http"),
        workload("down-0", "down", 80, closed),
        service("crash", 80, "http"),
        workload("crash-0", "crash", 80, resetter.addr),
    ]
    .concat();
    let h = Harness::start(&yaml).await;

    let r = h.get("empty", "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-meshwork-error"), Some("no_endpoint"));

    let r = h.get("down", "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-meshwork-error"), Some("connect_failure"));
    assert!(r.text().contains("refused"), "{}", r.text());

    let r = h.get("crash", "/").await;
    assert_eq!(r.status, 503, "Envoy answers 503 for resets too");
    assert_eq!(r.header("x-meshwork-error"), Some("upstream_reset"));

    let log = h.access_log().await;
    let flags: Vec<_> = log
        .iter()
        .map(|l| l["response_flags"].as_str().unwrap_or("").to_owned())
        .collect();
    for f in ["UH", "UF", "UR"] {
        assert!(
            flags.iter().any(|x| x == f),
            "flag {f} in access log: {flags:?}"
        );
    }
    let m = h
        .metric("meshwork_responses_total", &[("reason", "connect_failure")])
        .await;
    assert_eq!(m, 1.0);
}

#[tokio::test]
async fn http2_prior_knowledge_downstream() {
    let b = Backend::http("h2-backend").await;
    let h = Harness::start(&http_service("api", &[&b])).await;
    let mut c = H2Client::connect(h.outbound()).await.unwrap();
    for i in 0..5 {
        let req = http::Request::builder()
            .uri(format!("http://api.default/item/{i}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let r = c.send(req).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["path"], format!("/item/{i}"));
        // Upstream is an HTTP/1.1 port: the proxy translated the version.
        assert_eq!(r.json()["version"], "HTTP/1.1");
        assert_eq!(r.json()["host"], "api.default");
    }
}

#[tokio::test]
async fn http2_upstream_for_http2_ports() {
    let b = Backend::http("h2-up").await;
    let yaml = service("grpcish", 80, "http2") + &workload("g-0", "grpcish", 80, b.addr);
    let h = Harness::start(&yaml).await;
    let r = h.get("grpcish", "/x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["version"], "HTTP/2.0");
}

#[tokio::test]
async fn garbage_bytes_get_400_or_close_never_a_crash() {
    let b = Backend::http("a").await;
    let h = Harness::start(&http_service("reviews", &[&b])).await;
    let inputs: [&[u8]; 5] = [
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
        b"GET / HTTP/1.1\r\nHost: reviews\r\nContent-Length: -5\r\n\r\n",
        b"GET / HTTP/1.1\r\nHo\x00st: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        b"\x00\x01\x02\x03 random \r\n\r\n",
    ];
    for input in inputs {
        let mut s = tokio::net::TcpStream::connect(h.outbound()).await.unwrap();
        s.write_all(input).await.unwrap();
        let mut out = Vec::new();
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out)).await;
        if let Ok(Ok(_)) = read {
            let text = String::from_utf8_lossy(&out);
            assert!(
                out.is_empty()
                    || text.starts_with("HTTP/1.1 400")
                    || !text.starts_with("HTTP/1.1 2"),
                "{input:?} -> {text}"
            );
        }
    }
    // Still serving.
    assert_eq!(h.get("reviews", "/").await.status, 200);
}

#[tokio::test]
async fn admin_endpoints() {
    let b = Backend::http("a").await;
    let h = Harness::start(&http_service("reviews", &[&b])).await;
    assert_eq!(h.get("reviews", "/").await.status, 200);

    let r = h.admin("/ready").await;
    assert_eq!(r.status, 200);
    assert_eq!(h.admin("/live").await.status, 200);

    let m = h.admin("/metrics").await.text();
    let n = sum_metric(
        &m,
        "meshwork_requests_total",
        &[
            ("direction", "outbound"),
            ("destination_service", "reviews.default"),
            ("code", "200"),
        ],
    );
    assert_eq!(n, 1.0, "{m}");
    assert!(
        m.contains("meshwork_request_duration_seconds_bucket"),
        "{m}"
    );

    let dump = h.admin("/config_dump").await.json();
    assert!(
        dump.to_string().contains("outbound|80||reviews.default"),
        "{dump}"
    );
    let listeners = h.admin("/listeners").await.text();
    assert!(listeners.contains("outbound_http"), "{listeners}");

    let mut c = testkit::H1Client::connect(h.proxy.admin_addr())
        .await
        .unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri("/logging?level=debug")
        .header("host", "localhost")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(c.send(req).await.unwrap().status, 200);
    assert!(h.admin("/logging").await.text().contains("debug"));
}

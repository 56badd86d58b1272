//! Focused checks of the retry, timeout and circuit breaker contract through
//! real sockets: what the client gets when retries give up, which metric
//! and access log flag says why, gRPC statuses in headers, the overflow
//! reply's headers and body, waiting for a connection at the connection
//! limit, and the stream idle timeout before the response. (The broad misbehaving-backend scenarios are in
//! `resilience.rs`.)

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use testkit::{Backend, Behavior, H1Client, H2Client, Pattern};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

/// A `TrafficPolicy` on Service `svc`; `spec` holds its sections as YAML
/// lines indented by two spaces.
fn traffic_policy(svc: &str, spec: &str) -> String {
    format!(
        "apiVersion: meshwork.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {svc}-policy}}\nspec:\n  targetRef: {{kind: Service, name: {svc}}}\n{spec}---\n"
    )
}

/// The `response_flags` of every access log entry so far.
async fn log_flags(h: &Harness) -> Vec<String> {
    h.access_log()
        .await
        .iter()
        .map(|e| e["response_flags"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giving_up_forwards_the_last_upstream_response() {
    let down = Backend::status("down", 503).await;
    let yaml = http_service("web", &[&down])
        + &traffic_policy(
            "web",
            "  retries: {attempts: 2, on: [5xx], backoff: {baseInterval: 1ms}}\n",
        );
    let h = Harness::start(&yaml).await;
    let r = h.get("web", "/").await;
    // The backend's own 503, not a local reply.
    assert_eq!(r.status, 503);
    assert_eq!(r.backend(), Some("down"));
    assert_eq!(r.header("x-meshwork-error"), None);
    assert_eq!(down.hits(), 3, "one attempt and two retries");
    assert_eq!(
        h.metric("meshwork_retries_total", &[("reason", "5xx")])
            .await,
        2.0
    );
    assert_eq!(
        h.metric(
            "meshwork_retries_skipped_total",
            &[("reason", "retry_limit_exceeded")]
        )
        .await,
        1.0
    );
    let log = h.access_log().await;
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["response_flags"], "URX");
    let reason = log[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("retries exhausted: 2 of 2"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_are_retried_on_another_endpoint() {
    let live = Backend::http("live").await;
    let dead: SocketAddr = format!("127.0.0.1:{}", testkit::free_port())
        .parse()
        .unwrap();
    let mut yaml = service("web", 80, "http");
    yaml += &workload("web-dead", "web", 80, dead);
    yaml += &workload("web-live", "web", 80, live.addr);
    yaml += &traffic_policy(
        "web",
        "  loadBalancer: {algorithm: roundRobin}\n  retries: {attempts: 1, on: [connect-failure], backoff: {baseInterval: 1ms}}\n",
    );
    let h = Harness::start(&yaml).await;
    let mut c = h.client().await;
    for i in 0..10 {
        let r = c.get("web", "/").await.unwrap();
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.backend(), Some("live"));
    }
    assert_eq!(live.hits(), 10);
    let retried = h
        .metric("meshwork_retries_total", &[("reason", "connect-failure")])
        .await;
    assert!(retried >= 1.0, "no connect failure was retried");
    assert_eq!(h.metric("meshwork_retries_skipped_total", &[]).await, 0.0);
}

/// An h2c gRPC server whose first `fail` calls answer trailers-only
/// `UNAVAILABLE` (14), the rest an empty message with `grpc-status: 0`.
async fn grpc_flaky(fail: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    type Out = http_body_util::combinators::BoxBody<Bytes, Infallible>;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    let _ = req.into_body().collect().await;
                    let resp = Response::builder()
                        .status(200)
                        .header("content-type", "application/grpc");
                    let resp: Response<Out> = if n < fail {
                        resp.header("grpc-status", "14")
                            .header("grpc-message", "try again")
                            .body(Full::new(Bytes::new()).boxed())
                            .unwrap()
                    } else {
                        let mut trailers = HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                            Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
                            Ok(Frame::trailers(trailers)),
                        ];
                        resp.body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
                            .unwrap()
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_status_in_headers_is_retried() {
    let (addr, calls) = grpc_flaky(1).await;
    let mut yaml = service("greeter", 50051, "grpc");
    yaml += &workload("greeter-0", "greeter", 50051, addr);
    yaml += &traffic_policy(
        "greeter",
        "  retries: {attempts: 1, on: [connect-failure], grpcStatuses: [unavailable], backoff: {baseInterval: 1ms}}\n",
    );
    let h = Harness::start(&yaml).await;
    let mut c = H2Client::connect(h.outbound()).await.unwrap();
    let req = Request::post("http://greeter:50051/helloworld.Greeter/SayHello")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 200);
    let status = r
        .trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok());
    assert_eq!(status, Some("0"), "headers {:?}", r.headers);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        h.metric("meshwork_retries_total", &[("reason", "unavailable")])
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_answers_at_once_and_names_the_limit_to_raise() {
    let slow = Backend::controlled("slow", Pattern::Always(Behavior::Hold)).await;
    let yaml = http_service("web", &[&slow])
        + &traffic_policy("web", "  connectionPool: {maxRequests: 1}\n");
    let h = Harness::start(&yaml).await;
    let first = {
        let addr = h.outbound();
        tokio::spawn(async move {
            let mut c = H1Client::connect(addr).await.unwrap();
            c.get("web", "/").await.unwrap()
        })
    };
    for _ in 0..500 {
        if slow.in_flight() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(slow.in_flight(), 1);

    // The breaker's counts are on /clusters.
    let clusters = h.admin("/clusters").await.json();
    let breakers: Vec<&serde_json::Value> = clusters
        .as_object()
        .unwrap()
        .values()
        .map(|c| &c["circuit_breakers"])
        .filter(|b| b["max_requests"] == 1)
        .collect();
    assert_eq!(breakers.len(), 1, "{clusters}");
    assert_eq!(breakers[0]["requests"], 1, "{clusters}");

    let r = h.get("web", "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-meshwork-error"), Some("upstream_overflow"));
    assert_eq!(r.header("x-envoy-overloaded"), Some("true"));
    let body = r.text();
    assert!(body.contains("connectionPool.maxRequests"), "{body}");
    assert!(body.contains("limit requests"), "{body}");
    assert_eq!(
        slow.hits(),
        1,
        "the overflowing request reached the backend"
    );

    slow.release();
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(
        h.metric("meshwork_upstream_overflow_total", &[("limit", "requests")])
            .await,
        1.0
    );
    let flags = log_flags(&h).await;
    assert!(flags.iter().any(|f| f == "UO"), "{flags:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_beyond_max_retries_are_skipped() {
    let down = Backend::status("down", 503).await;
    let yaml = http_service("web", &[&down])
        + &traffic_policy(
            "web",
            "  connectionPool: {maxRetries: 0}\n  retries: {attempts: 3, on: [5xx]}\n",
        );
    let h = Harness::start(&yaml).await;
    let r = h.get("web", "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.backend(), Some("down"), "the upstream's response");
    assert_eq!(down.hits(), 1);
    assert_eq!(
        h.metric(
            "meshwork_retries_skipped_total",
            &[("reason", "max_retries")]
        )
        .await,
        1.0
    );
    assert_eq!(
        h.metric("meshwork_upstream_overflow_total", &[("limit", "retries")])
            .await,
        1.0
    );
    assert_eq!(h.metric("meshwork_retries_total", &[]).await, 0.0);
    assert_eq!(log_flags(&h).await, vec!["UO".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_idle_timeout_before_the_response_is_504() {
    let hung = Backend::controlled("hung", Pattern::Always(Behavior::BlackHole)).await;
    let yaml = http_service("web", &[&hung])
        + &traffic_policy("web", "  timeouts: {request: 30s, streamIdle: 300ms}\n");
    let h = Harness::start(&yaml).await;
    let r = tokio::time::timeout(Duration::from_secs(10), h.get("web", "/"))
        .await
        .expect("the idle stream was not cut");
    assert_eq!(r.status, 504);
    assert_eq!(r.header("x-meshwork-error"), Some("idle_timeout"));
    assert_eq!(log_flags(&h).await, vec!["SI".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_idle_timeout_while_the_request_is_incomplete_is_408() {
    let hung = Backend::controlled("hung", Pattern::Always(Behavior::BlackHole)).await;
    let yaml = http_service("web", &[&hung])
        + &traffic_policy("web", "  timeouts: {request: 30s, streamIdle: 300ms}\n");
    let h = Harness::start(&yaml).await;
    let mut s = tokio::net::TcpStream::connect(h.outbound()).await.unwrap();
    // Ten bytes announced, three sent.
    s.write_all(b"POST / HTTP/1.1\r\nhost: web\r\ncontent-length: 10\r\n\r\nabc")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the idle stream was not cut")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(head.contains("x-meshwork-error: idle_timeout"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_requests_wait_for_a_connection() {
    // The first request holds the only connection; the second waits for it
    // (pending) instead of opening another or failing.
    let slow = Backend::controlled("slow", Pattern::First(1, Behavior::Hold)).await;
    let yaml = http_service("web", &[&slow])
        + &traffic_policy(
            "web",
            "  connectionPool: {maxConnections: 1, maxPendingRequests: 10}\n",
        );
    let h = Harness::start(&yaml).await;
    let spawn_get = || {
        let addr = h.outbound();
        tokio::spawn(async move {
            let mut c = H1Client::connect(addr).await.unwrap();
            c.get("web", "/").await.unwrap()
        })
    };
    let first = spawn_get();
    for _ in 0..500 {
        if slow.in_flight() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = spawn_get();
    let mut pending = serde_json::Value::Null;
    for _ in 0..500 {
        let clusters = h.admin("/clusters").await.json();
        pending = clusters
            .as_object()
            .unwrap()
            .values()
            .map(|c| c["circuit_breakers"].clone())
            .find(|b| b["max_connections"] == 1)
            .unwrap();
        if pending["pending_requests"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pending["pending_requests"], 1, "{pending}");
    assert_eq!(pending["connections"], 1, "{pending}");
    assert_eq!(slow.hits(), 1, "the second request did not wait");

    slow.release();
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(second.await.unwrap().status, 200);
    assert_eq!(slow.connections(), 1, "a second connection was opened");
    assert_eq!(h.metric("meshwork_upstream_overflow_total", &[]).await, 0.0);
}

/// An HTTPRoute for `web` whose `/slow` rule waits up to 30 s and whose
/// other rule has `timeouts` (a YAML flow mapping).
fn slow_and_fast_rules(fast_timeouts: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: web, port: 80}}]\n  rules:\n  - matches: [{{path: {{type: PathPrefix, value: /slow}}}}]\n    backendRefs: [{{name: web, port: 80}}]\n    timeouts: {{request: 30s}}\n  - backendRefs: [{{name: web, port: 80}}]\n    timeouts: {fast_timeouts}\n---\n"
    )
}

/// Starts a GET of `/slow`, which `app` holds (it must hold its first
/// request), and waits until it occupies the cluster's one connection.
async fn occupy_the_connection(
    h: &Harness,
    app: &Backend,
) -> tokio::task::JoinHandle<testkit::Reply> {
    let addr = h.outbound();
    let slow = tokio::spawn(async move {
        let mut c = H1Client::connect(addr).await.unwrap();
        c.get("web", "/slow").await.unwrap()
    });
    for _ in 0..500 {
        if app.in_flight() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(app.in_flight(), 1, "the slow request did not arrive");
    slow
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_waiting_for_a_connection_do_not_eject_the_endpoint() {
    // Requests queued behind `/slow` for the cluster's only connection hit
    // their route timeout. That is this proxy's queue, not the endpoint's
    // answer: outlier detection must not count it (Envoy reports only
    // requests that reached a host).
    let app = Backend::controlled("app", Pattern::First(1, Behavior::Hold)).await;
    let yaml = http_service("web", &[&app])
        + &slow_and_fast_rules("{request: 300ms}")
        + &traffic_policy(
            "web",
            "  connectionPool: {maxConnections: 1, maxPendingRequests: 10}\n  outlierDetection: {consecutiveGatewayErrors: 2, consecutive5xx: 0, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 100}\n",
        );
    let h = Harness::start(&yaml).await;
    let slow = occupy_the_connection(&h, &app).await;
    for i in 0..3 {
        let r = h.get("web", "/").await;
        assert_eq!(r.status, 504, "request {i}: {}", r.text());
    }
    assert_eq!(app.hits(), 1, "a queued request reached the endpoint");

    app.release();
    assert_eq!(slow.await.unwrap().status, 200);
    let r = h.get("web", "/").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(h.metric("meshwork_outlier_ejections_total", &[]).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_try_timeout_starts_once_the_attempt_has_a_connection() {
    // Envoy starts the per-try timer when the connection pool hands the
    // attempt a connection: a request queued at `maxConnections` waits (up
    // to its route timeout) rather than failing after one per-try timeout.
    let app = Backend::controlled("app", Pattern::First(1, Behavior::Hold)).await;
    let yaml = http_service("web", &[&app])
        + &slow_and_fast_rules("{request: 10s, backendRequest: 200ms}")
        + &traffic_policy(
            "web",
            "  connectionPool: {maxConnections: 1, maxPendingRequests: 10}\n",
        );
    let h = Harness::start(&yaml).await;
    let slow = occupy_the_connection(&h, &app).await;
    let addr = h.outbound();
    let queued = tokio::spawn(async move {
        let mut c = H1Client::connect(addr).await.unwrap();
        c.get("web", "/").await.unwrap()
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !queued.is_finished(),
        "the queued request timed out while waiting for a connection"
    );
    app.release();
    assert_eq!(slow.await.unwrap().status, 200);
    let r = queued.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(app.hits(), 2);
}

//! Active health checks: one task per (endpoint, health check) that probes
//! the endpoint every interval and reports to its [`ClusterHealth`].
//!
//! Purpose: find dead or sick endpoints before requests do. The rules
//! (thresholds, first check, start-up state) are in the module docs of
//! [`super`]; this file holds the probes and the per-checker state machine.
//!
//! Probes (within the check's `timeout`, mTLS to mTLS endpoints with the
//! cluster's client config):
//! - TCP: a new connection (and TLS handshake) succeeds; it is closed at
//!   once (Envoy's data-less TCP check).
//! - HTTP: `GET path` with `Host` (HTTP/1.1) or `:authority` (HTTP/2 prior
//!   knowledge when the cluster speaks HTTP/2) set to `host`, or the cluster
//!   name as Envoy; healthy when the status is in one of the `expected`
//!   ranges (`[start, end)`; none given: 200). Up to 64 KiB of the body is
//!   read, so a response that stalls mid-body times out as in Envoy.
//! - gRPC: `grpc.health.v1.Health/Check` over HTTP/2 with
//!   `HealthCheckRequest{service}` (hand-encoded: field 1, a string),
//!   `:authority` set to `authority` or the cluster name (on HTTP/2, a
//!   cluster name that is no valid authority, as meshwork's `outbound|..`
//!   names, is replaced by the endpoint's address); healthy when the
//!   HTTP status is 200, `grpc-status` is 0 and the response's `status`
//!   (field 1) is `SERVING` (1).
//! - HTTP and gRPC checks keep their connection for the next check (Envoy's
//!   `reuse_connection`, default true), unless it failed, timed out, was
//!   closed by the endpoint or answered with `connection: close`.
//!
//! Non-goals: request headers or bodies beyond these, response body
//! matching, `retriable_statuses`, compressed gRPC responses (they count as
//! not serving).

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{ClusterHealth, Env, Host, Task};
use crate::config::model::{Cluster, HealthCheck, HealthCheckKind, UpstreamTls};
use crate::metrics::Event;
use crate::upstream::Target;

/// Most response body read from an HTTP or gRPC check.
const BODY_LIMIT: usize = 64 * 1024;
/// `user-agent` of check requests.
const USER_AGENT: &str = "meshwork-health-check";
/// The gRPC health checking service's method.
const GRPC_HEALTH_PATH: &str = "/grpc.health.v1.Health/Check";
/// `HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: u64 = 1;

/// What a checker was started with; `key` identifies it, so a config update
/// restarts a checker only when something it uses changed.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub(crate) key: String,
    check: Arc<HealthCheck>,
    cluster: String,
    http2: bool,
    tls: Option<Arc<UpstreamTls>>,
}

/// The result of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// The endpoint answered as expected.
    Healthy,
    /// The endpoint answered, wrongly (unexpected HTTP status, gRPC not
    /// serving): Envoy's "active" failure, which fails the endpoint at once.
    Unhealthy,
    /// No usable answer (connect or TLS failure, reset, protocol error):
    /// counts toward `unhealthy_threshold`.
    NetworkFailure,
    /// No answer within the timeout: a network failure too.
    Timeout,
}

/// A check connection kept between HTTP or gRPC checks.
pub(crate) struct Conn {
    sender: Sender,
    /// Drives the connection; aborted (closing it) when dropped.
    _task: Task,
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// One checker's memory of its recent results (Envoy's
/// `ActiveHealthCheckSession` counters).
#[derive(Debug)]
pub(crate) struct Session {
    /// No result yet: a first success passes the endpoint at once.
    first: bool,
    successes: u32,
    failures: u32,
}

impl Spec {
    pub(crate) fn new(
        check: Arc<HealthCheck>,
        cluster: &Cluster,
        tls: Option<Arc<UpstreamTls>>,
        destination: &str,
    ) -> Self {
        let key = serde_json::json!({
            "check": &*check,
            "cluster": cluster.name,
            "http2": cluster.http2,
            "tls": tls.as_ref().map(|t| &*t.pool_key),
            "destination": destination,
        })
        .to_string();
        Self {
            key,
            check,
            cluster: cluster.name.clone(),
            http2: cluster.http2,
            tls,
        }
    }
}

impl Probe {
    /// The `result` label of `meshwork_health_checks_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Probe::Healthy => "success",
            Probe::Unhealthy | Probe::NetworkFailure => "failure",
            Probe::Timeout => "timeout",
        }
    }
}

impl Default for Session {
    fn default() -> Self {
        Self {
            first: true,
            successes: 0,
            failures: 0,
        }
    }
}

impl Session {
    /// Takes one probe result for an endpoint this check currently fails
    /// (`failing`) or not; returns the new failing state when it changes.
    /// Thresholds of 0 act as 1.
    pub(crate) fn observe(
        &mut self,
        failing: bool,
        probe: Probe,
        hc: &HealthCheck,
    ) -> Option<bool> {
        let first = std::mem::replace(&mut self.first, false);
        if probe == Probe::Healthy {
            self.failures = 0;
            if !failing {
                return None;
            }
            self.successes = self.successes.saturating_add(1);
            if first || self.successes >= hc.healthy_threshold.max(1) {
                self.successes = 0;
                return Some(false);
            }
            return None;
        }
        self.successes = 0;
        if failing {
            return None;
        }
        self.failures = self.failures.saturating_add(1);
        if probe == Probe::Unhealthy || self.failures >= hc.unhealthy_threshold.max(1) {
            self.failures = 0;
            return Some(true);
        }
        None
    }
}

/// Checks `host` with check `index` of its cluster until the cluster or the
/// endpoint goes (the task is aborted, or the cluster's `Weak` is dead) or
/// the proxy stops. The first check runs at once; the next ones `interval`
/// (plus up to 5% jitter) after the previous one ended.
pub(crate) async fn run(
    cluster: Weak<ClusterHealth>,
    host: Arc<Host>,
    index: usize,
    spec: Spec,
    env: Arc<Env>,
    destination: String,
) {
    let count = |p: Probe| {
        env.metrics()
            .event(Event::HealthCheck, &destination, p.label())
    };
    let counters = [
        count(Probe::Healthy),
        count(Probe::Unhealthy),
        count(Probe::Timeout),
    ];
    // Envoy requires interval > 0; a zero one must not spin.
    let interval = spec.check.interval.max(Duration::from_millis(1));
    let mut session = Session::default();
    let mut conn = None;
    loop {
        let probe = tokio::select! {
            p = probe(host.address, &spec, &mut conn) => p,
            () = env.stopped() => return,
        };
        let counter = match probe {
            Probe::Healthy => &counters[0],
            Probe::Unhealthy | Probe::NetworkFailure => &counters[1],
            Probe::Timeout => &counters[2],
        };
        counter.inc();
        let Some(c) = cluster.upgrade() else {
            return;
        };
        c.check_result(&host, index, probe, &mut session);
        drop(c);
        let jitter = interval.mul_f64(fastrand::f64() * 0.05);
        tokio::select! {
            () = tokio::time::sleep(interval + jitter) => {}
            () = env.stopped() => return,
        }
    }
}

/// One check of `addr`, within the check's timeout, on `conn` if it is
/// still open (HTTP and gRPC); leaves the connection to reuse in `conn`.
pub(crate) async fn probe(addr: SocketAddr, spec: &Spec, conn: &mut Option<Conn>) -> Probe {
    let result = match tokio::time::timeout(spec.check.timeout, attempt(addr, spec, conn)).await {
        Ok(p) => p,
        Err(_) => {
            // The connection may be mid-exchange: never reuse it.
            *conn = None;
            Probe::Timeout
        }
    };
    tracing::trace!(cluster = %spec.cluster, endpoint = %addr, result = ?result, "health check");
    result
}

async fn attempt(addr: SocketAddr, spec: &Spec, conn: &mut Option<Conn>) -> Probe {
    if matches!(spec.check.kind, HealthCheckKind::Tcp) {
        return match transport(addr, spec).await {
            Some(_) => Probe::Healthy,
            None => Probe::NetworkFailure,
        };
    }
    let http2 = spec.http2 || matches!(spec.check.kind, HealthCheckKind::Grpc { .. });
    let reusable = conn.as_ref().is_some_and(|c| match &c.sender {
        Sender::H1(s) => s.is_ready(),
        Sender::H2(s) => !s.is_closed(),
    });
    if !reusable {
        *conn = None;
        let Some(io) = transport(addr, spec).await else {
            return Probe::NetworkFailure;
        };
        let opened = match io {
            Transport::Plain(s) => handshake(s, http2).await,
            Transport::Tls(s) => handshake(*s, http2).await,
        };
        match opened {
            Ok(c) => *conn = Some(c),
            Err(e) => {
                tracing::debug!(cluster = %spec.cluster, endpoint = %addr, error = %e, "health check: HTTP handshake failed");
                return Probe::NetworkFailure;
            }
        }
    }
    let Some(c) = conn.as_mut() else {
        return Probe::NetworkFailure;
    };
    let (probe, keep) = exchange(c, addr, spec).await;
    if !keep {
        *conn = None;
    }
    probe
}

/// A connected (possibly mTLS) stream to a checked endpoint.
enum Transport {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

/// Connects to `addr` (and does the mTLS handshake for mTLS endpoints);
/// `None` on failure (logged).
async fn transport(addr: SocketAddr, spec: &Spec) -> Option<Transport> {
    let target = Target {
        addr,
        http2: spec.http2,
        connect_timeout: spec.check.timeout,
        idle_timeout: None,
        tls: None,
    };
    let stream = match crate::upstream::connect(&target).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(cluster = %spec.cluster, endpoint = %addr, error = %e, "health check: cannot connect");
            return None;
        }
    };
    let Some(tls) = &spec.tls else {
        return Some(Transport::Plain(stream));
    };
    match crate::tls::connect(tls.client.clone(), addr, stream, spec.check.timeout).await {
        Ok(s) => Some(Transport::Tls(Box::new(s))),
        Err(e) => {
            tracing::debug!(cluster = %spec.cluster, endpoint = %addr, error = %e, "health check: mTLS handshake failed");
            None
        }
    }
}

/// An HTTP/1.1 or HTTP/2 (prior knowledge) client connection over `io`.
async fn handshake<IO>(io: IO, http2: bool) -> Result<Conn, hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    if http2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(io))
            .await?;
        let task = Task(tokio::spawn(async move {
            let _ = conn.await;
        }));
        Ok(Conn {
            sender: Sender::H2(sender),
            _task: task,
        })
    } else {
        let (sender, conn) = http1::handshake(TokioIo::new(io)).await?;
        let task = Task(tokio::spawn(async move {
            let _ = conn.await;
        }));
        Ok(Conn {
            sender: Sender::H1(sender),
            _task: task,
        })
    }
}

/// Sends one request on `conn`.
async fn send(
    conn: &mut Conn,
    req: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, hyper::Error> {
    match &mut conn.sender {
        Sender::H1(s) => s.send_request(req).await,
        Sender::H2(s) => s.send_request(req).await,
    }
}

/// One HTTP or gRPC check on `conn`: the result, and whether the
/// connection may serve the next check.
async fn exchange(conn: &mut Conn, addr: SocketAddr, spec: &Spec) -> (Probe, bool) {
    let http2 = matches!(conn.sender, Sender::H2(_));
    match &spec.check.kind {
        HealthCheckKind::Tcp => (Probe::Healthy, false),
        HealthCheckKind::Http {
            path,
            host,
            expected,
        } => {
            let authority = host.as_deref().unwrap_or(&spec.cluster);
            let req = match request(
                Method::GET,
                authority,
                addr,
                path,
                http2,
                spec.tls.is_some(),
                Bytes::new(),
            ) {
                Ok(r) => r,
                Err(reason) => {
                    tracing::warn!(cluster = %spec.cluster, "HTTP health check cannot be sent: {reason}");
                    return (Probe::Unhealthy, false);
                }
            };
            let response = match send(conn, req).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(cluster = %spec.cluster, endpoint = %addr, error = %e, "HTTP health check failed");
                    return (Probe::NetworkFailure, false);
                }
            };
            let status = response.status().as_u16();
            let closing = closes(response.headers());
            let verdict = if expected_status(expected, status) {
                Probe::Healthy
            } else {
                tracing::debug!(cluster = %spec.cluster, endpoint = %addr, status, "HTTP health check: unexpected status");
                Probe::Unhealthy
            };
            match collect(response.into_body(), true).await {
                Ok((_, _, complete)) => (verdict, complete && !closing),
                Err(e) => {
                    tracing::debug!(cluster = %spec.cluster, endpoint = %addr, error = %e, "HTTP health check: response body failed");
                    (Probe::NetworkFailure, false)
                }
            }
        }
        HealthCheckKind::Grpc { service, authority } => {
            let authority = authority.as_deref().unwrap_or(&spec.cluster);
            let req = match request(
                Method::POST,
                authority,
                addr,
                GRPC_HEALTH_PATH,
                true,
                spec.tls.is_some(),
                grpc_request(service),
            ) {
                Ok(mut r) => {
                    let h = r.headers_mut();
                    h.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/grpc"),
                    );
                    h.insert(header::TE, HeaderValue::from_static("trailers"));
                    r
                }
                Err(reason) => {
                    tracing::warn!(cluster = %spec.cluster, "gRPC health check cannot be sent: {reason}");
                    return (Probe::Unhealthy, false);
                }
            };
            let response = match send(conn, req).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(cluster = %spec.cluster, endpoint = %addr, error = %e, "gRPC health check failed");
                    return (Probe::NetworkFailure, false);
                }
            };
            grpc_verdict(response, spec, addr).await
        }
    }
}

/// The verdict on a gRPC health response, and whether the connection may
/// serve the next check.
async fn grpc_verdict(
    response: Response<Incoming>,
    spec: &Spec,
    addr: SocketAddr,
) -> (Probe, bool) {
    if response.status() != StatusCode::OK {
        tracing::debug!(cluster = %spec.cluster, endpoint = %addr, status = response.status().as_u16(), "gRPC health check: HTTP status not 200");
        return (Probe::Unhealthy, false);
    }
    // A trailers-only response carries grpc-status in its headers.
    let header_status = grpc_status(response.headers());
    let (data, trailers, complete) = match collect(response.into_body(), false).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(cluster = %spec.cluster, endpoint = %addr, error = %e, "gRPC health check: response failed");
            return (Probe::NetworkFailure, false);
        }
    };
    (
        grpc_status_verdict(&data, trailers.as_ref(), header_status, spec, addr),
        complete,
    )
}

fn grpc_status_verdict(
    data: &[u8],
    trailers: Option<&HeaderMap>,
    header_status: Option<u32>,
    spec: &Spec,
    addr: SocketAddr,
) -> Probe {
    let status = trailers.and_then(grpc_status).or(header_status);
    if status != Some(0) {
        tracing::debug!(cluster = %spec.cluster, endpoint = %addr, grpc_status = ?status, "gRPC health check: call failed");
        return Probe::Unhealthy;
    }
    match serving_status(data) {
        Some(SERVING) => Probe::Healthy,
        other => {
            tracing::debug!(cluster = %spec.cluster, endpoint = %addr, serving_status = ?other, "gRPC health check: not serving");
            Probe::Unhealthy
        }
    }
}

/// A check request: origin-form URI and `Host` for HTTP/1.1, absolute URI
/// (`:authority`) for HTTP/2. A name that cannot be an HTTP/2 authority
/// (meshwork's cluster names contain `|`) is replaced by the endpoint's
/// address there; Envoy sends such names as they are.
fn request(
    method: Method,
    authority: &str,
    addr: SocketAddr,
    path: &str,
    http2: bool,
    tls: bool,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, String> {
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = method;
    if http2 {
        let authority = match http::uri::Authority::try_from(authority) {
            Ok(a) => a,
            Err(_) => http::uri::Authority::try_from(addr.to_string())
                .map_err(|e| format!("invalid authority {addr}: {e}"))?,
        };
        *req.uri_mut() = Uri::builder()
            .scheme(if tls { "https" } else { "http" })
            .authority(authority)
            .path_and_query(path)
            .build()
            .map_err(|e| format!("invalid path {path:?}: {e}"))?;
        *req.version_mut() = Version::HTTP_2;
    } else {
        *req.uri_mut() = path
            .parse()
            .map_err(|e| format!("invalid path {path:?}: {e}"))?;
        let host = HeaderValue::try_from(authority)
            .map_err(|e| format!("invalid host {authority:?}: {e}"))?;
        req.headers_mut().insert(header::HOST, host);
    }
    req.headers_mut()
        .insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
    Ok(req)
}

/// Reads a response body: up to [`BODY_LIMIT`] bytes of data (with
/// `stop_at_limit`, nothing more is read), the trailers, and whether the
/// body was read to its end.
async fn collect(
    mut body: Incoming,
    stop_at_limit: bool,
) -> Result<(Vec<u8>, Option<HeaderMap>, bool), hyper::Error> {
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(chunk) => {
                let room = BODY_LIMIT.saturating_sub(data.len());
                data.extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or_default());
                if stop_at_limit && data.len() >= BODY_LIMIT {
                    return Ok((data, trailers, false));
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    Ok((data, trailers, true))
}

/// The response asks to close the connection after it.
fn closes(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"))
}

fn expected_status(ranges: &[(u16, u16)], status: u16) -> bool {
    if ranges.is_empty() {
        return status == 200;
    }
    ranges
        .iter()
        .any(|&(start, end)| (start..end).contains(&status))
}

fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A length-prefixed gRPC message holding `HealthCheckRequest{service}`.
pub(crate) fn grpc_request(service: &str) -> Bytes {
    let mut message = Vec::with_capacity(service.len() + 6);
    if !service.is_empty() {
        // Field 1, wire type 2 (length-delimited).
        message.push(0x0a);
        put_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    let mut frame = Vec::with_capacity(message.len() + 5);
    frame.push(0); // not compressed
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    frame.into()
}

/// `HealthCheckResponse.status` (field 1) of the first gRPC message in
/// `data`: 0 (`UNKNOWN`) when absent, `None` when the data is not one
/// uncompressed, well-formed message.
pub(crate) fn serving_status(data: &[u8]) -> Option<u64> {
    let (&compressed, rest) = data.split_first()?;
    if compressed != 0 {
        return None;
    }
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let mut message = rest.get(4..4 + len)?;
    let mut status = 0;
    while !message.is_empty() {
        let key = take_varint(&mut message)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = take_varint(&mut message)?,
            (_, 0) => {
                take_varint(&mut message)?;
            }
            (_, 1) => message = message.get(8..)?,
            (_, 2) => {
                let n = usize::try_from(take_varint(&mut message)?).ok()?;
                message = message.get(n..)?;
            }
            (_, 5) => message = message.get(4..)?,
            _ => return None,
        }
    }
    Some(status)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn take_varint(data: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = data.split_first()?;
        *data = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

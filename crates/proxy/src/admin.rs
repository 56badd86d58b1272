//! Admin HTTP server (port 15000, localhost): health, metrics, config and
//! log level of a running proxy.
//!
//! Contract:
//! - [`serve`] runs the accept loop until `shutdown` completes, then stops
//!   accepting, asks open connections to close after their current request
//!   and waits for them. Run it on its own task, away from the data path.
//! - Endpoints (HEAD works wherever GET does):
//!   | method | path | answer |
//!   |---|---|---|
//!   | GET | `/` | this list, as text |
//!   | GET | `/ready` | 200 `ready` / 503 `not ready`, or 503 `draining` after `POST /healthcheck/fail` |
//!   | GET | `/live` | 200 `live` |
//!   | GET | `/metrics` | Prometheus text 0.0.4 |
//!   | GET | `/config_dump` | the config in use, JSON |
//!   | GET | `/listeners` | JSON object: listener name -> bound address |
//!   | GET | `/clusters` | JSON object: cluster name -> balancer state: policy, panic threshold, priority levels (endpoints, healthy, load percent, panic) and endpoints (priority, weight, in flight, latency estimate, health flags, outlier ejections) and `circuit_breakers` (requests, pending requests, connections, retries in flight, each with its limit) |
//!   | GET | `/certs` | the workload certificate (SPIFFE id, serial, fingerprint, validity, renewals) and trust bundle, JSON |
//!   | GET | `/logging` | the log filter in effect |
//!   | POST | `/logging?level=L` or `?filter=DIRECTIVES` | changes it; 400 with the reason if invalid |
//!   | POST | `/healthcheck/fail` | announces the workload as draining: a control plane marks its endpoints DRAINING, so callers stop picking it (Envoy's endpoint of the same name fails health checks for the same purpose) |
//!   | POST | `/healthcheck/ok` | announces the workload as serving again (also ends `--workload-state starting`) |
//!   | POST | `/drain_listeners` or `?inboundonly` | stops accepting on every listener (or only the inbound ones), lets open connections finish; answers once they no longer accept (Envoy's endpoint of the same name) |
//!
//!   Other paths get 404 with the list; other methods 405 with `Allow`.
//! - POSTs carrying an `Origin` header (sent by browsers) get 403, so a web
//!   page cannot drive the admin API through a local browser.
//! - Garbage on the socket gets hyper's 400 and a close; nothing here panics
//!   on input. Slow clients are cut off by a header read timeout, and at most
//!   `MAX_CONNECTIONS` are served at once.
//!
//! Non-goals: authentication or TLS (bind it to localhost), HTML pages,
//! HTTP/2, changing config through this port.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE, ORIGIN};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::logging::LogHandle;
use crate::metrics::Metrics;
use crate::xds_client::WorkloadState;

/// What the admin server shows about the proxy. Implemented by the proxy's
/// composition root; tests use a fake.
pub trait AdminSource: Send + Sync + 'static {
    /// Config received and listeners bound: ready for traffic.
    fn ready(&self) -> bool;
    /// The config in use, for `/config_dump`.
    fn config_dump(&self) -> serde_json::Value;
    /// Listener names and the addresses they are bound to.
    fn listeners(&self) -> Vec<(String, SocketAddr)>;
    /// Each cluster's endpoints with their load and health, for `/clusters`.
    fn clusters(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    /// The workload certificate and trust bundle, for `/certs`; `None`
    /// when the proxy runs without an identity.
    fn certs(&self) -> Option<serde_json::Value> {
        None
    }
    /// Extra Prometheus text appended to `/metrics` (identity metrics).
    fn render_metrics(&self, _out: &mut String) {}
    /// `POST /drain_listeners`: stop accepting on the inbound listeners (or
    /// on all), let their open connections finish, and keep them out of
    /// service across config updates. Resolves, once they no longer accept,
    /// to the names of the listeners taken out; `None` if the source cannot
    /// drain.
    fn drain_listeners(self: Arc<Self>, _inbound_only: bool) -> DrainFuture {
        Box::pin(async { None })
    }
    /// `POST /healthcheck/fail` and `/ok`: the state the node announces.
    /// `Some(true)`: a control plane is told (on the open xDS stream, or
    /// when it reconnects); `Some(false)`: recorded, but nothing to tell
    /// (no control plane, or no workload registered); `None`: not supported.
    fn set_workload_state(&self, _state: WorkloadState) -> Option<bool> {
        None
    }
    /// After `POST /healthcheck/fail`: `/ready` answers 503 `draining`, as
    /// Envoy's does once its health checks are failed.
    fn draining(&self) -> bool {
        false
    }
}

/// What [`AdminSource::drain_listeners`] returns.
pub type DrainFuture = Pin<Box<dyn Future<Output = Option<Vec<String>>> + Send>>;

/// Everything a request handler needs.
struct Admin {
    source: Arc<dyn AdminSource>,
    metrics: Arc<Metrics>,
    log: LogHandle,
}

/// Path, allowed methods (GET implies HEAD), description: the index and the
/// 404/405 answers come from this one table.
const ENDPOINTS: [(&str, &[Method], &str); 13] = [
    ("/", &[Method::GET], "this list"),
    (
        "/ready",
        &[Method::GET],
        "200 when ready for traffic, 503 otherwise",
    ),
    ("/live", &[Method::GET], "200 while the process runs"),
    (
        "/metrics",
        &[Method::GET],
        "Prometheus metrics (text format 0.0.4)",
    ),
    ("/config_dump", &[Method::GET], "the config in use, as JSON"),
    (
        "/listeners",
        &[Method::GET],
        "listener name -> bound address, as JSON",
    ),
    (
        "/clusters",
        &[Method::GET],
        "each cluster's endpoints (priority, load, health, outlier ejections) and circuit breakers, as JSON",
    ),
    (
        "/certs",
        &[Method::GET],
        "the workload certificate and trust bundle, as JSON",
    ),
    ("/logging", &[Method::GET], "the log filter in effect"),
    (
        "/logging",
        &[Method::POST],
        "?level=debug or ?filter=info,proxy=debug: change the log filter",
    ),
    (
        "/healthcheck/fail",
        &[Method::POST],
        "announce the workload as draining: callers stop picking it",
    ),
    (
        "/healthcheck/ok",
        &[Method::POST],
        "announce the workload as serving",
    ),
    (
        "/drain_listeners",
        &[Method::POST],
        "?inboundonly: stop accepting (inbound listeners only), let open connections finish",
    ),
];

/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop
/// does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves the admin API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    source: Arc<dyn AdminSource>,
    metrics: Arc<Metrics>,
    log: LogHandle,
    shutdown: impl Future<Output = ()>,
) {
    let admin = Arc::new(Admin {
        source,
        metrics,
        log,
    });
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept(), if conns.len() < MAX_CONNECTIONS => match accepted {
                Ok((stream, peer)) => {
                    conns.spawn(serve_connection(
                        stream,
                        peer,
                        Arc::clone(&admin),
                        closing_rx.clone(),
                    ));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
            // Reap finished connections so the set (and the limit) stays exact.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    // No receiver left is fine: then no connection is open.
    let _ = closing_tx.send(true);
    while conns.join_next().await.is_some() {}
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    admin: Arc<Admin>,
    mut closing: watch::Receiver<bool>,
) {
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        // Draining waits for the listeners; everything else answers at once.
        let answer = match drain_request(&req) {
            Some(query) => Err((Arc::clone(&admin), query)),
            None => Ok(handle(&admin, &req)),
        };
        async move {
            Ok::<_, Infallible>(match answer {
                Ok(response) => response,
                Err((admin, query)) => drain_listeners(&admin, &query).await,
            })
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = closing.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "admin connection ended with an error");
    }
}

/// Answers one request. Pure apart from what `Admin`'s parts report, so it is
/// testable without a socket.
fn handle<B>(admin: &Admin, req: &Request<B>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let method = if req.method() == Method::HEAD {
        &Method::GET
    } else {
        req.method()
    };
    match (method, path) {
        (&Method::GET, "/") => text(StatusCode::OK, index()),
        (&Method::GET, "/ready") => {
            if admin.source.draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
            } else if admin.source.ready() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
            }
        }
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n".into()),
        (&Method::GET, "/metrics") => {
            let mut out = admin.metrics.render();
            admin.source.render_metrics(&mut out);
            respond(StatusCode::OK, PROMETHEUS, out.into())
        }
        (&Method::GET, "/certs") => match admin.source.certs() {
            Some(certs) => json(&certs),
            None => respond(
                StatusCode::NOT_FOUND,
                JSON,
                serde_json::json!({
                    "error": "this proxy has no workload identity: start it with --token (or --token-file) and --ca-bundle to get one"
                })
                .to_string()
                .into(),
            ),
        },
        (&Method::GET, "/config_dump") => json(&admin.source.config_dump()),
        (&Method::GET, "/clusters") => json(&admin.source.clusters()),
        (&Method::GET, "/listeners") => {
            let listeners: serde_json::Map<String, serde_json::Value> = admin
                .source
                .listeners()
                .into_iter()
                .map(|(name, addr)| (name, serde_json::Value::String(addr.to_string())))
                .collect();
            json(&serde_json::Value::Object(listeners))
        }
        (&Method::GET, "/logging") => text(StatusCode::OK, format!("{}\n", admin.log.current())),
        // Browsers send `Origin` on cross-site POSTs; a web page must not be
        // able to change the proxy's log level through the user's browser.
        (&Method::POST, _) if req.headers().contains_key(ORIGIN) => text(
            StatusCode::FORBIDDEN,
            "requests from web pages (with an Origin header) may not change anything\n".into(),
        ),
        (&Method::POST, "/logging") => set_logging(admin, req.uri().query().unwrap_or("")),
        (&Method::POST, "/healthcheck/fail") => set_workload_state(admin, WorkloadState::Draining),
        (&Method::POST, "/healthcheck/ok") => set_workload_state(admin, WorkloadState::Serving),
        _ => not_found_or_not_allowed(path),
    }
}

fn set_workload_state(admin: &Admin, state: WorkloadState) -> Response<Full<Bytes>> {
    match admin.source.set_workload_state(state) {
        Some(true) => text(
            StatusCode::OK,
            format!("{state}: announced to the control plane (on the open xDS stream, or when it reconnects)\n"),
        ),
        Some(false) => text(
            StatusCode::OK,
            format!("{state}: recorded, but nothing to announce (no control plane, or no --service registered)\n"),
        ),
        None => text(
            StatusCode::NOT_IMPLEMENTED,
            "this proxy cannot announce its workload's state\n".into(),
        ),
    }
}

/// The query of a `POST /drain_listeners` that may be served (no `Origin`:
/// [`handle`] refuses those).
fn drain_request<B>(req: &Request<B>) -> Option<String> {
    (req.method() == Method::POST
        && req.uri().path() == "/drain_listeners"
        && !req.headers().contains_key(ORIGIN))
    .then(|| req.uri().query().unwrap_or("").to_owned())
}

async fn drain_listeners(admin: &Admin, query: &str) -> Response<Full<Bytes>> {
    let mut inbound_only = false;
    for key in query.split('&').filter(|p| !p.is_empty()) {
        match key {
            "inboundonly" => inbound_only = true,
            // Envoy's flag; draining here is always graceful.
            "graceful" => {}
            _ => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter {key:?}: use /drain_listeners or /drain_listeners?inboundonly\n"),
                )
            }
        }
    }
    match Arc::clone(&admin.source)
        .drain_listeners(inbound_only)
        .await
    {
        Some(names) => {
            tracing::info!(
                ?names,
                inbound_only,
                "listeners drained through the admin API"
            );
            text(
                StatusCode::OK,
                format!("OK: stopped accepting on [{}]\n", names.join(", ")),
            )
        }
        None => text(
            StatusCode::NOT_IMPLEMENTED,
            "this proxy cannot drain its listeners\n".into(),
        ),
    }
}

fn set_logging(admin: &Admin, query: &str) -> Response<Full<Bytes>> {
    let mut level = None;
    let mut filter = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(value) = percent_decode(value) else {
            return text(
                StatusCode::BAD_REQUEST,
                format!("bad percent-encoding in the value of {key:?}\n"),
            );
        };
        match key {
            "level" => level = Some(value),
            "filter" => filter = Some(value),
            _ => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown parameter {key:?}: use ?level=debug or ?filter=info,proxy=debug\n"
                    ),
                )
            }
        }
    }
    let result = match (level, filter) {
        (Some(level), None) => admin.log.set_level(&level),
        (None, Some(filter)) => admin.log.set(&filter),
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                "give exactly one of ?level=debug or ?filter=info,proxy=debug\n".into(),
            )
        }
    };
    match result {
        Ok(()) => text(
            StatusCode::OK,
            format!("log filter set to {}\n", admin.log.current()),
        ),
        Err(reason) => text(StatusCode::BAD_REQUEST, format!("{reason}\n")),
    }
}

fn not_found_or_not_allowed(path: &str) -> Response<Full<Bytes>> {
    let allowed: Vec<&Method> = ENDPOINTS
        .iter()
        .filter(|(p, _, _)| *p == path)
        .flat_map(|(_, methods, _)| methods.iter())
        .collect();
    if allowed.is_empty() {
        // Echo the path only as Debug, so control characters stay escaped.
        return text(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {path:?}\n\n{}", index()),
        );
    }
    let mut names: Vec<&str> = allowed.iter().map(|m| m.as_str()).collect();
    if allowed.contains(&&Method::GET) {
        names.push("HEAD");
    }
    let allow = names.join(", ");
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{path} allows {allow}\n"),
    );
    if let Ok(value) = HeaderValue::from_str(&allow) {
        response.headers_mut().insert(ALLOW, value);
    }
    response
}

fn index() -> String {
    let mut out = String::from("meshwork proxy admin\n\n");
    for (path, methods, what) in ENDPOINTS {
        for method in methods {
            out.push_str(&format!("{:<5} {:<13} {what}\n", method.as_str(), path));
        }
    }
    out
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            respond(StatusCode::OK, JSON, body.into())
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode JSON: {e}\n"),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    respond(status, TEXT, body.into())
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Decodes `%XX` and `+` (space) of a query value; `None` if malformed or not
/// UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = hex(bytes.next()?)?;
                let lo = hex(bytes.next()?)?;
                out.push(hi << 4 | lo);
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests;

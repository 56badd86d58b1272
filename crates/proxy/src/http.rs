//! The HTTP request path: route, pick a backend, forward, observe.
//!
//! One function per step, called in order from [`handle`]: find the route
//! table of the listener's connection manager, the virtual host by authority,
//! the first matching route; then redirect, answer directly, or forward:
//! choose a weighted cluster, hash the request (ring hash / maglev), pick an
//! endpoint, rewrite, apply header filters, mirror, send through the pool, and
//! stream the response back while counting it. Responses the proxy makes
//! itself carry `x-meshwork-error: <reason>` and a body that says why.
//!
//! Forwarding, in Envoy's terms: attempts run until one is not retried
//! (`Attempts::run`). Each takes a `requests` slot of the cluster's circuit
//! breaker (`breaker`; held until its response ends), leases a connection
//! within the breaker's `connections`/`pending_requests` limits, is bounded
//! by the per-try timeout (counted from when it has its connection, as
//! Envoy's starts in `onPoolReady`) and the route timeout (one deadline over
//! all attempts, connection waits and backoffs included), reports its
//! outcome to its endpoint (outlier detection; a timeout while still
//! waiting for a connection is not the endpoint's), and is classified
//! against the route's `retry_policy` (`retry`). A retry needs attempts left, a replayable body and a
//! `retries` slot (budget or `max_retries`); otherwise the last upstream
//! response is forwarded (or the local reply for a connect failure, reset
//! or per-try timeout). The stream idle timeout (route `idle_timeout`, else
//! the connection manager's `stream_idle_timeout`, else 5 minutes) resets
//! streams on which no bytes moved in either direction: before the response
//! headers with 504 (408 while the request is still arriving), after them
//! by resetting the stream.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::Instrument;

use crate::accesslog::{AccessLogEntry, Protocol, ResponseFlag};
use crate::balance::{request_hash, Pick};
use crate::body::{self, Body, BoxError};
use crate::breaker::{self, Breaker, Overflow};
use crate::config::model::{
    Forward, HttpConnectionManager, RetryPolicy, Route, RouteAction, VirtualHost,
};
use crate::filters;
use crate::metrics::Event;
use crate::retry::{self, Activity, RequestBody, TryOutcome};
use crate::router;
use crate::runtime::{ClusterState, Runtime};
use crate::shared::{Direction, Shared};
use crate::upstream::{self, Lease, Returner, Target, UpstreamError};

/// Header on every response the proxy generates itself, naming the reason.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-meshwork-error");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// On local replies to a circuit breaker overflow, as Envoy.
const X_ENVOY_OVERLOADED: HeaderName = HeaderName::from_static("x-envoy-overloaded");
/// Envoy's default route timeout, used when a route sets none.
const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Envoy's default `stream_idle_timeout`, used when neither the route nor
/// the connection manager sets one.
const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Mirrors of requests with bodies larger than this are skipped.
const MAX_MIRROR_BODY: usize = 1 << 20;
/// How long a mirrored request may take before it is abandoned.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// Per-connection facts every request on it shares.
#[derive(Debug)]
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    pub direction: Direction,
    /// Held by upgraded tunnels so a drain waits for them (up to its deadline).
    pub drain: crate::drain::Watch,
    pub hcm: Arc<HttpConnectionManager>,
    pub peer: SocketAddr,
    /// SPIFFE id of the verified TLS peer; `None` for plaintext (set where
    /// the connection is accepted, in `listener`).
    pub peer_identity: Option<Arc<str>>,
    /// Metric handles this connection used, so keep-alive requests skip the
    /// registry lookup.
    pub series: std::sync::Mutex<Vec<SeriesKey>>,
}

/// A cached metric handle: (destination, route) -> series.
pub type SeriesKey = (String, String, Arc<crate::metrics::HttpSeries>);

impl ConnCtx {
    fn http_series(&self, dest: &str, route: &str) -> Arc<crate::metrics::HttpSeries> {
        let mut cache = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, s)) = cache.iter().find(|(d, r, _)| d == dest && r == route) {
            return s.clone();
        }
        let s = self
            .shared
            .http_series(self.direction, dest, route, self.peer_identity.as_deref());
        if cache.len() < 16 {
            cache.push((dest.to_owned(), route.to_owned(), s.clone()));
        }
        s
    }
}

/// Serves one request. Never fails: every error becomes a response.
pub async fn handle(
    conn: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let rt = conn.shared.runtime();
    let mut obs = Observation::start(&conn, &req);
    // One span per request (inside the connection's span).
    let span = tracing::debug_span!("request", method = %req.method(), authority = %obs.authority, path = %req.uri().path());
    let response = route_and_forward(&conn, &rt, req, &mut obs)
        .instrument(span)
        .await;
    Ok(obs.finish_response(response))
}

async fn route_and_forward(
    conn: &Arc<ConnCtx>,
    rt: &Arc<Runtime>,
    req: Request<Incoming>,
    obs: &mut Observation,
) -> Response<Body> {
    // Authorization runs first, as Envoy's RBAC filters precede the router.
    if let Some(authz) = &conn.hcm.authz {
        if let Some(denied) = authorize(conn, authz, &req, obs) {
            return denied;
        }
    }
    let authority = obs.authority.clone();
    let (parts, body) = req.into_parts();
    // A miss is answered after the rate limit and fault filters: they run
    // before the router in Envoy, so requests no route matches meet the
    // connection manager's limit and fault too.
    let selected = select(conn, rt, &authority, &parts);
    let route = selected.as_ref().ok().map(|(_, r)| *r);
    if let Some(route) = route {
        obs.route = Some(route.name.clone());
    }
    // Then Envoy's order: local_ratelimit, fault, router.
    let mut rate_headers = None;
    if let Some(limit) = crate::ratelimit::effective(&conn.hcm, route) {
        let site = selected.as_ref().ok().copied();
        match check_rate_limit(conn, rt, limit, site, &parts, obs) {
            Ok(headers) => rate_headers = headers,
            Err(refused) => return *refused,
        }
    }
    if let Some(fault) = crate::fault::effective(&conn.hcm, route) {
        if let Some(aborted) = inject_fault(conn, rt, fault, route, &parts.headers, obs).await {
            return with_rate_headers(aborted, rate_headers);
        }
    }
    let (vh, route) = match selected {
        Ok(found) => found,
        Err(message) => {
            let resp = local_reply(obs, StatusCode::NOT_FOUND, ResponseFlag::NoRoute, message);
            return with_rate_headers(resp, rate_headers);
        }
    };
    let resp = match &route.action {
        RouteAction::Redirect(r) => {
            let scheme = parts.uri.scheme_str().unwrap_or("http");
            let location =
                filters::redirect_location(r, &route.matcher.path, scheme, &authority, &parts.uri);
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = crate::config::model::redirect_status(r.status);
            if let Ok(v) = HeaderValue::try_from(location) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            filters::apply_response_headers(vh, route, None, resp.headers_mut());
            resp
        }
        RouteAction::Direct { status, body: text } => {
            let mut resp = Response::new(body::full(text.clone()));
            *resp.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
            filters::apply_response_headers(vh, route, None, resp.headers_mut());
            resp
        }
        RouteAction::Forward(fwd) => {
            forward(
                conn,
                rt,
                vh,
                route,
                fwd,
                Request::from_parts(parts, body),
                obs,
            )
            .await
        }
    };
    with_rate_headers(resp, rate_headers)
}

/// The virtual host and route of a request, or why there is none (the
/// body of a 404).
fn select<'a>(
    conn: &'a ConnCtx,
    rt: &'a Runtime,
    authority: &str,
    parts: &http::request::Parts,
) -> Result<(&'a VirtualHost, &'a Route), String> {
    let Some(table) = rt.route_table(&conn.hcm) else {
        return Err(format!(
            "route configuration {:?} is not loaded",
            conn.hcm.route_config_name
        ));
    };
    let Some(vh) = router::select_vhost(table, authority) else {
        return Err(format!("no service matches host {authority:?}; the host must be <service>, <service>.<namespace>, optionally with :port"));
    };
    let Some(route) = router::select_route(vh, parts) else {
        return Err(format!(
            "no route of {} matches {} {}",
            vh.name,
            parts.method,
            parts.uri.path()
        ));
    };
    Ok((vh, route))
}

/// The `destination_service` of rate limit and fault counters: the local
/// service inbound; outbound the service of the route's (first) cluster,
/// else the route's name, else the connection manager's.
fn policy_destination(conn: &ConnCtx, rt: &Runtime, route: Option<&Route>) -> String {
    if conn.direction == Direction::Inbound {
        return conn.shared.local_service().to_string();
    }
    let Some(route) = route else {
        return conn.hcm.stat_prefix.clone();
    };
    let service = match &route.action {
        RouteAction::Forward(fwd) => fwd
            .clusters
            .first()
            .and_then(|wc| rt.cluster(&wc.name))
            .and_then(|c| c.config.service.clone()),
        _ => None,
    };
    service.unwrap_or_else(|| route.name.clone())
}

/// The local rate limit filter: takes a token. `Ok`: allowed, with the
/// `x-ratelimit-*` headers for the response when configured; `Err`: the
/// refusal (429 by default, or a trailers-only UNAVAILABLE for gRPC as
/// Envoy maps 429), counted in `meshwork_rate_limited_total{scope}`.
fn check_rate_limit(
    conn: &ConnCtx,
    rt: &Runtime,
    applicable: crate::ratelimit::Applicable<'_>,
    selected: Option<(&VirtualHost, &Route)>,
    parts: &http::request::Parts,
    obs: &mut Observation,
) -> Result<Option<crate::ratelimit::Headers>, Box<Response<Body>>> {
    let limit = applicable.limit;
    let source = if limit.per_source {
        conn.peer_identity
            .as_deref()
            .map_or_else(|| conn.peer.ip().to_string(), str::to_owned)
    } else {
        String::new()
    };
    let decision = conn.shared.rate_limits.check(
        applicable,
        crate::ratelimit::Site {
            hcm: &conn.hcm,
            route: selected,
            source: &source,
        },
    );
    let headers = limit.rate_limit_headers.then(|| decision.headers());
    if decision.allowed {
        return Ok(headers);
    }
    let route = selected.map(|(_, r)| r);
    let scope = applicable.scope();
    let destination = policy_destination(conn, rt, route);
    let event = crate::metrics::Event::RateLimited;
    conn.shared
        .metrics
        .event(event, &destination, scope.as_str())
        .inc();
    let message = crate::ratelimit::refusal_message(
        applicable,
        &destination,
        route.map_or("", |r| r.name.as_str()),
        &source,
        &decision,
    );
    obs.destination_service = Some(destination);
    let flag = ResponseFlag::RateLimited;
    let status = StatusCode::from_u16(limit.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
    let mut resp = if is_grpc(&parts.headers) {
        grpc_local_reply(obs, flag, grpc_status_of_http(status.as_u16()), &message)
    } else {
        local_reply(obs, status, flag, message)
    };
    let h = resp.headers_mut();
    // Envoy adds retry-after to 429s only.
    if limit.retry_after && status == StatusCode::TOO_MANY_REQUESTS {
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from(decision.retry_after_seconds()),
        );
    }
    for (name, value) in &limit.response_headers {
        // The translator adds `x-meshwork-error` for Envoy's sake; the
        // local reply carries it already.
        if !h.get_all(name).iter().any(|v| v == value) {
            h.append(name.clone(), value.clone());
        }
    }
    Err(Box::new(with_rate_headers(resp, headers)))
}

/// The fault filter: delays and/or aborts the request when its fault
/// selects it. `Some`: the abort's response (the configured HTTP status,
/// or a trailers-only gRPC response for gRPC requests and gRPC aborts).
/// Counted in `meshwork_faults_injected_total{kind}`.
async fn inject_fault(
    conn: &ConnCtx,
    rt: &Runtime,
    fault: &crate::config::model::Fault,
    route: Option<&Route>,
    headers: &HeaderMap,
    obs: &mut Observation,
) -> Option<Response<Body>> {
    use crate::config::model::AbortStatus;
    if !crate::fault::selects(fault, headers) {
        return None;
    }
    let count = |kind: &'static str| {
        let destination = policy_destination(conn, rt, route);
        conn.shared
            .metrics
            .event(crate::metrics::Event::FaultInjected, &destination, kind)
            .inc();
        destination
    };
    if let Some(delay) = crate::fault::delay(fault, crate::fault::draw()) {
        count("delay");
        // Log only: Envoy's DI, next to whatever else happens.
        obs.delay_injected = true;
        tracing::debug!(?delay, "fault injection: delaying the request");
        tokio::time::sleep(delay).await;
    }
    let status = crate::fault::abort(fault, crate::fault::draw())?;
    let destination = count("abort");
    let share = crate::fault::percent(fault.abort.as_ref().map_or(0, |a| a.per_million));
    let flag = ResponseFlag::FaultInjected;
    let resp = match status {
        AbortStatus::Http(code) => {
            let message = format!("fault injected: HTTP {code} for {share} of requests, as spec.fault.abort of the TrafficPolicy for {destination} asks");
            obs.destination_service = Some(destination);
            if is_grpc(headers) {
                grpc_local_reply(obs, flag, grpc_status_of_http(code), &message)
            } else {
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                local_reply(obs, status, flag, message)
            }
        }
        AbortStatus::Grpc(code) => {
            let message = format!("fault injected: gRPC status {code} for {share} of requests, as spec.fault.abort of the TrafficPolicy for {destination} asks");
            obs.destination_service = Some(destination);
            grpc_local_reply(obs, flag, code, &message)
        }
    };
    Some(resp)
}

/// Adds the rate limit filter's `x-ratelimit-*` headers (appended, as
/// Envoy's filter does, to whatever response the request got).
fn with_rate_headers(
    mut resp: Response<Body>,
    headers: Option<crate::ratelimit::Headers>,
) -> Response<Body> {
    for (name, value) in headers.into_iter().flatten() {
        resp.headers_mut().append(name, value);
    }
    resp
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC status Envoy gives a local reply with HTTP `status` for a gRPC
/// request (`Grpc::Utility::httpToGrpcStatus`).
fn grpc_status_of_http(status: u16) -> u32 {
    match status {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    }
}

/// A trailers-only gRPC response the proxy makes itself: HTTP 200 with
/// `grpc-status` and a percent-encoded `grpc-message`.
fn grpc_local_reply(
    obs: &mut Observation,
    flag: ResponseFlag,
    grpc_status: u32,
    message: &str,
) -> Response<Body> {
    tracing::debug!(reason = flag.reason(), %message, grpc_status, "local gRPC reply");
    obs.local(flag, message);
    obs.grpc_status = Some(grpc_status.to_string());
    let mut resp = Response::new(body::empty());
    let h = resp.headers_mut();
    h.insert(ERROR_HEADER, HeaderValue::from_static(flag.reason()));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(GRPC_STATUS, HeaderValue::from(grpc_status));
    if let Ok(v) = HeaderValue::try_from(grpc_message(message)) {
        h.insert(GRPC_MESSAGE, v);
    }
    resp
}

/// `grpc-message` encoding: printable ASCII except `%` as is, the rest
/// percent-encoded (gRPC over HTTP/2 spec).
fn grpc_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn forward(
    conn: &Arc<ConnCtx>,
    rt: &Arc<Runtime>,
    vh: &VirtualHost,
    route: &Route,
    fwd: &Forward,
    mut req: Request<Incoming>,
    obs: &mut Observation,
) -> Response<Body> {
    let Some(wc) = router::pick_cluster(&fwd.clusters, fastrand::u64(..)) else {
        return local_reply(
            obs,
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlag::NoCluster,
            format!("route {} has no backend with a non-zero weight", route.name),
        );
    };
    obs.cluster = Some(wc.name.clone());
    let Some(cluster) = rt.cluster(&wc.name) else {
        return local_reply(
            obs,
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlag::NoCluster,
            format!("cluster {:?} is not loaded", wc.name),
        );
    };
    obs.destination_service = cluster.config.service.clone();
    let hash = request_hash(&fwd.hash_policy, req.headers(), conn.peer);
    let Some(pick) = cluster.balancer.pick(hash.hash) else {
        return local_reply(
            obs,
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlag::NoHealthyUpstream,
            format!("cluster {} has no healthy endpoint (none known, or all failing health checks or ejected)", wc.name),
        );
    };
    obs.upstream = Some(pick.address());

    let upgrade = match upgrade_kind(&req) {
        Upgrade::None => false,
        Upgrade::WebSocket if conn.hcm.websocket => true,
        Upgrade::Other(kind) => {
            return local_reply(
                obs,
                StatusCode::FORBIDDEN,
                ResponseFlag::DownstreamProtocolError,
                format!("upgrade to {kind:?} is not enabled on this listener (only websocket)"),
            )
        }
        Upgrade::WebSocket => {
            return local_reply(
                obs,
                StatusCode::FORBIDDEN,
                ResponseFlag::DownstreamProtocolError,
                "websocket upgrades are not enabled on this listener",
            )
        }
    };
    let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();

    // Rewrite, then header filters from the most specific level outwards, as
    // Envoy applies them.
    let authority = fwd
        .host_rewrite
        .clone()
        .unwrap_or_else(|| obs.authority.clone());
    let uri =
        filters::rewrite(&route.matcher.path, fwd, &parts.uri).unwrap_or_else(|| parts.uri.clone());
    strip_hop_by_hop(&mut parts.headers, upgrade);
    filters::apply_request_headers(vh, route, Some(wc), &mut parts.headers);
    if !parts.headers.contains_key(X_REQUEST_ID) {
        parts.headers.insert(X_REQUEST_ID, request_id());
    }
    if obs.detailed {
        obs.request_id = header_str(&parts.headers, &X_REQUEST_ID);
    }
    parts
        .headers
        .entry(X_FORWARDED_PROTO)
        .or_insert(HeaderValue::from_static("http"));

    if let Err(e) = set_target_uri(&mut parts, uri, &authority, cluster.config.http2) {
        return local_reply(
            obs,
            StatusCode::BAD_REQUEST,
            ResponseFlag::DownstreamProtocolError,
            e,
        );
    }

    // Mirrors need the body twice: buffer it when small enough.
    let mirrors: Vec<_> = fwd
        .mirrors
        .iter()
        .filter(|m| {
            m.per_million
                .is_none_or(|p| fastrand::u32(0..1_000_000) < p)
        })
        .collect();
    // Mirroring needs the body twice, so only bodies known to be small are
    // mirrored; anything larger or open-ended (streams) is forwarded alone.
    let mirrorable = body
        .size_hint()
        .upper()
        .is_some_and(|n| n <= MAX_MIRROR_BODY as u64);
    if !mirrors.is_empty() && !mirrorable {
        tracing::debug!(route = %route.name, "request body too large or streaming: not mirrored");
    }
    // Upgrades are never retried (the connection becomes a tunnel).
    let policy = fwd.retry.as_deref().filter(|_| !upgrade);
    let activity = Activity::new(obs.received.clone());
    let body = if mirrors.is_empty() || !mirrorable {
        // A policy of no retries (a per-try timeout alone) keeps no copy.
        RequestBody::new(body, &activity, policy.is_some_and(|p| p.num_retries > 0))
    } else {
        match buffer_body(body).await {
            Ok(bytes) => {
                obs.received
                    .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                for m in mirrors {
                    spawn_mirror(&conn.shared.pools, rt, &m.cluster, &parts, bytes.clone());
                }
                RequestBody::full(bytes, &activity)
            }
            Err(e) => {
                return local_reply(
                    obs,
                    StatusCode::BAD_REQUEST,
                    ResponseFlag::DownstreamDisconnect,
                    format!("reading the request body failed: {e}"),
                )
            }
        }
    };

    let timeout = match fwd.timeout {
        None => Some(DEFAULT_ROUTE_TIMEOUT),
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
    };
    let idle = stream_idle_timeout(fwd, &conn.hcm);
    let dest = cluster
        .config
        .service
        .as_deref()
        .unwrap_or(&cluster.config.name);
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut attempts = Attempts {
        conn,
        cluster,
        parts: Some(parts),
        body,
        policy,
        hash: hash.hash,
        deadline,
        timeout,
        upgrade,
        dest,
    };
    // Before the response headers the stream idle timeout can only fire
    // first when it is shorter than the route timeout.
    let finished = match idle.filter(|i| timeout.is_none_or(|t| *i < t)) {
        Some(i) => tokio::select! {
            f = attempts.run(pick, obs) => f,
            () = retry::idle_expired(&activity, i) => Finished::Idle(i),
        },
        None => attempts.run(pick, obs).await,
    };
    let (mut resp, returner, pick, request_slot) = match finished {
        Finished::Response {
            resp,
            returner,
            pick,
            request_slot,
        } => (resp, returner, pick, request_slot),
        Finished::Reply(reply) => return reply,
        Finished::Idle(i) => return stream_idle_reply(obs, &activity, i),
    };

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(down) = on_upgrade {
            let up = hyper::upgrade::on(&mut resp);
            tokio::spawn(tunnel(down, up, conn.drain.clone()));
        }
    } else {
        strip_hop_by_hop(resp.headers_mut(), false);
    }
    filters::apply_response_headers(vh, route, Some(wc), resp.headers_mut());
    if let Some(cookie) = hash.set_cookie.and_then(|c| HeaderValue::try_from(c).ok()) {
        resp.headers_mut().append(header::SET_COOKIE, cookie);
    }
    obs.upstream_response(resp.headers());
    let (rparts, rbody) = resp.into_parts();
    // Envoy's route timeout covers the whole response, body included; the
    // stream idle timeout watches it too.
    let timer =
        next_timer(deadline, idle, &activity).map(|at| Box::pin(tokio::time::sleep_until(at)));
    let body = Observed {
        inner: rbody,
        returner,
        pick: Some(pick),
        bytes: 0,
        obs: Some(std::mem::take(obs).armed(rparts.status)),
        timer,
        deadline,
        timeout: timeout.unwrap_or_default(),
        idle,
        activity,
        _request_slot: request_slot,
    };
    Response::from_parts(rparts, body.boxed())
}

/// The stream idle timeout of a route: its own `idle_timeout`, else the
/// connection manager's `stream_idle_timeout`, else Envoy's default; zero
/// disables it.
fn stream_idle_timeout(fwd: &Forward, hcm: &HttpConnectionManager) -> Option<Duration> {
    let t = fwd
        .idle_timeout
        .or(hcm.stream_idle_timeout)
        .unwrap_or(DEFAULT_STREAM_IDLE_TIMEOUT);
    (!t.is_zero()).then_some(t)
}

/// When the response body's timer must next look: the route deadline or
/// the idle due time, whichever is first.
fn next_timer(
    deadline: Option<Instant>,
    idle: Option<Duration>,
    activity: &Activity,
) -> Option<Instant> {
    let idle_due = idle.map(|i| activity.last() + i);
    match (deadline, idle_due) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Envoy's answer when a stream idles out before the response started:
/// 504 once the whole request was received, else 408.
fn stream_idle_reply(obs: &mut Observation, activity: &Activity, idle: Duration) -> Response<Body> {
    let status = if activity.request_done() {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::REQUEST_TIMEOUT
    };
    local_reply(
        obs,
        status,
        ResponseFlag::StreamIdleTimeout,
        format!("stream idle timeout: no bytes moved in either direction for {idle:?}"),
    )
}

/// 503 for a circuit breaker overflow, with Envoy's `x-envoy-overloaded`.
fn overflow_reply(
    conn: &ConnCtx,
    obs: &mut Observation,
    dest: &str,
    overflow: &Overflow,
) -> Response<Body> {
    conn.shared
        .metrics
        .event(Event::Overflow, dest, overflow.limit.label())
        .inc();
    let mut resp = local_reply(
        obs,
        StatusCode::SERVICE_UNAVAILABLE,
        ResponseFlag::UpstreamOverflow,
        overflow.message(),
    );
    resp.headers_mut()
        .insert(X_ENVOY_OVERLOADED, HeaderValue::from_static("true"));
    resp
}

/// The attempts of one forwarded request: send, classify, maybe retry.
struct Attempts<'a> {
    conn: &'a Arc<ConnCtx>,
    cluster: &'a Arc<ClusterState>,
    /// The request as every attempt sends it (headers rewritten); the last
    /// possible attempt takes it.
    parts: Option<http::request::Parts>,
    body: RequestBody,
    policy: Option<&'a RetryPolicy>,
    hash: Option<u64>,
    /// The route timeout's deadline, over all attempts.
    deadline: Option<Instant>,
    timeout: Option<Duration>,
    upgrade: bool,
    /// `destination_service` of the resilience metrics.
    dest: &'a str,
}

/// How the attempts ended.
enum Finished {
    /// Response headers to forward (the last attempt's).
    Response {
        resp: Response<Incoming>,
        returner: Option<(Returner, upstream::Http1Sender)>,
        pick: Pick,
        /// The attempt's `requests` slot, held until the response ends.
        request_slot: breaker::Guard,
    },
    /// A local reply (connect failure, reset, timeout, overflow...).
    Reply(Response<Body>),
    /// The stream idle timeout fired before the response headers.
    Idle(Duration),
}

/// What one attempt got.
enum Attempt {
    Response(
        Response<Incoming>,
        Option<(Returner, upstream::Http1Sender)>,
    ),
    Failed(UpstreamError),
    TimedOut,
}

impl Attempts<'_> {
    /// Sends attempts until one is not retried. Every attempt's outcome is
    /// reported to its endpoint (outlier detection) once.
    async fn run(&mut self, first: Pick, obs: &mut Observation) -> Finished {
        let mut pick = first;
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut retries = 0u32;
        // Held from the decision to retry until the retried attempt's outcome.
        let mut retry_slot: Option<breaker::Guard> = None;
        let per_try = self
            .policy
            .and_then(|p| p.per_try_timeout)
            .filter(|t| !t.is_zero());
        loop {
            let target = target_of(self.cluster, &pick);
            obs.upstream = Some(target.addr);
            if obs.detailed {
                obs.upstream_principal = target
                    .tls
                    .as_ref()
                    .and_then(|t| t.expected_ids.first().cloned());
            }
            if self.policy.is_some() {
                // Only retries look at it: no allocation without a policy.
                tried.push(target.addr);
            }
            // Each attempt is one upstream request of the cluster (as
            // Envoy counts them): a slot until its response ends.
            let request_slot = match self.cluster.breaker.try_request() {
                Ok(slot) => slot,
                Err(o) => return Finished::Reply(overflow_reply(self.conn, obs, self.dest, &o)),
            };
            let Some(body) = self.body.next_attempt() else {
                // `may_retry` checked that the body can be replayed.
                return Finished::Reply(local_reply(
                    obs,
                    StatusCode::SERVICE_UNAVAILABLE,
                    ResponseFlag::UpstreamReset,
                    "the request body cannot be sent again",
                ));
            };
            let last = self.policy.is_none_or(|p| retries >= p.num_retries);
            let parts = if last {
                self.parts.take()
            } else {
                self.parts.clone()
            };
            let Some(parts) = parts else {
                // Only the last possible attempt takes the parts.
                return Finished::Reply(local_reply(
                    obs,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ResponseFlag::UpstreamReset,
                    "internal error: the request was already sent",
                ));
            };
            let req = Request::from_parts(parts, body);
            let began = Instant::now();
            let mut dispatched = false;
            let sent = with_deadline(
                self.deadline,
                send(
                    self.conn,
                    &target,
                    &self.cluster.breaker,
                    req,
                    self.upgrade,
                    per_try,
                    &mut dispatched,
                ),
            )
            .await
            .and_then(|per_try_bounded| per_try_bounded);
            drop(retry_slot.take());
            let (outcome, attempt) = match sent {
                Ok(Ok((resp, returner))) => (
                    TryOutcome::Response {
                        status: resp.status().as_u16(),
                        grpc: header_str(resp.headers(), &GRPC_STATUS)
                            .and_then(|s| s.trim().parse().ok()),
                    },
                    Attempt::Response(resp, returner),
                ),
                // Nothing was sent: not an outcome of the endpoint, and never
                // retried (as Envoy's overflow resets).
                Ok(Err(UpstreamError::Overflow(o))) => {
                    return Finished::Reply(overflow_reply(self.conn, obs, self.dest, &o))
                }
                Ok(Err(e)) => {
                    let outcome = if e.is_connect() {
                        TryOutcome::ConnectFailure
                    } else if e.is_refused_stream() {
                        TryOutcome::RefusedStream
                    } else {
                        TryOutcome::Reset
                    };
                    (outcome, Attempt::Failed(e))
                }
                Err(_) => (TryOutcome::Timeout, Attempt::TimedOut),
            };
            // A timeout while the attempt still waited for a connection (at
            // the circuit breaker's limits, or connecting) is this proxy's
            // queue, not the endpoint's answer: as Envoy, which reports to
            // outlier detection only once a request has an upstream host.
            if dispatched || !matches!(attempt, Attempt::TimedOut) {
                pick.report(outcome.outlier());
            }
            match &attempt {
                Attempt::Response(..) => pick.complete(began.elapsed()),
                _ => pick.failed(),
            }
            if matches!(attempt, Attempt::TimedOut) && self.route_expired() {
                return Finished::Reply(self.route_timeout(obs, target.addr));
            }

            let retry = self
                .policy
                .and_then(|p| Some((p, retry::retry_condition(p, outcome)?)));
            if let Some((policy, reason)) = retry {
                if let Some(slot) = self.may_retry(policy, reason, retries, obs) {
                    retry_slot = Some(slot);
                    retries += 1;
                    self.conn
                        .shared
                        .metrics
                        .event(Event::Retry, self.dest, reason)
                        .inc();
                    tracing::debug!(upstream = %target.addr, reason, retry = retries, "retrying");
                    drop((attempt, request_slot));
                    let wait = retry::backoff(
                        policy.backoff_base,
                        policy.backoff_max,
                        retries,
                        fastrand::u64(..),
                    );
                    let resume = Instant::now() + wait;
                    if let Some(d) = self.deadline.filter(|d| resume >= *d) {
                        tokio::time::sleep_until(d).await;
                        return Finished::Reply(self.route_timeout(obs, target.addr));
                    }
                    tokio::time::sleep_until(resume).await;
                    match self.repick(&tried, policy.avoid_previous_hosts) {
                        Some(p) => pick = p,
                        None => {
                            return Finished::Reply(local_reply(
                                obs,
                                StatusCode::SERVICE_UNAVAILABLE,
                                ResponseFlag::NoHealthyUpstream,
                                format!("cluster {} has no healthy endpoint (none known, or all failing health checks or ejected)", self.cluster.config.name),
                            ))
                        }
                    }
                    continue;
                }
            }
            // No attempt follows this one.
            self.body.seal();
            return match attempt {
                Attempt::Response(resp, returner) => Finished::Response {
                    resp,
                    returner,
                    pick,
                    request_slot,
                },
                // Envoy answers 503 for connect failures and resets alike.
                Attempt::Failed(e) => Finished::Reply(local_reply(
                    obs,
                    StatusCode::SERVICE_UNAVAILABLE,
                    e.flag(),
                    e.to_string(),
                )),
                Attempt::TimedOut => Finished::Reply(local_reply(
                    obs,
                    StatusCode::GATEWAY_TIMEOUT,
                    ResponseFlag::UpstreamTimeout,
                    format!(
                        "upstream {} did not answer within the per-try timeout ({:?})",
                        target.addr,
                        per_try.unwrap_or_default()
                    ),
                )),
            };
        }
    }

    fn route_expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    fn route_timeout(&self, obs: &mut Observation, addr: SocketAddr) -> Response<Body> {
        local_reply(
            obs,
            StatusCode::GATEWAY_TIMEOUT,
            ResponseFlag::UpstreamTimeout,
            format!(
                "upstream {addr} did not answer within {:?}",
                self.timeout.unwrap_or_default()
            ),
        )
    }

    /// A retry slot when a retry may be sent; otherwise counts why not
    /// (`meshwork_retries_skipped_total`) and flags the access log entry.
    fn may_retry(
        &self,
        policy: &RetryPolicy,
        condition: &str,
        retries: u32,
        obs: &mut Observation,
    ) -> Option<breaker::Guard> {
        let metrics = &self.conn.shared.metrics;
        if retries >= policy.num_retries {
            obs.retry_flag = Some(ResponseFlag::UpstreamRetryLimitExceeded);
            obs.reason = Some(format!(
                "retries exhausted: {retries} of {} sent, the last attempt failed with {condition}",
                policy.num_retries
            ));
            metrics
                .event(Event::RetrySkipped, self.dest, "retry_limit_exceeded")
                .inc();
            return None;
        }
        if !self.body.replayable() {
            obs.reason = Some(format!(
                "not retried ({condition}): the request body is larger than {} bytes",
                retry::REPLAY_LIMIT
            ));
            metrics
                .event(Event::RetrySkipped, self.dest, "body_not_replayable")
                .inc();
            return None;
        }
        match self.cluster.breaker.try_retry() {
            Ok(slot) => Some(slot),
            Err(o) => {
                tracing::debug!(reason = %o, "retry skipped");
                let reason = if o.budget {
                    "budget_exhausted"
                } else {
                    "max_retries"
                };
                metrics.event(Event::RetrySkipped, self.dest, reason).inc();
                metrics
                    .event(Event::Overflow, self.dest, o.limit.label())
                    .inc();
                obs.retry_flag = Some(ResponseFlag::UpstreamOverflow);
                obs.reason = Some(format!("not retried ({condition}): {o}"));
                None
            }
        }
    }

    /// The endpoint of the next attempt: with `avoid`, up to three more
    /// picks to find one not tried yet (Envoy's `previous_hosts` with
    /// `host_selection_retry_max_attempts: 3`), else the last pick. Repicks
    /// ignore the request hash (it would choose the same endpoint).
    fn repick(&self, tried: &[SocketAddr], avoid: bool) -> Option<Pick> {
        let balancer = &self.cluster.balancer;
        let mut pick = balancer.pick(self.hash)?;
        if avoid {
            for _ in 0..3 {
                if !tried.contains(&pick.address()) {
                    break;
                }
                match balancer.pick(None) {
                    Some(p) => pick = p,
                    None => break,
                }
            }
        }
        Some(pick)
    }
}

type Sent = (
    Response<Incoming>,
    Option<(Returner, upstream::Http1Sender)>,
);

/// One attempt: a connection within the circuit breaker's limits, then the
/// exchange, bounded by `per_try` from the moment the connection is there
/// (Envoy starts the per-try timer in `onPoolReady`: waiting for a
/// connection counts against the route timeout only). `dispatched` is set
/// once the request has its connection.
async fn send(
    conn: &Arc<ConnCtx>,
    target: &Target,
    breaker: &Arc<Breaker>,
    req: Request<Body>,
    upgrade: bool,
    per_try: Option<Duration>,
    dispatched: &mut bool,
) -> Result<Result<Sent, UpstreamError>, tokio::time::error::Elapsed> {
    let pools = &conn.shared.pools;
    let lease = if upgrade {
        pools.lease_fresh_for(target, Some(breaker)).await
    } else {
        pools.lease_for(target, Some(breaker)).await
    };
    let lease = match lease {
        Ok(lease) => lease,
        Err(e) => return Ok(Err(e)),
    };
    // From here on the request is the endpoint's to answer.
    *dispatched = true;
    let deadline = per_try.map(|t| Instant::now() + t);
    with_deadline(
        deadline,
        exchange(pools, target, breaker, lease, req, upgrade),
    )
    .await
}

/// Sends `req` on `lease` (once more on a new connection when a pooled one
/// turns out closed before the request was written).
async fn exchange(
    pools: &upstream::Pools,
    target: &Target,
    breaker: &Arc<Breaker>,
    lease: Lease,
    req: Request<Body>,
    upgrade: bool,
) -> Result<Sent, UpstreamError> {
    let addr = target.addr;
    match lease {
        Lease::Http1 {
            mut sender,
            returner,
            reused,
        } => match sender.try_send_request(req).await {
            Ok(resp) => Ok((resp, (!upgrade).then_some((returner, sender)))),
            Err(mut e) => match e.take_message() {
                // The pooled connection closed before the request was
                // written (the upstream's keep-alive timeout won the race):
                // nothing reached the application, so a new connection is safe.
                Some(req) if reused => {
                    tracing::debug!(%addr, "pooled connection was closed; retrying on a new one");
                    let Lease::Http1 {
                        mut sender,
                        returner,
                        ..
                    } = pools.lease_fresh_for(target, Some(breaker)).await?
                    else {
                        return Err(UpstreamError::Protocol { addr });
                    };
                    sender
                        .send_request(req)
                        .await
                        .map(|resp| (resp, Some((returner, sender))))
                        .map_err(|source| UpstreamError::Reset { addr, source })
                }
                _ => Err(UpstreamError::Reset {
                    addr,
                    source: e.into_error(),
                }),
            },
        },
        Lease::Http2(mut sender) => sender
            .send_request(req)
            .await
            .map(|resp| (resp, None))
            .map_err(|source| UpstreamError::Reset { addr, source }),
    }
}

/// `fut`, unless `deadline` passes first.
async fn with_deadline<F: std::future::Future>(
    deadline: Option<Instant>,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, fut).await,
        None => Ok(fut.await),
    }
}

/// Fire-and-forget copy of a request to a mirror cluster; its response is
/// discarded. The authority gets Envoy's `-shadow` suffix so the mirror can
/// tell copies apart.
fn spawn_mirror(
    pools: &Arc<upstream::Pools>,
    rt: &Arc<Runtime>,
    cluster: &str,
    parts: &http::request::Parts,
    body: Bytes,
) {
    let pools = pools.clone();
    let Some(state) = rt.cluster(cluster).cloned() else {
        tracing::debug!(cluster, "mirror cluster not loaded");
        return;
    };
    let mut parts = parts.clone();
    let authority = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(parts.uri.authority().map(|a| a.as_str()))
        .map(shadow_host);
    tokio::spawn(async move {
        let Some(pick) = state.balancer.pick(None) else {
            return;
        };
        let target = target_of(&state, &pick);
        if let Some(a) = authority {
            if let Ok(v) = HeaderValue::try_from(a.as_str()) {
                parts.headers.insert(header::HOST, v);
            }
            let uri = parts.uri.clone();
            let _ = set_target_uri(&mut parts, uri, &a, target.http2);
        }
        let req = Request::from_parts(parts, body::full(body));
        // A stalled mirror must not hold a connection and a task forever.
        match tokio::time::timeout(MIRROR_TIMEOUT, send_mirror(&pools, &target, req)).await {
            Ok(Ok(())) => pick.complete(Duration::ZERO),
            Ok(Err(e)) => {
                pick.failed();
                tracing::debug!(cluster = %state.config.name, error = %e, "mirror failed");
            }
            Err(_) => {
                pick.failed();
                tracing::debug!(cluster = %state.config.name, "mirror timed out");
            }
        }
    });
}

/// Sends a mirrored request and reads its response to the end.
async fn send_mirror(
    pools: &upstream::Pools,
    target: &Target,
    req: Request<Body>,
) -> Result<(), UpstreamError> {
    let addr = target.addr;
    let resp = match pools.lease(target).await? {
        Lease::Http1 {
            mut sender,
            returner,
            ..
        } => {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|source| UpstreamError::Reset { addr, source })?;
            let _ = resp.into_body().collect().await;
            returner.give_back(sender);
            return Ok(());
        }
        Lease::Http2(mut sender) => sender
            .send_request(req)
            .await
            .map_err(|source| UpstreamError::Reset { addr, source })?,
    };
    let _ = resp.into_body().collect().await;
    Ok(())
}

fn shadow_host(authority: &str) -> String {
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{host}-shadow:{port}")
        }
        _ => format!("{authority}-shadow"),
    }
}

fn target_of(state: &ClusterState, pick: &Pick) -> Target {
    let addr = pick.address();
    Target {
        addr,
        http2: state.config.http2,
        connect_timeout: state.config.connect_timeout,
        idle_timeout: state.config.idle_timeout,
        tls: state.upstream_tls(addr).cloned(),
    }
}

/// Copies bytes both ways between the upgraded downstream and upstream.
async fn tunnel(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    _drain: crate::drain::Watch,
) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        tracing::debug!(error = %e, "upgraded connection ended");
    }
}

/// Points the request at the upstream: origin-form plus `Host` for HTTP/1.1,
/// absolute URI (`:authority`) for HTTP/2.
fn set_target_uri(
    parts: &mut http::request::Parts,
    uri: Uri,
    authority: &str,
    http2: bool,
) -> Result<(), String> {
    let pq = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    if http2 {
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(pq)
            .build()
            .map_err(|e| format!("invalid authority {authority:?}: {e}"))?;
        parts.headers.remove(header::HOST);
        parts.version = Version::HTTP_2;
    } else {
        parts.uri = pq
            .parse()
            .map_err(|e| format!("invalid path {pq:?}: {e}"))?;
        let host = HeaderValue::try_from(authority)
            .map_err(|e| format!("invalid authority {authority:?}: {e}"))?;
        parts.headers.insert(header::HOST, host);
        parts.version = Version::HTTP_11;
    }
    Ok(())
}

/// What an HTTP/1.1 request asks to upgrade to.
enum Upgrade {
    None,
    WebSocket,
    Other(String),
}

fn upgrade_kind(req: &Request<Incoming>) -> Upgrade {
    if req.version() != Version::HTTP_11 {
        return Upgrade::None;
    }
    let Some(kind) = req.headers().get(header::UPGRADE) else {
        return Upgrade::None;
    };
    let connection_upgrade = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !connection_upgrade {
        return Upgrade::None;
    }
    let kind = String::from_utf8_lossy(kind.as_bytes()).trim().to_owned();
    if kind.eq_ignore_ascii_case("websocket") {
        Upgrade::WebSocket
    } else if kind.eq_ignore_ascii_case("h2c") {
        // curl's `--http2` over http://: serve it as plain HTTP/1.1 (the
        // Upgrade header is hop-by-hop and dropped), as Envoy does.
        Upgrade::None
    } else {
        Upgrade::Other(kind)
    }
}

/// Removes the headers that belong to one hop (RFC 9110 §7.6.1), including
/// those named in `Connection`. `TE: trailers` survives (gRPC needs it).
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::try_from(t.trim()).ok())
            .filter(|n| !(keep_upgrade && n == header::UPGRADE))
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    if !keep_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::PROXY_AUTHORIZATION);
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

async fn buffer_body(body: Incoming) -> Result<Bytes, hyper::Error> {
    Ok(body.collect().await?.to_bytes())
}

/// Body of an authorization denial (Envoy's words).
pub const RBAC_DENIED_BODY: &str = "RBAC: access denied";

/// Evaluates the connection manager's RBAC filters for `req`; counts the
/// decision; `Some(response)` when denied: 403 with `x-meshwork-error:
/// rbac_denied`, or for gRPC a trailers-only PERMISSION_DENIED (7).
fn authorize(
    conn: &Arc<ConnCtx>,
    authz: &crate::authz::Authz,
    req: &Request<Incoming>,
    obs: &mut Observation,
) -> Option<Response<Body>> {
    let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let decision = authz.evaluate(&crate::authz::Input {
        peer_identity: conn.peer_identity.as_deref(),
        http: Some(crate::authz::HttpInput {
            method: req.method(),
            path: req.uri().path(),
            path_and_query,
            authority: &obs.authority,
            headers: req.headers(),
        }),
    });
    let destination = match conn.direction {
        Direction::Inbound => conn.shared.local_service(),
        Direction::Outbound => Arc::new(conn.hcm.stat_prefix.clone()),
    };
    conn.shared
        .record_authz(conn.direction, &destination, &decision);
    if decision.allowed {
        return None;
    }
    obs.destination_service = Some(destination.to_string());
    let flag = ResponseFlag::RbacDenied;
    let reason = denial_reason(&decision);
    tracing::debug!(%reason, "request denied by authorization policy");
    obs.local(flag, &reason);
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let mut resp = Response::new(if grpc {
        body::empty()
    } else {
        body::full(RBAC_DENIED_BODY)
    });
    if !grpc {
        *resp.status_mut() = StatusCode::FORBIDDEN;
    }
    let h = resp.headers_mut();
    h.insert(ERROR_HEADER, HeaderValue::from_static(flag.reason()));
    if grpc {
        // A trailers-only response, as Envoy maps a local 403 for gRPC.
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(GRPC_STATUS, HeaderValue::from_static("7"));
        h.insert(
            GRPC_MESSAGE,
            HeaderValue::from_static("RBAC: access denied"),
        );
        obs.grpc_status = Some("7".to_owned());
    } else {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    Some(resp)
}

/// Why a decision denied, in words (access log `reason`, `meshwork why`).
pub fn denial_reason(d: &crate::authz::Decision) -> String {
    match (&d.policy, d.default_deny) {
        (Some(p), _) => format!("denied by DENY policy {p}"),
        (None, true) => {
            "denied by default: no ALLOW policy applies and the mesh default action is deny"
                .to_owned()
        }
        (None, false) => "denied: no ALLOW policy matches".to_owned(),
    }
}

/// A response the proxy makes itself.
fn local_reply(
    obs: &mut Observation,
    status: StatusCode,
    flag: ResponseFlag,
    message: impl Into<String>,
) -> Response<Body> {
    let message = message.into();
    let reason = flag.reason();
    tracing::debug!(reason, %message, "local reply");
    obs.local(flag, &message);
    let mut resp = Response::new(body::full(format!("meshwork: {message}\n")));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(ERROR_HEADER, HeaderValue::from_static(reason));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A random 128-bit id in hex, like Envoy's `x-request-id` (a UUID there).
fn request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u128(..);
    let mut buf = [0u8; 32];
    for b in buf.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("0"))
}

fn header_str(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The authority a request is addressed to: `:authority` (HTTP/2, absolute
/// URI) or `Host`, lower-cased.
pub fn authority_of<B>(req: &Request<B>) -> String {
    let mut a = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| header_str(req.headers(), &header::HOST))
        .unwrap_or_default();
    a.make_ascii_lowercase();
    a
}

/// What is known about a request for its metrics and access log entry.
#[derive(Debug, Default)]
struct Observation {
    conn: Option<Arc<ConnCtx>>,
    start: Option<Instant>,
    start_wall: Option<std::time::SystemTime>,
    method: Option<Method>,
    version: Option<Version>,
    authority: String,
    path: String,
    user_agent: Option<String>,
    request_id: Option<String>,
    route: Option<String>,
    cluster: Option<String>,
    destination_service: Option<String>,
    upstream: Option<SocketAddr>,
    /// The SPIFFE id the upstream proved over mTLS (access log only).
    upstream_principal: Option<String>,
    flag: Option<ResponseFlag>,
    /// URX (retries exhausted) or UO (a retry refused by the circuit
    /// breaker): logged next to `flag`.
    retry_flag: Option<ResponseFlag>,
    /// The fault filter delayed the request (DI, logged with any other flag).
    delay_injected: bool,
    reason: Option<String>,
    /// Set when the proxy answered itself.
    local_flag: Option<ResponseFlag>,
    grpc_status: Option<String>,
    status: Option<StatusCode>,
    /// Request body bytes forwarded so far (counted when the log is on).
    received: Arc<std::sync::atomic::AtomicU64>,
    /// Fields only the access log needs are captured when it is on.
    detailed: bool,
}

impl Observation {
    fn start(conn: &Arc<ConnCtx>, req: &Request<Incoming>) -> Self {
        let mut obs = Self {
            conn: Some(conn.clone()),
            start: Some(Instant::now()),
            authority: authority_of(req),
            detailed: conn.shared.access_log_enabled(),
            ..Default::default()
        };
        if obs.detailed {
            obs.start_wall = Some(std::time::SystemTime::now());
            obs.method = Some(req.method().clone());
            obs.version = Some(req.version());
            obs.path = req.uri().path().to_owned();
            obs.user_agent = header_str(req.headers(), &header::USER_AGENT);
            obs.request_id = header_str(req.headers(), &X_REQUEST_ID);
        }
        obs
    }

    fn local(&mut self, flag: ResponseFlag, message: &str) {
        self.local_flag = Some(flag);
        self.flag = Some(flag);
        self.reason = Some(message.to_owned());
    }

    fn upstream_response(&mut self, headers: &HeaderMap) {
        self.grpc_status = header_str(headers, &GRPC_STATUS);
    }

    fn armed(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    /// Responses without an observed body (local replies, redirects) are
    /// recorded now; forwarded ones when their body ends.
    fn finish_response(&mut self, resp: Response<Body>) -> Response<Body> {
        // After `forward` handed the observation to the body, `conn` is None.
        if self.conn.is_some() {
            self.status = Some(resp.status());
            let obs = std::mem::take(self);
            obs.record(0);
        }
        resp
    }

    fn record(self, bytes_sent: u64) {
        let Some(conn) = self.conn else { return };
        let shared = &conn.shared;
        let status = self.status.map(|s| s.as_u16()).unwrap_or(0);
        let duration = self.start.map(|s| s.elapsed()).unwrap_or_default();
        let route = self.route.as_deref().unwrap_or("");
        let dest = self
            .destination_service
            .clone()
            .or_else(|| self.cluster.clone())
            .unwrap_or_else(|| "unknown".to_owned());
        let dest = dest.as_str();
        let series = conn.http_series(dest, route);
        series.observe(
            status,
            self.grpc_status.as_deref().and_then(|s| s.parse().ok()),
            duration,
        );
        if let Some(flag) = self.local_flag {
            series.local_response(flag, status);
        }
        if shared.access_log_enabled() {
            let mut e = AccessLogEntry::new(
                conn.direction,
                self.version
                    .map(Protocol::from_version)
                    .unwrap_or(Protocol::Http11),
                self.start_wall.unwrap_or(std::time::UNIX_EPOCH),
            );
            e.duration = duration;
            e.method = self.method;
            e.authority = Some(self.authority);
            e.path = Some(self.path);
            e.status = Some(status);
            e.grpc_status = self.grpc_status.and_then(|s| s.parse().ok());
            e.response_flags = self.flag.into_iter().collect();
            if let Some(flag) = self.retry_flag.filter(|f| Some(*f) != self.flag) {
                e.response_flags.push(flag);
            }
            if self.delay_injected {
                e.response_flags.insert(0, ResponseFlag::DelayInjected);
            }
            e.reason = self.reason;
            e.route = self.route;
            e.upstream_cluster = self.cluster;
            e.upstream_host = self.upstream;
            e.downstream_remote = Some(conn.peer);
            e.downstream_peer_principal = conn.peer_identity.as_deref().map(str::to_owned);
            e.upstream_peer_principal = self.upstream_principal;
            e.bytes_received = self.received.load(std::sync::atomic::Ordering::Relaxed);
            e.bytes_sent = bytes_sent;
            e.user_agent = self.user_agent;
            e.request_id = self.request_id;
            e.source_service = Some(shared.source_service(conn.direction).to_string());
            e.destination_service = Some(dest.to_owned());
            shared.access_log(e);
        }
    }
}

pin_project_lite::pin_project! {
    /// The upstream response body on its way downstream: counts bytes, reads
    /// `grpc-status` from trailers, returns the HTTP/1.1 connection to its
    /// pool at the end, enforces the route and stream idle timeouts, holds
    /// the request's circuit breaker slot, and records the request once, at
    /// end or drop.
    struct Observed {
        #[pin]
        inner: Incoming,
        returner: Option<(Returner, upstream::Http1Sender)>,
        pick: Option<Pick>,
        bytes: u64,
        obs: Option<Observation>,
        // Wakes at the route deadline or when the stream may have idled out.
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
        deadline: Option<Instant>,
        timeout: Duration,
        idle: Option<Duration>,
        activity: Arc<Activity>,
        _request_slot: breaker::Guard,
    }

    impl PinnedDrop for Observed {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(mut obs) = this.obs.take() {
                if this.inner.is_end_stream() {
                    // Never polled because it was empty (204, HEAD): a clean end.
                    if let Some((returner, sender)) = this.returner.take() {
                        returner.give_back(sender);
                    }
                } else {
                    obs.flag.get_or_insert(ResponseFlag::DownstreamDisconnect);
                }
                obs.record(*this.bytes);
            }
        }
    }
}

impl Observed {
    /// Ends the response with an error (the downstream stream is reset):
    /// the connection is not reused, the request is recorded with `flag`.
    fn abort(
        self: Pin<&mut Self>,
        flag: ResponseFlag,
        reason: String,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        *this.timer = None;
        this.returner.take();
        if let Some(mut obs) = this.obs.take() {
            obs.flag = Some(flag);
            obs.reason = Some(reason.clone());
            obs.record(*this.bytes);
        }
        Poll::Ready(Some(Err(reason.into())))
    }
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.as_mut().project();
        if let Some(timer) = this.timer.as_mut() {
            while timer.as_mut().poll(cx).is_ready() {
                let now = Instant::now();
                if this.deadline.is_some_and(|d| now >= d) {
                    let reason = format!(
                        "the response was not complete within the route timeout ({:?})",
                        this.timeout
                    );
                    return self.abort(ResponseFlag::UpstreamTimeout, reason);
                }
                let idle_due = this.idle.map(|i| this.activity.last() + i);
                if let Some(idle) = this.idle.filter(|_| idle_due.is_some_and(|d| now >= d)) {
                    let reason = format!(
                        "stream idle timeout: no bytes moved in either direction for {idle:?}"
                    );
                    return self.abort(ResponseFlag::StreamIdleTimeout, reason);
                }
                match next_timer(*this.deadline, *this.idle, this.activity) {
                    Some(at) => timer.as_mut().reset(at),
                    None => break,
                }
            }
        }
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx).map_err(BoxError::from);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if this.idle.is_some() {
                    this.activity.touch();
                }
                if let Some(data) = frame.data_ref() {
                    *this.bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref() {
                    if let Some(obs) = this.obs.as_mut() {
                        if let Some(s) = header_str(trailers, &GRPC_STATUS) {
                            obs.grpc_status = Some(s);
                        }
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut obs) = this.obs.take() {
                    obs.flag = Some(ResponseFlag::UpstreamReset);
                    obs.reason = Some("upstream reset while sending the response body".into());
                    obs.record(*this.bytes);
                }
            }
            Poll::Ready(None) => {}
            Poll::Pending => return Poll::Pending,
        }
        if this.inner.is_end_stream() || matches!(polled, Poll::Ready(None)) {
            *this.timer = None;
            if let Some((returner, sender)) = this.returner.take() {
                returner.give_back(sender);
            }
            if let Some(obs) = this.obs.take() {
                obs.record(*this.bytes);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

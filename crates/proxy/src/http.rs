//! The HTTP request path: route, pick a backend, forward, observe.
//!
//! One function per step, called in order from [`handle`]: find the route
//! table of the listener's connection manager, the virtual host by authority,
//! the first matching route; then redirect, answer directly, or forward:
//! choose a weighted cluster, hash the request (ring hash / maglev), pick an
//! endpoint, rewrite, apply header filters, mirror, send through the pool, and
//! stream the response back while counting it. Responses the proxy makes
//! itself carry `x-meshwork-error: <reason>` and a body that says why.

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
use crate::config::model::{Forward, HttpConnectionManager, Route, RouteAction, VirtualHost};
use crate::filters;
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
/// Envoy's default route timeout, used when a route sets none.
const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
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
    let Some(table) = rt.route_table(&conn.hcm) else {
        return local_reply(
            obs,
            StatusCode::NOT_FOUND,
            ResponseFlag::NoRoute,
            format!(
                "route configuration {:?} is not loaded",
                conn.hcm.route_config_name
            ),
        );
    };
    let authority = obs.authority.clone();
    let Some(vh) = router::select_vhost(table, &authority) else {
        return local_reply(
            obs,
            StatusCode::NOT_FOUND,
            ResponseFlag::NoRoute,
            format!("no service matches host {authority:?}; the host must be <service>, <service>.<namespace>, optionally with :port"),
        );
    };
    let (parts, body) = req.into_parts();
    let Some(route) = router::select_route(vh, &parts) else {
        return local_reply(
            obs,
            StatusCode::NOT_FOUND,
            ResponseFlag::NoRoute,
            format!(
                "no route of {} matches {} {}",
                vh.name,
                parts.method,
                parts.uri.path()
            ),
        );
    };
    obs.route = Some(route.name.clone());
    match &route.action {
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
    }
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
            format!("cluster {} has no endpoints", wc.name),
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

    let target = target_of(cluster, &pick);
    if obs.detailed {
        obs.upstream_principal = target
            .tls
            .as_ref()
            .and_then(|t| t.expected_ids.first().cloned());
    }
    if let Err(e) = set_target_uri(&mut parts, uri, &authority, target.http2) {
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
    let body = if (mirrors.is_empty() || !mirrorable) && obs.detailed {
        // Count what the client actually sent (chunked bodies have no length).
        let counter = obs.received.clone();
        body.map_frame(move |f| {
            if let Some(d) = f.data_ref() {
                counter.fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            f
        })
        .map_err(BoxError::from)
        .boxed()
    } else if mirrors.is_empty() || !mirrorable {
        body.map_err(BoxError::from).boxed()
    } else {
        match buffer_body(body).await {
            Ok(bytes) => {
                obs.received
                    .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                for m in mirrors {
                    spawn_mirror(&conn.shared.pools, rt, &m.cluster, &parts, bytes.clone());
                }
                body::full(bytes)
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
    let upstream_req = Request::from_parts(parts, body);
    let sent = with_timeout(timeout, send(conn, &target, upstream_req, upgrade)).await;
    let (mut resp, returner) = match sent {
        Err(_) => {
            pick.failed();
            return local_reply(
                obs,
                StatusCode::GATEWAY_TIMEOUT,
                ResponseFlag::UpstreamTimeout,
                format!(
                    "upstream {} did not answer within {:?}",
                    target.addr,
                    timeout.unwrap_or_default()
                ),
            );
        }
        Ok(Err(err)) => {
            pick.failed();
            // Envoy answers 503 for connect failures and resets alike.
            return local_reply(
                obs,
                StatusCode::SERVICE_UNAVAILABLE,
                err.flag(),
                err.to_string(),
            );
        }
        Ok(Ok(ok)) => ok,
    };
    pick.complete(obs.start.map(|s| s.elapsed()).unwrap_or_default());

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
    // Envoy's route timeout covers the whole response, body included.
    let deadline = timeout
        .zip(obs.start)
        .map(|(t, start)| Box::pin(tokio::time::sleep_until(start + t)));
    let body = Observed {
        inner: rbody,
        returner,
        pick: Some(pick),
        bytes: 0,
        obs: Some(std::mem::take(obs).armed(rparts.status)),
        deadline,
        timeout: timeout.unwrap_or_default(),
    };
    Response::from_parts(rparts, body.boxed())
}

type Sent = (
    Response<Incoming>,
    Option<(Returner, upstream::Http1Sender)>,
);

async fn send(
    conn: &Arc<ConnCtx>,
    target: &Target,
    req: Request<Body>,
    upgrade: bool,
) -> Result<Sent, UpstreamError> {
    let pools = &conn.shared.pools;
    let lease = if upgrade {
        pools.lease_fresh(target).await?
    } else {
        pools.lease(target).await?
    };
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
                    } = pools.lease_fresh(target).await?
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

async fn with_timeout<F: std::future::Future>(
    timeout: Option<Duration>,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    match timeout {
        Some(t) => tokio::time::timeout(t, fut).await,
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
    /// pool at the end, and records the request once, at end or drop.
    struct Observed {
        #[pin]
        inner: Incoming,
        returner: Option<(Returner, upstream::Http1Sender)>,
        pick: Option<Pick>,
        bytes: u64,
        obs: Option<Observation>,
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
        timeout: Duration,
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

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Some(deadline) = this.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                *this.deadline = None;
                this.returner.take();
                let reason = format!(
                    "the response was not complete within the route timeout ({:?})",
                    this.timeout
                );
                if let Some(mut obs) = this.obs.take() {
                    obs.flag = Some(ResponseFlag::UpstreamTimeout);
                    obs.reason = Some(reason.clone());
                    obs.record(*this.bytes);
                }
                return Poll::Ready(Some(Err(reason.into())));
            }
        }
        let polled = this.inner.as_mut().poll_frame(cx).map_err(BoxError::from);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
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

//! The HTTP/JSON resource API (`--api-addr`, default `127.0.0.1:15014`).
//!
//! Contract (every body is JSON unless said otherwise):
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/healthz` | 200 `ok` |
//! | GET | `/api/v1/resources[?kind=K&namespace=NS]` | `{"kind":"List","revision":N,"items":[...]}` |
//! | GET | `/api/v1/resources/{kind}[/{namespace}]` | the same, narrowed |
//! | GET | `/api/v1/resources/{kind}/{namespace}/{name}` | the resource |
//! | PUT | same | create or replace; 201 when created, 200 otherwise |
//! | DELETE | same `[?resourceVersion=N]` | `{"revision":N,"results":[...]}` |
//! | POST | `/api/v1/apply[?dryRun=true&file=NAME]` | apply YAML/JSON documents, all or nothing |
//! | GET | `/api/v1/proxies`, `/api/v1/proxies/{id}` | from [`ProxyStatus`] |
//! | GET | `/api/v1/ca`, `/api/v1/ca/bundle` | CA status JSON, trust bundle PEM |
//! | POST | `/api/v1/ca/rotate`, `/api/v1/tokens` | root rotation, join tokens (see `admin`) |
//!
//! - `{kind}` is a kind name in any case, singular or plural (`service`,
//!   `HTTPRoutes`, `svc`): see [`kind_from_arg`].
//! - Every resource in a response carries `metadata.resourceVersion` (a
//!   string, as in Kubernetes). Sent back in a PUT body or an applied
//!   document, it is a precondition: when the stored version differs the
//!   answer is 409 `... current resourceVersion is N ...; re-read and retry`
//!   and nothing changes. Without it a write overwrites. A PUT with
//!   `If-None-Match: *` only creates.
//! - Apply bodies are multi-document YAML (`---`), a JSON object, a JSON
//!   array of objects, or a JSON `List` (`items`). With
//!   `Content-Type: application/vnd.meshwork.files+json` the body is
//!   `{"files":[{"name":"a.yaml","text":"..."}]}`, so that errors of a
//!   directory apply name the right file and line. Every document of the
//!   request is applied in one store transaction, or none is.
//! - Errors: `{"error":"...","details":["file:line:col: Kind ns/name: field: message", ...]}`
//!   with 400 (unreadable or invalid input: every problem is listed), 403,
//!   404, 405, 409 (conflict), 413 (body over 16 MiB), 500 (store failure).
//! - Requests that change something and carry a browser `Origin` other than
//!   this server's own are refused (403), so a web page cannot drive the API
//!   through a local browser.
//! - Served with an [`AdminToken`] ([`serve_with`]), requests that change
//!   something need `Authorization: Bearer <admin token>` (401 otherwise).
//! - Nothing here panics on input; garbage on the socket gets hyper's 400.
//!
//! Non-goals: TLS (bind it to localhost), per-user authorization, watch streams,
//! server-side apply field ownership, HTTP/2.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use api::{Kind, Resource, Sourced};
use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE, HOST, IF_NONE_MATCH, ORIGIN};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::store::{Applied, Op, Precondition, ResourceKey, Store, StoreError};

mod admin;

pub use admin::{
    AdminToken, AdminTokenError, RotateRequest, TokenRequest, TokenResponse, ADMIN_TOKEN_FILE,
};

/// What the API shows about connected proxies (`meshwork proxy-status` and
/// `proxy-config`). Implemented by the xDS server.
pub trait ProxyStatus: Send + Sync {
    /// Every connected proxy, as a JSON array.
    fn proxies(&self) -> Value;
    /// What one proxy holds, or `None` when no proxy has that id.
    fn proxy(&self, id: &str) -> Option<Value>;
}

/// A [`ProxyStatus`] with no proxies, for tests and a store-only server.
pub struct NoProxies;

impl ProxyStatus for NoProxies {
    fn proxies(&self) -> Value {
        Value::Array(Vec::new())
    }

    fn proxy(&self, _id: &str) -> Option<Value> {
        None
    }
}

/// Content type of a multi-file apply body.
pub const FILES_CONTENT_TYPE: &str = "application/vnd.meshwork.files+json";
/// Largest request body accepted.
pub const MAX_BODY: usize = 16 << 20;

/// Error answer body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

/// A multi-file apply body ([`FILES_CONTENT_TYPE`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FilesBody {
    pub files: Vec<FileBody>,
}

/// One file of a [`FilesBody`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileBody {
    pub name: String,
    pub text: String,
}

/// Answer to apply and delete.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteResponse {
    /// Store revision after the write.
    pub revision: u64,
    #[serde(default)]
    pub dry_run: bool,
    pub results: Vec<WriteResult>,
}

/// What happened to one resource.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteResult {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// `created`, `configured`, `unchanged` or `deleted`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

/// The kind a user means: the kind name in any case, its plural, or a
/// short name (`svc`, `wl`, `tp`).
pub fn kind_from_arg(s: &str) -> Option<Kind> {
    let l = s.to_ascii_lowercase();
    let l = l.as_str();
    Kind::ALL.into_iter().find(|k| {
        let name = k.as_str().to_ascii_lowercase();
        let short = match k {
            Kind::Mesh => "mesh",
            Kind::Service => "svc",
            Kind::Workload => "wl",
            Kind::HttpRoute => "hr",
            Kind::GrpcRoute => "gr",
            Kind::TcpRoute => "tr",
            Kind::TrafficPolicy => "tp",
            Kind::AuthorizationPolicy => "ap",
        };
        let plural = match k {
            Kind::Mesh => "meshes".to_string(),
            Kind::TrafficPolicy => "trafficpolicies".to_string(),
            Kind::AuthorizationPolicy => "authorizationpolicies".to_string(),
            _ => format!("{name}s"),
        };
        l == name || l == plural || l == short
    })
}

/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 256;
/// A client must send its request headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

const JSON: &str = "application/json";

/// Everything a request handler needs.
struct Api {
    store: Arc<dyn Store>,
    status: Arc<dyn ProxyStatus>,
    admin: Option<Arc<AdminToken>>,
    ca: Option<Arc<crate::ca::Authority>>,
    acks: Arc<dyn crate::ca::AckTracker>,
}

/// What the API serves beyond the store: [`serve_with`]'s parts.
pub struct ApiParts {
    pub store: Arc<dyn Store>,
    pub status: Arc<dyn ProxyStatus>,
    /// Required on mutating requests when set.
    pub admin: Option<Arc<AdminToken>>,
    /// The CA behind `/api/v1/ca` and `/api/v1/tokens`.
    pub ca: Option<Arc<crate::ca::Authority>>,
    /// Who root rotation waits for.
    pub acks: Arc<dyn crate::ca::AckTracker>,
}

/// Serves the API on `listener` until `shutdown` completes, then stops
/// accepting, lets each connection finish its current request and returns.
pub async fn serve(
    listener: TcpListener,
    store: Arc<dyn Store>,
    status: Arc<dyn ProxyStatus>,
    shutdown: impl Future<Output = ()>,
) {
    let parts = ApiParts {
        store,
        status,
        admin: None,
        ca: None,
        acks: Arc::new(crate::ca::NoStreams),
    };
    serve_with(listener, parts, shutdown).await
}

/// [`serve`] with an admin credential and a CA.
pub async fn serve_with(
    listener: TcpListener,
    parts: ApiParts,
    shutdown: impl Future<Output = ()>,
) {
    let api = Arc::new(Api {
        store: parts.store,
        status: parts.status,
        admin: parts.admin,
        ca: parts.ca,
        acks: parts.acks,
    });
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept(), if conns.len() < MAX_CONNECTIONS => match accepted {
                Ok((stream, peer)) => {
                    conns.spawn(serve_connection(stream, peer, Arc::clone(&api), closing_rx.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "api: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
            // Reap finished connections so the limit stays exact.
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
    api: Arc<Api>,
    mut closing: watch::Receiver<bool>,
) {
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let api = Arc::clone(&api);
        async move { Ok::<_, Infallible>(handle(&api, req).await) }
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
        tracing::debug!(%peer, error = %e, "api connection ended with an error");
    }
}

/// An error answer.
struct Fail {
    status: StatusCode,
    body: ErrorBody,
    allow: Option<&'static str>,
}

impl Fail {
    fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Fail {
            status,
            body: ErrorBody {
                error: error.into(),
                details: Vec::new(),
            },
            allow: None,
        }
    }

    fn bad(error: impl Into<String>) -> Self {
        Fail::new(StatusCode::BAD_REQUEST, error)
    }

    fn invalid(errors: Vec<String>, what: &str) -> Self {
        let n = errors.len();
        Fail {
            status: StatusCode::BAD_REQUEST,
            body: ErrorBody {
                error: format!(
                    "{what}: {n} error{}; nothing was changed",
                    if n == 1 { "" } else { "s" }
                ),
                details: errors,
            },
            allow: None,
        }
    }

    fn method(allow: &'static str) -> Self {
        Fail {
            status: StatusCode::METHOD_NOT_ALLOWED,
            body: ErrorBody {
                error: format!("method not allowed here; allowed: {allow}"),
                details: Vec::new(),
            },
            allow: Some(allow),
        }
    }

    fn response(self) -> Response<Full<Bytes>> {
        let mut r = json_response(self.status, &self.body);
        if let Some(allow) = self.allow {
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
        }
        r
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(errors) => Fail::invalid(
                errors.iter().map(ToString::to_string).collect(),
                "invalid resources",
            ),
            StoreError::Conflict { .. } => Fail::new(StatusCode::CONFLICT, e.to_string()),
            StoreError::NotFound { .. } => Fail::new(StatusCode::NOT_FOUND, e.to_string()),
            StoreError::Storage(_) => Fail::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let mut bytes = serde_json::to_vec_pretty(body).unwrap_or_default();
    bytes.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    r
}

/// Answers one request. Generic over the body so tests can call it without
/// a socket.
async fn handle<B>(api: &Api, req: Request<B>) -> Response<Full<Bytes>>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    match route(api, req).await {
        Ok(r) => r,
        Err(f) => f.response(),
    }
}

async fn route<B>(api: &Api, req: Request<B>) -> Result<Response<Full<Bytes>>, Fail>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let path = req.uri().path().to_string();
    let query = Query::parse(req.uri().query().unwrap_or(""));
    let method = req.method().clone();
    if matches!(method, Method::PUT | Method::POST | Method::DELETE) {
        check_origin(&req)?;
        admin::check(api, &req)?;
    }
    if path == "/healthz" {
        return match method {
            Method::GET | Method::HEAD => {
                let mut r = Response::new(Full::new(Bytes::from_static(b"ok\n")));
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                Ok(r)
            }
            _ => Err(Fail::method("GET")),
        };
    }
    let Some(rest) = path.strip_prefix("/api/v1/") else {
        return Err(not_found(&path));
    };
    let segs: Vec<&str> = rest.split('/').collect();
    if matches!(segs.first(), Some(&"ca" | &"tokens")) {
        return admin::route(api, &segs, req).await;
    }
    match segs.as_slice() {
        ["resources"] => match method {
            Method::GET => {
                let kind = query.get("kind").map(parse_kind).transpose()?;
                Ok(list(api, kind, query.get("namespace")))
            }
            _ => Err(Fail::method("GET")),
        },
        ["resources", kind] => match method {
            Method::GET => Ok(list(api, Some(parse_kind(kind)?), query.get("namespace"))),
            _ => Err(Fail::method("GET")),
        },
        ["resources", kind, ns] => match method {
            Method::GET => Ok(list(api, Some(parse_kind(kind)?), Some(ns))),
            _ => Err(Fail::method("GET")),
        },
        ["resources", kind, ns, name] => {
            let key = ResourceKey::new(parse_kind(kind)?, ns, name);
            match method {
                Method::GET => match api.store.get(&key) {
                    Some(s) => Ok(json_response(StatusCode::OK, &s.to_json())),
                    None => Err(Fail::new(StatusCode::NOT_FOUND, format!("{key} not found"))),
                },
                Method::PUT => {
                    let create_only = req
                        .headers()
                        .get(IF_NONE_MATCH)
                        .is_some_and(|v| v.as_bytes() == b"*");
                    let text = read_text(req.into_body()).await?;
                    put(api, key, &text, create_only).await
                }
                Method::DELETE => {
                    let expected = match query.get("resourceVersion") {
                        Some(v) => Precondition::Version(parse_version(v)?),
                        None => Precondition::Any,
                    };
                    let what = key.to_string();
                    let applied = write(api, vec![Op::Delete { key, expected }], false)
                        .await
                        .map_err(|mut f| {
                            if f.status == StatusCode::BAD_REQUEST {
                                f.body.error = format!(
                                    "deleting {what} would leave other resources pointing at it; change or delete them first: {}",
                                    f.body.error
                                );
                            }
                            f
                        })?;
                    Ok(json_response(
                        StatusCode::OK,
                        &write_response(applied, false),
                    ))
                }
                _ => Err(Fail::method("GET, PUT, DELETE")),
            }
        }
        ["apply"] => match method {
            Method::POST => {
                let dry_run = match query.get("dryRun") {
                    None | Some("false") => false,
                    Some("true" | "") => true,
                    Some(v) => {
                        return Err(Fail::bad(format!(
                            "dryRun must be true or false, not {v:?}"
                        )))
                    }
                };
                let files = req
                    .headers()
                    .get(CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(FILES_CONTENT_TYPE.as_bytes()));
                let file = query.get("file").unwrap_or("request").to_string();
                let text = read_text(req.into_body()).await?;
                apply(api, &file, &text, files, dry_run).await
            }
            _ => Err(Fail::method("POST")),
        },
        ["proxies"] => match method {
            Method::GET => Ok(json_response(StatusCode::OK, &api.status.proxies())),
            _ => Err(Fail::method("GET")),
        },
        ["proxies", id] => match method {
            Method::GET => match api.status.proxy(id) {
                Some(v) => Ok(json_response(StatusCode::OK, &v)),
                None => Err(Fail::new(
                    StatusCode::NOT_FOUND,
                    format!("no proxy {id:?} is connected; list them with `meshwork proxy-status`"),
                )),
            },
            _ => Err(Fail::method("GET")),
        },
        _ => Err(not_found(&path)),
    }
}

fn not_found(path: &str) -> Fail {
    Fail::new(
        StatusCode::NOT_FOUND,
        format!(
            "no such endpoint {path:?}; the API has /healthz, /api/v1/resources[/KIND[/NAMESPACE[/NAME]]], /api/v1/apply, /api/v1/proxies[/ID]"
        ),
    )
}

/// Refuses state changes from a web page of another origin.
fn check_origin<B>(req: &Request<B>) -> Result<(), Fail> {
    let Some(origin) = req.headers().get(ORIGIN) else {
        return Ok(());
    };
    let host = req.headers().get(HOST).and_then(|h| h.to_str().ok());
    let same = match (origin.to_str().ok(), host) {
        (Some(o), Some(h)) => {
            o.strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"))
                == Some(h)
        }
        _ => false,
    };
    if same {
        Ok(())
    } else {
        Err(Fail::new(
            StatusCode::FORBIDDEN,
            "requests that change resources are refused from another web origin; use the meshwork CLI",
        ))
    }
}

fn parse_kind(s: &str) -> Result<Kind, Fail> {
    kind_from_arg(s).ok_or_else(|| {
        Fail::bad(format!(
            "unknown kind {s:?}; known kinds: {}",
            Kind::ALL.map(Kind::as_str).join(", ")
        ))
    })
}

fn parse_version(s: &str) -> Result<u64, Fail> {
    s.trim().parse::<u64>().map_err(|_| {
        Fail::bad(format!(
            "resourceVersion must be a number as returned by the API, not {s:?}"
        ))
    })
}

async fn read_text<B>(body: B) -> Result<String, Fail>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let collected = Limited::new(body, MAX_BODY).collect().await.map_err(|e| {
        if e.downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            Fail::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {MAX_BODY} bytes; apply fewer resources at a time"),
            )
        } else {
            Fail::bad(format!("cannot read the request body: {e}"))
        }
    })?;
    String::from_utf8(collected.to_bytes().to_vec())
        .map_err(|e| Fail::bad(format!("the request body is not UTF-8 text: {e}")))
}

fn list(api: &Api, kind: Option<Kind>, namespace: Option<&str>) -> Response<Full<Bytes>> {
    let snap = api.store.snapshot();
    let items: Vec<Value> = snap
        .items
        .iter()
        .filter(|s| kind.is_none_or(|k| s.resource.kind() == k))
        .filter(|s| namespace.is_none_or(|ns| s.resource.metadata().namespace == ns))
        .map(|s| s.to_json())
        .collect();
    json_response(
        StatusCode::OK,
        &json!({"kind": "List", "revision": snap.revision, "items": items}),
    )
}

/// Runs a batch on a blocking thread (commits fsync).
async fn write(api: &Api, ops: Vec<Op>, dry_run: bool) -> Result<Applied, Fail> {
    let store = Arc::clone(&api.store);
    let joined = tokio::task::spawn_blocking(move || {
        if dry_run {
            store.dry_run(ops)
        } else {
            store.apply_batch(ops)
        }
    })
    .await;
    match joined {
        Ok(result) => result.map_err(Fail::from),
        Err(e) => Err(Fail::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error while writing: {e}"),
        )),
    }
}

fn write_response(applied: Applied, dry_run: bool) -> WriteResponse {
    WriteResponse {
        revision: applied.revision,
        dry_run,
        results: applied
            .results
            .into_iter()
            .map(|r| WriteResult {
                kind: r.key.kind.as_str().to_string(),
                namespace: r.key.namespace,
                name: r.key.name,
                outcome: r.outcome.as_str().to_string(),
                resource_version: r.version.map(|v| v.to_string()),
            })
            .collect(),
    }
}

async fn put(
    api: &Api,
    key: ResourceKey,
    text: &str,
    create_only: bool,
) -> Result<Response<Full<Bytes>>, Fail> {
    let mut docs = load_documents("request", text).map_err(|e| Fail::invalid(e, "invalid body"))?;
    let (resource, version) = match (docs.pop(), docs.is_empty()) {
        (Some(d), true) => d,
        (None, _) => return Err(Fail::bad("the body holds no resource")),
        (Some(_), false) => {
            return Err(Fail::bad(
                "the body holds several resources; PUT one, or POST them to /api/v1/apply",
            ))
        }
    };
    let got = ResourceKey::of(&resource.value);
    if got != key {
        return Err(Fail::bad(format!(
            "the body is {got} but the path names {key}"
        )));
    }
    let expected = match (create_only, version) {
        (true, _) => Precondition::MustNotExist,
        (false, Some(v)) => Precondition::Version(v),
        (false, None) => Precondition::Any,
    };
    let applied = write(api, vec![Op::Put { resource, expected }], false).await?;
    let created = applied
        .results
        .first()
        .is_some_and(|r| r.outcome == crate::store::Outcome::Created);
    match api.store.get(&key) {
        Some(s) => Ok(json_response(
            if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            &s.to_json(),
        )),
        // Deleted by someone else right after our commit.
        None => Err(Fail::new(
            StatusCode::CONFLICT,
            format!("{key} was deleted right after this write; re-read and retry"),
        )),
    }
}

async fn apply(
    api: &Api,
    file: &str,
    text: &str,
    files: bool,
    dry_run: bool,
) -> Result<Response<Full<Bytes>>, Fail> {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    if files {
        let body: FilesBody = serde_json::from_str(text).map_err(|e| {
            Fail::bad(format!(
                "body is not {FILES_CONTENT_TYPE} ({{\"files\":[{{\"name\":...,\"text\":...}}]}}): {e}"
            ))
        })?;
        for f in &body.files {
            match load_documents(&f.name, &f.text) {
                Ok(mut d) => docs.append(&mut d),
                Err(mut e) => errors.append(&mut e),
            }
        }
    } else {
        match load_documents(file, text) {
            Ok(d) => docs = d,
            Err(e) => errors = e,
        }
    }
    if !errors.is_empty() {
        return Err(Fail::invalid(errors, "invalid input"));
    }
    if docs.is_empty() {
        return Err(Fail::bad("no resources in the request"));
    }
    let ops = docs
        .into_iter()
        .map(|(resource, version)| Op::Put {
            resource,
            expected: version.map_or(Precondition::Any, Precondition::Version),
        })
        .collect();
    let applied = write(api, ops, dry_run).await?;
    Ok(json_response(
        StatusCode::OK,
        &write_response(applied, dry_run),
    ))
}

/// A resource read from a request, with the `metadata.resourceVersion` it
/// carried (its write precondition).
pub type Document = (Sourced<Resource>, Option<u64>);

/// Reads the resources of one YAML or JSON text, taking out each
/// `metadata.resourceVersion` (which the resource types do not know) as its
/// precondition. Errors are the lines to show, one per problem.
pub fn load_documents(file: &str, text: &str) -> Result<Vec<Document>, Vec<String>> {
    let trimmed = text.trim_start();
    let (text, versions) = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        json_documents(file, text)?
    } else {
        yaml_strip_versions(file, text)?
    };
    let loaded = api::load_str(file, &text)
        .map_err(|e| e.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    // Each version belongs to the document that starts last before it.
    Ok(loaded
        .into_iter()
        .map(|r| {
            let version = versions
                .iter()
                .filter(|(doc_start, _, _)| *doc_start <= r.line)
                .max_by_key(|(doc_start, _, _)| *doc_start)
                .map(|(_, _, v)| *v);
            (r, version)
        })
        .collect())
}

/// (first line of the document, line of the version, version).
type Versions = Vec<(usize, usize, u64)>;

/// JSON input: one object, an array of objects, or a `List`. Rewritten as
/// a YAML stream of pretty JSON documents (JSON is YAML), without versions.
fn json_documents(file: &str, text: &str) -> Result<(String, Versions), Vec<String>> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        vec![format!(
            "{file}:{}:{}: not valid JSON: {e}",
            e.line(),
            e.column()
        )]
    })?;
    let docs = match value {
        Value::Array(items) => items,
        Value::Object(mut map) if map.get("kind").and_then(Value::as_str) == Some("List") => {
            match map.remove("items") {
                Some(Value::Array(items)) => items,
                _ => return Err(vec![format!("{file}: a List needs an `items` array")]),
            }
        }
        other => vec![other],
    };
    let mut out = String::new();
    let mut versions = Vec::new();
    let mut errors = Vec::new();
    let mut line = 1usize;
    for (i, mut doc) in docs.into_iter().enumerate() {
        let version = doc
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .and_then(|m| m.remove("resourceVersion"));
        if let Some(v) = version {
            let parsed = match &v {
                Value::String(s) => s.trim().parse::<u64>().ok(),
                Value::Number(n) => n.as_u64(),
                _ => None,
            };
            match parsed {
                Some(n) => versions.push((line + 1, line + 1, n)),
                None => errors.push(format!(
                    "{file}: document {}: metadata.resourceVersion: expected a number as returned by the API, found {v}",
                    i + 1
                )),
            }
        }
        let pretty = serde_json::to_string_pretty(&doc).unwrap_or_default();
        out.push_str("---\n");
        line += 1;
        line += pretty.lines().count();
        out.push_str(&pretty);
        out.push('\n');
    }
    if errors.is_empty() {
        Ok((out, versions))
    } else {
        Err(errors)
    }
}

/// YAML input: blanks out `resourceVersion:` lines directly under a
/// top-level `metadata:` block, keeping every other line where it was so
/// that error positions stay right.
fn yaml_strip_versions(file: &str, text: &str) -> Result<(String, Versions), Vec<String>> {
    let mut out = String::with_capacity(text.len());
    let mut versions = Vec::new();
    let mut errors = Vec::new();
    let mut doc_start = 1usize;
    // Inside `metadata:`: the indentation of its keys, once seen.
    let mut in_metadata: Option<Option<usize>> = None;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let line_no = i + 1;
        let content = line.trim_end_matches(['\n', '\r']);
        let indent = content.len() - content.trim_start().len();
        let body = content.trim_start();
        if body.is_empty() || body.starts_with('#') {
            out.push_str(line);
            continue;
        }
        if indent == 0 {
            if content.starts_with("---") || content.starts_with("...") {
                doc_start = line_no + 1;
            }
            let key = body.split('#').next().unwrap_or("").trim_end();
            in_metadata = (key == "metadata:").then_some(None);
            out.push_str(line);
            continue;
        }
        if let Some(child) = &mut in_metadata {
            let child_indent = *child.get_or_insert(indent);
            if indent == child_indent {
                if let Some(value) = body.strip_prefix("resourceVersion:") {
                    let value = value.split(" #").next().unwrap_or("").trim();
                    let unquoted = value.trim_matches(|c| c == '"' || c == '\'');
                    match unquoted.parse::<u64>() {
                        Ok(v) => versions.push((doc_start, line_no, v)),
                        Err(_) => errors.push(format!(
                            "{file}:{line_no}: metadata.resourceVersion: expected a number as returned by the API, found {value:?}"
                        )),
                    }
                    // Keep the line (empty) so later lines keep their numbers.
                    out.push_str(&line[content.len()..]);
                    continue;
                }
            }
        }
        out.push_str(line);
    }
    if errors.is_empty() {
        Ok((out, versions))
    } else {
        Err(errors)
    }
}

/// Minimal query-string parsing with percent-decoding.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: &str) -> Query {
        Query(
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (percent_decode(k), percent_decode(v)),
                    None => (percent_decode(p), String::new()),
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests;

//! The admin credential and the CA's part of the API.
//!
//! Contract:
//! - With an [`AdminToken`], every request that changes something (PUT,
//!   POST, DELETE) must carry `Authorization: Bearer <admin token>`;
//!   otherwise 401 with a JSON error saying where the token is and how to
//!   pass it. Reads stay open (the API listens on localhost).
//! - `GET /api/v1/ca`: the CA's status (roots, phase, counters).
//!   `GET /api/v1/ca/bundle`: the trust bundle, PEM (`application/x-pem-file`).
//!   `POST /api/v1/ca/rotate` `{"graceSeconds":N,"ackTimeoutSeconds":N}`:
//!   rotation phases 1 and 2 (answers when the new root signs).
//!   `POST /api/v1/tokens` `{"namespace","serviceAccount","ttlSeconds","reusable"}`:
//!   a join token.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde::{Deserialize, Serialize};

use super::{json_response, read_text, Api, Fail};

/// File name of the admin token in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// The admin credential: a random bearer token.
pub struct AdminToken {
    token: String,
    /// Where it is kept, to tell a refused caller.
    path: Option<PathBuf>,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminToken")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Why the admin token could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    #[error("admin token file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin token file {0} is empty; put a random string in it (at least 16 characters)")]
    Empty(PathBuf),
    #[error("the system random number generator failed")]
    Random,
}

impl AdminToken {
    /// A token read from `file` (`--admin-token-file`), or
    /// `<data_dir>/admin.token` (created with a random token, 0600, on
    /// first start), or, with neither, a random in-memory token.
    pub fn load_or_create(
        file: Option<&Path>,
        data_dir: Option<&Path>,
    ) -> Result<AdminToken, AdminTokenError> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| AdminTokenError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            let token = text.trim().to_string();
            if token.is_empty() {
                return Err(AdminTokenError::Empty(path.to_path_buf()));
            }
            return Ok(AdminToken {
                token,
                path: Some(path.to_path_buf()),
            });
        }
        let Some(dir) = data_dir else {
            return Ok(AdminToken {
                token: random_token()?,
                path: None,
            });
        };
        let path = dir.join(ADMIN_TOKEN_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) if !text.trim().is_empty() => Ok(AdminToken {
                token: text.trim().to_string(),
                path: Some(path),
            }),
            Ok(_) => Err(AdminTokenError::Empty(path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let token = random_token()?;
                std::fs::create_dir_all(dir)
                    .and_then(|()| {
                        crate::ca::write_file(&path, format!("{token}\n").as_bytes(), 0o600)
                    })
                    .map_err(|source| AdminTokenError::Io {
                        path: path.clone(),
                        source,
                    })?;
                Ok(AdminToken {
                    token,
                    path: Some(path),
                })
            }
            Err(source) => Err(AdminTokenError::Io { path, source }),
        }
    }

    /// A given token (tests, embedding).
    pub fn new(token: impl Into<String>) -> AdminToken {
        AdminToken {
            token: token.into(),
            path: None,
        }
    }

    /// The token itself.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Where it is kept, if in a file.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Whether `presented` is the token (constant time in its length).
    fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.token.as_bytes(), presented.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

fn random_token() -> Result<String, AdminTokenError> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AdminTokenError::Random)?;
    Ok(format!(
        "mwa1.{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// Refuses a mutating request without the admin token.
pub(super) fn check<B>(api: &Api, req: &Request<B>) -> Result<(), Fail> {
    let Some(admin) = &api.admin else {
        return Ok(());
    };
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().strip_prefix("Bearer ").unwrap_or(v).trim());
    let where_ = match admin.path() {
        Some(p) => format!("it is in {}", p.display()),
        None => "it was given to the control plane at start".to_string(),
    };
    match presented {
        Some(t) if admin.matches(t) => Ok(()),
        Some(_) => Err(Fail::new(
            StatusCode::UNAUTHORIZED,
            format!("wrong admin token ({where_}); pass that one with `--admin-token-file FILE` or MESHWORK_ADMIN_TOKEN, or the header `Authorization: Bearer <token>`"),
        )),
        None => Err(Fail::new(
            StatusCode::UNAUTHORIZED,
            format!("this request changes the mesh and needs the admin token ({where_}); pass it with `--admin-token-file FILE` or MESHWORK_ADMIN_TOKEN, or the header `Authorization: Bearer <token>`"),
        )),
    }
}

/// `POST /api/v1/tokens` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenRequest {
    pub namespace: String,
    pub service_account: String,
    /// Lifetime in seconds.
    pub ttl_seconds: u64,
    #[serde(default)]
    pub reusable: bool,
}

/// `POST /api/v1/tokens` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenResponse {
    pub token: String,
    pub spiffe_id: String,
    /// Unix seconds.
    pub expires_at: u64,
    pub reusable: bool,
}

/// `POST /api/v1/ca/rotate` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RotateRequest {
    /// How long the old root stays trusted after the new one signs.
    #[serde(default)]
    pub grace_seconds: Option<u64>,
    /// Bound on the wait for ROOTCA ACKs.
    #[serde(default)]
    pub ack_timeout_seconds: Option<u64>,
}

fn no_ca() -> Fail {
    Fail::new(
        StatusCode::NOT_FOUND,
        "this control plane runs without a CA",
    )
}

async fn body_json<T: serde::de::DeserializeOwned, B>(
    req: Request<B>,
    what: &str,
) -> Result<T, Fail>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let text = read_text(req.into_body()).await?;
    let text = if text.trim().is_empty() {
        "{}"
    } else {
        text.as_str()
    };
    serde_json::from_str(text).map_err(|e| Fail::bad(format!("{what}: {e}")))
}

/// The `ca` and `tokens` endpoints.
pub(super) async fn route<B>(
    api: &Api,
    segs: &[&str],
    req: Request<B>,
) -> Result<Response<Full<Bytes>>, Fail>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let ca = api.ca.as_ref().ok_or_else(no_ca)?;
    let method = req.method().clone();
    match (segs, method) {
        (["ca"], Method::GET) => Ok(json_response(StatusCode::OK, &ca.status_json())),
        (["ca", "bundle"], Method::GET) => {
            let mut r = Response::new(Full::new(Bytes::from(ca.bundle_pem())));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/x-pem-file"));
            Ok(r)
        }
        (["ca", "rotate"], Method::POST) => {
            let body: RotateRequest = body_json(req, "rotate request").await?;
            let grace = body
                .grace_seconds
                .map_or(crate::ca::DEFAULT_GRACE, Duration::from_secs);
            let ack = body
                .ack_timeout_seconds
                .map_or(crate::ca::DEFAULT_ACK_TIMEOUT, Duration::from_secs);
            match ca.rotate(grace, ack, api.acks.as_ref()).await {
                Ok(report) => Ok(json_response(StatusCode::OK, &report)),
                Err(e) if e.is_conflict() => Err(Fail::new(StatusCode::CONFLICT, e.to_string())),
                Err(e) => Err(Fail::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
            }
        }
        (["tokens"], Method::POST) => {
            let body: TokenRequest = body_json(req, "token request").await?;
            let (token, claims) = ca
                .create_token(
                    &body.namespace,
                    &body.service_account,
                    Duration::from_secs(body.ttl_seconds),
                    body.reusable,
                )
                .map_err(|e| Fail::bad(format!("cannot create the token: {e}")))?;
            let id = claims.spiffe_id().map(|i| i.to_string()).unwrap_or_default();
            tracing::info!(spiffe_id = %id, reusable = claims.reusable, "join token created");
            Ok(json_response(
                StatusCode::CREATED,
                &TokenResponse {
                    token,
                    spiffe_id: id,
                    expires_at: claims.exp,
                    reusable: claims.reusable,
                },
            ))
        }
        (["ca"] | ["ca", "bundle"], _) => Err(Fail::method("GET")),
        (["ca", "rotate"] | ["tokens"], _) => Err(Fail::method("POST")),
        _ => Err(Fail::new(
            StatusCode::NOT_FOUND,
            "no such CA endpoint; the API has /api/v1/ca, /api/v1/ca/bundle, /api/v1/ca/rotate, /api/v1/tokens",
        )),
    }
}

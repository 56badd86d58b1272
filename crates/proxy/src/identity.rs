//! The proxy's workload identity: get an X.509-SVID from the control plane
//! with a join token, keep it fresh, follow the trust bundle.
//!
//! # Contract (docs/identity.md, "Proxy side")
//!
//! - [`Manager::bootstrap`] generates the key in this process
//!   ([`identity::generate_key_and_csr`]), calls `Sign` on the control plane
//!   over TLS (verified against `--ca-bundle`) with `authorization: Bearer
//!   <token>`, checks the answer (the chain parses, its leaf carries the
//!   expected SPIFFE id, the bundle is usable, the leaf chains to it) and
//!   installs it into the shared [`WorkloadIdentity`] the data path and the
//!   xDS channel read at handshake time. A refusal (bad, expired or spent
//!   token, wrong identity) or a control plane that does not verify ends
//!   bootstrap with an error that names the fix; an unreachable control
//!   plane is retried with backoff, logged at every attempt.
//! - [`Manager::run`] renews at [`identity::renew_at`] (half-life minus up to
//!   10% jitter) by calling `Sign` again with a fresh key, presenting the
//!   current SVID as the TLS client certificate and no token; failures are
//!   retried with capped exponential backoff, logged and counted.
//! - [`Manager::on_bundle`] takes the `ROOTCA` secret's PEM from the ADS
//!   stream: installs it and, if the bundle's first (signing) root did not
//!   issue the current leaf, renews at once (after a small random jitter).
//! - The expected identity comes from the token's claims, read without
//!   verification (the control plane verifies; the proxy only needs to know
//!   what to ask for and what to accept).
//! - With `identity_dir`, key, chain and bundle are written there (0600) after
//!   every issue, and a restarted proxy resumes from a still-valid
//!   certificate instead of a (single-use, already spent) token.
//!
//! # Non-goals
//!
//! Revocation (SVIDs are short-lived), hardware keys, serving SDS to other
//! processes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::identity::wire::{SignRequest, SignResponse};
use ::identity::{
    certs_from_pem, generate_key_and_csr, renew_at, spiffe_id_of, Claims, SpiffeId, TrustBundle,
    WorkloadIdentity, DEFAULT_RENEW_JITTER,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use tokio::sync::Notify;

use crate::drain;

pub mod client;

pub use ::identity::TrustDomain;
pub use client::ControlConnector;

/// Where `--ca-bundle` comes from, for error messages.
pub const BUNDLE_HINT: &str =
    "get it from the control plane's host with `meshwork ca bundle > root.pem` \
     (or copy <data-dir>/ca/bundle.pem)";
/// How to get a new token, for error messages.
pub const TOKEN_HINT: &str =
    "create a new one with `meshwork token create --namespace NS --service-account SA`";

/// File names under `--identity-dir`.
const KEY_FILE: &str = "key.pem";
const CHAIN_FILE: &str = "svid.pem";
const BUNDLE_FILE: &str = "bundle.pem";

/// A renewal triggered by a new signing root waits up to this long, so a
/// fleet does not hit the CA in the same instant.
const REISSUE_JITTER: Duration = Duration::from_millis(500);
/// Never renew again sooner than this after a certificate was installed
/// (guards against a tight loop on a certificate with almost no lifetime).
const MIN_RENEW_INTERVAL: Duration = Duration::from_millis(500);
/// First retry delay after a failed renewal.
const FIRST_RETRY: Duration = Duration::from_millis(200);

/// A join token. Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Wraps a token as `meshwork token create` printed it (surrounding
    /// whitespace, e.g. a file's trailing newline, is dropped).
    pub fn new(token: &str) -> Self {
        Self(token.trim().to_owned())
    }

    /// The token text, for the `authorization` header.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The claims inside the token, decoded without verifying the
    /// signature (only the control plane can verify it).
    pub fn claims(&self) -> Result<Claims, String> {
        let mut parts = self.0.split('.');
        let (Some("mwt1"), Some(payload), Some(_mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a meshwork join token (expected mwt1.<claims>.<signature>)".into());
        };
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| "the join token's claims are not base64url".to_owned())?;
        serde_json::from_slice(&json).map_err(|e| format!("the join token's claims: {e}"))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token([secret])")
    }
}

/// What the identity manager is told (`meshwork proxy --token ... --ca-bundle ...`).
#[derive(Debug, Clone)]
pub struct Options {
    /// Control-plane addresses (`host:port`, optionally `http(s)://`), tried in turn.
    pub servers: Vec<String>,
    /// The join token for the first certificate.
    pub token: Option<Token>,
    /// The control plane's trust bundle (PEM roots).
    pub bundle_pem: String,
    /// Where the bundle was read from, for messages.
    pub bundle_source: String,
    /// If set, the identity must be in this trust domain.
    pub trust_domain: Option<TrustDomain>,
    /// Where to keep key and certificate across restarts (0600 files).
    pub identity_dir: Option<PathBuf>,
    /// Requested certificate lifetime; `None`: the CA's default.
    pub ttl: Option<Duration>,
    /// TCP+TLS connect bound per attempt.
    pub connect_timeout: Duration,
    /// Longest pause between retries.
    pub max_backoff: Duration,
}

/// Why the proxy could not get (or resume) its identity. Each message says
/// what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `--ca-bundle` is unusable.
    #[error("--ca-bundle {source_name}: {reason}; {hint}", hint = BUNDLE_HINT)]
    Bundle {
        /// The file named.
        source_name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The token cannot be read.
    #[error("join token: {0}; pass the token exactly as `meshwork token create` printed it")]
    Token(String),
    /// The token expired before it was used.
    #[error("the join token for {id} expired at {at}; create a new one with `meshwork token create --namespace {namespace} --service-account {service_account}`")]
    TokenExpired {
        /// The identity it was for.
        id: String,
        /// Its expiry, RFC 3339.
        at: String,
        /// The identity's namespace.
        namespace: String,
        /// The identity's service account.
        service_account: String,
    },
    /// The token's (or saved certificate's) trust domain is not `--trust-domain`.
    #[error("the identity {id} is not in trust domain {expected} (--trust-domain); use a token from that mesh's control plane")]
    WrongTrustDomain {
        /// The identity found.
        id: String,
        /// `--trust-domain`.
        expected: String,
    },
    /// No token, and nothing usable in `--identity-dir`.
    #[error("no join token given{saved}; pass --token, --token-file or $MESHWORK_TOKEN ({hint})", hint = TOKEN_HINT)]
    NoCredential {
        /// What was found in the identity dir, if one was given.
        saved: String,
    },
    /// The control plane refused to sign.
    #[error("the control plane at {server} refused the certificate request: {reason}{fix}")]
    Refused {
        /// Which replica.
        server: String,
        /// Its code and message.
        reason: String,
        /// What to do about it.
        fix: String,
    },
    /// The control plane's certificate did not verify, or it does not speak TLS.
    #[error("the control plane at {server} could not be verified: {reason}; check that --ca-bundle ({bundle}) holds its current roots ({hint}) and that the address is one its certificate names (--tls-san)", hint = BUNDLE_HINT)]
    Untrusted {
        /// Which replica.
        server: String,
        /// rustls's verdict.
        reason: String,
        /// The bundle file.
        bundle: String,
    },
    /// The answer was not a usable certificate for this identity.
    #[error("the control plane at {server} sent an unusable certificate: {reason}")]
    BadResponse {
        /// Which replica.
        server: String,
        /// What was wrong.
        reason: String,
    },
    /// No control-plane address.
    #[error("no control-plane address given (--control host:port)")]
    NoServer,
    /// Generating the key failed.
    #[error("{0}")]
    KeyGen(#[from] ::identity::KeyGenError),
    /// The identity could not be set up (TLS config).
    #[error("{0}")]
    Tls(#[from] ::identity::TlsError),
    /// `--identity-dir` cannot be written.
    #[error("--identity-dir {dir}: {source}; pass a directory this proxy may write (it keeps its key there, mode 0600)")]
    Persist {
        /// The directory.
        dir: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Gets, renews and exposes this proxy's certificate. Share as `Arc<Manager>`.
pub struct Manager {
    opts: Options,
    identity: Arc<WorkloadIdentity>,
    connector: ControlConnector,
    expected: SpiffeId,
    cert: Mutex<Option<CertInfo>>,
    issued: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
    next_server: AtomicUsize,
    reissue: Notify,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("expected", &self.expected.to_string())
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// What is known about the installed certificate.
#[derive(Debug, Clone)]
struct CertInfo {
    id: SpiffeId,
    chain_pem: String,
    serial: String,
    fingerprint: String,
    not_before: SystemTime,
    not_after: SystemTime,
    renew_at: SystemTime,
    installed_at: SystemTime,
}

impl Manager {
    /// Gets the first certificate: from `identity_dir` if a valid one for
    /// the expected identity is saved there, else by `Sign` with the token.
    /// Returns once a certificate is installed, or with an error naming
    /// the fix. Transient failures (control plane unreachable) are retried
    /// with backoff and logged; cancel the future to give up.
    pub async fn bootstrap(opts: Options) -> Result<Arc<Self>, Error> {
        if opts.servers.is_empty() {
            return Err(Error::NoServer);
        }
        let bundle = TrustBundle::from_pem(&opts.bundle_pem).map_err(|e| Error::Bundle {
            source_name: opts.bundle_source.clone(),
            reason: e.to_string(),
        })?;
        let saved = match &opts.identity_dir {
            Some(dir) => load_saved(dir),
            None => Saved::None,
        };
        // Roots saved by a previous run may be newer than --ca-bundle (a
        // rotation happened meanwhile): trust both until ROOTCA arrives.
        let bundle = match &saved {
            Saved::Usable {
                bundle: Some(b), ..
            } => bundle.merged(b),
            _ => bundle,
        };
        let claims = match &opts.token {
            Some(t) => Some(t.claims().map_err(Error::Token)?),
            None => None,
        };
        let expected = match (&claims, &saved) {
            (Some(c), _) => c
                .spiffe_id()
                .map_err(|e| Error::Token(format!("the identity in the token: {e}")))?,
            (None, Saved::Usable { id, .. }) => id.clone(),
            (None, other) => {
                return Err(Error::NoCredential {
                    saved: other.describe(opts.identity_dir.as_deref()),
                })
            }
        };
        if let Some(td) = &opts.trust_domain {
            if expected.trust_domain() != td {
                return Err(Error::WrongTrustDomain {
                    id: expected.to_string(),
                    expected: td.to_string(),
                });
            }
        }
        let identity = WorkloadIdentity::new(bundle);
        let connector = ControlConnector::new(&identity)?;
        let manager = Arc::new(Self {
            opts,
            identity,
            connector,
            expected,
            cert: Mutex::new(None),
            issued: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
            next_server: AtomicUsize::new(0),
            reissue: Notify::new(),
        });

        if let Saved::Usable {
            id,
            chain_pem,
            key_pem,
            ..
        } = &saved
        {
            if *id == manager.expected {
                match manager.install_chain(chain_pem, key_pem, false) {
                    Ok(()) => {
                        tracing::info!(
                            spiffe_id = %id,
                            dir = %manager.dir_display(),
                            "resumed the workload certificate saved by a previous run"
                        );
                        return Ok(manager);
                    }
                    Err(reason) => tracing::warn!(
                        %reason,
                        "the saved workload certificate is unusable; asking for a new one"
                    ),
                }
            } else {
                tracing::info!(saved = %id, token = %manager.expected, "the saved certificate is for another identity than the token's; asking for a new one");
            }
        }

        let Some(claims) = claims else {
            return Err(Error::NoCredential {
                saved: saved.describe(manager.opts.identity_dir.as_deref()),
            });
        };
        if unix(SystemTime::now()) >= claims.exp {
            return Err(Error::TokenExpired {
                id: manager.expected.to_string(),
                namespace: manager.expected.namespace().to_owned(),
                service_account: manager.expected.service_account().to_owned(),
                at: rfc3339(UNIX_EPOCH + Duration::from_secs(claims.exp)),
            });
        }
        manager.first_issue().await?;
        Ok(manager)
    }

    /// The identity the data path and the xDS channel use.
    pub fn identity(&self) -> Arc<WorkloadIdentity> {
        self.identity.clone()
    }

    /// The SPIFFE id this proxy holds (or asks for).
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.expected
    }

    /// A connector for TLS channels to the control plane (xDS).
    pub fn connector(&self) -> ControlConnector {
        self.connector.clone()
    }

    /// Renews the certificate until `stop` is signaled. Spawn it once.
    pub async fn run(self: Arc<Self>, stop: drain::Watch) {
        loop {
            let wait = {
                let cert = lock(&self.cert);
                match cert.as_ref() {
                    Some(c) => {
                        let floor = c.installed_at + MIN_RENEW_INTERVAL;
                        until(c.renew_at.max(floor))
                    }
                    None => Duration::ZERO,
                }
            };
            let reason = tokio::select! {
                () = stop.signaled() => return,
                () = tokio::time::sleep(wait) => "half-life",
                () = self.reissue.notified() => {
                    if !self.needs_reissue() {
                        continue;
                    }
                    let jitter = REISSUE_JITTER.mul_f64(fastrand::f64());
                    tokio::select! {
                        () = stop.signaled() => return,
                        () = tokio::time::sleep(jitter) => {}
                    }
                    "new signing root"
                }
            };
            if !self.renew_with_retries(&stop, reason).await {
                return;
            }
        }
    }

    /// Installs a trust bundle pushed as the `ROOTCA` secret. An
    /// unparseable bundle is refused (the caller NACKs with this reason)
    /// and the current one stays. If its first root did not issue the
    /// current certificate, a renewal starts shortly.
    pub fn on_bundle(&self, pem: &str) -> Result<(), String> {
        let bundle = TrustBundle::from_pem(pem).map_err(|e| format!("ROOTCA trust bundle: {e}"))?;
        let unchanged = self.identity.bundle().roots() == bundle.roots();
        if !unchanged {
            tracing::info!(
                roots = bundle.roots().len(),
                first = %bundle.roots().first().map(|r| fingerprint(r)).unwrap_or_default(),
                "trust bundle updated"
            );
            self.identity.set_bundle(bundle);
            self.save_bundle();
        }
        if self.needs_reissue() {
            tracing::info!("the signing root changed: renewing the workload certificate");
            self.reissue.notify_one();
        }
        Ok(())
    }

    /// `/certs`: the current certificate and trust bundle, as JSON.
    pub fn status(&self) -> serde_json::Value {
        let cert = lock(&self.cert).clone();
        let bundle = self.identity.bundle();
        let roots: Vec<serde_json::Value> = bundle
            .roots()
            .iter()
            .map(|r| {
                let (subject, not_after) = match x509_parser::parse_x509_certificate(r) {
                    Ok((_, c)) => (
                        c.subject().to_string(),
                        serde_json::Value::String(rfc3339(
                            UNIX_EPOCH
                                + Duration::from_secs(
                                    u64::try_from(c.validity().not_after.timestamp()).unwrap_or(0),
                                ),
                        )),
                    ),
                    Err(_) => (String::new(), serde_json::Value::Null),
                };
                serde_json::json!({
                    "subject": subject,
                    "fingerprint_sha256": fingerprint(r),
                    "not_after": not_after,
                })
            })
            .collect();
        let last_error = lock(&self.last_error).clone();
        let mut v = serde_json::json!({
            "spiffe_id": self.expected.to_string(),
            "issued": self.issued.load(Ordering::Relaxed),
            "renewal_failures": self.failures.load(Ordering::Relaxed),
            "last_error": last_error,
            "trust_bundle": roots,
            "identity_dir": self.opts.identity_dir.as_ref().map(|d| d.display().to_string()),
        });
        if let (Some(c), Some(obj)) = (cert, v.as_object_mut()) {
            let now = SystemTime::now();
            obj.insert("spiffe_id".into(), c.id.to_string().into());
            obj.insert("serial".into(), c.serial.clone().into());
            obj.insert("fingerprint_sha256".into(), c.fingerprint.clone().into());
            obj.insert("not_before".into(), rfc3339(c.not_before).into());
            obj.insert("not_after".into(), rfc3339(c.not_after).into());
            obj.insert("not_after_unix".into(), unix(c.not_after).into());
            obj.insert("renew_at".into(), rfc3339(c.renew_at).into());
            obj.insert("expired".into(), (now >= c.not_after).into());
            obj.insert(
                "issued_by_signing_root".into(),
                bundle
                    .roots()
                    .first()
                    .map(|r| issued_by(&c.chain_pem, r))
                    .unwrap_or(false)
                    .into(),
            );
        }
        v
    }

    /// Prometheus text for the identity: certificates obtained, failed
    /// attempts, and the current certificate's expiry.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let id = escape_label(&self.expected.to_string());
        let _ = writeln!(
            out,
            "# HELP meshwork_identity_certificates_issued_total Workload certificates obtained from the control plane (first and renewals).\n\
             # TYPE meshwork_identity_certificates_issued_total counter\n\
             meshwork_identity_certificates_issued_total{{spiffe_id=\"{id}\"}} {}",
            self.issued.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP meshwork_identity_renewal_failures_total Failed attempts to obtain a workload certificate (each retry counts).\n\
             # TYPE meshwork_identity_renewal_failures_total counter\n\
             meshwork_identity_renewal_failures_total{{spiffe_id=\"{id}\"}} {}",
            self.failures.load(Ordering::Relaxed)
        );
        if let Some(c) = lock(&self.cert).as_ref() {
            let _ = writeln!(
                out,
                "# HELP meshwork_identity_cert_expiry_timestamp_seconds When the current workload certificate expires (unix time).\n\
                 # TYPE meshwork_identity_cert_expiry_timestamp_seconds gauge\n\
                 meshwork_identity_cert_expiry_timestamp_seconds{{spiffe_id=\"{id}\"}} {}",
                unix(c.not_after)
            );
        }
    }

    /// The first certificate with the token: replicas in turn, transient
    /// failures retried (logged each time), refusals returned at once.
    async fn first_issue(&self) -> Result<(), Error> {
        let mut backoff = FIRST_RETRY;
        loop {
            let server = self.next_server();
            match self.issue(&server, true).await {
                Ok(()) => return Ok(()),
                Err(Attempt::Sign(e)) if e.is_retryable() => {
                    self.failed(&e.to_string());
                    tracing::warn!(%server, error = %e, retry_in = ?backoff, "cannot get the workload certificate yet; retrying");
                }
                Err(Attempt::Sign(e)) => return Err(self.fatal(&server, e)),
                Err(Attempt::Response(reason)) => {
                    self.failed(&reason);
                    return Err(Error::BadResponse { server, reason });
                }
                Err(Attempt::Key(e)) => return Err(e.into()),
            }
            tokio::time::sleep(backoff + backoff.mul_f64(fastrand::f64() * 0.25)).await;
            backoff = (backoff * 2).min(self.opts.max_backoff);
        }
    }

    /// Renews until it works or `stop`; returns false on stop.
    async fn renew_with_retries(&self, stop: &drain::Watch, reason: &str) -> bool {
        let mut backoff = FIRST_RETRY;
        loop {
            let server = self.next_server();
            let expired = lock(&self.cert)
                .as_ref()
                .is_none_or(|c| SystemTime::now() >= c.not_after);
            // An expired certificate no longer authenticates: a (reusable)
            // token is the only way back.
            let with_token = expired && self.opts.token.is_some();
            let result = self.issue(&server, with_token).await;
            let error = match result {
                Ok(()) => {
                    let cert = lock(&self.cert).clone();
                    if let Some(c) = cert {
                        tracing::info!(
                            %server,
                            why = reason,
                            serial = %c.serial,
                            not_after = %rfc3339(c.not_after),
                            renew_at = %rfc3339(c.renew_at),
                            "workload certificate renewed"
                        );
                    }
                    *lock(&self.last_error) = None;
                    return true;
                }
                Err(Attempt::Sign(e)) => e.to_string(),
                Err(Attempt::Response(r)) => format!("unusable answer: {r}"),
                Err(Attempt::Key(e)) => e.to_string(),
            };
            self.failed(&error);
            let remaining = lock(&self.cert)
                .as_ref()
                .map(|c| until(c.not_after))
                .unwrap_or_default();
            let pause = backoff
                .min(remaining / 4)
                .max(Duration::from_millis(100))
                .min(self.opts.max_backoff);
            if remaining.is_zero() {
                tracing::error!(
                    %server,
                    %error,
                    retry_in = ?pause,
                    "the workload certificate has EXPIRED and could not be renewed: mTLS and the \
                     control-plane channel fail until it is; if the control plane is up, restart \
                     the proxy with a new token ({TOKEN_HINT})"
                );
            } else {
                tracing::warn!(%server, %error, retry_in = ?pause, valid_for = ?remaining, "workload certificate renewal failed; retrying");
            }
            tokio::select! {
                () = stop.signaled() => return false,
                () = tokio::time::sleep(pause) => {}
            }
            backoff = (backoff * 2).min(self.opts.max_backoff);
        }
    }

    /// One `Sign` round trip with a fresh key, installed if it checks out.
    async fn issue(&self, server: &str, with_token: bool) -> Result<(), Attempt> {
        let key = generate_key_and_csr(&self.expected).map_err(Attempt::Key)?;
        let request = SignRequest {
            csr_pem: key.csr_pem.clone(),
            ttl_seconds: self
                .opts
                .ttl
                .map(|t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX))
                .unwrap_or(0),
        };
        let token = if with_token {
            self.opts.token.as_ref().map(Token::as_str)
        } else {
            None
        };
        let response = client::sign(
            self.connector.clone(),
            server,
            self.opts.connect_timeout,
            request,
            token,
        )
        .await
        .map_err(Attempt::Sign)?;
        self.accept(response, &key.key_pem)
            .map_err(Attempt::Response)
    }

    /// Checks a `Sign` answer and installs it.
    fn accept(&self, response: SignResponse, key_pem: &str) -> Result<(), String> {
        if response.chain_pem.is_empty() {
            return Err("the certificate chain is empty".into());
        }
        if response.spiffe_id != self.expected.to_string() {
            return Err(format!(
                "it is for {:?}, this proxy asked for {}",
                response.spiffe_id, self.expected
            ));
        }
        let bundle = TrustBundle::from_pem(&response.bundle_pem)
            .map_err(|e| format!("its trust bundle: {e}"))?;
        let chain_pem = response.chain_pem.concat();
        certs_from_pem(&chain_pem).map_err(|e| format!("its chain: {e}"))?;
        if !bundle.roots().iter().any(|r| issued_by(&chain_pem, r)) {
            return Err(
                "the chain does not lead to any root of the trust bundle sent with it".into(),
            );
        }
        if bundle.roots() != self.identity.bundle().roots() {
            self.identity.set_bundle(bundle);
        }
        self.install_chain(&chain_pem, key_pem, true)?;
        self.issued.fetch_add(1, Ordering::Relaxed);
        self.save(&chain_pem, key_pem);
        Ok(())
    }

    /// Installs a chain+key into the identity and schedules its renewal.
    /// `fresh`: just issued (schedule from now, since the CA backdates
    /// `not_before`), else resumed from disk (schedule from `not_before`).
    fn install_chain(&self, chain_pem: &str, key_pem: &str, fresh: bool) -> Result<(), String> {
        let certs = certs_from_pem(chain_pem).map_err(|e| format!("its chain: {e}"))?;
        let leaf = certs.first().ok_or("the chain is empty")?;
        let id = spiffe_id_of(leaf).map_err(|e| format!("its leaf: {e}"))?;
        if id != self.expected {
            return Err(format!(
                "its leaf is for {id}, this proxy is {}",
                self.expected
            ));
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| format!("its leaf does not parse: {e}"))?;
        let time = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
        let not_before = time(parsed.validity().not_before.timestamp());
        let not_after = time(parsed.validity().not_after.timestamp());
        let now = SystemTime::now();
        if now >= not_after {
            return Err(format!("it expired at {}", rfc3339(not_after)));
        }
        let serial = parsed.raw_serial_as_string();
        self.identity
            .update(chain_pem, key_pem)
            .map_err(|e| e.to_string())?;
        let start = if fresh {
            now.clamp(not_before, not_after)
        } else {
            not_before
        };
        let renew = renew_at(
            start,
            not_after,
            DEFAULT_RENEW_JITTER,
            &mut fastrand::Rng::new(),
        );
        *lock(&self.cert) = Some(CertInfo {
            id,
            chain_pem: chain_pem.to_owned(),
            serial,
            fingerprint: fingerprint(leaf),
            not_before,
            not_after,
            renew_at: renew,
            installed_at: now,
        });
        Ok(())
    }

    /// Whether the bundle's signing (first) root did not issue the current leaf.
    fn needs_reissue(&self) -> bool {
        let bundle = self.identity.bundle();
        let Some(first) = bundle.roots().first() else {
            return false;
        };
        match lock(&self.cert).as_ref() {
            Some(c) => !issued_by(&c.chain_pem, first),
            None => false,
        }
    }

    fn fatal(&self, server: &str, e: client::SignError) -> Error {
        self.failed(&e.to_string());
        if let Some(client::ConnectError::Tls { source, .. }) = e.connect_error() {
            return Error::Untrusted {
                server: server.to_owned(),
                reason: source.to_string(),
                bundle: self.opts.bundle_source.clone(),
            };
        }
        let message = match &e {
            client::SignError::Status(s) => s.message(),
            _ => "",
        };
        let fix = match e.code() {
            // The control plane's message usually says how already.
            Some(tonic::Code::Unauthenticated) if message.contains("meshwork token create") => {
                String::new()
            }
            Some(tonic::Code::Unauthenticated) => format!(
                "; create a new token with `meshwork token create --namespace {} --service-account {}`",
                self.expected.namespace(),
                self.expected.service_account()
            ),
            Some(tonic::Code::PermissionDenied) => format!(
                "; the token does not grant {}: create one for this identity",
                self.expected
            ),
            Some(tonic::Code::FailedPrecondition) => {
                "; the control plane needs TLS on its xDS port for certificates".into()
            }
            Some(tonic::Code::Unimplemented) => {
                "; this control plane has no certificate service: upgrade it, or run the proxy without --token".into()
            }
            _ => String::new(),
        };
        let reason = match &e {
            client::SignError::Status(s) => format!("{}: {}", code_label(s.code()), s.message()),
            other => other.to_string(),
        };
        Error::Refused {
            server: server.to_owned(),
            reason,
            fix,
        }
    }

    fn failed(&self, error: &str) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_error) = Some(error.to_owned());
    }

    fn next_server(&self) -> String {
        let i = self.next_server.fetch_add(1, Ordering::Relaxed);
        self.opts
            .servers
            .get(i % self.opts.servers.len().max(1))
            .cloned()
            .unwrap_or_default()
    }

    fn dir_display(&self) -> String {
        self.opts
            .identity_dir
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_default()
    }

    /// Writes key, chain and bundle to the identity dir, if any. Failures
    /// are logged: the certificate in memory is what matters.
    fn save(&self, chain_pem: &str, key_pem: &str) {
        let Some(dir) = &self.opts.identity_dir else {
            return;
        };
        let bundle = self.identity.bundle().to_pem();
        let result = create_private_dir(dir)
            .and_then(|()| write_private(&dir.join(KEY_FILE), key_pem))
            .and_then(|()| write_private(&dir.join(CHAIN_FILE), chain_pem))
            .and_then(|()| write_private(&dir.join(BUNDLE_FILE), &bundle));
        if let Err(e) = result {
            tracing::error!(dir = %dir.display(), error = %e, "cannot save the workload certificate; a restart will need a new token");
        }
    }

    fn save_bundle(&self) {
        let Some(dir) = &self.opts.identity_dir else {
            return;
        };
        let bundle = self.identity.bundle().to_pem();
        if let Err(e) =
            create_private_dir(dir).and_then(|()| write_private(&dir.join(BUNDLE_FILE), &bundle))
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot save the trust bundle");
        }
    }
}

/// Checks that the identity dir is writable before anything is issued, so
/// a bad `--identity-dir` fails at start, not after the token is spent.
pub fn check_identity_dir(dir: &Path) -> Result<(), Error> {
    let probe = dir.join(".meshwork-write-test");
    create_private_dir(dir)
        .and_then(|()| write_private(&probe, ""))
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|source| Error::Persist {
            dir: dir.display().to_string(),
            source,
        })
}

/// Why one attempt failed.
enum Attempt {
    Sign(client::SignError),
    Response(String),
    Key(::identity::KeyGenError),
}

/// What `--identity-dir` holds.
enum Saved {
    None,
    Missing,
    Expired(SystemTime),
    Unreadable(String),
    Usable {
        id: SpiffeId,
        chain_pem: String,
        key_pem: String,
        bundle: Option<TrustBundle>,
    },
}

impl Saved {
    fn describe(&self, dir: Option<&Path>) -> String {
        let dir = dir.map(|d| d.display().to_string()).unwrap_or_default();
        match self {
            Saved::None => String::new(),
            Saved::Missing | Saved::Usable { .. } => {
                format!(" and no saved certificate in --identity-dir {dir}")
            }
            Saved::Expired(at) => format!(
                " and the certificate saved in --identity-dir {dir} expired at {}",
                rfc3339(*at)
            ),
            Saved::Unreadable(e) => {
                format!(" and the certificate saved in --identity-dir {dir} is unusable ({e})")
            }
        }
    }
}

fn load_saved(dir: &Path) -> Saved {
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    let (chain_pem, key_pem) = match (read(CHAIN_FILE), read(KEY_FILE)) {
        (Ok(c), Ok(k)) => (c, k),
        (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Saved::Missing
        }
        (Err(e), _) | (_, Err(e)) => return Saved::Unreadable(e.to_string()),
    };
    let leaf = match certs_from_pem(&chain_pem) {
        Ok(certs) => match certs.into_iter().next() {
            Some(l) => l,
            None => return Saved::Unreadable("empty chain".into()),
        },
        Err(e) => return Saved::Unreadable(e.to_string()),
    };
    let id = match spiffe_id_of(&leaf) {
        Ok(id) => id,
        Err(e) => return Saved::Unreadable(e.to_string()),
    };
    match ::identity::leaf_validity(&chain_pem) {
        Ok((_, not_after)) if SystemTime::now() >= not_after => Saved::Expired(not_after),
        Ok(_) => Saved::Usable {
            id,
            chain_pem,
            key_pem,
            bundle: read(BUNDLE_FILE)
                .ok()
                .and_then(|b| TrustBundle::from_pem(&b).ok()),
        },
        Err(e) => Saved::Unreadable(e.to_string()),
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Writes `text` to `path` atomically (temp file + rename), mode 0600.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Whether `root` issued the top of `chain_pem` (the leaf, or the last
/// intermediate): its signature verifies with the root's key and its
/// issuer name is the root's subject. Two roots of one trust domain share
/// a subject, so the signature is what tells them apart.
fn issued_by(chain_pem: &str, root: &[u8]) -> bool {
    let Ok(certs) = certs_from_pem(chain_pem) else {
        return false;
    };
    let Some(top) = certs.last() else {
        return false;
    };
    let (Ok((_, top)), Ok((_, root))) = (
        x509_parser::parse_x509_certificate(top),
        x509_parser::parse_x509_certificate(root),
    ) else {
        return false;
    };
    top.issuer().as_raw() == root.subject().as_raw()
        && top.verify_signature(Some(root.public_key())).is_ok()
}

/// SHA-256 of a DER certificate, lowercase hex.
fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn code_label(code: tonic::Code) -> String {
    format!("{code:?}")
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now()).unwrap_or_default()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC; the access log's calendar, whole seconds).
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let secs = unix(t);
    let rem = secs % 86_400;
    let (year, month, day) = crate::accesslog::civil_from_days(i128::from(secs / 86_400));
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;

//! `meshwork control`'s composition root: open the store, derive the mesh
//! from it, open the CA and the admin token, start the registry, the xDS
//! server (TLS, with the CA's Sign method) and the HTTP API, and stop them
//! together.
//!
//! The store is the only source of truth for declared resources; every
//! commit bumps its revision, and a task turns each revision into a
//! validated `api::Mesh` that the xDS server watches. Registered workloads
//! live in the registry and are merged in by the xDS server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use identity::TrustDomain;
use tokio::sync::watch;

use crate::api::{AdminToken, ApiParts, ProxyStatus};
use crate::ca::{AckTracker, Authority, CaOptions};
use crate::registry::Registry;
use crate::store::Store;
use crate::xds::{XdsServer, XdsTls};

/// The trust domain when none is given.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Everything `meshwork control` is told on its command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the embedded store (and the CA, tokens, admin token) keep their
    /// files; `None`: all in memory (tests).
    pub data_dir: Option<PathBuf>,
    pub xds_addr: SocketAddr,
    pub api_addr: SocketAddr,
    /// How long a disconnected proxy's workload stays registered.
    pub grace: Duration,
    /// Trust domain of every identity the CA issues (validated at start).
    pub trust_domain: String,
    /// SVID lifetime when the CSR asks for none.
    pub svid_ttl: Duration,
    /// Longest SVID lifetime granted.
    pub max_svid_ttl: Duration,
    /// An operator-supplied CA: (certificate PEM file, PKCS#8 key PEM file).
    pub ca_files: Option<(PathBuf, PathBuf)>,
    /// Extra DNS names / IPs for the xDS serving certificate.
    pub tls_sans: Vec<String>,
    /// Also accept plaintext xDS (proxyless gRPC, tests). Sign stays TLS-only.
    pub plaintext_xds: bool,
    /// Read the admin token from this file instead of `<data-dir>/admin.token`.
    pub admin_token_file: Option<PathBuf>,
}

impl Options {
    /// Defaults for everything but where to listen and keep data: trust
    /// domain `cluster.local`, 24 h SVIDs, TLS-only xDS, 30 s registration grace.
    pub fn new(data_dir: Option<PathBuf>, xds_addr: SocketAddr, api_addr: SocketAddr) -> Options {
        Options {
            data_dir,
            xds_addr,
            api_addr,
            grace: Duration::from_secs(30),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_string(),
            svid_ttl: identity::DEFAULT_SVID_TTL,
            max_svid_ttl: identity::DEFAULT_SVID_TTL,
            ca_files: None,
            tls_sans: Vec::new(),
            plaintext_xds: false,
            admin_token_file: None,
        }
    }
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening the store: {0}")]
    Store(String),
    #[error("CA: {0}")]
    Ca(#[from] crate::ca::CaSetupError),
    #[error("--trust-domain {value:?}: {reason}; use a DNS-like name such as cluster.local")]
    TrustDomain { value: String, reason: String },
    #[error("reading {path} (--ca-cert/--ca-key): {source}")]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin token: {0}")]
    Admin(#[from] crate::api::AdminTokenError),
    #[error("TLS on the xDS port: {0}")]
    Tls(#[from] crate::xds::TlsSetupError),
    #[error("the stored resources do not validate: {0}")]
    Invalid(String),
    #[error("cannot bind {what} on {addr}: {source}; pick a free address with --{what}-addr")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running control plane.
pub struct Control {
    xds_addr: SocketAddr,
    api_addr: SocketAddr,
    authority: Arc<Authority>,
    admin: Arc<AdminToken>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("xds_addr", &self.xds_addr)
            .field("api_addr", &self.api_addr)
            .finish()
    }
}

impl Control {
    /// Opens everything and starts serving; returns once both ports are
    /// bound.
    pub async fn start(opts: Options) -> Result<Self, Error> {
        let store: Arc<dyn Store> = match &opts.data_dir {
            Some(dir) => Arc::new(
                crate::store::RedbStore::open(dir).map_err(|e| Error::Store(e.to_string()))?,
            ),
            None => Arc::new(crate::store::MemStore::new()),
        };
        let trust_domain =
            TrustDomain::new(&opts.trust_domain).map_err(|e| Error::TrustDomain {
                value: opts.trust_domain.clone(),
                reason: e.to_string(),
            })?;
        let supplied = match &opts.ca_files {
            Some((cert, key)) => {
                let read = |p: &PathBuf| {
                    std::fs::read_to_string(p).map_err(|source| Error::CaFile {
                        path: p.clone(),
                        source,
                    })
                };
                Some((read(cert)?, read(key)?))
            }
            None => None,
        };
        let authority = Authority::open(CaOptions {
            trust_domain,
            svid_ttl: opts.svid_ttl,
            max_ttl: opts.max_svid_ttl,
            supplied,
            data_dir: opts.data_dir.clone(),
        })?;
        let admin = Arc::new(AdminToken::load_or_create(
            opts.admin_token_file.as_deref(),
            opts.data_dir.as_deref(),
        )?);
        let first_mesh = mesh_of(store.as_ref())?;
        warn_trust_domain(&first_mesh, &authority);
        let (mesh_tx, mesh_rx) = watch::channel(first_mesh);
        let registry = Registry::new(opts.grace);
        let xds = XdsServer::new(mesh_rx, registry);
        xds.set_ca(authority.clone());
        let bind = |what, addr| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind { what, addr, source })
        };
        let xds_listener = bind("xds", opts.xds_addr).await?;
        let api_listener = bind("api", opts.api_addr).await?;
        let xds_addr = xds_listener.local_addr().unwrap_or(opts.xds_addr);
        let api_addr = api_listener.local_addr().unwrap_or(opts.api_addr);
        let tls = XdsTls {
            authority: authority.clone(),
            names: server_names(xds_addr, &opts.tls_sans),
            plaintext: opts.plaintext_xds,
        };
        let (stop, stopped) = watch::channel(false);
        let until_stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(follow_store(
            store.clone(),
            mesh_tx,
            authority.clone(),
            stopped.clone(),
        )));
        let acks: Arc<dyn AckTracker> = Arc::new(xds.clone());
        tasks.push(tokio::spawn(
            authority.clone().drive(acks.clone(), stopped.clone()),
        ));
        let status: Arc<dyn ProxyStatus> = Arc::new(xds.clone());
        tasks.push(tokio::spawn(crate::api::serve_with(
            api_listener,
            ApiParts {
                store,
                status,
                admin: Some(admin.clone()),
                ca: Some(authority.clone()),
                acks,
            },
            until_stopped(stopped.clone()),
        )));
        // Fail start, not a task, when the serving certificate cannot be made.
        {
            let names: Vec<&str> = tls.names.iter().map(String::as_str).collect();
            authority
                .server_cert(&names)
                .map_err(crate::xds::TlsSetupError::from)?;
        }
        let xds_stop = until_stopped(stopped);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = xds.serve_tls(xds_listener, tls, xds_stop).await {
                tracing::error!(error = %e, "xDS server stopped");
            }
        }));
        tracing::info!(%xds_addr, %api_addr, plaintext_xds = opts.plaintext_xds, "control plane ready");
        Ok(Self {
            xds_addr,
            api_addr,
            authority,
            admin,
            stop,
            tasks,
        })
    }

    /// The CA.
    pub fn authority(&self) -> &Arc<Authority> {
        &self.authority
    }

    /// The admin token mutating API calls need.
    pub fn admin_token(&self) -> &str {
        self.admin.token()
    }

    /// Where the admin token is kept, if in a file.
    pub fn admin_token_path(&self) -> Option<&std::path::Path> {
        self.admin.path()
    }

    pub fn xds_addr(&self) -> SocketAddr {
        self.xds_addr
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// Stops serving: open xDS streams end (proxies keep their config and
    /// reconnect elsewhere), API connections finish their request.
    pub async fn shutdown(self, deadline: Duration) {
        let _ = self.stop.send(true);
        let all = futures_join(self.tasks);
        let _ = tokio::time::timeout(deadline, all).await;
    }
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

/// The validated mesh of everything stored (validated by the commit that
/// stored it; only after opening is it validated here).
fn mesh_of(store: &dyn Store) -> Result<Arc<api::Mesh>, Error> {
    store
        .mesh()
        .map(|(_, m)| m)
        .map_err(|e| Error::Invalid(e.to_string()))
}

/// The names the xDS serving certificate carries: the listen IP (the
/// loopback addresses when it listens on every address), `localhost`, and
/// `--tls-san` values.
fn server_names(addr: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    if addr.ip().is_unspecified() {
        names.push("127.0.0.1".to_string());
        names.push("::1".to_string());
    } else {
        names.push(addr.ip().to_string());
    }
    names.push("localhost".to_string());
    for n in extra {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
}

/// A `Mesh` resource naming another trust domain than the CA's is a
/// mistake the CA cannot fix: say so (AuthorizationPolicies match on the
/// Mesh's trust domain, certificates carry the CA's).
fn warn_trust_domain(mesh: &api::Mesh, ca: &Authority) {
    if mesh.mesh_config().is_some() && mesh.trust_domain() != ca.trust_domain().as_str() {
        tracing::warn!(
            mesh = mesh.trust_domain(),
            ca = ca.trust_domain().as_str(),
            "the Mesh resource's trustDomain differs from the CA's (--trust-domain): certificates carry the CA's; set Mesh spec.trustDomain to it or restart with --trust-domain {}",
            mesh.trust_domain()
        );
    }
}

/// Publishes a new mesh after every store commit.
async fn follow_store(
    store: Arc<dyn Store>,
    mesh: watch::Sender<Arc<api::Mesh>>,
    ca: Arc<Authority>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut revisions = store.subscribe();
    loop {
        tokio::select! {
            changed = revisions.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = stopped.wait_for(|s| *s) => return,
        }
        match mesh_of(store.as_ref()) {
            Ok(m) => {
                if m.trust_domain() != mesh.borrow().trust_domain() {
                    warn_trust_domain(&m, &ca);
                }
                mesh.send_replace(m);
            }
            // The store validates before every commit, so this means a bug:
            // say so and keep serving the last good mesh.
            Err(e) => {
                tracing::error!(error = %e, "stored resources stopped validating; keeping the last good mesh")
            }
        }
    }
}

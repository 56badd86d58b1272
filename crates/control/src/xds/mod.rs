//! The xDS server: Aggregated Discovery Service (ADS) over gRPC, state of
//! the world and delta, for meshwork proxies, Envoy and proxyless gRPC.
//!
//! Purpose: turn the validated mesh (a `watch` of [`api::Mesh`], fed by the
//! store) plus the workloads live proxies registered ([`Registry`]) into
//! each connected proxy's configuration, and keep it current.
//!
//! Contract:
//! - Per proxy: `api::translate(mesh ∪ registered workloads, ProxyContext {
//!   workload: the proxy's own, addresses from its node metadata })`, done
//!   as a shared base (everything but the inbound side, translated once per
//!   distinct listener addresses and client namespace) plus the proxy's own
//!   inbound side. A proxy that lists the services it calls
//!   (`upstreams` in its node metadata) gets only those, the backends their
//!   routes send to, and its inbound side; one that does not gets every
//!   service (it may call any).
//! - Changes of the mesh or of the registry are debounced: a burst of
//!   changes (ended by [`DEBOUNCE`] without a change, or cut at
//!   [`MAX_DEBOUNCE`]) makes one new merged mesh, then every stream pushes
//!   the types whose selected resources changed version.
//! - ACKs and NACKs are tracked per proxy and per type; [`XdsServer::status_json`]
//!   and [`XdsServer::proxy_json`] expose them (proxy-status / proxy-config).
//! - Bad requests (no node, unknown type URL, undecodable message) end that
//!   stream with `INVALID_ARGUMENT` and a message saying what is served;
//!   nothing a client sends can panic the server.
//! - [`XdsServer::serve`] ends every stream when its shutdown future
//!   completes, so graceful shutdown does not wait for long-lived streams.
//!
//! - With a CA ([`XdsServer::set_ca`]): the `ROOTCA` Secret (the trust
//!   bundle, signing root first) is served to every stream that subscribes
//!   to it, the CA's `Sign` method is served on the same port, and
//!   [`XdsServer::serve_tls`] serves TLS (see `tls`).
//!
//! Non-goals (for now): inferring what a proxy calls when it does not say,
//! and xdstp:// names.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use api::{Mesh, ProxyContext};
use serde_json::Value;
use tokio::sync::watch;

use crate::ca::Authority;
use crate::registry::{self, Registry};

mod service;
mod snapshot;
mod status;
mod stream;
mod tls;

use snapshot::{Base, Snapshot, TypeKind, Versioned};
pub(crate) use status::rfc3339;
use status::ProxyRecord;
pub use tls::{PeerInfo, TlsSetupError, XdsTls, HANDSHAKE_TIMEOUT};

/// How long a change waits for more changes before it is pushed: the quiet
/// period that ends a burst.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// The longest a burst of changes is held back: changes that keep coming
/// are pushed at least this often.
pub const MAX_DEBOUNCE: Duration = Duration::from_millis(500);

/// Largest request accepted (a DiscoveryRequest is small; a NACK's
/// error_detail is the largest part).
const MAX_REQUEST: usize = 4 * 1024 * 1024;

/// Why the server stopped.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("xDS server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("xDS TLS: {0}")]
    Tls(#[from] TlsSetupError),
}

/// The ADS server. Cheap to clone: clones share the same state, so one can
/// serve while another answers status queries.
#[derive(Clone)]
pub struct XdsServer {
    shared: Arc<Shared>,
    mesh: watch::Receiver<Arc<Mesh>>,
}

/// The merged mesh streams translate from.
#[derive(Debug, Clone)]
pub(crate) struct Merged {
    pub(crate) generation: u64,
    pub(crate) mesh: Arc<Mesh>,
    /// Registered workloads left out, with the reason.
    pub(crate) skipped: Vec<(String, String)>,
}

pub(crate) struct Shared {
    pub(crate) registry: Arc<Registry>,
    pub(crate) merged: watch::Sender<Merged>,
    pub(crate) stopping: watch::Sender<bool>,
    cache: Mutex<Cache>,
    proxies: Mutex<BTreeMap<u64, Arc<Mutex<ProxyRecord>>>>,
    next_record: AtomicU64,
    /// The `ROOTCA` secret, once a CA is set.
    pub(crate) rootca: watch::Sender<Option<Versioned>>,
    /// The CA answering `Sign`, once set.
    pub(crate) ca: std::sync::OnceLock<Arc<Authority>>,
}

#[derive(Default)]
struct Cache {
    bases: HashMap<String, CacheEntry<Base>>,
    snapshots: HashMap<String, CacheEntry<Snapshot>>,
}

struct CacheEntry<T> {
    generation: u64,
    item: Weak<T>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a single map operation: a panic in one
    // cannot leave the data inconsistent, so a poisoned lock is still fine.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl XdsServer {
    /// A server translating `mesh` (the validated resources) plus what
    /// proxies register in `registry`.
    pub fn new(mesh: watch::Receiver<Arc<Mesh>>, registry: Arc<Registry>) -> Self {
        let current = mesh.borrow().clone();
        let (merged_mesh, skipped) = registry::merge(&current, &registry.workloads());
        let shared = Arc::new(Shared {
            registry,
            merged: watch::channel(Merged {
                generation: 1,
                mesh: merged_mesh,
                skipped,
            })
            .0,
            stopping: watch::channel(false).0,
            cache: Mutex::new(Cache::default()),
            proxies: Mutex::new(BTreeMap::new()),
            next_record: AtomicU64::new(1),
            rootca: watch::channel(None).0,
            ca: std::sync::OnceLock::new(),
        });
        XdsServer { shared, mesh }
    }

    /// Attaches the CA: its bundle is served as the `ROOTCA` secret (and
    /// follows every change), and `Sign` is answered by it. Call before
    /// serving; a second call is ignored.
    pub fn set_ca(&self, ca: Arc<Authority>) {
        if self.shared.ca.set(ca.clone()).is_err() {
            return;
        }
        let mut published = ca.published();
        let shared = Arc::downgrade(&self.shared);
        let publish = move |p: &crate::ca::Published, shared: &Shared| {
            let secret = snapshot::rootca_secret(&p.resource_version(), &p.bundle.to_pem());
            shared.rootca.send_replace(Some(secret));
        };
        let first = published.borrow_and_update().clone();
        publish(&first, &self.shared);
        tokio::spawn(async move {
            while published.changed().await.is_ok() {
                let p = published.borrow_and_update().clone();
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                publish(&p, &shared);
            }
        });
    }

    /// Serves ADS (and `Sign`) over TLS on `listener` (plaintext too when
    /// `tls.plaintext`) until `shutdown` completes; see `tls`.
    pub async fn serve_tls(
        self,
        listener: tokio::net::TcpListener,
        tls: XdsTls,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), XdsError> {
        self.set_ca(tls.authority.clone());
        let server = Arc::new(tls::ServerTls::new(&tls)?);
        let (stop_tx, stop_rx) = watch::channel(false);
        let fresh = tokio::spawn(server.clone().keep_fresh(stop_rx));
        let incoming = tls::incoming(listener, Some(server));
        let result = self.serve_incoming(incoming, shutdown).await;
        let _ = stop_tx.send(true);
        fresh.abort();
        result
    }

    /// Serves ADS on `listener` (plaintext) until `shutdown` completes,
    /// then ends every stream and returns.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), XdsError> {
        tracing::info!(addr = ?listener.local_addr().ok(), "xDS server listening (plaintext)");
        let incoming = tls::incoming(listener, None);
        self.serve_incoming(incoming, shutdown).await
    }

    async fn serve_incoming(
        self,
        incoming: tokio::sync::mpsc::Receiver<std::io::Result<tls::Conn>>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), XdsError> {
        let debouncer = tokio::spawn(debounce(
            self.shared.clone(),
            self.mesh.clone(),
            self.shared.registry.subscribe(),
            self.shared.stopping.subscribe(),
        ));
        let svc = service::Ads::new(self.shared.clone(), MAX_REQUEST);
        let stopping = self.shared.stopping.clone();
        let signal = async move {
            shutdown.await;
            stopping.send_replace(true);
        };
        let result = tonic::transport::Server::builder()
            // Detect dead peers on idle streams.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            // One service: no router needed (tonic's router pulls in axum).
            .serve_with_incoming_shutdown(
                svc,
                tokio_stream::wrappers::ReceiverStream::new(incoming),
                signal,
            )
            .await;
        self.shared.stopping.send_replace(true);
        debouncer.abort();
        result.map_err(XdsError::from)
    }

    /// proxy-status: every connected proxy (one entry per stream) with, per
    /// type, the version sent, the version ACKed and the last NACK.
    pub fn status_json(&self) -> Value {
        let records: Vec<Arc<Mutex<ProxyRecord>>> =
            lock(&self.shared.proxies).values().cloned().collect();
        let mut list: Vec<Value> = records
            .iter()
            .map(|r| self.annotate(lock(r).summary()))
            .collect();
        list.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        Value::Array(list)
    }

    /// Says whether the proxy's workload made it into the mesh, and if not
    /// why (it gets no traffic then).
    fn annotate(&self, mut v: Value) -> Value {
        let Some(w) = v["workload"].as_str().map(str::to_string) else {
            return v;
        };
        let merged = self.shared.merged.borrow();
        let announced = w.split_once('/').and_then(|(ns, name)| {
            merged
                .mesh
                .workload(ns, name)?
                .value
                .metadata
                .annotations
                .get(api::resources::WORKLOAD_STATE_ANNOTATION)
                .cloned()
        });
        let state = match (merged.skipped.iter().find(|(k, _)| *k == w), announced) {
            (Some((_, why)), _) => format!("left out: {why}"),
            // Starting: no endpoint yet; draining: callers stop picking it.
            (None, Some(s)) => format!("registered ({s})"),
            (None, None) => "registered".to_string(),
        };
        v["registration"] = Value::String(state);
        v
    }

    /// proxy-config: the proxy `id` (its most recent stream), with the name
    /// and version of every resource it holds.
    pub fn proxy_json(&self, id: &str) -> Option<Value> {
        let records: Vec<Arc<Mutex<ProxyRecord>>> =
            lock(&self.shared.proxies).values().cloned().collect();
        records
            .iter()
            .rev()
            .map(|r| lock(r))
            .find(|r| r.id == id)
            .map(|r| self.annotate(r.detail()))
    }

    /// Registered workloads the mesh could not take, with the reason
    /// (unknown service, name taken by a static Workload, invalid).
    pub fn skipped_workloads(&self) -> Vec<(String, String)> {
        self.shared.merged.borrow().skipped.clone()
    }
}

/// Which streams have not ACKed a ROOTCA version (root rotation waits for
/// them).
impl crate::ca::AckTracker for XdsServer {
    fn pending(&self, version: &str) -> Vec<String> {
        let records: Vec<Arc<Mutex<ProxyRecord>>> =
            lock(&self.shared.proxies).values().cloned().collect();
        records
            .iter()
            .filter_map(|r| {
                let r = lock(r);
                let t = r.types.get(&TypeKind::Secret)?;
                t.resources.get(crate::ca::ROOTCA)?;
                (t.acked_version.as_deref() != Some(version)).then(|| r.id.clone())
            })
            .collect()
    }
}

/// What `GET /api/v1/proxies[/{id}]` answers.
impl crate::api::ProxyStatus for XdsServer {
    fn proxies(&self) -> Value {
        self.status_json()
    }

    fn proxy(&self, id: &str) -> Option<Value> {
        self.proxy_json(id)
    }
}

impl Shared {
    /// The snapshot for `ctx` (limited to `scope`; `key` is
    /// [`snapshot_key`] of both) at the current merged generation, shared
    /// by every stream with the same context and scope;
    /// its base is shared by every stream with the same base context.
    pub(crate) fn snapshot(
        &self,
        key: &str,
        ctx: &ProxyContext,
        scope: Option<&BTreeSet<String>>,
    ) -> Arc<Snapshot> {
        let merged = self.merged.borrow().clone();
        let mut cache = lock(&self.cache);
        let prev = match cache.snapshots.get(key) {
            Some(e) => match e.item.upgrade() {
                Some(s) if e.generation == merged.generation => return s,
                other => other,
            },
            None => None,
        };
        let bctx = snapshot::base_context(ctx);
        let bkey = format!("{bctx:?}");
        let base = match cache.bases.get(&bkey) {
            Some(e) => match e.item.upgrade() {
                Some(b) if e.generation == merged.generation => Ok(b),
                other => Err(other),
            },
            None => Err(None),
        };
        let base = base.unwrap_or_else(|prev| {
            let b = Arc::new(Base::build(&merged.mesh, &bctx, prev.as_deref()));
            cache.bases.insert(
                bkey,
                CacheEntry {
                    generation: merged.generation,
                    item: Arc::downgrade(&b),
                },
            );
            b
        });
        let snap = Arc::new(Snapshot::build(
            &merged.mesh,
            ctx,
            scope,
            base,
            prev.as_deref(),
        ));
        cache.snapshots.insert(
            key.to_string(),
            CacheEntry {
                generation: merged.generation,
                item: Arc::downgrade(&snap),
            },
        );
        // Forget contexts no stream uses any more.
        cache.snapshots.retain(|_, e| e.item.strong_count() > 0);
        cache.bases.retain(|_, e| e.item.strong_count() > 0);
        snap
    }

    fn remember(&self, record: ProxyRecord) -> (u64, Arc<Mutex<ProxyRecord>>) {
        let id = self.next_record.fetch_add(1, Ordering::Relaxed);
        let r = Arc::new(Mutex::new(record));
        lock(&self.proxies).insert(id, r.clone());
        (id, r)
    }

    fn forget(&self, id: u64) {
        if let Some(r) = lock(&self.proxies).remove(&id) {
            tracing::info!(node = %lock(&r).id, "xDS stream closed");
        }
    }

    fn recompute(&self, mesh: &Arc<Mesh>) {
        let (merged, skipped) = registry::merge(mesh, &self.registry.workloads());
        self.merged.send_modify(|m| {
            m.generation += 1;
            m.mesh = merged;
            m.skipped = skipped;
        });
    }
}

/// The cache key of a stream's snapshot: its context and scope (made once
/// per stream; they do not change while it lives).
pub(crate) fn snapshot_key(ctx: &ProxyContext, scope: Option<&BTreeSet<String>>) -> String {
    format!("{ctx:?}/{scope:?}")
}

/// Waits for mesh or registry changes, lets a burst settle for [`DEBOUNCE`],
/// then publishes one merged mesh.
async fn debounce(
    shared: Arc<Shared>,
    mut mesh: watch::Receiver<Arc<Mesh>>,
    mut registry: watch::Receiver<u64>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut mesh_open = true;
    // Catch up with anything that changed between `new` and `serve`.
    mesh.mark_changed();
    loop {
        tokio::select! {
            r = mesh.changed(), if mesh_open => {
                if r.is_err() {
                    // The store went away: keep serving the last mesh.
                    mesh_open = false;
                    continue;
                }
            }
            r = registry.changed() => {
                if r.is_err() {
                    return;
                }
            }
            _ = stopping.changed() => return,
        }
        // Wait for a quiet period, but not forever: a storm of changes (a
        // fleet of proxies registering) makes one generation per
        // MAX_DEBOUNCE instead of one per change, which bounds both the
        // translation work and the garbage it leaves behind.
        let burst = tokio::time::Instant::now();
        loop {
            registry.borrow_and_update();
            if mesh_open {
                mesh.borrow_and_update();
            }
            tokio::time::sleep(DEBOUNCE).await;
            let more = registry.has_changed().unwrap_or(false)
                || (mesh_open && mesh.has_changed().unwrap_or(false));
            if !more || burst.elapsed() >= MAX_DEBOUNCE {
                break;
            }
        }
        registry.borrow_and_update();
        let current = mesh.borrow_and_update().clone();
        shared.recompute(&current);
    }
}

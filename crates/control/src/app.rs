//! `meshwork control`'s composition root: open the store, derive the mesh
//! from it, start the registry, the xDS server and the HTTP API, and stop
//! them together.
//!
//! The store is the only source of truth for declared resources; every
//! commit bumps its revision, and a task turns each revision into a
//! validated `api::Mesh` that the xDS server watches. Registered workloads
//! live in the registry and are merged in by the xDS server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::api::ProxyStatus;
use crate::registry::Registry;
use crate::store::Store;
use crate::xds::XdsServer;

/// Everything `meshwork control` is told on its command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the embedded store keeps its file; `None`: in memory (tests).
    pub data_dir: Option<PathBuf>,
    pub xds_addr: SocketAddr,
    pub api_addr: SocketAddr,
    /// How long a disconnected proxy's workload stays registered.
    pub grace: Duration,
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening the store: {0}")]
    Store(String),
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
    pub async fn start(opts: Options) -> Result<Self, Error> {
        let store: Arc<dyn Store> = match &opts.data_dir {
            Some(dir) => Arc::new(
                crate::store::RedbStore::open(dir).map_err(|e| Error::Store(e.to_string()))?,
            ),
            None => Arc::new(crate::store::MemStore::new()),
        };
        let (mesh_tx, mesh_rx) = watch::channel(mesh_of(store.as_ref())?);
        let registry = Registry::new(opts.grace);
        let xds = XdsServer::new(mesh_rx, registry);
        let bind = |what, addr| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind { what, addr, source })
        };
        let xds_listener = bind("xds", opts.xds_addr).await?;
        let api_listener = bind("api", opts.api_addr).await?;
        let xds_addr = xds_listener.local_addr().unwrap_or(opts.xds_addr);
        let api_addr = api_listener.local_addr().unwrap_or(opts.api_addr);
        let (stop, stopped) = watch::channel(false);
        let until_stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(follow_store(
            store.clone(),
            mesh_tx,
            stopped.clone(),
        )));
        let status: Arc<dyn ProxyStatus> = Arc::new(xds.clone());
        tasks.push(tokio::spawn(crate::api::serve(
            api_listener,
            store,
            status,
            until_stopped(stopped.clone()),
        )));
        let xds_stop = until_stopped(stopped);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = xds.serve(xds_listener, xds_stop).await {
                tracing::error!(error = %e, "xDS server stopped");
            }
        }));
        tracing::info!(%xds_addr, %api_addr, "control plane ready");
        Ok(Self {
            xds_addr,
            api_addr,
            stop,
            tasks,
        })
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

/// Publishes a new mesh after every store commit.
async fn follow_store(
    store: Arc<dyn Store>,
    mesh: watch::Sender<Arc<api::Mesh>>,
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

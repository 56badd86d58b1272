//! The proxy's composition root: read the config, build the shared state,
//! start the listeners and the admin server, follow config changes, drain on
//! shutdown.
//!
//! Two sources feed one config path: a control plane over ADS
//! ([`crate::xds_client`]), or standalone mode, which runs the mesh
//! translator (`api`) in-process over a YAML file and feeds its xDS output
//! through the same `config::xds` conversion. Either way a snapshot is
//! installed by `Inner::install`: listeners bound first, then routes and
//! clusters swapped, then listeners switched. A change that fails to load,
//! validate, convert or bind is refused with the reason in the log (and as a
//! NACK to a control plane), and the last good config stays active.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Mutex as AsyncMutex;

use crate::accesslog::AccessLog;
use crate::admin::{self, AdminSource};
use crate::config::model::Snapshot;
use crate::config::xds;
use crate::drain;
use crate::listener::ListenerSet;
use crate::logging::LogHandle;
use crate::metrics::Metrics;
use crate::runtime::Runtime;
use crate::shared::Shared;
use crate::xds_client::WorkloadState;

/// Where the config comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Standalone: a mesh YAML file, checked every `poll_interval`.
    File {
        path: PathBuf,
        poll_interval: Duration,
    },
    /// A control plane over ADS. `service` (`name.namespace`) labels this
    /// sidecar's outbound metrics.
    Control {
        client: Box<crate::xds_client::ClientOptions>,
        service: Option<String>,
    },
}

/// Everything `meshwork proxy` is told on its command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub source: Source,
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// `namespace/name` (or `name` in `default`) of the Workload this proxy fronts.
    pub workload: Option<String>,
    pub access_log: crate::accesslog::Target,
    /// Protocol detection bound for listeners that sniff.
    pub detect_timeout: Duration,
    /// This proxy's workload certificate and trust bundle (hot-swapped on
    /// renewal and root rotation), for mTLS on the data path. `None`: no
    /// identity (plaintext mesh). Kept up to date by the
    /// [`crate::identity::Manager`] in the control-plane source.
    pub identity: Option<Arc<identity::WorkloadIdentity>>,
    /// Standalone mode: translate for transparent capture
    /// ([`api::ProxyContext::capture`]). A control plane learns it from the
    /// node metadata instead.
    pub capture: bool,
    /// The mesh DNS server ([`crate::dns`]): `None`, no DNS server. Its
    /// names follow the VIP listeners of the active config.
    pub dns: Option<crate::dns::DnsOptions>,
}

/// Why the proxy could not start or a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("the translated config was refused: {0}")]
    Nack(String),
    #[error(transparent)]
    Bind(#[from] crate::listener::BindError),
    #[error(transparent)]
    Dns(#[from] crate::dns::StartError),
    #[error("admin server: cannot bind {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    inner: Arc<Inner>,
    drain: Option<drain::Trigger>,
    admin_addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Debug)]
struct Inner {
    opts: Options,
    shared: Arc<Shared>,
    listeners: AsyncMutex<Option<ListenerSet>>,
    bound: Mutex<Vec<(String, SocketAddr)>>,
    /// The last file content tried and why it was refused (`None`: it is
    /// active). Held across a whole reload, so reloads never interleave.
    last: AsyncMutex<(String, Option<String>)>,
    ready: std::sync::atomic::AtomicBool,
    /// Listeners taken out of service by the admin `POST /drain_listeners`;
    /// they stay out across config updates.
    drained: Mutex<Drained>,
    /// The data path's runtime: admin-initiated listener changes run there.
    data_rt: tokio::runtime::Handle,
    /// The mesh DNS server, fed the names of every installed config.
    dns: Option<crate::dns::DnsServer>,
    /// What the node announces about its workload (admin `/healthcheck/*`);
    /// the xDS client follows it.
    workload_state: tokio::sync::watch::Sender<WorkloadState>,
}

impl Proxy {
    /// Starts the proxy. From a file: loads it, binds every listener and the
    /// admin server, and fails if the config is invalid or cannot be bound.
    /// From a control plane: starts the admin server and the xDS client and
    /// returns at once; `/ready` turns 200 with the first listeners.
    pub async fn start(opts: Options, log: LogHandle) -> Result<Self, Error> {
        let metrics = Arc::new(Metrics::new());
        let access_log = AccessLog::new(opts.access_log.clone())
            .map_err(|e| Error::Invalid(format!("access log: {e}")))?;
        let shared = Shared::new(metrics.clone(), access_log);
        let (trigger, watch) = drain::channel();
        // Health checkers stop with the proxy; they do not hold up the drain.
        shared.stop_health_tasks_on(trigger.watch());
        // Before the first config, so that config's names reach it.
        let dns = match &opts.dns {
            Some(d) => Some(crate::dns::DnsServer::start(d.clone(), metrics.clone()).await?),
            None => None,
        };
        let inner = Arc::new(Inner {
            opts: opts.clone(),
            shared: shared.clone(),
            listeners: AsyncMutex::new(Some(ListenerSet::new(shared.clone(), watch))),
            bound: Mutex::new(Vec::new()),
            last: AsyncMutex::new((String::new(), None)),
            ready: std::sync::atomic::AtomicBool::new(false),
            drained: Mutex::new(Drained::Nothing),
            data_rt: tokio::runtime::Handle::current(),
            dns,
            workload_state: tokio::sync::watch::channel(match &opts.source {
                Source::Control { client, .. } => WorkloadState::of_node(&client.node),
                Source::File { .. } => WorkloadState::Serving,
            })
            .0,
        });
        if let Source::File { .. } = &opts.source {
            inner.reload(true).await?;
            inner.ready.store(true, std::sync::atomic::Ordering::SeqCst);
        }

        let admin_socket = std::net::TcpListener::bind(opts.admin_addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| Error::Admin {
                addr: opts.admin_addr,
                source,
            })?;
        let admin_addr = admin_socket.local_addr().unwrap_or(opts.admin_addr);
        tracing::info!(address = %admin_addr, "admin listening");
        // The admin server (and /metrics rendering) runs on a thread of its
        // own, so a scrape never takes time from the data path's workers.
        let admin_stop = trigger.watch();
        let source = inner.clone() as Arc<dyn AdminSource>;
        std::thread::Builder::new()
            .name("meshwork-admin".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "admin server: cannot start its runtime");
                        return;
                    }
                };
                rt.block_on(async move {
                    match tokio::net::TcpListener::from_std(admin_socket) {
                        Ok(socket) => {
                            admin::serve(socket, source, metrics, log, async move {
                                admin_stop.signaled().await
                            })
                            .await
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "admin server: cannot use its socket")
                        }
                    }
                });
            })
            .map_err(|source| Error::Admin {
                addr: admin_addr,
                source,
            })?;
        let mut tasks = vec![tokio::spawn(sweep_pools(shared.clone()))];
        match &opts.source {
            Source::File { poll_interval, .. } => {
                tasks.push(tokio::spawn(watch_file(inner.clone(), *poll_interval)));
            }
            Source::Control { client, service } => {
                shared.set_local_service(service.clone());
                if let Some(manager) = &client.identity {
                    tasks.push(tokio::spawn(manager.clone().run(trigger.watch())));
                }
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                tasks.push(tokio::spawn(crate::xds_client::run(
                    (**client).clone(),
                    inner.workload_state.subscribe(),
                    tx,
                    trigger.watch(),
                )));
                tasks.push(tokio::spawn(apply_updates(inner.clone(), rx)));
            }
        }
        Ok(Self {
            inner,
            drain: Some(trigger),
            admin_addr,
            tasks,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Bound address of each listener, by name.
    pub fn listeners(&self) -> Vec<(String, SocketAddr)> {
        lock(&self.inner.bound).clone()
    }

    /// The bound address of one listener.
    pub fn listener(&self, name: &str) -> Option<SocketAddr> {
        self.listeners()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a)
    }

    /// The mesh DNS server's address (UDP and TCP), when it runs.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.inner.dns.as_ref().map(|d| d.local_addr())
    }

    /// Re-reads the config file now (tests; the poller does the same).
    /// A no-op with a control plane.
    pub async fn reload(&self) -> Result<(), Error> {
        self.inner.reload(false).await
    }

    /// Whether a config is active (what `/ready` reports).
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The state the node announces for its workload.
    pub fn workload_state(&self) -> WorkloadState {
        *self.inner.workload_state.borrow()
    }

    /// Announces `to` (when the state is `from`, or whatever it is with
    /// `None`). True if it changed and a control plane is told.
    pub fn set_workload_state(&self, from: Option<WorkloadState>, to: WorkloadState) -> bool {
        self.inner.set_state(from, to)
    }

    /// While the workload is `starting`, tries a TCP connection to the
    /// application at `app` every 200 ms; the first that succeeds
    /// announces `serving`. (The sidecar probes, not `meshwork run`: under
    /// capture only the proxy's own connections reach the application
    /// directly, as the inbound cluster's do.)
    pub fn serve_once_accepting(&mut self, app: SocketAddr) {
        let inner = self.inner.clone();
        self.tasks.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut told = false;
            while *inner.workload_state.borrow() == WorkloadState::Starting {
                let ok = tokio::time::timeout(PROBE_EVERY, tokio::net::TcpStream::connect(app))
                    .await
                    .is_ok_and(|r| r.is_ok());
                if ok {
                    if inner.set_state(Some(WorkloadState::Starting), WorkloadState::Serving) {
                        tracing::info!(%app, "the application accepts connections: announcing the workload as serving");
                    }
                    return;
                }
                if !told && started.elapsed() > PROBE_PATIENCE {
                    told = true;
                    tracing::warn!(%app, "the application does not accept connections yet; the workload stays out of its Service's endpoints until it does");
                }
                tokio::time::sleep(PROBE_EVERY).await;
            }
        }));
    }

    /// Graceful shutdown: stop accepting, let in-flight requests finish (idle
    /// keep-alive connections are closed), exit by `deadline`. Returns whether
    /// everything finished in time.
    pub async fn shutdown(mut self, deadline: Duration) -> bool {
        self.inner
            .ready
            .store(false, std::sync::atomic::Ordering::SeqCst);
        if let Some(mut set) = self.inner.listeners.lock().await.take() {
            set.stop_accepting();
        }
        let done = match self.drain.take() {
            Some(t) => t.drain(deadline).await,
            None => true,
        };
        self.inner.shared.flush_access_log().await;
        // Last: the application resolved names until the drain was over.
        if let Some(dns) = &self.inner.dns {
            dns.stop();
        }
        for t in &self.tasks {
            t.abort();
        }
        done
    }
}

/// How often a `starting` workload's application is probed.
const PROBE_EVERY: Duration = Duration::from_millis(200);
/// After this long without an answer, the probe says so (once).
const PROBE_PATIENCE: Duration = Duration::from_secs(10);

impl Inner {
    /// Fed by a control plane, with a workload in its node (`--service`):
    /// there is someone to announce the workload's state to.
    fn registers_a_workload(&self) -> bool {
        match &self.opts.source {
            Source::Control { client, .. } => client
                .node
                .metadata
                .as_ref()
                .is_some_and(|m| m.fields.contains_key("service")),
            Source::File { .. } => false,
        }
    }

    fn set_state(&self, from: Option<WorkloadState>, to: WorkloadState) -> bool {
        let changed = self.workload_state.send_if_modified(|now| {
            if *now == to || from.is_some_and(|f| f != *now) {
                return false;
            }
            *now = to;
            true
        });
        changed && self.registers_a_workload()
    }

    async fn reload(&self, initial: bool) -> Result<(), Error> {
        let Source::File { path, .. } = &self.opts.source else {
            return Ok(());
        };
        let mut last = self.last.lock().await;
        let text = match tokio::fs::read_to_string(path).await {
            Ok(text) => text,
            Err(source) => {
                let e = Error::Read {
                    path: path.clone(),
                    source,
                };
                // Report a vanished or unreadable file once, not every poll.
                if last.1.as_deref() != Some(&e.to_string()) {
                    self.shared.metrics.config_rejected("all");
                    tracing::error!("{e}; keeping the last good config");
                    *last = (String::new(), Some(e.to_string()));
                }
                return Err(e);
            }
        };
        if !initial && last.0 == text {
            // Unchanged since the last attempt: same answer as then.
            return match &last.1 {
                None => Ok(()),
                Some(reason) => Err(Error::Invalid(reason.clone())),
            };
        }
        let result = self.apply_text(path, &text).await;
        match &result {
            Ok(version) => {
                *last = (text, None);
                self.shared.metrics.config_accepted("all", version);
                if !initial {
                    tracing::info!(%version, file = %path.display(), "config reloaded");
                }
            }
            Err(e) => {
                // Remember the refused text too, so it is reported once, not
                // every poll; except a bind failure, which may succeed on the
                // next poll once the address is free.
                let memo = if matches!(e, Error::Bind(_)) {
                    String::new()
                } else {
                    text
                };
                let reason = e.to_string();
                if last.1.as_deref() != Some(reason.as_str()) {
                    self.shared.metrics.config_rejected("all");
                    tracing::error!(file = %path.display(), "config refused, keeping the last good one:\n{e}");
                }
                *last = (memo, Some(reason));
            }
        }
        result.map(|_| ())
    }

    async fn apply_text(&self, path: &Path, text: &str) -> Result<String, Error> {
        let file = path.display().to_string();
        let resources = api::load_str(&file, text).map_err(|e| Error::Invalid(e.to_string()))?;
        let mesh = api::validate(resources).map_err(|e| Error::Invalid(e.to_string()))?;
        let ctx = api::ProxyContext {
            outbound_addr: self.opts.outbound_addr,
            inbound_addr: self.opts.inbound_addr,
            workload: self.opts.workload.as_deref().map(split_workload),
            detect_timeout: self.opts.detect_timeout,
            certs_dir: None,
            capture: self.opts.capture,
        };
        let out = api::translate(&mesh, &ctx);
        let local_service = ctx.workload.as_ref().and_then(|(ns, name)| {
            mesh.workload(ns, name)
                .map(|w| format!("{}.{ns}", w.value.spec.service))
        });
        let snapshot = xds::from_resources_with(
            &out.version,
            out.listeners,
            out.routes,
            out.clusters,
            out.endpoints,
            &self.xds_env(),
        )
        .map_err(|e| Error::Nack(e.to_string()))?;
        self.install(Arc::new(snapshot)).await?;
        self.shared.set_local_service(local_service);
        Ok(out.version)
    }

    /// Makes `snapshot` the active config. Binds new listeners first: a
    /// config that cannot be bound is refused before anything changes. Then
    /// routes and clusters, so a new listener never sees a runtime without
    /// its routes; then listeners.
    async fn install(&self, snapshot: Arc<Snapshot>) -> Result<(), Error> {
        let mut guard = self.listeners.lock().await;
        let Some(set) = guard.as_mut() else {
            return Err(Error::Invalid("the proxy is shutting down".into()));
        };
        let serving = self.serving(&snapshot.listeners);
        let bound = set.bind_new(&serving)?;
        let previous = self.shared.runtime();
        let runtime = Arc::new(Runtime::build(snapshot.clone(), Some(&previous)));
        self.shared.set_runtime(runtime);
        set.commit(&serving, bound);
        *lock(&self.bound) = set.bound();
        if let Some(dns) = &self.dns {
            dns.set_names(crate::dns::names_from_snapshot(&snapshot));
        }
        Ok(())
    }

    /// What config conversion resolves mTLS secrets against: this proxy's
    /// identity (SDS `default` and `ROOTCA`).
    fn xds_env(&self) -> xds::Env {
        xds::Env {
            identity: self.opts.identity.clone(),
        }
    }

    /// Applies one xDS update on top of the active config.
    async fn apply_update(&self, update: xds::Update) -> crate::xds_client::Verdict {
        let kind = update_kind(&update);
        let previous = self.shared.runtime().snapshot.clone();
        let result = match xds::apply_with(&previous, update, &self.xds_env()) {
            Ok(next) => {
                let next = Arc::new(next);
                self.install(next.clone())
                    .await
                    .map(|()| next)
                    .map_err(|e| e.to_string())
            }
            Err(nack) => Err(nack.to_string()),
        };
        match result {
            Ok(snapshot) => {
                let version = versions_of(&snapshot, kind);
                self.shared.metrics.config_accepted(kind, &version);
                if !snapshot.listeners.is_empty() {
                    self.ready.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                Ok(needs(&snapshot))
            }
            Err(reason) => {
                self.shared.metrics.config_rejected(kind);
                Err(reason)
            }
        }
    }
}

fn update_kind(u: &xds::Update) -> &'static str {
    if u.listeners.is_some() {
        "listeners"
    } else if u.routes.is_some() {
        "routes"
    } else if u.clusters.is_some() {
        "clusters"
    } else {
        "endpoints"
    }
}

fn versions_of(s: &Snapshot, kind: &str) -> String {
    match kind {
        "listeners" => s.versions.listeners.clone(),
        "routes" => s.versions.routes.clone(),
        "clusters" => s.versions.clusters.clone(),
        _ => s.versions.endpoints.clone(),
    }
}

/// The RouteConfigurations and ClusterLoadAssignments `s` refers to.
fn needs(s: &Snapshot) -> crate::xds_client::Needs {
    let mut n = crate::xds_client::Needs::default();
    for l in s.listeners.values() {
        // The plaintext chain's HCM and the mTLS chain's (inbound, strict or
        // permissive) both name their RouteConfiguration.
        let tls_http = l.tls.as_ref().and_then(|t| t.http.as_ref());
        for h in l.http.iter().chain(tls_http) {
            if h.inline_routes.is_none() {
                n.routes.insert(h.route_config_name.clone());
            }
        }
    }
    for c in s.clusters.values() {
        if c.static_endpoints.is_none() {
            n.endpoints.insert(c.eds_name.clone());
        }
    }
    n
}

async fn apply_updates(
    inner: Arc<Inner>,
    mut rx: tokio::sync::mpsc::Receiver<crate::xds_client::Request>,
) {
    while let Some((update, reply)) = rx.recv().await {
        let verdict = inner.apply_update(update).await;
        let _ = reply.send(verdict);
    }
}

impl AdminSource for Inner {
    fn ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn config_dump(&self) -> serde_json::Value {
        let rt = self.shared.runtime();
        serde_json::to_value(&*rt.snapshot)
            .unwrap_or_else(|e| serde_json::json!({ "error": format!("config dump failed: {e}") }))
    }

    fn listeners(&self) -> Vec<(String, SocketAddr)> {
        lock(&self.bound).clone()
    }

    fn clusters(&self) -> serde_json::Value {
        let rt = self.shared.runtime();
        serde_json::to_value(rt.clusters_status())
            .unwrap_or_else(|e| serde_json::json!({ "error": format!("clusters failed: {e}") }))
    }

    fn certs(&self) -> Option<serde_json::Value> {
        self.identity_manager().map(|m| m.status())
    }

    fn render_metrics(&self, out: &mut String) {
        if let Some(m) = self.identity_manager() {
            m.render_metrics(out);
        }
        let now = *self.workload_state.borrow();
        out.push_str("# HELP meshwork_workload_state The state this sidecar announces for its workload (1: the current one).\n# TYPE meshwork_workload_state gauge\n");
        for s in WorkloadState::ALL {
            out.push_str(&format!(
                "meshwork_workload_state{{state=\"{s}\"}} {}\n",
                u8::from(s == now)
            ));
        }
    }

    fn set_workload_state(&self, state: WorkloadState) -> Option<bool> {
        self.set_state(None, state);
        Some(self.registers_a_workload())
    }

    fn draining(&self) -> bool {
        *self.workload_state.borrow() == WorkloadState::Draining
    }

    fn drain_listeners(self: Arc<Self>, inbound_only: bool) -> admin::DrainFuture {
        let rt = self.data_rt.clone();
        // Listener tasks belong on the data path's runtime, not the admin's.
        Box::pin(async move {
            rt.spawn(async move { self.drain_listeners_now(inbound_only).await })
                .await
                .ok()
        })
    }
}

/// Which listeners `POST /drain_listeners` took out of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Drained {
    Nothing,
    Inbound,
    All,
}

impl Inner {
    /// The listeners of a config that should accept: all but the drained.
    fn serving(
        &self,
        listeners: &std::collections::HashMap<String, Arc<crate::config::model::Listener>>,
    ) -> std::collections::HashMap<String, Arc<crate::config::model::Listener>> {
        let drained = *lock(&self.drained);
        listeners
            .iter()
            .filter(|(name, _)| match drained {
                Drained::Nothing => true,
                Drained::Inbound => !(*name == "inbound" || name.starts_with("inbound|")),
                Drained::All => false,
            })
            .map(|(name, l)| (name.clone(), l.clone()))
            .collect()
    }

    /// Takes the inbound listeners (or all) out of service: they stop
    /// accepting and their connections finish (the listener drain). Returns
    /// the names of the listeners stopped now.
    async fn drain_listeners_now(&self, inbound_only: bool) -> Vec<String> {
        let mut guard = self.listeners.lock().await;
        {
            let mut drained = lock(&self.drained);
            let wanted = if inbound_only {
                Drained::Inbound
            } else {
                Drained::All
            };
            *drained = (*drained).max(wanted);
        }
        // Shutting down: nothing accepts any more.
        let Some(set) = guard.as_mut() else {
            return Vec::new();
        };
        let before = set.bound();
        let snapshot = self.shared.runtime().snapshot.clone();
        let serving = self.serving(&snapshot.listeners);
        // Every listener left is already bound: nothing new to bind.
        match set.bind_new(&serving) {
            Ok(bound) => set.commit(&serving, bound),
            Err(e) => tracing::warn!(error = %e, "draining listeners: cannot re-apply the config"),
        }
        let after = set.bound();
        *lock(&self.bound) = after.clone();
        before
            .into_iter()
            .filter(|(name, _)| !after.iter().any(|(n, _)| n == name))
            .map(|(name, _)| name)
            .collect()
    }
}

impl Inner {
    fn identity_manager(&self) -> Option<&Arc<crate::identity::Manager>> {
        match &self.opts.source {
            Source::Control { client, .. } => client.identity.as_ref(),
            Source::File { .. } => None,
        }
    }
}

/// `ns/name` or `name` (namespace `default`).
fn split_workload(s: &str) -> (String, String) {
    match s.split_once('/') {
        Some((ns, name)) => (ns.to_owned(), name.to_owned()),
        None => ("default".to_owned(), s.to_owned()),
    }
}

async fn watch_file(inner: Arc<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Errors are logged inside; the last good config stays.
        let _ = inner.reload(false).await;
    }
}

async fn sweep_pools(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        shared.pools.sweep(Duration::from_secs(60));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

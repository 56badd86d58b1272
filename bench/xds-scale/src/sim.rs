//! The simulated proxies: N lightweight ADS clients in one process (the
//! benchmark's child process, so that the control plane's memory and CPU
//! are measured alone in the parent).
//!
//! Contract:
//! - Each simulated proxy opens its own tonic `Channel`, i.e. its own TCP
//!   connection and HTTP/2 session, and one state-of-the-world ADS stream on
//!   it, as `meshwork proxy` does. Its first request carries a `Node` like
//!   the one `meshwork proxy --control --service` sends (service, namespace,
//!   address, app_port, listener addresses), so it registers a Workload,
//!   plus `upstreams`: the services it calls, which scopes its config.
//! - Subscriptions follow `crates/proxy/src/xds_client.rs`: CDS and LDS
//!   wildcard first; then EDS for the clusters of type EDS and RDS for the
//!   `rds.route_config_name` of every HTTP connection manager; every
//!   response is ACKed with its version and nonce. Nothing is NACKed: the
//!   config is not checked, only sized.
//! - One extra client, the observer, sends no `service` and no `upstreams`:
//!   it gets the whole mesh, which is what a scoped config is compared with.
//!   It is not counted in the latencies.
//! - Protocol with the driver, one line each way per step:
//!   stdout `synced ...` once all streams hold all four types and nothing
//!   was received for a quiet period; stdin `watch ID route|endpoint MARKER`
//!   -> stdout `ready ID`, then `done ID ...` with, per proxy that saw it,
//!   the microseconds from the watch to the first response of that type
//!   whose resources contain MARKER; stdin `quit` -> stdout `bye ...`.
//!
//! Non-goals: reconnecting (a broken stream is counted as failed and its
//! first error reported), delta xDS, validating what is received.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value};
use prost::Message;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::mesh;

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const TYPES: [&str; 4] = [CLUSTER, ENDPOINT, LISTENER, ROUTE];
const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// What the child is told on its command line.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub xds: String,
    pub proxies: usize,
    pub services: usize,
    pub upstreams: usize,
    /// When non-zero: connect clients `0..first` (and the observer), print
    /// `staged ...` once they are synced, wait for `continue` on stdin, then
    /// connect the rest. The driver measures memory at both points, which
    /// gives the marginal cost of a connected proxy.
    pub first: usize,
    /// Streams being opened at once (the rest wait), so 1,000 connects do
    /// not overflow the listen backlog.
    pub connect_parallel: usize,
    pub sync_timeout: Duration,
    pub change_timeout: Duration,
}

/// A change being looked for.
struct Mark {
    id: u64,
    type_url: &'static str,
    marker: Vec<u8>,
    since: Instant,
}

/// Per-client counters, read by the coordinator.
#[derive(Default)]
struct Stats {
    /// Bit per type of `TYPES` received at least once.
    types: AtomicU8,
    /// Size of the last response per type: SotW responses hold every
    /// subscribed resource, so their sum is the config the client holds.
    held: [AtomicU64; 4],
    failed: AtomicU8,
}

struct Shared {
    opts: SimOptions,
    mark: watch::Receiver<Option<Arc<Mark>>>,
    seen: mpsc::UnboundedSender<(u64, usize, Duration)>,
    /// Responses received by anyone: the coordinator waits for it to stop
    /// moving before it calls the mesh synced.
    responses: AtomicU64,
    /// Resource bytes received by the scoped clients, cumulative.
    scoped_bytes: AtomicU64,
    connected: AtomicUsize,
    stats: Vec<Stats>,
    errors: Mutex<BTreeMap<String, usize>>,
    connect: Semaphore,
}

/// The child's main: runs the clients and the line protocol on stdio.
pub fn main(opts: SimOptions) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sim")
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(run(opts))
}

async fn run(opts: SimOptions) -> Result<(), String> {
    let (mark_tx, mark_rx) = watch::channel(None);
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let n = opts.proxies;
    let shared = Arc::new(Shared {
        mark: mark_rx,
        seen: seen_tx,
        responses: AtomicU64::new(0),
        scoped_bytes: AtomicU64::new(0),
        connected: AtomicUsize::new(0),
        stats: (0..=n).map(|_| Stats::default()).collect(),
        errors: Mutex::new(BTreeMap::new()),
        connect: Semaphore::new(opts.connect_parallel.max(1)),
        opts: opts.clone(),
    });
    let mut commands = stdin_lines();
    let started = Instant::now();
    let spawn = |k: usize| {
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = client(k, &shared).await {
                shared.stats[k].failed.store(1, Ordering::Relaxed);
                let mut errors = shared.errors.lock().unwrap_or_else(|p| p.into_inner());
                *errors.entry(e).or_default() += 1;
            }
        });
    };
    // Index n is the observer.
    let first = if opts.first > 0 && opts.first < n {
        opts.first
    } else {
        n
    };
    spawn(n);
    for k in 0..first {
        spawn(k);
    }
    if first < n {
        wait_settled(&shared, (0..first).chain([n]), started).await;
        println!("staged n={first}");
        loop {
            match commands.recv().await.as_deref() {
                Some("continue") => break,
                Some(other) => eprintln!("xds-scale clients: waiting for continue, got {other:?}"),
                None => return Ok(()),
            }
        }
        for k in first..n {
            spawn(k);
        }
    }
    wait_synced(&shared, started).await;
    while let Some(line) = commands.recv().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["watch", id, kind, marker] => {
                let id: u64 = id.parse().map_err(|_| format!("bad id {id:?}"))?;
                let type_url = if *kind == "route" { ROUTE } else { ENDPOINT };
                let bytes0 = shared.scoped_bytes.load(Ordering::Relaxed);
                // Anything left from an earlier change is stale.
                while seen_rx.try_recv().is_ok() {}
                mark_tx.send_replace(Some(Arc::new(Mark {
                    id,
                    type_url,
                    marker: marker.as_bytes().to_vec(),
                    since: Instant::now(),
                })));
                println!("ready {id}");
                let alive = (0..n).filter(|k| !failed(&shared, *k)).count();
                let deadline = tokio::time::sleep(opts.change_timeout);
                tokio::pin!(deadline);
                let mut lat = Vec::with_capacity(n);
                let mut observer = None;
                while lat.len() < alive || (observer.is_none() && !failed(&shared, n)) {
                    tokio::select! {
                        got = seen_rx.recv() => match got {
                            Some((i, k, d)) if i == id => {
                                if k == n { observer = Some(d) } else { lat.push(d) }
                            }
                            Some(_) => {}
                            None => break,
                        },
                        () = &mut deadline => break,
                    }
                }
                let bytes = shared.scoped_bytes.load(Ordering::Relaxed) - bytes0;
                let list: Vec<String> = lat.iter().map(|d| d.as_micros().to_string()).collect();
                println!(
                    "done {id} seen={} of={alive} observer_us={} bytes={bytes} lat={}",
                    lat.len(),
                    observer.map_or("-".to_string(), |d| d.as_micros().to_string()),
                    if list.is_empty() {
                        "-".to_string()
                    } else {
                        list.join(",")
                    },
                );
            }
            ["quit"] => break,
            _ => eprintln!("xds-scale clients: unknown command {line:?}"),
        }
    }
    let me = std::process::id().to_string();
    println!(
        "bye hwm={} cpu={:.2}",
        crate::sys::status_bytes(&me, "VmHWM").unwrap_or(0),
        crate::sys::cpu_seconds(&me).unwrap_or(0.0),
    );
    Ok(())
}

fn failed(shared: &Shared, k: usize) -> bool {
    shared.stats[k].failed.load(Ordering::Relaxed) != 0
}

/// Stdin lines, read on a thread (tokio's stdin would need another feature
/// and so another build of tokio).
fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    rx
}

/// Waits until every client in `ks` holds all four types (or failed) and no
/// response arrived for a second, or the sync timeout passed.
async fn wait_settled(shared: &Shared, ks: impl Iterator<Item = usize> + Clone, started: Instant) {
    let quiet = Duration::from_secs(1);
    let mut last = u64::MAX;
    let mut last_change = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = shared.responses.load(Ordering::Relaxed);
        if now != last {
            last = now;
            last_change = Instant::now();
        }
        let complete = ks
            .clone()
            .all(|k| failed(shared, k) || shared.stats[k].types.load(Ordering::Relaxed) == 0b1111);
        let settled = complete && last_change.elapsed() >= quiet;
        if settled || started.elapsed() >= shared.opts.sync_timeout {
            break;
        }
    }
}

/// Waits until every live client holds all four types and no response
/// arrived for a second, then prints the `synced` line.
async fn wait_synced(shared: &Shared, started: Instant) {
    let n = shared.opts.proxies;
    wait_settled(shared, 0..=n, started).await;
    let held = |k: usize| -> u64 {
        shared.stats[k]
            .held
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    };
    let synced: Vec<usize> = (0..n)
        .filter(|k| !failed(shared, *k) && shared.stats[*k].types.load(Ordering::Relaxed) == 0b1111)
        .collect();
    let mut sizes: Vec<u64> = synced.iter().map(|k| held(*k)).collect();
    sizes.sort_unstable();
    let failed_n = (0..n).filter(|k| failed(shared, *k)).count();
    let errors = shared
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let errors: Vec<String> = errors
        .iter()
        .map(|(e, c)| format!("{c}x {}", e.replace([' ', '\n'], "_")))
        .collect();
    let per_type: Vec<String> = (0..4)
        .map(|t| {
            let mut v: Vec<u64> = synced
                .iter()
                .map(|k| shared.stats[*k].held[t].load(Ordering::Relaxed))
                .collect();
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or(0).to_string()
        })
        .collect();
    println!(
        "synced n={} connected={} failed={failed_n} secs={:.2} held_p50={} held_max={} observer_held={} observer_ok={} types_p50={} errors={}",
        synced.len(),
        shared.connected.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
        sizes.get(sizes.len() / 2).copied().unwrap_or(0),
        sizes.last().copied().unwrap_or(0),
        held(n),
        !failed(shared, n) && shared.stats[n].types.load(Ordering::Relaxed) == 0b1111,
        per_type.join(","),
        if errors.is_empty() { "-".to_string() } else { errors.join(";") },
    );
}

fn string(v: String) -> Value {
    Value {
        kind: Some(Kind::StringValue(v)),
    }
}

/// The node of client `k`: like `meshwork proxy --service` (see
/// `crates/cli/src/proxy_cmd.rs::control_source`), plus `upstreams`. The
/// observer (`k == proxies`) registers nothing and declares no upstreams.
fn node(k: usize, o: &SimOptions) -> Node {
    let mut fields = std::collections::HashMap::new();
    fields.insert("inbound_addr".to_owned(), string("127.0.0.1:15006".into()));
    fields.insert("outbound_addr".to_owned(), string("127.0.0.1:15001".into()));
    if k == o.proxies {
        return Node {
            id: "observer".to_owned(),
            user_agent_name: "xds-scale".to_owned(),
            metadata: Some(Struct { fields }),
            ..Default::default()
        };
    }
    let service = mesh::service(k % o.services);
    fields.insert("service".to_owned(), string(service.clone()));
    fields.insert("namespace".to_owned(), string("default".into()));
    fields.insert("address".to_owned(), string(mesh::sim_address(k)));
    fields.insert(
        "app_port".to_owned(),
        Value {
            kind: Some(Kind::NumberValue(f64::from(mesh::PORT))),
        },
    );
    let ups = mesh::upstreams(k, o.services, o.upstreams);
    fields.insert(
        "upstreams".to_owned(),
        Value {
            kind: Some(Kind::ListValue(ListValue {
                values: ups.into_iter().map(string).collect(),
            })),
        },
    );
    Node {
        id: format!("sim-{k}.default"),
        cluster: service,
        user_agent_name: "xds-scale".to_owned(),
        metadata: Some(Struct { fields }),
        ..Default::default()
    }
}

fn request(type_url: &str, names: &[String], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.to_owned(),
        resource_names: names.to_vec(),
        type_url: type_url.to_owned(),
        response_nonce: nonce.to_owned(),
        ..Default::default()
    }
}

/// One simulated proxy, until its stream ends.
async fn client(k: usize, shared: &Shared) -> Result<(), String> {
    let o = &shared.opts;
    let permit = shared
        .connect
        .acquire()
        .await
        .map_err(|_| "closed".to_string())?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", o.xds))
        .map_err(|e| format!("endpoint: {e}"))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut ads =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20);
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(16);
    let send = |r: DiscoveryRequest| {
        let tx = tx.clone();
        async move {
            tx.send(r)
                .await
                .map_err(|_| "request channel closed".to_string())
        }
    };
    let mut first = request(CLUSTER, &[], "", "");
    first.node = Some(node(k, o));
    send(first).await?;
    send(request(LISTENER, &[], "", "")).await?;
    let mut responses = ads
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("stream: {}", e.code()))?
        .into_inner();
    shared.connected.fetch_add(1, Ordering::Relaxed);
    let mut permit = Some(permit);
    let mut mark = shared.mark.clone();
    let mut last_seen = u64::MAX;
    let mut eds: Vec<String> = Vec::new();
    let mut rds: Vec<String> = Vec::new();
    let stats = &shared.stats[k];
    loop {
        let resp = match responses.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err("stream closed by the server".into()),
            Err(e) => return Err(format!("stream: {:?} {}", e.code(), e.message())),
        };
        let now = Instant::now();
        // The first answer is in: let the next client connect.
        permit.take();
        shared.responses.fetch_add(1, Ordering::Relaxed);
        let size: u64 = resp.resources.iter().map(|a| a.value.len() as u64).sum();
        if k < o.proxies {
            shared.scoped_bytes.fetch_add(size, Ordering::Relaxed);
        }
        if let Some(m) = mark.borrow_and_update().clone() {
            if m.id != last_seen && resp.type_url == m.type_url && carries(&resp, &m.marker) {
                last_seen = m.id;
                let _ = shared.seen.send((m.id, k, now.duration_since(m.since)));
            }
        }
        let Some(t) = TYPES.iter().position(|t| *t == resp.type_url) else {
            continue;
        };
        stats.held[t].store(size, Ordering::Relaxed);
        stats.types.fetch_or(1 << t, Ordering::Relaxed);
        let (new_eds, new_rds) = match TYPES[t] {
            CLUSTER => (Some(eds_names(&resp)), None),
            LISTENER => (None, Some(rds_names(&resp))),
            _ => (None, None),
        };
        let names = match TYPES[t] {
            ENDPOINT => eds.clone(),
            ROUTE => rds.clone(),
            _ => Vec::new(),
        };
        send(request(TYPES[t], &names, &resp.version_info, &resp.nonce)).await?;
        if let Some(n) = new_eds.filter(|n| *n != eds) {
            eds = n;
            send(request(ENDPOINT, &eds, "", "")).await?;
        }
        if let Some(n) = new_rds.filter(|n| *n != rds) {
            rds = n;
            send(request(ROUTE, &rds, "", "")).await?;
        }
    }
}

/// Whether a resource of the response contains `marker`'s bytes.
fn carries(resp: &DiscoveryResponse, marker: &[u8]) -> bool {
    !marker.is_empty()
        && resp
            .resources
            .iter()
            .any(|a| a.value.windows(marker.len()).any(|w| w == marker))
}

/// EDS names the clusters of a CDS response need.
fn eds_names(resp: &DiscoveryResponse) -> Vec<String> {
    let mut names: Vec<String> = resp
        .resources
        .iter()
        .filter_map(|a| Cluster::decode(a.value.as_slice()).ok())
        .filter(|c| {
            c.cluster_discovery_type
                == Some(cluster::ClusterDiscoveryType::Type(
                    cluster::DiscoveryType::Eds as i32,
                ))
        })
        .map(|c| match c.eds_cluster_config {
            Some(e) if !e.service_name.is_empty() => e.service_name,
            _ => c.name,
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// RDS names the HTTP connection managers of an LDS response need.
fn rds_names(resp: &DiscoveryResponse) -> Vec<String> {
    let mut names = Vec::new();
    for a in &resp.resources {
        let Ok(l) = Listener::decode(a.value.as_slice()) else {
            continue;
        };
        for chain in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
            for f in &chain.filters {
                let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    continue;
                };
                if any.type_url != HCM {
                    continue;
                }
                if let Ok(hcm) = HttpConnectionManager::decode(any.value.as_slice()) {
                    if let Some(RouteSpecifier::Rds(r)) = hcm.route_specifier {
                        names.push(r.route_config_name);
                    }
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

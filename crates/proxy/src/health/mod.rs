//! Endpoint health: what the balancer may pick, from active health checks,
//! outlier detection (passive) and EDS.
//!
//! Purpose: keep one health record per (cluster, endpoint address) that
//! survives config updates, feed it from active checkers (`check.rs`), from
//! request outcomes ([`crate::balance::Pick::report`], `outlier.rs`) and
//! from EDS `health_status`, and make the cluster's balancers follow it.
//!
//! How it fits together:
//! - [`ClusterHealth`] (one per cluster *name*, carried from runtime to
//!   runtime by `runtime::Runtime::build`) owns a [`Host`] per endpoint
//!   address: the endpoint's load counters (in flight, latency), its health
//!   flags and its outlier counters. It also owns the cluster's tasks: one
//!   outlier timer when the cluster has `outlier_detection`, one checker per
//!   (endpoint, health check). Tasks hold only a `Weak` of it and an
//!   `Arc<Host>`, never a runtime: dropping the last runtime that lists the
//!   cluster drops it, which aborts its tasks; removing an endpoint aborts
//!   its checkers; proxy shutdown (the drain signal, see [`Env`]) stops them
//!   all.
//! - An endpoint is *healthy* when none of these flags is set:
//!   `failed_active_hc` (an active check failed it), `outlier_ejected`,
//!   `eds_unhealthy` (EDS `health_status` UNHEALTHY, DRAINING or TIMEOUT).
//!   Flags change only under the cluster's lock; after each change the
//!   cluster rebuilds the selection tables of its live balancers (which it
//!   holds weakly) under the same lock, so a balancer built concurrently
//!   cannot miss a change. Requests never take that lock: they read the
//!   balancer's current tables (see [`crate::balance`]).
//!
//! Active health checks (Envoy's rules, `check.rs`):
//! - Every `interval` (plus up to 5% jitter, counted from the end of the
//!   previous check), within `timeout`, over the checker's own connection,
//!   kept between HTTP and gRPC checks and new for each TCP check (mTLS to mTLS
//!   endpoints, with the cluster's client config): TCP connect (and TLS
//!   handshake), HTTP `GET path` (HTTP/2 when the cluster is) healthy on an
//!   expected status, or gRPC `grpc.health.v1.Health/Check` healthy on
//!   `SERVING` with `grpc-status: 0`.
//! - An endpoint becomes unhealthy after `unhealthy_threshold` consecutive
//!   network failures (connect failure, reset, timeout), or at once when the
//!   endpoint answers wrongly (unexpected HTTP status, gRPC not `SERVING`):
//!   Envoy's "active" failures ignore the threshold. It becomes healthy
//!   again after `healthy_threshold` consecutive successes; a checker's very
//!   first success counts as enough (Envoy's faster start-up).
//! - Endpoints added while a cluster has health checks, including every
//!   endpoint of a new cluster, start *unhealthy* (`failed_active_hc` and
//!   `pending_active_hc`) until their first check passes; the first check
//!   runs at once. This is Envoy's rule for new hosts; Envoy also holds a
//!   new cluster out of service ("warming") until its first round of checks,
//!   which here shows as "no healthy upstream" (or panic routing) for the
//!   first check's round trip. Endpoints already in service when health
//!   checks are added to their cluster keep their state until checked (as
//!   Envoy keeps serving from the old cluster while the new one warms).
//!   With several health checks, all must pass.
//! - A passing check un-ejects an outlier-ejected endpoint that has not
//!   failed active checking (Envoy's
//!   `successful_active_health_check_uneject_host`, default true).
//! - Each check counts `meshwork_health_checks_total{result}` (`success`,
//!   `failure`, `timeout`).
//!
//! Outlier detection: see `outlier.rs`.
//!
//! Non-goals: degraded endpoints, `no_traffic_interval` (checks always run
//! at `interval`), `reuse_connection: false`, health check event
//! logs, `split_external_local_origin_errors`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::balance::load::Load;
use crate::balance::{Core, Outcome};
use crate::config::model::{Cluster, HealthCheck, LoadAssignment, OutlierDetection, UpstreamTls};
use crate::metrics::Metrics;

pub(crate) mod check;
pub(crate) mod outlier;

#[cfg(test)]
mod tests;

/// Most active health checks per cluster that are run (each endpoint keeps
/// one failure bit per check).
const MAX_CHECKS: usize = 32;

/// Health flag: an active health check failed the endpoint.
const FAILED_ACTIVE_HC: u8 = 1;
/// Health flag: the endpoint has not been checked yet (shown only; it comes
/// with `FAILED_ACTIVE_HC`).
const PENDING_ACTIVE_HC: u8 = 2;
/// Health flag: outlier detection ejected the endpoint.
const OUTLIER_EJECTED: u8 = 4;
/// Health flag: EDS says the endpoint is unhealthy.
const EDS_UNHEALTHY: u8 = 8;
/// Any of these takes an endpoint out of rotation.
const UNAVAILABLE: u8 = FAILED_ACTIVE_HC | OUTLIER_EJECTED | EDS_UNHEALTHY;

/// What health tasks need from the proxy: where to count, and when to stop.
/// One per proxy, passed from runtime to runtime.
#[derive(Debug)]
pub struct Env {
    metrics: Arc<Metrics>,
    drain: OnceLock<crate::drain::Watch>,
}

/// The health of one cluster's endpoints. See the module docs.
pub struct ClusterHealth {
    name: String,
    state: Mutex<State>,
}

/// One endpoint of one cluster: load, health flags, outlier counters.
pub struct Host {
    pub address: SocketAddr,
    pub(crate) load: Load,
    /// Health flags; written under the cluster lock, read anywhere.
    flags: AtomicU8,
    /// One bit per configured health check that currently fails the
    /// endpoint; written under the cluster lock.
    hc_failing: AtomicU32,
    /// Outlier counters, updated lock-free by request outcomes.
    pub(crate) passive: outlier::Counters,
    /// Outlier ejection bookkeeping; locked only under the cluster lock (or
    /// alone, by status readers).
    ejection: Mutex<outlier::Ejection>,
    cluster: Weak<ClusterHealth>,
}

/// One endpoint's health for `/clusters`.
#[derive(Debug, Clone, Serialize)]
pub struct HostStatus {
    /// The balancer may pick it (outside panic mode).
    pub healthy: bool,
    pub failed_active_hc: bool,
    /// Not health checked yet (new endpoint of a cluster with checks).
    pub pending_active_hc: bool,
    pub outlier_ejected: bool,
    pub eds_unhealthy: bool,
    /// Times outlier detection has ejected it.
    pub ejections: u32,
    /// Seconds until an ejection may end (it ends at the next outlier
    /// interval at or after that); `null` when not ejected.
    pub ejection_remaining_secs: Option<f64>,
}

struct State {
    hosts: HashMap<SocketAddr, Arc<Host>>,
    /// The outlier config in force (`None`: no outlier detection).
    outlier: Option<Arc<OutlierDetection>>,
    checks: Vec<Arc<HealthCheck>>,
    /// `destination_service` label of this cluster's events.
    destination: String,
    env: Option<Arc<Env>>,
    /// Balancers to rebuild when health changes.
    balancers: Vec<Weak<Core>>,
    outlier_task: Option<(Duration, Task)>,
    /// Per (endpoint, check index): what it was started with, and the task.
    checkers: HashMap<(SocketAddr, usize), (String, Task)>,
}

/// A spawned task, aborted when dropped.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Env {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            drain: OnceLock::new(),
        })
    }

    /// Health tasks stop when `watch` signals (proxy shutdown). Only the
    /// first call has an effect.
    pub fn watch_drain(&self, watch: crate::drain::Watch) {
        let _ = self.drain.set(watch);
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Resolves once the proxy shuts down (never without a drain watch).
    pub(crate) async fn stopped(&self) {
        match self.drain.get() {
            Some(w) => w.signaled().await,
            None => std::future::pending().await,
        }
    }
}

impl Default for Env {
    /// Counts into a private registry and never stops (tests, tools).
    fn default() -> Self {
        Self {
            metrics: Arc::new(Metrics::new()),
            drain: OnceLock::new(),
        }
    }
}

impl ClusterHealth {
    /// The health of cluster `name`, with no endpoints yet.
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            state: Mutex::new(State {
                hosts: HashMap::new(),
                outlier: None,
                checks: Vec::new(),
                destination: name.to_owned(),
                env: None,
                balancers: Vec::new(),
                outlier_task: None,
                checkers: HashMap::new(),
            }),
        })
    }

    /// Health for a balancer without a cluster (no checks, no detection).
    pub(crate) fn detached() -> Arc<Self> {
        Self::new("")
    }

    /// Brings the state up to date with a (new) config of the cluster and
    /// its endpoints: adds and removes endpoints, applies EDS health, and
    /// starts, restarts or stops the outlier timer and the checkers. Health
    /// already known (ejections, failed checks, counters) is kept. `tls`
    /// gives the mTLS settings of an endpoint (checks use them).
    pub fn configure(
        self: &Arc<Self>,
        cluster: &Cluster,
        endpoints: &LoadAssignment,
        tls: &dyn Fn(SocketAddr) -> Option<Arc<UpstreamTls>>,
        env: &Arc<Env>,
    ) {
        let mut state = lock(&self.state);
        state.destination = cluster.service.clone().unwrap_or_else(|| self.name.clone());
        state.env = Some(Arc::clone(env));
        let mut checks = cluster.health_checks.clone();
        if checks.len() > MAX_CHECKS {
            tracing::warn!(
                cluster = %self.name,
                configured = checks.len(),
                "only the first {MAX_CHECKS} health checks of a cluster are run"
            );
            checks.truncate(MAX_CHECKS);
        }
        state.checks = checks;
        self.sync_locked(&mut state, endpoints);
        self.set_outlier(&mut state, cluster.outlier_detection.clone());
        self.reconcile_checkers(&mut state, cluster, tls, env);
        self.reconcile_outlier_task(&mut state, env);
        Self::rebuild(&mut state);
    }

    /// Adds and removes endpoints to match `endpoints` and applies their EDS
    /// health, without touching checks or outlier detection.
    pub(crate) fn sync_endpoints(self: &Arc<Self>, endpoints: &LoadAssignment) {
        let mut state = lock(&self.state);
        self.sync_locked(&mut state, endpoints);
        Self::rebuild(&mut state);
    }

    /// The record of `address`, which [`Self::configure`] or
    /// [`Self::sync_endpoints`] created; a fresh detached one if it did not
    /// (it then stays healthy unless EDS said otherwise at build time).
    pub(crate) fn host(self: &Arc<Self>, address: SocketAddr) -> Arc<Host> {
        let state = lock(&self.state);
        match state.hosts.get(&address) {
            Some(h) => Arc::clone(h),
            None => Arc::new(Host::new(address, 0, 0, Arc::downgrade(self))),
        }
    }

    /// Registers a balancer to rebuild on health changes and builds its
    /// first tables.
    pub(crate) fn attach(&self, core: &Arc<Core>) {
        let mut state = lock(&self.state);
        state.balancers.retain(|w| w.strong_count() > 0);
        state.balancers.push(Arc::downgrade(core));
        core.rebuild();
    }

    /// Health of every endpoint, by address (tests, tools).
    pub fn status(&self) -> HashMap<SocketAddr, HostStatus> {
        let hosts: Vec<Arc<Host>> = lock(&self.state).hosts.values().cloned().collect();
        let now = Instant::now();
        hosts.iter().map(|h| (h.address, h.status(now))).collect()
    }

    fn sync_locked(self: &Arc<Self>, state: &mut State, endpoints: &LoadAssignment) {
        let mut wanted: HashMap<SocketAddr, bool> = HashMap::new();
        for e in endpoints.endpoints() {
            *wanted.entry(e.address).or_insert(false) |= e.unhealthy;
        }
        let checks = state.checks.len();
        let all_checks = check_bits(checks);
        let mut hosts = HashMap::with_capacity(wanted.len());
        for (address, eds_unhealthy) in wanted {
            let host = state.hosts.remove(&address).unwrap_or_else(|| {
                // New endpoints of a cluster with health checks wait for
                // their first check (Envoy's rule for new hosts).
                let h = Host::new(address, all_checks, 0, Arc::downgrade(self));
                h.passive.configure(state.outlier.as_deref());
                Arc::new(h)
            });
            host.set_flag(EDS_UNHEALTHY, eds_unhealthy);
            // Checks removed from the config no longer fail anyone.
            let failing = host.hc_failing.load(Relaxed) & all_checks;
            host.hc_failing.store(failing, Relaxed);
            host.set_flag(FAILED_ACTIVE_HC, failing != 0);
            if checks == 0 {
                host.set_flag(PENDING_ACTIVE_HC, false);
            }
            hosts.insert(address, host);
        }
        // Endpoints left in `state.hosts` are gone: their records are
        // dropped (old balancers may still hold them until they go too).
        state.hosts = hosts;
        let gone: Vec<(SocketAddr, usize)> = state
            .checkers
            .keys()
            .filter(|(a, _)| !state.hosts.contains_key(a))
            .copied()
            .collect();
        for key in gone {
            state.checkers.remove(&key);
        }
    }

    /// Starts or restarts a checker per (endpoint, check) whose settings
    /// changed; stops those no longer configured.
    fn reconcile_checkers(
        self: &Arc<Self>,
        state: &mut State,
        cluster: &Cluster,
        tls: &dyn Fn(SocketAddr) -> Option<Arc<UpstreamTls>>,
        env: &Arc<Env>,
    ) {
        let mut wanted = HashSet::new();
        let hosts: Vec<Arc<Host>> = state.hosts.values().cloned().collect();
        for host in hosts {
            for (index, hc) in state.checks.clone().into_iter().enumerate() {
                wanted.insert((host.address, index));
                let spec = check::Spec::new(hc, cluster, tls(host.address), &state.destination);
                let running = state
                    .checkers
                    .get(&(host.address, index))
                    .is_some_and(|(key, _)| *key == spec.key);
                if running {
                    continue;
                }
                match spawn(check::run(
                    Arc::downgrade(self),
                    Arc::clone(&host),
                    index,
                    spec.clone(),
                    Arc::clone(env),
                    state.destination.clone(),
                )) {
                    Some(task) => {
                        state
                            .checkers
                            .insert((host.address, index), (spec.key, task));
                    }
                    None => {
                        state.checkers.remove(&(host.address, index));
                    }
                }
            }
        }
        state.checkers.retain(|key, _| wanted.contains(key));
    }

    /// Runs the outlier timer while the cluster has outlier detection,
    /// restarting it only when the interval changes.
    fn reconcile_outlier_task(self: &Arc<Self>, state: &mut State, env: &Arc<Env>) {
        let Some(interval) = state.outlier.as_ref().map(|o| o.interval) else {
            state.outlier_task = None;
            return;
        };
        if state
            .outlier_task
            .as_ref()
            .is_some_and(|(i, _)| *i == interval)
        {
            return;
        }
        state.outlier_task = spawn(outlier::run(
            Arc::downgrade(self),
            interval,
            Arc::clone(env),
        ))
        .map(|t| (interval, t));
    }

    /// Applies an active check's result to `host` (check `index`), with the
    /// checker's `session`; un-ejects on success when the endpoint passes
    /// all checks.
    pub(crate) fn check_result(
        &self,
        host: &Host,
        index: usize,
        probe: check::Probe,
        session: &mut check::Session,
    ) {
        let mut state = lock(&self.state);
        if !state.is_current(host) {
            return;
        }
        let Some(hc) = state.checks.get(index).cloned() else {
            return;
        };
        let bit = 1u32 << index;
        let failing = host.hc_failing.load(Relaxed) & bit != 0;
        let mut changed = host.flags.load(Relaxed) & PENDING_ACTIVE_HC != 0;
        host.set_flag(PENDING_ACTIVE_HC, false);
        if let Some(now_failing) = session.observe(failing, probe, &hc) {
            let mask = host.hc_failing.load(Relaxed);
            let mask = if now_failing { mask | bit } else { mask & !bit };
            host.hc_failing.store(mask, Relaxed);
            host.set_flag(FAILED_ACTIVE_HC, mask != 0);
            changed = true;
            if now_failing {
                tracing::info!(cluster = %self.name, endpoint = %host.address, result = ?probe, "endpoint failed its health check: out of rotation");
            } else {
                tracing::info!(cluster = %self.name, endpoint = %host.address, "endpoint passed its health check: back in rotation");
            }
        }
        if probe == check::Probe::Healthy && host.hc_failing.load(Relaxed) == 0 && host.is_ejected()
        {
            self.uneject(host, Instant::now());
            changed = true;
        }
        if changed {
            Self::rebuild(&mut state);
        }
    }

    /// Rebuilds the tables of every live balancer of the cluster.
    fn rebuild(state: &mut State) {
        state.balancers.retain(|w| match w.upgrade() {
            Some(core) => {
                core.rebuild();
                true
            }
            None => false,
        });
    }

    fn set_outlier(&self, state: &mut State, config: Option<Arc<OutlierDetection>>) {
        let now = Instant::now();
        for host in state.hosts.values() {
            host.passive.configure(config.as_deref());
            if config.is_none() && host.is_ejected() {
                self.uneject(host, now);
            }
        }
        state.outlier = config;
    }
}

impl State {
    /// `host` is the record this cluster holds for its address (not one of
    /// a removed endpoint that an old balancer still lists).
    fn is_current(&self, host: &Host) -> bool {
        self.hosts
            .get(&host.address)
            .is_some_and(|h| std::ptr::eq(h.as_ref(), host))
    }
}

impl Drop for ClusterHealth {
    fn drop(&mut self) {
        // Tasks are aborted by dropping their handles; say why in the log.
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if !state.checkers.is_empty() || state.outlier_task.is_some() {
            tracing::debug!(cluster = %self.name, "cluster removed: stopping its health tasks");
        }
    }
}

impl std::fmt::Debug for ClusterHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterHealth")
            .field("cluster", &self.name)
            .finish_non_exhaustive()
    }
}

impl Host {
    fn new(address: SocketAddr, hc_failing: u32, flags: u8, cluster: Weak<ClusterHealth>) -> Self {
        let flags = if hc_failing != 0 {
            flags | FAILED_ACTIVE_HC | PENDING_ACTIVE_HC
        } else {
            flags
        };
        Self {
            address,
            load: Load::new(Instant::now()),
            flags: AtomicU8::new(flags),
            hc_failing: AtomicU32::new(hc_failing),
            passive: outlier::Counters::default(),
            ejection: Mutex::new(outlier::Ejection::default()),
            cluster,
        }
    }

    /// No flag takes it out of rotation.
    pub fn is_healthy(&self) -> bool {
        self.flags.load(Relaxed) & UNAVAILABLE == 0
    }

    pub(crate) fn is_ejected(&self) -> bool {
        self.flags.load(Relaxed) & OUTLIER_EJECTED != 0
    }

    /// Feeds one request outcome to outlier detection.
    pub(crate) fn report(&self, outcome: Outcome) {
        let fired = self.passive.record(outcome);
        for detector in fired.into_iter().flatten() {
            if let Some(cluster) = self.cluster.upgrade() {
                cluster.on_consecutive(self, detector);
            }
        }
    }

    /// Sets or clears health flags; call under the cluster lock.
    fn set_flag(&self, flag: u8, on: bool) {
        if on {
            self.flags.fetch_or(flag, Relaxed);
        } else {
            self.flags.fetch_and(!flag, Relaxed);
        }
    }

    pub(crate) fn status(&self, now: Instant) -> HostStatus {
        let flags = self.flags.load(Relaxed);
        let ejection = lock(&self.ejection);
        let ejected = flags & OUTLIER_EJECTED != 0;
        HostStatus {
            healthy: flags & UNAVAILABLE == 0,
            failed_active_hc: flags & FAILED_ACTIVE_HC != 0,
            pending_active_hc: flags & PENDING_ACTIVE_HC != 0,
            outlier_ejected: ejected,
            eds_unhealthy: flags & EDS_UNHEALTHY != 0,
            ejections: ejection.ejections,
            ejection_remaining_secs: ejected
                .then(|| {
                    ejection
                        .until
                        .map(|u| u.saturating_duration_since(now).as_secs_f64())
                })
                .flatten(),
        }
    }
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("address", &self.address)
            .field("flags", &self.flags.load(Relaxed))
            .finish_non_exhaustive()
    }
}

/// Bits `0..n` set.
fn check_bits(n: usize) -> u32 {
    if n >= 32 {
        u32::MAX
    } else {
        (1u32 << n) - 1
    }
}

/// Spawns on the current tokio runtime; `None` (and a warning) outside one,
/// where no health task can run.
fn spawn(f: impl std::future::Future<Output = ()> + Send + 'static) -> Option<Task> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => Some(Task(handle.spawn(f))),
        Err(_) => {
            tracing::warn!(
                "no async runtime: health checking and outlier detection timers are off"
            );
            None
        }
    }
}

/// Locks a std mutex, recovering from poisoning: health state stays
/// consistent field by field even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

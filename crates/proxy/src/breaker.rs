//! Circuit breaking: per-cluster limits on what one proxy sends to a
//! destination (`circuit_breakers.thresholds`, priority DEFAULT).
//!
//! Purpose: when a destination slows down or fails, requests pile up in the
//! proxy; the limits turn that pile-up into fast local 503s (and skipped
//! retries) instead of unbounded queues and connection storms.
//!
//! Contract: one [`Breaker`] per cluster *name*, carried over config updates
//! by `runtime::Runtime::build` (the counts stay, the limits are replaced in
//! place with [`Breaker::set_limits`]). Every count is held by a [`Guard`]
//! that gives it back when dropped, so no path can leak a slot. What is
//! counted, exactly:
//!
//! - `requests` (`max_requests`): upstream requests (attempts) of the
//!   cluster in flight, as Envoy counts them. An attempt takes its slot
//!   before it leases a connection (so attempts waiting for one count too)
//!   and keeps it until its response body ends, or until it fails; a
//!   request in retry backoff holds none. Full: 503 with nothing sent, also
//!   for a retry (an overflow is never retried).
//! - `pending_requests` (`max_pending_requests`): attempts waiting for an
//!   upstream connection. HTTP/1.1: no idle pooled connection to the chosen
//!   endpoint was usable, and the attempt waits while a new connection is
//!   established or, at `max_connections`, until a pooled connection of that
//!   endpoint comes free or a slot opens. HTTP/2: the endpoint's connection
//!   is being established. A request that finds a ready connection is never
//!   pending (as Envoy's pools). Full: 503.
//! - `connections` (`max_connections`): open upstream TCP connections
//!   (connecting, in use, or idle in a pool) opened for this cluster. Pools
//!   are per endpoint and shared by every cluster that lists the endpoint; a
//!   connection counts for the cluster that opened it, for its whole life,
//!   also while another cluster borrows it from the pool, and stops counting
//!   when it closes (an upgraded WebSocket connection stops counting when
//!   the tunnel takes it over). A new connection is allowed while fewer than
//!   `max_connections` are open, or when its endpoint has no open connection
//!   at all (as Envoy, so connections to other endpoints cannot starve one).
//!   HTTP/2 keeps one connection per endpoint, so there the limit only counts.
//! - `retries` (`max_retries`, or `retry_budget`): retries in flight, from
//!   the decision to retry (its backoff included) until the retried
//!   attempt's outcome (response headers or failure), as Envoy's retry
//!   resource. With a budget, at most `max(min_retry_concurrency,
//!   budget_percent% of first attempts in flight)` may be in flight;
//!   without one, `max_retries`. Full: the retry is skipped and the last
//!   response goes to the client. Deliberate difference from Envoy, whose
//!   base is every request in flight, retries included: there retries feed
//!   their own allowance, and during an outage the load can reach
//!   `1 / (1 - percent)` times the offered load (1.25x at 20%). Counting
//!   first attempts only keeps it at `1 + percent` (1.2x), which is what a
//!   budget promises.
//!
//! Limits are compared before incrementing (`count < max`), so a limit of 0
//! refuses everything, as in Envoy. The defaults (1024/1024/1024/3) are far
//! above what one sidecar normally has in flight to one destination.
//!
//! Non-goals: priorities other than DEFAULT, `track_remaining`, per-host
//! limits (`max_connections` per endpoint).

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::Notify;

use crate::config::model::CircuitBreakers;

/// The live counts and limits of one cluster.
#[derive(Debug)]
pub struct Breaker {
    cluster: String,
    limits: ArcSwap<CircuitBreakers>,
    requests: AtomicU32,
    pending: AtomicU32,
    connections: AtomicU32,
    retries: AtomicU32,
    /// Woken when a connection of this cluster closes (a slot opened).
    freed: Notify,
}

/// Which limit a request ran into: the `limit` label of
/// `meshwork_upstream_overflow_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    Connections,
    PendingRequests,
    Requests,
    Retries,
}

/// A limit was reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.message())]
pub struct Overflow {
    pub cluster: String,
    pub limit: Limit,
    /// The limit in force (for `retries` with a budget: the budget's
    /// current allowance).
    pub max: u32,
    /// The retry limit came from a `retry_budget`.
    pub budget: bool,
}

/// A slot of one count, given back on drop.
#[derive(Debug)]
pub struct Guard {
    breaker: Arc<Breaker>,
    limit: Limit,
}

/// Counts and limits, for `/config_dump` and the admin clusters view.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerStatus {
    pub requests: u32,
    pub max_requests: u32,
    pub pending_requests: u32,
    pub max_pending_requests: u32,
    pub connections: u32,
    pub max_connections: u32,
    pub retries: u32,
    /// Retries allowed in flight now (the budget's allowance, or
    /// `max_retries`).
    pub max_retries: u32,
    /// `Some` when a retry budget replaces `max_retries`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_budget_percent: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_retry_concurrency: Option<u32>,
}

impl Limit {
    /// The `limit` label value.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::PendingRequests => "pending_requests",
            Limit::Requests => "requests",
            Limit::Retries => "retries",
        }
    }

    /// The TrafficPolicy field that sets this limit.
    pub fn policy_field(self, budget: bool) -> &'static str {
        match self {
            Limit::Connections => "connectionPool.maxConnections",
            Limit::PendingRequests => "connectionPool.maxPendingRequests",
            Limit::Requests => "connectionPool.maxRequests",
            Limit::Retries if budget => "retries.budget",
            Limit::Retries => "connectionPool.maxRetries",
        }
    }
}

impl Overflow {
    /// What happened and what to change, for the local reply's body.
    pub fn message(&self) -> String {
        let what = match self.limit {
            Limit::Connections => "connections are open",
            Limit::PendingRequests => "requests are waiting for a connection",
            Limit::Requests => "requests are in flight",
            Limit::Retries => "retries are in flight",
        };
        format!(
            "upstream overflow: {} {what} to cluster {} (limit {}); raise {} in the destination's TrafficPolicy or reduce the load",
            self.max,
            self.cluster,
            self.limit.label(),
            self.limit.policy_field(self.budget),
        )
    }
}

impl Breaker {
    pub fn new(cluster: &str, limits: &CircuitBreakers) -> Arc<Self> {
        Arc::new(Self {
            cluster: cluster.to_owned(),
            limits: ArcSwap::from_pointee(limits.clone()),
            requests: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            connections: AtomicU32::new(0),
            retries: AtomicU32::new(0),
            freed: Notify::new(),
        })
    }

    /// Replaces the limits; counts stay. Waiters re-check at once.
    pub fn set_limits(&self, limits: &CircuitBreakers) {
        let current = self.limits.load();
        if !same_limits(&current, limits) {
            self.limits.store(Arc::new(limits.clone()));
            self.freed.notify_waiters();
        }
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// A request slot (`max_requests`).
    pub fn try_request(self: &Arc<Self>) -> Result<Guard, Overflow> {
        let max = self.limits.load().max_requests;
        self.try_take(Limit::Requests, max, false)
    }

    /// A pending slot (`max_pending_requests`).
    pub fn try_pending(self: &Arc<Self>) -> Result<Guard, Overflow> {
        let max = self.limits.load().max_pending_requests;
        self.try_take(Limit::PendingRequests, max, false)
    }

    /// A retry slot: the budget's allowance, or `max_retries`.
    pub fn try_retry(self: &Arc<Self>) -> Result<Guard, Overflow> {
        let limits = self.limits.load();
        let max = retry_allowance(&limits, self.first_attempts());
        self.try_take(Limit::Retries, max, limits.retry_budget.is_some())
    }

    /// A connection slot if one is free (`max_connections`), or regardless
    /// of the limit when `force` (the endpoint has no connection at all).
    pub fn try_connection(self: &Arc<Self>, force: bool) -> Option<Guard> {
        if force {
            self.connections.fetch_add(1, Ordering::AcqRel);
            return Some(self.guard(Limit::Connections));
        }
        let max = self.limits.load().max_connections;
        self.try_take(Limit::Connections, max, false).ok()
    }

    /// Resolves when a connection of this cluster closes or the limits
    /// change. Create it before checking, then await: it is only signalled
    /// with `notify_waiters`, which a `Notified` receives from its creation
    /// on (no `enable`, which would lock on every request).
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }

    pub fn status(&self) -> BreakerStatus {
        let limits = self.limits.load();
        let requests = self.requests.load(Ordering::Relaxed);
        BreakerStatus {
            requests,
            max_requests: limits.max_requests,
            pending_requests: self.pending.load(Ordering::Relaxed),
            max_pending_requests: limits.max_pending_requests,
            connections: self.connections.load(Ordering::Relaxed),
            max_connections: limits.max_connections,
            retries: self.retries.load(Ordering::Relaxed),
            max_retries: retry_allowance(&limits, self.first_attempts()),
            retry_budget_percent: limits.retry_budget.as_ref().map(|b| b.budget_percent),
            min_retry_concurrency: limits
                .retry_budget
                .as_ref()
                .map(|b| b.min_retry_concurrency),
        }
    }

    /// Requests in flight that are not retries: the budget's base.
    fn first_attempts(&self) -> u32 {
        let requests = self.requests.load(Ordering::Relaxed);
        requests.saturating_sub(self.retries.load(Ordering::Relaxed))
    }

    fn counter(&self, limit: Limit) -> &AtomicU32 {
        match limit {
            Limit::Connections => &self.connections,
            Limit::PendingRequests => &self.pending,
            Limit::Requests => &self.requests,
            Limit::Retries => &self.retries,
        }
    }

    fn try_take(self: &Arc<Self>, limit: Limit, max: u32, budget: bool) -> Result<Guard, Overflow> {
        let taken = self
            .counter(limit)
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(self.guard(limit)),
            Err(_) => Err(Overflow {
                cluster: self.cluster.clone(),
                limit,
                max,
                budget,
            }),
        }
    }

    fn guard(self: &Arc<Self>, limit: Limit) -> Guard {
        Guard {
            breaker: Arc::clone(self),
            limit,
        }
    }
}

impl Guard {
    pub fn limit(&self) -> Limit {
        self.limit
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.breaker
            .counter(self.limit)
            .fetch_sub(1, Ordering::AcqRel);
        if self.limit == Limit::Connections {
            self.breaker.freed.notify_waiters();
        }
    }
}

/// Retries allowed in flight with `requests` requests in flight: with a
/// budget `max(min_retry_concurrency, budget_percent% of requests)`
/// (rounded down, as Envoy), else `max_retries`.
pub fn retry_allowance(limits: &CircuitBreakers, requests: u32) -> u32 {
    match &limits.retry_budget {
        Some(b) => {
            let share = (f64::from(requests) * b.budget_percent / 100.0).floor();
            // A float in [0, u32::MAX * 1.0]: the cast saturates anyway.
            let share = if share.is_finite() && share > 0.0 {
                share.min(f64::from(u32::MAX)) as u32
            } else {
                0
            };
            share.max(b.min_retry_concurrency)
        }
        None => limits.max_retries,
    }
}

fn same_limits(a: &CircuitBreakers, b: &CircuitBreakers) -> bool {
    a.max_connections == b.max_connections
        && a.max_pending_requests == b.max_pending_requests
        && a.max_requests == b.max_requests
        && a.max_retries == b.max_retries
        && match (&a.retry_budget, &b.retry_budget) {
            (None, None) => true,
            (Some(x), Some(y)) => {
                x.budget_percent == y.budget_percent
                    && x.min_retry_concurrency == y.min_retry_concurrency
            }
            _ => false,
        }
}

/// Open connections of one endpoint pool (all clusters), and a wake-up for
/// requests waiting on it: part of `upstream`'s pools, here because the
/// connection rule above needs it.
#[derive(Debug, Default)]
pub struct PoolCounters {
    open: AtomicUsize,
    /// Woken when a connection of the endpoint goes back to the pool idle
    /// or closes.
    pub changed: Notify,
}

/// Held by an upstream connection's task for as long as the connection is
/// open: counts it in its endpoint's pool and (when opened for a cluster)
/// in the cluster's `connections`.
#[derive(Debug)]
pub struct ConnToken {
    pool: Arc<PoolCounters>,
    _cluster: Option<Guard>,
}

impl PoolCounters {
    /// Connections of the endpoint open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Counts a connection being opened (for `cluster`, if any).
    pub fn token(self: &Arc<Self>, cluster: Option<Guard>) -> ConnToken {
        self.open.fetch_add(1, Ordering::AcqRel);
        ConnToken {
            pool: Arc::clone(self),
            _cluster: cluster,
        }
    }
}

impl Drop for ConnToken {
    fn drop(&mut self) {
        self.pool.open.fetch_sub(1, Ordering::AcqRel);
        self.pool.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests;

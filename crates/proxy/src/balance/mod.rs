//! Load balancing: choose an endpoint of a cluster for each request.
//!
//! Purpose: given a cluster's `lb_policy`, its endpoints (EDS) and their
//! health, pick the upstream address for one request, and track each
//! endpoint's load (requests in flight, latency) for the load-aware
//! algorithms. No sockets: the data path owns connections and
//! [`crate::health`] owns health checking; this module only decides.
//!
//! Contract:
//! - A [`Balancer`] keeps every endpoint of every priority. What picks are
//!   made from lives in one small immutable *selection table* per balancer
//!   (per priority level: the endpoints in use, prefix sums, round-robin
//!   cycle, hash ring or maglev table) behind an `ArcSwap`. [`Balancer::pick`]
//!   loads the current table (lock-free), draws a priority level and an
//!   endpoint: a few atomics and at most a binary search, no lock and no
//!   allocation.
//! - Health never changes on the hot path. When an endpoint's health changes
//!   (active check, outlier ejection or its expiry, EDS), the cluster's
//!   [`ClusterHealth`] rebuilds the tables of every live balancer of the
//!   cluster, under its own lock, and swaps them in. Ring hash and maglev are
//!   rebuilt over the endpoints in use, as Envoy rebuilds them over healthy
//!   hosts. Table rebuilds happen off the request path except for the one
//!   request whose failure triggers a consecutive-failure ejection (that
//!   request's thread rebuilds once).
//! - Priorities and panic follow Envoy (see `priority.rs`): each level's
//!   health is its healthy share times 1.4, load spills from P0 to P1 and on
//!   in order; below 100% total availability a level whose healthy share is
//!   under the cluster's `panic_threshold` (default 50, 0 disables) picks
//!   among all its endpoints, healthy or not; when every level panics, load
//!   follows endpoint counts. With panic disabled and nothing healthy,
//!   [`Balancer::pick`] returns `None` ("no healthy upstream"). The priority
//!   draw uses the request hash for ring hash and maglev (as Envoy), so a
//!   hash stays on one level while loads are stable; a random number
//!   otherwise.
//! - A [`Pick`] is a guard: while it lives, the request counts as in flight
//!   on its endpoint; dropping it ends the request. [`Pick::complete`] feeds
//!   the latency estimate, [`Pick::failed`] a penalty, [`Pick::report`] the
//!   outlier detector.
//! - Endpoint state (load, health, outlier counters) is per (cluster,
//!   address) and owned by the cluster's [`ClusterHealth`], which survives
//!   config updates: [`Balancer::update`] and [`Balancer::for_cluster`]
//!   with the previous cluster's health keep the load and health of every
//!   address still present (in-flight counts of requests started on an old
//!   balancer stay correct, since their guards point at the same counters).
//! - Endpoint weights (`load_balancing_weight`, 0 treated as 1, as xDS
//!   defaults it) are honoured by every algorithm. A locality's weight is the
//!   sum of its endpoints' weights in meshwork's output, so an endpoint's
//!   weight alone is its effective weight: locality weights are otherwise
//!   ignored (no locality-weighted or zone-aware routing within a priority).
//!
//! Algorithms ([`LbPolicy`]), within the chosen priority level:
//! - `PeakEwma` (meshwork's default): power of two choices. Two distinct
//!   endpoints are drawn at random, weighted by endpoint weight, and the one
//!   with the lower cost `rtt_estimate * (in_flight + 1)` wins (ties go to the
//!   first draw, so an idle cluster follows the weights exactly). The
//!   estimate is a peak-sensitive EWMA with a 10 s time constant; before its
//!   first sample an endpoint counts as 30 ms or as fast as the endpoint it
//!   is weighed against, whichever is faster, so that a new endpoint gets
//!   tried even by a lone sequential caller (see `load.rs`; linkerd uses
//!   the plain 30 ms, which starves new endpoints at light load). Weights decide how often an endpoint is
//!   considered; the cost decides among the two considered, so under load
//!   (with only two endpoints, always) latency and queue length outweigh the
//!   weights.
//! - `RoundRobin`: Envoy's weighted round robin (earliest deadline first, each
//!   endpoint's turns spread evenly), precomputed as one cycle; exact over a
//!   cycle, plain rotation when all weights are equal. The cycle restarts at
//!   a random place when health changes.
//! - `LeastRequest { choice_count }`: `choice_count` random draws (default
//!   2, at most 64; the first two distinct, further ones with replacement, as
//!   Envoy), weighted by endpoint weight, and the draw with the fewest
//!   requests in flight *per unit of weight* wins, ties to the earliest draw. With equal weights that
//!   is exactly Envoy's rule (fewest active requests). With unequal weights
//!   Envoy switches to an EDF schedule over `weight / (active + 1)`, which
//!   needs a locked, mutable scheduler; the weighted draw plus the
//!   `active / weight` comparison gets the same two properties without a
//!   lock: idle endpoints are chosen in proportion to their weights, and
//!   under load an endpoint of weight 3 carries about three times the
//!   requests of one of weight 1.
//! - `Random`: one draw weighted by endpoint weight.
//! - `RingHash`, `Maglev`: consistent hashing of the request hash (see
//!   `ring.rs`, `maglev.rs` and [`request_hash`]); without a hash they pick
//!   like `Random`.
//!
//! Non-goals: slow start, zone-aware routing within a priority, subsetting,
//! degraded endpoints.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::time::Instant;

use crate::config::model::{Cluster, LbPolicy, LoadAssignment};
use crate::health::{ClusterHealth, Host, HostStatus};

mod hash;
pub(crate) mod load;
mod maglev;
pub(crate) mod priority;
mod ring;
mod weighted;

#[cfg(test)]
mod tests;

pub use hash::{request_hash, xxh64, HashOutcome};

use maglev::Maglev;
use priority::{LevelHealth, Plan};
use ring::Ring;
use weighted::{RoundRobin, Weights};

/// Most draws a least-request pick makes.
const MAX_CHOICES: u32 = 64;

/// Envoy's default `healthy_panic_threshold`, for balancers built without a
/// cluster.
pub const DEFAULT_PANIC_THRESHOLD: f64 = 50.0;

/// Picks endpoints of one cluster. `Send + Sync`; share it through `Arc` and
/// replace it with [`Balancer::update`] or [`Balancer::for_cluster`] when
/// the cluster or its endpoints change.
pub struct Balancer {
    core: Arc<Core>,
}

/// The endpoint chosen for one request, and the guard that counts the
/// request as in flight until dropped.
pub struct Pick {
    pub address: SocketAddr,
    host: Arc<Host>,
    /// When it was picked, for the lower bound a request without an
    /// outcome leaves (see `Drop`).
    started: Instant,
    /// Whether `complete` or `failed` recorded a sample.
    sampled: std::sync::atomic::AtomicBool,
}

/// The load of one endpoint, for status pages and `config_dump`.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointLoad {
    pub address: SocketAddr,
    /// Effective weight.
    pub weight: u32,
    /// EDS priority of its locality.
    pub priority: u32,
    pub in_flight: usize,
    /// Current peak-EWMA latency estimate; `None` before the first sample.
    pub rtt_estimate: Option<Duration>,
}

/// A balancer's state for `/clusters`: its priority levels and every
/// endpoint with its load and health.
#[derive(Debug, Clone, Serialize)]
pub struct BalancerStatus {
    pub policy: &'static str,
    /// `healthy_panic_threshold`, percent.
    pub panic_threshold: f64,
    pub priorities: Vec<PriorityStatus>,
    pub endpoints: Vec<EndpointStatus>,
}

/// One priority level as the balancer currently uses it.
#[derive(Debug, Clone, Serialize)]
pub struct PriorityStatus {
    pub priority: u32,
    pub endpoints: usize,
    pub healthy: usize,
    /// Percent of requests sent to this level.
    pub load_percent: u32,
    /// Picks on this level ignore health (too few healthy endpoints).
    pub panic: bool,
}

/// One endpoint for `/clusters`.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointStatus {
    pub address: SocketAddr,
    pub priority: u32,
    pub weight: u32,
    pub in_flight: usize,
    /// Peak-EWMA latency estimate in milliseconds, `null` before a sample.
    pub rtt_estimate_ms: Option<f64>,
    #[serde(flatten)]
    pub health: HostStatus,
}

/// The balancer proper; shared with the cluster's [`ClusterHealth`] (weakly)
/// so health changes can rebuild its tables.
pub(crate) struct Core {
    /// Every endpoint, ordered by priority, then as listed.
    endpoints: Box<[Slot]>,
    /// Distinct priorities with endpoints, ascending, and their slots.
    levels: Box<[LevelSpan]>,
    policy: LbPolicy,
    panic_threshold: f64,
    health: Arc<ClusterHealth>,
    tables: ArcSwap<Tables>,
}

struct Slot {
    weight: u32,
    host: Arc<Host>,
}

struct LevelSpan {
    priority: u32,
    slots: Range<usize>,
}

/// What picks are made from, for one health state. Immutable once built.
#[derive(Default)]
struct Tables {
    /// The levels with load, in priority order.
    levels: Box<[Level]>,
    /// The plan it was built from, per entry of `Core::levels` (status).
    plan: Plan,
    /// Healthy endpoints per entry of `Core::levels` (status).
    healthy: Box<[usize]>,
}

/// One priority level's selection structures over the endpoints in use.
struct Level {
    /// Cumulative load in percent: the level takes draws `r < cumulative`.
    cumulative: u32,
    /// Indices into `Core::endpoints`.
    members: Box<[u32]>,
    weights: Weights,
    algorithm: Algorithm,
}

enum Algorithm {
    PeakEwma,
    RoundRobin(RoundRobin),
    LeastRequest { choices: u32 },
    Random,
    RingHash(Ring),
    Maglev(Maglev),
}

impl Balancer {
    /// A balancer with its own health state: endpoints are healthy unless
    /// EDS says otherwise, panic threshold 50%, no health checking.
    pub fn new(policy: &LbPolicy, endpoints: &LoadAssignment) -> Self {
        let health = ClusterHealth::detached();
        health.sync_endpoints(endpoints);
        Self::build(policy, DEFAULT_PANIC_THRESHOLD, endpoints, &health)
    }

    /// Rebuilds for new endpoints and policy, keeping the load (in flight,
    /// latency estimate) and health of the addresses still present.
    pub fn update(&self, policy: &LbPolicy, endpoints: &LoadAssignment) -> Self {
        let health = Arc::clone(&self.core.health);
        health.sync_endpoints(endpoints);
        Self::build(policy, self.core.panic_threshold, endpoints, &health)
    }

    /// The balancer of `cluster` over `endpoints`, with the cluster's
    /// health state, which [`ClusterHealth::configure`] has already brought
    /// up to date with `endpoints`.
    pub fn for_cluster(
        cluster: &Cluster,
        endpoints: &LoadAssignment,
        health: &Arc<ClusterHealth>,
    ) -> Self {
        Self::build(&cluster.lb, cluster.panic_threshold, endpoints, health)
    }

    /// The health state this balancer follows.
    pub fn health(&self) -> &Arc<ClusterHealth> {
        &self.core.health
    }

    /// No endpoint at all (healthy or not).
    pub fn is_empty(&self) -> bool {
        self.core.endpoints.is_empty()
    }

    /// Number of endpoints, of every priority, healthy or not.
    pub fn len(&self) -> usize {
        self.core.endpoints.len()
    }

    /// Chooses an endpoint; `None` when there is none that may be used (no
    /// endpoint, or none healthy with panic mode off). `hash` is the request
    /// hash for ring hash and maglev (`None`: a weighted random pick); other
    /// algorithms ignore it.
    pub fn pick(&self, hash: Option<u64>) -> Option<Pick> {
        let core = &*self.core;
        let tables = core.tables.load();
        let level = match &tables.levels[..] {
            [] => return None,
            [only] => only,
            levels => {
                let draw = match (hash, core.hashing()) {
                    (Some(h), true) => (h % 100) as u32,
                    _ => fastrand::u32(..100),
                };
                levels
                    .iter()
                    .find(|l| draw < l.cumulative)
                    .or(levels.last())?
            }
        };
        let member = match level.members.len() {
            0 => return None,
            1 => 0,
            _ => core.choose(level, hash)?,
        };
        let slot = core.endpoints.get(*level.members.get(member)? as usize)?;
        slot.host.load.acquire();
        Some(Pick::new(Arc::clone(&slot.host)))
    }

    /// Load of every endpoint.
    pub fn loads(&self) -> Vec<EndpointLoad> {
        let now = Instant::now();
        self.core
            .slots_with_priority()
            .map(|(priority, s)| EndpointLoad {
                address: s.host.address,
                weight: s.weight,
                priority,
                in_flight: s.host.load.in_flight(),
                rtt_estimate: s.host.load.sampled_estimate(now),
            })
            .collect()
    }

    /// Priority levels, loads and health of every endpoint (`/clusters`).
    pub fn status(&self) -> BalancerStatus {
        let core = &*self.core;
        let now = Instant::now();
        let tables = core.tables.load();
        let priorities = core
            .levels
            .iter()
            .enumerate()
            .map(|(i, span)| PriorityStatus {
                priority: span.priority,
                endpoints: span.slots.len(),
                healthy: tables.healthy.get(i).copied().unwrap_or(0),
                load_percent: tables.plan.loads.get(i).copied().unwrap_or(0),
                panic: tables.plan.panic.get(i).copied().unwrap_or(false),
            })
            .collect();
        let endpoints = core
            .slots_with_priority()
            .map(|(priority, s)| EndpointStatus {
                address: s.host.address,
                priority,
                weight: s.weight,
                in_flight: s.host.load.in_flight(),
                rtt_estimate_ms: s
                    .host
                    .load
                    .sampled_estimate(now)
                    .map(|d| d.as_secs_f64() * 1000.0),
                health: s.host.status(now),
            })
            .collect();
        BalancerStatus {
            policy: self.policy_name(),
            panic_threshold: core.panic_threshold,
            priorities,
            endpoints,
        }
    }

    /// Name of the algorithm, as in `LbPolicy`.
    pub fn policy_name(&self) -> &'static str {
        match self.core.policy {
            LbPolicy::PeakEwma => "peak_ewma",
            LbPolicy::RoundRobin => "round_robin",
            LbPolicy::LeastRequest { .. } => "least_request",
            LbPolicy::Random => "random",
            LbPolicy::RingHash { .. } => "ring_hash",
            LbPolicy::Maglev { .. } => "maglev",
        }
    }

    /// Builds the balancer over `assignment`, its endpoints taken from
    /// `health` (one state per address, also when an address is listed
    /// twice), and attaches it to `health`, which builds its first tables.
    fn build(
        policy: &LbPolicy,
        panic_threshold: f64,
        assignment: &LoadAssignment,
        health: &Arc<ClusterHealth>,
    ) -> Self {
        let mut localities: Vec<_> = assignment
            .localities
            .iter()
            .filter(|l| !l.endpoints.is_empty())
            .collect();
        // Stable: within a priority, endpoints stay in the order listed.
        localities.sort_by_key(|l| l.priority);
        let mut hosts: HashMap<SocketAddr, Arc<Host>> = HashMap::new();
        let mut endpoints = Vec::new();
        let mut levels: Vec<LevelSpan> = Vec::new();
        // Indices are stored as u32 in the tables; 4 billion endpoints in
        // one cluster cannot be represented in memory anyway.
        let limit = u32::MAX as usize - 1;
        for locality in localities {
            for e in &locality.endpoints {
                if endpoints.len() >= limit {
                    break;
                }
                let host = hosts
                    .entry(e.address)
                    .or_insert_with(|| health.host(e.address));
                endpoints.push(Slot {
                    weight: e.weight.max(1),
                    host: Arc::clone(host),
                });
                match levels.last_mut() {
                    Some(span) if span.priority == locality.priority => {
                        span.slots.end = endpoints.len();
                    }
                    _ => levels.push(LevelSpan {
                        priority: locality.priority,
                        slots: endpoints.len() - 1..endpoints.len(),
                    }),
                }
            }
        }
        let core = Arc::new(Core {
            endpoints: endpoints.into_boxed_slice(),
            levels: levels.into_boxed_slice(),
            policy: policy.clone(),
            panic_threshold,
            health: Arc::clone(health),
            tables: ArcSwap::from_pointee(Tables::default()),
        });
        health.attach(&core);
        Self { core }
    }
}

impl Core {
    /// Recomputes the selection tables from the endpoints' current health.
    /// Called by [`ClusterHealth`] under its lock, so health cannot change
    /// while the tables are built.
    pub(crate) fn rebuild(&self) {
        let mut counts = Vec::with_capacity(self.levels.len());
        for span in self.levels.iter() {
            let slots = self.endpoints.get(span.slots.clone()).unwrap_or_default();
            counts.push(LevelHealth {
                healthy: slots.iter().filter(|s| s.host.is_healthy()).count(),
                total: slots.len(),
            });
        }
        let plan = priority::plan(&counts, self.panic_threshold);
        let mut levels = Vec::new();
        let mut cumulative = 0u32;
        for ((span, &load), &panic) in self.levels.iter().zip(&plan.loads).zip(&plan.panic) {
            if load == 0 {
                continue;
            }
            // `span.slots` holds indices below the u32 bound set in `build`.
            let members: Vec<u32> = span
                .slots
                .clone()
                .filter(|&i| panic || self.endpoints.get(i).is_some_and(|s| s.host.is_healthy()))
                .map(|i| i as u32)
                .collect();
            if members.is_empty() {
                continue;
            }
            cumulative += load;
            levels.push(self.level(cumulative, members));
        }
        // Rounding never leaves the last level short of 100 (the plan's loads
        // sum to 100), but a level skipped above must not lose its draws.
        if let Some(last) = levels.last_mut() {
            last.cumulative = 100;
        }
        self.tables.store(Arc::new(Tables {
            levels: levels.into_boxed_slice(),
            plan,
            healthy: counts.iter().map(|c| c.healthy).collect(),
        }));
    }

    fn level(&self, cumulative: u32, members: Vec<u32>) -> Level {
        let slot = |i: &u32| self.endpoints.get(*i as usize);
        let weights: Vec<u32> = members
            .iter()
            .map(|i| slot(i).map_or(1, |s| s.weight))
            .collect();
        let keyed = || -> Vec<(SocketAddr, u32)> {
            members
                .iter()
                .filter_map(slot)
                .map(|s| (s.host.address, s.weight))
                .collect()
        };
        let algorithm = match &self.policy {
            LbPolicy::PeakEwma => Algorithm::PeakEwma,
            LbPolicy::RoundRobin => Algorithm::RoundRobin(RoundRobin::new(&weights)),
            LbPolicy::LeastRequest { choice_count } => Algorithm::LeastRequest {
                // 0 is an unset field: Envoy's default, 2. Envoy refuses 1;
                // here it behaves as 2 (the first two draws always happen).
                // Past MAX_CHOICES more draws change nothing measurable but
                // would let one config value make every pick slow.
                choices: if *choice_count == 0 {
                    2
                } else {
                    (*choice_count).min(MAX_CHOICES)
                },
            },
            LbPolicy::Random => Algorithm::Random,
            LbPolicy::RingHash {
                minimum_ring_size,
                maximum_ring_size,
            } => Algorithm::RingHash(Ring::new(&keyed(), *minimum_ring_size, *maximum_ring_size)),
            LbPolicy::Maglev { table_size } => {
                Algorithm::Maglev(Maglev::new(&keyed(), *table_size))
            }
        };
        Level {
            cumulative,
            weights: Weights::new(&weights),
            members: members.into_boxed_slice(),
            algorithm,
        }
    }

    /// The policy hashes requests (the hash also picks the priority level).
    fn hashing(&self) -> bool {
        matches!(
            self.policy,
            LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. }
        )
    }

    fn slots_with_priority(&self) -> impl Iterator<Item = (u32, &Slot)> {
        self.levels.iter().flat_map(move |span| {
            self.endpoints
                .get(span.slots.clone())
                .unwrap_or_default()
                .iter()
                .map(move |s| (span.priority, s))
        })
    }

    /// The slot behind member `i` of `level`.
    fn member(&self, level: &Level, i: usize) -> Option<&Slot> {
        let index = *level.members.get(i)? as usize;
        self.endpoints.get(index)
    }

    /// The member index of the chosen endpoint; requires at least two
    /// members.
    fn choose(&self, level: &Level, hash: Option<u64>) -> Option<usize> {
        match &level.algorithm {
            Algorithm::PeakEwma => {
                let now = Instant::now();
                let (a, b) = level.weights.random_pair();
                let (ca, cb) = match (self.member(level, a), self.member(level, b)) {
                    (Some(x), Some(y)) => x.host.load.costs_against(&y.host.load, now),
                    (Some(_), None) => (0.0, f64::INFINITY),
                    (None, _) => (f64::INFINITY, 0.0),
                };
                Some(if ca <= cb { a } else { b })
            }
            Algorithm::RoundRobin(rr) => Some(rr.next()),
            Algorithm::LeastRequest { choices } => {
                let (a, b) = level.weights.random_pair();
                let mut best = self.less_loaded(level, a, b);
                for _ in 2..*choices {
                    best = self.less_loaded(level, best, level.weights.random());
                }
                Some(best)
            }
            Algorithm::Random => Some(level.weights.random()),
            Algorithm::RingHash(ring) => match hash {
                Some(hash) => ring.get(hash),
                None => Some(level.weights.random()),
            },
            Algorithm::Maglev(table) => match hash {
                Some(hash) => table.get(hash),
                None => Some(level.weights.random()),
            },
        }
    }

    /// Of two members, the one with fewer requests in flight per unit of
    /// weight; `a` on a tie.
    fn less_loaded(&self, level: &Level, a: usize, b: usize) -> usize {
        let load = |i: usize| {
            self.member(level, i).map_or((u128::MAX, 1), |s| {
                (s.host.load.in_flight() as u128, u128::from(s.weight))
            })
        };
        let ((active_a, weight_a), (active_b, weight_b)) = (load(a), load(b));
        // active_a / weight_a <= active_b / weight_b, without division.
        if active_a.saturating_mul(weight_b) <= active_b.saturating_mul(weight_a) {
            a
        } else {
            b
        }
    }
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("policy", &self.policy_name())
            .field("endpoints", &self.core.endpoints.len())
            .finish()
    }
}

/// What became of a request sent to a picked endpoint: the input of passive
/// health checking (outlier detection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response arrived with this status (5xx counts as a failure).
    Status(u16),
    /// No connection could be made (refused, timed out, TLS failed).
    ConnectFailure,
    /// The upstream reset or closed before a complete response.
    Reset,
    /// No response within the (per-try or route) timeout.
    Timeout,
}

impl Outcome {
    /// The HTTP status outlier detection counts this outcome as (Envoy's
    /// mapping of locally originated errors without
    /// `split_external_local_origin_errors`): connect failures and resets
    /// are 503, timeouts 504.
    pub fn status(self) -> u16 {
        match self {
            Outcome::Status(s) => s,
            Outcome::ConnectFailure | Outcome::Reset => 503,
            Outcome::Timeout => 504,
        }
    }
}

impl Pick {
    /// A pick of `host`, whose load was acquired.
    fn new(host: Arc<Host>) -> Pick {
        Pick {
            address: host.address,
            host,
            started: Instant::now(),
            sampled: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Reports how the request ended, for outlier detection. Call once per
    /// attempt, when the outcome is known (response headers or failure).
    /// Lock-free unless the report completes a run of consecutive failures
    /// that ejects the endpoint.
    pub fn report(&self, outcome: Outcome) {
        self.host.report(outcome);
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Records the request's latency (call when the response headers
    /// arrive). Each call is one sample.
    pub fn complete(&self, rtt: Duration) {
        self.sampled
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.host.load.observe(rtt, Instant::now());
    }

    /// Records a failure (connect error, reset, timeout, 5xx as the caller
    /// sees fit): a latency sample of twice the current estimate, at least
    /// one second, which steers peak-EWMA traffic away until it decays.
    pub fn failed(&self) {
        self.sampled
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.host.load.fail(Instant::now());
    }
}

impl Drop for Pick {
    /// A request that ends with no outcome (the client went away, a
    /// deadline hit first) still says something: the endpoint took at least
    /// that long. Recorded when that exceeds the estimate, so an endpoint
    /// that accepts but never answers stops looking fast (an unsampled one
    /// counts as fast as its partner).
    fn drop(&mut self) {
        if !self.sampled.load(std::sync::atomic::Ordering::Relaxed) {
            self.host
                .load
                .observe_at_least(self.started.elapsed(), Instant::now());
        }
        self.host.load.release();
    }
}

impl fmt::Debug for Pick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pick")
            .field("address", &self.address)
            .finish()
    }
}

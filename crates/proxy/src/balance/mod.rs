//! Load balancing: choose an endpoint of a cluster for each request.
//!
//! Purpose: given a cluster's `lb_policy` and its endpoints (EDS), pick the
//! upstream address for one request, and track each endpoint's load
//! (requests in flight, latency) for the load-aware algorithms. No sockets,
//! no health checking: the data path owns connections, this module only
//! decides.
//!
//! Contract:
//! - [`Balancer::new`] precomputes everything an algorithm needs (prefix sums,
//!   round-robin cycle, hash ring, maglev table); [`Balancer::pick`] is then a
//!   few atomics and at most a binary search, without locks or allocation.
//! - A [`Pick`] is a guard: while it lives, the request counts as in flight on
//!   its endpoint; dropping it ends the request. [`Pick::complete`] feeds the
//!   latency estimate, [`Pick::failed`] a penalty.
//! - [`Balancer::update`] builds the balancer for a new endpoint set and policy
//!   and carries over the load of every address still present (in-flight
//!   counts of requests started on the old balancer stay correct, since their
//!   guards point at the same counters).
//! - Endpoint weights (`load_balancing_weight`, 0 treated as 1, as xDS
//!   defaults it) are honoured by every algorithm. A locality's weight is the
//!   sum of its endpoints' weights in meshwork's output, so an endpoint's
//!   weight alone is its effective weight: locality weights are otherwise
//!   ignored (no locality-weighted or zone-aware routing yet).
//! - Priorities: only the lowest-numbered priority that has endpoints is used
//!   (without health information, a priority is "available" when non-empty).
//!
//! Algorithms ([`LbPolicy`]):
//! - `PeakEwma` (meshwork's default): power of two choices. Two distinct
//!   endpoints are drawn at random, weighted by endpoint weight, and the one
//!   with the lower cost `rtt_estimate * (in_flight + 1)` wins (ties go to the
//!   first draw, so an idle cluster follows the weights exactly). The
//!   estimate is a peak-sensitive EWMA with a 10 s time constant, 30 ms before
//!   the first sample (see `load.rs`). Weights decide how often an endpoint is
//!   considered; the cost decides among the two considered, so under load
//!   (with only two endpoints, always) latency and queue length outweigh the
//!   weights.
//! - `RoundRobin`: Envoy's weighted round robin (earliest deadline first, each
//!   endpoint's turns spread evenly), precomputed as one cycle; exact over a
//!   cycle, plain rotation when all weights are equal.
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
//! Non-goals: health checking, outlier ejection, panic thresholds, slow start,
//! zone-aware routing, subsetting; these come with their own modules and
//! feed this one a filtered endpoint set.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::model::{LbPolicy, LoadAssignment};

mod hash;
mod load;
mod maglev;
mod ring;
mod weighted;

#[cfg(test)]
mod tests;

pub use hash::{request_hash, xxh64, HashOutcome};

use load::Load;
use maglev::Maglev;
use ring::Ring;
use weighted::{RoundRobin, Weights};

/// Most draws a least-request pick makes.
const MAX_CHOICES: u32 = 64;

/// Picks endpoints of one cluster. `Send + Sync`; share it through `Arc` and
/// replace it with [`Balancer::update`] when the cluster or its endpoints
/// change.
pub struct Balancer {
    endpoints: Box<[Slot]>,
    weights: Weights,
    algorithm: Algorithm,
}

/// The endpoint chosen for one request, and the guard that counts the
/// request as in flight until dropped.
pub struct Pick {
    pub address: SocketAddr,
    load: Arc<Load>,
}

/// The load of one endpoint, for status pages and `config_dump`.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointLoad {
    pub address: SocketAddr,
    /// Effective weight.
    pub weight: u32,
    pub in_flight: usize,
    /// Current peak-EWMA latency estimate; `None` before the first sample.
    pub rtt_estimate: Option<Duration>,
}

struct Slot {
    address: SocketAddr,
    weight: u32,
    load: Arc<Load>,
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
    pub fn new(policy: &LbPolicy, endpoints: &LoadAssignment) -> Self {
        Self::build(policy, endpoints, |_| None)
    }

    /// Rebuilds for new endpoints and policy, keeping the load (in flight,
    /// latency estimate) of the addresses still present.
    pub fn update(&self, policy: &LbPolicy, endpoints: &LoadAssignment) -> Self {
        let known: HashMap<SocketAddr, &Arc<Load>> = self
            .endpoints
            .iter()
            .map(|s| (s.address, &s.load))
            .collect();
        Self::build(policy, endpoints, |address| {
            known.get(address).map(|&l| Arc::clone(l))
        })
    }

    /// No endpoint to pick.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Number of endpoints picks are made from (those of the priority in use).
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Chooses an endpoint; `None` when there is none. `hash` is the request
    /// hash for ring hash and maglev (`None`: a weighted random pick); other
    /// algorithms ignore it.
    pub fn pick(&self, hash: Option<u64>) -> Option<Pick> {
        let index = match self.endpoints.len() {
            0 => return None,
            1 => 0,
            _ => self.choose(hash)?,
        };
        let slot = self.endpoints.get(index)?;
        slot.load.acquire();
        Some(Pick {
            address: slot.address,
            load: Arc::clone(&slot.load),
        })
    }

    /// Load of every endpoint in use.
    pub fn loads(&self) -> Vec<EndpointLoad> {
        let now = Instant::now();
        self.endpoints
            .iter()
            .map(|s| EndpointLoad {
                address: s.address,
                weight: s.weight,
                in_flight: s.load.in_flight(),
                rtt_estimate: s.load.sampled_estimate(now),
            })
            .collect()
    }

    /// Name of the algorithm, as in `LbPolicy`.
    pub fn policy_name(&self) -> &'static str {
        match self.algorithm {
            Algorithm::PeakEwma => "peak_ewma",
            Algorithm::RoundRobin(_) => "round_robin",
            Algorithm::LeastRequest { .. } => "least_request",
            Algorithm::Random => "random",
            Algorithm::RingHash(_) => "ring_hash",
            Algorithm::Maglev(_) => "maglev",
        }
    }

    /// `reuse` returns the existing load of an address, if any.
    fn build(
        policy: &LbPolicy,
        assignment: &LoadAssignment,
        reuse: impl Fn(&SocketAddr) -> Option<Arc<Load>>,
    ) -> Self {
        let now = Instant::now();
        let priority = assignment
            .localities
            .iter()
            .filter(|l| !l.endpoints.is_empty())
            .map(|l| l.priority)
            .min();
        // One Load per address, also when an address is listed twice.
        let mut loads: HashMap<SocketAddr, Arc<Load>> = HashMap::new();
        let endpoints: Box<[Slot]> = assignment
            .localities
            .iter()
            .filter(|l| Some(l.priority) == priority)
            .flat_map(|l| &l.endpoints)
            // Indices are stored as u32 in the tables; 4 billion endpoints in
            // one cluster cannot be represented in memory anyway.
            .take(u32::MAX as usize - 1)
            .map(|e| Slot {
                address: e.address,
                weight: e.weight.max(1),
                load: Arc::clone(loads.entry(e.address).or_insert_with(|| {
                    reuse(&e.address).unwrap_or_else(|| Arc::new(Load::new(now)))
                })),
            })
            .collect();

        let weights: Vec<u32> = endpoints.iter().map(|s| s.weight).collect();
        let keyed = || -> Vec<(SocketAddr, u32)> {
            endpoints.iter().map(|s| (s.address, s.weight)).collect()
        };
        let algorithm = match policy {
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
            // An empty set has nothing to hash onto (and the ring sizing
            // would divide by a zero total weight).
            LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. } if endpoints.is_empty() => {
                Algorithm::Random
            }
            LbPolicy::RingHash {
                minimum_ring_size,
                maximum_ring_size,
            } => Algorithm::RingHash(Ring::new(&keyed(), *minimum_ring_size, *maximum_ring_size)),
            LbPolicy::Maglev { table_size } => {
                Algorithm::Maglev(Maglev::new(&keyed(), *table_size))
            }
        };
        Self {
            weights: Weights::new(&weights),
            endpoints,
            algorithm,
        }
    }

    /// The index of the chosen endpoint; requires at least two endpoints.
    fn choose(&self, hash: Option<u64>) -> Option<usize> {
        match &self.algorithm {
            Algorithm::PeakEwma => {
                let now = Instant::now();
                let (a, b) = self.weights.random_pair();
                let cost = |i: usize| {
                    self.endpoints
                        .get(i)
                        .map_or(f64::INFINITY, |s| s.load.cost(now))
                };
                Some(if cost(a) <= cost(b) { a } else { b })
            }
            Algorithm::RoundRobin(rr) => Some(rr.next()),
            Algorithm::LeastRequest { choices } => {
                let (a, b) = self.weights.random_pair();
                let mut best = self.less_loaded(a, b);
                for _ in 2..*choices {
                    best = self.less_loaded(best, self.weights.random());
                }
                Some(best)
            }
            Algorithm::Random => Some(self.weights.random()),
            Algorithm::RingHash(ring) => match hash {
                Some(hash) => ring.get(hash),
                None => Some(self.weights.random()),
            },
            Algorithm::Maglev(table) => match hash {
                Some(hash) => table.get(hash),
                None => Some(self.weights.random()),
            },
        }
    }

    /// Of two endpoints, the one with fewer requests in flight per unit of
    /// weight; `a` on a tie.
    fn less_loaded(&self, a: usize, b: usize) -> usize {
        let load = |i: usize| {
            self.endpoints.get(i).map_or((u128::MAX, 1), |s| {
                (s.load.in_flight() as u128, u128::from(s.weight))
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
            .field("endpoints", &self.endpoints.len())
            .finish()
    }
}

impl Pick {
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Records the request's latency (call when the response headers
    /// arrive). Each call is one sample.
    pub fn complete(&self, rtt: Duration) {
        self.load.observe(rtt, Instant::now());
    }

    /// Records a failure (connect error, reset, timeout, 5xx as the caller
    /// sees fit): a latency sample of twice the current estimate, at least
    /// one second, which steers peak-EWMA traffic away until it decays.
    pub fn failed(&self) {
        self.load.fail(Instant::now());
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.load.release();
    }
}

impl fmt::Debug for Pick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pick")
            .field("address", &self.address)
            .finish()
    }
}

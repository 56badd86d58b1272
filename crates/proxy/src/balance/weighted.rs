//! Weighted selection building blocks: weighted random draws and the weighted
//! round-robin schedule.
//!
//! Purpose: give every algorithm the same, allocation-free way to honour
//! endpoint weights.
//!
//! Contract: built from a non-empty list of weights, each at least 1 (the
//! balancer clamps). Draws take `O(log n)` (binary search over prefix sums), or
//! `O(1)` when all weights are equal. The round-robin schedule is precomputed
//! once, so a pick is one atomic increment.
//!
//! Non-goals: changing weights without a rebuild.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Longest round-robin schedule; larger weight sums are scaled down to fit
/// (each endpoint keeps at least one slot). 64 Ki slots of 4 bytes keep a
/// pathological cluster at 256 KiB while keeping ratios exact for any weights
/// people actually write.
const SCHEDULE_LIMIT: u64 = 1 << 16;

/// Prefix sums of the weights.
#[derive(Debug)]
pub(super) struct Weights {
    /// `cumulative[i]` = sum of the weights `0..=i`.
    cumulative: Box<[u64]>,
    /// All weights equal: draws skip the binary search.
    uniform: bool,
}

impl Weights {
    /// `weights` must be non-empty with every weight >= 1.
    pub(super) fn new(weights: &[u32]) -> Self {
        let cumulative = weights
            .iter()
            .scan(0u64, |sum, &w| {
                *sum += u64::from(w);
                Some(*sum)
            })
            .collect();
        let uniform = weights.windows(2).all(|w| w[0] == w[1]);
        Self {
            cumulative,
            uniform,
        }
    }

    fn len(&self) -> usize {
        self.cumulative.len()
    }

    fn total(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// Sum of the weights before `i`.
    fn start(&self, i: usize) -> u64 {
        match i.checked_sub(1) {
            Some(prev) => self.cumulative.get(prev).copied().unwrap_or(0),
            None => 0,
        }
    }

    fn weight(&self, i: usize) -> u64 {
        self.cumulative
            .get(i)
            .copied()
            .unwrap_or(0)
            .saturating_sub(self.start(i))
    }

    /// The endpoint whose weight interval holds `point` (< total).
    fn at(&self, point: u64) -> usize {
        self.cumulative.partition_point(|&c| c <= point)
    }

    /// One index, drawn with probability proportional to its weight.
    /// Requires a non-empty list (checked by the caller).
    pub(super) fn random(&self) -> usize {
        if self.uniform {
            fastrand::usize(..self.len())
        } else {
            self.at(fastrand::u64(..self.total()))
        }
    }

    /// Two distinct indices: the first weighted over all, the second weighted
    /// over the others. Requires at least two entries (checked by the caller).
    pub(super) fn random_pair(&self) -> (usize, usize) {
        let first = self.random();
        if self.uniform {
            // Draw from the n-1 others by skipping over `first`.
            let mut second = fastrand::usize(..self.len() - 1);
            if second >= first {
                second += 1;
            }
            return (first, second);
        }
        let skipped = self.weight(first);
        // total - skipped >= 1: every other entry weighs at least 1.
        let mut point = fastrand::u64(..self.total() - skipped);
        if point >= self.start(first) {
            point += skipped;
        }
        (first, self.at(point))
    }
}

/// Weighted round robin as Envoy does it: an earliest-deadline-first order
/// where an endpoint of weight `w` is due every `1/w`, which spreads each
/// endpoint's turns evenly through the cycle (weights 1:3 give `b a b b`, not
/// `a b b b`). The cycle is computed once; picks walk it with one shared
/// atomic counter, starting at a random place so that proxies restarted
/// together do not all hit the same endpoint first.
#[derive(Debug)]
pub(super) struct RoundRobin {
    /// Endpoint indices in order; empty when all weights are equal (then the
    /// order is simply `0..n`).
    schedule: Box<[u32]>,
    len: usize,
    next: AtomicUsize,
}

impl RoundRobin {
    /// `weights` must be non-empty with every weight >= 1, and shorter than
    /// `u32::MAX` (the balancer caps the endpoint count).
    pub(super) fn new(weights: &[u32]) -> Self {
        let uniform = weights.windows(2).all(|w| w[0] == w[1]);
        let schedule = if uniform {
            Box::default()
        } else {
            edf_schedule(weights)
        };
        Self {
            len: weights.len(),
            schedule,
            next: AtomicUsize::new(fastrand::usize(..)),
        }
    }

    pub(super) fn next(&self) -> usize {
        let turn = self.next.fetch_add(1, Relaxed);
        if self.schedule.is_empty() {
            return turn % self.len.max(1);
        }
        let slot = turn % self.schedule.len();
        self.schedule.get(slot).map_or(0, |&i| i as usize)
    }
}

/// One cycle of the EDF order: endpoint `i` gets exactly `w_i` turns (after
/// dividing the weights by their gcd, and scaling down when the sum exceeds
/// [`SCHEDULE_LIMIT`]), its k-th turn due at `k / w_i`; ties go to the lower
/// index, as Envoy's scheduler breaks ties by insertion order.
fn edf_schedule(weights: &[u32]) -> Box<[u32]> {
    let divisor = weights
        .iter()
        .fold(0u64, |g, &w| gcd(g, u64::from(w)))
        .max(1);
    let mut turns: Vec<u64> = weights.iter().map(|&w| u64::from(w) / divisor).collect();
    let sum: u64 = turns.iter().sum();
    if sum > SCHEDULE_LIMIT {
        for t in &mut turns {
            *t = (*t * SCHEDULE_LIMIT / sum).max(1);
        }
    }
    // (k, w, index): due at k / w.
    let mut due: Vec<(u64, u64, u32)> = Vec::with_capacity(turns.iter().sum::<u64>() as usize);
    for (index, &w) in (0u32..).zip(&turns) {
        due.extend((1..=w).map(|k| (k, w, index)));
    }
    // Compare k1/w1 with k2/w2 exactly as k1*w2 vs k2*w1. No overflow: every
    // w is at most SCHEDULE_LIMIT (2^16), either because the sum already was
    // or after scaling, so the products stay below 2^32.
    due.sort_unstable_by(|a, b| (a.0 * b.1).cmp(&(b.0 * a.1)).then(a.2.cmp(&b.2)));
    due.into_iter().map(|(_, _, index)| index).collect()
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

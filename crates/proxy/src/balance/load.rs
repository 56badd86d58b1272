//! Per-endpoint load: requests in flight and a peak-sensitive EWMA of latency.
//!
//! Purpose: the counters the load-aware balancers (peak EWMA, least request)
//! read on every pick, and that a [`super::Pick`] updates when its request
//! ends.
//!
//! Contract: one [`Load`] per upstream address, shared through `Arc` by every
//! balancer generation that still lists that address, so a config update keeps
//! what was learnt. Every operation is a handful of relaxed atomics: no lock,
//! no allocation. Time is passed in (`tokio::time::Instant`), so tests can
//! drive the clock.
//!
//! The estimator follows linkerd/Finagle's peak EWMA: a sample slower than the
//! current estimate replaces it at once (react to trouble immediately), a
//! faster one is blended in with weight `1 - exp(-elapsed / DECAY)` (recover
//! gradually), and with no new samples the estimate decays towards zero so an
//! endpoint that was once slow is eventually tried again.
//!
//! Non-goals: outlier detection and ejection, latency histograms (metrics
//! live elsewhere).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

/// Time constant of the EWMA decay (linkerd's and Finagle's default).
pub(crate) const DECAY: Duration = Duration::from_secs(10);
/// Estimate of an endpoint that has answered nothing yet (linkerd's default).
pub(crate) const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Smallest latency a failure counts as: a failing endpoint must look worse
/// than any healthy one of ordinary speed.
pub(crate) const FAILURE_RTT: Duration = Duration::from_secs(1);
/// Largest latency a failure counts as, so that repeated failures (each one
/// doubles the estimate) still decay back within a minute or two.
pub(crate) const MAX_FAILURE_RTT: Duration = Duration::from_secs(60);

/// Smallest estimate the balancer weighs (1 µs), in nanoseconds.
const MIN_ESTIMATE_NS: f64 = 1_000.0;

/// `rtt_ns` before the first sample. `u64::MAX` is a NaN bit pattern, which a
/// real estimate (finite, from a `Duration`) can never have.
const NO_SAMPLE: u64 = u64::MAX;

/// Load of one upstream address.
#[derive(Debug)]
pub(crate) struct Load {
    in_flight: AtomicUsize,
    /// `f64` bits of the latency estimate in nanoseconds, as of `stamp_ns`.
    rtt_ns: AtomicU64,
    /// When the estimate was last written, in nanoseconds since `epoch`.
    stamp_ns: AtomicU64,
    epoch: Instant,
}

impl Load {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            rtt_ns: AtomicU64::new(NO_SAMPLE),
            stamp_ns: AtomicU64::new(0),
            epoch: now,
        }
    }

    /// A request starts.
    pub(crate) fn acquire(&self) {
        self.in_flight.fetch_add(1, Relaxed);
    }

    /// A request started by `acquire` ends.
    pub(crate) fn release(&self) {
        // Every release pairs with one acquire (the Pick guard), so this never
        // wraps; `fetch_update` with saturation would cost a CAS loop for a
        // case that cannot happen.
        self.in_flight.fetch_sub(1, Relaxed);
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }

    /// The latency estimate at `now`, in nanoseconds; [`DEFAULT_RTT`] before
    /// the first sample.
    pub(crate) fn estimate_ns(&self, now: Instant) -> f64 {
        let bits = self.rtt_ns.load(Relaxed);
        if bits == NO_SAMPLE {
            return nanos_f64(DEFAULT_RTT);
        }
        let elapsed = self
            .nanos_since_epoch(now)
            .saturating_sub(self.stamp_ns.load(Relaxed));
        f64::from_bits(bits) * decay_factor(elapsed)
    }

    /// The estimate, or `None` before the first sample (for status pages).
    pub(crate) fn sampled_estimate(&self, now: Instant) -> Option<Duration> {
        if self.rtt_ns.load(Relaxed) == NO_SAMPLE {
            return None;
        }
        Some(Duration::from_nanos(self.estimate_ns(now) as u64))
    }

    /// Peak-EWMA cost: expected latency times the queue a new request joins
    /// (the balancer weighs two with [`Load::costs_against`]).
    #[cfg(test)]
    pub(crate) fn cost(&self, now: Instant) -> f64 {
        self.estimate_ns(now) * (self.in_flight() as f64 + 1.0)
    }

    /// The costs of `self` and `other` when one is weighed against the
    /// other (power of two choices). An endpoint with no sample yet counts as
    /// [`DEFAULT_RTT`] or as fast as the other, whichever is faster: else a
    /// lone sequential caller, whose known endpoint answers faster than
    /// 30 ms, would never try a new one (the usual state right after a
    /// rolling restart), and one answer is all it takes to learn it.
    pub(crate) fn costs_against(&self, other: &Load, now: Instant) -> (f64, f64) {
        let default = nanos_f64(DEFAULT_RTT);
        let (mine, theirs) = match (self.sampled_ns(now), other.sampled_ns(now)) {
            (Some(a), Some(b)) => (a, b),
            (None, Some(b)) => (b.min(default), b),
            (Some(a), None) => (a, a.min(default)),
            (None, None) => (default, default),
        };
        // A floor, so that the queue still counts when an estimate has
        // decayed to nothing (hours idle) or came from a zero sample.
        let (mine, theirs) = (mine.max(MIN_ESTIMATE_NS), theirs.max(MIN_ESTIMATE_NS));
        (
            mine * (self.in_flight() as f64 + 1.0),
            theirs * (other.in_flight() as f64 + 1.0),
        )
    }

    /// The estimate in nanoseconds, `None` before the first sample.
    fn sampled_ns(&self, now: Instant) -> Option<f64> {
        (self.rtt_ns.load(Relaxed) != NO_SAMPLE).then(|| self.estimate_ns(now))
    }

    /// A request went `elapsed` without an outcome: the latency is at least
    /// that. Recorded as a sample only when it exceeds the current estimate
    /// ([`DEFAULT_RTT`] before any sample): a short wait (a request refused
    /// locally, a client that gave up at once) says nothing.
    pub(crate) fn observe_at_least(&self, elapsed: Duration, now: Instant) {
        if nanos_f64(elapsed) > self.estimate_ns(now) {
            self.observe(elapsed, now);
        }
    }

    /// Records one latency sample taken at `now`.
    pub(crate) fn observe(&self, rtt: Duration, now: Instant) {
        let sample = nanos_f64(rtt);
        let now_ns = self.nanos_since_epoch(now);
        // Two racing samples: the one with the older clock reading sees zero
        // elapsed time and so only counts if it is a peak. Dropping a sample
        // now and then is harmless; a lock here would not be.
        let previous = self.stamp_ns.fetch_max(now_ns, Relaxed);
        let weight = decay_factor(now_ns.saturating_sub(previous));
        // The closure always returns `Some`, so the update cannot fail.
        let _ = self.rtt_ns.fetch_update(Relaxed, Relaxed, |bits| {
            let next = if bits == NO_SAMPLE {
                sample
            } else {
                let decayed = f64::from_bits(bits) * weight;
                if sample > decayed {
                    sample
                } else {
                    decayed + sample * (1.0 - weight)
                }
            };
            Some(next.to_bits())
        });
    }

    /// Records a failed request as a penalty sample: twice the current
    /// estimate, at least [`FAILURE_RTT`], at most [`MAX_FAILURE_RTT`].
    pub(crate) fn fail(&self, now: Instant) {
        let doubled = self.estimate_ns(now) * 2.0;
        let penalty = doubled.clamp(nanos_f64(FAILURE_RTT), nanos_f64(MAX_FAILURE_RTT));
        self.observe(Duration::from_nanos(penalty as u64), now);
    }

    fn nanos_since_epoch(&self, now: Instant) -> u64 {
        // u64 nanoseconds last 584 years; saturate rather than wrap beyond.
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Weight of the old estimate after `elapsed_ns`.
fn decay_factor(elapsed_ns: u64) -> f64 {
    (-(elapsed_ns as f64) / nanos_f64(DECAY)).exp()
}

fn nanos_f64(d: Duration) -> f64 {
    d.as_nanos() as f64
}

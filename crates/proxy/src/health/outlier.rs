//! Outlier detection (passive health checking): eject endpoints whose
//! requests fail, as Envoy's `outlier_detection` does.
//!
//! Purpose: take an endpoint that fails requests out of rotation for a
//! while, without probing it, and bring it back when its time is served.
//!
//! Contract (Envoy's detector without `split_external_local_origin_errors`):
//! - Every attempt's [`Outcome`] counts, as an HTTP status: connect failures
//!   and resets count as 503, timeouts as 504 (Envoy's mapping of locally
//!   originated errors), anything else as its status. A status below 500 is
//!   a success. An attempt that timed out while still waiting for a
//!   connection (this proxy's queue) is not reported, as Envoy reports
//!   only requests that reached a host.
//! - `consecutive_5xx`: the N-th 5xx in a row ejects (a success resets the
//!   run). `consecutive_gateway_failure`: the N-th 502/503/504 in a row
//!   (any other status resets that run). Both are evaluated as the outcome
//!   is reported, lock-free until a run reaches its threshold; when both
//!   complete at once, the gateway detector goes first (as Envoy's order).
//!   After a detection the detector's run starts over, ejected or not.
//! - Every `interval` a timer task (one per cluster with outlier detection)
//!   first returns endpoints whose ejection time has passed, then evaluates
//!   the interval's requests of endpoints not ejected:
//!   - `success_rate`: among endpoints with at least `request_volume`
//!     requests, when there are at least `minimum_hosts` of them, an endpoint
//!     whose success rate is below `mean - stdev_factor * stdev` (population
//!     standard deviation) is ejected;
//!   - `failure_percentage`: among endpoints with at least `request_volume`
//!     requests, when there are at least `minimum_hosts` of them, an endpoint
//!     whose failure percentage is at least `threshold` is ejected.
//!   - Endpoints that are not ejected and were returned at least one
//!     interval ago get their ejection multiplier decreased by one.
//! - An ejection is allowed only while `100 * (ejected + 1) / endpoints <=
//!   max_ejection_percent` over all endpoints of the cluster (Envoy 1.31+,
//!   without `always_eject_one_host`: with the default 10% a cluster of
//!   fewer than 10 endpoints ejects none), and then happens with probability
//!   `enforcing` percent. It lasts `base_ejection_time * multiplier`, capped
//!   at `max_ejection_time`; the multiplier grows by one per ejection (up to
//!   the cap) and shrinks by one per healthy interval. It ends at the first
//!   interval tick at or after its end time, which also resets the
//!   endpoint's consecutive-failure runs.
//! - Each ejection counts `meshwork_outlier_ejections_total{detector}`
//!   (`consecutive_5xx`, `consecutive_gateway_failure`, `success_rate`,
//!   `failure_percentage`); detections that were not enforced or that
//!   `max_ejection_percent` refused are logged at debug level only.
//! - State lives in the cluster's [`ClusterHealth`], so config updates keep
//!   counters and ejections; removing `outlier_detection` returns every
//!   ejected endpoint at once.
//!
//! Non-goals: `split_external_local_origin_errors` and the local-origin
//! detectors, `max_ejection_time_jitter`, `always_eject_one_host`, outlier
//! event logs.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::{lock, ClusterHealth, Host, State, OUTLIER_EJECTED};
use crate::balance::Outcome;
use crate::config::model::OutlierDetection;
use crate::metrics::Event;

/// Which detector found an outlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detector {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    SuccessRate,
    FailurePercentage,
}

impl Detector {
    /// The `detector` label of `meshwork_outlier_ejections_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Detector::Consecutive5xx => "consecutive_5xx",
            Detector::ConsecutiveGatewayFailure => "consecutive_gateway_failure",
            Detector::SuccessRate => "success_rate",
            Detector::FailurePercentage => "failure_percentage",
        }
    }

    /// Percent chance that a detection ejects (0: the detector is off).
    fn enforcing(self, c: &OutlierDetection) -> u32 {
        match self {
            Detector::Consecutive5xx => c.consecutive_5xx.as_ref().map_or(0, |d| d.enforcing),
            Detector::ConsecutiveGatewayFailure => c
                .consecutive_gateway_failure
                .as_ref()
                .map_or(0, |d| d.enforcing),
            Detector::SuccessRate => c.success_rate.as_ref().map_or(0, |d| d.enforcing),
            Detector::FailurePercentage => c.failure_percentage.as_ref().map_or(0, |d| d.enforcing),
        }
    }
}

/// An endpoint's passive counters. Relaxed atomics: each is a counter on
/// its own, and a race between two outcomes at most shifts a run by one.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Outlier detection is configured (otherwise outcomes are ignored).
    enabled: AtomicBool,
    /// Runs that trigger a detection; 0: the detector is off.
    threshold_5xx: AtomicU32,
    threshold_gateway: AtomicU32,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// This interval's requests: total in the high 32 bits, successes in the
    /// low 32 (one atomic, so the two stay consistent). 4 billion requests
    /// to one endpoint in one interval would carry into the total.
    interval: AtomicU64,
}

/// An endpoint's ejection history.
#[derive(Debug, Default)]
pub(crate) struct Ejection {
    /// Times ejected.
    pub(crate) ejections: u32,
    /// The ejection time multiplier (Envoy's `ejectTimeBackoff`).
    multiplier: u32,
    /// While ejected: when the ejection may end.
    pub(crate) until: Option<Instant>,
    /// When it was last returned to service.
    returned: Option<Instant>,
}

impl Counters {
    /// Follows `config` (`None`: outlier detection off, outcomes ignored and
    /// runs cleared).
    pub(crate) fn configure(&self, config: Option<&OutlierDetection>) {
        let threshold = |d: Option<&crate::config::model::Detector>| d.map_or(0, |d| d.consecutive);
        let (c5xx, gateway) = config.map_or((0, 0), |c| {
            (
                threshold(c.consecutive_5xx.as_ref()),
                threshold(c.consecutive_gateway_failure.as_ref()),
            )
        });
        self.threshold_5xx.store(c5xx, Relaxed);
        self.threshold_gateway.store(gateway, Relaxed);
        self.enabled.store(config.is_some(), Relaxed);
        if config.is_none() {
            self.reset_runs();
            self.interval.store(0, Relaxed);
        }
    }

    /// Counts one outcome; returns the consecutive detectors whose run it
    /// completed, gateway first.
    pub(crate) fn record(&self, outcome: Outcome) -> [Option<Detector>; 2] {
        let mut fired = [None, None];
        if !self.enabled.load(Relaxed) {
            return fired;
        }
        let status = outcome.status();
        if !(500..600).contains(&status) {
            self.interval.fetch_add((1 << 32) | 1, Relaxed);
            self.consecutive_5xx.store(0, Relaxed);
            self.consecutive_gateway.store(0, Relaxed);
            return fired;
        }
        self.interval.fetch_add(1 << 32, Relaxed);
        if matches!(status, 502..=504) {
            let run = self
                .consecutive_gateway
                .fetch_add(1, Relaxed)
                .wrapping_add(1);
            let threshold = self.threshold_gateway.load(Relaxed);
            if threshold != 0 && run == threshold {
                fired[0] = Some(Detector::ConsecutiveGatewayFailure);
            }
        } else {
            self.consecutive_gateway.store(0, Relaxed);
        }
        let run = self.consecutive_5xx.fetch_add(1, Relaxed).wrapping_add(1);
        let threshold = self.threshold_5xx.load(Relaxed);
        if threshold != 0 && run == threshold {
            fired[1] = Some(Detector::Consecutive5xx);
        }
        fired
    }

    /// This interval's `(successes, total)`, starting the next interval.
    fn take_interval(&self) -> (u64, u64) {
        let v = self.interval.swap(0, Relaxed);
        (v & 0xffff_ffff, v >> 32)
    }

    fn reset_run(&self, detector: Detector) {
        match detector {
            Detector::Consecutive5xx => self.consecutive_5xx.store(0, Relaxed),
            Detector::ConsecutiveGatewayFailure => self.consecutive_gateway.store(0, Relaxed),
            Detector::SuccessRate | Detector::FailurePercentage => {}
        }
    }

    fn reset_runs(&self) {
        self.consecutive_5xx.store(0, Relaxed);
        self.consecutive_gateway.store(0, Relaxed);
    }
}

/// The outlier timer of one cluster: every `interval`, until the cluster
/// is gone or the proxy stops. Holds only a `Weak` of the cluster.
pub(crate) async fn run(cluster: Weak<ClusterHealth>, interval: Duration, env: Arc<super::Env>) {
    // Envoy requires interval > 0; a zero one must not spin.
    let interval = interval.max(Duration::from_millis(1));
    let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = env.stopped() => return,
        }
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        cluster.outlier_tick(Instant::now());
    }
}

impl ClusterHealth {
    /// A consecutive detector completed a run on `host`.
    pub(crate) fn on_consecutive(&self, host: &Host, detector: Detector) {
        let mut state = lock(&self.state);
        let Some(config) = state.outlier.clone() else {
            return;
        };
        // A removed endpoint, or one already ejected: nothing to do (and the
        // run is not reset, as Envoy).
        if !state.is_current(host) || host.is_ejected() {
            return;
        }
        let ejected = self.try_eject(&state, host, detector, &config, Instant::now());
        host.passive.reset_run(detector);
        if ejected {
            Self::rebuild(&mut state);
        }
    }

    /// One outlier interval: returns endpoints whose ejection has run out,
    /// runs the interval detectors, decays ejection multipliers.
    pub(crate) fn outlier_tick(&self, now: Instant) {
        let mut state = lock(&self.state);
        let Some(config) = state.outlier.clone() else {
            return;
        };
        let mut changed = false;
        for host in state.hosts.values() {
            let expired = host.is_ejected() && lock(&host.ejection).until.is_none_or(|u| u <= now);
            if expired {
                self.uneject(host, now);
                changed = true;
            }
        }
        // Every endpoint starts a new interval, ejected or not.
        let samples: Vec<(Arc<Host>, u64, u64)> = state
            .hosts
            .values()
            .map(|h| {
                let (ok, total) = h.passive.take_interval();
                (Arc::clone(h), ok, total)
            })
            .collect();
        changed |= self.interval_detectors(&state, &config, &samples, now);
        for host in state.hosts.values() {
            if host.is_ejected() {
                continue;
            }
            let mut e = lock(&host.ejection);
            let healthy_for_an_interval = e
                .returned
                .is_some_and(|r| now.saturating_duration_since(r) >= config.interval);
            if healthy_for_an_interval {
                e.multiplier = e.multiplier.saturating_sub(1);
            }
        }
        if changed {
            Self::rebuild(&mut state);
        }
    }

    /// Success rate and failure percentage over the interval's `samples`
    /// (`(host, successes, total)`); returns whether anything was ejected.
    fn interval_detectors(
        &self,
        state: &State,
        config: &OutlierDetection,
        samples: &[(Arc<Host>, u64, u64)],
        now: Instant,
    ) -> bool {
        let sr = config.success_rate.as_ref();
        let fp = config.failure_percentage.as_ref();
        let min_hosts = |m: Option<u32>| m.map_or(usize::MAX, |m| m as usize);
        let sr_min_hosts = min_hosts(sr.map(|s| s.minimum_hosts));
        let fp_min_hosts = min_hosts(fp.map(|f| f.minimum_hosts));
        if state.hosts.len() < sr_min_hosts && state.hosts.len() < fp_min_hosts {
            return false;
        }
        let mut sr_hosts = Vec::new();
        let mut fp_hosts = Vec::new();
        for (host, ok, total) in samples {
            if host.is_ejected() || *total == 0 {
                continue;
            }
            let rate = *ok as f64 * 100.0 / *total as f64;
            if sr.is_some_and(|s| *total >= u64::from(s.request_volume)) {
                sr_hosts.push((host, rate));
            }
            if fp.is_some_and(|f| *total >= u64::from(f.request_volume)) {
                fp_hosts.push((host, rate));
            }
        }
        let mut ejected = false;
        if let Some(sr) = sr {
            if !sr_hosts.is_empty() && sr_hosts.len() >= sr_min_hosts {
                let threshold = success_rate_threshold(&sr_hosts, sr.stdev_factor);
                for (host, rate) in &sr_hosts {
                    if *rate < threshold && !host.is_ejected() {
                        tracing::debug!(cluster = %self.name, endpoint = %host.address, success_rate = rate, threshold, "success rate outlier");
                        ejected |= self.try_eject(state, host, Detector::SuccessRate, config, now);
                    }
                }
            }
        }
        if let Some(fp) = fp {
            if !fp_hosts.is_empty() && fp_hosts.len() >= fp_min_hosts {
                for (host, rate) in &fp_hosts {
                    if 100.0 - *rate >= f64::from(fp.threshold) && !host.is_ejected() {
                        tracing::debug!(cluster = %self.name, endpoint = %host.address, failure_percentage = 100.0 - rate, "failure percentage outlier");
                        ejected |=
                            self.try_eject(state, host, Detector::FailurePercentage, config, now);
                    }
                }
            }
        }
        ejected
    }

    /// Ejects `host` if `max_ejection_percent` allows and the detector's
    /// enforcing percentage draws it; returns whether it was ejected.
    fn try_eject(
        &self,
        state: &State,
        host: &Host,
        detector: Detector,
        config: &OutlierDetection,
        now: Instant,
    ) -> bool {
        let total = state.hosts.len();
        if total == 0 {
            return false;
        }
        let active = state.hosts.values().filter(|h| h.is_ejected()).count();
        let max_percent = f64::from(config.max_ejection_percent.min(100));
        let percent_after = 100.0 * (active + 1) as f64 / total as f64;
        if percent_after > max_percent {
            tracing::debug!(
                cluster = %self.name,
                endpoint = %host.address,
                detector = detector.label(),
                ejected = active,
                endpoints = total,
                max_ejection_percent = config.max_ejection_percent,
                "outlier not ejected: max_ejection_percent reached"
            );
            return false;
        }
        if fastrand::u32(..100) >= detector.enforcing(config) {
            tracing::debug!(cluster = %self.name, endpoint = %host.address, detector = detector.label(), "outlier detected, not enforced this time");
            return false;
        }
        let duration = {
            let mut e = lock(&host.ejection);
            e.ejections = e.ejections.saturating_add(1);
            let base = config.base_ejection_time;
            // Envoy grows the multiplier while it does not pass the cap by
            // more than one base time, so it can shrink back from the cap.
            if base.saturating_mul(e.multiplier) < config.max_ejection_time.saturating_add(base) {
                e.multiplier = e.multiplier.saturating_add(1);
            }
            let duration = base
                .saturating_mul(e.multiplier)
                .min(config.max_ejection_time);
            e.until = Some(now + duration);
            duration
        };
        host.set_flag(OUTLIER_EJECTED, true);
        if let Some(env) = &state.env {
            env.metrics()
                .event(Event::Ejection, &state.destination, detector.label())
                .inc();
        }
        tracing::info!(
            cluster = %self.name,
            endpoint = %host.address,
            detector = detector.label(),
            seconds = duration.as_secs_f64(),
            "outlier detection ejected an endpoint"
        );
        true
    }

    /// Returns `host` to service; call under the cluster lock.
    pub(crate) fn uneject(&self, host: &Host, now: Instant) {
        {
            let mut e = lock(&host.ejection);
            e.until = None;
            e.returned = Some(now);
        }
        host.set_flag(OUTLIER_EJECTED, false);
        host.passive.reset_runs();
        tracing::info!(cluster = %self.name, endpoint = %host.address, "outlier ejection over: endpoint back in rotation");
    }
}

/// `mean - factor * stdev` of the success rates (population stdev).
fn success_rate_threshold(rates: &[(&Arc<Host>, f64)], factor: f64) -> f64 {
    let n = rates.len() as f64;
    let mean = rates.iter().map(|(_, r)| r).sum::<f64>() / n;
    let variance = rates.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
    mean - factor * variance.sqrt()
}

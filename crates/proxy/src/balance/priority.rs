//! Priority load and panic mode, as Envoy computes them.
//!
//! Purpose: decide, from how many endpoints of each priority level are
//! healthy, what share of requests each level gets and which levels are in
//! panic (picks there ignore health). Pure arithmetic, no I/O; the balancer
//! calls it whenever endpoint health changes.
//!
//! Contract (Envoy's `LoadBalancerBase`, integer percents throughout):
//! - a level's *health* is `min(100, 140 * healthy / total)` (overprovisioning
//!   factor 1.4, host counts, not weights, as Envoy without
//!   `weighted_priority_health`);
//! - *normalized total availability* is `min(100, sum of health)`;
//! - level `i` gets `min(remaining, health_i * 100 / normalized)` percent, in
//!   priority order; rounding leftovers go to the first level with health;
//! - when normalized availability is 100, no level panics; below that, a
//!   level panics when its healthy share (`100 * healthy / total`) is below
//!   the panic threshold (rounded to a whole percent; 0 disables panic);
//! - when every level panics (*total panic*), load follows host counts:
//!   `100 * total_i / all hosts`, leftovers to the first non-empty level;
//! - with panic disabled and no healthy host at all, no level gets load: the
//!   cluster has nothing to pick ("no healthy upstream").
//!
//! Non-goals: degraded hosts (meshwork has none), excluded hosts, per-level
//! panic thresholds, `weighted_priority_health`.

/// Envoy's default overprovisioning factor, in percent.
pub(crate) const OVERPROVISIONING: u64 = 140;

/// Endpoint counts of one priority level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LevelHealth {
    pub(crate) healthy: usize,
    pub(crate) total: usize,
}

/// What the balancer does with each level, in the order given.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Plan {
    /// Percent of requests per level; sums to 100, or is all zero when no
    /// endpoint may be picked.
    pub(crate) loads: Vec<u32>,
    /// Level in panic: its picks use all of its endpoints, healthy or not.
    pub(crate) panic: Vec<bool>,
}

/// The priority loads and panic flags for `levels` (ordered by priority)
/// under `panic_threshold` percent.
pub(crate) fn plan(levels: &[LevelHealth], panic_threshold: f64) -> Plan {
    let n = levels.len();
    let health: Vec<u32> = levels.iter().map(|l| level_health(*l)).collect();
    // At most 100 per level, so the sum only overflows past 40 million levels.
    let normalized = health
        .iter()
        .fold(0u32, |s, &h| s.saturating_add(h))
        .min(100);
    let threshold = rounded_threshold(panic_threshold);
    let mut plan = Plan {
        loads: vec![0; n],
        panic: vec![false; n],
    };
    if normalized == 0 && threshold == 0 {
        return plan;
    }
    // Nothing healthy (normalized 0): no load here; panic decides below.
    let mut remaining = 100u32;
    let mut first_available = None;
    for (i, (&h, load)) in health.iter().zip(plan.loads.iter_mut()).enumerate() {
        if first_available.is_none() && h > 0 {
            first_available = Some(i);
        }
        *load = (h * 100)
            .checked_div(normalized)
            .unwrap_or(0)
            .min(remaining);
        remaining -= *load;
    }
    if let Some(load) = first_available.and_then(|i| plan.loads.get_mut(i)) {
        *load += remaining;
    }
    if normalized < 100 {
        for (level, panic) in levels.iter().zip(plan.panic.iter_mut()) {
            *panic = healthy_percent(*level) < f64::from(threshold);
        }
        if n > 0 && plan.panic.iter().all(|&p| p) {
            plan.loads = loads_by_host_count(levels);
        }
    }
    plan
}

/// `min(100, 140 * healthy / total)`, 0 for an empty level.
fn level_health(l: LevelHealth) -> u32 {
    if l.total == 0 {
        return 0;
    }
    let h = OVERPROVISIONING.saturating_mul(l.healthy as u64) / l.total as u64;
    h.min(100) as u32
}

fn healthy_percent(l: LevelHealth) -> f64 {
    if l.total == 0 {
        0.0
    } else {
        100.0 * l.healthy as f64 / l.total as f64
    }
}

/// Envoy rounds `healthy_panic_threshold` to a whole percent in 0..=100.
fn rounded_threshold(t: f64) -> u32 {
    if t.is_nan() {
        return 0;
    }
    t.clamp(0.0, 100.0).round() as u32
}

/// Total panic: load in proportion to each level's number of endpoints.
fn loads_by_host_count(levels: &[LevelHealth]) -> Vec<u32> {
    let all: usize = levels.iter().map(|l| l.total).sum();
    let mut loads = vec![0u32; levels.len()];
    if all == 0 {
        return loads;
    }
    let mut remaining = 100u32;
    for (l, load) in levels.iter().zip(loads.iter_mut()) {
        *load = (100 * l.total / all) as u32;
        remaining = remaining.saturating_sub(*load);
    }
    if let Some(i) = levels.iter().position(|l| l.total > 0) {
        if let Some(load) = loads.get_mut(i) {
            *load += remaining;
        }
    }
    loads
}

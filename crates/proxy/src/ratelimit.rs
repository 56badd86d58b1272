//! Local rate limiting: the token buckets of
//! `envoy.filters.http.local_ratelimit`.
//!
//! Purpose: a service (inbound side) or a route (outbound side) accepts at
//! most a configured rate of requests from this proxy; the rest are
//! answered locally (429 by default) before they cost the destination
//! anything.
//!
//! Contract:
//! - Which limit applies ([`effective`]): the route's override
//!   (`typed_per_filter_config`) when the connection manager has the filter,
//!   else the connection manager's own bucket; none when the filter is
//!   absent (route overrides alone do nothing, as in Envoy).
//! - Buckets refill continuously, as Envoy's (atomic) token bucket does:
//!   `tokens_per_fill` every `fill_interval`, spread evenly, up to
//!   `max_tokens`; a new bucket starts full; each request takes one token.
//!   Arithmetic is exact (integers), so a bucket refilled for exactly one
//!   interval has exactly `tokens_per_fill` more tokens.
//! - Buckets live in a [`Registry`] owned by the proxy, keyed by the
//!   connection manager, the route (for overrides) and the bucket's
//!   parameters: a config update that leaves a limit unchanged keeps its
//!   bucket (Envoy starts a fresh one), a changed limit starts full.
//! - Per-source limits keep one bucket per caller: the peer's SPIFFE id on
//!   mTLS connections, else the client IP (Envoy keys by the remote address
//!   only). Per limit at most [`MAX_SOURCES`] callers are tracked; beyond
//!   that, full buckets are forgotten first (a full bucket is the same as a
//!   new one), then the least recently used.
//! - Time comes from `tokio::time`, so tests pause and advance it.
//!
//! Non-goals: global (rate limit service) limits, shadow or partial
//! enforcement (the decoder refuses them), per-connection buckets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use tokio::time::Instant;

use crate::config::model::{HttpConnectionManager, LocalRateLimit, Route, VirtualHost};

/// Callers tracked per per-source limit.
pub const MAX_SOURCES: usize = 4096;
/// Limits (bucket sets) tracked in all; beyond that, idle ones are dropped.
const MAX_LIMITS: usize = 1024;

pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// The draft-03 response headers of one decision.
pub type Headers = [(HeaderName, HeaderValue); 3];

/// Which bucket refused (or admitted) a request: the `scope` label of
/// `meshwork_rate_limited_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The connection manager's bucket (a Service's limit, inbound).
    Listener,
    /// A route's own bucket (an HTTPRoute's limit, outbound).
    Route,
    /// One caller's bucket of a per-source limit (either level).
    Source,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Listener => "listener",
            Scope::Route => "route",
            Scope::Source => "source",
        }
    }
}

/// The limit that applies to one request.
#[derive(Debug, Clone, Copy)]
pub struct Applicable<'a> {
    pub limit: &'a LocalRateLimit,
    /// From the route's `typed_per_filter_config`.
    pub route_override: bool,
}

impl Applicable<'_> {
    pub fn scope(&self) -> Scope {
        if self.limit.per_source {
            Scope::Source
        } else if self.route_override {
            Scope::Route
        } else {
            Scope::Listener
        }
    }
}

/// The limit for a request on `hcm` that matched `route` (`None`: no route
/// matched, and only the connection manager's bucket can apply, as the
/// filter runs before the router in Envoy). `None` when nothing limits it.
pub fn effective<'a>(
    hcm: &'a HttpConnectionManager,
    route: Option<&'a Route>,
) -> Option<Applicable<'a>> {
    let listener = hcm.rate_limit.as_deref()?;
    let (limit, route_override) = match route.and_then(|r| r.rate_limit.as_deref()) {
        Some(l) => (l, true),
        None => (listener, false),
    };
    // A zero interval: the connection manager's filter has no bucket.
    (!limit.fill_interval.is_zero()).then_some(Applicable {
        limit,
        route_override,
    })
}

/// The outcome of taking a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `max_tokens` of the bucket (`x-ratelimit-limit`).
    pub limit: u32,
    /// Whole tokens left after this request (`x-ratelimit-remaining`).
    pub remaining: u32,
    /// Until the bucket holds a whole token again (zero if it does).
    pub next_token: Duration,
}

impl Decision {
    /// `x-ratelimit-reset`: seconds until the next token, rounded up (0 when
    /// a token is there). Envoy truncates; rounding up never invites a
    /// client back too early.
    pub fn reset_seconds(&self) -> u64 {
        ceil_seconds(self.next_token)
    }

    /// `retry-after`: seconds until the next token, rounded up, at least 1
    /// (as Envoy's `enable_retry_after_header`).
    pub fn retry_after_seconds(&self) -> u64 {
        ceil_seconds(self.next_token).max(1)
    }

    /// The draft-03 headers (`x-ratelimit-limit`, `-remaining`, `-reset`).
    pub fn headers(&self) -> Headers {
        [
            (X_RATELIMIT_LIMIT, HeaderValue::from(self.limit)),
            (X_RATELIMIT_REMAINING, HeaderValue::from(self.remaining)),
            (X_RATELIMIT_RESET, HeaderValue::from(self.reset_seconds())),
        ]
    }
}

fn ceil_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Where a request came from and where it was routed: what identifies the
/// bucket it draws from.
#[derive(Debug, Clone, Copy)]
pub struct Site<'a> {
    pub hcm: &'a HttpConnectionManager,
    /// The matched virtual host and route (for route overrides).
    pub route: Option<(&'a VirtualHost, &'a Route)>,
    /// The caller: SPIFFE id on mTLS, else the client IP (per-source limits).
    pub source: &'a str,
}

/// Every bucket of the proxy. Cheap to share; one short lock per request.
#[derive(Debug, Default)]
pub struct Registry {
    limits: Mutex<HashMap<LimitKey, Limit>>,
}

/// Identity of one configured limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LimitKey {
    /// The connection manager: `stat_prefix` and route configuration name.
    manager: (String, String),
    /// The route of an override: virtual host and route name (with the
    /// route's index when it has no name); empty for the manager's bucket.
    route: (String, String),
    stat_prefix: String,
    max_tokens: u32,
    tokens_per_fill: u32,
    fill_interval: Duration,
    per_source: bool,
}

#[derive(Debug)]
struct Limit {
    /// The bucket of a limit that is not per source.
    shared: Option<Bucket>,
    /// Per-source buckets by caller.
    sources: HashMap<Arc<str>, Bucket>,
    last_used: Instant,
}

impl Registry {
    /// Takes a token for a request subject to `applicable` at `site`.
    pub fn check(&self, applicable: Applicable<'_>, site: Site<'_>) -> Decision {
        let limit = applicable.limit;
        let key = LimitKey {
            manager: (
                site.hcm.stat_prefix.clone(),
                site.hcm.route_config_name.clone(),
            ),
            route: match (applicable.route_override, site.route) {
                (true, Some((vh, route))) => (vh.name.clone(), route_id(vh, route)),
                _ => (String::new(), String::new()),
            },
            stat_prefix: limit.stat_prefix.clone(),
            max_tokens: limit.max_tokens,
            tokens_per_fill: limit.tokens_per_fill,
            fill_interval: limit.fill_interval,
            per_source: limit.per_source,
        };
        let params = Params::of(limit);
        let now = Instant::now();
        let mut limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        if !limits.contains_key(&key) && limits.len() >= MAX_LIMITS {
            evict_limits(&mut limits, now);
        }
        let entry = limits.entry(key).or_insert_with(|| Limit {
            shared: None,
            sources: HashMap::new(),
            last_used: now,
        });
        entry.last_used = now;
        if !limit.per_source {
            return entry
                .shared
                .get_or_insert_with(|| Bucket::full(&params, now))
                .take(&params, now);
        }
        if let Some(bucket) = entry.sources.get_mut(site.source) {
            return bucket.take(&params, now);
        }
        if entry.sources.len() >= MAX_SOURCES {
            evict_sources(&mut entry.sources, &params, now);
        }
        let mut bucket = Bucket::full(&params, now);
        let decision = bucket.take(&params, now);
        entry.sources.insert(Arc::from(site.source), bucket);
        decision
    }

    /// Buckets tracked (tests, admin).
    pub fn len(&self) -> usize {
        let limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        limits
            .values()
            .map(|l| l.sources.len() + usize::from(l.shared.is_some()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A route's identity inside its virtual host: its name, or its position
/// when unnamed (so unnamed routes do not share a bucket).
fn route_id(vh: &VirtualHost, route: &Route) -> String {
    if !route.name.is_empty() {
        return route.name.clone();
    }
    let index = vh
        .routes
        .iter()
        .position(|r| std::ptr::eq(r, route))
        .unwrap_or(usize::MAX);
    format!("#{index}")
}

/// Makes room among the limits: drops those whose buckets are all full,
/// else the least recently used one.
fn evict_limits(limits: &mut HashMap<LimitKey, Limit>, now: Instant) {
    let before = limits.len();
    limits.retain(|key, l| {
        let params = Params {
            max_tokens: key.max_tokens,
            tokens_per_fill: key.tokens_per_fill,
            fill_interval: key.fill_interval,
        };
        let full = |b: &Bucket| b.is_full(&params, now);
        !(l.shared.iter().all(full) && l.sources.values().all(full))
    });
    if limits.len() < before {
        return;
    }
    if let Some(oldest) = limits
        .iter()
        .min_by_key(|(_, l)| l.last_used)
        .map(|(k, _)| k.clone())
    {
        limits.remove(&oldest);
    }
}

/// Makes room among one limit's callers: forgets full buckets (they are
/// the same as new ones), else the least recently used caller.
fn evict_sources(sources: &mut HashMap<Arc<str>, Bucket>, params: &Params, now: Instant) {
    let before = sources.len();
    sources.retain(|_, b| !b.is_full(params, now));
    if sources.len() < before {
        return;
    }
    if let Some(oldest) = sources
        .iter()
        .min_by_key(|(_, b)| b.last)
        .map(|(k, _)| k.clone())
    {
        sources.remove(&oldest);
    }
}

/// A bucket's parameters.
#[derive(Debug, Clone, Copy)]
struct Params {
    max_tokens: u32,
    tokens_per_fill: u32,
    fill_interval: Duration,
}

impl Params {
    fn of(l: &LocalRateLimit) -> Self {
        Params {
            max_tokens: l.max_tokens,
            tokens_per_fill: l.tokens_per_fill,
            fill_interval: l.fill_interval,
        }
    }

    /// One token, in bucket units (nanoseconds of the fill interval: a
    /// bucket gains `tokens_per_fill` units per nanosecond).
    fn unit(&self) -> u128 {
        self.fill_interval.as_nanos().max(1)
    }

    fn capacity(&self) -> u128 {
        u128::from(self.max_tokens).saturating_mul(self.unit())
    }
}

/// Tokens in exact units (see [`Params::unit`]) as of `last`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    units: u128,
    last: Instant,
}

impl Bucket {
    fn full(p: &Params, now: Instant) -> Self {
        Bucket {
            units: p.capacity(),
            last: now,
        }
    }

    fn refill(&mut self, p: &Params, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        let gained = elapsed.saturating_mul(u128::from(p.tokens_per_fill));
        self.units = self.units.saturating_add(gained).min(p.capacity());
        self.last = now;
    }

    fn is_full(&self, p: &Params, now: Instant) -> bool {
        let mut b = *self;
        b.refill(p, now);
        b.units >= p.capacity()
    }

    fn take(&mut self, p: &Params, now: Instant) -> Decision {
        self.refill(p, now);
        let unit = p.unit();
        let allowed = self.units >= unit;
        if allowed {
            self.units -= unit;
        }
        let next_token = if self.units >= unit {
            Duration::ZERO
        } else {
            // Nanoseconds until `unit - units` more units, rounded up.
            let missing = unit - self.units;
            let per_ns = u128::from(p.tokens_per_fill.max(1));
            let ns = missing.div_ceil(per_ns);
            Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
        };
        Decision {
            allowed,
            limit: p.max_tokens,
            remaining: u32::try_from(self.units / unit).unwrap_or(u32::MAX),
            next_token,
        }
    }
}

/// The body of a refusal: which limit, and what to change.
pub fn refusal_message(
    applicable: Applicable<'_>,
    destination: &str,
    route: &str,
    source: &str,
    decision: &Decision,
) -> String {
    let l = applicable.limit;
    let whom = match (applicable.route_override, l.per_source) {
        (false, false) => format!("{destination} accepts"),
        (false, true) => format!("{destination} accepts from each caller ({source})"),
        (true, false) => format!("route {route} accepts"),
        (true, true) => format!("route {route} accepts from each caller ({source})"),
    };
    let target = if applicable.route_override {
        "the HTTPRoute"
    } else {
        "the Service"
    };
    format!(
        "rate limited: {whom} {} requests per {:?} (burst {}); retry in {}s, or raise spec.rateLimit of the TrafficPolicy that targets {target}",
        l.tokens_per_fill,
        l.fill_interval,
        l.max_tokens,
        decision.retry_after_seconds(),
    )
}

#[cfg(test)]
mod tests;

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::config::model::{PathMatch, RouteAction, RouteMatch};

fn limit(max_tokens: u32, tokens_per_fill: u32, fill_interval: Duration) -> LocalRateLimit {
    LocalRateLimit {
        stat_prefix: "http_local_rate_limiter".into(),
        max_tokens,
        tokens_per_fill,
        fill_interval,
        status: 429,
        retry_after: true,
        rate_limit_headers: true,
        response_headers: Vec::new(),
        per_source: false,
    }
}

fn hcm(rate_limit: Option<LocalRateLimit>) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: "inbound_8080".into(),
        route_config_name: "inbound|8080".into(),
        inline_routes: None,
        stream_idle_timeout: None,
        request_timeout: None,
        idle_timeout: None,
        websocket: false,
        authz: None,
        rate_limit: rate_limit.map(Arc::new),
        fault: None,
    }
}

fn route(name: &str, rate_limit: Option<LocalRateLimit>) -> Route {
    Route {
        name: name.into(),
        matcher: RouteMatch {
            path: PathMatch::Prefix("/".into()),
            headers: vec![],
            query: vec![],
            pseudo_headers: vec![],
        },
        action: RouteAction::Direct {
            status: 200,
            body: String::new(),
        },
        request_headers: Default::default(),
        response_headers: Default::default(),
        rate_limit: rate_limit.map(Arc::new),
        fault: None,
    }
}

fn vhost(routes: Vec<Route>) -> VirtualHost {
    VirtualHost {
        name: "web.default:80".into(),
        domains: vec!["*".into()],
        routes,
        request_headers: Default::default(),
        response_headers: Default::default(),
    }
}

/// Takes a token for a request from `source` matching `vh.routes[route]`
/// (or no route).
fn take(
    r: &Registry,
    hcm: &HttpConnectionManager,
    vh: &VirtualHost,
    route: Option<usize>,
    source: &str,
) -> Decision {
    let selected = route.map(|i| (vh, &vh.routes[i]));
    let applicable = effective(hcm, selected.map(|(_, r)| r)).expect("a limit applies");
    r.check(
        applicable,
        Site {
            hcm,
            route: selected,
            source,
        },
    )
}

fn allowed_of(r: &Registry, hcm: &HttpConnectionManager, vh: &VirtualHost, n: usize) -> usize {
    (0..n)
        .filter(|_| take(r, hcm, vh, None, "").allowed)
        .count()
}

#[tokio::test(start_paused = true)]
async fn burst_then_refusal_with_retry_after() {
    let r = Registry::default();
    let h = hcm(Some(limit(3, 1, Duration::from_secs(1))));
    let vh = vhost(vec![]);
    let remaining: Vec<(bool, u32)> = (0..4)
        .map(|_| take(&r, &h, &vh, None, ""))
        .map(|d| (d.allowed, d.remaining))
        .collect();
    assert_eq!(remaining, vec![(true, 2), (true, 1), (true, 0), (false, 0)]);
    let refused = take(&r, &h, &vh, None, "");
    assert!(!refused.allowed);
    assert_eq!(refused.limit, 3);
    assert_eq!(refused.next_token, Duration::from_secs(1));
    assert_eq!(refused.retry_after_seconds(), 1);
    assert_eq!(refused.reset_seconds(), 1);
    let [(n1, v1), (n2, v2), (n3, v3)] = refused.headers();
    assert_eq!(
        (n1.as_str(), v1.to_str().unwrap()),
        ("x-ratelimit-limit", "3")
    );
    assert_eq!(
        (n2.as_str(), v2.to_str().unwrap()),
        ("x-ratelimit-remaining", "0")
    );
    assert_eq!(
        (n3.as_str(), v3.to_str().unwrap()),
        ("x-ratelimit-reset", "1")
    );
}

#[tokio::test(start_paused = true)]
async fn refill_is_continuous_and_exact() {
    let r = Registry::default();
    // 10 per second: one token every 100 ms.
    let h = hcm(Some(limit(10, 10, Duration::from_secs(1))));
    let vh = vhost(vec![]);
    assert_eq!(allowed_of(&r, &h, &vh, 15), 10);
    tokio::time::advance(Duration::from_millis(99)).await;
    let d = take(&r, &h, &vh, None, "");
    assert!(!d.allowed);
    assert_eq!(d.next_token, Duration::from_millis(1));
    // Rounded up, at least one second.
    assert_eq!(d.retry_after_seconds(), 1);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(take(&r, &h, &vh, None, "").allowed);
    assert!(!take(&r, &h, &vh, None, "").allowed);
    // Exactly one fill interval: exactly tokens_per_fill more.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(allowed_of(&r, &h, &vh, 20), 10);
}

#[tokio::test(start_paused = true)]
async fn idle_buckets_cap_at_the_burst() {
    let r = Registry::default();
    let h = hcm(Some(limit(5, 1, Duration::from_millis(100))));
    let vh = vhost(vec![]);
    assert_eq!(allowed_of(&r, &h, &vh, 5), 5);
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_eq!(allowed_of(&r, &h, &vh, 100), 5);
}

#[tokio::test(start_paused = true)]
async fn retry_after_rounds_up_to_whole_seconds() {
    let r = Registry::default();
    // One token every 2.5 s.
    let h = hcm(Some(limit(1, 1, Duration::from_millis(2500))));
    let vh = vhost(vec![]);
    let first = take(&r, &h, &vh, None, "");
    assert!(first.allowed);
    // The allowed response already says when the next token comes.
    assert_eq!(first.reset_seconds(), 3);
    let d = take(&r, &h, &vh, None, "");
    assert!(!d.allowed);
    assert_eq!(d.retry_after_seconds(), 3);
    tokio::time::advance(Duration::from_millis(2400)).await;
    let d = take(&r, &h, &vh, None, "");
    assert_eq!(d.next_token, Duration::from_millis(100));
    assert_eq!((d.retry_after_seconds(), d.reset_seconds()), (1, 1));
    // Not refused for long: a token is there when the header said.
    tokio::time::advance(Duration::from_millis(100)).await;
    assert!(take(&r, &h, &vh, None, "").allowed);
}

#[tokio::test(start_paused = true)]
async fn sustained_load_is_held_to_the_rate() {
    let r = Registry::default();
    // 50 per second, burst 20; offered: 200 per second for 10 s.
    let h = hcm(Some(limit(20, 50, Duration::from_secs(1))));
    let vh = vhost(vec![]);
    let mut allowed = 0;
    for _ in 0..2000 {
        if take(&r, &h, &vh, None, "").allowed {
            allowed += 1;
        }
        tokio::time::advance(Duration::from_millis(5)).await;
    }
    // The burst plus 10 s at the rate (the last refill may not be used).
    assert!((519..=520).contains(&allowed), "{allowed}");
}

#[tokio::test(start_paused = true)]
async fn per_source_buckets_are_independent() {
    let r = Registry::default();
    let mut l = limit(2, 1, Duration::from_secs(1));
    l.per_source = true;
    let h = hcm(Some(l));
    let vh = vhost(vec![]);
    let a = "spiffe://cluster.local/ns/default/sa/a";
    let b = "10.0.0.7";
    assert!(take(&r, &h, &vh, None, a).allowed);
    assert!(take(&r, &h, &vh, None, a).allowed);
    assert!(!take(&r, &h, &vh, None, a).allowed);
    // Another caller has its own bucket.
    assert!(take(&r, &h, &vh, None, b).allowed);
    assert!(take(&r, &h, &vh, None, b).allowed);
    assert!(!take(&r, &h, &vh, None, b).allowed);
    assert_eq!(effective(&h, None).unwrap().scope(), Scope::Source);
    assert_eq!(r.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn route_overrides_have_a_bucket_per_route() {
    let r = Registry::default();
    let h = hcm(Some(limit(100, 100, Duration::from_secs(1))));
    let tight = limit(1, 1, Duration::from_secs(1));
    let vh = vhost(vec![
        route("a", Some(tight.clone())),
        route("b", Some(tight.clone())),
        route("", Some(tight.clone())),
        route("", Some(tight)),
        route("plain", None),
    ]);
    for i in 0..4 {
        assert!(take(&r, &h, &vh, Some(i), "").allowed, "route {i}");
        assert!(!take(&r, &h, &vh, Some(i), "").allowed, "route {i}");
    }
    // A route without an override draws from the connection manager's
    // bucket, as do requests that match no route.
    let plain = effective(&h, Some(&vh.routes[4])).unwrap();
    assert_eq!(plain.scope(), Scope::Listener);
    assert_eq!(
        effective(&h, Some(&vh.routes[0])).unwrap().scope(),
        Scope::Route
    );
    assert!(take(&r, &h, &vh, Some(4), "").allowed);
    assert_eq!(take(&r, &h, &vh, None, "").remaining, 98);
}

#[test]
fn no_filter_or_no_bucket_limits_nothing() {
    let vh = vhost(vec![route("a", Some(limit(1, 1, Duration::from_secs(1))))]);
    // Without the filter in the connection manager, overrides do nothing.
    let h = hcm(None);
    assert!(effective(&h, Some(&vh.routes[0])).is_none());
    // The filter without a bucket: only routes' overrides limit.
    let h = hcm(Some(limit(0, 0, Duration::ZERO)));
    assert!(effective(&h, None).is_none());
    assert!(effective(&h, Some(&vh.routes[0])).is_some());
}

#[tokio::test(start_paused = true)]
async fn buckets_survive_config_updates_that_keep_the_limit() {
    let r = Registry::default();
    let vh = vhost(vec![]);
    let before = hcm(Some(limit(2, 1, Duration::from_secs(10))));
    assert_eq!(allowed_of(&r, &before, &vh, 3), 2);
    // A new snapshot with the same limit: same bucket, still empty.
    let same = hcm(Some(limit(2, 1, Duration::from_secs(10))));
    assert!(!take(&r, &same, &vh, None, "").allowed);
    // A changed limit starts full.
    let changed = hcm(Some(limit(3, 1, Duration::from_secs(10))));
    assert_eq!(allowed_of(&r, &changed, &vh, 5), 3);
}

#[tokio::test(start_paused = true)]
async fn callers_beyond_the_bound_evict_full_buckets_first() {
    let r = Registry::default();
    let mut l = limit(2, 1, Duration::from_secs(1));
    l.per_source = true;
    let h = hcm(Some(l));
    let vh = vhost(vec![]);
    // One busy caller with an empty bucket.
    assert!(take(&r, &h, &vh, None, "busy").allowed);
    assert!(take(&r, &h, &vh, None, "busy").allowed);
    for i in 0..MAX_SOURCES - 1 {
        assert!(take(&r, &h, &vh, None, &format!("10.1.{}.{}", i / 256, i % 256)).allowed);
    }
    assert_eq!(r.len(), MAX_SOURCES);
    // Every bucket but "busy" refills; a new caller evicts the full ones.
    tokio::time::advance(Duration::from_millis(1500)).await;
    assert!(take(&r, &h, &vh, None, "newcomer").allowed);
    assert!(r.len() <= 3, "{}", r.len());
    // "busy" was not full (half a token short): it kept its state.
    assert!(take(&r, &h, &vh, None, "busy").allowed);
    assert!(!take(&r, &h, &vh, None, "busy").allowed);
}

#[tokio::test(start_paused = true)]
async fn without_idle_callers_the_least_recent_is_evicted() {
    let r = Registry::default();
    let mut l = limit(1, 1, Duration::from_secs(3600));
    l.per_source = true;
    let h = hcm(Some(l));
    let vh = vhost(vec![]);
    for i in 0..MAX_SOURCES {
        take(&r, &h, &vh, None, &format!("s{i}"));
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    assert!(take(&r, &h, &vh, None, "late").allowed);
    assert_eq!(r.len(), MAX_SOURCES);
    // "s0" was forgotten: it starts over with a full bucket.
    assert!(take(&r, &h, &vh, None, "s0").allowed);
    // "s2" was not.
    assert!(!take(&r, &h, &vh, None, "s2").allowed);
}

#[test]
fn refusal_messages_name_the_limit_and_the_policy() {
    let d = Decision {
        allowed: false,
        limit: 20,
        remaining: 0,
        next_token: Duration::from_millis(1500),
    };
    let l = limit(20, 10, Duration::from_secs(1));
    let service = Applicable {
        limit: &l,
        route_override: false,
    };
    assert_eq!(
        refusal_message(service, "web.default", "default/web/0", "", &d),
        "rate limited: web.default accepts 10 requests per 1s (burst 20); retry in 2s, or raise spec.rateLimit of the TrafficPolicy that targets the Service"
    );
    let mut per_source = l.clone();
    per_source.per_source = true;
    let route = Applicable {
        limit: &per_source,
        route_override: true,
    };
    assert_eq!(
        refusal_message(route, "web.default", "default/web/0", "10.0.0.7", &d),
        "rate limited: route default/web/0 accepts from each caller (10.0.0.7) 10 requests per 1s (burst 20); retry in 2s, or raise spec.rateLimit of the TrafficPolicy that targets the HTTPRoute"
    );
    assert_eq!(Scope::Listener.as_str(), "listener");
    assert_eq!(Scope::Route.as_str(), "route");
    assert_eq!(Scope::Source.as_str(), "source");
}

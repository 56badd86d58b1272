//! Fault injection: `envoy.filters.http.fault`, decided per request.
//!
//! Purpose: prove that callers survive a slow or failing destination by
//! delaying or aborting a share of requests on purpose, on the caller's
//! side, before anything is sent.
//!
//! Contract (Envoy's semantics):
//! - Which fault applies ([`effective`]): the route's override
//!   (`typed_per_filter_config`) when the connection manager has the filter,
//!   else the connection manager's own (often empty) config; nothing when
//!   the filter is absent.
//! - A fault applies only to requests matching all of its `headers`.
//! - The delay is decided first, with its own percentage; after it (or at
//!   once without it) the abort is decided with an independent draw. A
//!   request may be both delayed and aborted.
//! - Percentages are per million; a draw is uniform in `[0, 1_000_000)`.
//!
//! This module decides; `http` sleeps (with `tokio::time`, so tests can
//! pause time) and answers.

use std::time::Duration;

use http::HeaderMap;

use crate::config::model::{
    AbortStatus, Fault, HeaderMatch, HttpConnectionManager, Route, StringMatch,
};
use crate::router::{joined_values, string_matches};

/// The fault configuration for a request on `hcm` that matched `route`
/// (`None`: no route matched; the connection manager's config applies, as
/// the filter runs before the router in Envoy).
pub fn effective<'a>(
    hcm: &'a HttpConnectionManager,
    route: Option<&'a Route>,
) -> Option<&'a Fault> {
    let base = hcm.fault.as_deref()?;
    Some(route.and_then(|r| r.fault.as_deref()).unwrap_or(base))
}

/// Whether the request's headers select it for `fault` (all of `headers`
/// match, with the router's header matching rules).
pub fn selects(fault: &Fault, headers: &HeaderMap) -> bool {
    fault.headers.iter().all(|h| header_matches(h, headers))
}

fn header_matches(h: &HeaderMatch, headers: &HeaderMap) -> bool {
    match joined_values(headers, &h.name) {
        // As in route matching: absence matches only an inverted presence.
        None => matches!(h.matcher, StringMatch::Present) && h.invert,
        Some(value) => string_matches(&h.matcher, &value) != h.invert,
    }
}

/// A uniform draw in `[0, 1_000_000)`.
pub fn draw() -> u32 {
    fastrand::u32(..1_000_000)
}

/// Whether a share of `per_million` fires for `draw`.
pub fn fires(per_million: u32, draw: u32) -> bool {
    draw < per_million
}

/// The delay to inject, if this request is one of the delayed share.
pub fn delay(fault: &Fault, draw: u32) -> Option<Duration> {
    let d = fault.delay.as_ref()?;
    fires(d.per_million, draw).then_some(d.fixed)
}

/// The abort to inject, if this request is one of the aborted share.
pub fn abort(fault: &Fault, draw: u32) -> Option<AbortStatus> {
    let a = fault.abort.as_ref()?;
    fires(a.per_million, draw).then_some(a.status)
}

/// A share per million as a percentage for messages (`50%`, `0.1%`).
pub fn percent(per_million: u32) -> String {
    let p = f64::from(per_million) / 10_000.0;
    format!("{p}%")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use http::{HeaderName, HeaderValue};

    use super::*;
    use crate::config::model::{FaultAbort, FaultDelay};

    fn fault(delay_pm: u32, abort_pm: u32) -> Fault {
        Fault {
            delay: Some(FaultDelay {
                fixed: Duration::from_millis(100),
                per_million: delay_pm,
            }),
            abort: Some(FaultAbort {
                status: AbortStatus::Http(503),
                per_million: abort_pm,
            }),
            headers: Vec::new(),
        }
    }

    /// Fires `n` independent draws and counts hits.
    fn count(n: u32, pick: impl Fn(u32) -> bool) -> u32 {
        (0..n).filter(|_| pick(draw())).count() as u32
    }

    #[test]
    fn percentages_hold_within_tolerance() {
        fastrand::seed(7);
        let n = 200_000;
        for (pm, tolerance) in [(500_000, 0.01), (100_000, 0.005), (10_000, 0.002)] {
            let f = fault(pm, pm);
            let delayed = count(n, |d| delay(&f, d).is_some());
            let aborted = count(n, |d| abort(&f, d).is_some());
            let want = f64::from(pm) / 1e6;
            for got in [delayed, aborted] {
                let share = f64::from(got) / f64::from(n);
                assert!(
                    (share - want).abs() < tolerance,
                    "{pm} per million: got {share}"
                );
            }
        }
    }

    #[test]
    fn zero_and_full_shares_are_exact() {
        let never = fault(0, 0);
        let always = fault(1_000_000, 1_000_000);
        for d in [0, 1, 499_999, 999_999] {
            assert!(delay(&never, d).is_none() && abort(&never, d).is_none());
            assert_eq!(delay(&always, d), Some(Duration::from_millis(100)));
            assert!(matches!(abort(&always, d), Some(AbortStatus::Http(503))));
        }
        assert!(delay(&Fault::default(), 0).is_none());
        assert!(abort(&Fault::default(), 0).is_none());
    }

    #[test]
    fn headers_must_all_match() {
        let mut f = fault(1_000_000, 0);
        f.headers = vec![
            HeaderMatch {
                name: HeaderName::from_static("x-chaos"),
                matcher: StringMatch::Exact("on".into()),
                invert: false,
            },
            HeaderMatch {
                name: HeaderName::from_static("x-user"),
                matcher: StringMatch::Present,
                invert: false,
            },
        ];
        let mut h = HeaderMap::new();
        assert!(!selects(&f, &h));
        h.insert("x-chaos", HeaderValue::from_static("on"));
        assert!(!selects(&f, &h));
        h.insert("x-user", HeaderValue::from_static("a"));
        assert!(selects(&f, &h));
        h.insert("x-chaos", HeaderValue::from_static("off"));
        assert!(!selects(&f, &h));
        assert!(selects(&Fault::default(), &HeaderMap::new()));
    }

    #[test]
    fn route_override_needs_the_filter_in_the_connection_manager() {
        use std::sync::Arc;
        let hcm_json = |fault: Option<Arc<Fault>>| HttpConnectionManager {
            stat_prefix: "s".into(),
            route_config_name: "r".into(),
            inline_routes: None,
            stream_idle_timeout: None,
            request_timeout: None,
            idle_timeout: None,
            websocket: false,
            authz: None,
            rate_limit: None,
            fault,
        };
        let route = |fault: Option<Arc<Fault>>| Route {
            name: "r".into(),
            matcher: crate::config::model::RouteMatch {
                path: crate::config::model::PathMatch::Prefix("/".into()),
                headers: vec![],
                query: vec![],
                pseudo_headers: vec![],
            },
            action: crate::config::model::RouteAction::Direct {
                status: 200,
                body: String::new(),
            },
            request_headers: Default::default(),
            response_headers: Default::default(),
            rate_limit: None,
            fault,
        };
        let over = Arc::new(fault(1, 1));
        let base = Arc::new(Fault::default());
        // No filter: the override does nothing.
        assert!(effective(&hcm_json(None), Some(&route(Some(over.clone())))).is_none());
        let hcm = hcm_json(Some(base.clone()));
        let r = route(Some(over.clone()));
        assert!(std::ptr::eq(effective(&hcm, Some(&r)).unwrap(), &*over));
        let plain = route(None);
        assert!(std::ptr::eq(effective(&hcm, Some(&plain)).unwrap(), &*base));
        assert!(std::ptr::eq(effective(&hcm, None).unwrap(), &*base));
    }

    #[test]
    fn percent_is_readable() {
        assert_eq!(percent(500_000), "50%");
        assert_eq!(percent(1_000), "0.1%");
        assert_eq!(percent(1_000_000), "100%");
    }
}

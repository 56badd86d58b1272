#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::config::model::RetryBudget;

fn limits(
    connections: u32,
    pending: u32,
    requests: u32,
    retries: u32,
    budget: Option<(f64, u32)>,
) -> CircuitBreakers {
    CircuitBreakers {
        max_connections: connections,
        max_pending_requests: pending,
        max_requests: requests,
        max_retries: retries,
        retry_budget: budget.map(|(budget_percent, min_retry_concurrency)| RetryBudget {
            budget_percent,
            min_retry_concurrency,
        }),
    }
}

#[test]
fn requests_are_limited_and_given_back() {
    let b = Breaker::new("c", &limits(1024, 1024, 2, 3, None));
    let first = b.try_request().unwrap();
    let _second = b.try_request().unwrap();
    let err = b.try_request().unwrap_err();
    assert_eq!(err.limit, Limit::Requests);
    assert_eq!(err.max, 2);
    assert!(
        err.message().contains("connectionPool.maxRequests"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("cluster c"), "{}", err.message());
    drop(first);
    assert!(b.try_request().is_ok());
    assert_eq!(b.status().requests, 1);
}

#[test]
fn zero_refuses_everything() {
    let b = Breaker::new("c", &limits(0, 0, 0, 0, None));
    assert!(b.try_request().is_err());
    assert!(b.try_pending().is_err());
    assert!(b.try_retry().is_err());
    assert!(b.try_connection(false).is_none());
    // An endpoint without connections may always open one.
    assert!(b.try_connection(true).is_some());
}

#[test]
fn max_retries_without_budget() {
    let b = Breaker::new("c", &limits(1024, 1024, 1024, 3, None));
    let held: Vec<_> = (0..3).map(|_| b.try_retry().unwrap()).collect();
    let err = b.try_retry().unwrap_err();
    assert_eq!((err.limit, err.max, err.budget), (Limit::Retries, 3, false));
    assert!(err.message().contains("connectionPool.maxRetries"));
    drop(held);
    assert!(b.try_retry().is_ok());
}

#[test]
fn budget_arithmetic() {
    let l = limits(1024, 1024, 1024, 3, Some((20.0, 3)));
    // The minimum applies while 20% of the requests is less.
    assert_eq!(retry_allowance(&l, 0), 3);
    assert_eq!(retry_allowance(&l, 10), 3);
    assert_eq!(retry_allowance(&l, 19), 3);
    // 20% of 20 = 4; of 24 = 4.8, rounded down.
    assert_eq!(retry_allowance(&l, 20), 4);
    assert_eq!(retry_allowance(&l, 24), 4);
    assert_eq!(retry_allowance(&l, 100), 20);
    let l = limits(1024, 1024, 1024, 3, Some((100.0, 0)));
    assert_eq!(retry_allowance(&l, 7), 7);
    assert_eq!(retry_allowance(&l, u32::MAX), u32::MAX);
    let l = limits(1024, 1024, 1024, 3, Some((0.5, 1)));
    assert_eq!(retry_allowance(&l, 100), 1);
    assert_eq!(retry_allowance(&l, 1000), 5);
    // max_retries is ignored with a budget.
    let l = limits(1024, 1024, 1024, 0, Some((50.0, 0)));
    assert_eq!(retry_allowance(&l, 4), 2);
}

#[test]
fn budget_follows_requests_in_flight() {
    let b = Breaker::new("c", &limits(1024, 1024, 1024, 3, Some((25.0, 1))));
    // One request in flight: the minimum (1) allows one retry.
    let requests: Vec<_> = (0..1).map(|_| b.try_request().unwrap()).collect();
    let r1 = b.try_retry().unwrap();
    let err = b.try_retry().unwrap_err();
    assert!(err.budget);
    assert_eq!(err.max, 1);
    assert!(
        err.message().contains("retries.budget"),
        "{}",
        err.message()
    );
    // Ten in flight, two of them retries: 25% of the eight first attempts
    // allows two (retries do not count towards their own allowance).
    let more: Vec<_> = (0..9).map(|_| b.try_request().unwrap()).collect();
    let r2 = b.try_retry().unwrap();
    assert!(b.try_retry().is_err());
    assert_eq!(b.status().max_retries, 2);
    assert_eq!(b.status().retries, 2);
    drop((r1, r2, requests, more));
    assert_eq!(b.status().retries, 0);
    assert_eq!(b.status().requests, 0);
}

#[test]
fn limits_change_in_place() {
    let b = Breaker::new("c", &limits(1024, 1024, 1, 3, None));
    let held = b.try_request().unwrap();
    assert!(b.try_request().is_err());
    b.set_limits(&limits(1024, 1024, 2, 3, None));
    let _second = b.try_request().unwrap();
    assert_eq!(b.status().requests, 2);
    drop(held);
    assert_eq!(b.status().requests, 1);
}

#[tokio::test]
async fn closing_a_connection_wakes_waiters() {
    let b = Breaker::new("c", &limits(1, 1024, 1024, 3, None));
    let pool = Arc::new(PoolCounters::default());
    let token = pool.token(b.try_connection(false));
    assert_eq!(pool.open(), 1);
    assert_eq!(b.status().connections, 1);
    assert!(b.try_connection(false).is_none());
    let freed = b.freed();
    tokio::pin!(freed);
    freed.as_mut().enable();
    let changed = pool.changed.notified();
    tokio::pin!(changed);
    changed.as_mut().enable();
    drop(token);
    freed.await;
    changed.await;
    assert_eq!(pool.open(), 0);
    assert_eq!(b.status().connections, 0);
    assert!(b.try_connection(false).is_some());
}

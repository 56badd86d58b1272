#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, StreamBody};

use super::*;
use crate::config::model::{RetryOn, RetryPolicy};

fn policy(on: RetryOn, codes: &[u16]) -> RetryPolicy {
    RetryPolicy {
        on,
        num_retries: 2,
        per_try_timeout: None,
        retriable_status_codes: codes.to_vec(),
        backoff_base: Duration::from_millis(25),
        backoff_max: Duration::from_millis(250),
        avoid_previous_hosts: true,
    }
}

fn response(status: u16) -> TryOutcome {
    TryOutcome::Response { status, grpc: None }
}

fn grpc(code: u32) -> TryOutcome {
    TryOutcome::Response {
        status: 200,
        grpc: Some(code),
    }
}

#[test]
fn five_xx_retries_every_5xx_and_every_failure() {
    let p = policy(
        RetryOn {
            five_xx: true,
            ..Default::default()
        },
        &[],
    );
    for status in [500, 501, 502, 503, 504, 599] {
        assert_eq!(
            retry_condition(&p, response(status)),
            Some("5xx"),
            "{status}"
        );
    }
    for status in [200, 204, 404, 429, 499] {
        assert_eq!(retry_condition(&p, response(status)), None, "{status}");
    }
    for failure in [
        TryOutcome::ConnectFailure,
        TryOutcome::Reset,
        TryOutcome::RefusedStream,
        TryOutcome::Timeout,
    ] {
        assert_eq!(retry_condition(&p, failure), Some("5xx"), "{failure:?}");
    }
    // A gRPC failure status alone is not a 5xx.
    assert_eq!(retry_condition(&p, grpc(14)), None);
}

#[test]
fn gateway_error_is_502_to_504_and_failures() {
    let p = policy(
        RetryOn {
            gateway_error: true,
            ..Default::default()
        },
        &[],
    );
    for status in [502, 503, 504] {
        assert_eq!(retry_condition(&p, response(status)), Some("gateway-error"));
    }
    for status in [500, 501, 505] {
        assert_eq!(retry_condition(&p, response(status)), None, "{status}");
    }
    assert_eq!(
        retry_condition(&p, TryOutcome::Timeout),
        Some("gateway-error")
    );
    assert_eq!(
        retry_condition(&p, TryOutcome::ConnectFailure),
        Some("gateway-error")
    );
}

#[test]
fn reset_covers_failures_without_a_response() {
    let p = policy(
        RetryOn {
            reset: true,
            ..Default::default()
        },
        &[],
    );
    assert_eq!(retry_condition(&p, TryOutcome::Reset), Some("reset"));
    assert_eq!(retry_condition(&p, TryOutcome::Timeout), Some("reset"));
    assert_eq!(
        retry_condition(&p, TryOutcome::ConnectFailure),
        Some("reset")
    );
    assert_eq!(
        retry_condition(&p, TryOutcome::RefusedStream),
        Some("reset")
    );
    assert_eq!(retry_condition(&p, response(503)), None);
}

#[test]
fn connect_failure_and_refused_stream_are_narrow() {
    let p = policy(
        RetryOn {
            connect_failure: true,
            refused_stream: true,
            ..Default::default()
        },
        &[],
    );
    assert_eq!(
        retry_condition(&p, TryOutcome::ConnectFailure),
        Some("connect-failure")
    );
    assert_eq!(
        retry_condition(&p, TryOutcome::RefusedStream),
        Some("refused-stream")
    );
    assert_eq!(retry_condition(&p, TryOutcome::Reset), None);
    assert_eq!(retry_condition(&p, TryOutcome::Timeout), None);
    assert_eq!(retry_condition(&p, response(503)), None);
}

#[test]
fn retriable_status_codes_need_the_condition() {
    let on = RetryOn {
        retriable_status_codes: true,
        ..Default::default()
    };
    let p = policy(on, &[409, 503]);
    assert_eq!(
        retry_condition(&p, response(409)),
        Some("retriable-status-codes")
    );
    assert_eq!(
        retry_condition(&p, response(503)),
        Some("retriable-status-codes")
    );
    assert_eq!(retry_condition(&p, response(500)), None);
    // Codes without the condition do nothing.
    let p = policy(RetryOn::default(), &[503]);
    assert_eq!(retry_condition(&p, response(503)), None);
}

#[test]
fn grpc_statuses_from_headers() {
    let p = policy(
        RetryOn {
            grpc_cancelled: true,
            grpc_deadline_exceeded: true,
            grpc_internal: true,
            grpc_resource_exhausted: true,
            grpc_unavailable: true,
            ..Default::default()
        },
        &[],
    );
    assert_eq!(retry_condition(&p, grpc(1)), Some("cancelled"));
    assert_eq!(retry_condition(&p, grpc(4)), Some("deadline-exceeded"));
    assert_eq!(retry_condition(&p, grpc(8)), Some("resource-exhausted"));
    assert_eq!(retry_condition(&p, grpc(13)), Some("internal"));
    assert_eq!(retry_condition(&p, grpc(14)), Some("unavailable"));
    for code in [0, 2, 3, 5, 7, 12, 16] {
        assert_eq!(retry_condition(&p, grpc(code)), None, "{code}");
    }
    let only_unavailable = policy(
        RetryOn {
            grpc_unavailable: true,
            ..Default::default()
        },
        &[],
    );
    assert_eq!(retry_condition(&only_unavailable, grpc(13)), None);
    assert_eq!(
        retry_condition(&only_unavailable, grpc(14)),
        Some("unavailable")
    );
    assert_eq!(retry_condition(&only_unavailable, TryOutcome::Reset), None);
}

#[test]
fn the_most_specific_condition_is_named() {
    let p = policy(
        RetryOn {
            five_xx: true,
            gateway_error: true,
            reset: true,
            connect_failure: true,
            refused_stream: true,
            retriable_status_codes: true,
            ..Default::default()
        },
        &[503],
    );
    assert_eq!(
        retry_condition(&p, response(503)),
        Some("retriable-status-codes")
    );
    assert_eq!(retry_condition(&p, response(502)), Some("gateway-error"));
    assert_eq!(retry_condition(&p, response(500)), Some("5xx"));
    assert_eq!(
        retry_condition(&p, TryOutcome::ConnectFailure),
        Some("connect-failure")
    );
    assert_eq!(
        retry_condition(&p, TryOutcome::RefusedStream),
        Some("refused-stream")
    );
    assert_eq!(retry_condition(&p, TryOutcome::Reset), Some("reset"));
    assert_eq!(retry_condition(&p, TryOutcome::Timeout), Some("reset"));
}

#[test]
fn outcomes_for_outlier_detection() {
    use crate::balance::Outcome;
    assert_eq!(response(503).outlier(), Outcome::Status(503));
    assert_eq!(grpc(14).outlier(), Outcome::Status(503));
    assert_eq!(grpc(0).outlier(), Outcome::Status(200));
    assert_eq!(grpc(13).outlier(), Outcome::Status(500));
    assert_eq!(TryOutcome::RefusedStream.outlier(), Outcome::Reset);
    assert_eq!(TryOutcome::Timeout.outlier(), Outcome::Timeout);
    assert_eq!(
        TryOutcome::ConnectFailure.outlier(),
        Outcome::ConnectFailure
    );
}

#[test]
fn backoff_is_fully_jittered_and_capped() {
    let base = Duration::from_millis(25);
    let max = Duration::from_millis(250);
    // The ceiling of each retry: 2^(n-1) x base, capped at max.
    let ceilings = [25u64, 50, 100, 200, 250, 250];
    for (i, ceiling) in ceilings.iter().enumerate() {
        let retry = i as u32 + 1;
        let ceiling = Duration::from_millis(*ceiling);
        let mut seen_max = Duration::ZERO;
        let mut rng = fastrand::Rng::with_seed(retry.into());
        for _ in 0..2000 {
            let d = backoff(base, max, retry, rng.u64(..));
            assert!(d < ceiling, "retry {retry}: {d:?} >= {ceiling:?}");
            seen_max = seen_max.max(d);
        }
        // Spread over the whole range, not stuck at the bottom.
        assert!(
            seen_max > ceiling * 9 / 10,
            "retry {retry}: max {seen_max:?}"
        );
    }
    // Extremes never panic or overflow.
    assert_eq!(backoff(Duration::ZERO, max, 3, u64::MAX), Duration::ZERO);
    assert_eq!(backoff(base, Duration::ZERO, 3, u64::MAX), Duration::ZERO);
    assert!(backoff(base, max, 0, u64::MAX) < base);
    assert!(backoff(base, max, u32::MAX, u64::MAX) < max);
    let huge = Duration::from_secs(u64::MAX);
    assert!(backoff(huge, huge, 200, u64::MAX) < huge);
}

#[test]
fn grpc_to_http_follows_envoy() {
    assert_eq!(grpc_to_http(0), 200);
    assert_eq!(grpc_to_http(1), 499);
    assert_eq!(grpc_to_http(2), 500);
    assert_eq!(grpc_to_http(4), 504);
    assert_eq!(grpc_to_http(8), 429);
    assert_eq!(grpc_to_http(14), 503);
    assert_eq!(grpc_to_http(16), 401);
    assert_eq!(grpc_to_http(99), 500);
}

type Item = Result<Frame<Bytes>, BoxError>;

/// A client body fed frame by frame from the test.
fn channel_body() -> (tokio::sync::mpsc::Sender<Item>, Body) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Item>(16);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (tx, StreamBody::new(stream).boxed())
}

fn activity() -> Arc<Activity> {
    Activity::new(Arc::new(AtomicU64::new(0)))
}

async fn collect(body: Body) -> (Bytes, Option<HeaderMap>) {
    let c = body.collect().await.unwrap();
    let trailers = c.trailers().cloned();
    (c.to_bytes(), trailers)
}

#[tokio::test]
async fn empty_bodies_replay_for_free() {
    let a = activity();
    let mut b = RequestBody::new(body::empty(), &a, true);
    assert!(matches!(b, RequestBody::Empty));
    assert!(a.request_done());
    for _ in 0..3 {
        assert!(b.next_attempt().unwrap().is_end_stream());
    }
}

#[tokio::test]
async fn small_bodies_replay_whole_with_trailers() {
    let a = activity();
    let (tx, source) = channel_body();
    let mut b = RequestBody::new(source, &a, true);
    assert!(matches!(b, RequestBody::Replay(_)));
    tx.send(Ok(Frame::data(Bytes::from_static(b"hello "))))
        .await
        .unwrap();
    tx.send(Ok(Frame::data(Bytes::from_static(b"world"))))
        .await
        .unwrap();
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    tx.send(Ok(Frame::trailers(trailers.clone())))
        .await
        .unwrap();
    drop(tx);

    let first = b.next_attempt().unwrap();
    assert_eq!(
        collect(first).await,
        (Bytes::from_static(b"hello world"), Some(trailers.clone()))
    );
    assert!(a.request_done());
    assert_eq!(a.received.load(Ordering::Relaxed), 11);
    assert!(b.replayable());
    for _ in 0..2 {
        let again = b.next_attempt().unwrap();
        assert_eq!(again.size_hint().exact(), Some(11));
        assert_eq!(
            collect(again).await,
            (Bytes::from_static(b"hello world"), Some(trailers.clone()))
        );
    }
    // Replays do not count as received bytes.
    assert_eq!(a.received.load(Ordering::Relaxed), 11);
}

#[tokio::test]
async fn a_retry_replays_what_was_read_then_continues() {
    let a = activity();
    let (tx, source) = channel_body();
    let mut b = RequestBody::new(source, &a, true);
    tx.send(Ok(Frame::data(Bytes::from_static(b"one,"))))
        .await
        .unwrap();
    let mut first = b.next_attempt().unwrap();
    // The first attempt reads one frame, then the upstream answers early.
    let f = first.frame().await.unwrap().unwrap();
    assert_eq!(f.into_data().unwrap(), Bytes::from_static(b"one,"));
    assert!(!a.request_done());
    assert!(b.replayable());

    let second = b.next_attempt().unwrap();
    // The superseded attempt's body fails instead of taking bytes.
    assert!(first.frame().await.unwrap().is_err());
    tx.send(Ok(Frame::data(Bytes::from_static(b"two"))))
        .await
        .unwrap();
    drop(tx);
    assert_eq!(collect(second).await.0, Bytes::from_static(b"one,two"));
    assert!(a.request_done());
    let third = b.next_attempt().unwrap();
    assert_eq!(collect(third).await.0, Bytes::from_static(b"one,two"));
}

#[tokio::test]
async fn bodies_past_the_limit_are_not_replayable() {
    let a = activity();
    let (tx, source) = channel_body();
    let mut b = RequestBody::new(source, &a, true);
    let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
    tokio::spawn(async move {
        for _ in 0..5 {
            tx.send(Ok(Frame::data(chunk.clone()))).await.unwrap();
        }
    });
    let first = b.next_attempt().unwrap();
    // The first attempt still gets every byte.
    assert_eq!(collect(first).await.0.len(), 80 * 1024);
    assert!(!b.replayable());
    assert!(b.next_attempt().is_none());
}

#[tokio::test]
async fn exactly_the_limit_is_replayable() {
    let a = activity();
    let body = body::full(Bytes::from(vec![b'y'; REPLAY_LIMIT]));
    let mut b = RequestBody::new(body, &a, true);
    assert_eq!(
        collect(b.next_attempt().unwrap()).await.0.len(),
        REPLAY_LIMIT
    );
    assert!(b.replayable());
    assert_eq!(
        collect(b.next_attempt().unwrap()).await.0.len(),
        REPLAY_LIMIT
    );
}

#[tokio::test]
async fn announced_large_bodies_are_sent_once() {
    let a = activity();
    let body = body::full(Bytes::from(vec![b'z'; REPLAY_LIMIT + 1]));
    let mut b = RequestBody::new(body, &a, true);
    assert!(matches!(b, RequestBody::Once(_)));
    assert!(b.replayable());
    assert_eq!(
        collect(b.next_attempt().unwrap()).await.0.len(),
        REPLAY_LIMIT + 1
    );
    assert!(a.request_done());
    assert_eq!(a.received.load(Ordering::Relaxed), REPLAY_LIMIT as u64 + 1);
    assert!(!b.replayable());
    assert!(b.next_attempt().is_none());
}

#[tokio::test]
async fn without_a_policy_the_body_is_sent_once() {
    let a = activity();
    let mut b = RequestBody::new(body::full("abc"), &a, false);
    assert!(matches!(b, RequestBody::Once(_)));
    assert_eq!(
        collect(b.next_attempt().unwrap()).await.0,
        Bytes::from_static(b"abc")
    );
    assert!(b.next_attempt().is_none());
}

#[tokio::test]
async fn a_failed_client_body_is_not_replayed() {
    let a = activity();
    let (tx, source) = channel_body();
    let mut b = RequestBody::new(source, &a, true);
    tx.send(Ok(Frame::data(Bytes::from_static(b"part"))))
        .await
        .unwrap();
    tx.send(Err("client went away".into())).await.unwrap();
    let first = b.next_attempt().unwrap();
    assert!(first.collect().await.is_err());
    assert!(!b.replayable());
    assert!(b.next_attempt().is_none());
}

#[tokio::test(start_paused = true)]
async fn idle_expires_only_without_activity() {
    let a = activity();
    let idle = Duration::from_secs(10);
    let start = tokio::time::Instant::now();
    let waiter = {
        let a = a.clone();
        tokio::spawn(async move { idle_expired(&a, idle).await })
    };
    tokio::time::sleep(Duration::from_secs(6)).await;
    a.touch();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(!waiter.is_finished());
    a.touch();
    waiter.abort();
    idle_expired(&a, idle).await;
    // Twelve seconds of activity, then ten idle ones.
    assert_eq!(start.elapsed(), Duration::from_secs(22));
}

/// Records whether it was woken.
#[derive(Default)]
struct Flag(std::sync::atomic::AtomicBool);

impl std::task::Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_superseded_attempt_parked_on_the_client_body_is_woken() {
    let a = activity();
    let (tx, source) = channel_body();
    let mut b = RequestBody::new(source, &a, true);
    let mut first = b.next_attempt().unwrap();
    // The first attempt's connection waits for the client's next bytes...
    let flag = Arc::new(Flag::default());
    let waker = std::task::Waker::from(flag.clone());
    let mut cx = Context::from_waker(&waker);
    assert!(Pin::new(&mut first).poll_frame(&mut cx).is_pending());
    // ...when a retry supersedes it: it must learn so now (and abort its
    // upstream stream), not when the upstream closes the connection.
    let second = b.next_attempt().unwrap();
    assert!(
        flag.0.load(Ordering::SeqCst),
        "the superseded attempt was left parked"
    );
    assert!(matches!(
        Pin::new(&mut first).poll_frame(&mut cx),
        Poll::Ready(Some(Err(_)))
    ));
    tx.send(Ok(Frame::data(Bytes::from_static(b"late"))))
        .await
        .unwrap();
    drop(tx);
    assert_eq!(collect(second).await.0, Bytes::from_static(b"late"));
}

#[tokio::test]
async fn a_sealed_body_stops_keeping_a_copy() {
    let a = activity();
    let (tx, source) = channel_body();
    let mut b = RequestBody::new(source, &a, true);
    tx.send(Ok(Frame::data(Bytes::from_static(b"one,"))))
        .await
        .unwrap();
    let mut first = b.next_attempt().unwrap();
    let f = first.frame().await.unwrap().unwrap();
    assert_eq!(f.into_data().unwrap(), Bytes::from_static(b"one,"));
    let RequestBody::Replay(replay) = &b else {
        panic!("not a replayable body: {b:?}");
    };
    let replay = replay.clone();
    assert_eq!(lock(&replay.state).size, 4);
    // The first attempt's response is forwarded: no retry can follow.
    b.seal();
    assert!(!b.replayable());
    tx.send(Ok(Frame::data(Bytes::from_static(b"two"))))
        .await
        .unwrap();
    let f = first.frame().await.unwrap().unwrap();
    assert_eq!(f.into_data().unwrap(), Bytes::from_static(b"two"));
    {
        let st = lock(&replay.state);
        assert!(st.data.is_empty(), "{st:?}");
        assert_eq!(st.size, 0);
    }
    drop(tx);
    assert!(first.frame().await.is_none());
    assert!(b.next_attempt().is_none());
}

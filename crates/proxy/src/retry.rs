//! Retries: which attempt outcomes a route's `retry_policy` retries, how
//! long to back off, and request bodies that can be sent more than once.
//!
//! Purpose: the pure decisions of the retry loop in `http` (which owns the
//! sockets, timeouts and circuit breakers), kept here so they can be tested
//! without I/O.
//!
//! Contract (Envoy's semantics; `RetryPolicy` is the route's):
//! - [`retry_condition`] classifies one attempt's [`TryOutcome`] against
//!   `retry_on` and names the condition that makes it retriable (the
//!   `reason` label of `meshwork_retries_total`). `5xx` covers any 5xx
//!   response, resets, connect failures, refused streams and per-try
//!   timeouts; `gateway-error` 502/503/504 and the same failures; `reset`
//!   every failure without a response (connect failures and per-try
//!   timeouts included); `connect-failure` and `refused-stream` only those;
//!   `retriable-status-codes` the listed statuses; the gRPC names
//!   (`cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`,
//!   `unavailable`) a `grpc-status` in the response *headers* (a
//!   trailers-only response, which is how servers fail a call before
//!   answering; statuses in trailers arrive with the body, too late to
//!   retry). When several conditions match, the most specific is named
//!   (`retriable-status-codes` > `gateway-error` > `5xx`; `connect-failure`
//!   / `refused-stream` > `reset` > `gateway-error` > `5xx`).
//! - [`backoff`] is Envoy's fully jittered exponential backoff (its
//!   `JitteredExponentialBackOffStrategy`): before retry `n` (1 = the first
//!   retry) wait a uniformly random time in `[0, min(2^(n-1) x base, max))`,
//!   i.e. `[0, base)`, `[0, 2 base)`, `[0, 4 base)`, ... capped at `max`.
//! - [`RequestBody`] makes a request body replayable: with a retry policy
//!   the body streams to the first attempt as it arrives (nothing waits for
//!   it) while a copy is kept, up to [`REPLAY_LIMIT`] (64 KiB). A later
//!   attempt replays the copy and then continues with whatever the client
//!   has not sent yet. Once more than the limit has been read the copy is
//!   dropped and the request cannot be retried (`body_not_replayable`);
//!   bodies announced larger than the limit are never copied. An attempt
//!   that is superseded by a retry sees its body fail, so the old upstream
//!   stream is aborted rather than fed the new attempt's bytes.
//! - [`Activity`] records when bytes last moved in either direction (stream
//!   idle timeout) and whether the whole request has been received.
//!
//! Non-goals: hedging, `retry_host_predicate`s other than previous hosts,
//! rate-limited backoff (`x-ratelimit-reset`), `x-envoy-retry-on` headers.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::balance::Outcome;
use crate::body::{self, Body, BoxError};
use crate::config::model::RetryPolicy;

/// Most request body bytes kept for replaying to a retry.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// What one attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryOutcome {
    /// Response headers arrived; `grpc` is a `grpc-status` among them.
    Response { status: u16, grpc: Option<u32> },
    /// No connection could be made.
    ConnectFailure,
    /// The upstream reset or closed the stream before answering.
    Reset,
    /// The HTTP/2 stream was refused (`REFUSED_STREAM`): nothing was processed.
    RefusedStream,
    /// The per-try timeout fired before the response headers.
    Timeout,
}

impl TryOutcome {
    /// The outcome as outlier detection sees it. A gRPC status in the
    /// headers counts as its HTTP equivalent (as Envoy maps it).
    pub fn outlier(self) -> Outcome {
        match self {
            TryOutcome::Response { status, grpc } => {
                Outcome::Status(grpc.map_or(status, grpc_to_http))
            }
            TryOutcome::ConnectFailure => Outcome::ConnectFailure,
            TryOutcome::Reset | TryOutcome::RefusedStream => Outcome::Reset,
            TryOutcome::Timeout => Outcome::Timeout,
        }
    }
}

/// The `retry_on` condition under which `outcome` is retried, by its Envoy
/// name; `None`: not retriable.
pub fn retry_condition(policy: &RetryPolicy, outcome: TryOutcome) -> Option<&'static str> {
    let on = &policy.on;
    let failure = |specific: Option<&'static str>| {
        specific
            .or(on.reset.then_some("reset"))
            .or(on.gateway_error.then_some("gateway-error"))
            .or(on.five_xx.then_some("5xx"))
    };
    match outcome {
        TryOutcome::Response { status, grpc } => {
            if on.retriable_status_codes && policy.retriable_status_codes.contains(&status) {
                return Some("retriable-status-codes");
            }
            if on.gateway_error && matches!(status, 502..=504) {
                return Some("gateway-error");
            }
            if on.five_xx && (500..=599).contains(&status) {
                return Some("5xx");
            }
            match grpc? {
                1 if on.grpc_cancelled => Some("cancelled"),
                4 if on.grpc_deadline_exceeded => Some("deadline-exceeded"),
                8 if on.grpc_resource_exhausted => Some("resource-exhausted"),
                13 if on.grpc_internal => Some("internal"),
                14 if on.grpc_unavailable => Some("unavailable"),
                _ => None,
            }
        }
        TryOutcome::ConnectFailure => failure(on.connect_failure.then_some("connect-failure")),
        TryOutcome::RefusedStream => failure(on.refused_stream.then_some("refused-stream")),
        TryOutcome::Reset | TryOutcome::Timeout => failure(None),
    }
}

/// How long to wait before retry number `retry` (1 = the first retry):
/// uniform in `[0, min(2^(retry-1) x base, max))`, drawn from `random`.
pub fn backoff(base: Duration, max: Duration, retry: u32, random: u64) -> Duration {
    let base = base.as_nanos().min(u128::from(u64::MAX)) as u64;
    let max = max.as_nanos().min(u128::from(u64::MAX)) as u64;
    let multiplier = 1u64
        .checked_shl(retry.saturating_sub(1).min(63))
        .unwrap_or(u64::MAX);
    let ceiling = base.saturating_mul(multiplier).min(max);
    if ceiling == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(random % ceiling)
}

/// gRPC status -> HTTP status, as Envoy's `Grpc::Utility::grpcToHttpStatus`.
pub fn grpc_to_http(code: u32) -> u16 {
    match code {
        0 => 200,
        1 => 499,
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        _ => 500,
    }
}

/// When bytes last moved on a request (either direction), and whether the
/// downstream request is complete. Shared by the request body, the retry
/// loop and the response body.
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    /// Nanoseconds after `base`.
    last: AtomicU64,
    request_done: AtomicBool,
    /// Request body bytes read from the client.
    received: Arc<AtomicU64>,
}

impl Activity {
    pub fn new(received: Arc<AtomicU64>) -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            last: AtomicU64::new(0),
            request_done: AtomicBool::new(false),
            received,
        })
    }

    /// Bytes moved now.
    pub fn touch(&self) {
        let nanos = self.base.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        self.last.fetch_max(nanos, Ordering::Relaxed);
    }

    /// When bytes last moved (the start, if never).
    pub fn last(&self) -> Instant {
        self.base + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }

    /// The whole request (body included) has been read from the client.
    pub fn request_done(&self) -> bool {
        self.request_done.load(Ordering::Relaxed)
    }

    pub fn set_request_done(&self) {
        self.request_done.store(true, Ordering::Relaxed);
    }

    fn on_frame(&self, frame: &Frame<Bytes>) {
        self.touch();
        if let Some(d) = frame.data_ref() {
            self.received.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
    }
}

/// Resolves once no bytes have moved for `idle`.
pub async fn idle_expired(activity: &Activity, idle: Duration) {
    loop {
        let due = activity.last() + idle;
        if Instant::now() >= due {
            return;
        }
        tokio::time::sleep_until(due).await;
    }
}

/// A request body, as the attempts of one request need it.
#[derive(Debug)]
pub enum RequestBody {
    /// No body: every attempt sends an empty one.
    Empty,
    /// Read whole before the first attempt (mirrored requests).
    Full(Bytes),
    /// Copied while streamed to the first attempt (see the module doc).
    Replay(Arc<Replay>),
    /// Sent once: no retry policy, announced larger than the limit, or an
    /// upgrade.
    Once(Option<Body>),
}

impl RequestBody {
    /// Wraps the client's body. `replay`: keep a copy for retries.
    pub fn new<B>(body: B, activity: &Arc<Activity>, replay: bool) -> Self
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        if body.is_end_stream() {
            activity.set_request_done();
            return RequestBody::Empty;
        }
        let announced_large = body.size_hint().lower() > REPLAY_LIMIT as u64;
        if replay && !announced_large {
            return RequestBody::Replay(Arc::new(Replay {
                state: Mutex::new(ReplayState {
                    source: Some(body.map_err(Into::into).boxed()),
                    data: Vec::new(),
                    size: 0,
                    trailers: None,
                    ended: false,
                    failed: false,
                    replayable: true,
                    generation: 0,
                    reader: None,
                }),
                activity: activity.clone(),
            }));
        }
        RequestBody::Once(Some(
            Watched {
                inner: body,
                activity: activity.clone(),
            }
            .boxed(),
        ))
    }

    /// A body read whole beforehand.
    pub fn full(bytes: Bytes, activity: &Arc<Activity>) -> Self {
        activity.set_request_done();
        if bytes.is_empty() {
            RequestBody::Empty
        } else {
            RequestBody::Full(bytes)
        }
    }

    /// Another attempt could be sent.
    pub fn replayable(&self) -> bool {
        match self {
            RequestBody::Empty | RequestBody::Full(_) => true,
            RequestBody::Replay(r) => {
                let st = lock(&r.state);
                st.replayable && !st.failed
            }
            RequestBody::Once(b) => b.is_some(),
        }
    }

    /// No attempt will follow the current one (its response is being
    /// forwarded): stop copying the body, and drop the copy once the
    /// current attempt has sent it, so a long request stream does not keep
    /// up to [`REPLAY_LIMIT`] bytes for nothing.
    pub fn seal(&self) {
        if let RequestBody::Replay(r) = self {
            lock(&r.state).replayable = false;
        }
    }

    /// The body for the next attempt; `None` when it cannot be sent again.
    /// Starting an attempt supersedes the previous one's body.
    pub fn next_attempt(&mut self) -> Option<Body> {
        match self {
            RequestBody::Empty => Some(body::empty()),
            RequestBody::Full(b) => Some(body::full(b.clone())),
            RequestBody::Once(b) => b.take(),
            RequestBody::Replay(r) => {
                let generation = {
                    let mut st = lock(&r.state);
                    if st.generation > 0 && (!st.replayable || st.failed) {
                        return None;
                    }
                    st.generation += 1;
                    // The superseded attempt may be parked on the client's
                    // body, whose waker is about to go to the new reader:
                    // wake it so it fails now and its upstream stream is
                    // aborted, instead of holding its connection until the
                    // upstream gives up.
                    if let Some(w) = st.reader.take() {
                        w.wake();
                    }
                    st.generation
                };
                Some(
                    ReplayBody {
                        replay: r.clone(),
                        generation,
                        next: 0,
                        trailers_sent: false,
                    }
                    .boxed(),
                )
            }
        }
    }
}

/// The shared state behind a replayable body.
#[derive(Debug)]
pub struct Replay {
    state: Mutex<ReplayState>,
    activity: Arc<Activity>,
}

struct ReplayState {
    /// What the client has not sent yet; `None` once ended.
    source: Option<Body>,
    /// Data frames read so far (dropped once past the limit).
    data: Vec<Bytes>,
    size: usize,
    trailers: Option<HeaderMap>,
    ended: bool,
    /// Reading the client's body failed: nothing more can be sent.
    failed: bool,
    replayable: bool,
    /// The attempt whose body may read; older ones fail.
    generation: u64,
    /// Waker of the attempt waiting for the client's body.
    reader: Option<std::task::Waker>,
}

impl std::fmt::Debug for ReplayState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayState")
            .field("frames", &self.data.len())
            .field("size", &self.size)
            .field("ended", &self.ended)
            .field("replayable", &self.replayable)
            .field("generation", &self.generation)
            .finish()
    }
}

/// One attempt's view of a [`Replay`].
struct ReplayBody {
    replay: Arc<Replay>,
    generation: u64,
    /// Index of the next recorded frame to send.
    next: usize,
    trailers_sent: bool,
}

impl http_body::Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut st = lock(&this.replay.state);
        if st.generation != this.generation {
            return Poll::Ready(Some(Err("request body superseded by a retry".into())));
        }
        if let Some(b) = st.data.get(this.next) {
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(b.clone()))));
        }
        if st.ended {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(t) = st.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        if st.failed {
            return Poll::Ready(Some(Err("reading the request body failed".into())));
        }
        // This attempt has sent every recorded frame; when no attempt can
        // follow it (sealed, or past the limit) the copy is dead weight.
        if !st.replayable && !st.data.is_empty() {
            st.data = Vec::new();
            st.size = 0;
        }
        let Some(source) = st.source.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(source).poll_frame(cx);
        let end = st.source.as_ref().is_none_or(|s| s.is_end_stream());
        match polled {
            Poll::Pending => {
                if !st.reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    st.reader = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Poll::Ready(None) => {
                st.finish(&this.replay.activity);
                this.trailers_sent = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                st.failed = true;
                st.replayable = false;
                st.source = None;
                st.data = Vec::new();
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.replay.activity.on_frame(&frame);
                if let Some(d) = frame.data_ref() {
                    if st.replayable && st.size + d.len() <= REPLAY_LIMIT {
                        st.size += d.len();
                        st.data.push(d.clone());
                        this.next = st.data.len();
                    } else if st.replayable {
                        // Past the limit: this attempt is the last one.
                        st.replayable = false;
                        st.data = Vec::new();
                        st.size = 0;
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    if st.replayable {
                        st.trailers = Some(t.clone());
                    }
                    this.trailers_sent = true;
                }
                if end {
                    st.finish(&this.replay.activity);
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let st = lock(&self.replay.state);
        st.generation == self.generation
            && st.ended
            && self.next >= st.data.len()
            && (self.trailers_sent || st.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let st = lock(&self.replay.state);
        let recorded: u64 = st
            .data
            .get(self.next..)
            .unwrap_or_default()
            .iter()
            .map(|b| b.len() as u64)
            .sum();
        match &st.source {
            None => SizeHint::with_exact(recorded),
            Some(s) => {
                let h = s.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(h.lower().saturating_add(recorded));
                if let Some(u) = h.upper() {
                    hint.set_upper(u.saturating_add(recorded));
                }
                hint
            }
        }
    }
}

impl ReplayState {
    fn finish(&mut self, activity: &Activity) {
        self.ended = true;
        self.source = None;
        activity.set_request_done();
    }
}

pin_project_lite::pin_project! {
    /// A body sent once, noting activity and counting bytes.
    struct Watched<B> {
        #[pin]
        inner: B,
        activity: Arc<Activity>,
    }
}

impl<B> http_body::Body for Watched<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx).map_err(Into::into);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.activity.on_frame(frame);
                if this.inner.is_end_stream() {
                    this.activity.set_request_done();
                }
            }
            Poll::Ready(None) => this.activity.set_request_done(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;

//! The demo's traffic: a steady stream of requests to `frontend` (through
//! the `traffic` sidecar, or by name when captured), counted by the catalog version and instance that
//! answered, summed up in one line every few seconds.
//!
//! Contract: one request every `1/rps` seconds on one keep-alive HTTP/1.1
//! connection (reopened after a failure). A request counts as an error
//! unless it is answered 200 with an `x-catalog-version` header; the last
//! error's text is shown in the summary.
//!
//! Non-goals: load testing (see `bench/`), latency figures (the sidecars'
//! `/metrics` have the histograms).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::apps::{Target, PIN_HEADER};
use super::mesh::FRONTEND_PORT;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

const TIMEOUT: Duration = Duration::from_secs(10);

/// What the traffic saw so far.
#[derive(Debug, Clone, Default)]
pub(super) struct Tally {
    pub(super) requests: u64,
    /// By catalog version (`v1`, `v2`).
    pub(super) versions: BTreeMap<String, u64>,
    /// By answering instance.
    pub(super) instances: BTreeMap<String, u64>,
    pub(super) errors: u64,
    pub(super) last_error: Option<String>,
}

pub(super) type Shared = Arc<Mutex<Tally>>;

/// A client of `frontend`: through a sidecar's outbound HTTP listener, or
/// `frontend:8080` by name.
pub(super) struct Client {
    target: Target,
    conn: Option<SendRequest<Empty<Bytes>>>,
}

/// One answer of `frontend`.
#[derive(Debug)]
pub(super) struct Answer {
    pub(super) version: String,
    pub(super) instance: String,
}

impl Client {
    pub(super) fn new(target: Target) -> Client {
        Client { target, conn: None }
    }

    /// `GET path` on `frontend`, with `x-catalog-version: pin` if given.
    pub(super) async fn get(&mut self, path: &str, pin: Option<&str>) -> Result<Answer, String> {
        let result = tokio::time::timeout(TIMEOUT, self.exchange(path, pin))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {}s", TIMEOUT.as_secs())));
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    async fn exchange(&mut self, path: &str, pin: Option<&str>) -> Result<Answer, String> {
        let sender = match self.conn.take() {
            Some(s) if !s.is_closed() => self.conn.insert(s),
            _ => {
                let stream = self.target.connect().await?;
                let _ = stream.set_nodelay(true);
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| format!("HTTP handshake with {} failed: {e}", self.target))?;
                tokio::spawn(conn);
                self.conn.insert(sender)
            }
        };
        sender
            .ready()
            .await
            .map_err(|e| format!("connection to {} broke: {e}", self.target))?;
        let mut req = Request::get(path).header("host", format!("frontend:{FRONTEND_PORT}"));
        if let Some(v) = pin {
            req = req.header(PIN_HEADER, v);
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| format!("building the request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (version, instance) = (header(PIN_HEADER), header("x-catalog-instance"));
        let mesh_error = header("x-meshwork-error");
        let body = Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        match (status, version) {
            (StatusCode::OK, Some(version)) => Ok(Answer {
                version,
                instance: instance.unwrap_or_default(),
            }),
            _ => {
                let text = String::from_utf8_lossy(&body);
                let why = mesh_error.map(|e| format!(" [{e}]")).unwrap_or_default();
                Err(format!("HTTP {status}{why}: {}", text.trim()))
            }
        }
    }
}

/// Sends requests at `rps` forever, counting into `tally`.
pub(super) async fn run(target: Target, rps: f64, tally: Shared) {
    let mut client = Client::new(target);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rps));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = client.get("/", None).await;
        let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
        t.requests += 1;
        match result {
            Ok(a) => {
                *t.versions.entry(a.version).or_default() += 1;
                *t.instances.entry(a.instance).or_default() += 1;
            }
            Err(e) => {
                t.errors += 1;
                t.last_error = Some(e);
            }
        }
    }
}

/// Takes the current tally.
pub(super) fn snapshot(tally: &Shared) -> Tally {
    tally.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// One summary line for what happened between `before` and `now`.
pub(super) fn line(elapsed: Duration, before: &Tally, now: &Tally) -> String {
    let n = now.requests.saturating_sub(before.requests);
    let mut s = format!("[{:>4}s] last {n:>3} requests:", elapsed.as_secs());
    let versions: Vec<&String> = now.versions.keys().collect();
    for v in versions {
        let count = now
            .versions
            .get(v)
            .copied()
            .unwrap_or(0)
            .saturating_sub(before.versions.get(v).copied().unwrap_or(0));
        let pct = (count * 100).checked_div(n).unwrap_or(0);
        s.push_str(&format!("  catalog-{v} {count:>3} ({pct:>3}%)"));
        let instances: Vec<String> = now
            .instances
            .iter()
            .filter(|(i, _)| i.starts_with(&format!("catalog-{v}-")))
            .map(|(i, c)| {
                let d = c.saturating_sub(before.instances.get(i).copied().unwrap_or(0));
                format!("{}:{d}", i.trim_start_matches("catalog-"))
            })
            .collect();
        if instances.len() > 1 {
            s.push_str(&format!(" [{}]", instances.join(" ")));
        }
    }
    let errors = now.errors.saturating_sub(before.errors);
    s.push_str(&format!("  errors {errors}"));
    if errors > 0 {
        if let Some(e) = &now.last_error {
            s.push_str(&format!(" (last: {e})"));
        }
    }
    s
}

/// The closing line (the demo's tests read it).
pub(super) fn total(elapsed: Duration, t: &Tally) -> String {
    let count = |v: &str| t.versions.get(v).copied().unwrap_or(0);
    format!(
        "demo finished after {}s of traffic: {} requests, catalog-v1 {}, catalog-v2 {}, errors {}",
        elapsed.as_secs(),
        t.requests,
        count("v1"),
        count("v2"),
        t.errors
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn tally(v1: &[(&str, u64)], v2: u64, errors: u64) -> Tally {
        let mut t = Tally::default();
        for (i, n) in v1 {
            *t.versions.entry("v1".into()).or_default() += n;
            t.instances.insert(format!("catalog-v1-{i}"), *n);
        }
        if v2 > 0 {
            t.versions.insert("v2".into(), v2);
            t.instances.insert("catalog-v2-0".into(), v2);
        }
        t.errors = errors;
        t.requests = t.versions.values().sum::<u64>() + errors;
        if errors > 0 {
            t.last_error = Some("HTTP 503 [no_healthy_upstream]".into());
        }
        t
    }

    #[test]
    fn summary_shows_the_split_since_the_last_line() {
        let before = tally(&[("0", 10), ("1", 8)], 2, 0);
        let now = tally(&[("0", 15), ("1", 13)], 12, 1);
        let l = line(Duration::from_secs(10), &before, &now);
        assert_eq!(
            l,
            "[  10s] last  21 requests:  catalog-v1  10 ( 47%) [v1-0:5 v1-1:5]  \
             catalog-v2  10 ( 47%)  errors 1 (last: HTTP 503 [no_healthy_upstream])"
        );
        assert_eq!(
            total(Duration::from_secs(10), &now),
            "demo finished after 10s of traffic: 41 requests, catalog-v1 28, catalog-v2 12, errors 1"
        );
    }
}

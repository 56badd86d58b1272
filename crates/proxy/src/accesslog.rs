//! Access log: one JSON object per line for every request or TCP connection.
//!
//! Purpose: a record a person (or a log pipeline) can read to see what
//! happened to a request: who called whom, which route and upstream were
//! chosen, what came back and, when the proxy answered itself, why
//! (`response_flags`, Envoy's codes, and `reason`, in words).
//!
//! Contract:
//! - [`AccessLog::log`] never blocks and never fails: entries go through a
//!   bounded channel to a background task; when the channel is full the entry
//!   is dropped and counted ([`AccessLog::dropped`]), and the writer task
//!   warns about drops at most once per flush interval.
//! - The writer task batches lines and writes them on a blocking thread
//!   (`spawn_blocking`), flushing when the batch is large, every
//!   `FLUSH_INTERVAL`, on [`AccessLog::flush`], and when the last handle is
//!   dropped.
//! - `None` fields are left out of the JSON; times are RFC 3339 UTC with
//!   milliseconds.
//!
//! Non-goals: configurable formats, log rotation (use a tool that reopens the
//! file, or log to stdout), sampling.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};
use tokio::sync::{mpsc, oneshot};

pub use crate::metrics::Direction;

/// Where the access log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    /// Appended to; created if missing.
    File(PathBuf),
    Off,
}

/// Errors creating an [`AccessLog`].
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("cannot open access log file {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the access log needs a tokio runtime to run its writer task")]
    NoRuntime,
}

/// Handle to the access log. Cheap to clone; the writer task ends (after a
/// final flush) when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<Msg>>,
    dropped: Arc<AtomicU64>,
}

/// One access log line. Build it with [`AccessLogEntry::new`] and fill in
/// what is known.
#[derive(Debug, Clone, Serialize)]
pub struct AccessLogEntry {
    /// When the request (HTTP) or connection (TCP) started.
    #[serde(serialize_with = "ser_time")]
    pub start_time: SystemTime,
    /// Until the last byte of the response (HTTP) or the close (TCP).
    #[serde(rename = "duration_ms", serialize_with = "ser_millis")]
    pub duration: Duration,
    pub direction: Direction,
    pub protocol: Protocol,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_display"
    )]
    pub method: Option<http::Method>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Status sent downstream; `None` if no response was sent (or TCP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u8>,
    /// Envoy-style codes, written comma-separated (`"UF,URX"`).
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "ser_flags")]
    pub response_flags: Vec<ResponseFlag>,
    /// Why, in words (e.g. the upstream connect error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_cluster: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_host: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downstream_remote: Option<SocketAddr>,
    /// SPIFFE id of the downstream mTLS peer (verified client certificate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downstream_peer_principal: Option<String>,
    /// SPIFFE id the upstream proved over mTLS (the cluster's expected id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_peer_principal: Option<String>,
    /// Body bytes (HTTP) or stream bytes (TCP) received from the downstream.
    pub bytes_received: u64,
    /// Body bytes (HTTP) or stream bytes (TCP) sent to the downstream.
    pub bytes_sent: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// `x-request-id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<String>,
}

/// Downstream protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Protocol {
    #[serde(rename = "HTTP/1.0")]
    Http10,
    #[serde(rename = "HTTP/1.1")]
    Http11,
    #[serde(rename = "HTTP/2")]
    Http2,
    #[serde(rename = "TCP")]
    Tcp,
}

/// Why the proxy did not simply forward the upstream's response. Codes follow
/// Envoy's `%RESPONSE_FLAGS%` where Envoy has one; `reason()` is the
/// `reason` label of `meshwork_responses_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResponseFlag {
    /// NR: no route matched (404).
    NoRoute,
    /// NC: the route's cluster is not in the config (503).
    NoCluster,
    /// UH: no healthy endpoint in the cluster (503).
    NoHealthyUpstream,
    /// UF: connecting to the upstream failed (refused, TLS, connect timeout) (503).
    UpstreamConnectFailure,
    /// UO: circuit breaker open / pool overflow (503).
    UpstreamOverflow,
    /// URX: retries or the retry budget ran out (log only; the last upstream
    /// response is forwarded).
    UpstreamRetryLimitExceeded,
    /// UR: the upstream reset the stream (503).
    UpstreamReset,
    /// UC: the upstream connection closed mid-request (503).
    UpstreamConnectionTermination,
    /// UT: the route timeout fired (504).
    UpstreamTimeout,
    /// SI: the stream idle timeout fired (408 or 504).
    StreamIdleTimeout,
    /// DC: the downstream went away before the response was complete.
    DownstreamDisconnect,
    /// DT: protocol detection timed out. (Envoy uses DT for "max duration
    /// reached"; meshwork has no such limit and reuses it here.)
    DetectionTimeout,
    /// RL: rate limited (429).
    RateLimited,
    /// UAEX: denied by an authorization policy (403).
    Unauthorized,
    /// FI: aborted by fault injection.
    FaultInjected,
    /// DI: delayed by fault injection (log only).
    DelayInjected,
    /// DPE: the downstream request was not valid HTTP (400).
    DownstreamProtocolError,
    /// UPE: the upstream response was not valid HTTP (502).
    UpstreamProtocolError,
    /// RBAC: denied by an authorization policy (403 / gRPC 7, or the TCP
    /// connection closed).
    RbacDenied,
}

enum Msg {
    Entry(Box<AccessLogEntry>),
    Flush(oneshot::Sender<()>),
}

/// Entries waiting for the writer; beyond this, `log` drops.
const CHANNEL_CAPACITY: usize = 4096;
/// Write the batch once it is this large.
const BATCH_BYTES: usize = 64 * 1024;
/// Write whatever is batched at least this often.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

impl AccessLog {
    /// Opens the target and starts the writer task. Must be called inside a
    /// tokio runtime (except for `Target::Off`).
    pub fn new(target: Target) -> Result<Self, AccessLogError> {
        Self::with_capacity(target, CHANNEL_CAPACITY)
    }

    /// Like `new`, with `capacity` entries of buffering before `log` drops.
    pub fn with_capacity(target: Target, capacity: usize) -> Result<Self, AccessLogError> {
        let dropped = Arc::new(AtomicU64::new(0));
        if target == Target::Off {
            return Ok(Self { tx: None, dropped });
        }
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| AccessLogError::NoRuntime)?;
        let writer: Box<dyn Write + Send> = match target {
            Target::Off => return Ok(Self { tx: None, dropped }),
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|source| AccessLogError::Open { path, source })?;
                Box::new(file)
            }
        };
        let (tx, rx) = mpsc::channel(capacity.max(1));
        runtime.spawn(write_loop(rx, writer, Arc::clone(&dropped)));
        Ok(Self {
            tx: Some(tx),
            dropped,
        })
    }

    /// A log that writes nothing.
    pub fn off() -> Self {
        Self {
            tx: None,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// False for `Target::Off`: callers can skip building entries.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues one entry; never blocks. Drops (and counts) it if the writer is
    /// behind.
    pub fn log(&self, entry: AccessLogEntry) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(Msg::Entry(Box::new(entry))).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Entries lost because the writer was behind or writing failed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until everything logged before this call is written and flushed.
    /// For shutdown and tests; not for the request path.
    pub async fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done_tx, done_rx) = oneshot::channel();
        if tx.send(Msg::Flush(done_tx)).await.is_ok() {
            // An error means the writer task is gone: nothing left to wait for.
            let _ = done_rx.await;
        }
    }
}

impl AccessLogEntry {
    /// An entry with every optional field empty and zero bytes.
    pub fn new(direction: Direction, protocol: Protocol, start_time: SystemTime) -> Self {
        Self {
            start_time,
            duration: Duration::ZERO,
            direction,
            protocol,
            method: None,
            authority: None,
            path: None,
            status: None,
            grpc_status: None,
            response_flags: Vec::new(),
            reason: None,
            route: None,
            upstream_cluster: None,
            upstream_host: None,
            downstream_remote: None,
            downstream_peer_principal: None,
            upstream_peer_principal: None,
            bytes_received: 0,
            bytes_sent: 0,
            user_agent: None,
            request_id: None,
            source_service: None,
            destination_service: None,
        }
    }

    /// One JSON line, with the trailing `\n`.
    pub fn to_json_line(&self) -> Vec<u8> {
        let mut line = Vec::with_capacity(512);
        self.write_json_line(&mut line);
        line
    }

    fn write_json_line(&self, out: &mut Vec<u8>) {
        // Every field serializes infallibly (strings, numbers, addresses), so
        // an error here would be a bug in this file; skip the line rather
        // than write half of it.
        let start = out.len();
        if serde_json::to_writer(&mut *out, self).is_ok() {
            out.push(b'\n');
        } else {
            out.truncate(start);
        }
    }
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http10 => "HTTP/1.0",
            Protocol::Http11 => "HTTP/1.1",
            Protocol::Http2 => "HTTP/2",
            Protocol::Tcp => "TCP",
        }
    }

    /// The HTTP version of a request (HTTP/0.9 counts as 1.0, HTTP/3 as 2:
    /// the proxy speaks neither).
    pub fn from_version(version: http::Version) -> Self {
        if version == http::Version::HTTP_2 || version == http::Version::HTTP_3 {
            Protocol::Http2
        } else if version == http::Version::HTTP_11 {
            Protocol::Http11
        } else {
            Protocol::Http10
        }
    }
}

impl ResponseFlag {
    /// Every flag, in `index()` order.
    pub const ALL: [ResponseFlag; 19] = [
        ResponseFlag::NoRoute,
        ResponseFlag::NoCluster,
        ResponseFlag::NoHealthyUpstream,
        ResponseFlag::UpstreamConnectFailure,
        ResponseFlag::UpstreamOverflow,
        ResponseFlag::UpstreamRetryLimitExceeded,
        ResponseFlag::UpstreamReset,
        ResponseFlag::UpstreamConnectionTermination,
        ResponseFlag::UpstreamTimeout,
        ResponseFlag::StreamIdleTimeout,
        ResponseFlag::DownstreamDisconnect,
        ResponseFlag::DetectionTimeout,
        ResponseFlag::RateLimited,
        ResponseFlag::Unauthorized,
        ResponseFlag::FaultInjected,
        ResponseFlag::DelayInjected,
        ResponseFlag::DownstreamProtocolError,
        ResponseFlag::UpstreamProtocolError,
        ResponseFlag::RbacDenied,
    ];

    /// Envoy's short code (`NR`, `UH`, ...).
    pub fn code(self) -> &'static str {
        match self {
            ResponseFlag::NoRoute => "NR",
            ResponseFlag::NoCluster => "NC",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamConnectFailure => "UF",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::UpstreamRetryLimitExceeded => "URX",
            ResponseFlag::UpstreamReset => "UR",
            ResponseFlag::UpstreamConnectionTermination => "UC",
            ResponseFlag::UpstreamTimeout => "UT",
            ResponseFlag::StreamIdleTimeout => "SI",
            ResponseFlag::DownstreamDisconnect => "DC",
            ResponseFlag::DetectionTimeout => "DT",
            ResponseFlag::RateLimited => "RL",
            ResponseFlag::Unauthorized => "UAEX",
            ResponseFlag::FaultInjected => "FI",
            ResponseFlag::DelayInjected => "DI",
            ResponseFlag::DownstreamProtocolError => "DPE",
            ResponseFlag::UpstreamProtocolError => "UPE",
            ResponseFlag::RbacDenied => "RBAC",
        }
    }

    /// snake_case name: the `reason` label of `meshwork_responses_total`.
    pub fn reason(self) -> &'static str {
        match self {
            ResponseFlag::NoRoute => "no_route",
            ResponseFlag::NoCluster => "no_cluster",
            ResponseFlag::NoHealthyUpstream => "no_endpoint",
            ResponseFlag::UpstreamConnectFailure => "connect_failure",
            ResponseFlag::UpstreamOverflow => "upstream_overflow",
            ResponseFlag::UpstreamRetryLimitExceeded => "retries_exhausted",
            ResponseFlag::UpstreamReset => "upstream_reset",
            ResponseFlag::UpstreamConnectionTermination => "upstream_closed",
            ResponseFlag::UpstreamTimeout => "timeout",
            ResponseFlag::StreamIdleTimeout => "idle_timeout",
            ResponseFlag::DownstreamDisconnect => "downstream_disconnect",
            ResponseFlag::DetectionTimeout => "detection_timeout",
            ResponseFlag::RateLimited => "rate_limited",
            ResponseFlag::Unauthorized => "denied",
            ResponseFlag::FaultInjected => "fault_abort",
            ResponseFlag::DelayInjected => "delay_injected",
            ResponseFlag::DownstreamProtocolError => "downstream_protocol_error",
            ResponseFlag::UpstreamProtocolError => "upstream_protocol_error",
            ResponseFlag::RbacDenied => "rbac_denied",
        }
    }

    /// Position in [`ResponseFlag::ALL`].
    pub fn index(self) -> u32 {
        self as u32
    }

    pub fn from_index(index: u32) -> Option<Self> {
        Self::ALL.get(usize::try_from(index).ok()?).copied()
    }
}

impl std::fmt::Display for ResponseFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// `2024-05-06T07:08:09.123Z`: RFC 3339, UTC, milliseconds. Times before
/// 1970 work too (years below 0 or above 9999 are not valid RFC 3339 and are
/// printed as they come).
pub fn rfc3339(t: SystemTime) -> String {
    let mut out = String::with_capacity(24);
    write_rfc3339(&mut out, t);
    out
}

/// Appends [`rfc3339`] of `t` to `out`.
pub fn write_rfc3339(out: &mut String, t: SystemTime) {
    use std::fmt::Write as _;
    let millis: i128 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_nanos() / 1_000_000) as i128,
        // Before the epoch: round towards the past, like after it.
        Err(e) => -(e.duration().as_nanos().div_ceil(1_000_000) as i128),
    };
    let secs = millis.div_euclid(1000);
    let ms = millis.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    );
}

/// Proleptic Gregorian date of a day count since 1970-01-01. Works in
/// 400-year eras (146 097 days), with years starting on March 1st so the
/// leap day is the last day of a year.
pub(crate) fn civil_from_days(days: i128) -> (i128, u32, u32) {
    let shifted = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097); // 0..=146_096
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365; // 0..=399
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100); // 0..=365
    let month_from_march = (5 * day_of_year + 2) / 153; // 0..=11
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32; // 1..=31
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_era + era * 400 + i128::from(month <= 2);
    (year, month, day)
}

async fn write_loop(
    mut rx: mpsc::Receiver<Msg>,
    writer: Box<dyn Write + Send>,
    dropped: Arc<AtomicU64>,
) {
    let mut writer = Some(writer);
    let mut batch: Vec<u8> = Vec::with_capacity(BATCH_BYTES);
    let mut ticker = tokio::time::interval(FLUSH_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported_drops = 0u64;
    loop {
        let msg = tokio::select! {
            msg = rx.recv() => msg,
            _ = ticker.tick() => {
                let now = dropped.load(Ordering::Relaxed);
                if now > reported_drops {
                    tracing::warn!(
                        dropped = now - reported_drops,
                        total = now,
                        "access log entries dropped: the writer cannot keep up"
                    );
                    reported_drops = now;
                }
                if !batch.is_empty() && !write_batch(&mut writer, &mut batch, &dropped).await {
                    return;
                }
                continue;
            }
        };
        match msg {
            Some(Msg::Entry(entry)) => {
                entry.write_json_line(&mut batch);
                if batch.len() >= BATCH_BYTES
                    && !write_batch(&mut writer, &mut batch, &dropped).await
                {
                    return;
                }
            }
            Some(Msg::Flush(done)) => {
                if !write_batch(&mut writer, &mut batch, &dropped).await {
                    return;
                }
                let _ = done.send(());
            }
            None => {
                write_batch(&mut writer, &mut batch, &dropped).await;
                return;
            }
        }
    }
}

/// Writes and flushes `batch` on a blocking thread (files and stdout are
/// blocking I/O). Returns false when the writer is lost and the task must end.
async fn write_batch(
    writer: &mut Option<Box<dyn Write + Send>>,
    batch: &mut Vec<u8>,
    dropped: &AtomicU64,
) -> bool {
    let Some(mut w) = writer.take() else {
        return false;
    };
    let lines = batch.iter().filter(|b| **b == b'\n').count() as u64;
    let buf = std::mem::take(batch);
    let result = tokio::task::spawn_blocking(move || {
        let result = w.write_all(&buf).and_then(|()| w.flush());
        (w, buf, result)
    })
    .await;
    match result {
        Ok((w, mut buf, result)) => {
            if let Err(e) = result {
                dropped.fetch_add(lines, Ordering::Relaxed);
                tracing::warn!(error = %e, lines, "writing the access log failed");
            }
            buf.clear();
            *batch = buf;
            *writer = Some(w);
            true
        }
        Err(e) => {
            dropped.fetch_add(lines, Ordering::Relaxed);
            if e.is_cancelled() {
                // The runtime is shutting down: nothing is lost that a flush
                // on shutdown (Proxy::shutdown) did not already write.
                tracing::debug!("access log writer stopped with the runtime");
            } else {
                tracing::error!(error = %e, "access log writer failed; access logging stops");
            }
            false
        }
    }
}

fn ser_time<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

fn ser_millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    // Microsecond resolution, as a decimal number of milliseconds.
    let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    s.serialize_f64(micros as f64 / 1000.0)
}

fn ser_opt_display<S: Serializer, T: std::fmt::Display>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

fn ser_flags<S: Serializer>(flags: &[ResponseFlag], s: S) -> Result<S::Ok, S::Error> {
    let mut text = String::with_capacity(flags.len() * 3);
    for (i, flag) in flags.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(flag.code());
    }
    s.serialize_str(&text)
}

#[cfg(test)]
mod tests;

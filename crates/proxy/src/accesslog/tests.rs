#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::*;

fn at(secs: u64, millis: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
}

fn temp_path(name: &str) -> PathBuf {
    let unique = format!(
        "meshwork-accesslog-{name}-{}-{}.jsonl",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    std::env::temp_dir().join(unique)
}

#[test]
fn rfc3339_known_instants() {
    assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    assert_eq!(rfc3339(at(951_782_400, 0)), "2000-02-29T00:00:00.000Z");
    assert_eq!(rfc3339(at(951_868_800, 1)), "2000-03-01T00:00:00.001Z");
    assert_eq!(rfc3339(at(1_735_689_599, 999)), "2024-12-31T23:59:59.999Z");
    assert_eq!(rfc3339(at(1_709_164_800, 0)), "2024-02-29T00:00:00.000Z");
    assert_eq!(rfc3339(at(4_102_444_800, 0)), "2100-01-01T00:00:00.000Z");
    assert_eq!(rfc3339(at(1_234_567_890, 123)), "2009-02-13T23:31:30.123Z");
    // Sub-millisecond parts are truncated, not rounded.
    assert_eq!(
        rfc3339(UNIX_EPOCH + Duration::from_micros(1_999)),
        "1970-01-01T00:00:00.001Z"
    );
    // Before the epoch.
    assert_eq!(
        rfc3339(UNIX_EPOCH - Duration::from_nanos(1)),
        "1969-12-31T23:59:59.999Z"
    );
    assert_eq!(
        rfc3339(UNIX_EPOCH - Duration::from_secs(86_400 * 365)),
        "1969-01-01T00:00:00.000Z"
    );
}

#[test]
fn rfc3339_days_are_consecutive() {
    // Walk every day from 1900 to 2400 and check the calendar rules.
    let leap = |y: i128| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_len = |y: i128, m: u32| match m {
        2 if leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    let mut prev = civil_from_days(-25_567 - 1); // 1899-12-31
    assert_eq!(prev, (1899, 12, 31));
    for day in -25_567..154_000 {
        let (y, m, d) = civil_from_days(day);
        let (py, pm, pd) = prev;
        let expected = if pd < month_len(py, pm) {
            (py, pm, pd + 1)
        } else if pm < 12 {
            (py, pm + 1, 1)
        } else {
            (py + 1, 1, 1)
        };
        assert_eq!((y, m, d), expected, "day {day}");
        prev = (y, m, d);
    }
}

#[test]
fn entry_json_skips_empty_fields() {
    let mut e = AccessLogEntry::new(Direction::Outbound, Protocol::Http11, at(1_700_000_000, 5));
    e.duration = Duration::from_micros(12_345);
    e.method = Some(http::Method::GET);
    e.path = Some("/a?b=\"c\"".into());
    e.status = Some(503);
    e.response_flags = vec![
        ResponseFlag::UpstreamConnectFailure,
        ResponseFlag::UpstreamRetryLimitExceeded,
    ];
    e.upstream_host = Some("10.0.0.2:8080".parse().unwrap());
    e.bytes_sent = 19;
    let line = e.to_json_line();
    assert_eq!(line.last(), Some(&b'\n'));
    let v: Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(v["start_time"], "2023-11-14T22:13:20.005Z");
    assert_eq!(v["duration_ms"], 12.345);
    assert_eq!(v["direction"], "outbound");
    assert_eq!(v["protocol"], "HTTP/1.1");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/a?b=\"c\"");
    assert_eq!(v["status"], 503);
    assert_eq!(v["response_flags"], "UF,URX");
    assert_eq!(v["upstream_host"], "10.0.0.2:8080");
    assert_eq!(v["bytes_received"], 0);
    assert_eq!(v["bytes_sent"], 19);
    for absent in [
        "authority",
        "grpc_status",
        "reason",
        "route",
        "user_agent",
        "request_id",
        "downstream_remote",
        "source_service",
    ] {
        assert!(v.get(absent).is_none(), "{absent} should be skipped: {v}");
    }
}

#[test]
fn response_flags_are_consistent() {
    let mut codes = std::collections::HashSet::new();
    let mut reasons = std::collections::HashSet::new();
    for (i, flag) in ResponseFlag::ALL.iter().enumerate() {
        assert_eq!(flag.index() as usize, i);
        assert_eq!(ResponseFlag::from_index(flag.index()), Some(*flag));
        assert!(codes.insert(flag.code()), "duplicate code {}", flag.code());
        assert!(
            reasons.insert(flag.reason()),
            "duplicate reason {}",
            flag.reason()
        );
    }
    assert_eq!(
        ResponseFlag::from_index(ResponseFlag::ALL.len() as u32),
        None
    );
    assert_eq!(ResponseFlag::NoRoute.code(), "NR");
    assert_eq!(ResponseFlag::NoHealthyUpstream.reason(), "no_endpoint");
}

#[tokio::test]
async fn writes_json_lines_to_a_file() {
    let path = temp_path("file");
    let log = AccessLog::new(Target::File(path.clone())).unwrap();
    assert!(log.enabled());
    for i in 0..3u16 {
        let mut e = AccessLogEntry::new(Direction::Inbound, Protocol::Http2, SystemTime::now());
        e.status = Some(200 + i);
        e.request_id = Some(format!("req-{i}"));
        e.source_service = Some("web.default".into());
        log.clone().log(e);
    }
    log.flush().await;
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[2]["request_id"], "req-2");
    assert_eq!(lines[1]["protocol"], "HTTP/2");
    assert_eq!(log.dropped(), 0);

    // More lines after a flush are appended, and dropping the last handle
    // flushes what is left.
    let mut tcp = AccessLogEntry::new(Direction::Outbound, Protocol::Tcp, SystemTime::now());
    tcp.bytes_received = 10;
    log.log(tcp);
    log.flush().await;
    drop(log);
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 4);
    assert!(text
        .lines()
        .last()
        .unwrap()
        .contains("\"protocol\":\"TCP\""));
    std::fs::remove_file(&path).unwrap();
}

#[tokio::test]
async fn a_full_channel_drops_and_counts() {
    let path = temp_path("drops");
    let log = AccessLog::with_capacity(Target::File(path.clone()), 4).unwrap();
    // The current-thread runtime cannot run the writer until this test
    // awaits, so the first 4 entries fill the channel and the rest drop.
    for _ in 0..10 {
        log.log(AccessLogEntry::new(
            Direction::Inbound,
            Protocol::Tcp,
            SystemTime::now(),
        ));
    }
    assert_eq!(log.dropped(), 6);
    log.flush().await;
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 4);
    std::fs::remove_file(&path).unwrap();
}

#[tokio::test]
async fn off_logs_nothing() {
    let log = AccessLog::new(Target::Off).unwrap();
    assert!(!log.enabled());
    log.log(AccessLogEntry::new(
        Direction::Inbound,
        Protocol::Tcp,
        SystemTime::now(),
    ));
    log.flush().await;
    assert_eq!(log.dropped(), 0);
}

#[tokio::test]
async fn an_unopenable_file_is_an_error() {
    let dir = temp_path("missing-dir");
    let err = AccessLog::new(Target::File(dir.join("x/y.log"))).unwrap_err();
    assert!(matches!(err, AccessLogError::Open { .. }), "{err}");
    assert!(err.to_string().contains("cannot open access log file"));
}

#[test]
fn outside_a_runtime_is_an_error() {
    let path = temp_path("noruntime");
    let err = AccessLog::new(Target::File(path.clone())).unwrap_err();
    assert!(matches!(err, AccessLogError::NoRuntime), "{err}");
    assert!(!path.exists(), "nothing is created on error");
    // Off needs no runtime.
    assert!(!AccessLog::new(Target::Off).unwrap().enabled());
}

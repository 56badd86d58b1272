#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::accesslog::ResponseFlag;

fn labels(route: &str) -> HttpLabels {
    HttpLabels {
        direction: Direction::Outbound,
        source_service: "web.default".into(),
        destination_service: "api.default".into(),
        route: route.into(),
        source_principal: String::new(),
    }
}

/// The sample lines of `name` (exact metric name, before `{` or ` `).
fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .collect()
}

fn value(line: &str) -> f64 {
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn histogram_buckets_are_cumulative() {
    let m = Metrics::new();
    let s = m.http(&labels("default/r/0"));
    s.observe(200, None, Duration::from_micros(300)); // <= 0.0005
    s.observe(200, None, Duration::from_millis(1)); // == 0.001 (le is inclusive)
    s.observe(200, None, Duration::from_millis(7)); // <= 0.01
    s.observe(503, None, Duration::from_secs(30)); // +Inf only
    let text = m.render();

    let buckets = samples(&text, "meshwork_request_duration_seconds_bucket");
    assert_eq!(buckets.len(), LATENCY_BUCKETS.len() + 1);
    let get = |le: &str| {
        let needle = format!("le=\"{le}\"");
        value(buckets.iter().find(|l| l.contains(&needle)).unwrap())
    };
    assert_eq!(get("0.0005"), 1.0);
    assert_eq!(get("0.001"), 2.0);
    assert_eq!(get("0.005"), 2.0);
    assert_eq!(get("0.01"), 3.0);
    assert_eq!(get("10"), 3.0);
    assert_eq!(get("+Inf"), 4.0);
    // Never decreasing from one bucket to the next.
    let values: Vec<f64> = buckets.iter().map(|l| value(l)).collect();
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "{values:?}");

    let count = samples(&text, "meshwork_request_duration_seconds_count");
    assert_eq!(value(count[0]), 4.0);
    let sum = value(samples(&text, "meshwork_request_duration_seconds_sum")[0]);
    assert!((sum - 30.0083).abs() < 1e-9, "{sum}");
}

#[test]
fn requests_are_counted_by_code_and_grpc_status() {
    let m = Metrics::new();
    let s = m.http(&labels("default/r/0"));
    for _ in 0..3 {
        s.observe(200, None, Duration::from_millis(1));
    }
    s.observe(200, Some(14), Duration::from_millis(1));
    s.observe(404, None, Duration::from_millis(1));
    // The same label set returns the same handle.
    m.http(&labels("default/r/0"))
        .observe(200, None, Duration::from_millis(1));
    let text = m.render();
    let lines = samples(&text, "meshwork_requests_total");
    let common = r#"direction="outbound",source_service="web.default",destination_service="api.default",route="default/r/0""#;
    assert!(
        lines.contains(&format!("meshwork_requests_total{{{common},code=\"200\"}} 4").as_str()),
        "{text}"
    );
    assert!(lines.contains(
        &format!("meshwork_requests_total{{{common},code=\"200\",grpc_status=\"14\"}} 1").as_str()
    ));
    assert!(lines.contains(&format!("meshwork_requests_total{{{common},code=\"404\"}} 1").as_str()));
    assert_eq!(lines.len(), 3);
}

#[test]
fn many_distinct_codes_are_all_counted() {
    // More distinct (code, grpc) pairs than lock-free slots.
    let m = Metrics::new();
    let s = m.http(&labels("r"));
    for code in 200..240u16 {
        s.observe(code, None, Duration::ZERO);
        s.observe(code, None, Duration::ZERO);
    }
    let text = m.render();
    let lines = samples(&text, "meshwork_requests_total");
    assert_eq!(lines.len(), 40);
    assert!(lines.iter().all(|l| value(l) == 2.0));
    assert!(lines.iter().any(|l| l.contains("code=\"239\"")));
}

#[test]
fn concurrent_observations_are_not_lost() {
    let m = Arc::new(Metrics::new());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let m = Arc::clone(&m);
            std::thread::spawn(move || {
                let s = m.http(&labels("r"));
                for i in 0..1000u16 {
                    s.observe(200 + (i + t) % 20, None, Duration::from_millis(2));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let text = m.render();
    let total: f64 = samples(&text, "meshwork_requests_total")
        .iter()
        .map(|l| value(l))
        .sum();
    assert_eq!(total, 4000.0);
    let count = value(samples(&text, "meshwork_request_duration_seconds_count")[0]);
    assert_eq!(count, 4000.0);
}

#[test]
fn local_responses_have_a_reason() {
    let m = Metrics::new();
    let s = m.http(&labels(""));
    s.local_response(ResponseFlag::NoRoute, 404);
    s.local_response(ResponseFlag::NoRoute, 404);
    s.local_response(ResponseFlag::UpstreamConnectFailure, 503);
    let text = m.render();
    let lines = samples(&text, "meshwork_responses_total");
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines
        .iter()
        .any(|l| l.ends_with(r#"code="404",reason="no_route"} 2"#)));
    assert!(lines
        .iter()
        .any(|l| l.ends_with(r#"code="503",reason="connect_failure"} 1"#)));
}

#[test]
fn label_values_are_escaped() {
    let m = Metrics::new();
    m.http(&labels("a\"b\\c\nd"))
        .observe(200, None, Duration::ZERO);
    let text = m.render();
    assert!(
        text.contains(r#"route="a\"b\\c\nd""#),
        "escaped value missing:\n{text}"
    );
    // Every sample stays on one line.
    assert!(samples(&text, "meshwork_requests_total").len() == 1);
}

#[test]
fn help_and_type_once_per_family() {
    let m = Metrics::new();
    for route in ["a", "b", "c"] {
        m.http(&labels(route)).observe(200, None, Duration::ZERO);
    }
    let tcp = m.tcp(&TcpLabels {
        direction: Direction::Inbound,
        source_service: "web.default".into(),
        destination_service: "db.default".into(),
        source_principal: String::new(),
    });
    tcp.opened();
    tcp.received(100);
    tcp.sent(2000);
    m.listener("outbound_http").detection_timeout();
    m.config_accepted("listeners", "v1");
    let text = m.render();

    let mut types = std::collections::HashMap::new();
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split(' ').nth(2).unwrap();
        *types.entry(name).or_insert(0) += 1;
    }
    assert!(types.values().all(|n| *n == 1), "{types:?}");
    let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
    assert_eq!(helps, types.len());
    assert_eq!(types["meshwork_request_duration_seconds"], 1);

    // Each TYPE comes right after its HELP and before the family's samples.
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap();
            assert!(lines[i - 1].starts_with(&format!("# HELP {name} ")));
        }
    }
    // Series are sorted: route a before b before c.
    let routes: Vec<&str> = samples(&text, "meshwork_requests_total")
        .iter()
        .map(|l| {
            l.split("route=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(routes, ["a", "b", "c"]);
}

#[test]
fn tcp_listener_and_config_families() {
    let m = Metrics::new();
    let tcp = m.tcp(&TcpLabels {
        direction: Direction::Inbound,
        source_service: "web.default".into(),
        destination_service: "db.default".into(),
        source_principal: String::new(),
    });
    tcp.opened();
    tcp.opened();
    tcp.closed();
    tcp.received(100);
    tcp.sent(2000);

    let listener = m.listener("inbound");
    let first = listener.connection();
    let second = m.listener("inbound").connection();
    drop(first);
    listener.detection_timeout();
    assert_eq!(listener.active(), 1);

    m.config_accepted("clusters", "7");
    m.config_rejected("clusters");
    m.config_accepted("clusters", "8");

    let text = m.render();
    let tcp_labels =
        r#"{direction="inbound",source_service="web.default",destination_service="db.default"}"#;
    for expected in [
        format!("meshwork_tcp_connections_opened_total{tcp_labels} 2"),
        format!("meshwork_tcp_connections_closed_total{tcp_labels} 1"),
        format!("meshwork_tcp_received_bytes_total{tcp_labels} 100"),
        format!("meshwork_tcp_sent_bytes_total{tcp_labels} 2000"),
        r#"meshwork_downstream_connections_active{listener="inbound"} 1"#.into(),
        r#"meshwork_downstream_connections_total{listener="inbound"} 2"#.into(),
        r#"meshwork_protocol_detection_timeouts_total{listener="inbound"} 1"#.into(),
        r#"meshwork_config_updates_total{type="clusters",result="accepted"} 2"#.into(),
        r#"meshwork_config_updates_total{type="clusters",result="rejected"} 1"#.into(),
        r#"meshwork_config_version_info{type="clusters",version="8"} 1"#.into(),
    ] {
        assert!(
            text.lines().any(|l| l == expected),
            "missing {expected}\n{text}"
        );
    }
    drop(second);
    assert!(m
        .render()
        .contains(r#"meshwork_downstream_connections_active{listener="inbound"} 0"#));
}

#[test]
fn empty_registry_renders_only_metadata() {
    let text = Metrics::new().render();
    assert!(text.lines().all(|l| l.starts_with("# ")), "{text}");
    assert!(text.contains("# TYPE meshwork_requests_total counter"));
}

#[test]
fn keys_round_trip() {
    for code in [0u16, 100, 200, 599, 999, u16::MAX] {
        for grpc in [None, Some(0u8), Some(16), Some(u8::MAX)] {
            let key = request_key(code, grpc);
            assert_ne!(key, 0);
            assert_eq!(decode_request_key(key), (code, grpc));
        }
    }
    for flag in ResponseFlag::ALL {
        let key = response_key(flag, 503);
        assert_eq!(decode_response_key(key), Some((flag, 503)));
    }
}

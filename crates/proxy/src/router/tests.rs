#![allow(clippy::unwrap_used, clippy::expect_used)]

use http::{HeaderName, HeaderValue, Method, Request};
use regex::Regex;

use super::*;
use crate::config::model::{Forward, HeaderMods, RouteAction};

fn vh(name: &str, domains: &[&str]) -> VirtualHost {
    VirtualHost {
        name: name.into(),
        domains: domains.iter().map(|d| d.to_string()).collect(),
        routes: vec![],
        request_headers: HeaderMods::default(),
        response_headers: HeaderMods::default(),
    }
}

fn table(hosts: Vec<VirtualHost>) -> RouteTable {
    RouteTable::new("rc".into(), hosts).unwrap()
}

fn vhost_name<'a>(t: &'a RouteTable, authority: &str) -> Option<&'a str> {
    select_vhost(t, authority).map(|v| v.name.as_str())
}

fn full(pattern: &str) -> Regex {
    Regex::new(&format!("^(?:{pattern})$")).unwrap()
}

fn route(name: &str, path: PathMatch) -> Route {
    Route {
        name: name.into(),
        matcher: RouteMatch {
            path,
            headers: vec![],
            query: vec![],
            pseudo_headers: vec![],
        },
        action: RouteAction::Direct {
            status: 200,
            body: String::new(),
        },
        request_headers: HeaderMods::default(),
        response_headers: HeaderMods::default(),
        rate_limit: None,
        fault: None,
    }
}

fn with_routes(routes: Vec<Route>) -> VirtualHost {
    VirtualHost {
        routes,
        ..vh("vh", &["*"])
    }
}

fn req(method: Method, uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn get(uri: &str) -> Parts {
    req(Method::GET, uri, &[])
}

fn chosen<'a>(v: &'a VirtualHost, r: &Parts) -> Option<&'a str> {
    select_route(v, r).map(|r| r.name.as_str())
}

fn header_match(name: &str, matcher: StringMatch, invert: bool) -> HeaderMatch {
    HeaderMatch {
        name: HeaderName::from_bytes(name.as_bytes()).unwrap(),
        matcher,
        invert,
    }
}

/// A virtual host with one route carrying `m` (path prefix `/`).
fn only(m: impl FnOnce(&mut RouteMatch)) -> VirtualHost {
    let mut r = route("r", PathMatch::Prefix("/".into()));
    m(&mut r.matcher);
    with_routes(vec![r])
}

fn matches(v: &VirtualHost, r: &Parts) -> bool {
    select_route(v, r).is_some()
}

fn wc(name: &str, weight: u32) -> WeightedCluster {
    WeightedCluster {
        name: name.into(),
        weight,
        request_headers: HeaderMods::default(),
        response_headers: HeaderMods::default(),
    }
}

// ---------------------------------------------------------------------------
// Virtual hosts

#[test]
fn exact_domain_beats_wildcards() {
    let t = table(vec![
        vh("wild", &["*.example.com"]),
        vh("exact", &["api.example.com"]),
        vh("default", &["*"]),
    ]);
    assert_eq!(vhost_name(&t, "api.example.com"), Some("exact"));
    assert_eq!(vhost_name(&t, "web.example.com"), Some("wild"));
    assert_eq!(vhost_name(&t, "other.org"), Some("default"));
}

#[test]
fn longest_suffix_wins_then_prefix_then_default() {
    let t = table(vec![
        vh("short", &["*.com"]),
        vh("long", &["*-bar.baz.com"]),
        vh("mid", &["*.baz.com"]),
        vh("prefix", &["foo-bar.*"]),
        vh("prefix-long", &["foo-bar.baz.*"]),
        vh("default", &["*"]),
    ]);
    assert_eq!(vhost_name(&t, "foo-bar.baz.com"), Some("long"));
    assert_eq!(vhost_name(&t, "foo.baz.com"), Some("mid"));
    assert_eq!(vhost_name(&t, "foo.com"), Some("short"));
    // Suffix wildcards are tried before prefix wildcards.
    assert_eq!(vhost_name(&t, "foo-bar.baz.org"), Some("prefix-long"));
    assert_eq!(vhost_name(&t, "foo-bar.net"), Some("prefix"));
    assert_eq!(vhost_name(&t, "unrelated"), Some("default"));
}

#[test]
fn wildcard_must_cover_at_least_one_character() {
    let t = table(vec![vh("wild", &["*.foo.com"])]);
    assert_eq!(vhost_name(&t, ".foo.com"), None);
    assert_eq!(vhost_name(&t, "foo.com"), None);
    assert_eq!(vhost_name(&t, "a.foo.com"), Some("wild"));
    let t = table(vec![vh("pre", &["foo.*"])]);
    assert_eq!(vhost_name(&t, "foo."), None);
    assert_eq!(vhost_name(&t, "foo.x"), Some("pre"));
}

#[test]
fn host_is_case_insensitive() {
    let t = table(vec![
        vh("a", &["Web.Default:80"]),
        vh("b", &["*.Example.COM"]),
    ]);
    assert_eq!(vhost_name(&t, "web.default:80"), Some("a"));
    assert_eq!(vhost_name(&t, "WEB.DEFAULT:80"), Some("a"));
    assert_eq!(vhost_name(&t, "API.example.com"), Some("b"));
}

#[test]
fn port_is_part_of_the_domain() {
    let t = table(vec![
        vh("bare", &["web.default"]),
        vh("port", &["web.default:8080"]),
    ]);
    assert_eq!(vhost_name(&t, "web.default"), Some("bare"));
    assert_eq!(vhost_name(&t, "web.default:8080"), Some("port"));
    // Envoy does not strip the port: no match without a default host.
    assert_eq!(vhost_name(&t, "web.default:9090"), None);
    // A suffix wildcard sees the port too.
    let t = table(vec![vh("wild", &["*.default"])]);
    assert_eq!(vhost_name(&t, "web.default"), Some("wild"));
    assert_eq!(vhost_name(&t, "web.default:80"), None);
    let t = table(vec![vh("wild", &["*.default:80"])]);
    assert_eq!(vhost_name(&t, "web.default:80"), Some("wild"));
}

#[test]
fn only_default_host_serves_everything() {
    let t = table(vec![vh("default", &["*"])]);
    assert_eq!(vhost_name(&t, ""), Some("default"));
    assert_eq!(vhost_name(&t, "anything:1234"), Some("default"));
    let empty = table(vec![]);
    assert_eq!(vhost_name(&empty, "x"), None);
}

#[test]
fn non_ascii_authorities_do_not_panic() {
    let t = table(vec![
        vh("wild", &["*.é.com"]),
        vh("pre", &["ab*"]),
        vh("x", &["x"]),
    ]);
    for host in ["é", "aé", "éé.é.com", "a.é.com", "abé", "€€€€", "é.com"] {
        let _ = select_vhost(&t, host);
    }
    assert_eq!(vhost_name(&t, "a.é.com"), Some("wild"));
    assert_eq!(vhost_name(&t, "abé"), Some("pre"));
}

/// Envoy's rules written the slow, obvious way: scan every domain.
fn reference_vhost(hosts: &[VirtualHost], authority: &str) -> Option<usize> {
    let host = authority.to_ascii_lowercase();
    let domains = || {
        hosts
            .iter()
            .enumerate()
            .flat_map(|(i, v)| v.domains.iter().map(move |d| (i, d.to_ascii_lowercase())))
    };
    if let Some((i, _)) = domains().find(|(_, d)| *d == host) {
        return Some(i);
    }
    let best = |candidates: Vec<(usize, usize)>| candidates.into_iter().max_by_key(|c| c.1);
    let suffix = best(
        domains()
            .filter(|(_, d)| d.len() > 1 && d.starts_with('*'))
            .filter(|(_, d)| host.len() > d.len() - 1 && host.ends_with(&d[1..]))
            .map(|(i, d)| (i, d.len()))
            .collect(),
    );
    if let Some((i, _)) = suffix {
        return Some(i);
    }
    let prefix = best(
        domains()
            .filter(|(_, d)| d.len() > 1 && !d.starts_with('*') && d.ends_with('*'))
            .filter(|(_, d)| host.len() > d.len() - 1 && host.starts_with(&d[..d.len() - 1]))
            .map(|(i, d)| (i, d.len()))
            .collect(),
    );
    if let Some((i, _)) = prefix {
        return Some(i);
    }
    domains().find(|(_, d)| d == "*").map(|(i, _)| i)
}

#[test]
fn indexed_lookup_agrees_with_a_full_scan() {
    let mut rng = fastrand::Rng::with_seed(42);
    let word = |rng: &mut fastrand::Rng| -> String {
        let parts = ["a", "b", "A", ".", "-", ":80", "x.", ".y", "ab"];
        (0..rng.usize(0..4))
            .map(|_| parts[rng.usize(..parts.len())])
            .collect()
    };
    let mut tables = 0;
    for _ in 0..3000 {
        let hosts: Vec<VirtualHost> = (0..rng.usize(1..5))
            .map(|i| {
                let domains: Vec<String> = (0..rng.usize(1..4))
                    .map(|_| match rng.u8(0..5) {
                        0 => format!("*{}", word(&mut rng)),
                        1 => format!("{}*", word(&mut rng)),
                        _ => word(&mut rng),
                    })
                    .collect();
                let refs: Vec<&str> = domains.iter().map(String::as_str).collect();
                vh(&i.to_string(), &refs)
            })
            .collect();
        // Duplicate domains are refused at load time; skip those sets.
        let Ok(t) = RouteTable::new("rc".into(), hosts.clone()) else {
            continue;
        };
        tables += 1;
        for _ in 0..20 {
            let authority = word(&mut rng);
            let got = select_vhost(&t, &authority).map(|v| v.name.parse::<usize>().unwrap());
            assert_eq!(
                got,
                reference_vhost(&hosts, &authority),
                "authority {authority:?} against {:?}",
                hosts.iter().map(|h| &h.domains).collect::<Vec<_>>()
            );
        }
    }
    assert!(tables > 500, "only {tables} valid tables generated");
}

// ---------------------------------------------------------------------------
// Routes: paths

#[test]
fn prefix_matches_the_start_of_the_path() {
    let v = with_routes(vec![route("api", PathMatch::Prefix("/api".into()))]);
    assert_eq!(chosen(&v, &get("/api")), Some("api"));
    assert_eq!(chosen(&v, &get("/api/users?x=1")), Some("api"));
    assert_eq!(chosen(&v, &get("/apis")), Some("api"));
    assert_eq!(chosen(&v, &get("/ap")), None);
    // Case-sensitive, as Envoy's default.
    assert_eq!(chosen(&v, &get("/API")), None);
    // Absolute-form (HTTP/2, proxies) is matched on its path.
    assert_eq!(chosen(&v, &get("http://web.default/api/x")), Some("api"));
}

#[test]
fn exact_path_ignores_the_query() {
    let v = with_routes(vec![route("exact", PathMatch::Exact("/health".into()))]);
    assert_eq!(chosen(&v, &get("/health")), Some("exact"));
    assert_eq!(chosen(&v, &get("/health?verbose=1")), Some("exact"));
    assert_eq!(chosen(&v, &get("/health/")), None);
    assert_eq!(chosen(&v, &get("/healthz")), None);
}

#[test]
fn separated_prefix_stops_at_a_slash() {
    let v = with_routes(vec![route(
        "sep",
        PathMatch::SeparatedPrefix("/api".into()),
    )]);
    assert_eq!(chosen(&v, &get("/api")), Some("sep"));
    assert_eq!(chosen(&v, &get("/api/")), Some("sep"));
    assert_eq!(chosen(&v, &get("/api/v1")), Some("sep"));
    assert_eq!(chosen(&v, &get("/api?q=1")), Some("sep"));
    assert_eq!(chosen(&v, &get("/apix")), None);
    assert_eq!(chosen(&v, &get("/ap")), None);
}

#[test]
fn regex_must_match_the_whole_path_without_query() {
    let v = with_routes(vec![route("re", PathMatch::Regex(full("/v[0-9]+/.*")))]);
    assert_eq!(chosen(&v, &get("/v2/items")), Some("re"));
    assert_eq!(chosen(&v, &get("/v2/items?x=/v3/")), Some("re"));
    assert_eq!(chosen(&v, &get("/api/v2/items")), None);
    assert_eq!(chosen(&v, &get("/v2")), None);
}

#[test]
fn first_matching_route_wins() {
    let v = with_routes(vec![
        route("exact", PathMatch::Exact("/a/b".into())),
        route("long", PathMatch::Prefix("/a/".into())),
        route("short", PathMatch::Prefix("/".into())),
        route("never", PathMatch::Prefix("/a/b".into())),
    ]);
    assert_eq!(chosen(&v, &get("/a/b")), Some("exact"));
    assert_eq!(chosen(&v, &get("/a/b/c")), Some("long"));
    assert_eq!(chosen(&v, &get("/x")), Some("short"));
    // Order, not specificity, decides.
    let v = with_routes(vec![
        route("catch-all", PathMatch::Prefix("/".into())),
        route("specific", PathMatch::Exact("/a".into())),
    ]);
    assert_eq!(chosen(&v, &get("/a")), Some("catch-all"));
}

#[test]
fn conditions_combine_with_and() {
    let mut r = route("both", PathMatch::Prefix("/api".into()));
    r.matcher.headers = vec![header_match(
        "x-env",
        StringMatch::Exact("prod".into()),
        false,
    )];
    r.matcher.query = vec![QueryMatch {
        name: "v".into(),
        matcher: StringMatch::Exact("2".into()),
    }];
    r.matcher.pseudo_headers = vec![PseudoHeaderMatch {
        header: PseudoHeader::Method,
        matcher: StringMatch::Exact("POST".into()),
        invert: false,
    }];
    let v = with_routes(vec![r, route("fallback", PathMatch::Prefix("/".into()))]);
    let ok = req(Method::POST, "/api/x?v=2", &[("x-env", "prod")]);
    assert_eq!(chosen(&v, &ok), Some("both"));
    for miss in [
        req(Method::GET, "/api/x?v=2", &[("x-env", "prod")]),
        req(Method::POST, "/api/x?v=3", &[("x-env", "prod")]),
        req(Method::POST, "/api/x?v=2", &[("x-env", "dev")]),
        req(Method::POST, "/other?v=2", &[("x-env", "prod")]),
    ] {
        assert_eq!(chosen(&v, &miss), Some("fallback"));
    }
}

// ---------------------------------------------------------------------------
// Routes: headers

#[test]
fn every_string_matcher_on_headers() {
    let cases: Vec<(StringMatch, &str, bool)> = vec![
        (StringMatch::Exact("abc".into()), "abc", true),
        (StringMatch::Exact("abc".into()), "abcd", false),
        (StringMatch::Exact("abc".into()), "ABC", false),
        (StringMatch::Prefix("ab".into()), "abc", true),
        (StringMatch::Prefix("ab".into()), "cab", false),
        (StringMatch::Suffix("bc".into()), "abc", true),
        (StringMatch::Suffix("bc".into()), "bca", false),
        (StringMatch::Contains("b".into()), "abc", true),
        (StringMatch::Contains("x".into()), "abc", false),
        (StringMatch::Regex(full("a.c")), "abc", true),
        (StringMatch::Regex(full("a.c")), "xabc", false),
        (StringMatch::Present, "", true),
        (StringMatch::Exact(String::new()), "", true),
    ];
    for (m, value, expected) in cases {
        let label = format!("{m:?} on {value:?}");
        let v = only(|rm| rm.headers = vec![header_match("x-h", m, false)]);
        let r = req(Method::GET, "/", &[("x-h", value)]);
        assert_eq!(matches(&v, &r), expected, "{label}");
    }
}

#[test]
fn inverted_matchers_and_missing_headers() {
    let inverted =
        only(|m| m.headers = vec![header_match("x-h", StringMatch::Exact("a".into()), true)]);
    assert!(!matches(&inverted, &req(Method::GET, "/", &[("x-h", "a")])));
    assert!(matches(&inverted, &req(Method::GET, "/", &[("x-h", "b")])));
    // Envoy: a value matcher on a missing header fails, inverted or not.
    assert!(!matches(&inverted, &get("/")));
    let plain =
        only(|m| m.headers = vec![header_match("x-h", StringMatch::Exact("a".into()), false)]);
    assert!(!matches(&plain, &get("/")));

    let present = only(|m| m.headers = vec![header_match("x-h", StringMatch::Present, false)]);
    assert!(matches(&present, &req(Method::GET, "/", &[("x-h", "")])));
    assert!(!matches(&present, &get("/")));
    // Inverted presence is absence.
    let absent = only(|m| m.headers = vec![header_match("x-h", StringMatch::Present, true)]);
    assert!(matches(&absent, &get("/")));
    assert!(!matches(&absent, &req(Method::GET, "/", &[("x-h", "v")])));
}

#[test]
fn repeated_headers_are_joined_with_commas() {
    let v = only(|m| {
        m.headers = vec![header_match(
            "x-h",
            StringMatch::Exact("a,b,c".into()),
            false,
        )]
    });
    let r = req(
        Method::GET,
        "/",
        &[("x-h", "a"), ("x-h", "b"), ("x-h", "c")],
    );
    assert!(matches(&v, &r));
    let v = only(|m| m.headers = vec![header_match("x-h", StringMatch::Exact("a".into()), false)]);
    assert!(!matches(&v, &r));
}

#[test]
fn header_names_are_case_insensitive_values_are_not() {
    let v = only(|m| {
        m.headers = vec![header_match(
            "x-env",
            StringMatch::Exact("Prod".into()),
            false,
        )]
    });
    assert!(matches(&v, &req(Method::GET, "/", &[("X-Env", "Prod")])));
    assert!(!matches(&v, &req(Method::GET, "/", &[("x-env", "prod")])));
}

#[test]
fn non_utf8_header_values_do_not_match_regexes() {
    let v =
        only(|m| m.headers = vec![header_match("x-bin", StringMatch::Regex(full(".*")), false)]);
    let mut r = get("/");
    r.headers.insert(
        HeaderName::from_static("x-bin"),
        HeaderValue::from_bytes(&[0xff, 0xfe]).unwrap(),
    );
    assert!(!matches(&v, &r));
    let v = only(|m| m.headers = vec![header_match("x-bin", StringMatch::Present, false)]);
    assert!(matches(&v, &r));
}

#[test]
fn method_is_matched_as_the_method_pseudo_header() {
    let method = |m: StringMatch, invert: bool| {
        only(move |rm| {
            rm.pseudo_headers = vec![PseudoHeaderMatch {
                header: PseudoHeader::Method,
                matcher: m,
                invert,
            }]
        })
    };
    let post = method(StringMatch::Exact("POST".into()), false);
    assert!(matches(&post, &req(Method::POST, "/", &[])));
    assert!(!matches(&post, &get("/")));
    let not_get = method(StringMatch::Exact("GET".into()), true);
    assert!(matches(&not_get, &req(Method::DELETE, "/", &[])));
    assert!(!matches(&not_get, &get("/")));
    let custom = method(StringMatch::Regex(full("PURGE|BAN")), false);
    assert!(matches(
        &custom,
        &req(Method::from_bytes(b"PURGE").unwrap(), "/", &[])
    ));
}

// ---------------------------------------------------------------------------
// Routes: query parameters

#[test]
fn query_parameters_are_matched_raw_and_first_wins() {
    let q = |name: &str, m: StringMatch| {
        let name = name.to_string();
        only(move |rm| rm.query = vec![QueryMatch { name, matcher: m }])
    };
    let exact = q("name", StringMatch::Exact("a b".into()));
    // Raw values: the encoded form does not match the decoded pattern.
    assert!(!matches(&exact, &get("/?name=a%20b")));
    let encoded = q("name", StringMatch::Exact("a%20b".into()));
    assert!(matches(&encoded, &get("/?name=a%20b")));

    let first = q("v", StringMatch::Exact("1".into()));
    assert!(matches(&first, &get("/?v=1&v=2")));
    assert!(!matches(&first, &get("/?v=2&v=1")));
    assert!(matches(&first, &get("/?a=0&v=1")));

    let present = q("debug", StringMatch::Present);
    assert!(matches(&present, &get("/?debug")));
    assert!(matches(&present, &get("/?x=1&debug=")));
    assert!(!matches(&present, &get("/?debugger=1")));
    assert!(!matches(&present, &get("/")));
    assert!(!matches(&present, &get("/debug")));

    // A parameter without `=` has the empty value.
    let empty = q("flag", StringMatch::Exact(String::new()));
    assert!(matches(&empty, &get("/?flag")));
    let value = q("k", StringMatch::Exact("a=b".into()));
    assert!(matches(&value, &get("/?k=a=b")));
    let regex = q("id", StringMatch::Regex(full("[0-9]+")));
    assert!(matches(&regex, &get("/?id=42")));
    assert!(!matches(&regex, &get("/?id=42x")));
}

// ---------------------------------------------------------------------------
// Weighted clusters

#[test]
fn pick_cluster_follows_cumulative_weights() {
    let clusters = [wc("a", 1), wc("b", 0), wc("c", 3)];
    let names: Vec<&str> = (0..8)
        .map(|r| pick_cluster(&clusters, r).unwrap().name.as_str())
        .collect();
    assert_eq!(names, ["a", "c", "c", "c", "a", "c", "c", "c"]);
}

#[test]
fn pick_cluster_distribution_matches_weights() {
    let clusters = [wc("v1", 70), wc("v2", 20), wc("v3", 10), wc("off", 0)];
    let mut rng = fastrand::Rng::with_seed(7);
    let mut counts = std::collections::HashMap::new();
    let n = 100_000;
    for _ in 0..n {
        let c = pick_cluster(&clusters, rng.u64(..)).unwrap();
        *counts.entry(c.name.as_str()).or_insert(0u32) += 1;
    }
    let share = |name| f64::from(counts.get(name).copied().unwrap_or(0)) / f64::from(n);
    assert!((share("v1") - 0.70).abs() < 0.01, "v1 {}", share("v1"));
    assert!((share("v2") - 0.20).abs() < 0.01, "v2 {}", share("v2"));
    assert!((share("v3") - 0.10).abs() < 0.01, "v3 {}", share("v3"));
    assert_eq!(counts.get("off"), None, "zero weight must never be picked");
}

#[test]
fn pick_cluster_edge_cases() {
    assert!(pick_cluster(&[], 5).is_none());
    assert!(pick_cluster(&[wc("a", 0), wc("b", 0)], 5).is_none());
    let big = [wc("a", u32::MAX), wc("b", u32::MAX)];
    // No overflow: the total exceeds u32, and u64::MAX % total == u32::MAX.
    assert_eq!(pick_cluster(&big, u64::MAX).unwrap().name, "b");
    assert_eq!(
        pick_cluster(&big, u64::from(u32::MAX) - 1).unwrap().name,
        "a"
    );
    let one = [wc("only", 1)];
    for r in [0, 1, u64::MAX] {
        assert_eq!(pick_cluster(&one, r).unwrap().name, "only");
    }
}

#[test]
fn selected_route_exposes_its_action() {
    let mut r = route("fwd", PathMatch::Prefix("/".into()));
    r.action = RouteAction::Forward(Forward {
        clusters: vec![wc("a", 1)],
        timeout: None,
        prefix_rewrite: None,
        regex_rewrite: None,
        host_rewrite: None,
        mirrors: vec![],
        hash_policy: vec![],
        retry: None,
        idle_timeout: None,
    });
    let v = with_routes(vec![r]);
    let Some(Route {
        action: RouteAction::Forward(f),
        ..
    }) = select_route(&v, &get("/x"))
    else {
        panic!("expected a forward route")
    };
    assert_eq!(pick_cluster(&f.clusters, 99).unwrap().name, "a");
}

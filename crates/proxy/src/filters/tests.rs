#![allow(clippy::unwrap_used, clippy::expect_used)]

use http::{HeaderName, HeaderValue};
use regex::Regex;

use super::*;
use crate::config::model::{RegexRewrite, RouteAction, RouteMatch};

fn name(s: &str) -> HeaderName {
    HeaderName::from_bytes(s.as_bytes()).unwrap()
}

fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap()
}

fn mods(set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]) -> HeaderMods {
    HeaderMods {
        set: set.iter().map(|(k, v)| (name(k), value(v))).collect(),
        add: add.iter().map(|(k, v)| (name(k), value(v))).collect(),
        remove: remove.iter().map(|k| name(k)).collect(),
    }
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(name(k), value(v));
    }
    h
}

fn values(h: &HeaderMap, key: &str) -> Vec<String> {
    h.get_all(key)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

fn forward(prefix: Option<&str>, regex: Option<(&str, &str)>) -> Forward {
    Forward {
        clusters: vec![],
        timeout: None,
        prefix_rewrite: prefix.map(str::to_string),
        regex_rewrite: regex.map(|(p, s)| RegexRewrite {
            pattern: Regex::new(p).unwrap(),
            substitution: s.into(),
        }),
        host_rewrite: None,
        mirrors: vec![],
        hash_policy: vec![],
        retry: None,
        idle_timeout: None,
    }
}

fn uri(s: &str) -> Uri {
    s.parse().unwrap()
}

fn rewritten(m: &PathMatch, f: &Forward, u: &str) -> Option<String> {
    rewrite(m, f, &uri(u)).map(|u| u.to_string())
}

fn prefix(p: &str) -> PathMatch {
    PathMatch::Prefix(p.into())
}

fn redirect(
    scheme: Option<&str>,
    host: Option<&str>,
    port: Option<u16>,
    path: Option<PathRedirect>,
) -> Redirect {
    Redirect {
        scheme: scheme.map(str::to_string),
        host: host.map(str::to_string),
        port,
        path,
        status: 301,
    }
}

fn location(r: &Redirect, m: &PathMatch, scheme: &str, authority: &str, u: &str) -> String {
    redirect_location(r, m, scheme, authority, &uri(u))
}

fn level(name_: &str, request: HeaderMods, response: HeaderMods) -> (VirtualHost, Route) {
    let vh = VirtualHost {
        name: name_.into(),
        domains: vec!["*".into()],
        routes: vec![],
        request_headers: request.clone(),
        response_headers: response.clone(),
    };
    let route = Route {
        name: name_.into(),
        matcher: RouteMatch {
            path: prefix("/"),
            headers: vec![],
            query: vec![],
            pseudo_headers: vec![],
        },
        action: RouteAction::Direct {
            status: 200,
            body: String::new(),
        },
        request_headers: request,
        response_headers: response,
        rate_limit: None,
        fault: None,
    };
    (vh, route)
}

// ---------------------------------------------------------------------------
// Header mods

#[test]
fn remove_then_set_then_add() {
    let mut h = headers(&[
        ("x-a", "old1"),
        ("x-a", "old2"),
        ("x-b", "keep"),
        ("x-gone", "1"),
    ]);
    apply_header_mods(
        &mods(
            &[("x-a", "new"), ("x-gone", "back")],
            &[("x-a", "extra"), ("x-c", "1"), ("x-b", "more")],
            &["x-gone", "x-absent"],
        ),
        &mut h,
    );
    // set replaces every value, then add appends.
    assert_eq!(values(&h, "x-a"), ["new", "extra"]);
    assert_eq!(values(&h, "x-b"), ["keep", "more"]);
    assert_eq!(values(&h, "x-c"), ["1"]);
    // Removal happens first, so a header both removed and set ends up set.
    assert_eq!(values(&h, "x-gone"), ["back"]);
    assert!(h.get("x-absent").is_none());
}

#[test]
fn repeated_set_keeps_the_last_value() {
    let mut h = HeaderMap::new();
    apply_header_mods(&mods(&[("x", "1"), ("x", "2")], &[], &[]), &mut h);
    assert_eq!(values(&h, "x"), ["2"]);
}

#[test]
fn empty_mods_change_nothing() {
    let mut h = headers(&[("a", "1")]);
    apply_header_mods(&HeaderMods::default(), &mut h);
    assert_eq!(h, headers(&[("a", "1")]));
}

#[test]
fn least_specific_level_wins_as_in_envoy() {
    let (mut vh, _) = level(
        "vh",
        mods(&[("x-owner", "vhost")], &[("x-trail", "vhost")], &[]),
        HeaderMods::default(),
    );
    let (_, route) = level(
        "route",
        mods(&[("x-owner", "route")], &[("x-trail", "route")], &[]),
        mods(&[("x-resp", "route")], &[], &[]),
    );
    vh.response_headers = mods(&[("x-resp", "vhost")], &[], &[]);
    let cluster = WeightedCluster {
        name: "c".into(),
        weight: 1,
        request_headers: mods(&[("x-owner", "cluster")], &[("x-trail", "cluster")], &[]),
        response_headers: mods(&[], &[], &["x-resp"]),
    };
    let mut req = HeaderMap::new();
    apply_request_headers(&vh, &route, Some(&cluster), &mut req);
    assert_eq!(values(&req, "x-owner"), ["vhost"]);
    assert_eq!(values(&req, "x-trail"), ["cluster", "route", "vhost"]);

    let mut resp = headers(&[("x-resp", "upstream")]);
    apply_response_headers(&vh, &route, Some(&cluster), &mut resp);
    // Cluster removes first, then route sets, then vhost overrides.
    assert_eq!(values(&resp, "x-resp"), ["vhost"]);

    let mut req = HeaderMap::new();
    apply_request_headers(&vh, &route, None, &mut req);
    assert_eq!(values(&req, "x-trail"), ["route", "vhost"]);
}

// ---------------------------------------------------------------------------
// Rewrites

#[test]
fn prefix_rewrite_replaces_the_matched_prefix_and_keeps_the_query() {
    let f = forward(Some("/v2"), None);
    assert_eq!(
        rewritten(&prefix("/api"), &f, "/api/users?id=1").as_deref(),
        Some("/v2/users?id=1")
    );
    assert_eq!(
        rewritten(&prefix("/api"), &f, "/api").as_deref(),
        Some("/v2")
    );
    // Envoy's literal replacement: "/foo" -> "/" turns "/foo/bar" into "//bar".
    let slash = forward(Some("/"), None);
    assert_eq!(
        rewritten(&prefix("/foo"), &slash, "/foo/bar").as_deref(),
        Some("//bar")
    );
    assert_eq!(
        rewritten(&prefix("/foo/"), &slash, "/foo/bar").as_deref(),
        Some("/bar")
    );
    let sep = PathMatch::SeparatedPrefix("/api".into());
    assert_eq!(rewritten(&sep, &f, "/api/x").as_deref(), Some("/v2/x"));
}

#[test]
fn prefix_rewrite_on_exact_and_regex_routes_replaces_the_whole_path() {
    let f = forward(Some("/new"), None);
    let exact = PathMatch::Exact("/old".into());
    assert_eq!(
        rewritten(&exact, &f, "/old?a=b").as_deref(),
        Some("/new?a=b")
    );
    let re = PathMatch::Regex(Regex::new("^(?:/item/[0-9]+)$").unwrap());
    assert_eq!(
        rewritten(&re, &f, "/item/42?x=1").as_deref(),
        Some("/new?x=1")
    );
}

#[test]
fn regex_rewrite_substitutes_every_match_and_keeps_the_query() {
    let f = forward(
        None,
        Some(("^/service/([^/]+)(/.*)$", "${2}/instance/${1}")),
    );
    assert_eq!(
        rewritten(&prefix("/"), &f, "/service/foo/v1/api?q=/service/x").as_deref(),
        Some("/v1/api/instance/foo?q=/service/x")
    );
    let every = forward(None, Some(("o", "0")));
    assert_eq!(
        rewritten(&prefix("/"), &every, "/foo/boo").as_deref(),
        Some("/f00/b00")
    );
    let no_hit = forward(None, Some(("zzz", "y")));
    assert_eq!(
        rewritten(&prefix("/"), &no_hit, "/abc").as_deref(),
        Some("/abc")
    );
}

#[test]
fn rewrite_keeps_scheme_and_authority_of_absolute_uris() {
    let f = forward(Some("/v2"), None);
    assert_eq!(
        rewritten(&prefix("/api"), &f, "http://web.default:8080/api/x?y=1").as_deref(),
        Some("http://web.default:8080/v2/x?y=1")
    );
}

#[test]
fn no_rewrite_configured_or_not_applicable() {
    let none = forward(None, None);
    assert_eq!(rewritten(&prefix("/"), &none, "/x"), None);
    // CONNECT authority-form has no path to rewrite.
    let f = forward(Some("/v2"), None);
    assert_eq!(rewritten(&prefix("/"), &f, "web.default:443"), None);
    // A route that did not match this path: nothing to replace.
    assert_eq!(rewritten(&prefix("/api"), &f, "/other"), None);
    // A result that is not a valid URI is refused rather than forwarded.
    let spaces = forward(None, Some(("x", " ")));
    assert_eq!(rewritten(&prefix("/"), &spaces, "/x"), None);
}

// ---------------------------------------------------------------------------
// Redirects

#[test]
fn https_redirect_strips_the_default_port_of_the_old_scheme() {
    let r = redirect(Some("https"), None, None, None);
    let m = prefix("/");
    assert_eq!(
        location(&r, &m, "http", "web.example:80", "/a?b=c"),
        "https://web.example/a?b=c"
    );
    assert_eq!(
        location(&r, &m, "http", "web.example", "/a"),
        "https://web.example/a"
    );
    // A non-default port is kept.
    assert_eq!(
        location(&r, &m, "http", "web.example:8080", "/a"),
        "https://web.example:8080/a"
    );
    // Same scheme: nothing stripped.
    assert_eq!(
        location(&r, &m, "https", "web.example:443", "/a"),
        "https://web.example:443/a"
    );
    let to_http = redirect(Some("http"), None, None, None);
    assert_eq!(
        location(&to_http, &m, "https", "web.example:443", "/"),
        "http://web.example/"
    );
    // IPv6 literals keep their brackets.
    assert_eq!(location(&r, &m, "http", "[::1]:80", "/"), "https://[::1]/");
    assert_eq!(location(&r, &m, "http", "[::1]", "/"), "https://[::1]/");
}

#[test]
fn port_and_host_redirects() {
    let m = prefix("/");
    let port = redirect(None, None, Some(8443), None);
    assert_eq!(
        location(&port, &m, "http", "web:8080", "/x"),
        "http://web:8443/x"
    );
    assert_eq!(
        location(&port, &m, "http", "web", "/x"),
        "http://web:8443/x"
    );
    let host = redirect(None, Some("new.example"), None, None);
    // The request's port does not follow a host redirect.
    assert_eq!(
        location(&host, &m, "http", "old.example:8080", "/x"),
        "http://new.example/x"
    );
    let both = redirect(Some("https"), Some("new.example"), Some(443), None);
    // Gateway API: a port that is the scheme's well-known one is left out
    // of the Location (the translator sends 443 for a bare https redirect).
    assert_eq!(
        location(&both, &m, "http", "old", "/x"),
        "https://new.example/x"
    );
}

#[test]
fn path_redirect_keeps_the_query_unless_it_has_one() {
    let m = prefix("/");
    let full = redirect(None, None, None, Some(PathRedirect::Full("/login".into())));
    assert_eq!(
        location(&full, &m, "http", "a", "/x?next=/y"),
        "http://a/login?next=/y"
    );
    assert_eq!(location(&full, &m, "http", "a", "/x"), "http://a/login");
    let with_query = redirect(
        None,
        None,
        None,
        Some(PathRedirect::Full("/login?from=old".into())),
    );
    assert_eq!(
        location(&with_query, &m, "http", "a", "/x?next=/y"),
        "http://a/login?from=old"
    );
    let relative = redirect(None, None, None, Some(PathRedirect::Full("login".into())));
    assert_eq!(location(&relative, &m, "http", "a", "/x"), "http://a/login");
}

#[test]
fn prefix_rewrite_redirect() {
    let r = redirect(None, None, None, Some(PathRedirect::Prefix("/v2".into())));
    assert_eq!(
        location(&r, &prefix("/v1"), "https", "api.example", "/v1/users?id=7"),
        "https://api.example/v2/users?id=7"
    );
    let exact = PathMatch::Exact("/old".into());
    assert_eq!(location(&r, &exact, "http", "a", "/old?q"), "http://a/v2?q");
}

#[test]
fn no_change_redirect_reflects_the_request() {
    let r = redirect(None, None, None, None);
    assert_eq!(
        location(&r, &prefix("/"), "http", "a:8080", "/p?q=1"),
        "http://a:8080/p?q=1"
    );
    assert_eq!(location(&r, &prefix("/"), "http", "", "/p"), "http:///p");
}

//! HTTP filters of a matched route: header changes, path rewrites, redirects.
//!
//! Purpose: the pure transformations Envoy applies once a route is chosen,
//! with Envoy's exact semantics, so the data path only wires them in.
//!
//! Contract:
//! - Header mods: remove, then set (overwrite), then add (append), like
//!   Envoy's `HeaderParser`. Across levels Envoy evaluates the weighted
//!   cluster's mods first, then the route's, then the virtual host's, so on a
//!   conflict the least specific level wins ([`apply_request_headers`],
//!   [`apply_response_headers`]).
//! - Rewrites replace the matched path prefix (`prefix_rewrite`; the whole
//!   path for exact and regex routes) or substitute every regex match in the
//!   path (`regex_rewrite`); the query string is kept.
//! - Redirect `Location`: Envoy's `newUri` (scheme, host with default-port
//!   stripping when the scheme changes, port, path or prefix rewrite, query
//!   kept unless `path_redirect` has its own).
//!
//! Non-goals: no I/O, no body handling, no formatter substitution
//! (`config::xds` refuses `%...%` values).

use std::borrow::Cow;

use http::uri::{PathAndQuery, Uri};
use http::HeaderMap;

use crate::config::model::{
    Forward, HeaderMods, PathMatch, PathRedirect, Redirect, Route, VirtualHost, WeightedCluster,
};

/// Apply one level of header changes: remove, then set, then add.
pub fn apply_header_mods(mods: &HeaderMods, headers: &mut HeaderMap) {
    for name in &mods.remove {
        headers.remove(name);
    }
    for (name, value) in &mods.set {
        headers.insert(name.clone(), value.clone());
    }
    for (name, value) in &mods.add {
        headers.append(name.clone(), value.clone());
    }
}

/// Request header changes of every level, in Envoy's order: weighted
/// cluster, route, virtual host.
pub fn apply_request_headers(
    vh: &VirtualHost,
    route: &Route,
    cluster: Option<&WeightedCluster>,
    headers: &mut HeaderMap,
) {
    if let Some(c) = cluster {
        apply_header_mods(&c.request_headers, headers);
    }
    apply_header_mods(&route.request_headers, headers);
    apply_header_mods(&vh.request_headers, headers);
}

/// Response header changes of every level, in Envoy's order: weighted
/// cluster, route, virtual host.
pub fn apply_response_headers(
    vh: &VirtualHost,
    route: &Route,
    cluster: Option<&WeightedCluster>,
    headers: &mut HeaderMap,
) {
    if let Some(c) = cluster {
        apply_header_mods(&c.response_headers, headers);
    }
    apply_header_mods(&route.response_headers, headers);
    apply_header_mods(&vh.response_headers, headers);
}

/// The request URI after `prefix_rewrite` / `regex_rewrite`; scheme and
/// authority (absolute-form, HTTP/2) are kept.
///
/// `route_match` must be the path matcher that selected the route. Returns
/// `None` when no rewrite is configured, when the URI has no path (CONNECT),
/// or when the result is not a valid URI (the caller forwards the request
/// unchanged; `config::xds` only admits rewrites that yield valid paths, so
/// this takes a regex capture from an unusual path).
pub fn rewrite(route_match: &PathMatch, fwd: &Forward, uri: &Uri) -> Option<Uri> {
    let path_and_query = uri.path_and_query()?.as_str();
    let new = if let Some(prefix) = &fwd.prefix_rewrite {
        replace_prefix(route_match, prefix, path_and_query)?
    } else if let Some(rr) = &fwd.regex_rewrite {
        let (path, rest) = split_query(path_and_query);
        let mut out = rr
            .pattern
            .replace_all(path, rr.substitution.as_str())
            .into_owned();
        out.push_str(rest);
        out
    } else {
        return None;
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(new).ok()?);
    Uri::from_parts(parts).ok()
}

/// The `Location` of a redirect, as Envoy computes it.
///
/// `scheme` is the request's scheme (`http`/`https`, as Envoy's
/// `:scheme`/`x-forwarded-proto`), `authority` its `Host`/`:authority`.
/// `route_match` must be the path matcher that selected the route (for
/// `prefix_rewrite`).
pub fn redirect_location(
    r: &Redirect,
    route_match: &PathMatch,
    scheme: &str,
    authority: &str,
    uri: &Uri,
) -> String {
    let final_scheme = r.scheme.as_deref().unwrap_or(scheme);
    // A redirected port that is the new scheme's default is left out of the
    // Location (Gateway API: no `:80` with http, no `:443` with https), but
    // still replaces the request's port.
    let default_port = match final_scheme {
        s if s.eq_ignore_ascii_case("https") => Some(443),
        s if s.eq_ignore_ascii_case("http") => Some(80),
        _ => None,
    };
    let port = r
        .port
        .filter(|p| Some(*p) != default_port)
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let host = match &r.host {
        Some(h) => h.as_str(),
        None => request_host(authority, final_scheme, scheme, r.port.is_some()),
    };
    let current = uri.path_and_query().map_or("", |pq| pq.as_str());
    let path: Cow<'_, str> = match &r.path {
        // A query in path_redirect replaces the request's.
        Some(PathRedirect::Full(p)) if p.contains('?') => Cow::Borrowed(p),
        Some(PathRedirect::Full(p)) => Cow::Owned(format!("{p}{}", split_query(current).1)),
        Some(PathRedirect::Prefix(prefix)) => {
            replace_prefix(route_match, prefix, current).map_or(Cow::Borrowed(current), Cow::Owned)
        }
        None => Cow::Borrowed(current),
    };
    let slash = if path.starts_with('/') { "" } else { "/" };
    format!("{final_scheme}://{host}{port}{slash}{path}")
}

/// Envoy's `processRequestHost`: drop the request's port when a port is
/// redirected, or when the scheme changes and the port was the old scheme's
/// default (so `http://a:80` -> `https://a`).
fn request_host<'a>(
    host: &'a str,
    new_scheme: &str,
    request_scheme: &str,
    new_port: bool,
) -> &'a str {
    if host.is_empty() {
        return host;
    }
    let port_at = if host.starts_with('[') {
        host.rfind("]:").map(|i| i + 1)
    } else {
        host.rfind(':')
    };
    let Some(at) = port_at else {
        return host;
    };
    let port = &host[at..];
    let mut remove = new_port;
    if new_scheme != request_scheme {
        remove |= request_scheme.eq_ignore_ascii_case("https") && port == ":443";
        remove |= request_scheme.eq_ignore_ascii_case("http") && port == ":80";
    }
    if remove {
        &host[..at]
    } else {
        host
    }
}

/// Replace what the route matched at the start of `path_and_query` with
/// `replacement`: the prefix for prefix routes, the whole path (not the
/// query) for exact and regex routes. `None` if the path does not start with
/// what the route matched (the route was not the one that matched).
fn replace_prefix(
    route_match: &PathMatch,
    replacement: &str,
    path_and_query: &str,
) -> Option<String> {
    let matched = match route_match {
        PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) | PathMatch::Exact(p) => p.len(),
        PathMatch::Regex(_) => split_query(path_and_query).0.len(),
    };
    if !path_and_query.is_char_boundary(matched) || matched > path_and_query.len() {
        return None;
    }
    let (head, rest) = path_and_query.split_at(matched);
    if let PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) | PathMatch::Exact(p) = route_match
    {
        if head != p {
            return None;
        }
    }
    Some(format!("{replacement}{rest}"))
}

/// `(path, "?query" or "")`.
fn split_query(path_and_query: &str) -> (&str, &str) {
    match path_and_query.find('?') {
        Some(i) => path_and_query.split_at(i),
        None => (path_and_query, ""),
    }
}

#[cfg(test)]
mod tests;

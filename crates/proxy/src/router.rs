//! Routing decisions: virtual host, route and weighted backend selection.
//!
//! Purpose: given a validated [`RouteTable`] (from `config::xds`) and a
//! request head, decide what Envoy would decide, so that meshwork's proxy and
//! Envoy route the same translator output identically.
//!
//! Contract (Envoy semantics):
//! - Virtual host: the `Host`/`:authority` value, lower-cased, port included,
//!   is looked up as an exact domain, then the longest `*suffix` wildcard,
//!   then the longest `prefix*` wildcard (a wildcard's `*` matches at least
//!   one character), then `*`. A domain without a port does not match an
//!   authority with one; the translator lists both forms.
//! - Route: the first route whose every condition matches wins. Paths are
//!   compared without the query string; header conditions see all values of
//!   a header joined with `,`; a missing header fails every value matcher,
//!   inverted or not, and only presence can be inverted into absence; query
//!   parameters are compared raw (not percent-decoded), first occurrence.
//! - Weighted clusters: `random % total_weight` walks the cumulative weights.
//!
//! Non-goals: no I/O, no header rewriting (see `filters`), no authorization.

use std::borrow::Cow;

use http::request::Parts;
use http::HeaderMap;

use crate::config::model::{
    HeaderMatch, PathMatch, PseudoHeader, PseudoHeaderMatch, QueryMatch, Route, RouteMatch,
    RouteTable, StringMatch, VirtualHost, WeightedCluster,
};

/// The virtual host serving `authority` (`Host` header or `:authority`).
pub fn select_vhost<'a>(table: &'a RouteTable, authority: &str) -> Option<&'a VirtualHost> {
    let index = &table.index;
    let by_index = |i: usize| table.virtual_hosts.get(i);
    // Envoy's fast path: only a default virtual host.
    if index.exact.is_empty() && index.suffixes.is_empty() && index.prefixes.is_empty() {
        return index.default.and_then(by_index);
    }
    let host: Cow<'_, str> = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(authority.to_ascii_lowercase())
    } else {
        Cow::Borrowed(authority)
    };
    if let Some(&i) = index.exact.get(host.as_ref()) {
        return by_index(i);
    }
    // `>=`: the wildcard must stand for at least one character, so
    // `*.foo.com` does not match `.foo.com`. Slices that fall inside a
    // multi-byte character cannot equal a domain and are skipped.
    for (len, map) in &index.suffixes {
        if *len >= host.len() {
            continue;
        }
        if let Some(&i) = host.get(host.len() - len..).and_then(|tail| map.get(tail)) {
            return by_index(i);
        }
    }
    for (len, map) in &index.prefixes {
        if *len >= host.len() {
            continue;
        }
        if let Some(&i) = host.get(..*len).and_then(|head| map.get(head)) {
            return by_index(i);
        }
    }
    index.default.and_then(by_index)
}

/// The first route of `vh` matching the request head.
pub fn select_route<'a>(vh: &'a VirtualHost, req: &Parts) -> Option<&'a Route> {
    let path = req.uri.path();
    let query = req.uri.query();
    vh.routes
        .iter()
        .find(|r| route_matches(&r.matcher, req, path, query))
}

/// Pick a backend: `random % total_weight` indexes the cumulative weights, so
/// each cluster is chosen with probability weight / total. `None` when every
/// weight is zero (or the list is empty).
pub fn pick_cluster(clusters: &[WeightedCluster], random: u64) -> Option<&WeightedCluster> {
    let total: u64 = clusters.iter().map(|c| u64::from(c.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = random % total;
    for c in clusters {
        let w = u64::from(c.weight);
        if point < w {
            return Some(c);
        }
        point -= w;
    }
    None
}

fn route_matches(m: &RouteMatch, req: &Parts, path: &str, query: Option<&str>) -> bool {
    path_matches(&m.path, path)
        && m.pseudo_headers.iter().all(|p| pseudo_matches(p, req))
        && m.headers.iter().all(|h| header_matches(h, &req.headers))
        && m.query.iter().all(|q| query_matches(q, query))
}

fn path_matches(m: &PathMatch, path: &str) -> bool {
    match m {
        PathMatch::Prefix(p) => path.starts_with(p.as_str()),
        PathMatch::Exact(p) => path == p,
        PathMatch::SeparatedPrefix(p) => {
            path.starts_with(p.as_str())
                && (path.len() == p.len() || path.as_bytes().get(p.len()) == Some(&b'/'))
        }
        PathMatch::Regex(r) => r.is_match(path),
    }
}

fn pseudo_matches(p: &PseudoHeaderMatch, req: &Parts) -> bool {
    let value = match p.header {
        PseudoHeader::Method => req.method.as_str(),
    };
    string_matches(&p.matcher, value.as_bytes()) != p.invert
}

fn header_matches(h: &HeaderMatch, headers: &HeaderMap) -> bool {
    match joined_values(headers, &h.name) {
        // Envoy: presence can be inverted into absence, but a value matcher
        // on a missing header fails even when inverted.
        None => matches!(h.matcher, StringMatch::Present) && h.invert,
        Some(value) => string_matches(&h.matcher, &value) != h.invert,
    }
}

/// All values of a header joined with `,` (Envoy's `getAllOfHeaderAsString`);
/// allocates only when the header repeats.
pub(crate) fn joined_values<'h>(
    headers: &'h HeaderMap,
    name: &http::HeaderName,
) -> Option<Cow<'h, [u8]>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(Cow::Borrowed(first.as_bytes()));
    };
    let mut joined = Vec::with_capacity(first.len() + second.len() + 1);
    joined.extend_from_slice(first.as_bytes());
    for v in std::iter::once(second).chain(values) {
        joined.push(b',');
        joined.extend_from_slice(v.as_bytes());
    }
    Some(Cow::Owned(joined))
}

fn query_matches(q: &QueryMatch, query: Option<&str>) -> bool {
    match first_query_value(query, &q.name) {
        None => false,
        Some(value) => string_matches(&q.matcher, value.as_bytes()),
    }
}

/// The first value of parameter `name` in a raw query string; a parameter
/// without `=` has the empty value (Envoy's `parseQueryString`, no decoding).
fn first_query_value<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?
        .split('&')
        .find_map(|param| match param.split_once('=') {
            Some((key, value)) if key == name => Some(value),
            None if param == name => Some(""),
            _ => None,
        })
}

pub(crate) fn string_matches(m: &StringMatch, value: &[u8]) -> bool {
    match m {
        StringMatch::Exact(s) => value == s.as_bytes(),
        StringMatch::Prefix(s) => value.starts_with(s.as_bytes()),
        StringMatch::Suffix(s) => value.ends_with(s.as_bytes()),
        StringMatch::Contains(s) => contains(value, s.as_bytes()),
        // Header bytes that are not UTF-8 cannot match a text pattern.
        StringMatch::Regex(r) => std::str::from_utf8(value).is_ok_and(|v| r.is_match(v)),
        StringMatch::Present => true,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests;

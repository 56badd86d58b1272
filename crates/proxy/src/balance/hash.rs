//! Request hashing for ring hash and maglev: xxHash64 and route hash policies.
//!
//! Purpose: turn a request into the `u64` that consistent-hash balancers look
//! up, the way Envoy does, so a client lands on the same endpoint behind our
//! proxy and behind Envoy (given the same endpoint set).
//!
//! Contract (Envoy's `RouteAction.hash_policy`):
//! - policies are evaluated in order; each one that yields a value is combined
//!   as `hash = rotl(hash, 1) ^ value` (the rotation stops two identical
//!   policies from cancelling out);
//! - a `terminal` policy stops the evaluation once a hash exists;
//! - header: xxHash64 of the header's values, sorted then concatenated (so the
//!   order of repeated headers does not matter); absent header: no value;
//! - cookie: xxHash64 of the cookie's value; absent with a `ttl`: a fresh
//!   random value is hashed and returned as a `Set-Cookie` so the client
//!   sticks from the next request on; absent without `ttl`: no value;
//! - source IP: xxHash64 of the peer's IP address in text form (IPv4-mapped
//!   IPv6 addresses are shown as IPv4, so a dual-stack listener hashes a
//!   client the same either way).
//!
//! Non-goals: `query_parameter` and `filter_state` policies and header regex
//! rewrites (the translator does not emit them). The generated cookie value
//! comes from `fastrand`, which is not a cryptographic generator: it is a
//! stickiness key, not a secret. When several cookie policies would each set a
//! cookie, only the first `Set-Cookie` is returned.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use http::HeaderMap;

use crate::config::model::HashPolicy;

/// The request hash and what must be added to the response for it to hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HashOutcome {
    /// `None` when no policy yields a value (the balancer then picks at random).
    pub hash: Option<u64>,
    /// A cookie policy with a `ttl` found no cookie in the request: the
    /// `Set-Cookie` header value to add to the response.
    pub set_cookie: Option<String>,
}

/// Evaluates route hash policies over a request (Envoy semantics, see the
/// module docs).
pub fn request_hash(policies: &[HashPolicy], headers: &HeaderMap, peer: SocketAddr) -> HashOutcome {
    let mut out = HashOutcome::default();
    for policy in policies {
        let (value, terminal) = match policy {
            HashPolicy::Header { name, terminal } => (header_hash(headers, name), *terminal),
            HashPolicy::Cookie {
                name,
                ttl,
                path,
                terminal,
            } => {
                let value = match (cookie_value(headers, name), ttl) {
                    (Some(value), _) => Some(xxh64(value, 0)),
                    (None, Some(ttl)) => {
                        let value = new_cookie_value();
                        if out.set_cookie.is_none() {
                            out.set_cookie = Some(set_cookie(name, &value, *ttl, path.as_deref()));
                        }
                        Some(xxh64(value.as_bytes(), 0))
                    }
                    (None, None) => None,
                };
                (value, *terminal)
            }
            HashPolicy::SourceIp { terminal } => {
                let ip = peer.ip().to_canonical().to_string();
                (Some(xxh64(ip.as_bytes(), 0)), *terminal)
            }
        };
        if let Some(value) = value {
            out.hash = Some(match out.hash {
                Some(hash) => hash.rotate_left(1) ^ value,
                None => value,
            });
        }
        if terminal && out.hash.is_some() {
            break;
        }
    }
    out
}

fn header_hash(headers: &HeaderMap, name: &http::HeaderName) -> Option<u64> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(xxh64(first.as_bytes(), 0));
    };
    let mut all: Vec<&[u8]> = [first, second]
        .into_iter()
        .chain(values)
        .map(|v| v.as_bytes())
        .collect();
    all.sort_unstable();
    Some(xxh64(&all.concat(), 0))
}

/// The value of cookie `name` in the request's `Cookie` headers (HTTP/2 may
/// split them), without surrounding quotes. An empty value counts as absent.
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|h| h.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let mut parts = pair.splitn(2, |&b| b == b'=');
            let key = parts.next()?.trim_ascii();
            let value = parts.next()?.trim_ascii();
            if key != name.as_bytes() {
                return None;
            }
            let value = value
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(value);
            (!value.is_empty()).then_some(value)
        })
}

fn new_cookie_value() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// `name=value; Max-Age=..; Path=..; HttpOnly`. A zero ttl makes a session
/// cookie (Envoy's rule); a sub-second ttl rounds up, since `Max-Age=0` would
/// delete the cookie instead.
fn set_cookie(name: &str, value: &str, ttl: Duration, path: Option<&str>) -> String {
    let mut out = format!("{name}={value}");
    // Writing into a String cannot fail.
    if !ttl.is_zero() {
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let _ = write!(out, "; Max-Age={secs}");
    }
    if let Some(path) = path.filter(|p| !p.is_empty()) {
        let _ = write!(out, "; Path={path}");
    }
    out.push_str("; HttpOnly");
    out
}

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

/// xxHash64 (XXH64) of `input`, written from the published specification.
/// Envoy hashes ring entries, maglev permutations and request keys with it
/// (seed 0, and seed 1 for maglev's skip).
pub fn xxh64(input: &[u8], seed: u64) -> u64 {
    let (stripes, rest) = input.as_chunks::<32>();
    let mut h = if stripes.is_empty() {
        seed.wrapping_add(P5)
    } else {
        let mut acc = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        for stripe in stripes {
            let (lanes, _) = stripe.as_chunks::<8>();
            for (v, lane) in acc.iter_mut().zip(lanes) {
                *v = round(*v, u64::from_le_bytes(*lane));
            }
        }
        let [v1, v2, v3, v4] = acc;
        let mut h = v1
            .rotate_left(1)
            .wrapping_add(v2.rotate_left(7))
            .wrapping_add(v3.rotate_left(12))
            .wrapping_add(v4.rotate_left(18));
        for v in acc {
            h = (h ^ round(0, v)).wrapping_mul(P1).wrapping_add(P4);
        }
        h
    };
    h = h.wrapping_add(input.len() as u64);

    let (words, rest) = rest.as_chunks::<8>();
    for word in words {
        h ^= round(0, u64::from_le_bytes(*word));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
    }
    let (dwords, bytes) = rest.as_chunks::<4>();
    for dword in dwords {
        h ^= u64::from(u32::from_le_bytes(*dword)).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
    }
    for &byte in bytes {
        h ^= u64::from(byte).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }

    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

fn round(acc: u64, lane: u64) -> u64 {
    acc.wrapping_add(lane.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

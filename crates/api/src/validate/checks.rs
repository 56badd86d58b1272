//! Small syntactic checks shared by the validators: the CRD patterns written
//! as plain code (no regex engine needed for them) and regex compilation.

/// Size limit for user regexes: enough for any sane route, small enough that a
/// hostile pattern cannot make the control plane or a proxy allocate much.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// DNS-1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
pub(crate) fn dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 63 {
        return Err(format!("{s:?} is longer than 63 characters"));
    }
    if !label_ok(s) {
        return Err(format!(
            "{s:?} is not a DNS-1123 label: use lowercase letters, digits and '-', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

fn label_ok(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// DNS-1123 subdomain: dot-separated labels, at most 253 characters.
pub(crate) fn dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 253 {
        return Err(format!("{s:?} is longer than 253 characters"));
    }
    if !s.split('.').all(label_ok) {
        return Err(format!(
            "{s:?} is not a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', each part starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// Gateway API `Hostname` (precise, or wildcard `*.example.com`); no IPs.
pub(crate) fn hostname(s: &str, allow_wildcard: bool) -> Result<(), String> {
    let rest = match s.strip_prefix("*.") {
        Some(r) if allow_wildcard => r,
        _ => s,
    };
    dns_subdomain(rest).map_err(|_| {
        format!(
            "{s:?} is not a valid hostname: lowercase RFC 1123 labels{}",
            if allow_wildcard {
                ", optionally prefixed by `*.`"
            } else {
                ""
            }
        )
    })?;
    if rest.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(format!("{s:?} is an IP address; a hostname is expected"));
    }
    Ok(())
}

/// HTTP header name (RFC 7230 token): `^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$`, 1..=256.
pub(crate) fn header_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 256 {
        return Err(format!("header name {s:?} must be 1 to 256 characters"));
    }
    let ok = s.bytes().all(|c| {
        c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            )
    });
    if !ok {
        return Err(format!(
            "header name {s:?} has characters that are not allowed in an HTTP header name (RFC 7230 token)"
        ));
    }
    Ok(())
}

/// A header value we can put on the wire: no control characters (CR/LF would
/// split headers), length checked by the caller.
pub(crate) fn header_value(s: &str) -> Result<(), String> {
    if s.chars()
        .any(|c| (c.is_control() && c != '\t') || c == '\u{7f}')
    {
        return Err(format!("value {s:?} contains control characters"));
    }
    Ok(())
}

/// Compiles a user regex the way it will be used (anchored full match). The
/// error names the user's pattern, not the anchored one.
pub(crate) fn regex(s: &str) -> Result<regex::Regex, String> {
    let build = |p: &str| {
        regex::RegexBuilder::new(p)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
    };
    let err = |e: regex::Error| {
        format!(
            "invalid regular expression {s:?}: {}",
            one_line(&e.to_string())
        )
    };
    build(s).map_err(err)?;
    build(&format!("^(?:{s})$")).map_err(err)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Gateway API path value rules for `Exact` and `PathPrefix` matches
/// (the CRD's `x-kubernetes-validations`).
pub(crate) fn match_path(v: &str) -> Result<(), String> {
    if v.len() > 1024 {
        return Err("path is longer than 1024 characters".into());
    }
    if !v.starts_with('/') {
        return Err(format!("path {v:?} must be absolute and start with '/'"));
    }
    for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        if v.contains(bad) {
            return Err(format!("path {v:?} must not contain {bad:?}"));
        }
    }
    for bad in ["/..", "/."] {
        if v.ends_with(bad) {
            return Err(format!("path {v:?} must not end with {bad:?}"));
        }
    }
    // ^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let hex = |j: usize| b.get(j).is_some_and(|h| h.is_ascii_hexdigit());
            if !(hex(i + 1) && hex(i + 2)) {
                return Err(format!(
                    "path {v:?} has a '%' not followed by two hex digits"
                ));
            }
            i += 3;
            continue;
        }
        let ok = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'/'
                    | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'@'
            );
        if !ok {
            return Err(format!(
                "path {v:?} has a character that is not allowed ({:?}); percent-encode it",
                v[i..].chars().next().unwrap_or('?')
            ));
        }
        i += 1;
    }
    Ok(())
}

/// A rewrite/redirect path value: absolute, no query or fragment, printable.
pub(crate) fn replacement_path(v: &str, allow_empty: bool) -> Result<(), String> {
    if v.len() > 1024 {
        return Err("path is longer than 1024 characters".into());
    }
    if v.is_empty() && allow_empty {
        return Ok(());
    }
    if !v.starts_with('/') {
        return Err(format!("path {v:?} must start with '/'"));
    }
    if v.contains(['?', '#']) || v.chars().any(|c| c.is_control() || c == ' ' || c == '\\') {
        return Err(format!(
            "path {v:?} must not contain '?', '#', '\\', spaces or control characters"
        ));
    }
    Ok(())
}

/// gRPC service name for `Exact` matches: `^(?i)\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$`.
pub(crate) fn grpc_service(s: &str) -> Result<(), String> {
    let body = s.strip_prefix('.').unwrap_or(s);
    if body.split('.').all(ident) {
        Ok(())
    } else {
        Err(format!(
            "service {s:?} is not a valid gRPC service name (dot-separated identifiers, e.g. \"helloworld.Greeter\")"
        ))
    }
}

/// gRPC method name for `Exact` matches: `^[A-Za-z_][A-Za-z_0-9]*$`.
pub(crate) fn grpc_method(s: &str) -> Result<(), String> {
    if ident(s) {
        Ok(())
    } else {
        Err(format!(
            "method {s:?} is not a valid gRPC method name (an identifier, e.g. \"SayHello\")"
        ))
    }
}

fn ident(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// True when `n` is prime (maglev table sizes).
pub(crate) fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut i = 2u64;
    while i.saturating_mul(i) <= n {
        if n.is_multiple_of(i) {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(dns_label("reviews-v2").is_ok());
        for bad in ["", "Reviews", "-a", "a-", "a.b", &"a".repeat(64)] {
            assert!(dns_label(bad).is_err(), "{bad}");
        }
        assert!(dns_subdomain("a.b-c.d").is_ok());
        assert!(dns_subdomain("a..b").is_err());
        assert!(hostname("*.example.com", true).is_ok());
        assert!(hostname("*.example.com", false).is_err());
        assert!(hostname("10.0.0.1", true).is_err());
    }

    #[test]
    fn paths() {
        assert!(match_path("/api/v1%20x").is_ok());
        for bad in [
            "api", "/a//b", "/a/./b", "/a/%2fb", "/a/..", "/a#b", "/a b", "/a%zz", "/a?b",
        ] {
            assert!(match_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn grpc_names() {
        assert!(grpc_service("helloworld.Greeter").is_ok());
        assert!(grpc_service(".a._b").is_ok());
        assert!(grpc_service("a..b").is_err());
        assert!(grpc_method("SayHello").is_ok());
        assert!(grpc_method("1x").is_err());
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537));
        assert!(is_prime(5000011));
        assert!(!is_prime(65536));
        assert!(!is_prime(1));
    }

    #[test]
    fn regexes_are_checked() {
        assert!(regex("/api/v[0-9]+").is_ok());
        assert!(regex("/api/(").is_err());
    }
}

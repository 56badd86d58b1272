//! RouteConfiguration -> [`RouteTable`]: virtual hosts, routes, matchers,
//! actions and header mods, with Envoy's validation rules.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as rpb;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3 as lrl;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::envoy::r#type::v3 as etype;
use envoy_types::pb::google::protobuf as pbuf;
use http::{HeaderName, HeaderValue};
use regex::Regex;

use super::{decode_only, is_default, opt_duration, single_cluster, At, FieldError, Res};
use crate::config::model::{
    self, DomainConflict, Fault, HashPolicy, HeaderMatch, HeaderMods, LocalRateLimit, Mirror,
    PathMatch, PathRedirect, PseudoHeader, PseudoHeaderMatch, QueryMatch, Redirect, RegexRewrite,
    RouteAction, RouteTable, StringMatch, WeightedCluster,
};

/// A header name from config: lower-cased, valid, and not a pseudo-header or
/// `host` (which Envoy refuses to let config add or remove).
fn modifiable_header_name(name: &str) -> Res<HeaderName> {
    if name.starts_with(':') || name.eq_ignore_ascii_case("host") {
        return Err(FieldError::msg(format!(
            "header {name:?} may not be modified (pseudo-headers and host are refused, as in Envoy)"
        )));
    }
    header_name(name)
}

fn header_name(name: &str) -> Res<HeaderName> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| FieldError::msg(format!("invalid header name {name:?}")))
}

/// Envoy treats header values as substitution format strings: `%%` is a
/// literal `%`, and any other `%` starts a command meshwork does not
/// implement.
fn literal_header_value(raw: &[u8]) -> Res<HeaderValue> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            if raw.get(i + 1) == Some(&b'%') {
                out.push(b'%');
                i += 2;
                continue;
            }
            return Err(FieldError::msg(
                "substitution formatters (%...%) are not supported; write %% for a literal %",
            ));
        }
        out.push(raw[i]);
        i += 1;
    }
    HeaderValue::from_bytes(&out).map_err(|_| {
        FieldError::msg(format!(
            "invalid header value {:?}",
            String::from_utf8_lossy(raw)
        ))
    })
}

#[allow(deprecated)]
pub(super) fn header_mods(
    to_add: &[core::HeaderValueOption],
    to_remove: &[String],
    add_field: &str,
    remove_field: &str,
) -> Res<HeaderMods> {
    use core::header_value_option::HeaderAppendAction;
    let mut mods = HeaderMods::default();
    for (i, name) in to_remove.iter().enumerate() {
        let name = modifiable_header_name(name).at(format_args!("{remove_field}[{i}]"))?;
        mods.remove.push(name);
    }
    for (i, option) in to_add.iter().enumerate() {
        let core::HeaderValueOption {
            header,
            append,
            append_action,
            keep_empty_value,
        } = option;
        let entry = (|| {
            let Some(core::HeaderValue {
                key,
                value,
                raw_value,
            }) = header
            else {
                return Err(FieldError::new("header", "required"));
            };
            let name = modifiable_header_name(key).at("header.key")?;
            let raw: &[u8] = if raw_value.is_empty() {
                value.as_bytes()
            } else if value.is_empty() {
                raw_value
            } else {
                return Err(FieldError::new(
                    "header",
                    "only one of value and raw_value may be set",
                ));
            };
            let value = literal_header_value(raw).at("header.value")?;
            let set =
                match (append, HeaderAppendAction::try_from(*append_action)) {
                    (Some(_), Ok(HeaderAppendAction::AppendIfExistsOrAdd)) => {
                        !append.as_ref().is_some_and(|a| a.value)
                    }
                    (Some(_), _) => {
                        return Err(FieldError::msg(
                            "append and append_action cannot both be set",
                        ))
                    }
                    (None, Ok(HeaderAppendAction::AppendIfExistsOrAdd)) => false,
                    (None, Ok(HeaderAppendAction::OverwriteIfExistsOrAdd)) => true,
                    (None, _) => return Err(FieldError::new(
                        "append_action",
                        "only APPEND_IF_EXISTS_OR_ADD and OVERWRITE_IF_EXISTS_OR_ADD are supported",
                    )),
                };
            // Envoy skips entries whose value is empty unless told otherwise.
            if value.is_empty() && !*keep_empty_value {
                return Ok(None);
            }
            Ok(Some((set, name, value)))
        })()
        .at(format_args!("{add_field}[{i}]"))?;
        match entry {
            Some((true, name, value)) => mods.set.push((name, value)),
            Some((false, name, value)) => mods.add.push((name, value)),
            None => {}
        }
    }
    Ok(mods)
}

/// Request and response mods from the `(to_add, to_remove)` pairs of
/// `{request,response}_headers_to_{add,remove}` that VirtualHost, Route and
/// ClusterWeight all carry. Request errors are reported first.
fn request_response_mods(
    (request_add, request_remove): (&[core::HeaderValueOption], &[String]),
    (response_add, response_remove): (&[core::HeaderValueOption], &[String]),
) -> Res<(HeaderMods, HeaderMods)> {
    let request = header_mods(
        request_add,
        request_remove,
        "request_headers_to_add",
        "request_headers_to_remove",
    )?;
    let response = header_mods(
        response_add,
        response_remove,
        "response_headers_to_add",
        "response_headers_to_remove",
    )?;
    Ok((request, response))
}

/// Compile a regex that must match the whole input (RE2 `FullMatch`).
#[allow(deprecated)]
pub(super) fn full_regex(m: &matcher::RegexMatcher) -> Res<Regex> {
    // `engine_type` (google_re2, with a deprecated max_program_size) names
    // the only engine there is; the regex crate applies its own size limit.
    let matcher::RegexMatcher {
        regex,
        engine_type: _,
    } = m;
    let _ = compile(regex)?;
    compile(&format!("^(?:{regex})$"))
}

/// Compile `pattern` as written (also proves its parentheses balance before
/// it is wrapped for a full match).
fn compile(pattern: &str) -> Res<Regex> {
    if pattern.is_empty() {
        return Err(FieldError::msg("invalid regex: empty"));
    }
    Regex::new(pattern).map_err(|e| {
        let detail = e.to_string().replace('\n', " ");
        FieldError::msg(format!("invalid regex: {detail}"))
    })
}

fn string_matcher(m: &matcher::StringMatcher) -> Res<StringMatch> {
    use matcher::string_matcher::MatchPattern;
    let matcher::StringMatcher {
        ignore_case,
        match_pattern,
    } = m;
    deny!(ignore_case);
    let non_empty = |s: &String, field: &str| {
        if s.is_empty() {
            Err(FieldError::new(field, "must not be empty"))
        } else {
            Ok(s.clone())
        }
    };
    match match_pattern {
        Some(MatchPattern::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
        Some(MatchPattern::Prefix(s)) => non_empty(s, "prefix").map(StringMatch::Prefix),
        Some(MatchPattern::Suffix(s)) => non_empty(s, "suffix").map(StringMatch::Suffix),
        Some(MatchPattern::Contains(s)) => non_empty(s, "contains").map(StringMatch::Contains),
        Some(MatchPattern::SafeRegex(r)) => full_regex(r).at("safe_regex").map(StringMatch::Regex),
        Some(MatchPattern::Custom(_)) => Err(FieldError::unsupported("custom")),
        None => Err(FieldError::msg(
            "one of exact, prefix, suffix, contains, safe_regex is required",
        )),
    }
}

/// `FractionalPercent` as parts per million (capped at 100%, as Envoy does).
pub(super) fn per_million(p: &etype::FractionalPercent) -> Res<u32> {
    use etype::fractional_percent::DenominatorType;
    let scale: u64 = match DenominatorType::try_from(p.denominator) {
        Ok(DenominatorType::Hundred) => 10_000,
        Ok(DenominatorType::TenThousand) => 100,
        Ok(DenominatorType::Million) => 1,
        Err(_) => return Err(FieldError::new("denominator", "unknown denominator")),
    };
    let value = (u64::from(p.numerator) * scale).min(1_000_000);
    u32::try_from(value).map_err(|_| FieldError::new("numerator", "out of range"))
}

/// A string that ends up in a request line or a `Location` header.
fn header_safe(s: &str, field: &str) -> Res<()> {
    HeaderValue::from_str(s)
        .map(|_| ())
        .map_err(|_| FieldError::new(field, format!("invalid characters in {s:?}")))
}

/// Envoy's default for `max_direct_response_body_size_bytes`.
const DEFAULT_MAX_DIRECT_BODY: u32 = 4096;

pub(super) fn route_configuration(rc: &rpb::RouteConfiguration) -> Res<RouteTable> {
    let rpb::RouteConfiguration {
        name,
        virtual_hosts,
        vhds,
        internal_only_headers,
        response_headers_to_add,
        response_headers_to_remove,
        request_headers_to_add,
        request_headers_to_remove,
        most_specific_header_mutations_wins,
        // Only makes Envoy check cluster names at load time; meshwork follows
        // the RDS default (unknown clusters answer 503 at request time).
        validate_clusters: _,
        max_direct_response_body_size_bytes,
        cluster_specifier_plugins,
        request_mirror_policies,
        ignore_port_in_host_matching,
        vhost_header,
        ignore_path_parameters_in_path_matching,
        typed_per_filter_config,
        metadata: _,
        route_specifiers,
    } = rc;
    deny!(
        vhds,
        internal_only_headers,
        response_headers_to_add,
        response_headers_to_remove,
        request_headers_to_add,
        request_headers_to_remove,
        most_specific_header_mutations_wins,
        cluster_specifier_plugins,
        request_mirror_policies,
        ignore_port_in_host_matching,
        vhost_header,
        ignore_path_parameters_in_path_matching,
        typed_per_filter_config,
        route_specifiers,
    );
    let max_body = max_direct_response_body_size_bytes
        .as_ref()
        .map_or(DEFAULT_MAX_DIRECT_BODY, |v| v.value);
    let mut hosts = Vec::with_capacity(virtual_hosts.len());
    for (i, vh) in virtual_hosts.iter().enumerate() {
        hosts.push(virtual_host(vh, max_body).at(format_args!("virtual_hosts[{i}]"))?);
    }
    RouteTable::new(name.clone(), hosts).map_err(|e: DomainConflict| {
        FieldError::new(
            format!("virtual_hosts[{}].domains[{}]", e.vhost, e.position),
            e.to_string(),
        )
    })
}

#[allow(deprecated)]
fn virtual_host(vh: &rpb::VirtualHost, max_body: u32) -> Res<model::VirtualHost> {
    let rpb::VirtualHost {
        name,
        domains,
        routes,
        matcher,
        require_tls,
        // Stats only.
        virtual_clusters: _,
        rate_limits,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
        cors,
        typed_per_filter_config,
        include_request_attempt_count,
        include_attempt_count_in_response,
        retry_policy,
        retry_policy_typed_config,
        hedge_policy,
        include_is_timeout_retry_header,
        per_request_buffer_limit_bytes: _,
        request_body_buffer_limit: _,
        request_mirror_policies,
        metadata: _,
        route_specifiers,
    } = vh;
    deny!(
        matcher,
        require_tls,
        rate_limits,
        cors,
        typed_per_filter_config,
        include_request_attempt_count,
        include_attempt_count_in_response,
        retry_policy,
        retry_policy_typed_config,
        hedge_policy,
        include_is_timeout_retry_header,
        request_mirror_policies,
        route_specifiers,
    );
    if domains.is_empty() {
        return Err(FieldError::new(
            "domains",
            "at least one domain is required",
        ));
    }
    let mut out = Vec::with_capacity(routes.len());
    for (i, r) in routes.iter().enumerate() {
        out.push(route(r, max_body).at(format_args!("routes[{i}]"))?);
    }
    let (request_headers, response_headers) = request_response_mods(
        (request_headers_to_add, request_headers_to_remove),
        (response_headers_to_add, response_headers_to_remove),
    )?;
    Ok(model::VirtualHost {
        name: name.clone(),
        domains: domains.clone(),
        routes: out,
        request_headers,
        response_headers,
    })
}

#[allow(deprecated)]
fn route(r: &rpb::Route, max_body: u32) -> Res<model::Route> {
    let rpb::Route {
        name,
        r#match,
        metadata: _,
        decorator,
        typed_per_filter_config,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
        tracing,
        per_request_buffer_limit_bytes: _,
        stat_prefix: _,
        request_body_buffer_limit: _,
        route_specifiers,
        action,
    } = r;
    deny!(decorator, tracing, route_specifiers);
    let (rate_limit, fault) = per_filter_configs(typed_per_filter_config)?;
    let Some(route_match) = r#match else {
        return Err(FieldError::new("match", "required"));
    };
    let matcher = self::route_match(route_match).at("match")?;
    let action = match action {
        Some(rpb::route::Action::Route(ra)) => RouteAction::Forward(forward(ra).at("route")?),
        Some(rpb::route::Action::Redirect(ra)) => {
            RouteAction::Redirect(redirect(ra).at("redirect")?)
        }
        Some(rpb::route::Action::DirectResponse(d)) => {
            direct_response(d, max_body).at("direct_response")?
        }
        Some(rpb::route::Action::FilterAction(_)) => {
            return Err(FieldError::unsupported("filter_action"))
        }
        Some(rpb::route::Action::NonForwardingAction(_)) => {
            return Err(FieldError::unsupported("non_forwarding_action"))
        }
        None => {
            return Err(FieldError::new(
                "action",
                "one of route, redirect, direct_response is required",
            ))
        }
    };
    let (request_headers, response_headers) = request_response_mods(
        (request_headers_to_add, request_headers_to_remove),
        (response_headers_to_add, response_headers_to_remove),
    )?;
    Ok(model::Route {
        name: name.clone(),
        matcher,
        action,
        request_headers,
        response_headers,
        rate_limit,
        fault,
    })
}

/// A route's rate limit and fault overrides.
type PerFilter = (Option<Arc<LocalRateLimit>>, Option<Arc<Fault>>);

/// A route's `typed_per_filter_config`: overrides for the rate limit and
/// fault filters, keyed by the filter names meshwork requires in the
/// connection manager. (Envoy ignores an override whose filter is not in
/// the chain; so does the data path.)
fn per_filter_configs(configs: &HashMap<String, pbuf::Any>) -> Res<PerFilter> {
    use super::http_filters::{http_fault, local_rate_limit, FAULT, LOCAL_RATELIMIT};
    let (mut rate_limit, mut fault) = (None, None);
    // Sorted, so that a NACK names the same entry every time.
    let mut sorted: Vec<_> = configs.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    for (key, any) in sorted {
        let at = format!("typed_per_filter_config[{key:?}]");
        match key.as_str() {
            LOCAL_RATELIMIT => {
                let l: lrl::LocalRateLimit =
                    decode_only(any, key, "a LocalRateLimit (not wrapped in a FilterConfig)")
                        .at(&at)?;
                rate_limit = Some(Arc::new(local_rate_limit(&l, true).at(&at)?));
            }
            FAULT => {
                let f: fault::HttpFault =
                    decode_only(any, key, "an HTTPFault (not wrapped in a FilterConfig)")
                        .at(&at)?;
                fault = Some(Arc::new(http_fault(&f).at(&at)?));
            }
            _ => {
                return Err(FieldError::new(
                    at,
                    format!("unsupported filter (only {LOCAL_RATELIMIT} and {FAULT})"),
                ))
            }
        }
    }
    Ok((rate_limit, fault))
}

fn route_match(m: &rpb::RouteMatch) -> Res<model::RouteMatch> {
    use rpb::route_match::PathSpecifier;
    let rpb::RouteMatch {
        case_sensitive,
        runtime_fraction,
        headers,
        query_parameters,
        cookies,
        grpc,
        tls_context,
        dynamic_metadata,
        filter_state,
        path_specifier,
    } = m;
    if case_sensitive.as_ref().is_some_and(|c| !c.value) {
        return Err(FieldError::new(
            "case_sensitive",
            "case-insensitive path matching is not supported",
        ));
    }
    deny!(
        runtime_fraction,
        cookies,
        grpc,
        tls_context,
        dynamic_metadata,
        filter_state,
    );
    let path = match path_specifier {
        Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(PathSpecifier::PathSeparatedPrefix(p)) => {
            // Envoy's validation: `^[^?#]+[^?#/]$`.
            if p.is_empty() || p.ends_with('/') || p.contains(['?', '#']) {
                return Err(FieldError::new(
                    "path_separated_prefix",
                    format!("invalid {p:?}: must be non-empty, without ? or #, not ending in /"),
                ));
            }
            PathMatch::SeparatedPrefix(p.clone())
        }
        Some(PathSpecifier::SafeRegex(r)) => PathMatch::Regex(full_regex(r).at("safe_regex")?),
        Some(PathSpecifier::ConnectMatcher(_)) => {
            return Err(FieldError::unsupported("connect_matcher"))
        }
        Some(PathSpecifier::PathMatchPolicy(_)) => {
            return Err(FieldError::unsupported("path_match_policy"))
        }
        None => {
            return Err(FieldError::new(
                "path_specifier",
                "one of prefix, path, path_separated_prefix, safe_regex is required",
            ))
        }
    };
    let mut out = model::RouteMatch {
        path,
        headers: Vec::new(),
        query: Vec::new(),
        pseudo_headers: Vec::new(),
    };
    for (i, h) in headers.iter().enumerate() {
        match header_matcher(h).at(format_args!("headers[{i}]"))? {
            HeaderCondition::Regular(h) => out.headers.push(h),
            HeaderCondition::Pseudo(p) => out.pseudo_headers.push(p),
        }
    }
    for (i, q) in query_parameters.iter().enumerate() {
        out.query
            .push(query_matcher(q).at(format_args!("query_parameters[{i}]"))?);
    }
    Ok(out)
}

pub(super) enum HeaderCondition {
    Regular(HeaderMatch),
    Pseudo(PseudoHeaderMatch),
}

#[allow(deprecated)]
pub(super) fn header_matcher(h: &rpb::HeaderMatcher) -> Res<HeaderCondition> {
    use rpb::header_matcher::HeaderMatchSpecifier as S;
    let rpb::HeaderMatcher {
        name,
        invert_match,
        treat_missing_header_as_empty,
        header_match_specifier,
    } = h;
    deny!(treat_missing_header_as_empty);
    let mut invert = *invert_match;
    let matcher = match header_match_specifier {
        // Envoy: no specifier means "present".
        None => StringMatch::Present,
        Some(S::PresentMatch(present)) => {
            // `present_match: false` matches absence: the inverse of presence.
            invert ^= !present;
            StringMatch::Present
        }
        Some(S::StringMatch(m)) => string_matcher(m).at("string_match")?,
        Some(S::RangeMatch(_)) => return Err(FieldError::unsupported("range_match")),
        Some(S::ExactMatch(_)) => return Err(deprecated_matcher("exact_match")),
        Some(S::SafeRegexMatch(_)) => return Err(deprecated_matcher("safe_regex_match")),
        Some(S::PrefixMatch(_)) => return Err(deprecated_matcher("prefix_match")),
        Some(S::SuffixMatch(_)) => return Err(deprecated_matcher("suffix_match")),
        Some(S::ContainsMatch(_)) => return Err(deprecated_matcher("contains_match")),
    };
    if let Some(pseudo) = name.strip_prefix(':') {
        let header = match pseudo {
            "method" => PseudoHeader::Method,
            _ => {
                return Err(FieldError::new(
                    "name",
                    format!("unsupported pseudo-header {name:?} (only :method)"),
                ))
            }
        };
        return Ok(HeaderCondition::Pseudo(PseudoHeaderMatch {
            header,
            matcher,
            invert,
        }));
    }
    Ok(HeaderCondition::Regular(HeaderMatch {
        name: header_name(name).at("name")?,
        matcher,
        invert,
    }))
}

fn deprecated_matcher(field: &str) -> FieldError {
    FieldError::new(
        field,
        "deprecated matcher is not supported; use string_match",
    )
}

fn query_matcher(q: &rpb::QueryParameterMatcher) -> Res<QueryMatch> {
    use rpb::query_parameter_matcher::QueryParameterMatchSpecifier as S;
    let rpb::QueryParameterMatcher {
        name,
        query_parameter_match_specifier,
    } = q;
    if name.is_empty() {
        return Err(FieldError::new("name", "must not be empty"));
    }
    let matcher = match query_parameter_match_specifier {
        None | Some(S::PresentMatch(true)) => StringMatch::Present,
        Some(S::PresentMatch(false)) => {
            return Err(FieldError::new(
                "present_match",
                "false is not supported (Envoy treats it as presence)",
            ))
        }
        Some(S::StringMatch(m)) => string_matcher(m).at("string_match")?,
    };
    Ok(QueryMatch {
        name: name.clone(),
        matcher,
    })
}

#[allow(deprecated)]
fn forward(ra: &rpb::RouteAction) -> Res<model::Forward> {
    use rpb::route_action::{ClusterSpecifier, HostRewriteSpecifier};
    let rpb::RouteAction {
        cluster_not_found_response_code,
        metadata_match,
        prefix_rewrite,
        regex_rewrite,
        path_rewrite_policy,
        path_rewrite,
        append_x_forwarded_host,
        timeout,
        idle_timeout,
        flush_timeout,
        early_data_policy,
        retry_policy,
        retry_policy_typed_config,
        request_mirror_policies,
        priority,
        rate_limits,
        include_vh_rate_limits,
        hash_policy,
        cors,
        max_grpc_timeout,
        grpc_timeout_offset,
        upgrade_configs,
        internal_redirect_policy,
        internal_redirect_action,
        max_internal_redirects,
        hedge_policy,
        max_stream_duration,
        cluster_specifier,
        host_rewrite_specifier,
    } = ra;
    deny!(
        cluster_not_found_response_code,
        metadata_match,
        path_rewrite_policy,
        path_rewrite,
        append_x_forwarded_host,
        flush_timeout,
        early_data_policy,
        retry_policy_typed_config,
        priority,
        include_vh_rate_limits,
        cors,
        max_grpc_timeout,
        grpc_timeout_offset,
        upgrade_configs,
        internal_redirect_policy,
        internal_redirect_action,
        max_internal_redirects,
        hedge_policy,
        max_stream_duration,
    );
    let clusters = match cluster_specifier {
        Some(ClusterSpecifier::Cluster(name)) => {
            if name.is_empty() {
                return Err(FieldError::new("cluster", "must not be empty"));
            }
            vec![single_cluster(name)]
        }
        Some(ClusterSpecifier::WeightedClusters(wc)) => {
            weighted_clusters(wc).at("weighted_clusters")?
        }
        Some(ClusterSpecifier::ClusterHeader(_)) => {
            return Err(FieldError::unsupported("cluster_header"))
        }
        Some(ClusterSpecifier::ClusterSpecifierPlugin(_)) => {
            return Err(FieldError::unsupported("cluster_specifier_plugin"))
        }
        Some(ClusterSpecifier::InlineClusterSpecifierPlugin(_)) => {
            return Err(FieldError::unsupported("inline_cluster_specifier_plugin"))
        }
        None => {
            return Err(FieldError::new(
                "cluster_specifier",
                "cluster or weighted_clusters is required",
            ))
        }
    };
    if !prefix_rewrite.is_empty() && regex_rewrite.is_some() {
        return Err(FieldError::new(
            "regex_rewrite",
            "only one of prefix_rewrite and regex_rewrite may be set",
        ));
    }
    let prefix_rewrite = if prefix_rewrite.is_empty() {
        None
    } else {
        rewrite_safe(prefix_rewrite, "prefix_rewrite")?;
        Some(prefix_rewrite.clone())
    };
    let regex_rewrite = regex_rewrite
        .as_ref()
        .map(regex_rewrite_of)
        .transpose()
        .at("regex_rewrite")?;
    let host_rewrite = match host_rewrite_specifier {
        None => None,
        Some(HostRewriteSpecifier::HostRewriteLiteral(h)) => {
            header_safe(h, "host_rewrite_literal")?;
            if h.is_empty() {
                None
            } else {
                Some(h.clone())
            }
        }
        Some(HostRewriteSpecifier::AutoHostRewrite(_)) => {
            return Err(FieldError::unsupported("auto_host_rewrite"))
        }
        Some(HostRewriteSpecifier::HostRewriteHeader(_)) => {
            return Err(FieldError::unsupported("host_rewrite_header"))
        }
        Some(HostRewriteSpecifier::HostRewritePathRegex(_)) => {
            return Err(FieldError::unsupported("host_rewrite_path_regex"))
        }
        Some(HostRewriteSpecifier::HostRewrite(_)) => {
            return Err(FieldError::unsupported("host_rewrite"))
        }
    };
    let mut mirrors = Vec::with_capacity(request_mirror_policies.len());
    for (i, m) in request_mirror_policies.iter().enumerate() {
        mirrors.push(mirror(m).at(format_args!("request_mirror_policies[{i}]"))?);
    }
    let mut hashes = Vec::with_capacity(hash_policy.len());
    for (i, h) in hash_policy.iter().enumerate() {
        hashes.push(hash_policy_of(h).at(format_args!("hash_policy[{i}]"))?);
    }
    for (i, r) in rate_limits.iter().enumerate() {
        super::http_filters::remote_address_rate_limit(r).at(format_args!("rate_limits[{i}]"))?;
    }
    Ok(model::Forward {
        clusters,
        timeout: opt_duration(timeout, "timeout")?,
        prefix_rewrite,
        regex_rewrite,
        host_rewrite,
        mirrors,
        hash_policy: hashes,
        retry: retry_policy
            .as_ref()
            .map(|p| super::resilience::retry_policy(p).map(Arc::new))
            .transpose()
            .at("retry_policy")?,
        idle_timeout: opt_duration(idle_timeout, "idle_timeout")?,
    })
}

/// Rewritten paths go on the request line: no spaces, controls or `#`.
fn rewrite_safe(s: &str, field: &str) -> Res<()> {
    let valid =
        !s.contains('#') && http::uri::PathAndQuery::try_from(format!("/{s}").as_str()).is_ok();
    if valid {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{s:?} is not valid in a request path"),
        ))
    }
}

fn regex_rewrite_of(r: &matcher::RegexMatchAndSubstitute) -> Res<RegexRewrite> {
    let matcher::RegexMatchAndSubstitute {
        pattern,
        substitution,
    } = r;
    let Some(pattern) = pattern else {
        return Err(FieldError::new("pattern", "required"));
    };
    let matcher::RegexMatcher { regex, .. } = pattern;
    let compiled = compile(regex).at("pattern")?;
    let substitution =
        re2_substitution(substitution, compiled.captures_len() - 1).at("substitution")?;
    Ok(RegexRewrite {
        pattern: compiled,
        substitution,
    })
}

/// Convert an RE2 rewrite string (`\0`..`\9`, `\\`) to `regex` crate syntax
/// (`${0}`, literal `$` doubled), refusing references to missing groups as
/// RE2 does.
fn re2_substitution(s: &str, groups: usize) -> Res<String> {
    let mut out = String::with_capacity(s.len() + 8);
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('\\') => out.push('\\'),
                Some(d @ '0'..='9') => {
                    let n = d as usize - '0' as usize;
                    if n > groups {
                        return Err(FieldError::msg(format!(
                            "\\{n} refers to a missing capture group (pattern has {groups})"
                        )));
                    }
                    out.push_str(&format!("${{{n}}}"));
                }
                _ => {
                    return Err(FieldError::msg(
                        "invalid rewrite: \\ must be followed by a digit or \\",
                    ))
                }
            },
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    // The literal parts end up in the request path.
    let literal: String = s.chars().filter(|c| *c != '\\').collect();
    if !literal.is_empty() {
        rewrite_safe(&literal, "substitution").map_err(|e| FieldError::msg(e.message))?;
    }
    Ok(out)
}

#[allow(deprecated)]
fn weighted_clusters(wc: &rpb::WeightedCluster) -> Res<Vec<WeightedCluster>> {
    let rpb::WeightedCluster {
        clusters,
        total_weight,
        // Runtime overrides of weights: no runtime layer, no effect.
        runtime_key_prefix: _,
        random_value_specifier,
    } = wc;
    deny!(random_value_specifier);
    if clusters.is_empty() {
        return Err(FieldError::new("clusters", "must not be empty"));
    }
    let mut out = Vec::with_capacity(clusters.len());
    let mut sum: u64 = 0;
    for (i, c) in clusters.iter().enumerate() {
        let cw = cluster_weight(c).at(format_args!("clusters[{i}]"))?;
        sum += u64::from(cw.weight);
        out.push(cw);
    }
    if sum == 0 {
        return Err(FieldError::new(
            "clusters",
            "the sum of weights must be greater than 0",
        ));
    }
    if sum > u64::from(u32::MAX) {
        return Err(FieldError::new(
            "clusters",
            "the sum of weights must fit in 32 bits",
        ));
    }
    if let Some(total) = total_weight {
        if u64::from(total.value) != sum {
            return Err(FieldError::new(
                "total_weight",
                format!("{} differs from the sum of weights {sum}", total.value),
            ));
        }
    }
    Ok(out)
}

fn cluster_weight(c: &rpb::weighted_cluster::ClusterWeight) -> Res<WeightedCluster> {
    let rpb::weighted_cluster::ClusterWeight {
        name,
        cluster_header,
        weight,
        metadata_match,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
        typed_per_filter_config,
        host_rewrite_specifier,
    } = c;
    deny!(
        cluster_header,
        metadata_match,
        typed_per_filter_config,
        host_rewrite_specifier,
    );
    if name.is_empty() {
        return Err(FieldError::new("name", "must not be empty"));
    }
    let (request_headers, response_headers) = request_response_mods(
        (request_headers_to_add, request_headers_to_remove),
        (response_headers_to_add, response_headers_to_remove),
    )?;
    Ok(WeightedCluster {
        name: name.clone(),
        weight: weight.as_ref().map_or(0, |w| w.value),
        request_headers,
        response_headers,
    })
}

fn mirror(m: &rpb::route_action::RequestMirrorPolicy) -> Res<Mirror> {
    let rpb::route_action::RequestMirrorPolicy {
        cluster,
        cluster_header,
        runtime_fraction,
        // Tracing decision only.
        trace_sampled: _,
        disable_shadow_host_suffix_append,
        request_headers_mutations,
        host_rewrite_literal,
    } = m;
    deny!(
        cluster_header,
        disable_shadow_host_suffix_append,
        request_headers_mutations,
        host_rewrite_literal,
    );
    if cluster.is_empty() {
        return Err(FieldError::new("cluster", "must not be empty"));
    }
    let per_million = match runtime_fraction {
        None => None,
        Some(core::RuntimeFractionalPercent {
            default_value,
            runtime_key: _,
        }) => {
            let Some(p) = default_value else {
                return Err(FieldError::new(
                    "runtime_fraction.default_value",
                    "required",
                ));
            };
            Some(per_million(p).at("runtime_fraction.default_value")?)
        }
    };
    Ok(Mirror {
        cluster: cluster.clone(),
        per_million,
    })
}

fn hash_policy_of(h: &rpb::route_action::HashPolicy) -> Res<HashPolicy> {
    use rpb::route_action::hash_policy::{self as hp, PolicySpecifier};
    let rpb::route_action::HashPolicy {
        terminal,
        policy_specifier,
    } = h;
    let terminal = *terminal;
    match policy_specifier {
        Some(PolicySpecifier::Header(hp::Header {
            header_name,
            regex_rewrite,
        })) => {
            if regex_rewrite.is_some() {
                return Err(FieldError::unsupported("header.regex_rewrite"));
            }
            if header_name.starts_with(':') {
                return Err(FieldError::new(
                    "header.header_name",
                    "pseudo-headers are not supported",
                ));
            }
            Ok(HashPolicy::Header {
                name: self::header_name(header_name).at("header.header_name")?,
                terminal,
            })
        }
        Some(PolicySpecifier::Cookie(hp::Cookie {
            name,
            ttl,
            path,
            attributes,
        })) => {
            if !attributes.is_empty() {
                return Err(FieldError::unsupported("cookie.attributes"));
            }
            if name.is_empty() {
                return Err(FieldError::new("cookie.name", "must not be empty"));
            }
            header_safe(name, "cookie.name")?;
            header_safe(path, "cookie.path")?;
            Ok(HashPolicy::Cookie {
                name: name.clone(),
                ttl: opt_duration(ttl, "cookie.ttl")?,
                path: (!path.is_empty()).then(|| path.clone()),
                terminal,
            })
        }
        Some(PolicySpecifier::ConnectionProperties(hp::ConnectionProperties { source_ip })) => {
            if !source_ip {
                return Err(FieldError::new(
                    "connection_properties.source_ip",
                    "must be true",
                ));
            }
            Ok(HashPolicy::SourceIp { terminal })
        }
        Some(PolicySpecifier::QueryParameter(_)) => Err(FieldError::unsupported("query_parameter")),
        Some(PolicySpecifier::FilterState(_)) => Err(FieldError::unsupported("filter_state")),
        None => Err(FieldError::new(
            "policy_specifier",
            "header, cookie or connection_properties is required",
        )),
    }
}

fn redirect(r: &rpb::RedirectAction) -> Res<Redirect> {
    use rpb::redirect_action::{
        PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier,
    };
    let rpb::RedirectAction {
        host_redirect,
        port_redirect,
        response_code,
        strip_query,
        scheme_rewrite_specifier,
        path_rewrite_specifier,
    } = r;
    deny!(strip_query);
    let status = match RedirectResponseCode::try_from(*response_code) {
        Ok(RedirectResponseCode::MovedPermanently) => 301,
        Ok(RedirectResponseCode::Found) => 302,
        Ok(RedirectResponseCode::SeeOther) => 303,
        Ok(RedirectResponseCode::TemporaryRedirect) => 307,
        Ok(RedirectResponseCode::PermanentRedirect) => 308,
        Err(_) => {
            return Err(FieldError::new(
                "response_code",
                format!("unknown code {response_code}"),
            ))
        }
    };
    let scheme = match scheme_rewrite_specifier {
        None | Some(SchemeRewriteSpecifier::HttpsRedirect(false)) => None,
        Some(SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".to_string()),
        Some(SchemeRewriteSpecifier::SchemeRedirect(s)) => {
            let valid = s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
            if !valid {
                return Err(FieldError::new(
                    "scheme_redirect",
                    format!("invalid scheme {s:?}"),
                ));
            }
            Some(s.clone())
        }
    };
    let host = if host_redirect.is_empty() {
        None
    } else {
        header_safe(host_redirect, "host_redirect")?;
        if host_redirect.contains(['/', '?', '#', ' ']) {
            return Err(FieldError::new(
                "host_redirect",
                format!("invalid host {host_redirect:?}"),
            ));
        }
        Some(host_redirect.clone())
    };
    let port = match *port_redirect {
        0 => None,
        p => Some(
            u16::try_from(p)
                .map_err(|_| FieldError::new("port_redirect", format!("{p} is not a port")))?,
        ),
    };
    let path = match path_rewrite_specifier {
        None => None,
        Some(PathRewriteSpecifier::PathRedirect(p)) if p.is_empty() => None,
        Some(PathRewriteSpecifier::PathRedirect(p)) => {
            header_safe(p, "path_redirect")?;
            if p.contains([' ', '#']) {
                return Err(FieldError::new(
                    "path_redirect",
                    format!("{p:?} is not valid in a URL"),
                ));
            }
            Some(PathRedirect::Full(p.clone()))
        }
        Some(PathRewriteSpecifier::PrefixRewrite(p)) if p.is_empty() => None,
        Some(PathRewriteSpecifier::PrefixRewrite(p)) => {
            rewrite_safe(p, "prefix_rewrite")?;
            Some(PathRedirect::Prefix(p.clone()))
        }
        Some(PathRewriteSpecifier::RegexRewrite(_)) => {
            return Err(FieldError::unsupported("regex_rewrite"))
        }
        Some(PathRewriteSpecifier::PathRewrite(_)) => {
            return Err(FieldError::unsupported("path_rewrite"))
        }
    };
    Ok(Redirect {
        scheme,
        host,
        port,
        path,
        status,
    })
}

fn direct_response(d: &rpb::DirectResponseAction, max_body: u32) -> Res<RouteAction> {
    let rpb::DirectResponseAction {
        status,
        body,
        body_format,
    } = d;
    deny!(body_format);
    // Envoy's validation: 200 <= status < 600.
    let status = match u16::try_from(*status) {
        Ok(s) if (200..600).contains(&s) => s,
        _ => {
            return Err(FieldError::new(
                "status",
                format!("{status} is not in [200, 600)"),
            ))
        }
    };
    let body = match body {
        None => String::new(),
        Some(core::DataSource {
            watched_directory,
            specifier,
        }) => {
            if watched_directory.is_some() {
                return Err(FieldError::unsupported("body.watched_directory"));
            }
            match specifier {
                None => String::new(),
                Some(core::data_source::Specifier::InlineString(s)) => s.clone(),
                Some(core::data_source::Specifier::InlineBytes(b)) => String::from_utf8(b.clone())
                    .map_err(|_| FieldError::new("body.inline_bytes", "must be UTF-8"))?,
                Some(core::data_source::Specifier::Filename(_)) => {
                    return Err(FieldError::unsupported("body.filename"))
                }
                Some(core::data_source::Specifier::EnvironmentVariable(_)) => {
                    return Err(FieldError::unsupported("body.environment_variable"))
                }
            }
        }
    };
    if body.len() as u64 > u64::from(max_body) {
        return Err(FieldError::new(
            "body",
            format!(
                "{} bytes exceed max_direct_response_body_size_bytes ({max_body})",
                body.len()
            ),
        ));
    }
    Ok(RouteAction::Direct { status, body })
}

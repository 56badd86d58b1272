//! `envoy.filters.http.rbac` / `envoy.filters.network.rbac` ->
//! [`authz::RbacFilter`]: exactly the subset meshwork's translator emits
//! (`docs/xds.md`, "RBAC"), everything else refused with its field path.

use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::config::route::v3 as rpb;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as http_rbac;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3 as net_rbac;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use http::HeaderName;

use super::route::full_regex;
use super::{is_default, At, FieldError, Res};
use crate::authz::{self, HeaderRule, HeaderTarget, Matcher, Permission, Principal};
use crate::config::model::StringMatch;

/// Deepest nesting of and/or/not accepted (a bound against hostile input;
/// the translator nests at most four deep).
const MAX_DEPTH: usize = 16;

/// An `envoy.extensions.filters.http.rbac.v3.RBAC`.
pub(super) fn http_filter(r: &http_rbac::Rbac) -> Res<authz::RbacFilter> {
    let http_rbac::Rbac {
        rules,
        // Names of stats only.
        rules_stat_prefix: _,
        matcher,
        shadow_rules,
        shadow_matcher,
        shadow_rules_stat_prefix: _,
        track_per_rule_stats: _,
    } = r;
    deny!(matcher, shadow_matcher);
    filter(rules, shadow_rules)
}

/// An `envoy.extensions.filters.network.rbac.v3.RBAC`.
pub(super) fn network_filter(r: &net_rbac::Rbac) -> Res<authz::RbacFilter> {
    let net_rbac::Rbac {
        rules,
        matcher,
        shadow_rules,
        shadow_matcher,
        shadow_rules_stat_prefix: _,
        stat_prefix,
        enforcement_type,
        delay_deny,
    } = r;
    deny!(matcher, shadow_matcher, delay_deny);
    if stat_prefix.is_empty() {
        return Err(FieldError::new(
            "stat_prefix",
            "required (Envoy refuses an empty one)",
        ));
    }
    if *enforcement_type != net_rbac::rbac::EnforcementType::OneTimeOnFirstByte as i32 {
        return Err(FieldError::new(
            "enforcement_type",
            "only ONE_TIME_ON_FIRST_BYTE is supported (meshwork decides once per connection)",
        ));
    }
    filter(rules, shadow_rules)
}

fn filter(rules: &Option<rbac::Rbac>, shadow: &Option<rbac::Rbac>) -> Res<authz::RbacFilter> {
    let rules = rules.as_ref().map(rbac_rules).transpose().at("rules")?;
    let shadow = shadow
        .as_ref()
        .map(rbac_rules)
        .transpose()
        .at("shadow_rules")?;
    if let Some(s) = &shadow {
        if s.action != authz::Action::Deny {
            return Err(FieldError::new(
                "shadow_rules.action",
                "only DENY is supported in shadow rules (audit: what would be denied)",
            ));
        }
    }
    Ok(authz::RbacFilter { rules, shadow })
}

fn rbac_rules(r: &rbac::Rbac) -> Res<authz::Rules> {
    let rbac::Rbac {
        action,
        policies,
        audit_logging_options,
    } = r;
    deny!(audit_logging_options);
    let action = match rbac::rbac::Action::try_from(*action) {
        Ok(rbac::rbac::Action::Allow) => authz::Action::Allow,
        Ok(rbac::rbac::Action::Deny) => authz::Action::Deny,
        _ => {
            return Err(FieldError::new(
                "action",
                "only ALLOW and DENY are supported",
            ))
        }
    };
    let mut names: Vec<&String> = policies.keys().collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let Some(p) = policies.get(name) else {
            continue;
        };
        out.push((
            name.clone(),
            policy(p).at(format_args!("policies[{name:?}]"))?,
        ));
    }
    Ok(authz::Rules {
        action,
        policies: out,
    })
}

fn policy(p: &rbac::Policy) -> Res<authz::Policy> {
    let rbac::Policy {
        permissions,
        principals,
        condition,
        checked_condition,
        cel_config,
    } = p;
    deny!(condition, checked_condition, cel_config);
    // Envoy: both lists are required (min_items 1).
    if permissions.is_empty() {
        return Err(FieldError::new("permissions", "at least one is required"));
    }
    if principals.is_empty() {
        return Err(FieldError::new("principals", "at least one is required"));
    }
    let mut perms = Vec::with_capacity(permissions.len());
    for (i, x) in permissions.iter().enumerate() {
        perms.push(permission(x, 0).at(format_args!("permissions[{i}]"))?);
    }
    let mut ids = Vec::with_capacity(principals.len());
    for (i, x) in principals.iter().enumerate() {
        ids.push(principal(x, 0).at(format_args!("principals[{i}]"))?);
    }
    Ok(authz::Policy {
        permissions: perms,
        principals: ids,
    })
}

fn depth_check(depth: usize) -> Res<()> {
    if depth > MAX_DEPTH {
        return Err(FieldError::msg(format!(
            "nested more than {MAX_DEPTH} levels deep"
        )));
    }
    Ok(())
}

#[allow(deprecated)]
fn permission(p: &rbac::Permission, depth: usize) -> Res<Permission> {
    use rbac::permission::Rule;
    depth_check(depth)?;
    let set = |rules: &[rbac::Permission], field: &str| -> Res<Vec<Permission>> {
        if rules.is_empty() {
            return Err(FieldError::new(field, "at least one rule is required"));
        }
        let mut v = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            v.push(permission(r, depth + 1).at(format_args!("{field}.rules[{i}]"))?);
        }
        Ok(v)
    };
    match &p.rule {
        Some(Rule::Any(true)) => Ok(Permission::Any),
        Some(Rule::Any(false)) => Err(FieldError::new("any", "must be true when set")),
        Some(Rule::AndRules(s)) => set(&s.rules, "and_rules").map(Permission::And),
        Some(Rule::OrRules(s)) => set(&s.rules, "or_rules").map(Permission::Or),
        Some(Rule::NotRule(r)) => Ok(Permission::Not(Box::new(
            permission(r, depth + 1).at("not_rule")?,
        ))),
        Some(Rule::Header(h)) => header_rule(h).at("header").map(Permission::Header),
        Some(Rule::UrlPath(matcher::PathMatcher { rule })) => match rule {
            Some(matcher::path_matcher::Rule::Path(m)) => string_matcher(m)
                .at("url_path.path")
                .map(Permission::UrlPath),
            None => Err(FieldError::new("url_path.path", "required")),
        },
        Some(Rule::DestinationIp(_)) => Err(FieldError::unsupported("destination_ip")),
        Some(Rule::DestinationPort(_)) => Err(FieldError::new(
            "destination_port",
            "unsupported field (not in meshwork's xDS subset: the translator resolves service ports per filter chain)",
        )),
        Some(Rule::DestinationPortRange(_)) => {
            Err(FieldError::unsupported("destination_port_range"))
        }
        Some(Rule::Metadata(_)) => Err(FieldError::unsupported("metadata")),
        Some(Rule::RequestedServerName(_)) => {
            Err(FieldError::unsupported("requested_server_name"))
        }
        Some(Rule::Matcher(_)) => Err(FieldError::unsupported("matcher")),
        Some(Rule::UriTemplate(_)) => Err(FieldError::unsupported("uri_template")),
        Some(Rule::SourcedMetadata(_)) => Err(FieldError::unsupported("sourced_metadata")),
        None => Err(FieldError::msg("a rule is required")),
    }
}

#[allow(deprecated)]
fn principal(p: &rbac::Principal, depth: usize) -> Res<Principal> {
    use rbac::principal::Identifier;
    depth_check(depth)?;
    let set = |ids: &[rbac::Principal], field: &str| -> Res<Vec<Principal>> {
        if ids.is_empty() {
            return Err(FieldError::new(field, "at least one id is required"));
        }
        let mut v = Vec::with_capacity(ids.len());
        for (i, x) in ids.iter().enumerate() {
            v.push(principal(x, depth + 1).at(format_args!("{field}.ids[{i}]"))?);
        }
        Ok(v)
    };
    match &p.identifier {
        Some(Identifier::Any(true)) => Ok(Principal::Any),
        Some(Identifier::Any(false)) => Err(FieldError::new("any", "must be true when set")),
        Some(Identifier::AndIds(s)) => set(&s.ids, "and_ids").map(Principal::And),
        Some(Identifier::OrIds(s)) => set(&s.ids, "or_ids").map(Principal::Or),
        Some(Identifier::NotId(x)) => Ok(Principal::Not(Box::new(
            principal(x, depth + 1).at("not_id")?,
        ))),
        Some(Identifier::Authenticated(rbac::principal::Authenticated { principal_name })) => {
            let m = principal_name
                .as_ref()
                .map(string_matcher)
                .transpose()
                .at("authenticated.principal_name")?;
            Ok(Principal::Authenticated(m))
        }
        Some(Identifier::SourceIp(_)) => Err(FieldError::unsupported("source_ip")),
        Some(Identifier::DirectRemoteIp(_)) => Err(FieldError::unsupported("direct_remote_ip")),
        Some(Identifier::RemoteIp(_)) => Err(FieldError::unsupported("remote_ip")),
        Some(Identifier::Header(_)) => Err(FieldError::unsupported("header")),
        Some(Identifier::UrlPath(_)) => Err(FieldError::unsupported("url_path")),
        Some(Identifier::Metadata(_)) => Err(FieldError::unsupported("metadata")),
        Some(Identifier::FilterState(_)) => Err(FieldError::unsupported("filter_state")),
        Some(Identifier::SourcedMetadata(_)) => Err(FieldError::unsupported("sourced_metadata")),
        Some(Identifier::Custom(_)) => Err(FieldError::unsupported("custom")),
        None => Err(FieldError::msg("an identifier is required")),
    }
}

#[allow(deprecated)]
fn header_rule(h: &rpb::HeaderMatcher) -> Res<HeaderRule> {
    use rpb::header_matcher::HeaderMatchSpecifier as Spec;
    let rpb::HeaderMatcher {
        name,
        invert_match,
        treat_missing_header_as_empty,
        header_match_specifier,
    } = h;
    deny!(treat_missing_header_as_empty);
    let header = match name.to_ascii_lowercase().as_str() {
        ":method" => HeaderTarget::Method,
        ":authority" | "host" => HeaderTarget::Authority,
        ":path" => HeaderTarget::Path,
        n if n.starts_with(':') => {
            return Err(FieldError::new(
                "name",
                format!("pseudo-header {name:?} is not supported (:method, :authority, :path are)"),
            ))
        }
        n => HeaderTarget::Named(
            HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| FieldError::new("name", format!("invalid header name {name:?}")))?,
        ),
    };
    let matcher = match header_match_specifier {
        Some(Spec::StringMatch(m)) => string_matcher(m).at("string_match")?,
        Some(Spec::PresentMatch(true)) => Matcher {
            pattern: StringMatch::Present,
            ignore_case: false,
        },
        Some(Spec::PresentMatch(false)) => {
            return Err(FieldError::new(
                "present_match",
                "must be true (write invert_match for absence)",
            ))
        }
        Some(Spec::ExactMatch(_)) => return Err(FieldError::unsupported("exact_match")),
        Some(Spec::SafeRegexMatch(_)) => return Err(FieldError::unsupported("safe_regex_match")),
        Some(Spec::RangeMatch(_)) => return Err(FieldError::unsupported("range_match")),
        Some(Spec::PrefixMatch(_)) => return Err(FieldError::unsupported("prefix_match")),
        Some(Spec::SuffixMatch(_)) => return Err(FieldError::unsupported("suffix_match")),
        Some(Spec::ContainsMatch(_)) => return Err(FieldError::unsupported("contains_match")),
        None => return Err(FieldError::msg("string_match or present_match is required")),
    };
    Ok(HeaderRule {
        header,
        matcher,
        invert: *invert_match,
    })
}

/// A `StringMatcher`: exact, prefix, suffix (each optionally ignoring case)
/// or safe_regex.
fn string_matcher(m: &matcher::StringMatcher) -> Res<Matcher> {
    use matcher::string_matcher::MatchPattern;
    let matcher::StringMatcher {
        ignore_case,
        match_pattern,
    } = m;
    let text = |s: &String| {
        if *ignore_case {
            s.to_ascii_lowercase()
        } else {
            s.clone()
        }
    };
    let non_empty = |s: &String, field: &str| {
        if s.is_empty() {
            Err(FieldError::new(field, "must not be empty"))
        } else {
            Ok(text(s))
        }
    };
    let pattern = match match_pattern {
        Some(MatchPattern::Exact(s)) => StringMatch::Exact(text(s)),
        Some(MatchPattern::Prefix(s)) => StringMatch::Prefix(non_empty(s, "prefix")?),
        Some(MatchPattern::Suffix(s)) => StringMatch::Suffix(non_empty(s, "suffix")?),
        Some(MatchPattern::SafeRegex(r)) => {
            if *ignore_case {
                return Err(FieldError::new(
                    "ignore_case",
                    "not supported with safe_regex (Envoy ignores it there)",
                ));
            }
            StringMatch::Regex(full_regex(r).at("safe_regex")?)
        }
        Some(MatchPattern::Contains(_)) => return Err(FieldError::unsupported("contains")),
        Some(MatchPattern::Custom(_)) => return Err(FieldError::unsupported("custom")),
        None => {
            return Err(FieldError::msg(
                "one of exact, prefix, suffix, safe_regex is required",
            ))
        }
    };
    Ok(Matcher {
        pattern,
        ignore_case: *ignore_case,
    })
}

#[cfg(test)]
mod tests;

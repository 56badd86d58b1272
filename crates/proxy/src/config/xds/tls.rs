//! Transport sockets: the mTLS subset the translator emits
//! (`docs/mtls.md`), resolved against the proxy's own identity.
//!
//! Accepted: `envoy.transport_sockets.tls` with an `UpstreamTlsContext` or
//! `DownstreamTlsContext` whose `CommonTlsContext` has TLS 1.3 as minimum
//! and maximum, ALPN values from meshwork's three, the certificate as SDS
//! secret `default` and the roots as SDS secret `ROOTCA` in a
//! `combined_validation_context` (URI SAN exact matchers upstream), SDS from
//! `{ads: {}}` or a file (`path_config_source`); and
//! `envoy.transport_sockets.raw_buffer`. Both secrets resolve to the
//! proxy's [`WorkloadIdentity`]: the key never leaves it, and the files an
//! Envoy would read are not read here. Everything else (inline
//! certificates, other secret names, other TLS versions, SNI, other
//! matchers) is refused with its field path.

use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::cluster::TransportSocketMatch;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf as pbuf;
use identity::{SpiffeId, WorkloadIdentity};

use super::{decode, is_default, is_type, At, Env, FieldError, Res};
use crate::config::model::UpstreamTls;

/// SDS name of the workload certificate.
pub(super) const SDS_CERT: &str = "default";
/// SDS name of the trust bundle.
pub(super) const SDS_ROOTS: &str = "ROOTCA";
const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
const RAW_SOCKET: &str = "envoy.transport_sockets.raw_buffer";
const MATCH_NAMESPACE_KEY: &str = "tlsMode";
const MATCH_VALUE: &str = "meshwork";
/// ALPN values meshwork speaks inside the tunnel.
pub(super) const KNOWN_ALPN: [&str; 3] = ["h2", "http/1.1", "meshwork-tcp/1"];

/// What a filter chain's or cluster's `transport_socket` is.
pub(super) enum Socket {
    Plaintext,
    Upstream(Box<tls::UpstreamTlsContext>),
    Downstream(Box<tls::DownstreamTlsContext>),
}

/// `transport_socket`: TLS (up- or downstream context) or raw_buffer.
pub(super) fn transport_socket(ts: &core::TransportSocket, downstream: bool) -> Res<Socket> {
    let core::TransportSocket { name, config_type } = ts;
    let any = match config_type {
        Some(core::transport_socket::ConfigType::TypedConfig(any)) => any,
        None => return Err(FieldError::new("typed_config", "required")),
    };
    (|| {
        if is_type::<RawBuffer>(any) {
            decode::<RawBuffer>(any)?;
            return Ok(Socket::Plaintext);
        }
        if downstream && is_type::<tls::DownstreamTlsContext>(any) {
            return Ok(Socket::Downstream(Box::new(decode(any)?)));
        }
        if !downstream && is_type::<tls::UpstreamTlsContext>(any) {
            return Ok(Socket::Upstream(Box::new(decode(any)?)));
        }
        Err(FieldError::msg(format!(
            "unsupported transport socket type {:?} (socket {name:?}); meshwork supports {TLS_SOCKET} with {} and {RAW_SOCKET}",
            any.type_url,
            if downstream { "DownstreamTlsContext" } else { "UpstreamTlsContext" },
        )))
    })()
    .at("typed_config")
}

/// A cluster's `transport_socket_matches`: exactly
/// `[{match: {tlsMode: meshwork}, tls}, {match: {}, raw_buffer}]`.
pub(super) fn cluster_matches(
    matches: &[TransportSocketMatch],
    env: &Env,
) -> Res<Option<Arc<UpstreamTls>>> {
    if matches.is_empty() {
        return Ok(None);
    }
    if matches.len() != 2 {
        return Err(FieldError::msg(format!(
            "{} entries; meshwork expects two: {{match: {{tlsMode: meshwork}}}} with TLS, then {{match: {{}}}} with raw_buffer",
            matches.len()
        )));
    }
    let mut upstream = None;
    for (i, m) in matches.iter().enumerate() {
        let TransportSocketMatch {
            name: _,
            r#match,
            transport_socket: ts,
        } = m;
        (|| {
            let selector = r#match.clone().unwrap_or_default();
            let Some(ts) = ts else {
                return Err(FieldError::new("transport_socket", "required"));
            };
            let socket = transport_socket(ts, false).at("transport_socket")?;
            match (i, socket) {
                (0, Socket::Upstream(ctx)) => {
                    if !is_tls_mode_selector(&selector) {
                        return Err(FieldError::new(
                            "match",
                            format!("must be {{{MATCH_NAMESPACE_KEY}: {MATCH_VALUE}}}"),
                        ));
                    }
                    upstream =
                        Some(upstream_context(&ctx, env).at("transport_socket.typed_config")?);
                    Ok(())
                }
                (1, Socket::Plaintext) => {
                    if !selector.fields.is_empty() {
                        return Err(FieldError::new(
                            "match",
                            "must be empty (every other endpoint)",
                        ));
                    }
                    Ok(())
                }
                (0, _) => Err(FieldError::new(
                    "transport_socket",
                    "the first match must use envoy.transport_sockets.tls",
                )),
                _ => Err(FieldError::new(
                    "transport_socket",
                    "the second match must use envoy.transport_sockets.raw_buffer",
                )),
            }
        })()
        .at(format_args!("[{i}]"))?;
    }
    Ok(upstream.map(Arc::new))
}

fn is_tls_mode_selector(s: &pbuf::Struct) -> bool {
    s.fields.len() == 1
        && s.fields.get(MATCH_NAMESPACE_KEY).is_some_and(
            |v| matches!(&v.kind, Some(pbuf::value::Kind::StringValue(t)) if t == MATCH_VALUE),
        )
}

/// Endpoint `metadata`: whether `filter_metadata["envoy.transport_socket_match"]`
/// selects meshwork mTLS. Other namespaces belong to other software.
pub(super) fn endpoint_mtls(m: &core::Metadata) -> Res<bool> {
    let Some(s) = m.filter_metadata.get("envoy.transport_socket_match") else {
        return Ok(false);
    };
    if s.fields.is_empty() {
        return Ok(false);
    }
    if is_tls_mode_selector(s) {
        return Ok(true);
    }
    Err(FieldError::new(
        "filter_metadata[\"envoy.transport_socket_match\"]",
        format!("only {{{MATCH_NAMESPACE_KEY}: {MATCH_VALUE}}} is supported"),
    ))
}

#[allow(deprecated)]
fn upstream_context(u: &tls::UpstreamTlsContext, env: &Env) -> Res<UpstreamTls> {
    let tls::UpstreamTlsContext {
        common_tls_context,
        sni,
        auto_host_sni,
        auto_sni_san_validation,
        allow_renegotiation,
        max_session_keys,
        enforce_rsa_key_usage,
    } = u;
    deny!(
        sni,
        auto_host_sni,
        auto_sni_san_validation,
        allow_renegotiation,
        max_session_keys,
        enforce_rsa_key_usage
    );
    let Some(common) = common_tls_context else {
        return Err(FieldError::new("common_tls_context", "required"));
    };
    let (alpn, sans) = common_context(common, true).at("common_tls_context")?;
    let expected = sans
        .iter()
        .enumerate()
        .map(|(i, s)| {
            SpiffeId::parse(s).map_err(|e| {
                FieldError::new(
                    format!("common_tls_context.combined_validation_context.default_validation_context.match_typed_subject_alt_names[{i}]"),
                    format!("not a SPIFFE id: {e}"),
                )
            })
        })
        .collect::<Res<Vec<_>>>()?;
    if expected.is_empty() {
        return Err(FieldError::new(
            "common_tls_context.combined_validation_context.default_validation_context.match_typed_subject_alt_names",
            "required: the SPIFFE id(s) the server may present",
        ));
    }
    let identity = require_identity(env)?;
    let alpn_bytes: Vec<&[u8]> = alpn.iter().map(|a| a.as_bytes()).collect();
    let client = identity
        .mesh_client_config(expected, &alpn_bytes)
        .map_err(|e| FieldError::msg(e.to_string()))?;
    let pool_key: Arc<str> = format!("{}|{}", alpn.join(","), sans.join(",")).into();
    Ok(UpstreamTls {
        expected_ids: sans,
        alpn,
        pool_key,
        client,
    })
}

/// A `DownstreamTlsContext`: returns its ALPN values.
pub(super) fn downstream_context(d: &tls::DownstreamTlsContext, env: &Env) -> Res<Vec<String>> {
    let tls::DownstreamTlsContext {
        common_tls_context,
        require_client_certificate,
        require_sni,
        disable_stateful_session_resumption: _,
        session_timeout: _,
        ocsp_staple_policy,
        full_scan_certs_on_sni_mismatch,
        prefer_client_ciphers: _,
        session_ticket_keys_type,
    } = d;
    // Resumption is always off in meshwork (see identity::tls), so the
    // session settings above cannot change what a client observes.
    deny!(
        require_sni,
        ocsp_staple_policy,
        full_scan_certs_on_sni_mismatch,
        session_ticket_keys_type
    );
    if !require_client_certificate.is_some_and(|b| b.value) {
        return Err(FieldError::new(
            "require_client_certificate",
            "must be true: mesh mTLS verifies every client",
        ));
    }
    let Some(common) = common_tls_context else {
        return Err(FieldError::new("common_tls_context", "required"));
    };
    let (alpn, sans) = common_context(common, false).at("common_tls_context")?;
    if !sans.is_empty() {
        return Err(FieldError::new(
            "common_tls_context.combined_validation_context.default_validation_context.match_typed_subject_alt_names",
            "not supported downstream: authorize clients with RBAC principals",
        ));
    }
    require_identity(env)?;
    Ok(alpn)
}

/// The proxy's identity, or the NACK that says how to give it one.
pub(super) fn require_identity(env: &Env) -> Res<&Arc<WorkloadIdentity>> {
    env.identity.as_ref().ok_or_else(|| {
        FieldError::msg(
            "mTLS is configured but this proxy has no workload identity: start it with \
             --token (a join token from `meshwork token create`) and --ca-bundle, or with \
             --cert/--key/--ca-bundle certificate files",
        )
    })
}

/// Returns (ALPN, URI SANs to match).
#[allow(deprecated)]
fn common_context(c: &tls::CommonTlsContext, upstream: bool) -> Res<(Vec<String>, Vec<String>)> {
    let tls::CommonTlsContext {
        tls_params,
        tls_certificates,
        tls_certificate_sds_secret_configs,
        tls_certificate_provider_instance,
        custom_tls_certificate_selector,
        tls_certificate_certificate_provider,
        tls_certificate_certificate_provider_instance,
        alpn_protocols,
        custom_handshaker,
        key_log,
        validation_context_type,
    } = c;
    if !tls_certificates.is_empty() {
        return Err(FieldError::new(
            "tls_certificates",
            "inline certificates are not supported: use SDS secret \"default\" (the proxy's own identity)",
        ));
    }
    deny!(
        tls_certificate_provider_instance,
        custom_tls_certificate_selector,
        tls_certificate_certificate_provider,
        tls_certificate_certificate_provider_instance,
        custom_handshaker,
        key_log
    );
    match tls_params {
        Some(p) => tls_parameters(p).at("tls_params")?,
        None => {
            return Err(FieldError::new(
                "tls_params",
                "required: tls_minimum_protocol_version and tls_maximum_protocol_version TLSv1_3",
            ))
        }
    }
    if alpn_protocols.is_empty() {
        return Err(FieldError::new(
            "alpn_protocols",
            "required: the protocol inside the tunnel (h2, http/1.1 or meshwork-tcp/1)",
        ));
    }
    for (i, a) in alpn_protocols.iter().enumerate() {
        if !KNOWN_ALPN.contains(&a.as_str()) {
            return Err(FieldError::new(
                format!("alpn_protocols[{i}]"),
                format!("unsupported {a:?} (only h2, http/1.1, meshwork-tcp/1)"),
            ));
        }
    }
    if upstream && alpn_protocols.len() != 1 {
        return Err(FieldError::new(
            "alpn_protocols",
            "exactly one value upstream: the cluster's protocol",
        ));
    }
    match tls_certificate_sds_secret_configs.as_slice() {
        [one] => sds(one, SDS_CERT).at("tls_certificate_sds_secret_configs[0]")?,
        _ => {
            return Err(FieldError::new(
                "tls_certificate_sds_secret_configs",
                "exactly one entry, SDS secret \"default\"",
            ))
        }
    }
    use tls::common_tls_context::ValidationContextType as V;
    let sans = match validation_context_type {
        Some(V::CombinedValidationContext(c)) => {
            combined_validation(c).at("combined_validation_context")?
        }
        Some(V::ValidationContextSdsSecretConfig(_)) => {
            return Err(FieldError::unsupported("validation_context_sds_secret_config")
                .with_hint("use combined_validation_context with SDS secret \"ROOTCA\""))
        }
        Some(V::ValidationContext(_)) => {
            return Err(FieldError::new(
                "validation_context",
                "inline trust anchors are not supported: use combined_validation_context with SDS secret \"ROOTCA\"",
            ))
        }
        Some(_) => return Err(FieldError::unsupported("validation_context_type")),
        None => {
            return Err(FieldError::new(
                "combined_validation_context",
                "required (roots from SDS secret \"ROOTCA\")",
            ))
        }
    };
    Ok((alpn_protocols.clone(), sans))
}

fn tls_parameters(p: &tls::TlsParameters) -> Res<()> {
    let tls::TlsParameters {
        tls_minimum_protocol_version,
        tls_maximum_protocol_version,
        cipher_suites,
        ecdh_curves,
        signature_algorithms,
        compliance_policies,
    } = p;
    deny!(
        cipher_suites,
        ecdh_curves,
        signature_algorithms,
        compliance_policies
    );
    let v13 = tls::tls_parameters::TlsProtocol::TlSv13 as i32;
    if *tls_minimum_protocol_version != v13 {
        return Err(FieldError::new(
            "tls_minimum_protocol_version",
            "must be TLSv1_3 (meshwork speaks TLS 1.3 only)",
        ));
    }
    if *tls_maximum_protocol_version != v13 {
        return Err(FieldError::new(
            "tls_maximum_protocol_version",
            "must be TLSv1_3 (meshwork speaks TLS 1.3 only)",
        ));
    }
    Ok(())
}

#[allow(deprecated)]
fn combined_validation(
    c: &tls::common_tls_context::CombinedCertificateValidationContext,
) -> Res<Vec<String>> {
    let tls::common_tls_context::CombinedCertificateValidationContext {
        default_validation_context,
        validation_context_sds_secret_config,
        validation_context_certificate_provider,
        validation_context_certificate_provider_instance,
    } = c;
    deny!(
        validation_context_certificate_provider,
        validation_context_certificate_provider_instance
    );
    match validation_context_sds_secret_config {
        Some(s) => sds(s, SDS_ROOTS).at("validation_context_sds_secret_config")?,
        None => {
            return Err(FieldError::new(
                "validation_context_sds_secret_config",
                "required: SDS secret \"ROOTCA\"",
            ))
        }
    }
    match default_validation_context {
        Some(v) => validation_context(v).at("default_validation_context"),
        None => Ok(Vec::new()),
    }
}

#[allow(deprecated)]
fn validation_context(v: &tls::CertificateValidationContext) -> Res<Vec<String>> {
    let tls::CertificateValidationContext {
        trusted_ca,
        ca_certificate_provider_instance,
        system_root_certs,
        watched_directory,
        verify_certificate_spki,
        verify_certificate_hash,
        match_typed_subject_alt_names,
        match_subject_alt_names,
        require_signed_certificate_timestamp,
        crl,
        allow_expired_certificate,
        trust_chain_verification,
        custom_validator_config,
        only_verify_leaf_cert_crl,
        max_verify_depth,
        suppress_client_ca_list: _,
    } = v;
    deny!(
        trusted_ca,
        ca_certificate_provider_instance,
        system_root_certs,
        watched_directory,
        verify_certificate_spki,
        verify_certificate_hash,
        match_subject_alt_names,
        require_signed_certificate_timestamp,
        crl,
        allow_expired_certificate,
        trust_chain_verification,
        custom_validator_config,
        only_verify_leaf_cert_crl,
        max_verify_depth
    );
    let mut out = Vec::with_capacity(match_typed_subject_alt_names.len());
    for (i, m) in match_typed_subject_alt_names.iter().enumerate() {
        out.push(san_matcher(m).at(format_args!("match_typed_subject_alt_names[{i}]"))?);
    }
    Ok(out)
}

fn san_matcher(m: &tls::SubjectAltNameMatcher) -> Res<String> {
    let tls::SubjectAltNameMatcher {
        san_type,
        matcher,
        oid,
    } = m;
    deny!(oid);
    if *san_type != tls::subject_alt_name_matcher::SanType::Uri as i32 {
        return Err(FieldError::new(
            "san_type",
            "only URI (SPIFFE ids) is supported",
        ));
    }
    let Some(matcher::StringMatcher {
        ignore_case,
        match_pattern,
    }) = matcher
    else {
        return Err(FieldError::new("matcher", "required"));
    };
    (|| {
        deny!(ignore_case);
        match match_pattern {
            Some(matcher::string_matcher::MatchPattern::Exact(id)) => Ok(id.clone()),
            _ => Err(FieldError::msg("only exact is supported")),
        }
    })()
    .at("matcher")
}

/// An `SdsSecretConfig` naming `expected`, from ADS or a file.
fn sds(s: &tls::SdsSecretConfig, expected: &str) -> Res<()> {
    let tls::SdsSecretConfig { name, sds_config } = s;
    if name != expected {
        return Err(FieldError::new(
            "name",
            format!(
                "unknown SDS secret {name:?} (meshwork resolves {SDS_CERT:?} and {SDS_ROOTS:?} from the proxy's own identity; expected {expected:?} here)"
            ),
        ));
    }
    let Some(source) = sds_config else {
        return Err(FieldError::new(
            "sds_config",
            "required ({ads: {}} or path_config_source)",
        ));
    };
    let core::ConfigSource {
        authorities,
        initial_fetch_timeout: _,
        resource_api_version,
        config_source_specifier,
    } = source;
    (|| {
        deny!(authorities);
        if *resource_api_version != core::ApiVersion::Auto as i32
            && *resource_api_version != core::ApiVersion::V3 as i32
        {
            return Err(FieldError::new("resource_api_version", "must be V3"));
        }
        match config_source_specifier {
            Some(core::config_source::ConfigSourceSpecifier::Ads(_)) => Ok(()),
            Some(core::config_source::ConfigSourceSpecifier::PathConfigSource(p)) => {
                let core::PathConfigSource {
                    path,
                    watched_directory: _,
                    poll_interval: _,
                } = p;
                if path.is_empty() {
                    return Err(FieldError::new("path_config_source.path", "required"));
                }
                Ok(())
            }
            _ => Err(FieldError::msg(
                "only ads and path_config_source are supported",
            )),
        }
    })()
    .at("sds_config")
}

impl FieldError {
    fn with_hint(mut self, hint: &str) -> Self {
        self.message = format!("{}; {hint}", self.message);
        self
    }
}

#[cfg(test)]
mod tests;

//! Automatic mTLS between sidecars, in Istio's xDS shape (contract in
//! `docs/mtls.md`).
//!
//! When the mesh enables mTLS (a `Mesh` resource with `spec.mtls`), every
//! cluster of a Service with at least one sidecar endpoint (a Workload
//! carrying [`crate::resources::SIDECAR_INBOUND_ANNOTATION`]) gets two
//! `transport_socket_matches`: endpoints whose metadata says
//! `envoy.transport_socket_match.tlsMode = meshwork` get an
//! `UpstreamTlsContext` (TLS 1.3, ALPN by port protocol, the server's SPIFFE
//! id pinned), every other endpoint (static external workloads) plaintext.
//! The inbound listener terminates mTLS with a `DownstreamTlsContext`
//! requiring a client certificate; `strict` has TLS chains only,
//! `permissive` adds the plaintext chains behind a `tls_inspector`.
//!
//! Certificates are never inline: SDS secret `default` (the workload
//! certificate) and `ROOTCA` (the trust bundle), over ADS or, for a proxy
//! whose node metadata names a [`CERTS_DIR_METADATA`] directory, from
//! `<dir>/default.yaml` and `<dir>/ROOTCA.yaml` (file-based SDS).
//!
//! Non-goals: issuing certificates (the CA), serving the secrets (control
//! plane / proxy), per-Service mTLS overrides.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::cluster::v3::cluster::TransportSocketMatch;
use envoy_types::pb::envoy::config::core::v3::{
    config_source, transport_socket, ApiVersion, ConfigSource, Metadata, PathConfigSource,
    TransportSocket, WatchedDirectory,
};
use envoy_types::pb::envoy::config::listener::v3::{listener_filter, ListenerFilter};
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    subject_alt_name_matcher::SanType,
    tls_parameters::TlsProtocol,
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    SubjectAltNameMatcher, TlsParameters, UpstreamTlsContext,
};
use envoy_types::pb::google::protobuf::{value, BoolValue, Struct, Value};

use super::util::{ads_source, any, exact};
use crate::mesh::Mesh;
use crate::resources::{AppProtocol, MtlsMode, Service, Workload, SIDECAR_INBOUND_ANNOTATION};

/// SDS name of the workload certificate and key (Istio's name).
pub const SDS_CERT: &str = "default";
/// SDS name of the trust bundle (Istio's name).
pub const SDS_ROOTS: &str = "ROOTCA";
/// Node metadata key naming a directory of SDS files (`default.yaml`,
/// `ROOTCA.yaml`): the proxy reads certificates from files, not ADS.
pub const CERTS_DIR_METADATA: &str = "meshwork.certs_dir";
/// Endpoint metadata namespace Envoy matches `transport_socket_matches` on.
pub const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";
/// The key in [`TRANSPORT_SOCKET_MATCH`] (Istio's).
pub const TLS_MODE_KEY: &str = "tlsMode";
/// The value marking an endpoint that terminates meshwork mTLS.
pub const TLS_MODE_MESHWORK: &str = "meshwork";
/// Name of the TLS transport socket.
pub const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";
/// Name of the plaintext transport socket.
pub const RAW_BUFFER_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.raw_buffer";
/// Name of the listener filter that tells TLS from plaintext.
pub const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";
/// `transport_socket_matches[].name` of the mTLS match.
pub const MATCH_NAME_MTLS: &str = "tlsMode-meshwork";
/// `transport_socket_matches[].name` of the plaintext fallback.
pub const MATCH_NAME_PLAINTEXT: &str = "tlsMode-disabled";
/// ALPN for HTTP/2 inside the tunnel.
pub const ALPN_H2: &str = "h2";
/// ALPN for HTTP/1.1 inside the tunnel.
pub const ALPN_HTTP1: &str = "http/1.1";
/// ALPN for opaque TCP inside the tunnel (the receiving proxy does not sniff).
pub const ALPN_MESH_TCP: &str = "meshwork-tcp/1";

/// mTLS as enabled for one translation.
#[derive(Debug, Clone)]
pub(crate) struct Mtls {
    pub mode: MtlsMode,
    trust_domain: String,
    certs_dir: Option<String>,
}

impl Mtls {
    /// `None` when the mesh does not enable mTLS (no `Mesh.spec.mtls`).
    pub fn of(mesh: &Mesh, certs_dir: Option<&str>) -> Option<Mtls> {
        mesh.mesh_config()?.value.spec.mtls.as_ref()?;
        Some(Mtls {
            mode: mesh.mtls_mode(),
            trust_domain: mesh.trust_domain().to_string(),
            certs_dir: certs_dir.map(str::to_string),
        })
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service account>` of `svc`'s workloads.
    pub fn spiffe_id(&self, svc: &Service) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain,
            svc.metadata.namespace,
            svc.service_account()
        )
    }

    fn sds_source(&self, name: &str) -> ConfigSource {
        match &self.certs_dir {
            None => ads_source(),
            Some(dir) => {
                let dir = dir.trim_end_matches('/');
                ConfigSource {
                    config_source_specifier: Some(
                        config_source::ConfigSourceSpecifier::PathConfigSource(PathConfigSource {
                            path: format!("{dir}/{name}.yaml"),
                            watched_directory: Some(WatchedDirectory {
                                path: dir.to_string(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                    ),
                    resource_api_version: ApiVersion::V3 as i32,
                    ..Default::default()
                }
            }
        }
    }

    fn sds(&self, name: &str) -> SdsSecretConfig {
        SdsSecretConfig {
            name: name.to_string(),
            sds_config: Some(self.sds_source(name)),
        }
    }

    fn common(&self, alpn: &[&str], san: Option<String>) -> CommonTlsContext {
        CommonTlsContext {
            tls_params: Some(TlsParameters {
                tls_minimum_protocol_version: TlsProtocol::TlSv13 as i32,
                tls_maximum_protocol_version: TlsProtocol::TlSv13 as i32,
                ..Default::default()
            }),
            alpn_protocols: alpn.iter().map(|s| s.to_string()).collect(),
            tls_certificate_sds_secret_configs: vec![self.sds(SDS_CERT)],
            validation_context_type: Some(ValidationContextType::CombinedValidationContext(
                CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: san
                            .into_iter()
                            .map(|id| SubjectAltNameMatcher {
                                san_type: SanType::Uri as i32,
                                matcher: Some(exact(&id)),
                                oid: String::new(),
                            })
                            .collect(),
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(self.sds(SDS_ROOTS)),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }
    }

    /// `transport_socket_matches` of a cluster of `svc` (port protocol
    /// `proto`): mTLS to sidecar endpoints, plaintext to the rest. Empty
    /// when `svc` has no sidecar endpoint (nothing to secure).
    pub fn cluster_matches(
        &self,
        mesh: &Mesh,
        svc: &Service,
        proto: AppProtocol,
    ) -> Vec<TransportSocketMatch> {
        let has_sidecar = mesh
            .workloads_of(&svc.metadata.namespace, &svc.metadata.name)
            .any(|w| has_sidecar(&w.value));
        if !has_sidecar {
            return Vec::new();
        }
        let tls = UpstreamTlsContext {
            common_tls_context: Some(self.common(upstream_alpn(proto), Some(self.spiffe_id(svc)))),
            ..Default::default()
        };
        let mut selector = HashMap::new();
        selector.insert(TLS_MODE_KEY.to_string(), string_value(TLS_MODE_MESHWORK));
        vec![
            TransportSocketMatch {
                name: MATCH_NAME_MTLS.to_string(),
                r#match: Some(Struct { fields: selector }),
                transport_socket: Some(TransportSocket {
                    name: TLS_TRANSPORT_SOCKET.to_string(),
                    config_type: Some(transport_socket::ConfigType::TypedConfig(any(&tls))),
                }),
            },
            TransportSocketMatch {
                name: MATCH_NAME_PLAINTEXT.to_string(),
                r#match: Some(Struct::default()),
                transport_socket: Some(raw_buffer()),
            },
        ]
    }

    /// The transport socket of an inbound TLS filter chain offering `alpn`.
    pub fn downstream(&self, alpn: &[&str]) -> TransportSocket {
        let tls = DownstreamTlsContext {
            common_tls_context: Some(self.common(alpn, None)),
            require_client_certificate: Some(BoolValue { value: true }),
            ..Default::default()
        };
        TransportSocket {
            name: TLS_TRANSPORT_SOCKET.to_string(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(any(&tls))),
        }
    }
}

/// Whether `w` runs behind a meshwork sidecar (which terminates mTLS).
pub(crate) fn has_sidecar(w: &Workload) -> bool {
    w.metadata
        .annotations
        .contains_key(SIDECAR_INBOUND_ANNOTATION)
}

/// Endpoint metadata selecting the mTLS transport socket.
pub(crate) fn endpoint_metadata() -> Metadata {
    let mut fields = HashMap::new();
    fields.insert(TLS_MODE_KEY.to_string(), string_value(TLS_MODE_MESHWORK));
    let mut m = Metadata::default();
    m.filter_metadata
        .insert(TRANSPORT_SOCKET_MATCH.to_string(), Struct { fields });
    m
}

/// The ALPN a client offers for a port of protocol `proto`.
pub fn upstream_alpn(proto: AppProtocol) -> &'static [&'static str] {
    if proto.is_http2() {
        &[ALPN_H2]
    } else if proto.is_http() {
        &[ALPN_HTTP1]
    } else {
        &[ALPN_MESH_TCP]
    }
}

/// `envoy.filters.listener.tls_inspector`.
pub(crate) fn tls_inspector() -> ListenerFilter {
    ListenerFilter {
        name: TLS_INSPECTOR.to_string(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(any(
            &TlsInspector::default(),
        ))),
        ..Default::default()
    }
}

fn raw_buffer() -> TransportSocket {
    TransportSocket {
        name: RAW_BUFFER_TRANSPORT_SOCKET.to_string(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(
            &RawBuffer {},
        ))),
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(value::Kind::StringValue(s.to_string())),
    }
}

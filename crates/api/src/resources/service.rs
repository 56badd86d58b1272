//! `Service` (a named set of ports) and `Workload` (one instance of a service).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::Metadata;

/// `meshwork.dev/v1alpha1 Service`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: ServiceSpec,
}

/// `Service.spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// At least one port; names and numbers unique.
    pub ports: Vec<ServicePort>,
    /// The identity of the service's workloads (defaults to the service name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// The service's virtual IP (transparent mode), pinned: inside
    /// `240.240.0.0/16` and unique in the mesh. Default: allocated from a
    /// hash of `namespace/name` (see `Mesh::service_vip`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<std::net::Ipv4Addr>,
}

/// What a service port speaks.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 (clients may also use h2c; upstream is HTTP/1.1).
    #[default]
    Http,
    /// HTTP/2 without TLS (h2c) to the upstream.
    Http2,
    /// gRPC (HTTP/2).
    Grpc,
    /// Opaque TCP.
    Tcp,
}

impl AppProtocol {
    /// HTTP, HTTP/2 or gRPC: routed by the HTTP connection manager.
    pub fn is_http(self) -> bool {
        !matches!(self, AppProtocol::Tcp)
    }

    /// The upstream speaks HTTP/2.
    pub fn is_http2(self) -> bool {
        matches!(self, AppProtocol::Http2 | AppProtocol::Grpc)
    }

    /// The YAML spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AppProtocol::Http => "http",
            AppProtocol::Http2 => "http2",
            AppProtocol::Grpc => "grpc",
            AppProtocol::Tcp => "tcp",
        }
    }
}

fn is_default_proto(p: &AppProtocol) -> bool {
    *p == AppProtocol::Http
}

/// `Service.spec.ports[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    /// DNS-1123 label, unique in the service.
    pub name: String,
    /// 1..=65535, unique in the service.
    pub port: u32,
    /// Defaults to `http`.
    #[serde(default, skip_serializing_if = "is_default_proto")]
    pub app_protocol: AppProtocol,
    /// Port on the workloads (default: `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
    /// Explicit mode, TCP ports: the local port on which the sidecar accepts
    /// this service's connections (default: `port`; 0: any free port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_port: Option<u32>,
}

impl ServicePort {
    /// The port on the workloads when they do not say otherwise.
    pub fn target_port(&self) -> u32 {
        self.target_port.unwrap_or(self.port)
    }

    /// The sidecar's local port for TCP services in explicit mode.
    pub fn local_port(&self) -> u32 {
        self.local_port.unwrap_or(self.port)
    }
}

impl Service {
    /// The service account (identity) of its workloads.
    pub fn service_account(&self) -> &str {
        self.spec
            .service_account
            .as_deref()
            .unwrap_or(&self.metadata.name)
    }

    /// The port with number `port`.
    pub fn port(&self, port: u32) -> Option<&ServicePort> {
        self.spec.ports.iter().find(|p| p.port == port)
    }

    /// The port named `name`.
    pub fn port_named(&self, name: &str) -> Option<&ServicePort> {
        self.spec.ports.iter().find(|p| p.name == name)
    }

    /// The first HTTP-ish (http, http2, grpc) port, which also gets the
    /// port-less host names.
    pub fn first_http_port(&self) -> Option<&ServicePort> {
        self.spec.ports.iter().find(|p| p.app_protocol.is_http())
    }
}

/// `meshwork.dev/v1alpha1 Workload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: WorkloadSpec,
}

fn default_weight() -> u32 {
    1
}

fn is_one(w: &u32) -> bool {
    *w == 1
}

/// `Workload.spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// Name of the Service (same namespace) this is an instance of.
    pub service: String,
    /// IP address the workload is reached at.
    pub address: IpAddr,
    /// Service port name -> port on this workload (default: the service
    /// port's `targetPort`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u32>,
    /// Load-balancing weight, 1..=128 (default 1).
    #[serde(default = "default_weight", skip_serializing_if = "is_one")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<Locality>,
}

/// Where a workload runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Locality {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub zone: String,
}

impl Workload {
    /// The port of this workload that serves service port `sp`.
    /// Where callers send traffic for service port `sp`: the workload's
    /// sidecar inbound listener when it announced one (the
    /// [`super::SIDECAR_INBOUND_ANNOTATION`]), else `address:port_for(sp)`.
    pub fn endpoint_for(&self, sp: &super::ServicePort) -> (std::net::IpAddr, u32) {
        match self
            .metadata
            .annotations
            .get(super::SIDECAR_INBOUND_ANNOTATION)
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        {
            Some(inbound) => (inbound.ip(), u32::from(inbound.port())),
            None => (self.spec.address, self.port_for(sp)),
        }
    }

    pub fn port_for(&self, sp: &super::ServicePort) -> u32 {
        self.spec
            .ports
            .get(&sp.name)
            .copied()
            .unwrap_or_else(|| sp.target_port())
    }
}

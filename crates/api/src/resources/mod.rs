//! The resource kinds meshwork reads, as serde types.
//!
//! Contract: field names, defaults and enums follow `docs/resources.md` (our
//! kinds) and the upstream Gateway API CRDs (routes). Every struct denies
//! unknown fields, so a typo is an error rather than a silently ignored
//! setting. Deserializing checks types and enums only; limits, patterns,
//! cross-field rules and references are checked by [`crate::validate`].
//!
//! Non-goals: Kubernetes `status`, `managedFields` and other server-side
//! metadata; Gateway parents (meshwork is a mesh: routes attach to Services).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

mod authz;
mod duration;
mod policy;
mod route;
mod service;

pub use authz::*;
pub use duration::GwDuration;
pub use policy::*;
pub use route::*;
pub use service::*;

/// Group/version of meshwork's own kinds.
pub const MESHWORK_V1ALPHA1: &str = "meshwork.dev/v1alpha1";
/// Group/version of the Gateway API routes.
pub const GATEWAY_V1: &str = "gateway.networking.k8s.io/v1";
/// Older Gateway API version accepted for TCPRoute.
pub const GATEWAY_V1ALPHA2: &str = "gateway.networking.k8s.io/v1alpha2";

/// The namespace of a resource that does not say.
/// Annotation a sidecar puts on the Workload it registers: `ip:port` of its
/// inbound listener, where callers' proxies send this workload's traffic.
pub const SIDECAR_INBOUND_ANNOTATION: &str = "meshwork.dev/sidecar-inbound";
/// Annotation of a Workload that is not (or no longer) taking new traffic:
/// `starting` (left out of its Service's endpoints) or `draining` (sent as
/// EDS `DRAINING`: callers stop picking it). Absent or `serving`: an
/// endpoint like any other. Sidecars set it through their node metadata
/// (`state`); a static Workload may carry it too.
pub const WORKLOAD_STATE_ANNOTATION: &str = "meshwork.dev/workload-state";
/// The values [`WORKLOAD_STATE_ANNOTATION`] may take.
pub const WORKLOAD_STATES: [&str; 3] = ["starting", "serving", "draining"];

pub const DEFAULT_NAMESPACE: &str = "default";

/// The kinds of resource meshwork understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `Mesh`: mesh-wide settings (Rust type [`MeshConfig`]).
    Mesh,
    Service,
    Workload,
    HttpRoute,
    GrpcRoute,
    TcpRoute,
    TrafficPolicy,
    AuthorizationPolicy,
}

impl Kind {
    /// Every kind, in the order they are listed to users.
    pub const ALL: [Kind; 8] = [
        Kind::Mesh,
        Kind::Service,
        Kind::Workload,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::TcpRoute,
        Kind::TrafficPolicy,
        Kind::AuthorizationPolicy,
    ];

    /// The `kind:` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Mesh => "Mesh",
            Kind::Service => "Service",
            Kind::Workload => "Workload",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::TcpRoute => "TCPRoute",
            Kind::TrafficPolicy => "TrafficPolicy",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }

    /// The `apiVersion:` values accepted for this kind (the first is preferred).
    pub fn api_versions(self) -> &'static [&'static str] {
        match self {
            Kind::Mesh
            | Kind::Service
            | Kind::Workload
            | Kind::TrafficPolicy
            | Kind::AuthorizationPolicy => &[MESHWORK_V1ALPHA1],
            Kind::HttpRoute | Kind::GrpcRoute => &[GATEWAY_V1],
            Kind::TcpRoute => &[GATEWAY_V1, GATEWAY_V1ALPHA2],
        }
    }

    /// The kind named `s` (exact, case-sensitive like Kubernetes).
    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// `apiVersion kind` pairs for "known kinds are ..." messages.
    pub fn known_list() -> String {
        let mut v = Vec::new();
        for k in Kind::ALL {
            for av in k.api_versions() {
                v.push(format!("{av} {}", k.as_str()));
            }
        }
        v.join(", ")
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

/// `metadata` of every resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    /// DNS-1123 label: lowercase letters, digits and `-`, at most 63 characters.
    pub name: String,
    /// Defaults to `default`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339 time; breaks route precedence ties (older first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

impl Metadata {
    /// Metadata with just a namespace and name.
    pub fn new(namespace: &str, name: &str) -> Self {
        Metadata {
            name: name.to_string(),
            namespace: namespace.to_string(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            creation_timestamp: None,
        }
    }
}

/// Any resource. Resources are parsed and stored once per change, never on a
/// hot path, so a large TrafficPolicy variant costs nothing worth boxing.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
#[allow(clippy::large_enum_variant)]
pub enum Resource {
    Mesh(MeshConfig),
    Service(Service),
    Workload(Workload),
    HttpRoute(HttpRoute),
    GrpcRoute(GrpcRoute),
    TcpRoute(TcpRoute),
    TrafficPolicy(TrafficPolicy),
    AuthorizationPolicy(AuthorizationPolicy),
}

impl Resource {
    /// Which kind this is.
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Mesh(_) => Kind::Mesh,
            Resource::Service(_) => Kind::Service,
            Resource::Workload(_) => Kind::Workload,
            Resource::HttpRoute(_) => Kind::HttpRoute,
            Resource::GrpcRoute(_) => Kind::GrpcRoute,
            Resource::TcpRoute(_) => Kind::TcpRoute,
            Resource::TrafficPolicy(_) => Kind::TrafficPolicy,
            Resource::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
        }
    }

    /// Its metadata.
    pub fn metadata(&self) -> &Metadata {
        match self {
            Resource::Mesh(r) => &r.metadata,
            Resource::Service(r) => &r.metadata,
            Resource::Workload(r) => &r.metadata,
            Resource::HttpRoute(r) => &r.metadata,
            Resource::GrpcRoute(r) => &r.metadata,
            Resource::TcpRoute(r) => &r.metadata,
            Resource::TrafficPolicy(r) => &r.metadata,
            Resource::AuthorizationPolicy(r) => &r.metadata,
        }
    }

    /// The `apiVersion` it was written with.
    pub fn api_version(&self) -> &str {
        match self {
            Resource::Mesh(r) => &r.api_version,
            Resource::Service(r) => &r.api_version,
            Resource::Workload(r) => &r.api_version,
            Resource::HttpRoute(r) => &r.api_version,
            Resource::GrpcRoute(r) => &r.api_version,
            Resource::TcpRoute(r) => &r.api_version,
            Resource::TrafficPolicy(r) => &r.api_version,
            Resource::AuthorizationPolicy(r) => &r.api_version,
        }
    }

    /// `Kind namespace/name`, as used in messages.
    pub fn label(&self) -> String {
        let m = self.metadata();
        format!("{} {}/{}", self.kind(), m.namespace, m.name)
    }
}

/// A reference to the parent a route attaches to (`parentRefs[]`). meshwork
/// accepts Services only (GAMMA); `port` or `sectionName` (a port name)
/// narrows the attachment to one port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    /// `""`, `core` or `meshwork.dev` for a Service. Omitted means the CRD
    /// default `gateway.networking.k8s.io`, which meshwork accepts for
    /// `kind: Service` as a convenience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Must be `Service` (the CRD default `Gateway` is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    /// Defaults to the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// A port name of the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// A port number of the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
}

fn default_service_kind() -> String {
    "Service".to_string()
}

fn is_default_service_kind(s: &str) -> bool {
    s == "Service"
}

fn default_weight() -> u32 {
    1
}

fn is_one(w: &u32) -> bool {
    *w == 1
}

/// `BackendObjectReference`: a Service port (mirror targets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendObjectRef {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    #[serde(
        default = "default_service_kind",
        skip_serializing_if = "is_default_service_kind"
    )]
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The service port number (required for Services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
}

/// `TCPRoute` backendRefs entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpBackendRef {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    #[serde(
        default = "default_service_kind",
        skip_serializing_if = "is_default_service_kind"
    )]
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Share of connections, 0..=1000000 (default 1).
    #[serde(default = "default_weight", skip_serializing_if = "is_one")]
    pub weight: u32,
}

/// The parts every backend reference has, whatever the route kind.
#[derive(Debug, Clone, Copy)]
pub struct BackendView<'a> {
    pub group: &'a str,
    pub kind: &'a str,
    pub name: &'a str,
    pub namespace: Option<&'a str>,
    pub port: Option<u32>,
    pub weight: u32,
}

impl BackendObjectRef {
    /// The common view (weight 1).
    pub fn view(&self) -> BackendView<'_> {
        BackendView {
            group: &self.group,
            kind: &self.kind,
            name: &self.name,
            namespace: self.namespace.as_deref(),
            port: self.port,
            weight: 1,
        }
    }
}

impl TcpBackendRef {
    /// The common view.
    pub fn view(&self) -> BackendView<'_> {
        BackendView {
            group: &self.group,
            kind: &self.kind,
            name: &self.name,
            namespace: self.namespace.as_deref(),
            port: self.port,
            weight: self.weight,
        }
    }
}

/// `LocalObjectReference` (filter `extensionRef`), accepted by the schema but
/// refused by validation: meshwork has no extension filters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalObjectRef {
    pub group: String,
    pub kind: String,
    pub name: String,
}

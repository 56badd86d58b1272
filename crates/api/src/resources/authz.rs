//! `Mesh` (mesh-wide settings: trust domain, mTLS mode, default
//! authorization action) and `AuthorizationPolicy` (who may call a Service,
//! and how).
//!
//! The policy shape follows Istio's `AuthorizationPolicy` (`action`,
//! `rules[].from[]`, `rules[].to[]`), adapted to meshwork: a policy targets
//! one Service of its namespace (`targetRef`) or, without one, every Service
//! of its namespace; principals are full SPIFFE ids. Semantics (evaluation
//! order, wildcards, TCP vs HTTP) are in `docs/authorization.md`; checks are
//! in `validate::authz`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Metadata, TargetRef};

/// The only name a `Mesh` resource may have.
pub const MESH_CONFIG_NAME: &str = "default";
/// Trust domain when no `Mesh` says otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// `meshwork.dev/v1alpha1 Mesh`: settings of the whole mesh. At most one,
/// named `default`; its namespace is not significant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshConfig {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: MeshConfigSpec,
}

/// `Mesh.spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshConfigSpec {
    /// SPIFFE trust domain of every workload identity (default `cluster.local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<AuthorizationSettings>,
    /// Transparent capture: what happens to captured connections whose
    /// original destination is not a mesh Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
}

/// `Mesh.spec.outboundTrafficPolicy` (Istio's field of the same name).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutboundTrafficPolicy {
    #[serde(default)]
    pub mode: OutboundMode,
}

/// Where captured traffic to a destination outside the mesh goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundMode {
    /// Passed through to its original destination (`PassthroughCluster`).
    #[default]
    AllowAny,
    /// Refused: closed right away (`BlackHoleCluster`).
    RegistryOnly,
}

/// `Mesh.spec.mtls`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MtlsSettings {
    #[serde(default)]
    pub mode: MtlsMode,
}

/// How inbound listeners treat plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// Only mTLS from other proxies is accepted.
    Strict,
    /// mTLS and plaintext are both accepted (migration).
    #[default]
    Permissive,
}

impl MtlsMode {
    /// The YAML spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Strict => "strict",
            MtlsMode::Permissive => "permissive",
        }
    }
}

/// `Mesh.spec.authorization`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationSettings {
    #[serde(default)]
    pub default_action: DefaultAction,
}

/// What happens to a request no ALLOW policy applies to: the default-deny
/// switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    #[default]
    Allow,
    Deny,
}

impl DefaultAction {
    /// The YAML spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultAction::Allow => "allow",
            DefaultAction::Deny => "deny",
        }
    }
}

/// `meshwork.dev/v1alpha1 AuthorizationPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: AuthorizationPolicySpec,
}

/// `AuthorizationPolicy.spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The Service (same namespace) this policy protects; none: every
    /// Service of the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRef>,
    pub action: AuthzAction,
    /// OR-ed. An ALLOW policy without rules matches nothing (denies all);
    /// a DENY or AUDIT policy without rules matches nothing (has no effect).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<AuthzRule>,
}

/// `spec.action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AuthzAction {
    /// A request is allowed only if some ALLOW policy of its destination matches.
    Allow,
    /// A matching request is denied, whatever ALLOW policies say.
    Deny,
    /// Evaluated like DENY, but only logged and counted ("would deny").
    Audit,
}

impl AuthzAction {
    /// The YAML spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthzAction::Allow => "ALLOW",
            AuthzAction::Deny => "DENY",
            AuthzAction::Audit => "AUDIT",
        }
    }
}

/// `spec.rules[]`: matches when one `from` entry AND one `to` entry match
/// (an empty list matches everything).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<AuthzSource>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<AuthzOperation>,
}

/// `rules[].from[]`: who sends. Fields are AND-ed, entries of a list OR-ed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzSource {
    /// SPIFFE ids; `*`, `prefix*` and `*suffix` wildcards.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// Namespaces of the peer's identity; `*`, `prefix*`, `*suffix`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
}

/// `rules[].to[]`: what is asked. Fields are AND-ed, entries of a list OR-ed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzOperation {
    /// Service port numbers of the destination.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u32>,
    /// HTTP methods (upper case).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Request paths (without query): exact, `prefix*`, `*suffix` or `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
    /// A gRPC service (and method): the path `/service/method`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcOperation>,
    /// Request header name -> value: exact, `prefix*`, `*suffix`, or `*`
    /// (present). Every header listed must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

impl AuthzOperation {
    /// Whether it uses anything only HTTP requests have.
    pub fn has_l7(&self) -> bool {
        !self.methods.is_empty()
            || !self.paths.is_empty()
            || !self.not_paths.is_empty()
            || self.grpc.is_some()
            || !self.headers.is_empty()
    }
}

/// `to[].grpc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcOperation {
    /// Fully qualified service, e.g. `helloworld.Greeter`.
    pub service: String,
    /// A method of it; none: every method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

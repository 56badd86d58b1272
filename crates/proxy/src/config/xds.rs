//! xDS v3 resources -> [`Snapshot`]: validation and conversion, no I/O.
//!
//! Purpose: the proxy is configured only from the Envoy resources meshwork's
//! translator emits (`docs/xds.md`). This module turns Listeners,
//! RouteConfigurations, Clusters and ClusterLoadAssignments into the runtime
//! model and refuses everything else.
//!
//! Contract:
//! - Every field of every message is looked at: each struct is destructured
//!   exhaustively, so a new field in `envoy-types` fails to compile here
//!   instead of being silently ignored. A field is either converted, ignored
//!   because it cannot change what a client observes (stats names, metadata
//!   of other filters, Envoy buffer tuning), or refused when set.
//! - A refusal (NACK) names the resource and the field path, e.g.
//!   `listener "inbound": filter_chains[1].filters[0].typed_config: unsupported type "..."`.
//! - State of the world per type: a type present in an [`Update`] replaces
//!   that type wholesale. One bad resource rejects the whole update and the
//!   previous snapshot stays in force (Envoy would apply the good resources of
//!   a type; meshwork prefers never running a half-applied config).
//! - Dangling references (an HCM naming an unknown RouteConfiguration, a route
//!   naming an unknown cluster, a cluster without endpoints) are not errors:
//!   as in Envoy they fail at request time (404 / 503).
//!
//! mTLS (`tls`): transport sockets naming SDS secrets `default` and
//! `ROOTCA` resolve to the proxy's own identity ([`Env::identity`]); a
//! config that needs mTLS is refused when the proxy has none.
//!
//! Non-goals: fetching resources (the xDS client), Secret resources (the
//! identity manager consumes them), runtime overrides (`runtime_key`s are ignored: meshwork has no
//! runtime layer, so the `default_value` applies, as in Envoy without one).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cpb;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as epb;
use envoy_types::pb::envoy::config::listener::v3 as lpb;
use envoy_types::pb::envoy::config::route::v3 as rpb;
use envoy_types::pb::google::protobuf as pbuf;

use super::model::{HeaderMods, Snapshot, WeightedCluster};

/// Refuse each listed field (a binding from an exhaustive destructuring)
/// unless it holds its protobuf default.
macro_rules! deny {
    ($($field:ident),+ $(,)?) => {
        $(
            if !is_default($field) {
                return Err(FieldError::unsupported(stringify!($field)));
            }
        )+
    };
}

// The converters, one module per resource family; declared after `deny!`
// so the macro is in scope inside them.
mod cluster;
mod http_filters;
mod listener;
mod rbac;
mod resilience;
mod route;
#[cfg(test)]
mod tests;
mod tls;

/// One delivery of resources: `Some((version_info, resources))` for each type
/// that was sent; `None` leaves that type as it was.
#[derive(Debug, Clone, Default)]
pub struct Update {
    pub listeners: Option<(String, Vec<lpb::Listener>)>,
    pub routes: Option<(String, Vec<rpb::RouteConfiguration>)>,
    pub clusters: Option<(String, Vec<cpb::Cluster>)>,
    pub endpoints: Option<(String, Vec<epb::ClusterLoadAssignment>)>,
}

/// The xDS resource types the proxy consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    Listener,
    RouteConfiguration,
    Cluster,
    ClusterLoadAssignment,
}

impl ResourceKind {
    /// The short word used in NACK messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Listener => "listener",
            ResourceKind::RouteConfiguration => "route",
            ResourceKind::Cluster => "cluster",
            ResourceKind::ClusterLoadAssignment => "endpoints",
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why one resource was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NackReason {
    pub kind: ResourceKind,
    /// The resource name (`#<index>` when the resource has none).
    pub resource: String,
    /// Field path inside the resource, e.g. `virtual_hosts[0].routes[2].match.safe_regex`;
    /// empty when the resource as a whole is at fault.
    pub path: String,
    pub message: String,
}

impl fmt::Display for NackReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}: ", self.kind, self.resource)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// A refused update: every resource that could not be converted, with the
/// reason. Sent back to the control plane as the NACK's `error_detail`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", join_reasons(.reasons))]
pub struct NackError {
    pub reasons: Vec<NackReason>,
}

impl NackError {
    /// Whether any reason concerns a resource of `kind` (to NACK per type).
    pub fn concerns(&self, kind: ResourceKind) -> bool {
        self.reasons.iter().any(|r| r.kind == kind)
    }
}

fn join_reasons(reasons: &[NackReason]) -> String {
    let parts: Vec<String> = reasons.iter().map(ToString::to_string).collect();
    parts.join("; ")
}

/// What conversion needs to know about the proxy itself.
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// The proxy's workload identity: SDS secrets `default` and `ROOTCA`
    /// resolve to it. `None`: configs that need mTLS are refused.
    pub identity: Option<Arc<identity::WorkloadIdentity>>,
}

impl Env {
    /// For offline checks (`meshwork validate`, `meshwork why`): convert as
    /// a proxy with an identity would, so mTLS configs are checked rather
    /// than refused for the lack of one. The identity is a throwaway (a
    /// fresh CA's bundle, no certificate): nothing handshakes with it.
    pub fn offline() -> Env {
        let identity = identity::TrustDomain::new("offline.invalid")
            .ok()
            .and_then(|td| identity::Ca::generate(td).ok())
            .map(|ca| identity::WorkloadIdentity::new(ca.bundle()));
        Env { identity }
    }
}

/// Apply `update` on top of `previous` (state of the world per type), for
/// a proxy without identity. See [`apply_with`].
pub fn apply(previous: &Snapshot, update: Update) -> Result<Snapshot, NackError> {
    apply_with(previous, update, &Env::default())
}

/// Apply `update` on top of `previous` (state of the world per type).
///
/// Returns the new snapshot, or every reason to refuse it; on error nothing
/// of the update is applied.
pub fn apply_with(previous: &Snapshot, update: Update, env: &Env) -> Result<Snapshot, NackError> {
    let mut next = previous.clone();
    let mut reasons = Vec::new();
    if let Some((version, items)) = update.listeners {
        next.listeners = convert_all(
            ResourceKind::Listener,
            &items,
            |l| &l.name,
            |l| listener::listener(l, env),
            &mut reasons,
        );
        next.versions.listeners = version;
    }
    if let Some((version, items)) = update.routes {
        next.routes = convert_all(
            ResourceKind::RouteConfiguration,
            &items,
            |r| &r.name,
            |r| route::route_configuration(r).map(Some),
            &mut reasons,
        );
        next.versions.routes = version;
    }
    if let Some((version, items)) = update.clusters {
        next.clusters = convert_all(
            ResourceKind::Cluster,
            &items,
            |c| &c.name,
            |c| cluster::cluster(c, env).map(Some),
            &mut reasons,
        );
        next.versions.clusters = version;
    }
    if let Some((version, items)) = update.endpoints {
        next.endpoints = convert_all(
            ResourceKind::ClusterLoadAssignment,
            &items,
            |e| &e.cluster_name,
            |e| cluster::load_assignment(e).map(Some),
            &mut reasons,
        );
        next.versions.endpoints = version;
    }
    if reasons.is_empty() {
        Ok(next)
    } else {
        Err(NackError { reasons })
    }
}

/// A snapshot from a complete set of resources, all at `version`
/// (standalone mode, tests), for a proxy without identity.
pub fn from_resources(
    version: &str,
    listeners: Vec<lpb::Listener>,
    routes: Vec<rpb::RouteConfiguration>,
    clusters: Vec<cpb::Cluster>,
    endpoints: Vec<epb::ClusterLoadAssignment>,
) -> Result<Snapshot, NackError> {
    from_resources_with(
        version,
        listeners,
        routes,
        clusters,
        endpoints,
        &Env::default(),
    )
}

/// [`from_resources`] for a proxy described by `env`.
pub fn from_resources_with(
    version: &str,
    listeners: Vec<lpb::Listener>,
    routes: Vec<rpb::RouteConfiguration>,
    clusters: Vec<cpb::Cluster>,
    endpoints: Vec<epb::ClusterLoadAssignment>,
    env: &Env,
) -> Result<Snapshot, NackError> {
    apply_with(
        &Snapshot::default(),
        Update {
            listeners: Some((version.to_string(), listeners)),
            routes: Some((version.to_string(), routes)),
            clusters: Some((version.to_string(), clusters)),
            endpoints: Some((version.to_string(), endpoints)),
        },
        env,
    )
}

// ---------------------------------------------------------------------------
// Error plumbing

/// A conversion failure inside one resource: the path is built outwards as
/// the error bubbles up through [`At::at`].
#[derive(Debug)]
struct FieldError {
    path: String,
    message: String,
}

impl FieldError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }

    fn msg(message: impl Into<String>) -> Self {
        FieldError::new(String::new(), message)
    }

    fn unsupported(field: &str) -> Self {
        FieldError::new(field, "unsupported field (not in meshwork's xDS subset)")
    }

    fn prefixed(mut self, segment: impl fmt::Display) -> Self {
        let segment = segment.to_string();
        self.path = if self.path.is_empty() {
            segment
        } else if self.path.starts_with('[') {
            segment + &self.path
        } else {
            format!("{segment}.{}", self.path)
        };
        self
    }
}

type Res<T> = Result<T, FieldError>;

trait At<T> {
    /// Prefix the error's path with `segment` (a field name or `name[i]`).
    fn at(self, segment: impl fmt::Display) -> Res<T>;
}

impl<T> At<T> for Res<T> {
    fn at(self, segment: impl fmt::Display) -> Res<T> {
        self.map_err(|e| e.prefixed(segment))
    }
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

fn convert_all<P, T>(
    kind: ResourceKind,
    items: &[P],
    name_of: impl Fn(&P) -> &String,
    convert: impl Fn(&P) -> Res<Option<T>>,
    reasons: &mut Vec<NackReason>,
) -> HashMap<String, Arc<T>> {
    let mut out = HashMap::with_capacity(items.len());
    let mut seen = HashSet::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let name = name_of(item);
        let mut reason = |resource: String, path: String, message: String| {
            reasons.push(NackReason {
                kind,
                resource,
                path,
                message,
            })
        };
        if name.is_empty() {
            reason(
                format!("#{i}"),
                String::new(),
                "resource name must not be empty".into(),
            );
            continue;
        }
        if !seen.insert(name.as_str()) {
            reason(
                name.clone(),
                String::new(),
                "duplicate resource name".into(),
            );
            continue;
        }
        match convert(item) {
            Ok(Some(v)) => {
                out.insert(name.clone(), Arc::new(v));
            }
            Ok(None) => {}
            Err(e) => reason(name.clone(), e.path, e.message),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Shared helpers

const MAX_DURATION_SECONDS: i64 = 315_576_000_000;

fn duration(d: &pbuf::Duration) -> Res<Duration> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(FieldError::msg("negative duration"));
    }
    if d.seconds > MAX_DURATION_SECONDS || d.nanos >= 1_000_000_000 {
        return Err(FieldError::msg("duration out of range"));
    }
    let secs = u64::try_from(d.seconds).map_err(|_| FieldError::msg("negative duration"))?;
    let nanos = u32::try_from(d.nanos).map_err(|_| FieldError::msg("negative duration"))?;
    Ok(Duration::new(secs, nanos))
}

fn opt_duration(d: &Option<pbuf::Duration>, field: &str) -> Res<Option<Duration>> {
    d.as_ref().map(duration).transpose().at(field)
}

/// The message name of an `Any` (Envoy takes what follows the last `/`).
fn type_name(any: &pbuf::Any) -> &str {
    match any.type_url.rfind('/') {
        Some(i) => &any.type_url[i + 1..],
        None => &any.type_url,
    }
}

fn is_type<M: prost::Name>(any: &pbuf::Any) -> bool {
    type_name(any) == M::full_name()
}

fn decode<M: prost::Message + prost::Name + Default>(any: &pbuf::Any) -> Res<M> {
    M::decode(any.value.as_slice())
        .map_err(|e| FieldError::msg(format!("invalid {}: {e}", M::NAME)))
}

/// A filter's `typed_config` that may only be `M`: decoded, or an error at
/// `typed_config` naming the type found and `rule` (what may stand there).
fn decode_only<M: prost::Message + prost::Name + Default>(
    any: &pbuf::Any,
    filter_name: &str,
    rule: &str,
) -> Res<M> {
    if !is_type::<M>(any) {
        return Err(FieldError::new(
            "typed_config",
            format!(
                "unsupported type {:?} (filter {filter_name:?}): {rule}",
                any.type_url
            ),
        ));
    }
    decode::<M>(any).at("typed_config")
}

fn unsupported_type(any: &pbuf::Any, filter_name: &str) -> FieldError {
    FieldError::new(
        "typed_config",
        format!(
            "unsupported type {:?} (filter {filter_name:?})",
            any.type_url
        ),
    )
}

fn socket_address(address: &Option<core::Address>) -> Res<SocketAddr> {
    let Some(core::Address { address }) = address else {
        return Err(FieldError::msg("required"));
    };
    let Some(core::address::Address::SocketAddress(sa)) = address else {
        return Err(FieldError::msg("only socket_address is supported"));
    };
    let core::SocketAddress {
        protocol,
        address,
        resolver_name,
        ipv4_compat,
        network_namespace_filepath,
        port_specifier,
    } = sa;
    (|| {
        if *protocol != core::socket_address::Protocol::Tcp as i32 {
            return Err(FieldError::new("protocol", "only TCP is supported"));
        }
        deny!(resolver_name, ipv4_compat, network_namespace_filepath);
        let ip: IpAddr = address
            .parse()
            .map_err(|_| FieldError::new("address", format!("not an IP address: {address:?}")))?;
        let port = match port_specifier {
            Some(core::socket_address::PortSpecifier::PortValue(p)) => u16::try_from(*p)
                .map_err(|_| FieldError::new("port_value", format!("{p} is not a port")))?,
            Some(core::socket_address::PortSpecifier::NamedPort(_)) => {
                return Err(FieldError::unsupported("named_port"))
            }
            None => return Err(FieldError::new("port_value", "required")),
        };
        Ok(SocketAddr::new(ip, port))
    })()
    .at("socket_address")
}

/// `config_source` must be `{ads: {}}` (resource_api_version V3 or unset).
fn ads_source(source: &Option<core::ConfigSource>) -> Res<()> {
    let Some(source) = source else {
        return Err(FieldError::msg("required ({ads: {}})"));
    };
    let core::ConfigSource {
        authorities,
        // Only affects how long Envoy waits for the first response.
        initial_fetch_timeout: _,
        resource_api_version,
        config_source_specifier,
    } = source;
    deny!(authorities);
    if *resource_api_version != core::ApiVersion::Auto as i32
        && *resource_api_version != core::ApiVersion::V3 as i32
    {
        return Err(FieldError::new("resource_api_version", "must be V3"));
    }
    match config_source_specifier {
        Some(core::config_source::ConfigSourceSpecifier::Ads(_)) => Ok(()),
        _ => Err(FieldError::msg("only ads is supported")),
    }
}

fn single_cluster(name: &str) -> WeightedCluster {
    WeightedCluster {
        name: name.to_string(),
        weight: 1,
        request_headers: HeaderMods::default(),
        response_headers: HeaderMods::default(),
    }
}

//! Per-proxy snapshots: the translator's output indexed by type and name,
//! with a version per resource, shared wherever proxies are alike.
//!
//! Contract:
//! - A [`Base`] holds everything that depends only on the mesh and on the
//!   proxy's listener addresses and client namespace (outbound listeners,
//!   routes, every service's clusters and endpoints). Proxies that agree on
//!   those share one `Base` (`Arc`): with N proxies the mesh is translated
//!   once, not N times.
//! - A [`Snapshot`] is a `Base` plus what only this proxy has: its inbound
//!   listener, route and clusters (translated from its own Service,
//!   Workload, the Mesh settings and the AuthorizationPolicies that apply,
//!   alone, and reused while those stay the same) and, when the proxy
//!   declared the services it calls
//!   (`upstreams` in its node metadata), the scope that hides the rest.
//! - Every resource carries a version that changes only when its content
//!   changes: building compares each resource with the one of the same name
//!   in the previous build (protobuf equality, since map fields do not encode
//!   deterministically) and keeps the old version and allocation when equal.
//!   That is what lets delta streams skip unchanged resources and
//!   state-of-the-world streams skip unchanged types.
//! - Proxyless gRPC clients ask for Listeners by service host name; they get
//!   an `api_listener` whose RDS name is that host name, and a
//!   RouteConfiguration of that name holding only the matching virtual host.
//!
//! Non-goals: deciding what a stream subscribed to (see `stream`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use api::resources::Locality;
use api::{names, Mesh, ProxyContext, Resource};
use envoy_types::pb::envoy::config::cluster::v3::{cluster::LbPolicy, Cluster};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    route, route_action, RouteConfiguration, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

/// The resource types served, the translated ones in the order Envoy
/// warms them, then Secret (the `ROOTCA` trust bundle: global, not in any
/// snapshot; see `stream`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum TypeKind {
    Cluster,
    Endpoints,
    Listener,
    Route,
    Secret,
}

/// How many [`TypeKind`]s there are.
pub(crate) const KINDS: usize = 5;

impl TypeKind {
    pub(crate) const ALL: [TypeKind; KINDS] = [
        TypeKind::Cluster,
        TypeKind::Endpoints,
        TypeKind::Listener,
        TypeKind::Route,
        TypeKind::Secret,
    ];

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn url(self) -> String {
        match self {
            TypeKind::Cluster => Cluster::type_url(),
            TypeKind::Endpoints => ClusterLoadAssignment::type_url(),
            TypeKind::Listener => Listener::type_url(),
            TypeKind::Route => RouteConfiguration::type_url(),
            TypeKind::Secret => Secret::type_url(),
        }
    }

    pub(crate) fn from_url(url: &str) -> Option<TypeKind> {
        TypeKind::ALL.into_iter().find(|k| k.url() == url)
    }

    /// The word used in status JSON.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TypeKind::Cluster => "clusters",
            TypeKind::Endpoints => "endpoints",
            TypeKind::Listener => "listeners",
            TypeKind::Route => "routes",
            TypeKind::Secret => "secrets",
        }
    }

    /// Types whose empty subscription means "everything" (LDS, CDS).
    pub(crate) fn wildcard_by_default(self) -> bool {
        matches!(self, TypeKind::Cluster | TypeKind::Listener)
    }

    /// The list of served type URLs, for error messages.
    pub(crate) fn served() -> String {
        let v: Vec<String> = TypeKind::ALL.iter().map(|k| k.url()).collect();
        v.join(", ")
    }
}

/// One xDS resource (boxed: the messages differ in size by kilobytes, and
/// an endpoint assignment should not pay for a cluster).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Res {
    Listener(Box<Listener>),
    Route(Box<RouteConfiguration>),
    Cluster(Box<Cluster>),
    Endpoints(Box<ClusterLoadAssignment>),
    Secret(Box<Secret>),
}

/// `m` packed in an `Any`.
fn pack<T: Message + Name>(m: &T) -> Any {
    Any {
        type_url: T::type_url(),
        value: m.encode_to_vec(),
    }
}

impl Res {
    pub(crate) fn to_any(&self) -> Any {
        match self {
            Res::Listener(m) => pack(m.as_ref()),
            Res::Route(m) => pack(m.as_ref()),
            Res::Cluster(m) => pack(m.as_ref()),
            Res::Endpoints(m) => pack(m.as_ref()),
            Res::Secret(m) => pack(m.as_ref()),
        }
    }
}

/// A resource and the version of its content.
#[derive(Debug, Clone)]
pub(crate) struct Versioned {
    pub(crate) version: Arc<str>,
    body: Arc<Body>,
}

/// A resource's content. Shared resources (a [`Base`]) keep the message, to
/// derive scoped and proxyless variants from it, and encode it once, on
/// first use; a proxy's own resources keep only their encoding, which is a
/// fraction of the message's size in memory (every optional sub-message of
/// an Envoy type is stored inline).
#[derive(Debug)]
enum Body {
    Message { res: Res, encoded: OnceLock<Any> },
    Encoded(Any),
}

impl Versioned {
    pub(crate) fn new(version: Arc<str>, res: Res) -> Versioned {
        Versioned {
            version,
            body: Arc::new(Body::Message {
                res,
                encoded: OnceLock::new(),
            }),
        }
    }

    fn encoded(version: Arc<str>, any: Any) -> Versioned {
        Versioned {
            version,
            body: Arc::new(Body::Encoded(any)),
        }
    }

    /// The message, when this resource kept it (shared resources do).
    pub(crate) fn res(&self) -> Option<&Res> {
        match &*self.body {
            Body::Message { res, .. } => Some(res),
            Body::Encoded(_) => None,
        }
    }

    /// The resource packed in an `Any`.
    pub(crate) fn any(&self) -> Any {
        self.any_ref().clone()
    }

    fn any_ref(&self) -> &Any {
        match &*self.body {
            Body::Message { res, encoded } => encoded.get_or_init(|| res.to_any()),
            Body::Encoded(any) => any,
        }
    }
}

/// Resources by name: what a subscription selects.
pub(crate) type View = BTreeMap<String, Versioned>;

type ByType = [View; KINDS];

/// Resources shared by every proxy with the same base context.
#[derive(Debug)]
pub(crate) struct Base {
    version: Arc<str>,
    resources: ByType,
    /// Host names a proxyless client may ask for as a Listener: the domains
    /// of the outbound route configuration's virtual hosts.
    api_names: HashSet<String>,
    /// Clusters rewritten for proxyless gRPC (balancers it lacks become
    /// ROUND_ROBIN), by name; only those that differ.
    grpc_clusters: BTreeMap<String, Versioned>,
    /// What scoping a proxy to some services keeps, precomputed so that
    /// scoping costs what the scope holds, not what the mesh holds.
    index: ScopeIndex,
    /// The endpoints of clusters whose TrafficPolicy enables `locality`, as
    /// a proxy in a given locality sees them (priorities by nearness):
    /// made on first use, shared by every proxy of that locality.
    by_locality: Mutex<HashMap<Locality, Arc<View>>>,
    /// The previous base's, whose versions are kept for equal content.
    prev_by_locality: HashMap<Locality, Arc<View>>,
}

/// Base resources by the service (`service.namespace`) they belong to.
#[derive(Debug, Default)]
struct ScopeIndex {
    /// `outbound|<port>||<service>.<namespace>` clusters, by service.
    clusters: HashMap<String, Vec<String>>,
    /// `outbound_tcp|<port>|<service>.<namespace>` listeners, and a capture
    /// proxy's `<vip>_<port>` listeners, by service.
    tcp_listeners: HashMap<String, Vec<String>>,
    /// Listeners every proxy gets (`outbound_http`, ...).
    common_listeners: Vec<String>,
    /// Clusters a listener's `tcp_proxy` sends to, by listener.
    listener_targets: HashMap<String, Vec<String>>,
    /// Indexes into `outbound_http`'s virtual hosts, by service.
    vhosts: HashMap<String, Vec<usize>>,
    /// Clusters each virtual host's routes send to (and mirror to).
    vhost_targets: Vec<Vec<String>>,
    /// Route configurations other than `outbound_http`.
    other_routes: Vec<String>,
    /// `outbound_http` without its virtual hosts, encoded: a scoped copy is
    /// this plus the kept virtual hosts.
    route_shell: Option<Vec<u8>>,
}

/// Everything one proxy can be sent.
#[derive(Debug)]
pub(crate) struct Snapshot {
    /// Base version, plus this proxy's own part when it has one.
    pub(crate) version: Arc<str>,
    base: Arc<Base>,
    /// This proxy's own resources; they take precedence over `base`.
    own: ByType,
    /// What its inbound side was translated from (its Service, Workload,
    /// Mesh settings and policies), to reuse the translation while they stay
    /// the same.
    inbound_inputs: Option<Vec<Resource>>,
    /// The translator's version of the inbound side.
    inbound_version: Option<Arc<str>>,
    /// When scoped: the base resources this proxy may see, per type.
    allowed: Option<[HashSet<String>; KINDS]>,
    /// [`Snapshot::all`], made once per (type, proxyless) and shared by
    /// every stream of this snapshot.
    wildcard: [OnceLock<Arc<View>>; 2 * KINDS],
    /// The names of `wildcard`, likewise.
    all_names: [OnceLock<Arc<BTreeSet<String>>>; 2 * KINDS],
}

/// Field number of `RouteConfiguration.virtual_hosts`.
const VIRTUAL_HOSTS_TAG: u32 = 2;

/// Version of the api_listener resources: their content depends on the name only.
const API_LISTENER_VERSION: &str = "api-1";

/// The context of the shared part: no fronted workload, but the same client
/// namespace (a workload name that cannot exist keeps the namespace while
/// translating no inbound side).
pub(crate) fn base_context(ctx: &ProxyContext) -> ProxyContext {
    ProxyContext {
        workload: ctx
            .workload
            .as_ref()
            .filter(|(ns, _)| ns != api::resources::DEFAULT_NAMESPACE)
            .map(|(ns, _)| (ns.clone(), String::new())),
        ..ctx.clone()
    }
}

fn versioned(
    prev: Option<&ByType>,
    version: &Arc<str>,
    kind: TypeKind,
    name: &str,
    res: Res,
) -> Versioned {
    match prev.and_then(|p| p[kind.index()].get(name)) {
        Some(old) if old.res() == Some(&res) => old.clone(),
        _ => Versioned::new(version.clone(), res),
    }
}

/// A proxy's own resource, kept encoded: the previous version is kept when
/// the encoding is the same (our messages encode deterministically: their
/// map fields have at most one entry; should one not, the cost is a
/// needless push, never a wrong config).
fn own_versioned(
    prev: Option<&ByType>,
    version: &Arc<str>,
    kind: TypeKind,
    name: &str,
    any: Any,
) -> Versioned {
    match prev.and_then(|p| p[kind.index()].get(name)) {
        Some(old) if *old.any_ref() == any => old.clone(),
        _ => Versioned::encoded(version.clone(), any),
    }
}

fn index(xds: api::Xds, prev: Option<&ByType>, version: &Arc<str>) -> ByType {
    let mut out: ByType = Default::default();
    let mut put = |kind: TypeKind, name: String, res: Res| {
        let v = versioned(prev, version, kind, &name, res);
        out[kind.index()].insert(name, v);
    };
    for l in xds.listeners {
        put(
            TypeKind::Listener,
            l.name.clone(),
            Res::Listener(Box::new(l)),
        );
    }
    for r in xds.routes {
        put(TypeKind::Route, r.name.clone(), Res::Route(Box::new(r)));
    }
    for c in xds.clusters {
        put(TypeKind::Cluster, c.name.clone(), Res::Cluster(Box::new(c)));
    }
    for e in xds.endpoints {
        put(
            TypeKind::Endpoints,
            e.cluster_name.clone(),
            Res::Endpoints(Box::new(e)),
        );
    }
    out
}

impl Base {
    /// Translates `mesh` for `ctx` (a [`base_context`]), reusing versions
    /// from `prev`.
    pub(crate) fn build(mesh: &Mesh, ctx: &ProxyContext, prev: Option<&Base>) -> Base {
        let xds = api::translate(mesh, ctx);
        let version: Arc<str> = Arc::from(xds.version.as_str());
        let api_names = xds
            .route_config(names::OUTBOUND_HTTP)
            .map(|rc| {
                rc.virtual_hosts
                    .iter()
                    .flat_map(|vh| vh.domains.iter().cloned())
                    .collect()
            })
            .unwrap_or_default();
        let resources = index(xds, prev.map(|p| &p.resources), &version);
        let mut grpc_clusters = BTreeMap::new();
        for (name, v) in &resources[TypeKind::Cluster.index()] {
            if let Some(Res::Cluster(c)) = v.res() {
                if let Some(rr) = for_grpc(c) {
                    grpc_clusters.insert(
                        name.clone(),
                        Versioned::new(
                            Arc::from(format!("{}-grpc", v.version)),
                            Res::Cluster(Box::new(rr)),
                        ),
                    );
                }
            }
        }
        let index = ScopeIndex::build(&resources);
        let prev_by_locality = prev
            .map(|p| lock(&p.by_locality).clone())
            .unwrap_or_default();
        Base {
            version,
            resources,
            api_names,
            grpc_clusters,
            index,
            by_locality: Mutex::new(HashMap::new()),
            prev_by_locality,
        }
    }

    /// The endpoints a proxy in `at` gets instead of the shared ones (see
    /// `by_locality`); `mesh` is the one this base was built from.
    fn locality_view(&self, mesh: &Mesh, at: &Locality) -> Arc<View> {
        let mut cache = lock(&self.by_locality);
        if let Some(v) = cache.get(at) {
            return v.clone();
        }
        let prev = self.prev_by_locality.get(at);
        let mut view = View::new();
        for la in api::locality_load_assignments(mesh, at) {
            let name = la.cluster_name.clone();
            let res = Res::Endpoints(Box::new(la));
            let item = match prev.and_then(|p| p.get(&name)) {
                Some(old) if old.res() == Some(&res) => old.clone(),
                _ => Versioned::new(
                    Arc::from(format!("{}-{}-{}", self.version, at.region, at.zone)),
                    res,
                ),
            };
            view.insert(name, item);
        }
        let view = Arc::new(view);
        cache.insert(at.clone(), view.clone());
        view
    }
}

/// `m` locked, even if a panic poisoned it (the maps stay consistent: they
/// are only ever inserted into whole).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Snapshot {
    /// `base` plus the own part of the proxy `ctx` describes (its inbound
    /// side, translated from its Service, Workload and policies), limited to
    /// `scope` (`service.namespace` names) when given.
    pub(crate) fn build(
        mesh: &Mesh,
        ctx: &ProxyContext,
        scope: Option<&BTreeSet<String>>,
        base: Arc<Base>,
        prev: Option<&Snapshot>,
    ) -> Snapshot {
        let prev_own = prev.map(|p| &p.own);
        let mut own: ByType = Default::default();
        let inputs = inbound_inputs(mesh, ctx);
        let inbound_version = match prev {
            // Same Service and Workload as last time: same inbound side,
            // no need to translate it again.
            Some(p) if inputs.is_some() && p.inbound_inputs == inputs => {
                // Not its endpoints: those follow the base (below).
                for kind in TypeKind::ALL
                    .into_iter()
                    .filter(|k| *k != TypeKind::Endpoints)
                {
                    for (n, v) in &p.own[kind.index()] {
                        if n != names::OUTBOUND_HTTP {
                            own[kind.index()].insert(n.clone(), v.clone());
                        }
                    }
                }
                p.inbound_version.clone()
            }
            _ => inputs.as_ref().map(|alone| {
                let xds = translate_alone(mesh, ctx, alone);
                let v: Arc<str> = Arc::from(format!("{}-{}", base.version, xds.version));
                // Keep only the inbound side: the rest is in `base`.
                let mut put = |kind: TypeKind, name: &str, any: Any| {
                    let item = own_versioned(prev_own, &v, kind, name, any);
                    own[kind.index()].insert(name.to_string(), item);
                };
                for l in xds.listeners.iter().filter(|l| l.name == names::INBOUND) {
                    put(TypeKind::Listener, &l.name, pack(l));
                }
                for r in xds.routes.iter().filter(|r| r.name == names::INBOUND) {
                    put(TypeKind::Route, &r.name, pack(r));
                }
                for c in &xds.clusters {
                    if c.name.starts_with("inbound|") {
                        put(TypeKind::Cluster, &c.name, pack(c));
                    }
                }
                Arc::from(xds.version.as_str())
            }),
        };
        let version = match &inbound_version {
            Some(iv) => format!("{}-{iv}", base.version),
            None => base.version.to_string(),
        };
        let version: Arc<str> = Arc::from(version.as_str());
        let allowed = scope.map(|s| {
            let (allowed, route) = scoped(&base, s);
            if let Some(route) = route {
                let v = own_versioned(
                    prev_own,
                    &version,
                    TypeKind::Route,
                    names::OUTBOUND_HTTP,
                    route,
                );
                own[TypeKind::Route.index()].insert(names::OUTBOUND_HTTP.to_string(), v);
            }
            allowed
        });
        // Where the proxy runs decides the priorities of the endpoints of
        // clusters with locality-aware balancing.
        if let Some(at) = api::proxy_locality(mesh, ctx) {
            for (n, v) in base.locality_view(mesh, &at).iter() {
                let visible = allowed
                    .as_ref()
                    .is_none_or(|a| a[TypeKind::Endpoints.index()].contains(n));
                if visible {
                    own[TypeKind::Endpoints.index()].insert(n.clone(), v.clone());
                }
            }
        }
        Snapshot {
            version,
            base,
            own,
            inbound_inputs: inputs,
            inbound_version,
            allowed,
            wildcard: Default::default(),
            all_names: Default::default(),
        }
    }

    fn base_allows(&self, kind: TypeKind, name: &str) -> bool {
        self.allowed
            .as_ref()
            .is_none_or(|a| a[kind.index()].contains(name))
    }

    /// Every resource of `kind` a wildcard subscription gets (shared).
    pub(crate) fn all(&self, kind: TypeKind, proxyless: bool) -> Arc<View> {
        let slot = &self.wildcard[kind.index() * 2 + usize::from(proxyless)];
        slot.get_or_init(|| Arc::new(self.build_all(kind, proxyless)))
            .clone()
    }

    /// `names` as a shared set: the snapshot's own when it is every name of
    /// `kind`, so a thousand proxies asking for everything by name hold one
    /// set.
    pub(crate) fn intern(
        &self,
        kind: TypeKind,
        names: BTreeSet<String>,
        proxyless: bool,
    ) -> Arc<BTreeSet<String>> {
        let slot = &self.all_names[kind.index() * 2 + usize::from(proxyless)];
        let every =
            slot.get_or_init(|| Arc::new(self.all(kind, proxyless).keys().cloned().collect()));
        if **every == names {
            every.clone()
        } else {
            Arc::new(names)
        }
    }

    fn build_all(&self, kind: TypeKind, proxyless: bool) -> View {
        let base = &self.base.resources[kind.index()];
        let mut out: View = match &self.allowed {
            // Scoped: what the scope allows, looked up one by one, so the
            // cost follows the scope, not the mesh.
            Some(allowed) => allowed[kind.index()]
                .iter()
                .filter_map(|n| base.get_key_value(n))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect(),
            None => base.clone(),
        };
        if proxyless && kind == TypeKind::Cluster {
            for (n, v) in out.iter_mut() {
                if let Some(g) = self.base.grpc_clusters.get(n) {
                    *v = g.clone();
                }
            }
        }
        for (n, v) in &self.own[kind.index()] {
            out.insert(n.clone(), v.clone());
        }
        out
    }

    /// What a subscription selects: everything when `wildcard`, plus every
    /// existing resource in `names`. Shared with [`Snapshot::all`] when the
    /// names are exactly everything (Envoy asks for every cluster's
    /// endpoints by name).
    pub(crate) fn view(
        &self,
        kind: TypeKind,
        wildcard: bool,
        names: &BTreeSet<String>,
        proxyless: bool,
    ) -> Arc<View> {
        let all = self.all(kind, proxyless);
        if (wildcard && names.iter().all(|n| all.contains_key(n)))
            || (names.len() == all.len() && names.iter().eq(all.keys()))
        {
            return all;
        }
        let mut out = if wildcard {
            (*all).clone()
        } else {
            View::new()
        };
        for n in names {
            if let Some(v) = self.get(kind, n, proxyless) {
                out.insert(n.clone(), v);
            }
        }
        Arc::new(out)
    }

    /// The resource `name` of `kind`, if it exists. For a proxyless client,
    /// a Listener (or RouteConfiguration) named like a service host name is
    /// an `api_listener` (or that host's virtual host alone).
    pub(crate) fn get(&self, kind: TypeKind, name: &str, proxyless: bool) -> Option<Versioned> {
        if let Some(v) = self.own[kind.index()].get(name) {
            return Some(v.clone());
        }
        if self.base_allows(kind, name) {
            if proxyless && kind == TypeKind::Cluster {
                if let Some(v) = self.base.grpc_clusters.get(name) {
                    return Some(v.clone());
                }
            }
            if let Some(v) = self.base.resources[kind.index()].get(name) {
                return Some(v.clone());
            }
        }
        if !self.base.api_names.contains(name) {
            return None;
        }
        match kind {
            TypeKind::Listener => Some(Versioned::new(
                Arc::from(API_LISTENER_VERSION),
                Res::Listener(Box::new(api::grpc_api_listener(name, name))),
            )),
            TypeKind::Route if proxyless => {
                let outbound =
                    self.base.resources[TypeKind::Route.index()].get(names::OUTBOUND_HTTP)?;
                let Some(Res::Route(rc)) = outbound.res() else {
                    return None;
                };
                let rc = RouteConfiguration {
                    name: name.to_string(),
                    virtual_hosts: rc
                        .virtual_hosts
                        .iter()
                        .filter(|vh| vh.domains.iter().any(|d| d == name))
                        .map(for_proxyless)
                        .collect(),
                    ..(**rc).clone()
                };
                // Derived from outbound_http and the name alone.
                Some(Versioned::new(
                    Arc::from(format!("{}-{name}", outbound.version)),
                    Res::Route(Box::new(rc)),
                ))
            }
            _ => None,
        }
    }

    /// Whether `name` is a Listener only a proxyless client asks for.
    pub(crate) fn is_api_listener_name(&self, name: &str) -> bool {
        self.base.api_names.contains(name)
            && !self.base.resources[TypeKind::Listener.index()].contains_key(name)
    }
}

/// What the inbound side of the proxy `ctx` describes is translated from:
/// its Service and Workload, the Mesh settings and the AuthorizationPolicies
/// that apply to it ([`Mesh::inbound_resources`]). `None` when it fronts no
/// (known) workload.
fn inbound_inputs(mesh: &Mesh, ctx: &ProxyContext) -> Option<Vec<Resource>> {
    let (ns, name) = ctx.workload.as_ref()?;
    let alone: Vec<Resource> = mesh
        .inbound_resources(ns, name)
        .into_iter()
        .map(|r| r.value)
        .collect();
    (!alone.is_empty()).then_some(alone)
}

/// The inbound side: `alone` (from [`inbound_inputs`]) translated for `ctx`.
fn translate_alone(mesh: &Mesh, ctx: &ProxyContext, alone: &[Resource]) -> api::Xds {
    let sourced = alone
        .iter()
        .map(|r| api::Sourced::new("inbound", 1, r.clone()))
        .collect();
    match api::validate(sourced) {
        Ok(m) => api::translate(&m, ctx),
        // Both validated as part of the whole mesh; alone they cannot fail.
        // Should they, translate the whole mesh rather than lose the inbound.
        Err(_) => api::translate(mesh, ctx),
    }
}

impl ScopeIndex {
    fn build(resources: &ByType) -> ScopeIndex {
        let mut ix = ScopeIndex::default();
        for name in resources[TypeKind::Cluster.index()].keys() {
            // `outbound|<port>||<service>.<namespace>`
            if let Some((_, svc)) = name
                .strip_prefix("outbound|")
                .and_then(|r| r.split_once("||"))
            {
                ix.clusters
                    .entry(svc.to_string())
                    .or_default()
                    .push(name.clone());
            }
        }
        for (name, v) in &resources[TypeKind::Listener.index()] {
            let tcp = name
                .strip_prefix("outbound_tcp|")
                .and_then(|rest| rest.split_once('|'))
                .map(|(_, svc)| svc.to_string());
            // A capture proxy's `<vip>_<port>` listeners belong to the
            // Service their metadata names.
            let vip = || match v.res() {
                Some(Res::Listener(l)) => vip_service(l),
                _ => None,
            };
            match tcp.or_else(vip) {
                Some(svc) => ix.tcp_listeners.entry(svc).or_default().push(name.clone()),
                None => ix.common_listeners.push(name.clone()),
            }
            if let Some(Res::Listener(l)) = v.res() {
                let mut targets = HashSet::new();
                tcp_targets(l, &mut targets);
                if !targets.is_empty() {
                    ix.listener_targets
                        .insert(name.clone(), targets.into_iter().collect());
                }
            }
        }
        for (name, v) in &resources[TypeKind::Route.index()] {
            if name != names::OUTBOUND_HTTP {
                ix.other_routes.push(name.clone());
                continue;
            }
            let Some(Res::Route(rc)) = v.res() else {
                continue;
            };
            for (i, vh) in rc.virtual_hosts.iter().enumerate() {
                // `<service>.<namespace>:<port>`
                if let Some((svc, _)) = vh.name.rsplit_once(':') {
                    ix.vhosts.entry(svc.to_string()).or_default().push(i);
                }
                let mut targets = Vec::new();
                for r in &vh.routes {
                    if let Some(route::Action::Route(a)) = &r.action {
                        match &a.cluster_specifier {
                            Some(route_action::ClusterSpecifier::Cluster(c)) => {
                                targets.push(c.clone());
                            }
                            Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
                                targets.extend(w.clusters.iter().map(|c| c.name.clone()));
                            }
                            _ => {}
                        }
                        targets.extend(a.request_mirror_policies.iter().map(|m| m.cluster.clone()));
                    }
                }
                ix.vhost_targets.push(targets);
            }
            let shell = RouteConfiguration {
                virtual_hosts: Vec::new(),
                ..(**rc).clone()
            };
            ix.route_shell = Some(shell.encode_to_vec());
        }
        ix
    }
}

/// What a proxy that calls the services in `scope` may see: the outbound
/// listeners of those services, the clusters (and endpoints) of those
/// services and of every backend their routes send to, and `outbound_http`
/// cut to their virtual hosts (returned separately, encoded: it replaces
/// the base's).
fn scoped(base: &Base, scope: &BTreeSet<String>) -> ([HashSet<String>; KINDS], Option<Any>) {
    let ix = &base.index;
    let mut allowed: [HashSet<String>; KINDS] = Default::default();
    let mut clusters: HashSet<String> = HashSet::new();
    let mut listeners: HashSet<String> = ix.common_listeners.iter().cloned().collect();
    let mut vhosts: Vec<usize> = Vec::new();
    for svc in scope {
        if let Some(c) = ix.clusters.get(svc) {
            clusters.extend(c.iter().cloned());
        }
        if let Some(l) = ix.tcp_listeners.get(svc) {
            listeners.extend(l.iter().cloned());
        }
        if let Some(v) = ix.vhosts.get(svc) {
            vhosts.extend(v.iter().copied());
        }
    }
    for l in &listeners {
        if let Some(t) = ix.listener_targets.get(l) {
            clusters.extend(t.iter().cloned());
        }
    }
    let mut route = None;
    if let (Some(shell), Some(Some(Res::Route(rc)))) = (
        &ix.route_shell,
        base.resources[TypeKind::Route.index()]
            .get(names::OUTBOUND_HTTP)
            .map(Versioned::res),
    ) {
        // The base's order, whatever the order of the scope.
        vhosts.sort_unstable();
        vhosts.dedup();
        // The cut is encoded straight from the base's virtual hosts: the
        // shell (every field but the virtual hosts), then each kept virtual
        // host as one more occurrence of the repeated field, which is how
        // protobuf encodes a repeated message field anyway. No virtual host
        // is copied.
        let mut value = shell.clone();
        for &i in &vhosts {
            if let (Some(vh), Some(targets)) = (rc.virtual_hosts.get(i), ix.vhost_targets.get(i)) {
                clusters.extend(targets.iter().cloned());
                prost::encoding::message::encode(VIRTUAL_HOSTS_TAG, vh, &mut value);
            }
        }
        route = Some(Any {
            type_url: RouteConfiguration::type_url(),
            value,
        });
    }
    allowed[TypeKind::Listener.index()] = listeners;
    allowed[TypeKind::Route.index()] = ix.other_routes.iter().cloned().collect();
    allowed[TypeKind::Endpoints.index()] = clusters.clone();
    allowed[TypeKind::Cluster.index()] = clusters;
    (allowed, route)
}

/// The Service (`name.namespace`) of a capture VIP listener: its
/// `metadata.filter_metadata.meshwork.service` (see `api::translate::capture`).
fn vip_service(l: &Listener) -> Option<String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let meta = l.metadata.as_ref()?.filter_metadata.get("meshwork")?;
    match meta.fields.get("service")?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// Clusters a `tcp_proxy` listener sends to.
fn tcp_targets(l: &Listener, out: &mut HashSet<String>) {
    for chain in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
        for f in &chain.filters {
            let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                continue;
            };
            if any.type_url != TcpProxy::type_url() {
                continue;
            }
            // Our own encoding; a failure only means no targets to add.
            let Ok(t) = TcpProxy::decode(any.value.as_slice()) else {
                continue;
            };
            match t.cluster_specifier {
                Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => {
                    out.insert(c);
                }
                Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
                    out.extend(w.clusters.into_iter().map(|c| c.name));
                }
                None => {}
            }
        }
    }
}

/// A virtual host as proxyless gRPC can take it. gRPC NACKs per-route
/// configs of HTTP filters it does not implement (the local rate limit) and
/// retry policies of zero retries (which carry a per-try timeout alone);
/// its api_listener runs the router only, so neither would apply anyway.
fn for_proxyless(vh: &VirtualHost) -> VirtualHost {
    let mut vh = vh.clone();
    vh.typed_per_filter_config.clear();
    for r in &mut vh.routes {
        r.typed_per_filter_config.clear();
        if let Some(route::Action::Route(a)) = &mut r.action {
            let no_retries = a
                .retry_policy
                .as_ref()
                .is_some_and(|p| p.num_retries.as_ref().is_some_and(|n| n.value == 0));
            if no_retries {
                a.retry_policy = None;
            }
        }
    }
    vh
}

/// `c` as proxyless gRPC can use it, when that differs: gRPC balances with
/// ROUND_ROBIN, RING_HASH (and, depending on the release, LEAST_REQUEST,
/// which not every grpcio build accepts), so anything but those two becomes
/// ROUND_ROBIN.
fn for_grpc(c: &Cluster) -> Option<Cluster> {
    let keep = [LbPolicy::RoundRobin as i32, LbPolicy::RingHash as i32];
    if keep.contains(&c.lb_policy) {
        return None;
    }
    let mut c = c.clone();
    c.lb_policy = LbPolicy::RoundRobin as i32;
    c.lb_config = None;
    Some(c)
}

/// The `ROOTCA` secret: a validation context trusting `bundle_pem`.
pub(crate) fn rootca_secret(version: &str, bundle_pem: &str) -> Versioned {
    use envoy_types::pb::envoy::config::core::v3::{data_source, DataSource};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        secret, CertificateValidationContext,
    };
    let secret = Secret {
        name: crate::ca::ROOTCA.to_string(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: Some(DataSource {
                    specifier: Some(data_source::Specifier::InlineString(bundle_pem.to_string())),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )),
    };
    Versioned::new(Arc::from(version), Res::Secret(Box::new(secret)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const MESH: &str = r#"
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {name: web}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {name: web-v2}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {name: db}
spec: {ports: [{name: tcp, port: 5432, appProtocol: tcp}]}
---
apiVersion: meshwork.dev/v1alpha1
kind: Workload
metadata: {name: web-0}
spec: {service: web, address: 10.0.0.1}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split}
spec:
  parentRefs: [{kind: Service, group: "", name: web, port: 80}]
  rules:
  - backendRefs: [{name: web, port: 80, weight: 90}, {name: web-v2, port: 80, weight: 10}]
"#;

    fn mesh(yaml: &str) -> Mesh {
        api::validate(api::load_str("m.yaml", yaml).unwrap()).unwrap()
    }

    fn names(m: &BTreeMap<String, Versioned>) -> Vec<&str> {
        m.keys().map(String::as_str).collect()
    }

    #[test]
    fn scope_keeps_called_services_their_route_backends_and_the_inbound_side() {
        let m = mesh(MESH);
        let ctx = ProxyContext {
            workload: Some(("default".into(), "web-0".into())),
            ..Default::default()
        };
        let base = Arc::new(Base::build(&m, &base_context(&ctx), None));
        let scope: BTreeSet<String> = ["web.default".to_string()].into();
        let s = Snapshot::build(&m, &ctx, Some(&scope), base.clone(), None);
        assert_eq!(
            names(&s.all(TypeKind::Cluster, false)),
            vec![
                "inbound|80",
                "outbound|80||web-v2.default",
                "outbound|80||web.default"
            ],
            "web-v2 is a backend of web's route; db is not called"
        );
        assert_eq!(
            names(&s.all(TypeKind::Listener, false)),
            vec!["inbound", "outbound_http"],
            "no listener for db"
        );
        let any = s
            .get(TypeKind::Route, "outbound_http", false)
            .unwrap()
            .any();
        let rc = RouteConfiguration::decode(any.value.as_slice()).unwrap();
        let vhosts: Vec<&str> = rc.virtual_hosts.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(vhosts, vec!["web.default:80"]);

        // Unscoped: everything, from the same shared base.
        let all = Snapshot::build(&m, &ctx, None, base, None);
        assert_eq!(all.all(TypeKind::Cluster, false).len(), 4);
        assert!(all
            .all(TypeKind::Listener, false)
            .contains_key("outbound_tcp|5432|db.default"));
    }

    #[test]
    fn scope_keeps_only_the_called_services_vip_listeners_under_capture() {
        let m = mesh(MESH);
        let ctx = ProxyContext {
            workload: Some(("default".into(), "web-0".into())),
            capture: true,
            ..Default::default()
        };
        let base = Arc::new(Base::build(&m, &base_context(&ctx), None));
        let services = |s: &Snapshot| -> Vec<String> {
            let mut v: Vec<String> = s
                .all(TypeKind::Listener, false)
                .values()
                .filter_map(|l| match l.res() {
                    Some(Res::Listener(l)) => vip_service(l),
                    _ => None,
                })
                .collect();
            v.sort();
            v
        };
        let all = Snapshot::build(&m, &ctx, None, base.clone(), None);
        assert_eq!(
            services(&all),
            ["db.default", "web-v2.default", "web.default"],
            "unscoped: a VIP listener per service port"
        );
        let scope: BTreeSet<String> = ["db.default".to_string()].into();
        let s = Snapshot::build(&m, &ctx, Some(&scope), base, None);
        assert_eq!(services(&s), ["db.default"]);
        let clusters = s.all(TypeKind::Cluster, false);
        assert!(
            clusters.contains_key("outbound|5432||db.default")
                && clusters.contains_key(api::capture::PASSTHROUGH_CLUSTER),
            "{:?}",
            names(&clusters)
        );
        assert!(!clusters.contains_key("outbound|80||web.default"));
    }

    #[test]
    fn the_inbound_side_is_translated_again_only_when_its_inputs_change() {
        let ctx = ProxyContext {
            workload: Some(("default".into(), "web-0".into())),
            ..Default::default()
        };
        let build = |m: &Mesh, prev: Option<&Snapshot>| {
            let base = Arc::new(Base::build(m, &base_context(&ctx), None));
            Snapshot::build(m, &ctx, None, base, prev)
        };
        let inbound = |s: &Snapshot| s.get(TypeKind::Listener, "inbound", false).unwrap();
        let m1 = mesh(MESH);
        let s1 = build(&m1, None);
        // Another service's change: the inbound side is reused as is.
        let m2 = mesh(&MESH.replace("port: 5432", "port: 5433"));
        let s2 = build(&m2, Some(&s1));
        assert!(Arc::ptr_eq(&inbound(&s1).body, &inbound(&s2).body));
        assert_eq!(s1.inbound_version, s2.inbound_version);
        // Its own workload's change: translated again, new version.
        let m3 = mesh(&MESH.replace("address: 10.0.0.1", "address: 10.0.0.2"));
        let s3 = build(&m3, Some(&s2));
        assert_ne!(s2.inbound_version, s3.inbound_version);
        assert_ne!(s2.version, s3.version);
    }

    #[test]
    fn authorization_policies_reach_the_inbound_side() {
        let ctx = ProxyContext {
            workload: Some(("default".into(), "web-0".into())),
            ..Default::default()
        };
        let policy = r#"
---
apiVersion: meshwork.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin}
spec:
  targetRef: {kind: Service, name: web}
  action: DENY
  rules: [{to: [{paths: ["/admin*"]}]}]
"#;
        let inbound_bytes = |yaml: &str, prev: Option<&Snapshot>| {
            let m = mesh(yaml);
            let base = Arc::new(Base::build(&m, &base_context(&ctx), None));
            let s = Snapshot::build(&m, &ctx, None, base, prev);
            let any = s.get(TypeKind::Listener, "inbound", false).unwrap().any();
            (s, any.value)
        };
        let has_rbac = |b: &[u8]| {
            b.windows(b"envoy.filters.http.rbac".len())
                .any(|w| w == b"envoy.filters.http.rbac")
        };
        let (s1, plain) = inbound_bytes(MESH, None);
        assert!(!has_rbac(&plain));
        // Applying a policy to the proxy's service changes its inbound side
        // (it is one of the inputs, so the cached translation is not reused).
        let (_, with) = inbound_bytes(&format!("{MESH}{policy}"), Some(&s1));
        assert!(
            has_rbac(&with),
            "the DENY policy is on the inbound listener"
        );
    }

    #[test]
    fn service_rate_limits_reach_the_inbound_side() {
        let ctx = ProxyContext {
            workload: Some(("default".into(), "web-0".into())),
            ..Default::default()
        };
        let policy = "---\napiVersion: meshwork.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: limit}\nspec:\n  targetRef: {kind: Service, name: web, sectionName: http}\n  rateLimit: {requests: 5}\n";
        let inbound_bytes = |yaml: &str, prev: Option<&Snapshot>| {
            let m = mesh(yaml);
            let base = Arc::new(Base::build(&m, &base_context(&ctx), None));
            let s = Snapshot::build(&m, &ctx, None, base, prev);
            let l = s.get(TypeKind::Listener, "inbound", false).unwrap().any();
            let r = s.get(TypeKind::Route, "inbound", false).unwrap().any();
            (s, l.value, r.value)
        };
        let has = |b: &[u8], what: &[u8]| b.windows(what.len()).any(|w| w == what);
        let (s1, l, _) = inbound_bytes(MESH, None);
        assert!(!has(&l, b"local_ratelimit"));
        let (_, l, r) = inbound_bytes(&format!("{MESH}{policy}"), Some(&s1));
        assert!(has(&l, b"envoy.filters.http.local_ratelimit"));
        assert!(
            has(&r, b"inbound_rate_limit_80"),
            "the port's bucket is on its route"
        );
    }

    #[test]
    fn endpoints_get_priorities_for_the_proxy_locality() {
        let mesh_with = |policy: &str| {
            mesh(&format!(
                "{MESH}---\napiVersion: meshwork.dev/v1alpha1\nkind: Workload\nmetadata: {{name: web-1}}\nspec: {{service: web, address: 10.0.0.2, locality: {{region: eu, zone: eu-1}}}}\n---\napiVersion: meshwork.dev/v1alpha1\nkind: Workload\nmetadata: {{name: web-2}}\nspec: {{service: web, address: 10.0.0.3, locality: {{region: us, zone: us-1}}}}\n{policy}"
            ))
        };
        let policy = "---\napiVersion: meshwork.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: near}\nspec:\n  targetRef: {kind: Service, name: web}\n  locality: {}\n";
        let cluster = "outbound|80||web.default";
        let prios = |m: &Mesh, workload: &str, prev: Option<&Snapshot>| {
            let ctx = ProxyContext {
                workload: Some(("default".into(), workload.into())),
                ..Default::default()
            };
            let base = Arc::new(Base::build(m, &base_context(&ctx), prev.map(|p| &*p.base)));
            let s = Snapshot::build(m, &ctx, None, base, prev);
            let v = s.get(TypeKind::Endpoints, cluster, false).unwrap();
            let Some(Res::Endpoints(la)) = v.res() else {
                panic!()
            };
            let p: Vec<(String, u32)> = la
                .endpoints
                .iter()
                .map(|e| (e.locality.as_ref().unwrap().region.clone(), e.priority))
                .collect();
            let via_all = s.all(TypeKind::Endpoints, false)[cluster].version.clone();
            assert_eq!(via_all, v.version, "get and the wildcard view agree");
            (s, p, v.version.clone())
        };
        let own = |r: &str, p: u32| (r.to_string(), p);
        let m = mesh_with(policy);
        let (s1, p, v1) = prios(&m, "web-1", None);
        assert_eq!(p, [own("", 1), own("eu", 0), own("us", 1)]);
        let (_, p, _) = prios(&m, "web-2", None);
        assert_eq!(p, [own("", 1), own("eu", 1), own("us", 0)]);
        // No locality: the shared endpoints, all priority 0.
        let (_, p, _) = prios(&m, "web-0", None);
        assert!(p.iter().all(|(_, p)| *p == 0));
        // Rebuilt with the same content: same version. Policy gone: back to
        // the shared endpoints, even though the inbound side is reused.
        let (s2, _, v2) = prios(&mesh_with(policy), "web-1", Some(&s1));
        assert_eq!(v1, v2);
        let (_, p, _) = prios(&mesh_with(""), "web-1", Some(&s2));
        assert!(p.iter().all(|(_, p)| *p == 0));
    }

    #[test]
    fn identical_subscriptions_share_one_view() {
        let m = mesh(MESH);
        let ctx = ProxyContext::default();
        let s = Snapshot::build(&m, &ctx, None, Arc::new(Base::build(&m, &ctx, None)), None);
        let all = s.all(TypeKind::Endpoints, false);
        let every: BTreeSet<String> = all.keys().cloned().collect();
        let by_name = s.view(TypeKind::Endpoints, false, &every, false);
        assert!(Arc::ptr_eq(&all, &by_name), "asking for every name by name");
        let wildcard = s.view(TypeKind::Endpoints, true, &BTreeSet::new(), false);
        assert!(Arc::ptr_eq(&all, &wildcard));
        let one: BTreeSet<String> = ["outbound|80||web.default".to_string()].into();
        assert_eq!(s.view(TypeKind::Endpoints, false, &one, false).len(), 1);
    }

    #[test]
    fn versions_change_only_with_content() {
        let m1 = mesh(MESH);
        let ctx = ProxyContext::default();
        let b1 = Base::build(&m1, &ctx, None);
        let m2 = mesh(&MESH.replace("10.0.0.1", "10.0.0.9"));
        let b2 = Base::build(&m2, &ctx, Some(&b1));
        assert_ne!(b1.version, b2.version);
        let v = |b: &Base, k: TypeKind, n: &str| b.resources[k.index()][n].version.clone();
        let web = "outbound|80||web.default";
        assert_ne!(
            v(&b1, TypeKind::Endpoints, web),
            v(&b2, TypeKind::Endpoints, web)
        );
        assert_eq!(
            v(&b1, TypeKind::Cluster, web),
            v(&b2, TypeKind::Cluster, web)
        );
        assert_eq!(
            v(&b1, TypeKind::Route, "outbound_http"),
            v(&b2, TypeKind::Route, "outbound_http")
        );
    }

    #[test]
    fn proxyless_names_get_an_api_listener_and_their_virtual_host_alone() {
        let m = mesh(MESH);
        let ctx = ProxyContext::default();
        let s = Snapshot::build(&m, &ctx, None, Arc::new(Base::build(&m, &ctx, None)), None);
        assert!(s.is_api_listener_name("web.default:80"));
        assert!(!s.is_api_listener_name("outbound_http"));
        assert!(s.get(TypeKind::Listener, "nope.default", true).is_none());
        let web = s.get(TypeKind::Listener, "web", true).unwrap();
        let Some(Res::Listener(l)) = web.res() else {
            panic!()
        };
        assert!(l.api_listener.is_some());
        let web = s.get(TypeKind::Route, "web", true).unwrap();
        let Some(Res::Route(rc)) = web.res() else {
            panic!()
        };
        assert_eq!(rc.name, "web");
        assert_eq!(rc.virtual_hosts.len(), 1);
        assert!(rc.virtual_hosts[0].domains.iter().any(|d| d == "web"));
        // gRPC gets round robin instead of the peak-EWMA LEAST_REQUEST.
        let c = |proxyless| match s
            .get(TypeKind::Cluster, "outbound|80||web.default", proxyless)
            .unwrap()
            .res()
        {
            Some(Res::Cluster(c)) => c.lb_policy,
            _ => panic!(),
        };
        assert_eq!(c(false), LbPolicy::LeastRequest as i32);
        assert_eq!(c(true), LbPolicy::RoundRobin as i32);
    }

    #[test]
    fn proxyless_routes_lose_what_grpc_would_refuse() {
        let m = mesh(&format!(
            "{MESH}---\napiVersion: meshwork.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{group: gateway.networking.k8s.io, kind: HTTPRoute, name: split}}\n  rateLimit: {{requests: 5}}\n  timeouts: {{perTry: 1s}}\n"
        ));
        let ctx = ProxyContext::default();
        let s = Snapshot::build(&m, &ctx, None, Arc::new(Base::build(&m, &ctx, None)), None);
        let route = |proxyless| {
            let name = if proxyless {
                "web"
            } else {
                names::OUTBOUND_HTTP
            };
            let v = s.get(TypeKind::Route, name, proxyless).unwrap();
            let Some(Res::Route(rc)) = v.res() else {
                panic!()
            };
            let vh = rc
                .virtual_hosts
                .iter()
                .find(|v| v.domains.iter().any(|d| d == "web"))
                .unwrap()
                .clone();
            vh.routes[0].clone()
        };
        let retry = |r: &envoy_types::pb::envoy::config::route::v3::Route| match &r.action {
            Some(route::Action::Route(a)) => a.retry_policy.clone(),
            _ => panic!(),
        };
        // Sidecars: the rate limit and the per-try timeout (no retries).
        let r = route(false);
        assert!(!r.typed_per_filter_config.is_empty());
        assert!(retry(&r).is_some());
        // Proxyless gRPC: neither.
        let r = route(true);
        assert!(r.typed_per_filter_config.is_empty());
        assert!(retry(&r).is_none());
    }
}

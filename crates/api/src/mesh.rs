//! The validated, indexed set of resources.
//!
//! Contract: a [`Mesh`] is only built by [`crate::validate`], so everything
//! in it has passed every check: references resolve, limits hold, regexes
//! compile. Lookups are by `(namespace, name)` and iteration is in that order,
//! which keeps translation deterministic.
//!
//! The reference-resolution helpers here are shared by validation (which
//! turns their `Err` into user errors) and translation (which, on a validated
//! mesh, never sees an `Err` and skips the item if it somehow did).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::effective::{Candidate, EffectivePolicy};
use crate::resources::{
    AppProtocol, AuthorizationPolicy, BackendView, DefaultAction, GrpcRoute, HttpRoute, MeshConfig,
    Metadata, MtlsMode, ParentRef, Resource, Service, ServicePort, TcpRoute, TrafficPolicy,
    Workload, DEFAULT_TRUST_DOMAIN,
};
use crate::source::Sourced;

/// `(namespace, name)`.
pub type Key = (String, String);

/// What a TrafficPolicy applies to, as validation resolved its `targetRef`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyTarget {
    /// Service `(namespace, name)`; with `port`, only that port (by name).
    Service { service: Key, port: Option<String> },
    /// HTTPRoute `(namespace, name)`; with `rule`, only that rule (by name).
    HttpRoute { route: Key, rule: Option<String> },
}

impl std::fmt::Display for PolicyTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyTarget::Service { service, port } => {
                write!(f, "Service {}/{}", service.0, service.1)?;
                if let Some(p) = port {
                    write!(f, " port {p}")?;
                }
                Ok(())
            }
            PolicyTarget::HttpRoute { route, rule } => {
                write!(f, "HTTPRoute {}/{}", route.0, route.1)?;
                if let Some(r) = rule {
                    write!(f, " rule {r}")?;
                }
                Ok(())
            }
        }
    }
}

/// The validated resources of a mesh. Resources are shared (`Arc`), so a
/// clone (the control plane adds registered workloads to a copy on every
/// registration) costs the maps, not the resources.
#[derive(Debug, Clone, Default)]
pub struct Mesh {
    /// The `Mesh` resource (mesh-wide settings), if one was given.
    pub(crate) config: Option<Arc<Sourced<MeshConfig>>>,
    pub(crate) services: BTreeMap<Key, Arc<Sourced<Service>>>,
    pub(crate) workloads: BTreeMap<Key, Arc<Sourced<Workload>>>,
    pub(crate) http_routes: BTreeMap<Key, Arc<Sourced<HttpRoute>>>,
    pub(crate) grpc_routes: BTreeMap<Key, Arc<Sourced<GrpcRoute>>>,
    pub(crate) tcp_routes: BTreeMap<Key, Arc<Sourced<TcpRoute>>>,
    pub(crate) traffic_policies: BTreeMap<Key, Arc<Sourced<TrafficPolicy>>>,
    pub(crate) authz_policies: BTreeMap<Key, Arc<Sourced<AuthorizationPolicy>>>,
    /// What a TrafficPolicy targets -> the key of that policy (one policy
    /// per exact target: validation refuses a second).
    pub(crate) policy_index: BTreeMap<PolicyTarget, Key>,
    /// Service key -> keys of its Workloads, by name: translation asks for
    /// each service's instances, and a scan per service would make it
    /// quadratic (1,000 services x 10,000 workloads).
    pub(crate) workloads_by_service: BTreeMap<Key, Vec<Key>>,
    /// Service key -> VIP ([`crate::vip::allocate`]), computed on first use:
    /// once per Mesh, which is rebuilt on every change.
    pub(crate) vips: std::sync::OnceLock<Arc<BTreeMap<Key, std::net::Ipv4Addr>>>,
}

fn key(ns: &str, name: &str) -> Key {
    (ns.to_string(), name.to_string())
}

impl Mesh {
    /// A mesh with nothing in it.
    pub fn empty() -> Self {
        Mesh::default()
    }

    /// Number of resources.
    pub fn len(&self) -> usize {
        usize::from(self.config.is_some())
            + self.services.len()
            + self.workloads.len()
            + self.http_routes.len()
            + self.grpc_routes.len()
            + self.tcp_routes.len()
            + self.traffic_policies.len()
            + self.authz_policies.len()
    }

    /// True when there is no resource.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Services, by namespace then name.
    pub fn services(&self) -> impl Iterator<Item = &Sourced<Service>> {
        self.services.values().map(|a| &**a)
    }

    /// The Service `namespace/name`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Sourced<Service>> {
        self.services.get(&key(namespace, name)).map(|a| &**a)
    }

    /// The virtual IP of Service `namespace/name` (transparent mode): its
    /// `spec.vip`, else the deterministic allocation of [`crate::vip`].
    /// `None` for an unknown Service (or when all 65,534 VIPs are taken).
    pub fn service_vip(&self, namespace: &str, name: &str) -> Option<std::net::Ipv4Addr> {
        self.vip_table().get(&key(namespace, name)).copied()
    }

    /// Every Service's VIP, by namespace then name.
    pub fn service_vips(&self) -> impl Iterator<Item = (&Key, std::net::Ipv4Addr)> {
        self.vip_table().iter().map(|(k, ip)| (k, *ip))
    }

    fn vip_table(&self) -> &BTreeMap<Key, std::net::Ipv4Addr> {
        self.vips.get_or_init(|| {
            Arc::new(crate::vip::allocate(
                self.services.iter().map(|(k, s)| (k, s.value.spec.vip)),
            ))
        })
    }

    /// Workloads, by namespace then name.
    pub fn workloads(&self) -> impl Iterator<Item = &Sourced<Workload>> {
        self.workloads.values().map(|a| &**a)
    }

    /// The Workload `namespace/name`.
    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Sourced<Workload>> {
        self.workloads.get(&key(namespace, name)).map(|a| &**a)
    }

    /// The Workloads of Service `namespace/service`, by name.
    pub fn workloads_of<'a>(
        &'a self,
        namespace: &'a str,
        service: &'a str,
    ) -> impl Iterator<Item = &'a Sourced<Workload>> + 'a {
        self.workloads_by_service
            .get(&key(namespace, service))
            .into_iter()
            .flatten()
            .filter_map(|k| self.workloads.get(k).map(|a| &**a))
    }

    /// Builds the service -> workloads index (once, when validation is done).
    pub(crate) fn index_workloads(&mut self) {
        let mut by: BTreeMap<Key, Vec<Key>> = BTreeMap::new();
        for (k, w) in &self.workloads {
            by.entry((k.0.clone(), w.value.spec.service.clone()))
                .or_default()
                .push(k.clone());
        }
        self.workloads_by_service = by;
    }

    /// HTTPRoutes, by namespace then name.
    pub fn http_routes(&self) -> impl Iterator<Item = &Sourced<HttpRoute>> {
        self.http_routes.values().map(|a| &**a)
    }

    /// GRPCRoutes, by namespace then name.
    pub fn grpc_routes(&self) -> impl Iterator<Item = &Sourced<GrpcRoute>> {
        self.grpc_routes.values().map(|a| &**a)
    }

    /// TCPRoutes, by namespace then name.
    pub fn tcp_routes(&self) -> impl Iterator<Item = &Sourced<TcpRoute>> {
        self.tcp_routes.values().map(|a| &**a)
    }

    /// TrafficPolicies, by namespace then name.
    pub fn traffic_policies(&self) -> impl Iterator<Item = &Sourced<TrafficPolicy>> {
        self.traffic_policies.values().map(|a| &**a)
    }

    /// The TrafficPolicy that targets Service `namespace/service` as a whole
    /// (no `sectionName`), if any. See [`Mesh::port_policy`] for what applies
    /// to one port.
    pub fn traffic_policy_for(
        &self,
        namespace: &str,
        service: &str,
    ) -> Option<&Sourced<TrafficPolicy>> {
        self.traffic_policy_at(&PolicyTarget::Service {
            service: key(namespace, service),
            port: None,
        })
    }

    /// The TrafficPolicy whose target is exactly `target`, if any.
    pub fn traffic_policy_at(&self, target: &PolicyTarget) -> Option<&Sourced<TrafficPolicy>> {
        let pk = self.policy_index.get(target)?;
        self.traffic_policies.get(pk).map(|a| &**a)
    }

    /// The policies that apply to port `port` (by name) of Service
    /// `namespace/service`, most specific first: the one on the port, then
    /// the one on the Service.
    fn port_candidates(&self, namespace: &str, service: &str, port: &str) -> Vec<Candidate<'_>> {
        let svc = key(namespace, service);
        [Some(port.to_string()), None]
            .into_iter()
            .filter_map(|p| {
                let target = PolicyTarget::Service {
                    service: svc.clone(),
                    port: p,
                };
                let pol = self.traffic_policy_at(&target)?;
                Some(Candidate::policy(&pol.value, target))
            })
            .collect()
    }

    /// The effective policy of port `port` (by name) of Service
    /// `namespace/service`, section by section: the port's policy, else the
    /// Service's.
    pub fn port_policy(&self, namespace: &str, service: &str, port: &str) -> EffectivePolicy {
        EffectivePolicy::merge(self.port_candidates(namespace, service, port))
    }

    /// What callers apply to requests for port `port` (by name) of Service
    /// `namespace/service` when no HTTPRoute rule says more: the port's
    /// effective policy without `rateLimit` (the Service's own sidecars
    /// enforce that).
    pub fn caller_policy(&self, namespace: &str, service: &str, port: &str) -> EffectivePolicy {
        EffectivePolicy::merge(
            self.port_candidates(namespace, service, port)
                .into_iter()
                .map(|mut c| {
                    c.callers_only = true;
                    c
                }),
        )
    }

    /// The effective per-request policy (`timeouts`, `retries`, `fault`,
    /// `rateLimit`) of rule `rule` (index) of HTTPRoute `route` when it
    /// serves port `port` (by name) of Service `parent` `(namespace, name)`.
    /// Most specific first: the rule's own Gateway API `timeouts` (field by
    /// field), a policy on the rule, on the route, on the parent's port, on
    /// the parent. `rateLimit` only comes from policies on the route (a
    /// Service's own rate limit is enforced by its sidecars, not callers).
    pub fn route_policy(
        &self,
        route: &HttpRoute,
        rule: usize,
        parent: &Key,
        port: &str,
    ) -> EffectivePolicy {
        let rk = key(&route.metadata.namespace, &route.metadata.name);
        let mut c = Vec::new();
        let r = route.spec.rules.get(rule);
        if let Some(name) = r.and_then(|r| r.name.as_ref()) {
            let target = PolicyTarget::HttpRoute {
                route: rk.clone(),
                rule: Some(name.clone()),
            };
            if let Some(p) = self.traffic_policy_at(&target) {
                c.push(Candidate::policy(&p.value, target));
            }
        }
        let target = PolicyTarget::HttpRoute {
            route: rk.clone(),
            rule: None,
        };
        if let Some(p) = self.traffic_policy_at(&target) {
            c.push(Candidate::policy(&p.value, target));
        }
        for mut cand in self.port_candidates(&parent.0, &parent.1, port) {
            cand.callers_only = true;
            c.push(cand);
        }
        let mut eff = EffectivePolicy::merge(c);
        if let Some(t) = r.and_then(|r| r.timeouts.as_ref()) {
            eff.overlay_route_timeouts(t, rk, rule);
        }
        eff
    }

    /// The `Mesh` resource, if there is one.
    pub fn mesh_config(&self) -> Option<&Sourced<MeshConfig>> {
        self.config.as_deref()
    }

    /// SPIFFE trust domain of workload identities (`Mesh.spec.trustDomain`,
    /// default `cluster.local`).
    pub fn trust_domain(&self) -> &str {
        self.config
            .as_ref()
            .and_then(|c| c.value.spec.trust_domain.as_deref())
            .unwrap_or(DEFAULT_TRUST_DOMAIN)
    }

    /// `Mesh.spec.mtls.mode` (default permissive).
    pub fn mtls_mode(&self) -> MtlsMode {
        self.config
            .as_ref()
            .and_then(|c| c.value.spec.mtls.as_ref())
            .map(|m| m.mode)
            .unwrap_or_default()
    }

    /// `Mesh.spec.authorization.defaultAction` (default allow): what happens
    /// to requests to a Service that no ALLOW policy applies to.
    pub fn default_action(&self) -> DefaultAction {
        self.config
            .as_ref()
            .and_then(|c| c.value.spec.authorization.as_ref())
            .map(|a| a.default_action)
            .unwrap_or_default()
    }

    /// `Mesh.spec.outboundTrafficPolicy.mode` (default `ALLOW_ANY`): what
    /// captured connections to destinations outside the mesh do.
    pub fn outbound_mode(&self) -> crate::resources::OutboundMode {
        self.config
            .as_ref()
            .and_then(|c| c.value.spec.outbound_traffic_policy.as_ref())
            .map(|p| p.mode)
            .unwrap_or_default()
    }

    /// AuthorizationPolicies, by namespace then name.
    pub fn authorization_policies(&self) -> impl Iterator<Item = &Sourced<AuthorizationPolicy>> {
        self.authz_policies.values().map(|a| &**a)
    }

    /// The AuthorizationPolicies that apply to Service `namespace/service`:
    /// those of its namespace that target it or have no `targetRef`, by name.
    pub fn authorization_policies_for<'a>(
        &'a self,
        namespace: &'a str,
        service: &'a str,
    ) -> impl Iterator<Item = &'a Sourced<AuthorizationPolicy>> + 'a {
        self.authz_policies
            .range((namespace.to_string(), String::new())..)
            .take_while(move |(k, _)| k.0 == namespace)
            .map(|(_, p)| &**p)
            .filter(move |p| {
                p.value
                    .spec
                    .target_ref
                    .as_ref()
                    .is_none_or(|t| t.name == service)
            })
    }

    /// What translating the inbound side of Workload `namespace/name` reads:
    /// the workload, its Service, the `Mesh` settings, the TrafficPolicies
    /// that target the Service (its rate limit is enforced inbound) and the
    /// AuthorizationPolicies that apply to the service. Empty when the
    /// workload or its service is unknown. (The control plane translates a
    /// proxy's inbound side from these alone.)
    pub fn inbound_resources(&self, namespace: &str, name: &str) -> Vec<Sourced<Resource>> {
        let Some(w) = self.workload(namespace, name) else {
            return Vec::new();
        };
        let Some(svc) = self.service(namespace, &w.value.spec.service) else {
            return Vec::new();
        };
        let mut v = vec![
            svc.clone().map(Resource::Service),
            w.clone().map(Resource::Workload),
        ];
        v.extend(self.mesh_config().map(|c| c.clone().map(Resource::Mesh)));
        // The Service's own policies: its rate limit is enforced inbound.
        let sk = key(namespace, &svc.value.metadata.name);
        v.extend(
            self.policy_index
                .iter()
                .filter(
                    |(t, _)| matches!(t, PolicyTarget::Service { service, .. } if *service == sk),
                )
                .filter_map(|(_, pk)| self.traffic_policies.get(pk))
                .map(|p| (**p).clone().map(Resource::TrafficPolicy)),
        );
        v.extend(
            self.authorization_policies_for(namespace, &svc.value.metadata.name)
                .map(|p| p.clone().map(Resource::AuthorizationPolicy)),
        );
        v
    }

    /// Every resource, kind by kind, as stored.
    pub fn resources(&self) -> Vec<Sourced<Resource>> {
        let mut v = Vec::with_capacity(self.len());
        v.extend(self.mesh_config().map(|c| c.clone().map(Resource::Mesh)));
        v.extend(self.services().map(|s| s.clone().map(Resource::Service)));
        v.extend(self.workloads().map(|s| s.clone().map(Resource::Workload)));
        v.extend(
            self.http_routes()
                .map(|s| s.clone().map(Resource::HttpRoute)),
        );
        v.extend(
            self.grpc_routes()
                .map(|s| s.clone().map(Resource::GrpcRoute)),
        );
        v.extend(self.tcp_routes().map(|s| s.clone().map(Resource::TcpRoute)));
        v.extend(
            self.traffic_policies()
                .map(|s| s.clone().map(Resource::TrafficPolicy)),
        );
        v.extend(
            self.authorization_policies()
                .map(|s| s.clone().map(Resource::AuthorizationPolicy)),
        );
        v
    }
}

/// Which service ports a route kind can attach to or send to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PortClass {
    /// http, http2, grpc (HTTPRoute).
    Http,
    /// grpc, http2 (GRPCRoute).
    Grpc,
    /// tcp (TCPRoute parents).
    Tcp,
    /// Any port (TCPRoute backends: bytes are bytes).
    Any,
}

impl PortClass {
    pub(crate) fn accepts(self, p: AppProtocol) -> bool {
        match self {
            PortClass::Http => p.is_http(),
            PortClass::Grpc => p.is_http2(),
            PortClass::Tcp => p == AppProtocol::Tcp,
            PortClass::Any => true,
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            PortClass::Http => "http, http2 or grpc",
            PortClass::Grpc => "grpc or http2",
            PortClass::Tcp => "tcp",
            PortClass::Any => "any",
        }
    }
}

/// Why a reference does not resolve: the offending field and a message.
pub(crate) type RefError = (&'static str, String);

/// Groups that name the core (Service) API group.
pub(crate) fn is_service_group(g: &str) -> bool {
    matches!(g, "" | "core" | "meshwork.dev")
}

pub(crate) fn list_ports(svc: &Service) -> String {
    let v: Vec<String> = svc
        .spec
        .ports
        .iter()
        .map(|p| format!("{} {} ({})", p.name, p.port, p.app_protocol.as_str()))
        .collect();
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

/// The service ports `pr` attaches a route of `class` (in namespace
/// `route_ns`) to. `Err` says why the reference is not usable.
pub(crate) fn parent_ports<'m>(
    mesh: &'m Mesh,
    route_ns: &str,
    route_kind: &str,
    pr: &ParentRef,
    class: PortClass,
) -> Result<(&'m Sourced<Service>, Vec<&'m ServicePort>), RefError> {
    let kind = pr.kind.as_deref().unwrap_or("Gateway");
    if kind != "Service" {
        return Err(("kind", format!(
            "parent kind {kind:?} is not supported: meshwork is a mesh and attaches routes to Services \
             (set `kind: Service` and `group: \"\"`)"
        )));
    }
    if let Some(g) = &pr.group {
        if !is_service_group(g) && g != "gateway.networking.k8s.io" {
            return Err((
                "group",
                format!("parent group {g:?} does not serve Services; use \"\" (the core group)"),
            ));
        }
    }
    let ns = pr.namespace.as_deref().unwrap_or(route_ns);
    let Some(svc) = mesh.service(ns, &pr.name) else {
        return Err(("name", format!("Service {ns}/{} not found", pr.name)));
    };
    let mut ports: Vec<&ServicePort> = svc.value.spec.ports.iter().collect();
    if let Some(section) = &pr.section_name {
        ports.retain(|p| &p.name == section);
        if ports.is_empty() {
            return Err((
                "sectionName",
                format!(
                    "Service {ns}/{} has no port named {section:?} (its ports: {})",
                    pr.name,
                    list_ports(&svc.value)
                ),
            ));
        }
    }
    if let Some(port) = pr.port {
        ports.retain(|p| p.port == port);
        if ports.is_empty() {
            return Err((
                "port",
                format!(
                    "Service {ns}/{} has no port {port}{} (its ports: {})",
                    pr.name,
                    if pr.section_name.is_some() {
                        " with that sectionName"
                    } else {
                        ""
                    },
                    list_ports(&svc.value)
                ),
            ));
        }
    }
    let explicit = pr.port.is_some() || pr.section_name.is_some();
    if explicit {
        if let Some(p) = ports.iter().find(|p| !class.accepts(p.app_protocol)) {
            return Err((
                "port",
                format!(
                    "port {} of Service {ns}/{} is {}; a {route_kind} attaches to {} ports",
                    p.port,
                    pr.name,
                    p.app_protocol.as_str(),
                    class.describe()
                ),
            ));
        }
    } else {
        ports.retain(|p| class.accepts(p.app_protocol));
        if ports.is_empty() {
            return Err((
                "name",
                format!(
                    "Service {ns}/{} has no {} port for a {route_kind} (its ports: {})",
                    pr.name,
                    class.describe(),
                    list_ports(&svc.value)
                ),
            ));
        }
    }
    Ok((svc, ports))
}

/// The service port a backend reference (from a route in `route_ns`) names.
pub(crate) fn backend_port<'m>(
    mesh: &'m Mesh,
    route_ns: &str,
    b: BackendView<'_>,
    route_kind: &str,
    class: PortClass,
) -> Result<(&'m Sourced<Service>, &'m ServicePort), RefError> {
    if b.kind != "Service" || !is_service_group(b.group) {
        return Err(("kind", format!(
            "backend {}{}{} is not supported: backends are Services (`kind: Service`, `group: \"\"`)",
            b.group,
            if b.group.is_empty() { "" } else { "/" },
            b.kind
        )));
    }
    let ns = b.namespace.unwrap_or(route_ns);
    let Some(svc) = mesh.service(ns, b.name) else {
        return Err(("name", format!("Service {ns}/{} not found", b.name)));
    };
    let Some(port) = b.port else {
        return Err((
            "port",
            format!(
                "port is required for a Service backend (ports of {ns}/{}: {})",
                b.name,
                list_ports(&svc.value)
            ),
        ));
    };
    let Some(sp) = svc.value.port(port) else {
        return Err((
            "port",
            format!(
                "Service {ns}/{} has no port {port} (its ports: {})",
                b.name,
                list_ports(&svc.value)
            ),
        ));
    };
    if !class.accepts(sp.app_protocol) {
        return Err((
            "port",
            format!(
                "port {port} of Service {ns}/{} is {}; {route_kind} backends must be {} ports",
                b.name,
                sp.app_protocol.as_str(),
                class.describe()
            ),
        ));
    }
    Ok((svc, sp))
}

/// Gateway API tie-break order between routes: the oldest `creationTimestamp`
/// first (routes without one come after those with one), then
/// `namespace/name` alphabetically.
pub(crate) fn route_age_key(m: &Metadata) -> (bool, (i64, u32), String, String) {
    let ts = m.creation_timestamp.as_deref().and_then(parse_rfc3339);
    (
        ts.is_none(),
        ts.unwrap_or((0, 0)),
        m.namespace.clone(),
        m.name.clone(),
    )
}

/// Parses an RFC 3339 timestamp into (seconds since the epoch, nanoseconds).
pub(crate) fn parse_rfc3339(s: &str) -> Option<(i64, u32)> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos: u32 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let frac = &s[start..i.min(start + 9)];
        let scale = 10u32.pow(9 - frac.len() as u32);
        nanos = frac.parse::<u32>().ok()? * scale;
    }
    let offset = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            let o = oh * 3600 + om * 60;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 + se - offset, nanos))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(
            parse_rfc3339("2024-03-01T12:00:00.5+01:00"),
            Some((1_709_290_800, 500_000_000))
        );
        assert!(
            parse_rfc3339("2024-03-01T12:00:00.5+01:00").unwrap()
                < parse_rfc3339("2024-03-01T11:00:01Z").unwrap()
        );
        for bad in [
            "",
            "2024-13-01T00:00:00Z",
            "2024-01-01 00:00:00",
            "2024-01-01T00:00:00+0100",
            "yesterday",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}

//! Translation of a validated [`Mesh`] into the Envoy xDS v3 resources of one
//! proxy.
//!
//! Contract: `docs/xds.md` (names, fields, precedence order, metadata). The
//! output is deterministic: the same mesh and context give the same resources
//! in the same order and the same [`Xds::version`]. Translation cannot fail:
//! everything that could go wrong was refused by [`crate::validate`].
//!
//! Choices the Gateway API leaves to implementations (documented in
//! `docs/resources.md`): an unset `timeouts.request` means no timeout (route
//! `timeout: 0s`); regex path matches sort after exact and before prefix
//! matches; a rule without backendRefs forwards to the parent service port;
//! consumer routes (in the client's namespace) replace producer routes for
//! that client.
//!
//! Authorization: the inbound listener carries Envoy RBAC filters for the
//! AuthorizationPolicies of its service and the Mesh default action
//! (`authz`, contract in `docs/authorization.md`).
//!
//! Resilience: each service port's clusters and routes take the effective
//! TrafficPolicy ([`crate::EffectivePolicy`]): circuit breakers, outlier
//! detection and health checks on the cluster; timeouts and retries on the
//! routes; faults and HTTPRoute rate limits as per-route configs of the
//! outbound HCM's fault and local rate limit filters; a Service's rate
//! limit on the inbound HCM; with `locality`, per-proxy endpoint priorities
//! ([`locality_load_assignments`]). See `resilience`.
//!
//! mTLS: when the mesh enables it, clusters to sidecars originate mTLS and
//! the inbound listener terminates it (`mtls`, contract in `docs/mtls.md`).
//!
//! Non-goals: scoping the output to the services a proxy calls (the control
//! plane filters), the mTLS secrets themselves (SDS), and `api_listener`s for proxyless gRPC
//! (the control plane adds them on request with [`grpc_api_listener`]).

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{route_action, RouteConfiguration};

use crate::mesh::{Key, Mesh};
use crate::resources::{AppProtocol, Locality, ServicePort};

mod authz;
pub mod capture;
mod clusters;
mod grpc;
mod listeners;
pub mod mtls;
mod resilience;
mod routes;
mod util;

pub(crate) use clusters::socket_address;
pub use grpc::grpc_api_listener;
pub(crate) use listeners::HCM;

/// What the translator needs to know about the proxy it translates for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyContext {
    /// Address of the outbound HTTP listener (`outbound_http`); its IP is
    /// also where the per-service TCP listeners bind.
    pub outbound_addr: SocketAddr,
    /// Address of the inbound listener.
    pub inbound_addr: SocketAddr,
    /// `(namespace, name)` of the Workload this proxy fronts, if any.
    pub workload: Option<(String, String)>,
    /// Protocol detection bound (`listener_filters_timeout`).
    pub detect_timeout: Duration,
    /// Node metadata `meshwork.certs_dir`: the proxy (an Envoy sidecar)
    /// reads its certificate and roots from SDS files in this directory
    /// (`default.yaml`, `ROOTCA.yaml`) instead of over ADS. See `docs/mtls.md`.
    pub certs_dir: Option<String>,
    /// Transparent capture (`meshwork proxy --capture`, node metadata
    /// [`CAPTURE_METADATA`]): the outbound listener dispatches by original
    /// destination to per-Service VIP listeners, and passes through (or
    /// blackholes) the rest. See `capture`. Ignored when `outbound_addr`
    /// has port 0. The outbound and inbound listeners also get the IPv6
    /// twin of an IPv4 loopback or any address (`[::1]`, `[::]`) as an
    /// `additional_addresses` entry, where ip6tables redirects IPv6
    /// (see [`capture::ipv6_twin`]). `false`: explicit mode, output unchanged.
    pub capture: bool,
}

/// Node metadata key (bool) asking for transparent capture output
/// ([`ProxyContext::capture`]).
pub const CAPTURE_METADATA: &str = "meshwork.capture";

impl Default for ProxyContext {
    /// meshwork's standard ports on localhost (outbound 15001, inbound
    /// 15006), no fronted workload, 1 s protocol detection.
    fn default() -> Self {
        let lo = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        ProxyContext {
            outbound_addr: SocketAddr::new(lo, 15001),
            inbound_addr: SocketAddr::new(lo, 15006),
            workload: None,
            detect_timeout: Duration::from_secs(1),
            certs_dir: None,
            capture: false,
        }
    }
}

impl ProxyContext {
    /// The namespace the proxy's client lives in: its workload's, else `default`.
    pub fn client_namespace(&self) -> &str {
        self.workload
            .as_ref()
            .map(|(ns, _)| ns.as_str())
            .unwrap_or(crate::resources::DEFAULT_NAMESPACE)
    }
}

/// The xDS resources for one proxy.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Xds {
    /// Stable content hash: same mesh and context, same version.
    pub version: String,
    pub listeners: Vec<Listener>,
    pub routes: Vec<RouteConfiguration>,
    pub clusters: Vec<Cluster>,
    pub endpoints: Vec<ClusterLoadAssignment>,
}

impl Xds {
    /// The listener named `name`.
    pub fn listener(&self, name: &str) -> Option<&Listener> {
        self.listeners.iter().find(|l| l.name == name)
    }

    /// The RouteConfiguration named `name`.
    pub fn route_config(&self, name: &str) -> Option<&RouteConfiguration> {
        self.routes.iter().find(|r| r.name == name)
    }

    /// The cluster named `name`.
    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.name == name)
    }

    /// The ClusterLoadAssignment of cluster `name`.
    pub fn load_assignment(&self, name: &str) -> Option<&ClusterLoadAssignment> {
        self.endpoints.iter().find(|c| c.cluster_name == name)
    }
}

/// Resource names (see the table in `docs/xds.md`).
pub mod names {
    /// The outbound HTTP listener and its RouteConfiguration.
    pub const OUTBOUND_HTTP: &str = "outbound_http";
    /// The inbound listener and its RouteConfiguration.
    pub const INBOUND: &str = "inbound";

    /// `outbound|<port>||<service>.<namespace>`.
    pub fn cluster(port: u32, service: &str, namespace: &str) -> String {
        format!("outbound|{port}||{service}.{namespace}")
    }

    /// `inbound|<port>`.
    pub fn inbound_cluster(port: u32) -> String {
        format!("inbound|{port}")
    }

    /// `outbound_tcp|<port>|<service>.<namespace>`.
    pub fn tcp_listener(port: u32, service: &str, namespace: &str) -> String {
        format!("outbound_tcp|{port}|{service}.{namespace}")
    }

    /// `<service>.<namespace>:<port>`.
    pub fn vhost(service: &str, namespace: &str, port: u32) -> String {
        format!("{service}.{namespace}:{port}")
    }
}

/// Translates `mesh` for the proxy described by `ctx`.
pub fn translate(mesh: &Mesh, ctx: &ProxyContext) -> Xds {
    let att = routes::Attachments::new(mesh);
    let client_ns = ctx.client_namespace();
    let mut xds = Xds {
        version: version(mesh, ctx),
        ..Default::default()
    };

    let mtls = mtls::Mtls::of(mesh, ctx.certs_dir.as_deref());
    let here = proxy_locality(mesh, ctx);
    for s in mesh.services() {
        let svc = &s.value;
        for sp in &svc.spec.ports {
            let policy = mesh.port_policy(&svc.metadata.namespace, &svc.metadata.name, &sp.name);
            let mut cluster = clusters::service_cluster(svc, sp, &policy);
            if let Some(m) = &mtls {
                cluster.transport_socket_matches = m.cluster_matches(mesh, svc, sp.app_protocol);
            }
            xds.clusters.push(cluster);
            xds.endpoints.push(clusters::load_assignment(
                mesh,
                svc,
                sp,
                mtls.is_some(),
                here.as_ref(),
            ));
        }
    }

    let capture_port = Some(ctx.outbound_addr.port()).filter(|p| ctx.capture && *p != 0);
    let mut outbound = routes::outbound(mesh, &att, ctx);
    if capture_port.is_some() {
        capture::add_vip_domains(mesh, &mut outbound);
    }
    let filters = resilience::outbound_filters(&outbound);
    xds.routes.push(outbound);
    let mut outbound_listener = listeners::detecting(
        names::OUTBOUND_HTTP,
        ctx.outbound_addr,
        ctx.detect_timeout,
        names::OUTBOUND_HTTP,
        filters.clone(),
        Vec::new(),
    );
    if let Some(port) = capture_port {
        capture::capture_listener(mesh, &mut outbound_listener, port);
        capture::add_ipv6_twin(&mut outbound_listener, ctx.outbound_addr);
        xds.clusters.extend(capture::clusters());
    }
    xds.listeners.push(outbound_listener);
    if capture_port.is_some() {
        for s in mesh.services() {
            let svc = &s.value;
            for sp in svc.spec.ports.iter().filter(|p| p.app_protocol.is_http()) {
                let Some(addr) = capture::vip_addr(mesh, svc, sp) else {
                    continue;
                };
                let name = capture::vip_listener_name(addr.ip(), sp.port);
                let l = listeners::detecting(
                    &name,
                    addr,
                    ctx.detect_timeout,
                    names::OUTBOUND_HTTP,
                    filters.clone(),
                    Vec::new(),
                );
                xds.listeners.push(capture::vip_listener(l, svc, client_ns));
            }
        }
    }

    for s in mesh.services() {
        let svc = &s.value;
        let (ns, name) = (&svc.metadata.namespace, &svc.metadata.name);
        for sp in svc
            .spec
            .ports
            .iter()
            .filter(|p| p.app_protocol == AppProtocol::Tcp)
        {
            let idle = mesh
                .port_policy(ns, name, &sp.name)
                .connection_pool
                .and_then(|c| c.value.idle_timeout)
                .map(|d| d.get());
            let lname = names::tcp_listener(sp.port, name, ns);
            let mut targets: Vec<(String, u32)> = Vec::new();
            let mut tcp_routes: Vec<_> = att
                .visible(svc, sp.port, client_ns)
                .into_iter()
                .filter_map(|a| match a {
                    routes::Attached::Tcp(r) => Some(r),
                    _ => None,
                })
                .collect();
            tcp_routes.sort_by_key(|r| crate::mesh::route_age_key(&r.value.metadata));
            if let Some(r) = tcp_routes.first() {
                let rns = &r.value.metadata.namespace;
                for b in r
                    .value
                    .spec
                    .rules
                    .iter()
                    .take(1)
                    .flat_map(|rule| &rule.backend_refs)
                {
                    if b.weight == 0 {
                        continue;
                    }
                    if let Ok((bs, bp)) = crate::mesh::backend_port(
                        mesh,
                        rns,
                        b.view(),
                        "TCPRoute",
                        crate::mesh::PortClass::Any,
                    ) {
                        targets.push((
                            names::cluster(
                                bp.port,
                                &bs.value.metadata.name,
                                &bs.value.metadata.namespace,
                            ),
                            b.weight,
                        ));
                    }
                }
            }
            if targets.is_empty() {
                targets.push((names::cluster(sp.port, name, ns), 1));
            }
            let port = u16::try_from(sp.local_port()).unwrap_or(0);
            let addr = SocketAddr::new(ctx.outbound_addr.ip(), port);
            let filter = listeners::tcp_proxy(&lname, targets, idle);
            if let (Some(_), Some(vaddr)) = (capture_port, capture::vip_addr(mesh, svc, sp)) {
                let vname = capture::vip_listener_name(vaddr.ip(), sp.port);
                let l = capture::tcp_vip_listener(&vname, vaddr, filter.clone());
                xds.listeners.push(capture::vip_listener(l, svc, client_ns));
            }
            xds.listeners
                .push(listeners::plain(&lname, addr, vec![filter]));
        }
    }

    if let Some((wns, wname)) = &ctx.workload {
        inbound(mesh, ctx, mtls.as_ref(), wns, wname, &mut xds);
    }
    xds
}

/// Where the proxy runs: the locality of the Workload it fronts (in the
/// control plane, a registered workload's locality comes from its node's
/// metadata or `node.locality`). `None` when it fronts none or that has no
/// locality.
pub fn proxy_locality(mesh: &Mesh, ctx: &ProxyContext) -> Option<Locality> {
    let (ns, name) = ctx.workload.as_ref()?;
    mesh.workload(ns, name)?
        .value
        .spec
        .locality
        .clone()
        .filter(|l| !(l.region.is_empty() && l.zone.is_empty()))
}

/// The ClusterLoadAssignments that depend on where the proxy runs: those of
/// the service ports whose effective TrafficPolicy enables `locality`, with
/// the priorities of a proxy in `at`. The control plane serves these in
/// place of the shared ones (which are all priority 0).
pub fn locality_load_assignments(mesh: &Mesh, at: &Locality) -> Vec<ClusterLoadAssignment> {
    let mtls = mtls::Mtls::of(mesh, None).is_some();
    let mut out = Vec::new();
    for s in mesh.services() {
        let svc = &s.value;
        for sp in &svc.spec.ports {
            if mesh
                .port_policy(&svc.metadata.namespace, &svc.metadata.name, &sp.name)
                .locality_enabled()
            {
                out.push(clusters::load_assignment(mesh, svc, sp, mtls, Some(at)));
            }
        }
    }
    out
}

/// The inbound listener, route configuration and clusters of the fronted
/// workload (nothing if it or its service is unknown).
fn inbound(
    mesh: &Mesh,
    ctx: &ProxyContext,
    mtls: Option<&mtls::Mtls>,
    wns: &str,
    wname: &str,
    xds: &mut Xds,
) {
    let Some(w) = mesh.workload(wns, wname) else {
        return;
    };
    let Some(s) = mesh.service(wns, &w.value.spec.service) else {
        return;
    };
    let svc = &s.value;
    let ports: Vec<(&ServicePort, u32)> = svc
        .spec
        .ports
        .iter()
        .map(|sp| (sp, w.value.port_for(sp)))
        .collect();
    let Some((_, first_port)) = ports.first().copied() else {
        return;
    };
    let mut seen = Vec::new();
    for (sp, wport) in &ports {
        if !seen.contains(wport) {
            seen.push(*wport);
            xds.clusters.push(clusters::inbound_cluster(
                &w.value,
                svc,
                *wport,
                sp.app_protocol,
            ));
        }
    }
    let tcp = listeners::tcp_proxy(
        names::INBOUND,
        vec![(names::inbound_cluster(first_port), 1)],
        None,
    );
    let hosts: Vec<(u32, Option<Vec<String>>)> = routes::inbound_hosts(svc, &ports)
        .into_iter()
        .map(|(port, _, domains)| (port, domains))
        .collect();
    let service_ports: Vec<&ServicePort> = ports.iter().map(|(sp, _)| *sp).collect();
    let mut rbac = authz::inbound(mesh, svc, &hosts, &service_ports);
    let mut tcp_chain = rbac.tcp;
    tcp_chain.push(tcp);
    let has_http = ports.iter().any(|(sp, _)| sp.app_protocol.is_http());
    if has_http {
        let (rc, rate_limit) = routes::inbound(mesh, svc, &ports);
        // After authorization: a denied request spends no token.
        rbac.http.extend(rate_limit);
        xds.routes.push(rc);
    }
    let mut listener = if let Some(m) = mtls {
        listeners::inbound_mtls(
            m,
            ctx.inbound_addr,
            ctx.detect_timeout,
            has_http.then_some(rbac.http),
            tcp_chain,
        )
    } else if has_http {
        listeners::detecting(
            names::INBOUND,
            ctx.inbound_addr,
            ctx.detect_timeout,
            names::INBOUND,
            rbac.http,
            tcp_chain,
        )
    } else {
        listeners::plain(names::INBOUND, ctx.inbound_addr, tcp_chain)
    };
    // Captured IPv6 inbound connections are redirected to an IPv6 address.
    if ctx.capture {
        capture::add_ipv6_twin(&mut listener, ctx.inbound_addr);
    }
    xds.listeners.push(listener);
}

/// Hash policies for routes to port `port` (by name) of Service `svc` when
/// its TrafficPolicy uses a consistent-hash balancer.
pub(crate) fn hash_policies(mesh: &Mesh, svc: &Key, port: &str) -> Vec<route_action::HashPolicy> {
    use route_action::hash_policy::{self, PolicySpecifier};
    let Some(lb) = mesh.port_policy(&svc.0, &svc.1, port).load_balancer else {
        return Vec::new();
    };
    let lb = lb.value;
    if !lb.algorithm.is_hash() {
        return Vec::new();
    }
    let Some(h) = &lb.hash else {
        return Vec::new();
    };
    let spec = if let Some(name) = &h.header {
        PolicySpecifier::Header(hash_policy::Header {
            header_name: name.to_ascii_lowercase(),
            regex_rewrite: None,
        })
    } else if let Some(c) = &h.cookie {
        PolicySpecifier::Cookie(hash_policy::Cookie {
            name: c.name.clone(),
            ttl: c.ttl.map(|d| util::pb_duration(d.get())),
            path: c.path.clone().unwrap_or_default(),
            attributes: Vec::new(),
        })
    } else if h.source_ip == Some(true) {
        PolicySpecifier::ConnectionProperties(hash_policy::ConnectionProperties { source_ip: true })
    } else {
        return Vec::new();
    };
    vec![route_action::HashPolicy {
        terminal: false,
        policy_specifier: Some(spec),
    }]
}

/// A content hash of everything translation reads. Hashing the input (not
/// the protobuf output, whose map fields encode in random order) keeps the
/// version stable: same mesh and context, same version.
fn version(mesh: &Mesh, ctx: &ProxyContext) -> String {
    let mut h = util::Fnv::new();
    h.write(concat!("meshwork-api/", env!("CARGO_PKG_VERSION")).as_bytes());
    h.write(format!("{:?}", ctx).as_bytes());
    for r in mesh.resources() {
        h.write(r.value.kind().as_str().as_bytes());
        if let Ok(bytes) = serde_json::to_vec(&r.value) {
            h.write(&bytes);
        }
        h.write(&[0]);
    }
    format!("{:016x}", h.finish())
}

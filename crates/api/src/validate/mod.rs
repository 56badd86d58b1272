//! Semantic validation: from loaded resources to a [`Mesh`].
//!
//! Contract: [`validate`] reports every problem at once, each naming the
//! file, line (of the offending field when it can be found), resource and
//! field path, and saying what was expected. It checks names, duplicate
//! resources (saying where the first one is), the Gateway API CRD limits,
//! patterns and `x-kubernetes-validations` rules that matter, regexes (by
//! compiling them), references (services, ports, parents, backends, mirrors,
//! policy targets, workload ports) and conflicts (HTTPRoute vs GRPCRoute on
//! one port, two TCPRoutes or two TrafficPolicies for one target, local port
//! clashes). What passes is safe to translate without further checks.
//!
//! Non-goals: partial acceptance. Kubernetes marks single routes as not
//! accepted and carries on; meshwork refuses the whole input so that a bad
//! `apply` changes nothing.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Errors, FieldPath};
use crate::mesh::{is_service_group, list_ports, parse_rfc3339, Key, Mesh};
use crate::resources::{AppProtocol, Kind, Metadata, Resource, Service, TargetRef, Workload};
use crate::source::Sourced;

mod authz;
pub(crate) mod checks;
pub(crate) mod policy;
mod routes;

/// Checks `resources` and indexes them into a [`Mesh`].
pub fn validate(resources: Vec<Sourced<Resource>>) -> Result<Mesh, Errors> {
    let file_order = file_order(&resources);
    let mut errors = Errors::default();
    let mut mesh = Mesh::default();
    let mut seen: HashMap<(Kind, String, String), String> = HashMap::new();

    for r in resources {
        let label = r.value.label();
        let meta = r.value.metadata().clone();
        check_metadata(&r, &label, &meta, &mut errors);
        let id = (r.value.kind(), meta.namespace.clone(), meta.name.clone());
        if let Some(first) = seen.get(&id) {
            errors.push(r.error(
                Some(label),
                &FieldPath::root().key("metadata").key("name"),
                format!(
                    "duplicate {} {}/{}: first defined at {first}",
                    id.0, id.1, id.2
                ),
            ));
            continue;
        }
        seen.insert(id, r.place());
        let key: Key = (meta.namespace, meta.name);
        let (value, place) = r.split();
        match value {
            Resource::Mesh(v) => {
                let here = place.map(|_| v);
                if let Some(first) = &mesh.config {
                    errors.push(here.error(
                        Some(label),
                        &FieldPath::root().key("metadata").key("name"),
                        format!(
                            "a mesh has one Mesh resource: Mesh {}/{} is already defined at {}; merge them",
                            first.value.metadata.namespace,
                            first.value.metadata.name,
                            first.place()
                        ),
                    ));
                    continue;
                }
                authz::check_mesh_config(&here, &mut errors);
                mesh.config = Some(std::sync::Arc::new(here));
            }
            Resource::Service(v) => {
                mesh.services
                    .insert(key, std::sync::Arc::new(place.map(|_| v)));
            }
            Resource::Workload(v) => {
                mesh.workloads
                    .insert(key, std::sync::Arc::new(place.map(|_| v)));
            }
            Resource::HttpRoute(v) => {
                mesh.http_routes
                    .insert(key, std::sync::Arc::new(place.map(|_| v)));
            }
            Resource::GrpcRoute(v) => {
                mesh.grpc_routes
                    .insert(key, std::sync::Arc::new(place.map(|_| v)));
            }
            Resource::TcpRoute(v) => {
                mesh.tcp_routes
                    .insert(key, std::sync::Arc::new(place.map(|_| v)));
            }
            Resource::TrafficPolicy(v) => {
                mesh.traffic_policies
                    .insert(key, std::sync::Arc::new(place.map(|_| v)));
            }
            Resource::AuthorizationPolicy(v) => {
                mesh.authz_policies
                    .insert(key, std::sync::Arc::new(place.map(|_| v)));
            }
        }
    }

    check_services(&mesh, &mut errors);
    crate::vip::check_service_vips(&mesh, &mut errors);
    for w in mesh.workloads() {
        check_workload(&mesh, w, &mut errors);
    }
    policy::check_policies(&mut mesh, &mut errors);
    authz::check_authz_policies(&mesh, &mut errors);
    routes::check_routes(&mesh, &mut errors);

    if errors.is_empty() {
        mesh.index_workloads();
        Ok(mesh)
    } else {
        // Report in input order: by file (first appearance), then position.
        errors.0.sort_by_key(|e| {
            (
                file_order.get(&e.file).copied().unwrap_or(usize::MAX),
                e.line,
                e.column,
            )
        });
        Err(errors)
    }
}

fn file_order(resources: &[Sourced<Resource>]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in resources {
        let n = m.len();
        m.entry(r.file.to_string()).or_insert(n);
    }
    m
}

/// Collects errors about one resource.
pub(crate) struct Ck<'a, T> {
    pub(crate) src: &'a Sourced<T>,
    pub(crate) label: String,
    pub(crate) errors: &'a mut Errors,
}

impl<'a, T> Ck<'a, T> {
    pub(crate) fn new(src: &'a Sourced<T>, label: String, errors: &'a mut Errors) -> Self {
        Ck { src, label, errors }
    }

    /// Records `message` about the field at `path`.
    pub(crate) fn err(&mut self, path: &FieldPath, message: impl Into<String>) {
        let e: Error = self.src.error(Some(self.label.clone()), path, message);
        self.errors.push(e);
    }

    /// Records the error of `r`, if any.
    pub(crate) fn check(&mut self, path: &FieldPath, r: Result<(), String>) {
        if let Err(m) = r {
            self.err(path, m);
        }
    }

    /// Checks that `tr` (at `path`) names a Service by kind and group; the
    /// name is the caller's to resolve. `who` is the policy kind with its
    /// article ("a TrafficPolicy"). False when it was refused.
    pub(crate) fn service_ref(&mut self, path: &FieldPath, tr: &TargetRef, who: &str) -> bool {
        if tr.kind != "Service" {
            self.err(
                &path.key("kind"),
                format!("{:?} is not supported: {who} targets a Service", tr.kind),
            );
            false
        } else if tr.group.as_deref().is_some_and(|g| !is_service_group(g)) {
            self.err(
                &path.key("group"),
                "must be \"\", \"core\" or \"meshwork.dev\" for a Service",
            );
            false
        } else {
            true
        }
    }

    /// Checks a list length against a CRD `maxItems`.
    pub(crate) fn max_items<X>(&mut self, path: &FieldPath, v: &[X], max: usize) {
        if v.len() > max {
            self.err(
                path,
                format!("at most {max} entries are allowed, found {}", v.len()),
            );
        }
    }

    /// Checks an integer range.
    pub(crate) fn range(&mut self, path: &FieldPath, v: u64, lo: u64, hi: u64) {
        if v < lo || v > hi {
            self.err(path, format!("{v} is out of range: expected {lo} to {hi}"));
        }
    }
}

fn check_metadata(r: &Sourced<Resource>, label: &str, m: &Metadata, errors: &mut Errors) {
    let mut ck = Ck::new(r, label.to_string(), errors);
    let p = FieldPath::root().key("metadata");
    ck.check(&p.key("name"), checks::dns_label(&m.name));
    ck.check(&p.key("namespace"), checks::dns_label(&m.namespace));
    if let Some(ts) = &m.creation_timestamp {
        if parse_rfc3339(ts).is_none() {
            ck.err(
                &p.key("creationTimestamp"),
                format!("{ts:?} is not an RFC 3339 time (e.g. \"2024-05-01T12:00:00Z\")"),
            );
        }
    }
}

fn check_services(mesh: &Mesh, errors: &mut Errors) {
    // Local ports of TCP services in explicit mode must not clash.
    let mut local_ports: BTreeMap<u32, (String, String)> = BTreeMap::new();
    for s in mesh.services() {
        let svc: &Service = &s.value;
        let mut ck = Ck::new(s, label_of(Kind::Service, &svc.metadata), errors);
        let base = FieldPath::root().key("spec");
        if svc.spec.ports.is_empty() {
            ck.err(&base.key("ports"), "at least one port is required");
        }
        if let Some(sa) = &svc.spec.service_account {
            ck.check(&base.key("serviceAccount"), checks::dns_subdomain(sa));
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut numbers: HashMap<u32, usize> = HashMap::new();
        for (i, p) in svc.spec.ports.iter().enumerate() {
            let pp = base.key("ports").index(i);
            ck.check(&pp.key("name"), checks::dns_label(&p.name));
            ck.range(&pp.key("port"), p.port.into(), 1, 65535);
            if let Some(t) = p.target_port {
                ck.range(&pp.key("targetPort"), t.into(), 1, 65535);
            }
            if let Some(l) = p.local_port {
                ck.range(&pp.key("localPort"), l.into(), 0, 65535);
                if p.app_protocol != AppProtocol::Tcp {
                    ck.err(
                        &pp.key("localPort"),
                        format!(
                            "only tcp ports have their own local listener; {} ports are served on the outbound HTTP listener",
                            p.app_protocol.as_str()
                        ),
                    );
                }
            }
            if let Some(j) = names.insert(&p.name, i) {
                ck.err(
                    &pp.key("name"),
                    format!("port name {:?} is already used by spec.ports[{j}]", p.name),
                );
            }
            if let Some(j) = numbers.insert(p.port, i) {
                ck.err(
                    &pp.key("port"),
                    format!("port {} is already used by spec.ports[{j}]", p.port),
                );
            }
            if p.app_protocol == AppProtocol::Tcp && p.local_port() != 0 {
                let here = format!(
                    "{}/{} port {} ({})",
                    svc.metadata.namespace,
                    svc.metadata.name,
                    p.name,
                    s.place()
                );
                match local_ports.get(&p.local_port()) {
                    Some((other, _)) => ck.err(
                        &pp.key("localPort"),
                        format!(
                            "local port {} is already taken by tcp service {other}; set a distinct spec.ports[{i}].localPort (0 picks any free port)",
                            p.local_port()
                        ),
                    ),
                    None => {
                        local_ports.insert(p.local_port(), (here, String::new()));
                    }
                }
            }
        }
    }
}

/// `mesh` plus `extra` Workloads (registered at run time by proxies), each
/// checked exactly as [`validate`] checks a Workload, without checking the
/// rest again: the control plane does this on every registration, and the
/// rest of a large mesh was validated when it was stored.
pub fn with_workloads(mesh: &Mesh, extra: Vec<Sourced<Workload>>) -> Result<Mesh, Errors> {
    let mut out = mesh.clone();
    let mut errors = Errors(Vec::new());
    for w in extra {
        let key: Key = (
            w.value.metadata.namespace.clone(),
            w.value.metadata.name.clone(),
        );
        if let Some(first) = out.workloads.get(&key) {
            errors.push(w.error(
                Some(label_of(Kind::Workload, &w.value.metadata)),
                &FieldPath::root().key("metadata").key("name"),
                format!(
                    "duplicate Workload {}/{}: first defined at {}",
                    key.0,
                    key.1,
                    first.place()
                ),
            ));
            continue;
        }
        check_workload(&out, &w, &mut errors);
        out.workloads.insert(key, std::sync::Arc::new(w));
    }
    if errors.is_empty() {
        out.index_workloads();
        Ok(out)
    } else {
        Err(errors)
    }
}

fn check_workload(mesh: &Mesh, w: &Sourced<Workload>, errors: &mut Errors) {
    let wl = &w.value;
    let mut ck = Ck::new(w, label_of(Kind::Workload, &wl.metadata), errors);
    let base = FieldPath::root().key("spec");
    ck.range(&base.key("weight"), wl.spec.weight.into(), 1, 128);
    if let Some(state) = wl
        .metadata
        .annotations
        .get(crate::resources::WORKLOAD_STATE_ANNOTATION)
    {
        if !crate::resources::WORKLOAD_STATES.contains(&state.as_str()) {
            ck.err(
                &FieldPath::root()
                    .key("metadata")
                    .key("annotations")
                    .key(crate::resources::WORKLOAD_STATE_ANNOTATION),
                format!(
                    "{state:?} is not a workload state: use one of {}",
                    crate::resources::WORKLOAD_STATES.join(", ")
                ),
            );
        }
    }
    if wl.spec.address.is_unspecified() {
        ck.err(
            &base.key("address"),
            format!(
                "{} is not a usable address; give the workload's own IP",
                wl.spec.address
            ),
        );
    }
    let ns = &wl.metadata.namespace;
    let Some(svc) = mesh.service(ns, &wl.spec.service) else {
        ck.err(
            &base.key("service"),
            format!(
                "Service {ns}/{} not found (a Workload belongs to a Service of its own namespace)",
                wl.spec.service
            ),
        );
        return;
    };
    for (name, port) in &wl.spec.ports {
        let pp = base.key("ports").key(name);
        if svc.value.port_named(name).is_none() {
            ck.err(
                &pp,
                format!(
                    "Service {ns}/{} has no port named {name:?} (its ports: {})",
                    wl.spec.service,
                    list_ports(&svc.value)
                ),
            );
        }
        ck.range(&pp, (*port).into(), 1, 65535);
    }
}

pub(crate) fn label_of(kind: Kind, m: &Metadata) -> String {
    format!("{kind} {}/{}", m.namespace, m.name)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn errs(yaml: &str) -> String {
        let r = crate::load_str("t.yaml", yaml).unwrap();
        validate(r).err().map(|e| e.to_string()).unwrap_or_default()
    }

    const SVC: &str = "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports:\n  - {name: http, port: 80}\n";

    #[test]
    fn duplicate_names_point_at_the_first() {
        let e = errs(&format!("{SVC}---\n{SVC}"));
        assert!(
            e.contains("t.yaml:10:18: Service default/a: metadata.name: "),
            "{e}"
        );
        assert!(
            e.contains("duplicate Service default/a: first defined at t.yaml:1"),
            "{e}"
        );
    }

    #[test]
    fn service_ports() {
        let e = errs("apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports:\n  - {name: http, port: 80, localPort: 9}\n  - {name: http, port: 80}\n  - {name: x, port: 70000}\n");
        assert!(
            e.contains("spec.ports[1].name: port name \"http\" is already used by spec.ports[0]"),
            "{e}"
        );
        assert!(
            e.contains("spec.ports[1].port: port 80 is already used"),
            "{e}"
        );
        assert!(
            e.contains("spec.ports[2].port: 70000 is out of range"),
            "{e}"
        );
        assert!(e.contains("spec.ports[0].localPort: only tcp ports"), "{e}");
    }

    #[test]
    fn policy_checks() {
        let e = errs(&format!(
            "{SVC}---\napiVersion: meshwork.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{kind: Service, name: a}}\n  loadBalancer:\n    algorithm: roundRobin\n    hash: {{header: x-user, sourceIP: true}}\n    maglev: {{tableSize: 100}}\n"
        ));
        assert!(
            e.contains("spec.loadBalancer.hash: only used by algorithms ringHash and maglev"),
            "{e}"
        );
        assert!(
            e.contains("set exactly one of header, cookie and sourceIP"),
            "{e}"
        );
        assert!(
            e.contains("spec.loadBalancer.maglev.tableSize: 100 is not a prime"),
            "{e}"
        );
    }
}

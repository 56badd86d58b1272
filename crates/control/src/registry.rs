//! Live workloads registered by connected proxies.
//!
//! Purpose: a sidecar that connects to the xDS server announces the workload
//! it fronts in its `Node` (id `<workload>.<namespace>`, metadata fields
//! `service`, `namespace`, `address`, `app_port`, `labels`, `locality`). The
//! registry turns that into an `api` [`Workload`] so the translator can send
//! its address to every proxy that calls its service, next to the static
//! Workloads stored with `apply` (external endpoints).
//!
//! Contract:
//! - [`Registry::register`] returns a [`Registration`] guard per stream; a
//!   workload stays registered while at least one stream of its node is open
//!   and for a grace period (default 30 s, [`Registry::new`]) after the last
//!   one ends, so a proxy that reconnects quickly keeps its endpoint. The
//!   grace timer runs on `tokio::time` (tests pause and advance it).
//! - The node's `state` metadata (`starting`, `serving`, `draining`) becomes
//!   the Workload's [`api::resources::WORKLOAD_STATE_ANNOTATION`], which the
//!   translator reads (a starting workload is no endpoint, a draining one is
//!   `DRAINING`). A node that sends itself again on an open stream updates
//!   its workload ([`Registration::update`]). A draining workload is removed as
//!   soon as its last stream ends: it said it was leaving.
//! - A node without a `service` metadata field (an Envoy, a proxyless gRPC
//!   client) registers nothing: [`Registry::register`] returns `Ok(None)`.
//! - Bad metadata (an unparsable address, a port out of range) is refused
//!   with a message naming the field; it never panics.
//! - [`Registry::subscribe`] bumps on every change of the workload set.
//! - Static Workloads win: [`merge`] leaves out a registered workload whose
//!   name a static Workload already has, or whose Service is unknown (until
//!   it appears), and validates the rest against the mesh.
//!
//! Non-goals: persistence (a restarted control plane learns its workloads
//! again as proxies reconnect), authentication of what a node claims (join
//! tokens and mTLS come with the CA), and health checking.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use api::resources::{Locality, Metadata, Workload, WorkloadSpec, MESHWORK_V1ALPHA1};
use api::{Mesh, Resource, Sourced};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{value::Kind as PbKind, Struct, Value};
use tokio::sync::watch;

/// How long a workload outlives the last stream of its proxy by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// What a node announced that cannot make a Workload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node {node:?}: metadata.{field}: {message}")]
pub struct RegistryError {
    pub node: String,
    pub field: &'static str,
    pub message: String,
}

/// A node as the xDS server sees it: identity plus what the translator needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// `Node.id`.
    pub id: String,
    /// `Node.cluster` (the service name for meshwork proxies).
    pub cluster: String,
    /// The workload the node fronts, if it announced one.
    pub workload: Option<Workload>,
    /// `metadata.inbound_addr` / `outbound_addr`, when the proxy says where it
    /// listens (explicit mode on one host uses other ports than 15006/15001).
    pub inbound_addr: Option<SocketAddr>,
    pub outbound_addr: Option<SocketAddr>,
    /// `metadata.upstreams`: the services the proxy calls, as
    /// `service.namespace` (a bare name is in the node's namespace). `None`:
    /// it did not say, and may call anything.
    pub upstreams: Option<BTreeSet<String>>,
}

/// The live workload set.
#[derive(Debug)]
pub struct Registry {
    grace: Duration,
    inner: Mutex<Inner>,
    changes: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    /// By node id.
    nodes: HashMap<String, Entry>,
    revision: u64,
}

#[derive(Debug)]
struct Entry {
    workload: Workload,
    /// Open streams of this node.
    streams: usize,
    /// Bumped on every (re)registration, so a grace timer started for an
    /// older generation does not remove a node that came back.
    generation: u64,
}

/// Keeps a workload registered while alive; dropping it starts the grace
/// period of the node's last stream.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Registry>,
    node: String,
    /// The generation this stream registered: only the newest stream of a
    /// node may change its workload ([`Registration::update`]).
    generation: u64,
}

impl Registry {
    /// An empty registry; workloads outlive their last stream by `grace`.
    pub fn new(grace: Duration) -> Arc<Self> {
        Arc::new(Registry {
            grace,
            inner: Mutex::new(Inner::default()),
            changes: watch::channel(0).0,
        })
    }

    /// Bumps (to the registry's revision) on every change of the workload set.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The registered workloads, by namespace then name.
    pub fn workloads(&self) -> Vec<Workload> {
        let mut v: Vec<Workload> = self
            .lock()
            .nodes
            .values()
            .map(|e| e.workload.clone())
            .collect();
        v.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        v
    }

    /// Registers the workload `info` announces (none: `None`), for as long
    /// as the returned guard lives (plus the grace period).
    pub fn register(self: &Arc<Self>, info: &NodeInfo) -> Option<Registration> {
        let w = info.workload.clone()?;
        let mut inner = self.lock();
        inner.revision += 1;
        let revision = inner.revision;
        let changed = match inner.nodes.get_mut(&info.id) {
            Some(e) => {
                e.streams += 1;
                e.generation = revision;
                let changed = e.workload != w;
                e.workload = w;
                changed
            }
            None => {
                inner.nodes.insert(
                    info.id.clone(),
                    Entry {
                        workload: w,
                        streams: 1,
                        generation: revision,
                    },
                );
                true
            }
        };
        drop(inner);
        if changed {
            self.changes.send_replace(revision);
        }
        Some(Registration {
            registry: self.clone(),
            node: info.id.clone(),
            generation: revision,
        })
    }

    /// A stream's node announced itself again (its workload's state
    /// changed): the workload becomes what `info` says, if `generation` is
    /// still the node's newest registration (an older stream of the same
    /// node, e.g. a replaced instance still draining under the same name,
    /// must not overwrite the new one). Nothing happens if the node is not
    /// registered or announces no workload.
    fn update(&self, info: &NodeInfo, generation: u64) {
        let Some(w) = info.workload.clone() else {
            return;
        };
        let mut inner = self.lock();
        let Some(e) = inner.nodes.get_mut(&info.id) else {
            return;
        };
        if e.generation != generation {
            tracing::info!(node = %info.id, "a newer stream of this node owns its workload: update ignored");
            return;
        }
        if e.workload == w {
            return;
        }
        e.workload = w;
        inner.revision += 1;
        let revision = inner.revision;
        drop(inner);
        tracing::info!(node = %info.id, "workload updated by its node");
        self.changes.send_replace(revision);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the map half-updated
        // (every update is a single insert/remove), so poison is harmless.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn release(self: &Arc<Self>, node: &str) {
        let generation = {
            let mut inner = self.lock();
            let Some(e) = inner.nodes.get_mut(node) else {
                return;
            };
            e.streams = e.streams.saturating_sub(1);
            if e.streams > 0 {
                return;
            }
            (e.generation, is_draining(&e.workload))
        };
        let (generation, draining) = generation;
        if draining {
            // It said it was leaving: no grace period for a reconnect.
            self.remove(node, generation);
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime (the process is shutting down): forget it now.
            self.remove(node, generation);
            return;
        };
        let (registry, node, grace) = (self.clone(), node.to_string(), self.grace);
        rt.spawn(async move {
            tokio::time::sleep(grace).await;
            registry.remove(&node, generation);
        });
    }

    fn remove(&self, node: &str, generation: u64) {
        let mut inner = self.lock();
        let gone = matches!(inner.nodes.get(node), Some(e) if e.streams == 0 && e.generation == generation);
        if gone {
            inner.nodes.remove(node);
            inner.revision += 1;
            let revision = inner.revision;
            drop(inner);
            tracing::info!(node, "workload deregistered");
            self.changes.send_replace(revision);
        }
    }
}

impl Registration {
    /// This stream's node announced itself again (its workload's state
    /// changed): the workload becomes what `info` says, if this stream is
    /// still the node's newest registration.
    pub fn update(&self, info: &NodeInfo) {
        if info.id == self.node {
            self.registry.update(info, self.generation);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.release(&self.node);
    }
}

impl NodeInfo {
    /// Reads a node. `Err` when it announces a workload badly.
    pub fn from_node(node: &Node) -> Result<NodeInfo, RegistryError> {
        let empty = Struct::default();
        let meta = node.metadata.as_ref().unwrap_or(&empty);
        let err = |field: &'static str, message: String| RegistryError {
            node: node.id.clone(),
            field,
            message,
        };
        let addr_field = |field: &'static str| -> Result<Option<SocketAddr>, RegistryError> {
            match string_field(meta, field) {
                None => Ok(None),
                Some(s) => s
                    .parse()
                    .map(Some)
                    .map_err(|_| err(field, format!("{s:?} is not an IP:port address"))),
            }
        };
        let inbound_addr = addr_field("inbound_addr")?;
        let outbound_addr = addr_field("outbound_addr")?;
        let upstreams = upstreams(meta, &err)?;
        let workload = match string_field(meta, "service") {
            None => None,
            Some(service) => {
                let mut w = workload_of(node, meta, service, &err)?;
                // Callers reach the workload through its sidecar's inbound
                // listener, which forwards to the application; the sidecar's
                // own inbound cluster still targets address:app_port.
                match string_field(meta, "state").as_deref() {
                    None | Some("serving") => {}
                    Some(state @ ("starting" | "draining")) => {
                        w.metadata.annotations.insert(
                            api::resources::WORKLOAD_STATE_ANNOTATION.to_string(),
                            state.to_string(),
                        );
                    }
                    Some(other) => {
                        return Err(err(
                            "state",
                            format!("{other:?}: expected starting, serving or draining"),
                        ))
                    }
                }
                if let Some(inbound) = inbound_addr.filter(|a| a.port() != 0) {
                    let ip = if inbound.ip().is_unspecified() {
                        w.spec.address
                    } else {
                        inbound.ip()
                    };
                    w.metadata.annotations.insert(
                        api::resources::SIDECAR_INBOUND_ANNOTATION.to_string(),
                        SocketAddr::new(ip, inbound.port()).to_string(),
                    );
                }
                Some(w)
            }
        };
        Ok(NodeInfo {
            id: node.id.clone(),
            cluster: node.cluster.clone(),
            workload,
            inbound_addr,
            outbound_addr,
            upstreams,
        })
    }

    /// `(namespace, name)` of its workload.
    pub fn workload_key(&self) -> Option<(String, String)> {
        self.workload
            .as_ref()
            .map(|w| (w.metadata.namespace.clone(), w.metadata.name.clone()))
    }
}

fn workload_of(
    node: &Node,
    meta: &Struct,
    service: String,
    err: &dyn Fn(&'static str, String) -> RegistryError,
) -> Result<Workload, RegistryError> {
    let namespace = string_field(meta, "namespace")
        .unwrap_or_else(|| api::resources::DEFAULT_NAMESPACE.to_string());
    // Node id `<workload>.<namespace>`; an id without the suffix is the name.
    let name = node
        .id
        .strip_suffix(&format!(".{namespace}"))
        .unwrap_or(&node.id)
        .to_string();
    let address: IpAddr = match string_field(meta, "address") {
        Some(s) => s
            .parse()
            .map_err(|_| err("address", format!("{s:?} is not an IP address")))?,
        None => return Err(err("address", "required with `service`".to_string())),
    };
    let mut ports = BTreeMap::new();
    if let Some(v) = meta.fields.get("app_port") {
        let port = match &v.kind {
            Some(PbKind::NumberValue(n)) if n.fract() == 0.0 && (1.0..=65535.0).contains(n) => {
                *n as u32
            }
            Some(PbKind::StringValue(s)) => s
                .parse::<u32>()
                .ok()
                .filter(|p| (1..=65535).contains(p))
                .ok_or_else(|| err("app_port", format!("{s:?} is not a port (1-65535)")))?,
            _ => {
                return Err(err(
                    "app_port",
                    "expected a port number (1-65535)".to_string(),
                ))
            }
        };
        // The application serves every port of its service on app_port; the
        // names are filled in against the Service when merging.
        ports.insert(String::new(), port);
    }
    let mut labels = BTreeMap::new();
    if let Some(v) = meta.fields.get("labels") {
        let Some(PbKind::StructValue(s)) = &v.kind else {
            return Err(err("labels", "expected a map of strings".to_string()));
        };
        for (k, v) in &s.fields {
            let Some(PbKind::StringValue(v)) = &v.kind else {
                return Err(err("labels", format!("value of {k:?} is not a string")));
            };
            labels.insert(k.clone(), v.clone());
        }
    }
    let locality = match meta.fields.get("locality").and_then(|v| v.kind.as_ref()) {
        Some(PbKind::StructValue(s)) => Some(Locality {
            region: string_field(s, "region").unwrap_or_default(),
            zone: string_field(s, "zone").unwrap_or_default(),
        }),
        // `region/zone` or just a zone.
        Some(PbKind::StringValue(s)) => Some(match s.split_once('/') {
            Some((r, z)) => Locality {
                region: r.to_string(),
                zone: z.to_string(),
            },
            None => Locality {
                region: String::new(),
                zone: s.clone(),
            },
        }),
        Some(_) => {
            return Err(err(
                "locality",
                "expected {region, zone} or \"region/zone\"".to_string(),
            ))
        }
        None => node.locality.as_ref().map(|l| Locality {
            region: l.region.clone(),
            zone: l.zone.clone(),
        }),
    };
    let locality = locality.filter(|l| !(l.region.is_empty() && l.zone.is_empty()));
    Ok(Workload {
        api_version: MESHWORK_V1ALPHA1.to_string(),
        kind: "Workload".to_string(),
        metadata: Metadata::new(&namespace, &name),
        spec: WorkloadSpec {
            service,
            address,
            ports,
            weight: 1,
            labels,
            locality,
        },
    })
}

/// `metadata.upstreams`: a list of strings, or one comma-separated string.
fn upstreams(
    meta: &Struct,
    err: &dyn Fn(&'static str, String) -> RegistryError,
) -> Result<Option<BTreeSet<String>>, RegistryError> {
    let names: Vec<String> = match meta.fields.get("upstreams").and_then(|v| v.kind.as_ref()) {
        None => return Ok(None),
        Some(PbKind::StringValue(s)) => s
            .split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect(),
        Some(PbKind::ListValue(l)) => {
            let mut v = Vec::new();
            for item in &l.values {
                match &item.kind {
                    Some(PbKind::StringValue(s)) => v.push(s.clone()),
                    _ => {
                        return Err(err(
                            "upstreams",
                            "expected a list of service names".to_string(),
                        ))
                    }
                }
            }
            v
        }
        Some(_) => {
            return Err(err(
                "upstreams",
                "expected a list of service names".to_string(),
            ))
        }
    };
    let ns = string_field(meta, "namespace")
        .unwrap_or_else(|| api::resources::DEFAULT_NAMESPACE.to_string());
    Ok(Some(
        names
            .into_iter()
            .map(|n| {
                if n.contains('.') {
                    n
                } else {
                    format!("{n}.{ns}")
                }
            })
            .collect(),
    ))
}

fn is_draining(w: &Workload) -> bool {
    w.metadata
        .annotations
        .get(api::resources::WORKLOAD_STATE_ANNOTATION)
        .is_some_and(|s| s == "draining")
}

fn string_field(s: &Struct, name: &str) -> Option<String> {
    match s.fields.get(name) {
        Some(Value {
            kind: Some(PbKind::StringValue(v)),
        }) if !v.is_empty() => Some(v.clone()),
        _ => None,
    }
}

/// `mesh` plus the registered `workloads` that fit it: a workload whose
/// service is unknown, whose name a static Workload already has, or that
/// fails validation is left out (and logged). Returns the merged mesh and
/// the names left out with the reason.
pub fn merge(mesh: &Arc<Mesh>, workloads: &[Workload]) -> (Arc<Mesh>, Vec<(String, String)>) {
    let mut skipped = Vec::new();
    let mut extra = Vec::new();
    for w in workloads {
        let (ns, name) = (&w.metadata.namespace, &w.metadata.name);
        let label = format!("{ns}/{name}");
        if mesh.workload(ns, name).is_some() {
            skipped.push((label, "a static Workload has this name".to_string()));
            continue;
        }
        let Some(svc) = mesh.service(ns, &w.spec.service) else {
            skipped.push((label, format!("Service {ns}/{} not found", w.spec.service)));
            continue;
        };
        let mut w = w.clone();
        if let Some(port) = w.spec.ports.remove("") {
            for sp in &svc.value.spec.ports {
                w.spec.ports.insert(sp.name.clone(), port);
            }
        }
        // Validated alone with its service first: a bad registration must
        // not take the whole mesh down with it.
        let src = format!("registry:{ns}/{name}");
        let alone = vec![
            svc.clone().map(Resource::Service),
            Sourced::new(src.as_str(), 1, Resource::Workload(w.clone())),
        ];
        if let Err(e) = api::validate(alone) {
            skipped.push((label, e.to_string()));
            continue;
        }
        extra.push(Sourced::new(src.as_str(), 1, w));
    }
    for (w, why) in &skipped {
        tracing::warn!(workload = %w, reason = %why, "registered workload left out of the mesh");
    }
    if extra.is_empty() {
        return (mesh.clone(), skipped);
    }
    // The static mesh is valid already: only the additions are checked.
    match api::with_workloads(mesh, extra) {
        Ok(m) => (Arc::new(m), skipped),
        Err(e) => {
            // Every workload passed alone; the set can only fail on
            // something they share. Serve the static mesh rather than none.
            tracing::error!(error = %e, "registered workloads do not validate together; serving static workloads only");
            skipped.push(("*".to_string(), e.to_string()));
            (mesh.clone(), skipped)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn s(v: &str) -> Value {
        Value {
            kind: Some(PbKind::StringValue(v.to_string())),
        }
    }

    fn node(id: &str, fields: &[(&str, Value)]) -> Node {
        Node {
            id: id.to_string(),
            cluster: "web".to_string(),
            metadata: Some(Struct {
                fields: fields
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
            }),
            ..Default::default()
        }
    }

    fn web_node(id: &str) -> NodeInfo {
        NodeInfo::from_node(&node(
            id,
            &[
                ("service", s("web")),
                ("namespace", s("shop")),
                ("address", s("10.0.0.7")),
                (
                    "app_port",
                    Value {
                        kind: Some(PbKind::NumberValue(8080.0)),
                    },
                ),
                ("locality", s("eu/eu-1a")),
            ],
        ))
        .unwrap()
    }

    #[test]
    fn node_metadata_makes_a_workload() {
        let info = web_node("web-1.shop");
        let w = info.workload.unwrap();
        assert_eq!(
            (w.metadata.namespace.as_str(), w.metadata.name.as_str()),
            ("shop", "web-1")
        );
        assert_eq!(w.spec.service, "web");
        assert_eq!(w.spec.address.to_string(), "10.0.0.7");
        assert_eq!(w.spec.locality.unwrap().zone, "eu-1a");
    }

    #[test]
    fn bad_metadata_names_the_field_and_plain_nodes_register_nothing() {
        let e = NodeInfo::from_node(&node(
            "x.default",
            &[("service", s("web")), ("address", s("not-an-ip"))],
        ))
        .unwrap_err();
        assert_eq!(e.field, "address");
        assert!(e.to_string().contains("not-an-ip"), "{e}");
        let e = NodeInfo::from_node(&node(
            "x.default",
            &[
                ("service", s("web")),
                ("address", s("127.0.0.1")),
                ("app_port", s("99999")),
            ],
        ))
        .unwrap_err();
        assert_eq!(e.field, "app_port");
        let plain = NodeInfo::from_node(&node("envoy", &[])).unwrap();
        assert!(plain.workload.is_none());
        assert!(Registry::new(DEFAULT_GRACE).register(&plain).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn workload_outlives_its_last_stream_by_the_grace_period() {
        let reg = Registry::new(Duration::from_secs(30));
        let info = web_node("web-1.shop");
        let a = reg.register(&info).unwrap();
        let b = reg.register(&info).unwrap();
        assert_eq!(reg.workloads().len(), 1);
        drop(a);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(reg.workloads().len(), 1, "one stream is still open");
        drop(b);
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert_eq!(reg.workloads().len(), 1, "within the grace period");
        // Reconnecting inside the grace period cancels the removal.
        let c = reg.register(&info).unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(reg.workloads().len(), 1);
        let mut rx = reg.subscribe();
        rx.borrow_and_update();
        drop(c);
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert!(reg.workloads().is_empty());
        assert!(rx.has_changed().unwrap(), "removal is announced");
    }

    fn web_node_in(id: &str, state: &str) -> NodeInfo {
        let mut n = node(
            id,
            &[
                ("service", s("web")),
                ("namespace", s("shop")),
                ("address", s("10.0.0.7")),
            ],
        );
        n.metadata
            .as_mut()
            .unwrap()
            .fields
            .insert("state".to_string(), s(state));
        NodeInfo::from_node(&n).unwrap()
    }

    fn state(reg: &Registry) -> Option<String> {
        reg.workloads()[0]
            .metadata
            .annotations
            .get(api::resources::WORKLOAD_STATE_ANNOTATION)
            .cloned()
    }

    #[tokio::test(start_paused = true)]
    async fn the_announced_state_follows_the_node_and_a_draining_workload_leaves_at_once() {
        let reg = Registry::new(Duration::from_secs(30));
        let guard = reg
            .register(&web_node_in("web-1.shop", "starting"))
            .unwrap();
        assert_eq!(state(&reg).as_deref(), Some("starting"));
        let mut rx = reg.subscribe();
        rx.borrow_and_update();
        guard.update(&web_node_in("web-1.shop", "serving"));
        assert_eq!(state(&reg), None, "serving needs no annotation");
        assert!(rx.has_changed().unwrap(), "the change is announced");
        rx.borrow_and_update();
        guard.update(&web_node_in("web-1.shop", "serving"));
        assert!(!rx.has_changed().unwrap(), "no change, no announcement");
        // A second stream of the same node (the replacement, same name)
        // owns the workload now: the old stream's announcement is ignored.
        let newer = reg.register(&web_node_in("web-1.shop", "serving")).unwrap();
        guard.update(&web_node_in("web-1.shop", "draining"));
        assert_eq!(state(&reg), None, "the older stream cannot drain it");
        drop(newer);
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert_eq!(reg.workloads().len(), 1, "the old stream is still open");
        // Another node's announcement through this stream does nothing.
        guard.update(&web_node_in("web-2.shop", "serving"));
        assert_eq!(reg.workloads().len(), 1);
        // The old stream ends too; a new one comes within the grace period.
        drop(guard);
        let guard = reg.register(&web_node_in("web-1.shop", "serving")).unwrap();
        guard.update(&web_node_in("web-1.shop", "draining"));
        assert_eq!(state(&reg).as_deref(), Some("draining"));
        // It said it was leaving: no grace period.
        drop(guard);
        assert!(reg.workloads().is_empty());
        let e = NodeInfo::from_node(&node(
            "x.default",
            &[
                ("service", s("web")),
                ("address", s("127.0.0.1")),
                ("state", s("resting")),
            ],
        ))
        .unwrap_err();
        assert_eq!(e.field, "state");
        assert!(
            e.to_string().contains("starting, serving or draining"),
            "{e}"
        );
    }

    #[test]
    fn merge_keeps_static_workloads_and_drops_unknown_services() {
        let yaml = r#"
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{name: http, port: 80}]
---
apiVersion: meshwork.dev/v1alpha1
kind: Workload
metadata: {name: web-0, namespace: shop}
spec: {service: web, address: 10.0.0.1}
"#;
        let mesh = Arc::new(api::validate(api::load_str("m.yaml", yaml).unwrap()).unwrap());
        let mut ws = vec![web_node("web-1.shop").workload.unwrap()];
        let mut clash = ws[0].clone();
        clash.metadata.name = "web-0".to_string();
        ws.push(clash);
        let mut orphan = ws[0].clone();
        orphan.metadata.name = "db-0".to_string();
        orphan.spec.service = "db".to_string();
        ws.push(orphan);
        let (merged, skipped) = merge(&mesh, &ws);
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        let w = merged.workload("shop", "web-1").unwrap();
        assert_eq!(w.value.spec.ports.get("http"), Some(&8080));
        assert_eq!(
            merged
                .workload("shop", "web-0")
                .unwrap()
                .value
                .spec
                .address
                .to_string(),
            "10.0.0.1"
        );
    }
}

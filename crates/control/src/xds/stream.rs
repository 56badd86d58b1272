//! One ADS stream: subscriptions, nonces, ACK/NACK, and pushes, for both
//! state-of-the-world (SotW) and incremental (delta) xDS.
//!
//! Contract (the xDS protocol, as Envoy and gRPC clients expect it):
//! - The first request carries the `Node`; a stream without one is refused
//!   (`INVALID_ARGUMENT`), as is a request for a type URL this server does
//!   not serve, or a message that does not decode. The status message says
//!   what was wrong and what is served.
//! - Per type URL: the first request subscribes (LDS and CDS with no names,
//!   or `*`, mean every resource; RDS and EDS name theirs). A request
//!   carrying the nonce of the last response of its type is an ACK, or a
//!   NACK when it has `error_detail`; a request with an older nonce is stale
//!   and ignored (SotW), as the protocol says.
//! - SotW: a response holds every subscribed resource of the type; it is
//!   sent when the subscription changes, or when the snapshot changes what
//!   the subscription selects (a type whose resources kept their versions is
//!   not re-sent).
//! - Delta: a response holds only resources whose version the client does
//!   not have, plus `removed_resources`; `initial_resource_versions` of a
//!   reconnecting client count as held.
//! - A Listener asked for by a name that is a service host name (`xds:///NAME`)
//!   marks the stream proxyless: it gets `api_listener`s, and its clusters
//!   use balancers gRPC implements.
//!
//! Non-goals: `resource_locators` / xdstp names, TTLs, on-demand (VHDS).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use api::ProxyContext;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource as DeltaResource,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use identity::SpiffeId;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::service::Queued;
use super::snapshot::{Snapshot, TypeKind, Versioned, View, KINDS};
use super::status::{Held, Nack, ProxyRecord, TypeRecord};
use super::Shared;
use crate::registry::{NodeInfo, Registration};

/// Which protocol variant a stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Sotw,
    Delta,
}

/// Subscription state of one type on one stream.
#[derive(Debug, Default)]
struct TypeState {
    requested: bool,
    wildcard: bool,
    /// Shared with the snapshot when it is every name of the type (Envoy
    /// subscribes to every cluster's endpoints by name).
    names: Arc<BTreeSet<String>>,
    last_nonce: String,
}

/// A stream once its node is known.
struct Conn {
    shared: Arc<Shared>,
    mode: Mode,
    ctx: ProxyContext,
    scope: Option<BTreeSet<String>>,
    /// [`super::snapshot_key`] of `ctx` and `scope`.
    key: String,
    record_id: u64,
    record: Arc<Mutex<ProxyRecord>>,
    snapshot: Arc<Snapshot>,
    types: [TypeState; KINDS],
    proxyless: bool,
    nonce: u64,
    /// The node's metadata `state` as last announced.
    state: Option<String>,
    _registration: Option<Registration>,
}

/// The messages a stream sends, whatever its mode.
enum Out {
    Sotw(DiscoveryResponse),
    Delta(DeltaDiscoveryResponse),
}

/// A request, whatever its mode, reduced to what the state machine reads.
struct In {
    node: Option<Node>,
    type_url: String,
    nonce: String,
    version: String,
    error: Option<RpcStatus>,
    /// SotW: the complete set of names.
    names: Vec<String>,
    /// Delta.
    subscribe: Vec<String>,
    unsubscribe: Vec<String>,
    initial_versions: BTreeMap<String, String>,
}

impl From<DiscoveryRequest> for In {
    fn from(r: DiscoveryRequest) -> In {
        In {
            node: r.node,
            type_url: r.type_url,
            nonce: r.response_nonce,
            version: r.version_info,
            error: r.error_detail,
            names: r.resource_names,
            subscribe: Vec::new(),
            unsubscribe: Vec::new(),
            initial_versions: BTreeMap::new(),
        }
    }
}

impl From<DeltaDiscoveryRequest> for In {
    fn from(r: DeltaDiscoveryRequest) -> In {
        In {
            node: r.node,
            type_url: r.type_url,
            nonce: r.response_nonce,
            version: String::new(),
            error: r.error_detail,
            names: Vec::new(),
            subscribe: r.resource_names_subscribe,
            unsubscribe: r.resource_names_unsubscribe,
            initial_versions: r.initial_resource_versions.into_iter().collect(),
        }
    }
}

/// Runs a SotW stream until the client goes away or the server stops.
pub(crate) async fn run_sotw(
    shared: Arc<Shared>,
    inbound: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Queued<DiscoveryResponse>>,
    peer: Option<SpiffeId>,
) {
    let send = |o: Out| match o {
        Out::Sotw(r) => Some(Ok(r)),
        Out::Delta(_) => None,
    };
    run(shared, Mode::Sotw, inbound, tx, send, peer).await
}

/// Runs a delta stream until the client goes away or the server stops.
pub(crate) async fn run_delta(
    shared: Arc<Shared>,
    inbound: Streaming<DeltaDiscoveryRequest>,
    tx: mpsc::Sender<Queued<DeltaDiscoveryResponse>>,
    peer: Option<SpiffeId>,
) {
    let send = |o: Out| match o {
        Out::Delta(r) => Some(Ok(r)),
        Out::Sotw(_) => None,
    };
    run(shared, Mode::Delta, inbound, tx, send, peer).await
}

async fn run<Req, Resp>(
    shared: Arc<Shared>,
    mode: Mode,
    mut inbound: Streaming<Req>,
    tx: mpsc::Sender<Queued<Resp>>,
    wrap: impl Fn(Out) -> Option<Result<Resp, Status>>,
    peer: Option<SpiffeId>,
) where
    Req: Into<In>,
{
    let mut merged = shared.merged.subscribe();
    let mut rootca = shared.rootca.subscribe();
    let mut stopping = shared.stopping.subscribe();
    let mut conn: Option<Conn> = None;
    loop {
        let outs = tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => match handle(&shared, mode, &mut conn, req.into(), peer.as_ref()) {
                    Ok(outs) => outs,
                    Err(status) => {
                        tracing::info!(error = %status.message(), "refusing xDS stream");
                        let _ = tx.send(Box::new(Err(status))).await;
                        break;
                    }
                },
                Ok(None) => break,
                Err(status) if malformed(&status) => {
                    // A message that does not decode: say so, then end.
                    let msg = format!("malformed xDS request: {}", status.message());
                    tracing::info!(error = %msg, "refusing xDS stream");
                    let _ = tx.send(Box::new(Err(Status::invalid_argument(msg)))).await;
                    break;
                }
                Err(status) => {
                    // The client went away (reset, broken connection).
                    tracing::debug!(error = %status, "xDS stream ended by the client");
                    break;
                }
            },
            changed = merged.changed(), if conn.is_some() => {
                if changed.is_err() {
                    break;
                }
                match conn.as_mut() {
                    Some(c) => c.refresh(),
                    None => Vec::new(),
                }
            },
            changed = rootca.changed(), if conn.is_some() => {
                if changed.is_err() {
                    break;
                }
                match conn.as_mut() {
                    Some(c) if c.types[TypeKind::Secret.index()].requested => {
                        c.respond(TypeKind::Secret, false).into_iter().collect()
                    }
                    _ => Vec::new(),
                }
            },
            _ = stopping.changed() => break,
            _ = tx.closed() => break,
        };
        for o in outs {
            if let Some(m) = wrap(o) {
                if tx.send(Box::new(m)).await.is_err() {
                    break;
                }
            }
        }
    }
    if let Some(c) = conn {
        shared.forget(c.record_id);
    }
}

/// A string field of the node's metadata.
fn meta_str<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    use envoy_types::pb::google::protobuf::value::Kind;
    match node.metadata.as_ref()?.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s),
        _ => None,
    }
}

/// Node metadata `meshwork.certs_dir` (an Envoy sidecar reading its
/// certificates from SDS files): the translator then emits file-based SDS.
fn certs_dir_of(node: &Node) -> Option<String> {
    meta_str(node, api::mtls::CERTS_DIR_METADATA)
        .filter(|dir| !dir.is_empty())
        .map(str::to_owned)
}

/// A proxy that presented its SVID registers only a workload of its own
/// identity: in its namespace, of a Service that runs as its service
/// account (checked when the Service is known; a registration for a Service
/// not applied yet waits aside, and is checked when its stream reconnects).
/// Without this, any workload holding a certificate could make itself an
/// endpoint of another Service (its callers would then refuse it, since
/// they check the server's SPIFFE id, but the real instances would lose
/// traffic) or announce another node's state.
fn may_register(
    shared: &Shared,
    id: &SpiffeId,
    w: &api::resources::Workload,
) -> Result<(), Status> {
    let ns = &w.metadata.namespace;
    if ns != id.namespace() {
        return Err(Status::permission_denied(format!(
            "this proxy's certificate is {id}, which may not register a workload in namespace {ns:?}: a workload registers in its own namespace (--namespace {})",
            id.namespace()
        )));
    }
    let merged = shared.merged.borrow();
    if let Some(svc) = merged.mesh.service(ns, &w.spec.service) {
        let runs_as = svc.value.service_account();
        if runs_as != id.service_account() {
            return Err(Status::permission_denied(format!(
                "Service {ns}/{} runs as service account {runs_as:?}, but this proxy's certificate is {id}: join with a token for service account {runs_as:?} (`meshwork token create --namespace {ns} --service-account {runs_as}`), or register under the Service of this identity",
                w.spec.service
            )));
        }
    }
    Ok(())
}

/// The node's metadata `state` (what a sidecar says of its workload).
fn state_of(node: &Node) -> Option<String> {
    meta_str(node, "state").map(str::to_owned)
}

/// Node metadata `meshwork.capture: true` (`meshwork proxy --capture`):
/// the translator emits the transparent-capture listeners.
fn capture_of(node: &Node) -> bool {
    use envoy_types::pb::google::protobuf::value::Kind;
    node.metadata
        .as_ref()
        .and_then(|m| m.fields.get(api::CAPTURE_METADATA))
        .is_some_and(|v| matches!(v.kind, Some(Kind::BoolValue(true))))
}

/// Whether a receive error is the client's message (undecodable, too
/// large) rather than the client going away.
fn malformed(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
    ) || (status.code() == tonic::Code::Internal && status.message().contains("decode"))
}

fn handle(
    shared: &Arc<Shared>,
    mode: Mode,
    conn: &mut Option<Conn>,
    req: In,
    peer: Option<&SpiffeId>,
) -> Result<Vec<Out>, Status> {
    if req.type_url.is_empty() {
        return Err(Status::invalid_argument(format!(
            "type_url is required on every ADS request (served: {})",
            TypeKind::served()
        )));
    }
    let Some(kind) = TypeKind::from_url(&req.type_url) else {
        return Err(Status::invalid_argument(format!(
            "unknown type URL {:?}: this server serves {}",
            req.type_url,
            TypeKind::served()
        )));
    };
    let c = match conn {
        Some(c) => {
            if let Some(node) = &req.node {
                c.renode(node)?;
            }
            c
        }
        None => conn.insert(Conn::open(shared, mode, req.node.as_ref(), peer)?),
    };
    Ok(match mode {
        Mode::Sotw => c.sotw_request(kind, req),
        Mode::Delta => c.delta_request(kind, req),
    })
}

impl Conn {
    fn open(
        shared: &Arc<Shared>,
        mode: Mode,
        node: Option<&Node>,
        peer: Option<&SpiffeId>,
    ) -> Result<Conn, Status> {
        let Some(node) = node.filter(|n| !n.id.is_empty()) else {
            return Err(Status::invalid_argument(
                "the first request of an ADS stream must carry node.id",
            ));
        };
        let info = NodeInfo::from_node(node)
            .map_err(|e| Status::invalid_argument(format!("cannot register the workload: {e}")))?;
        if let (Some(id), Some(w)) = (peer, &info.workload) {
            may_register(shared, id, w)?;
        }
        let registration = shared.registry.register(&info);
        let defaults = ProxyContext::default();
        let ctx = ProxyContext {
            outbound_addr: info.outbound_addr.unwrap_or(defaults.outbound_addr),
            inbound_addr: info.inbound_addr.unwrap_or(defaults.inbound_addr),
            workload: info.workload_key(),
            detect_timeout: defaults.detect_timeout,
            certs_dir: certs_dir_of(node),
            capture: capture_of(node),
        };
        let record = ProxyRecord {
            id: info.id.clone(),
            cluster: info.cluster.clone(),
            service: info
                .workload
                .as_ref()
                .map(|w| format!("{}.{}", w.spec.service, w.metadata.namespace)),
            workload: info
                .workload
                .as_ref()
                .map(|w| format!("{}/{}", w.metadata.namespace, w.metadata.name)),
            address: info.workload.as_ref().map(|w| w.spec.address.to_string()),
            connected_at: SystemTime::now(),
            protocol: match mode {
                Mode::Sotw => "sotw",
                Mode::Delta => "delta",
            },
            proxyless: false,
            types: BTreeMap::new(),
        };
        let (record_id, record) = shared.remember(record);
        tracing::info!(node = %info.id, ?mode, "xDS stream opened");
        let scope = info.upstreams.clone();
        let key = super::snapshot_key(&ctx, scope.as_ref());
        Ok(Conn {
            snapshot: shared.snapshot(&key, &ctx, scope.as_ref()),
            key,
            scope,
            shared: shared.clone(),
            mode,
            ctx,
            record_id,
            record,
            types: Default::default(),
            proxyless: false,
            nonce: 0,
            state: state_of(node),
            _registration: registration,
        })
    }

    /// A later request carrying the node again: if its workload state
    /// changed (a sidecar announcing `draining`, or `serving` once its
    /// application accepts), the registration follows. Envoy sends the node
    /// on every request; only the `state` field is compared, so that costs
    /// a map lookup.
    fn renode(&mut self, node: &Node) -> Result<(), Status> {
        let state = state_of(node);
        if state == self.state || self._registration.is_none() {
            return Ok(());
        }
        let info = NodeInfo::from_node(node)
            .map_err(|e| Status::invalid_argument(format!("cannot update the workload: {e}")))?;
        if info.id != self.record().id {
            return Err(Status::invalid_argument(
                "node.id changed within a stream: open a new stream to be another node",
            ));
        }
        tracing::info!(node = %info.id, state = state.as_deref().unwrap_or("serving"), "workload state announced");
        if let Some(r) = &self._registration {
            r.update(&info);
        }
        self.state = state;
        Ok(())
    }

    fn record(&self) -> MutexGuard<'_, ProxyRecord> {
        // Records are plain data updated field by field: a poisoned lock
        // still holds a usable record.
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an ACK or NACK if `req` answers the last response of `kind`.
    /// Returns false for a stale nonce.
    fn ack(&mut self, kind: TypeKind, req: &In) -> bool {
        let ts = &self.types[kind.index()];
        if req.nonce.is_empty() {
            return true;
        }
        if req.nonce != ts.last_nonce {
            return false;
        }
        let mut rec = self.record();
        let node = rec.id.clone();
        let t = rec.types.entry(kind).or_default();
        match &req.error {
            Some(e) => {
                tracing::warn!(node = %node, r#type = kind.as_str(), reason = %e.message, "config NACKed");
                t.last_nack = Some(Nack {
                    version: t.sent_version.clone(),
                    nonce: req.nonce.clone(),
                    reason: e.message.clone(),
                    at: SystemTime::now(),
                });
                // A SotW NACK carries the version the client still runs.
                if self.mode == Mode::Sotw && !req.version.is_empty() {
                    t.acked_version = Some(req.version.clone());
                }
            }
            None => {
                t.acked_version = Some(match self.mode {
                    Mode::Sotw => req.version.clone(),
                    Mode::Delta => t.sent_version.clone(),
                });
            }
        }
        true
    }

    fn sotw_request(&mut self, kind: TypeKind, req: In) -> Vec<Out> {
        if !self.ack(kind, &req) {
            return Vec::new();
        }
        let mut wildcard = false;
        let mut names = BTreeSet::new();
        for n in req.names {
            if n == "*" {
                wildcard = true;
            } else {
                names.insert(n);
            }
        }
        if names.is_empty() && kind.wildcard_by_default() {
            wildcard = true;
        }
        let ts = &mut self.types[kind.index()];
        let changed = !ts.requested || ts.wildcard != wildcard || *ts.names != names;
        ts.requested = true;
        ts.wildcard = wildcard;
        if changed {
            ts.names = self.snapshot.intern(kind, names, self.proxyless);
        }
        self.note_proxyless(kind);
        if changed {
            self.respond(kind, true).into_iter().collect()
        } else {
            Vec::new()
        }
    }

    fn delta_request(&mut self, kind: TypeKind, req: In) -> Vec<Out> {
        self.ack(kind, &req);
        let ts = &mut self.types[kind.index()];
        let first = !ts.requested;
        if first {
            ts.requested = true;
            if req.subscribe.is_empty() && kind.wildcard_by_default() {
                ts.wildcard = true;
            }
        }
        let changed = first || !req.subscribe.is_empty() || !req.unsubscribe.is_empty();
        for n in req.subscribe {
            if n == "*" {
                ts.wildcard = true;
            } else {
                Arc::make_mut(&mut ts.names).insert(n);
            }
        }
        let mut dropped = Vec::new();
        for n in req.unsubscribe {
            if n == "*" {
                ts.wildcard = false;
            } else {
                if ts.names.contains(&n) {
                    Arc::make_mut(&mut ts.names).remove(&n);
                }
                dropped.push(n);
            }
        }
        {
            let mut rec = self.record();
            let t = rec.types.entry(kind).or_default();
            if first {
                for (n, v) in req.initial_versions {
                    t.resources.insert(n, Arc::from(v.as_str()));
                }
            }
            for n in dropped {
                t.resources.remove(&n);
            }
        }
        self.note_proxyless(kind);
        if changed {
            self.respond(kind, first).into_iter().collect()
        } else {
            Vec::new()
        }
    }

    fn note_proxyless(&mut self, kind: TypeKind) {
        let ts = &self.types[kind.index()];
        if kind == TypeKind::Listener
            && !self.proxyless
            && ts
                .names
                .iter()
                .any(|n| self.snapshot.is_api_listener_name(n))
        {
            self.proxyless = true;
            self.record().proxyless = true;
        }
    }

    /// A new merged mesh: rebuild the snapshot and push what changed.
    fn refresh(&mut self) -> Vec<Out> {
        self.snapshot = self
            .shared
            .snapshot(&self.key, &self.ctx, self.scope.as_ref());
        let mut outs = Vec::new();
        for k in TypeKind::ALL {
            if self.types[k.index()].requested {
                outs.extend(self.respond(k, false));
            }
        }
        outs
    }

    /// What the subscription of `kind` selects in the current snapshot
    /// (Secrets: in the server's global secrets).
    fn view(&self, kind: TypeKind) -> Arc<View> {
        let ts = &self.types[kind.index()];
        if kind == TypeKind::Secret {
            let mut view = View::new();
            if let Some(root) = self.shared.rootca.borrow().as_ref() {
                if ts.wildcard || ts.names.contains(crate::ca::ROOTCA) {
                    view.insert(crate::ca::ROOTCA.to_string(), root.clone());
                }
            }
            return Arc::new(view);
        }
        self.snapshot
            .view(kind, ts.wildcard, &ts.names, self.proxyless)
    }

    /// The response for `kind` if it tells the client something new (or
    /// `force`: the client is waiting for a first answer).
    fn respond(&mut self, kind: TypeKind, force: bool) -> Option<Out> {
        let view = self.view(kind);
        let version = match kind {
            // The bundle's own version, so that "every stream ACKed this
            // bundle" can be checked (root rotation).
            TypeKind::Secret => view
                .get(crate::ca::ROOTCA)
                .map(|v| v.version.to_string())
                .unwrap_or_default(),
            _ => self.snapshot.version.to_string(),
        };
        let mut rec = self.record.lock().unwrap_or_else(|p| p.into_inner());
        let t: &mut TypeRecord = rec.types.entry(kind).or_default();
        let out = match self.mode {
            Mode::Sotw => {
                let same = match &t.resources {
                    Held::View(held) if Arc::ptr_eq(held, &view) => true,
                    held => {
                        held.len() == view.len()
                            && view
                                .iter()
                                .all(|(n, v)| held.get(n).is_some_and(|h| *h == v.version))
                    }
                };
                if same && !force {
                    return None;
                }
                self.nonce += 1;
                let nonce = self.nonce.to_string();
                t.resources = Held::View(view.clone());
                t.sent_version = version.clone();
                t.sent_nonce = nonce.clone();
                Out::Sotw(DiscoveryResponse {
                    version_info: version,
                    resources: view.values().map(Versioned::any).collect(),
                    type_url: kind.url(),
                    nonce,
                    ..Default::default()
                })
            }
            Mode::Delta => {
                if !force && matches!(&t.resources, Held::View(h) if Arc::ptr_eq(h, &view)) {
                    return None;
                }
                let changed: Vec<(&String, &Versioned)> = view
                    .iter()
                    .filter(|(n, v)| t.resources.get(n) != Some(&v.version))
                    .collect();
                let removed: Vec<String> = t
                    .resources
                    .iter()
                    .map(|(n, _)| n)
                    .filter(|n| !view.contains_key(*n))
                    .cloned()
                    .collect();
                if changed.is_empty() && removed.is_empty() && !force {
                    return None;
                }
                self.nonce += 1;
                let nonce = self.nonce.to_string();
                let resources = changed
                    .iter()
                    .map(|(n, v)| DeltaResource {
                        name: (*n).clone(),
                        version: v.version.to_string(),
                        resource: Some(v.any()),
                        ..Default::default()
                    })
                    .collect();
                // The client now holds exactly the view: every entry it
                // lacked was sent, everything else it had was removed.
                t.resources = Held::View(view.clone());
                t.sent_version = version.clone();
                t.sent_nonce = nonce.clone();
                Out::Delta(DeltaDiscoveryResponse {
                    system_version_info: version,
                    resources,
                    type_url: kind.url(),
                    removed_resources: removed,
                    nonce,
                    ..Default::default()
                })
            }
        };
        drop(rec);
        self.types[kind.index()].last_nonce = match &out {
            Out::Sotw(r) => r.nonce.clone(),
            Out::Delta(r) => r.nonce.clone(),
        };
        Some(out)
    }
}

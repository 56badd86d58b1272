//! The proxy's xDS client: one ADS stream (state of the world) to a control
//! plane, resources applied as they arrive, each response ACKed or NACKed.
//!
//! Contract: the client never holds config itself. Every response is handed
//! to the app (`updates` channel) as a [`crate::config::xds::Update`]; the app
//! answers with the resource names the new snapshot needs (RouteConfigurations
//! its listeners name, ClusterLoadAssignments its clusters name), or with the
//! reason it refused the update, which goes back as a NACK (`error_detail`)
//! while the last good config stays active. When the stream breaks the client
//! reconnects with jittered exponential backoff, trying the listed control
//! planes in turn; the proxy keeps serving meanwhile.
//!
//! With a workload identity ([`ClientOptions::identity`]) the stream runs
//! over TLS ([`crate::identity::ControlConnector`]: the control plane is
//! verified against the trust bundle, this proxy presents its SVID) and
//! also subscribes to the `ROOTCA` [`Secret`]: its PEM goes to
//! [`crate::identity::Manager::on_bundle`], ACKed when installed, NACKed
//! with the reason (old bundle kept) when unparseable. Without one, the
//! stream is plaintext, as to a control plane run with `--plaintext-xds`.
//!
//! The workload's state ([`WorkloadState`], node metadata `state`) is part
//! of the node: it goes with the first request of every stream, and when it
//! changes (the admin `POST /healthcheck/fail` or `/ok`) the client sends
//! the node again at once, in a request whose nonce answers no response (so
//! a server ignores it as a request, per the xDS protocol, and reads only the
//! node). meshwork's control plane then takes a `starting` workload out of
//! its Service's endpoints and sends a `draining` one as DRAINING, so callers
//! stop picking it before it stops accepting.
//!
//! Non-goals: delta xDS (the server speaks it; this client uses SotW, which
//! is simpler and just as correct at a sidecar's scale), SDS for other
//! secrets (the proxy's own certificate never leaves it; `default` resolves
//! locally).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{value::Kind, Any, Value};
use envoy_types::pb::google::rpc::Status;
use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::xds::Update;
use crate::drain;

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The secret holding the trust bundle (Istio's name).
pub const ROOTCA: &str = "ROOTCA";

/// Nonce of the requests that only carry a new node: never issued by a
/// server, so no response is acknowledged by them.
const NODE_ONLY_NONCE: &str = "meshwork-node-update";

/// What the sidecar says about the workload it fronts (node metadata
/// `state`), so the control plane routes to it only when it should.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkloadState {
    /// The application is not accepting yet: not an endpoint.
    Starting,
    /// In its Service's endpoints.
    #[default]
    Serving,
    /// Leaving: callers stop picking it (EDS `DRAINING`).
    Draining,
}

impl WorkloadState {
    pub const ALL: [WorkloadState; 3] = [Self::Starting, Self::Serving, Self::Draining];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Serving => "serving",
            Self::Draining => "draining",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.as_str() == s)
    }

    /// The state a node's metadata announces (`state`; absent: serving).
    pub fn of_node(node: &Node) -> WorkloadState {
        node.metadata
            .as_ref()
            .and_then(|m| m.fields.get(STATE_FIELD))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => WorkloadState::parse(s),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// `node` announcing this state.
    pub fn on_node(self, node: &Node) -> Node {
        let mut node = node.clone();
        node.metadata
            .get_or_insert_with(Default::default)
            .fields
            .insert(
                STATE_FIELD.to_owned(),
                Value {
                    kind: Some(Kind::StringValue(self.as_str().to_owned())),
                },
            );
        node
    }
}

impl std::fmt::Display for WorkloadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The node metadata field of [`WorkloadState`].
pub const STATE_FIELD: &str = "state";

/// What the app answers for an update.
pub type Verdict = Result<Needs, String>;

/// Names of the resources the active config refers to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needs {
    pub routes: BTreeSet<String>,
    pub endpoints: BTreeSet<String>,
}

/// One update for the app to apply, with the channel for its verdict.
pub type Request = (Update, oneshot::Sender<Verdict>);

/// How to reach the control plane and who this proxy is.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `http://host:port` of each control-plane replica, tried in turn.
    pub servers: Vec<String>,
    pub node: Node,
    pub connect_timeout: Duration,
    pub max_backoff: Duration,
    /// This proxy's identity: xDS over TLS presenting its certificate, and
    /// `ROOTCA` followed. `None`: plaintext, no bundle.
    pub identity: Option<Arc<crate::identity::Manager>>,
}

/// Why one stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("stream failed: {0}")]
    Status(#[from] tonic::Status),
    #[error("the control plane closed the stream")]
    Closed,
    #[error("the proxy stopped taking updates")]
    AppGone,
}

/// Runs until `stop` is signaled: connect, stream, reconnect. `workload`
/// is the state the node announces (see the module docs).
pub async fn run(
    opts: ClientOptions,
    mut workload: watch::Receiver<WorkloadState>,
    updates: mpsc::Sender<Request>,
    stop: drain::Watch,
) {
    let mut backoff = Duration::from_millis(100);
    let mut state = State::default();
    for attempt in 0usize.. {
        if opts.servers.is_empty() {
            tracing::error!("no control plane address given");
            return;
        }
        let server = &opts.servers[attempt % opts.servers.len()];
        let outcome = tokio::select! {
            () = stop.signaled() => return,
            r = stream(&opts, server, &updates, &mut state, &mut workload) => r,
        };
        match outcome {
            Err(StreamEnd::AppGone) => return,
            Err(e) => {
                tracing::warn!(%server, error = %chain(&e), retry_in = ?backoff, "control plane unreachable; keeping the last good config");
            }
            Ok(()) => {}
        }
        // Jitter: up to a quarter more, so proxies do not reconnect in step.
        let jitter = backoff.mul_f64(fastrand::f64() * 0.25);
        tokio::select! {
            () = stop.signaled() => return,
            () = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(opts.max_backoff);
        if state.connected_once {
            // A stream that worked resets the backoff for the next failure.
            backoff = Duration::from_millis(100);
            state.connected_once = false;
        }
    }
}

/// `e` and its sources, `: `-separated (tonic's transport error alone
/// says only "transport error"; the cause, e.g. a certificate that does
/// not verify, is further down).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

/// What survives a reconnect: the last accepted versions (so the server can
/// skip unchanged resources) and the names the config needs.
#[derive(Debug, Default)]
struct State {
    versions: std::collections::HashMap<&'static str, String>,
    needs: Needs,
    connected_once: bool,
}

async fn stream(
    opts: &ClientOptions,
    server: &str,
    updates: &mpsc::Sender<Request>,
    state: &mut State,
    workload: &mut watch::Receiver<WorkloadState>,
) -> Result<(), StreamEnd> {
    let uri = match &opts.identity {
        Some(_) => crate::identity::client::tls_uri(server),
        None => server.to_owned(),
    };
    let endpoint = tonic::transport::Endpoint::from_shared(uri)?
        .connect_timeout(opts.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30));
    let channel = match &opts.identity {
        // The manager is built by bootstrap, which returns only once a
        // certificate is installed: the first handshake presents it.
        Some(identity) => {
            endpoint
                .connect_with_connector(identity.connector())
                .await?
        }
        None => endpoint.connect().await?,
    };
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(16);
    let mut responses = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!(%server, tls = opts.identity.is_some(), "connected to the control plane");
    state.connected_once = true;

    // The first request carries the state of now; later changes follow.
    let node = workload.borrow_and_update().on_node(&opts.node);
    let request = |type_url: &'static str,
                   names: Vec<String>,
                   version: String,
                   nonce: String,
                   error: Option<Status>,
                   first: bool| DiscoveryRequest {
        version_info: version,
        node: first.then(|| node.clone()),
        resource_names: names,
        type_url: type_url.to_owned(),
        response_nonce: nonce,
        error_detail: error,
        ..Default::default()
    };
    // Wildcard subscriptions first; routes and endpoints once known.
    let send = |r: DiscoveryRequest| {
        let tx = tx.clone();
        async move { tx.send(r).await.map_err(|_| StreamEnd::Closed) }
    };
    let version = |s: &State, t: &'static str| s.versions.get(t).cloned().unwrap_or_default();
    send(request(
        CLUSTER,
        vec![],
        version(state, CLUSTER),
        String::new(),
        None,
        true,
    ))
    .await?;
    send(request(
        LISTENER,
        vec![],
        version(state, LISTENER),
        String::new(),
        None,
        false,
    ))
    .await?;
    if !state.needs.endpoints.is_empty() {
        let names = state.needs.endpoints.iter().cloned().collect();
        send(request(
            ENDPOINT,
            names,
            version(state, ENDPOINT),
            String::new(),
            None,
            false,
        ))
        .await?;
    }
    if !state.needs.routes.is_empty() {
        let names = state.needs.routes.iter().cloned().collect();
        send(request(
            ROUTE,
            names,
            version(state, ROUTE),
            String::new(),
            None,
            false,
        ))
        .await?;
    }
    if opts.identity.is_some() {
        send(request(
            SECRET,
            vec![ROOTCA.to_owned()],
            version(state, SECRET),
            String::new(),
            None,
            false,
        ))
        .await?;
    }

    loop {
        let resp = tokio::select! {
            msg = responses.message() => match msg? {
                Some(resp) => resp,
                None => break,
            },
            // Err: the proxy is going away; the branch is then disabled.
            Ok(()) = workload.changed() => {
                let now = *workload.borrow_and_update();
                tracing::info!(state = %now, "announcing the workload's state to the control plane");
                send(DiscoveryRequest {
                    node: Some(now.on_node(&opts.node)),
                    type_url: CLUSTER.to_owned(),
                    version_info: version(state, CLUSTER),
                    response_nonce: NODE_ONLY_NONCE.to_owned(),
                    ..Default::default()
                })
                .await?;
                continue;
            }
        };
        if resp.type_url == SECRET {
            if let Some(identity) = &opts.identity {
                let verdict = root_bundle(&resp).and_then(|pem| identity.on_bundle(&pem));
                let error = match verdict {
                    Ok(()) => {
                        tracing::debug!(version = %resp.version_info, "trust bundle accepted");
                        state.versions.insert(SECRET, resp.version_info.clone());
                        None
                    }
                    Err(reason) => {
                        tracing::error!(version = %resp.version_info, %reason, "trust bundle refused (NACK); keeping the current one");
                        Some(Status {
                            code: 3,
                            message: reason,
                            details: vec![],
                        })
                    }
                };
                let version = version(state, SECRET);
                send(request(
                    SECRET,
                    vec![ROOTCA.to_owned()],
                    version,
                    resp.nonce.clone(),
                    error,
                    false,
                ))
                .await?;
                continue;
            }
        }
        let Some(type_url) = known_type(&resp.type_url) else {
            // Not something we asked for: NACK it by name, keep streaming.
            let msg = format!("unsupported resource type {:?}", resp.type_url);
            tracing::warn!("{msg}");
            let r = DiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail: Some(Status {
                    code: 3,
                    message: msg,
                    details: vec![],
                }),
                ..Default::default()
            };
            send(r).await?;
            continue;
        };
        let verdict = match decode(type_url, &resp) {
            Ok(update) => {
                let (reply, verdict) = oneshot::channel();
                updates
                    .send((update, reply))
                    .await
                    .map_err(|_| StreamEnd::AppGone)?;
                verdict.await.map_err(|_| StreamEnd::AppGone)?
            }
            Err(e) => Err(e),
        };
        let names_for = |t: &'static str, needs: &Needs| -> Vec<String> {
            match t {
                ROUTE => needs.routes.iter().cloned().collect(),
                ENDPOINT => needs.endpoints.iter().cloned().collect(),
                _ => vec![],
            }
        };
        match verdict {
            Ok(needs) => {
                tracing::debug!(type_url, version = %resp.version_info, "accepted");
                state.versions.insert(type_url, resp.version_info.clone());
                let old = std::mem::replace(&mut state.needs, needs);
                send(request(
                    type_url,
                    names_for(type_url, &state.needs),
                    resp.version_info.clone(),
                    resp.nonce.clone(),
                    None,
                    false,
                ))
                .await?;
                // Subscribe to what the new config refers to.
                if old.routes != state.needs.routes && type_url != ROUTE {
                    send(request(
                        ROUTE,
                        names_for(ROUTE, &state.needs),
                        version(state, ROUTE),
                        String::new(),
                        None,
                        false,
                    ))
                    .await?;
                }
                if old.endpoints != state.needs.endpoints && type_url != ENDPOINT {
                    send(request(
                        ENDPOINT,
                        names_for(ENDPOINT, &state.needs),
                        version(state, ENDPOINT),
                        String::new(),
                        None,
                        false,
                    ))
                    .await?;
                }
            }
            Err(reason) => {
                tracing::error!(type_url, version = %resp.version_info, %reason, "config refused (NACK); keeping the last good one");
                let status = Status {
                    code: 3,
                    message: reason,
                    details: vec![],
                };
                send(request(
                    type_url,
                    names_for(type_url, &state.needs),
                    version(state, type_url),
                    resp.nonce.clone(),
                    Some(status),
                    false,
                ))
                .await?;
            }
        }
    }
    Err(StreamEnd::Closed)
}

/// The PEM of the `ROOTCA` secret in a Secret response:
/// `validation_context.trusted_ca` inline (string or bytes).
fn root_bundle(resp: &DiscoveryResponse) -> Result<String, String> {
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    let mut found = None;
    for (i, any) in resp.resources.iter().enumerate() {
        if any.type_url != SECRET {
            return Err(format!(
                "resources[{i}]: type {:?} in a {SECRET} response",
                any.type_url
            ));
        }
        let s = Secret::decode(any.value.as_slice())
            .map_err(|e| format!("resources[{i}]: cannot decode: {e}"))?;
        if s.name != ROOTCA {
            continue;
        }
        let Some(secret::Type::ValidationContext(vc)) = s.r#type else {
            return Err(format!(
                "resources[{i}] ({ROOTCA}): expected a validation_context"
            ));
        };
        let pem = match vc.trusted_ca.and_then(|ca| ca.specifier) {
            Some(Specifier::InlineString(s)) => s,
            Some(Specifier::InlineBytes(b)) => String::from_utf8(b).map_err(|_| {
                format!("resources[{i}] ({ROOTCA}): validation_context.trusted_ca.inline_bytes is not PEM text")
            })?,
            _ => {
                return Err(format!(
                    "resources[{i}] ({ROOTCA}): validation_context.trusted_ca must be inline_string (PEM)"
                ))
            }
        };
        found = Some(pem);
    }
    found.ok_or_else(|| format!("no secret named {ROOTCA} in the response"))
}

fn known_type(url: &str) -> Option<&'static str> {
    [LISTENER, ROUTE, CLUSTER, ENDPOINT]
        .into_iter()
        .find(|t| *t == url)
}

/// Decodes a response into an update of its type.
fn decode(type_url: &'static str, resp: &DiscoveryResponse) -> Result<Update, String> {
    fn all<T: Message + Default>(type_url: &str, resources: &[Any]) -> Result<Vec<T>, String> {
        resources
            .iter()
            .enumerate()
            .map(|(i, any)| {
                if any.type_url != type_url {
                    return Err(format!(
                        "resources[{i}]: type {:?} in a {type_url} response",
                        any.type_url
                    ));
                }
                T::decode(any.value.as_slice())
                    .map_err(|e| format!("resources[{i}]: cannot decode: {e}"))
            })
            .collect()
    }
    let v = resp.version_info.clone();
    let mut update = Update::default();
    match type_url {
        LISTENER => update.listeners = Some((v, all::<Listener>(type_url, &resp.resources)?)),
        ROUTE => update.routes = Some((v, all::<RouteConfiguration>(type_url, &resp.resources)?)),
        CLUSTER => update.clusters = Some((v, all::<Cluster>(type_url, &resp.resources)?)),
        _ => update.endpoints = Some((v, all::<ClusterLoadAssignment>(type_url, &resp.resources)?)),
    }
    Ok(update)
}

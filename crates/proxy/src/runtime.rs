//! The state requests are served from: the current [`Snapshot`] plus what is
//! derived from it once per update (a balancer per cluster).
//!
//! A new `Runtime` is built for every accepted config and swapped in
//! atomically; requests in flight keep the one they started with. Balancers of
//! clusters that survive an update keep their load statistics.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::balance::Balancer;
use crate::config::model::{
    Cluster, HttpConnectionManager, LoadAssignment, RouteTable, Snapshot, UpstreamTls,
};

/// Everything a request needs, immutable once built.
#[derive(Debug, Default)]
pub struct Runtime {
    pub snapshot: Arc<Snapshot>,
    clusters: HashMap<String, Arc<ClusterState>>,
}

/// A cluster and its live balancer.
#[derive(Debug)]
pub struct ClusterState {
    pub config: Arc<Cluster>,
    pub endpoints: Arc<LoadAssignment>,
    pub balancer: Balancer,
    /// Endpoints reached over mTLS (`tlsMode: meshwork`, and the cluster
    /// has `transport_socket_matches`).
    mtls_endpoints: HashSet<SocketAddr>,
}

impl ClusterState {
    /// The mTLS settings for a connection to `addr`, if it takes mTLS.
    pub fn upstream_tls(&self, addr: SocketAddr) -> Option<&Arc<UpstreamTls>> {
        let tls = self.config.tls.as_ref()?;
        self.mtls_endpoints.contains(&addr).then_some(tls)
    }
}

impl Runtime {
    /// Derives the runtime for `snapshot`, reusing balancer state from `previous`.
    pub fn build(snapshot: Arc<Snapshot>, previous: Option<&Runtime>) -> Self {
        let mut clusters = HashMap::with_capacity(snapshot.clusters.len());
        for (name, config) in &snapshot.clusters {
            let endpoints = config
                .static_endpoints
                .clone()
                .or_else(|| snapshot.endpoints.get(&config.eds_name).cloned())
                .unwrap_or_else(|| {
                    Arc::new(LoadAssignment {
                        cluster_name: config.eds_name.clone(),
                        localities: Vec::new(),
                    })
                });
            let balancer = match previous.and_then(|p| p.clusters.get(name)) {
                Some(old) => old.balancer.update(&config.lb, &endpoints),
                None => Balancer::new(&config.lb, &endpoints),
            };
            let mtls_endpoints = if config.tls.is_some() {
                endpoints
                    .endpoints()
                    .filter(|e| e.mtls)
                    .map(|e| e.address)
                    .collect()
            } else {
                HashSet::new()
            };
            clusters.insert(
                name.clone(),
                Arc::new(ClusterState {
                    config: config.clone(),
                    endpoints,
                    balancer,
                    mtls_endpoints,
                }),
            );
        }
        Self { snapshot, clusters }
    }

    pub fn cluster(&self, name: &str) -> Option<&Arc<ClusterState>> {
        self.clusters.get(name)
    }

    /// The route table an HTTP connection manager uses: inline, or by RDS name.
    pub fn route_table<'a>(
        &'a self,
        hcm: &'a HttpConnectionManager,
    ) -> Option<&'a Arc<RouteTable>> {
        hcm.inline_routes
            .as_ref()
            .or_else(|| self.snapshot.routes.get(&hcm.route_config_name))
    }
}

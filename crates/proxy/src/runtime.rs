//! The state requests are served from: the current [`Snapshot`] plus what is
//! derived from it once per update (a balancer per cluster).
//!
//! A new `Runtime` is built for every accepted config and swapped in
//! atomically; requests in flight keep the one they started with. Balancers of
//! clusters that survive an update keep their load statistics; circuit
//! breakers keep their counts (only their limits change). Endpoint health
//! ([`ClusterHealth`]: active checks, outlier ejections, their tasks) is
//! carried over by cluster name too.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::balance::{Balancer, BalancerStatus};
use crate::breaker::{Breaker, BreakerStatus};
use crate::config::model::{
    Cluster, HttpConnectionManager, LoadAssignment, RouteTable, Snapshot, UpstreamTls,
};
use crate::health::{self, ClusterHealth};

/// Everything a request needs, immutable once built.
#[derive(Debug, Default)]
pub struct Runtime {
    pub snapshot: Arc<Snapshot>,
    clusters: HashMap<String, Arc<ClusterState>>,
    /// What health tasks count into and stop on; passed on to every next
    /// runtime.
    health_env: Arc<health::Env>,
}

/// One cluster on the admin `/clusters` page.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterStatus {
    #[serde(flatten)]
    pub balancer: BalancerStatus,
    /// Requests, pending requests, connections and retries in flight, each
    /// with its limit.
    pub circuit_breakers: BreakerStatus,
}

/// A cluster and its live balancer.
#[derive(Debug)]
pub struct ClusterState {
    pub config: Arc<Cluster>,
    pub endpoints: Arc<LoadAssignment>,
    pub balancer: Balancer,
    /// Circuit breaker counts and limits; kept across updates by cluster name.
    pub breaker: Arc<Breaker>,
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
    /// A runtime without config whose successors run health tasks with `env`.
    pub fn empty(health_env: Arc<health::Env>) -> Self {
        Self {
            health_env,
            ..Self::default()
        }
    }

    /// Derives the runtime for `snapshot`, reusing balancer state from `previous`.
    pub fn build(snapshot: Arc<Snapshot>, previous: Option<&Runtime>) -> Self {
        let health_env = previous.map(|p| p.health_env.clone()).unwrap_or_default();
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
            let breaker = match previous.and_then(|p| p.clusters.get(name)) {
                Some(old) => {
                    old.breaker.set_limits(&config.circuit_breakers);
                    old.breaker.clone()
                }
                None => Breaker::new(name, &config.circuit_breakers),
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
            // Health (and endpoint load) lives as long as the cluster name.
            let health = match previous.and_then(|p| p.clusters.get(name)) {
                Some(old) => old.balancer.health().clone(),
                None => ClusterHealth::new(name),
            };
            let tls_of = |addr: SocketAddr| {
                config
                    .tls
                    .clone()
                    .filter(|_| mtls_endpoints.contains(&addr))
            };
            health.configure(config, &endpoints, &tls_of, &health_env);
            let balancer = Balancer::for_cluster(config, &endpoints, &health);
            clusters.insert(
                name.clone(),
                Arc::new(ClusterState {
                    config: config.clone(),
                    endpoints,
                    balancer,
                    breaker,
                    mtls_endpoints,
                }),
            );
        }
        Self {
            snapshot,
            clusters,
            health_env,
        }
    }

    /// Every cluster's balancer state (priorities, endpoint load and
    /// health) and circuit breaker counts, by cluster name, for the admin
    /// `/clusters` page.
    pub fn clusters_status(&self) -> std::collections::BTreeMap<&str, ClusterStatus> {
        self.clusters
            .iter()
            .map(|(name, c)| {
                (
                    name.as_str(),
                    ClusterStatus {
                        balancer: c.balancer.status(),
                        circuit_breakers: c.breaker.status(),
                    },
                )
            })
            .collect()
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

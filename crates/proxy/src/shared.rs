//! State shared by every listener and connection of one proxy.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::accesslog::{AccessLog, AccessLogEntry};
pub use crate::metrics::Direction;
use crate::metrics::{HttpLabels, HttpSeries, Metrics, TcpLabels, TcpSeries};
use crate::runtime::Runtime;
use crate::upstream::Pools;

/// Owned by the app, borrowed by every connection through an `Arc`.
#[derive(Debug)]
pub struct Shared {
    runtime: ArcSwap<Runtime>,
    pub pools: Arc<Pools>,
    pub metrics: Arc<Metrics>,
    access_log: AccessLog,
    /// The mesh service (`name.namespace`) of the workload this proxy fronts.
    local_service: Option<String>,
}

impl Shared {
    pub fn new(
        metrics: Arc<Metrics>,
        access_log: AccessLog,
        local_service: Option<String>,
    ) -> Arc<Self> {
        Arc::new(Self {
            runtime: ArcSwap::from_pointee(Runtime::default()),
            pools: Pools::new(),
            metrics,
            access_log,
            local_service,
        })
    }

    /// The runtime requests start from now.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    pub fn set_runtime(&self, rt: Arc<Runtime>) {
        self.runtime.store(rt);
    }

    /// Who sent traffic in this direction: the local service for outbound;
    /// for inbound, not known until mTLS identifies peers.
    pub fn source_service(&self, direction: Direction) -> &str {
        match direction {
            Direction::Outbound => self.local_service.as_deref().unwrap_or("unknown"),
            Direction::Inbound => "unknown",
        }
    }

    /// The metric series of one (direction, destination, route).
    pub fn http_series(
        &self,
        direction: Direction,
        destination: &str,
        route: &str,
    ) -> Arc<HttpSeries> {
        self.metrics.http(&HttpLabels {
            direction,
            source_service: self.source_service(direction).to_owned(),
            destination_service: destination.to_owned(),
            route: route.to_owned(),
        })
    }

    pub fn tcp_series(&self, direction: Direction, destination: &str) -> Arc<TcpSeries> {
        self.metrics.tcp(&TcpLabels {
            direction,
            source_service: self.source_service(direction).to_owned(),
            destination_service: destination.to_owned(),
        })
    }

    pub fn access_log_enabled(&self) -> bool {
        self.access_log.enabled()
    }

    pub fn access_log(&self, entry: AccessLogEntry) {
        self.access_log.log(entry);
    }

    /// Writes out buffered access log lines (shutdown).
    pub async fn flush_access_log(&self) {
        self.access_log.flush().await;
    }
}

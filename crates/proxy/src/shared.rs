//! State shared by every listener and connection of one proxy.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::accesslog::{AccessLog, AccessLogEntry};
use crate::authz::Decision;
pub use crate::metrics::Direction;
use crate::metrics::{
    AuthzLabels, AuthzOutcome, HttpLabels, HttpSeries, Metrics, TcpLabels, TcpSeries,
};
use crate::runtime::Runtime;
use crate::upstream::Pools;

/// Owned by the app, borrowed by every connection through an `Arc`.
#[derive(Debug)]
pub struct Shared {
    runtime: ArcSwap<Runtime>,
    pub pools: Arc<Pools>,
    pub metrics: Arc<Metrics>,
    access_log: AccessLog,
    /// The mesh service (`name.namespace`) of the workload this proxy
    /// fronts, `unknown` without one; follows config reloads.
    local_service: ArcSwap<String>,
    unknown: Arc<String>,
    /// Local rate limit buckets, kept across config updates.
    pub rate_limits: crate::ratelimit::Registry,
    /// What health checkers and outlier timers count into and stop on.
    health: Arc<crate::health::Env>,
}

impl Shared {
    pub fn new(metrics: Arc<Metrics>, access_log: AccessLog) -> Arc<Self> {
        let unknown = Arc::new("unknown".to_owned());
        let health = crate::health::Env::new(metrics.clone());
        Arc::new(Self {
            runtime: ArcSwap::from_pointee(Runtime::empty(health.clone())),
            pools: Pools::with_metrics(metrics.clone()),
            metrics,
            access_log,
            local_service: ArcSwap::new(unknown.clone()),
            unknown,
            rate_limits: crate::ratelimit::Registry::default(),
            health,
        })
    }

    /// Health checkers and outlier timers stop when `watch` signals.
    pub fn stop_health_tasks_on(&self, watch: crate::drain::Watch) {
        self.health.watch_drain(watch);
    }

    /// Sets the service of the fronted workload (`name.namespace`).
    pub fn set_local_service(&self, service: Option<String>) {
        match service {
            Some(s) if *self.local_service.load_full() != s => {
                self.local_service.store(Arc::new(s))
            }
            Some(_) => {}
            None => self.local_service.store(self.unknown.clone()),
        }
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
    pub fn source_service(&self, direction: Direction) -> Arc<String> {
        match direction {
            Direction::Outbound => self.local_service.load_full(),
            Direction::Inbound => self.unknown.clone(),
        }
    }

    /// The mesh service (`name.namespace`) of the fronted workload, or
    /// `unknown`: the destination of inbound traffic.
    pub fn local_service(&self) -> Arc<String> {
        self.local_service.load_full()
    }

    /// Counts an authorization decision in `meshwork_authz_decisions_total`
    /// (one `allow`/`deny`, plus one `audit_deny` per matching AUDIT policy)
    /// and logs audit matches at debug level.
    pub fn record_authz(&self, direction: Direction, destination: &str, d: &Decision) {
        let outcome = if d.allowed {
            AuthzOutcome::Allow
        } else {
            AuthzOutcome::Deny
        };
        let count = |decision: AuthzOutcome, policy: &str| {
            self.metrics
                .authz(&AuthzLabels {
                    direction,
                    destination_service: destination.to_owned(),
                    decision,
                    policy: policy.to_owned(),
                })
                .inc();
        };
        count(outcome, d.policy.as_deref().unwrap_or(""));
        for policy in &d.audit {
            tracing::debug!(
                %policy,
                destination,
                enforced = outcome.as_str(),
                "authorization audit: this request would be denied"
            );
            count(AuthzOutcome::AuditDeny, policy);
        }
    }

    /// The metric series of one (direction, destination, route, mTLS peer).
    pub fn http_series(
        &self,
        direction: Direction,
        destination: &str,
        route: &str,
        principal: Option<&str>,
    ) -> Arc<HttpSeries> {
        self.metrics.http(&HttpLabels {
            direction,
            source_service: self.source_service(direction).to_string(),
            destination_service: destination.to_owned(),
            route: route.to_owned(),
            source_principal: principal.unwrap_or_default().to_owned(),
        })
    }

    /// The metric series of one (direction, destination, mTLS peer).
    pub fn tcp_series(
        &self,
        direction: Direction,
        destination: &str,
        principal: Option<&str>,
    ) -> Arc<TcpSeries> {
        self.metrics.tcp(&TcpLabels {
            direction,
            source_service: self.source_service(direction).to_string(),
            destination_service: destination.to_owned(),
            source_principal: principal.unwrap_or_default().to_owned(),
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

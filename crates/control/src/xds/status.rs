//! What every connected proxy holds: the records behind `proxy-status` and
//! `proxy-config`.
//!
//! Contract: one [`ProxyRecord`] per open ADS stream, updated by that
//! stream as it sends, and as the proxy ACKs or NACKs; removed when the
//! stream ends. Per type: the version last sent, the version last ACKed,
//! and the last NACK (version, reason) — a later ACK does not erase the
//! last NACK reason, so an operator can still see why a config was refused.
//!
//! Non-goals: history beyond the last NACK; metrics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{json, Value};

use super::snapshot::{TypeKind, View};

/// One stream's view of its proxy.
#[derive(Debug, Clone)]
pub(crate) struct ProxyRecord {
    pub(crate) id: String,
    pub(crate) cluster: String,
    /// `service.namespace` of its registered workload.
    pub(crate) service: Option<String>,
    /// `namespace/name` of its registered workload.
    pub(crate) workload: Option<String>,
    pub(crate) address: Option<String>,
    pub(crate) connected_at: SystemTime,
    /// `sotw` or `delta`.
    pub(crate) protocol: &'static str,
    /// Asked for api_listeners (a proxyless gRPC client).
    pub(crate) proxyless: bool,
    pub(crate) types: BTreeMap<TypeKind, TypeRecord>,
}

/// ACK/NACK state of one type on one stream.
#[derive(Debug, Clone, Default)]
pub(crate) struct TypeRecord {
    pub(crate) sent_version: String,
    pub(crate) sent_nonce: String,
    pub(crate) acked_version: Option<String>,
    pub(crate) last_nack: Option<Nack>,
    /// What the proxy holds (delta) or was last sent (SotW).
    pub(crate) resources: Held,
}

/// The resources a proxy holds, name -> version. Usually exactly a view of
/// a snapshot, shared with every proxy that got the same view (so a
/// thousand proxies holding every cluster cost one map, not a thousand);
/// a map of its own only when the client declared versions itself.
#[derive(Debug, Clone)]
pub(crate) enum Held {
    View(Arc<View>),
    Versions(BTreeMap<String, Arc<str>>),
}

impl Default for Held {
    fn default() -> Self {
        Held::Versions(BTreeMap::new())
    }
}

impl Held {
    pub(crate) fn get(&self, name: &str) -> Option<&Arc<str>> {
        match self {
            Held::View(v) => v.get(name).map(|x| &x.version),
            Held::Versions(m) => m.get(name),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Held::View(v) => v.len(),
            Held::Versions(m) => m.len(),
        }
    }

    /// Every (name, version), by name.
    pub(crate) fn iter(&self) -> Box<dyn Iterator<Item = (&String, &Arc<str>)> + '_> {
        match self {
            Held::View(v) => Box::new(v.iter().map(|(n, x)| (n, &x.version))),
            Held::Versions(m) => Box::new(m.iter()),
        }
    }

    /// Runs `f` on a map of its own (copying the shared view first).
    fn edit(&mut self, f: impl FnOnce(&mut BTreeMap<String, Arc<str>>)) {
        match self {
            Held::Versions(m) => f(m),
            Held::View(v) => {
                let mut m = v
                    .iter()
                    .map(|(n, x)| (n.clone(), x.version.clone()))
                    .collect();
                f(&mut m);
                *self = Held::Versions(m);
            }
        }
    }

    pub(crate) fn insert(&mut self, name: String, version: Arc<str>) {
        self.edit(|m| {
            m.insert(name, version);
        });
    }

    pub(crate) fn remove(&mut self, name: &str) {
        if self.get(name).is_some() {
            self.edit(|m| {
                m.remove(name);
            });
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Nack {
    pub(crate) version: String,
    pub(crate) nonce: String,
    pub(crate) reason: String,
    pub(crate) at: SystemTime,
}

impl ProxyRecord {
    /// The summary `proxy-status` lists.
    pub(crate) fn summary(&self) -> Value {
        let mut types = serde_json::Map::new();
        for (k, t) in &self.types {
            types.insert(
                k.as_str().to_string(),
                json!({
                    "sent_version": t.sent_version,
                    "acked_version": t.acked_version,
                    "in_sync": t.acked_version.as_deref() == Some(t.sent_version.as_str()),
                    "last_nack": t.last_nack.as_ref().map(|n| json!({
                        "version": n.version,
                        "nonce": n.nonce,
                        "reason": n.reason,
                        "at": rfc3339(n.at),
                    })),
                    "resource_count": t.resources.len(),
                }),
            );
        }
        json!({
            "id": self.id,
            "cluster": self.cluster,
            "service": self.service,
            "workload": self.workload,
            "address": self.address,
            "connected_at": rfc3339(self.connected_at),
            "protocol": self.protocol,
            "proxyless": self.proxyless,
            "types": types,
        })
    }

    /// The summary plus, per type, every resource name and version held.
    pub(crate) fn detail(&self) -> Value {
        let mut v = self.summary();
        if let Some(types) = v.get_mut("types").and_then(Value::as_object_mut) {
            for (k, t) in &self.types {
                if let Some(obj) = types.get_mut(k.as_str()).and_then(Value::as_object_mut) {
                    let list: Vec<Value> = t
                        .resources
                        .iter()
                        .map(|(n, ver)| json!({"name": n, "version": &**ver}))
                        .collect();
                    obj.insert("resources".to_string(), Value::Array(list));
                }
            }
        }
        v
    }
}

/// `SystemTime` as an RFC 3339 UTC timestamp (second precision).
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_294_400 + 61);
        assert_eq!(rfc3339(t), "2024-03-01T12:01:01Z");
    }
}

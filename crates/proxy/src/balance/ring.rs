//! Ring hash (consistent hashing, "ketama"), with Envoy's ring construction.
//!
//! Purpose: send requests with the same hash to the same endpoint, and when
//! the endpoint set changes, move only the keys of the endpoints that changed.
//!
//! Contract (Envoy's `RING_HASH` with xxHash):
//! - the ring size is the smallest that gives the lightest endpoint a whole
//!   number of entries at `minimum_ring_size`, capped at `maximum_ring_size`;
//!   each endpoint gets entries in proportion to its weight;
//! - entry `i` of an endpoint is at `xxh64("<address>_<i>")`, the address
//!   written like Envoy writes it (`10.0.0.1:80`, `[::1]:80`);
//! - a hash maps to the first entry at or after it, wrapping to the start.
//!
//! Non-goals: murmur2 hashing, hostname- or metadata-keyed entries. Sizes are
//! clamped to Envoy's limits (at most 8 Mi entries) instead of refused: the
//! config layer is where bad values are rejected.

use std::fmt::Write as _;
use std::net::SocketAddr;

use super::hash::xxh64;

/// Envoy's default `minimum_ring_size`.
pub(crate) const DEFAULT_MIN_RING: u64 = 1024;
/// Envoy's default and largest `maximum_ring_size`.
pub(crate) const MAX_RING: u64 = 8 * 1024 * 1024;

/// The ring as two parallel arrays sorted by hash: the binary search touches
/// only the hashes.
#[derive(Debug)]
pub(super) struct Ring {
    hashes: Box<[u64]>,
    owners: Box<[u32]>,
}

impl Ring {
    /// `endpoints`: (address, weight >= 1), fewer than `u32::MAX`.
    pub(super) fn new(endpoints: &[(SocketAddr, u32)], min_size: u64, max_size: u64) -> Self {
        let max_size = if max_size == 0 {
            MAX_RING
        } else {
            max_size.min(MAX_RING)
        };
        let min_size = if min_size == 0 {
            DEFAULT_MIN_RING
        } else {
            min_size
        }
        .min(max_size);
        let total: f64 = endpoints.iter().map(|&(_, w)| f64::from(w)).sum();
        let lightest = endpoints.iter().map(|&(_, w)| w).min().unwrap_or(1);
        let lightest = f64::from(lightest) / total;
        // Envoy's sizing: scale such that the lightest endpoint gets a whole
        // number of entries; heavier ones may get fractions, which the running
        // sums below turn into whole entries without drift.
        let scale = ((lightest * min_size as f64).ceil() / lightest).min(max_size as f64);

        let mut entries: Vec<(u64, u32)> = Vec::with_capacity(scale.ceil() as usize);
        let mut key = String::new();
        let (mut placed, mut target) = (0.0f64, 0.0f64);
        for (owner, &(address, weight)) in (0u32..).zip(endpoints) {
            target += scale * f64::from(weight) / total;
            key.clear();
            // Writing into a String cannot fail.
            let _ = write!(key, "{address}_");
            let prefix = key.len();
            let mut replica = 0u64;
            while placed < target {
                key.truncate(prefix);
                let _ = write!(key, "{replica}");
                entries.push((xxh64(key.as_bytes(), 0), owner));
                replica += 1;
                placed += 1.0;
            }
        }
        // Ties (two entries with the same hash) go to the lower index, so the
        // ring does not depend on the sort's whims.
        entries.sort_unstable();
        let (hashes, owners) = entries.into_iter().unzip::<_, _, Vec<_>, Vec<_>>();
        Self {
            hashes: hashes.into_boxed_slice(),
            owners: owners.into_boxed_slice(),
        }
    }

    /// The endpoint index owning `hash`, `None` on an empty ring.
    pub(super) fn get(&self, hash: u64) -> Option<usize> {
        let at = self.hashes.partition_point(|&h| h < hash);
        // Past the last entry: wrap around to the first.
        let at = if at == self.owners.len() { 0 } else { at };
        self.owners.get(at).map(|&i| i as usize)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.hashes.len()
    }
}

//! Maglev consistent hashing (Google's Maglev paper, section 3.4), with
//! Envoy's weighted table population.
//!
//! Purpose: like ring hash, keep a hash on one endpoint across requests and
//! move few keys when endpoints change, but with an `O(1)` lookup and a more
//! even spread.
//!
//! Contract (Envoy's `MAGLEV`):
//! - the table has a prime number of slots (`table_size`, default 65537);
//! - endpoint `e` prefers slots `(offset + j * skip) % size` for j = 0, 1, ..,
//!   with `offset = xxh64(address, 0) % size` and
//!   `skip = xxh64(address, 1) % (size - 1) + 1`;
//! - endpoints take turns claiming their next free preferred slot until the
//!   table is full; an endpoint of weight `w` takes a turn in `w / max_weight`
//!   of the rounds, so it ends up with a share of slots close to its weight;
//! - a hash maps to slot `hash % size`.
//!
//! Endpoints take turns in address order, so the table does not depend on the
//! order endpoints arrive in (two proxies given the same set in a different
//! order agree).
//!
//! Non-goals: Envoy's compact (bit-packed) table. A size that is not prime is
//! rounded up to the next prime (a non-prime size could leave an endpoint's
//! preference list unable to reach a free slot), and sizes are clamped to
//! Envoy's bound of 5000011.

use std::net::SocketAddr;

use super::hash::xxh64;

/// Envoy's default table size (prime).
pub(crate) const DEFAULT_TABLE_SIZE: u64 = 65537;
/// Envoy's largest table size (prime).
pub(crate) const MAX_TABLE_SIZE: u64 = 5_000_011;

const EMPTY: u32 = u32::MAX;

#[derive(Debug)]
pub(super) struct Maglev {
    /// Endpoint index per slot.
    table: Box<[u32]>,
}

struct Builder {
    offset: u64,
    skip: u64,
    /// Preference list position.
    next: u64,
    weight: u64,
    /// Rounds owed, in units of the heaviest weight.
    target: u64,
    index: u32,
}

impl Maglev {
    /// `endpoints`: (address, weight >= 1), non-empty, fewer than `u32::MAX`.
    pub(super) fn new(endpoints: &[(SocketAddr, u32)], table_size: u64) -> Self {
        let size = table_size_for(table_size);
        let heaviest = endpoints
            .iter()
            .map(|&(_, w)| u64::from(w))
            .max()
            .unwrap_or(1);
        let mut order: Vec<(SocketAddr, u32, u32)> = (0u32..)
            .zip(endpoints)
            .map(|(index, &(address, weight))| (address, weight, index))
            .collect();
        order.sort_unstable();
        let mut builders: Vec<Builder> = order
            .iter()
            .map(|&(address, weight, index)| {
                let key = address.to_string();
                Builder {
                    offset: xxh64(key.as_bytes(), 0) % size,
                    skip: xxh64(key.as_bytes(), 1) % (size - 1) + 1,
                    next: 0,
                    weight: u64::from(weight),
                    target: 0,
                    index,
                }
            })
            .collect();

        // `size` fits in usize: it is at most MAX_TABLE_SIZE.
        let mut table = vec![EMPTY; size as usize];
        let mut filled = 0u64;
        let mut round = 1u64;
        while filled < size && !builders.is_empty() {
            for b in &mut builders {
                if filled == size {
                    break;
                }
                // The heaviest endpoint plays every round, one of weight
                // heaviest/3 every third round, and so on.
                if round * b.weight < b.target {
                    continue;
                }
                b.target += heaviest;
                // Terminates: `size` is prime and 0 < skip < size, so the
                // preference list visits every slot within `size` steps, and
                // at least one slot is still empty (filled < size).
                loop {
                    let slot = ((b.offset + b.skip * b.next) % size) as usize;
                    b.next += 1;
                    if let Some(cell) = table.get_mut(slot).filter(|c| **c == EMPTY) {
                        *cell = b.index;
                        break;
                    }
                }
                filled += 1;
            }
            round += 1;
        }
        Self {
            table: table.into_boxed_slice(),
        }
    }

    /// The endpoint index for `hash`.
    pub(super) fn get(&self, hash: u64) -> Option<usize> {
        let slot = hash % (self.table.len().max(1) as u64);
        self.table
            .get(slot as usize)
            .filter(|&&i| i != EMPTY)
            .map(|&i| i as usize)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.table.len()
    }
}

/// The configured size, defaulted, clamped, and rounded up to a prime.
pub(super) fn table_size_for(requested: u64) -> u64 {
    if requested < 2 {
        return DEFAULT_TABLE_SIZE;
    }
    let mut n = requested.min(MAX_TABLE_SIZE);
    // MAX_TABLE_SIZE is prime, so this stops there at the latest.
    while !is_prime(n) {
        n += 1;
    }
    n
}

fn is_prime(n: u64) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

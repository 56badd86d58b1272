//! Stable virtual IPs (VIPs) of mesh Services.
//!
//! Purpose: in transparent mode an unmodified application resolves
//! `catalog` through the proxy's mesh DNS and connects to the answer; the
//! proxy recognizes that original destination as Service `catalog`. The
//! address must therefore be the same in every proxy and across control
//! plane restarts without any stored state.
//!
//! Contract: VIPs live in [`VIP_NET`] (`240.240.0.0/16`, class E: reserved,
//! never routed, so a VIP can never shadow a real host). The network and
//! broadcast addresses are not used, which leaves [`VIP_CAPACITY`] (65,534)
//! addresses. [`allocate`] assigns, deterministically from the Service keys
//! alone:
//!
//! 1. every explicit `spec.vip` (validation made them unique and in range);
//! 2. every other Service, in sorted `(namespace, name)` order, its *home*
//!    address: FNV-1a (64 bit) of `"namespace/name"` modulo 65,534, if that
//!    address is still free;
//! 3. the Services whose home was taken, in sorted order, the next free
//!    address after their home (linear probing, wrapping around).
//!
//! Placing every home first means a Service only moves when another Service
//! hashes to the *same* home and sorts before it (or an explicit VIP takes
//! it), not when a neighbour was displaced into its slot. With many Services
//! collisions do happen (around 8 pairs among 1,000 Services); a Service
//! whose address must never change pins it with `spec.vip`.
//!
//! Non-goals: IPv6 VIPs (AAAA queries for mesh names get an empty answer) and
//! stored allocation state.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::error::{Errors, FieldPath};
use crate::mesh::{Key, Mesh};
use crate::resources::Kind;
use crate::validate::label_of;

/// The VIP network, `240.240.0.0`.
pub const VIP_NET: Ipv4Addr = Ipv4Addr::new(240, 240, 0, 0);
/// Prefix length of [`VIP_NET`].
pub const VIP_PREFIX_LEN: u8 = 16;
/// Usable VIPs: `240.240.0.1` to `240.240.255.254`.
pub const VIP_CAPACITY: u32 = 65_534;

/// True when `ip` is inside `240.240.0.0/16` (usable or not).
pub fn in_vip_net(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 240 && o[1] == 240
}

/// True when `ip` can be a Service VIP: inside [`VIP_NET`] and neither its
/// network (`240.240.0.0`) nor its broadcast (`240.240.255.255`) address.
pub fn is_usable_vip(ip: Ipv4Addr) -> bool {
    in_vip_net(ip) && offset_of(ip) != 0 && offset_of(ip) != 0xffff
}

/// The 64-bit FNV-1a hash of `bytes`: tiny, stable across Rust versions and
/// platforms (unlike `std`'s `DefaultHasher`), which is what keeps VIPs
/// identical in every proxy and control plane build.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

/// The address Service `namespace/name` gets when nothing else has it.
pub fn home_vip(namespace: &str, name: &str) -> Ipv4Addr {
    let h = fnv1a64(format!("{namespace}/{name}").as_bytes());
    // 1..=65534: skips the network and broadcast addresses.
    let off = (h % u64::from(VIP_CAPACITY)) as u32 + 1;
    vip_at(off)
}

/// Assigns a VIP to every key of `services` (each with its explicit VIP, if
/// any): see the module docs for the rules. Explicit VIPs that are unusable
/// or already taken (validation refuses both) are ignored and the Service is
/// allocated like one without. Services left over when all 65,534 addresses
/// are taken get none.
pub fn allocate<'a>(
    services: impl IntoIterator<Item = (&'a Key, Option<Ipv4Addr>)>,
) -> BTreeMap<Key, Ipv4Addr> {
    let mut pool = Pool::new();
    let mut out: BTreeMap<Key, Ipv4Addr> = BTreeMap::new();
    let mut rest: Vec<&'a Key> = Vec::new();
    for (k, explicit) in services {
        match explicit.filter(|ip| is_usable_vip(*ip)) {
            Some(ip) if pool.take(offset_of(ip)) => {
                out.insert(k.clone(), ip);
            }
            _ => rest.push(k),
        }
    }
    rest.sort();
    rest.dedup();
    // Homes first, in sorted key order.
    let mut displaced: Vec<(&Key, u32)> = Vec::new();
    for k in rest {
        let home = offset_of(home_vip(&k.0, &k.1));
        if pool.take(home) {
            out.insert(k.clone(), vip_at(home));
        } else {
            displaced.push((k, home));
        }
    }
    // Then probing for the displaced, also in sorted key order.
    for (k, home) in displaced {
        if pool.used >= VIP_CAPACITY {
            break;
        }
        let mut off = home;
        // Terminates: a free usable offset exists (checked above).
        loop {
            off = if off >= VIP_CAPACITY { 1 } else { off + 1 };
            if pool.take(off) {
                out.insert(k.clone(), vip_at(off));
                break;
            }
        }
    }
    out
}

/// Which offsets of the /16 are taken.
struct Pool {
    taken: Vec<bool>,
    used: u32,
}

impl Pool {
    fn new() -> Self {
        Pool {
            taken: vec![false; 1 << 16],
            used: 0,
        }
    }

    /// Takes usable offset `off` (1..=65534); false when it is taken.
    fn take(&mut self, off: u32) -> bool {
        if off == 0 || off > VIP_CAPACITY {
            return false;
        }
        match self.taken.get_mut(off as usize) {
            Some(t) if !*t => {
                *t = true;
                self.used += 1;
                true
            }
            _ => false,
        }
    }
}

/// Validation: every explicit `spec.vip` is a usable address of
/// [`VIP_NET`] and no two Services pin the same one. Reports into `errors`.
pub(crate) fn check_service_vips(mesh: &Mesh, errors: &mut Errors) {
    let mut owners: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for s in mesh.services() {
        let svc = &s.value;
        let Some(ip) = svc.spec.vip else { continue };
        let label = label_of(Kind::Service, &svc.metadata);
        let path = FieldPath::root().key("spec").key("vip");
        let here = format!("{}/{}", svc.metadata.namespace, svc.metadata.name);
        if !is_usable_vip(ip) {
            errors.push(s.error(
                Some(label),
                &path,
                format!(
                    "{ip} is not a service VIP: expected an address in {VIP_NET}/{VIP_PREFIX_LEN} \
                     other than {VIP_NET} and 240.240.255.255 (or leave spec.vip out to get one allocated)"
                ),
            ));
        } else if let Some(other) = owners.get(&ip) {
            errors.push(s.error(
                Some(label),
                &path,
                format!(
                    "VIP {ip} is already pinned by Service {other}; VIPs are unique in the mesh"
                ),
            ));
        } else {
            owners.insert(ip, here);
        }
    }
}

/// The low 16 bits of `ip` (its offset in [`VIP_NET`]).
fn offset_of(ip: Ipv4Addr) -> u32 {
    u32::from(ip) & 0xffff
}

fn vip_at(off: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(VIP_NET) | (off & 0xffff))
}

#[cfg(test)]
mod tests;

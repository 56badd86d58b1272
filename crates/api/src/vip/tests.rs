//! Tests of VIP allocation and validation.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;

fn k(ns: &str, name: &str) -> Key {
    (ns.to_string(), name.to_string())
}

#[test]
fn fnv1a_matches_the_reference_vectors() {
    // From the FNV reference (draft-eastlake-fnv): "" and "a", "foobar".
    assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
}

#[test]
fn homes_are_usable_and_stable() {
    // Pinned: changing the hash would move every VIP of every mesh.
    assert_eq!(
        home_vip("default", "catalog"),
        home_vip("default", "catalog")
    );
    for i in 0..5000 {
        let ip = home_vip("ns", &format!("svc-{i}"));
        assert!(is_usable_vip(ip), "{ip}");
    }
    assert!(!is_usable_vip(Ipv4Addr::new(240, 240, 0, 0)));
    assert!(!is_usable_vip(Ipv4Addr::new(240, 240, 255, 255)));
    assert!(!is_usable_vip(Ipv4Addr::new(10, 0, 0, 1)));
    assert!(is_usable_vip(Ipv4Addr::new(240, 240, 0, 1)));
}

#[test]
fn explicit_vips_win_and_collisions_probe_in_sorted_order() {
    let a = k("default", "a");
    let b = k("default", "b");
    let home_a = home_vip("default", "a");
    // b pins a's home: a moves to the next address.
    let m = allocate([(&a, None), (&b, Some(home_a))]);
    assert_eq!(m[&b], home_a);
    assert_eq!(m[&a], vip_at(offset_of(home_a) % VIP_CAPACITY + 1));
}

#[test]
fn allocation_is_unique_and_independent_of_input_order() {
    let keys: Vec<Key> = (0..3000)
        .map(|i| k(&format!("ns{}", i % 7), &format!("s{i}")))
        .collect();
    let fwd = allocate(keys.iter().map(|k| (k, None)));
    let rev = allocate(keys.iter().rev().map(|k| (k, None)));
    assert_eq!(fwd, rev);
    assert_eq!(fwd.len(), keys.len());
    let mut seen = std::collections::HashSet::new();
    for ip in fwd.values() {
        assert!(is_usable_vip(*ip));
        assert!(seen.insert(*ip), "duplicate {ip}");
    }
    // Most services sit at their home address.
    let at_home = fwd
        .iter()
        .filter(|(k, ip)| home_vip(&k.0, &k.1) == **ip)
        .count();
    assert!(at_home > keys.len() * 9 / 10, "{at_home}");
}

#[test]
fn a_displaced_service_does_not_push_out_a_neighbour() {
    // Find two keys with the same home, and a third whose home is the
    // next address: the third keeps its home.
    let mut by_home: BTreeMap<u32, Key> = BTreeMap::new();
    let mut pair = None;
    for i in 0..100_000 {
        let key = k("p", &format!("s{i}"));
        let off = offset_of(home_vip(&key.0, &key.1));
        if let Some(first) = by_home.insert(off, key.clone()) {
            pair = Some((first, key, off));
            break;
        }
    }
    let (x, y, off) = pair.expect("a collision among 100,000 keys");
    let next = off % VIP_CAPACITY + 1;
    let z = (0..1_000_000)
        .map(|i| k("q", &format!("z{i}")))
        .find(|key| offset_of(home_vip(&key.0, &key.1)) == next)
        .expect("a key with the next home");
    let m = allocate([(&x, None), (&y, None), (&z, None)]);
    assert_eq!(m[&z], vip_at(next));
    let (first, second) = if x < y { (&x, &y) } else { (&y, &x) };
    assert_eq!(m[first], vip_at(off));
    assert_eq!(m[second], vip_at(next % VIP_CAPACITY + 1));
}

#[test]
fn full_net_leaves_the_rest_without_a_vip() {
    let keys: Vec<Key> = (0..(VIP_CAPACITY as usize + 3))
        .map(|i| k("n", &format!("s{i}")))
        .collect();
    let m = allocate(keys.iter().map(|k| (k, None)));
    assert_eq!(m.len(), VIP_CAPACITY as usize);
}

const HEAD: &str = "apiVersion: meshwork.dev/v1alpha1";

fn svc(ns: &str, name: &str, vip: Option<&str>) -> String {
    let vip = vip.map(|v| format!("  vip: {v}\n")).unwrap_or_default();
    format!(
        "---\n{HEAD}\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  ports: [{{name: http, port: 80}}]\n{vip}"
    )
}

fn validate(yaml: &str) -> Result<Mesh, Errors> {
    crate::validate(crate::load_str("m.yaml", yaml).unwrap())
}

#[test]
fn mesh_service_vip_is_explicit_or_allocated_and_stable() {
    let yaml = [
        svc("default", "catalog", None),
        svc("shop", "cart", Some("240.240.7.7")),
        svc("default", "reviews", None),
    ]
    .concat();
    let m = validate(&yaml).unwrap();
    assert_eq!(
        m.service_vip("shop", "cart"),
        Some(Ipv4Addr::new(240, 240, 7, 7))
    );
    let catalog = m.service_vip("default", "catalog").unwrap();
    assert!(is_usable_vip(catalog));
    assert_eq!(m.service_vip("nope", "catalog"), None);
    // The same services in another order and with others added: same VIP
    // (no collision here), in a mesh built from scratch.
    let again = [
        svc("default", "reviews", None),
        svc("other", "x", None),
        svc("default", "catalog", None),
    ]
    .concat();
    let m2 = validate(&again).unwrap();
    assert_eq!(m2.service_vip("default", "catalog"), Some(catalog));
    assert_eq!(m.service_vips().count(), 3);
    // A clone (the control plane adds workloads to a copy) answers the same.
    assert_eq!(m.clone().service_vip("default", "catalog"), Some(catalog));
}

#[test]
fn explicit_vip_outside_the_net_or_taken_twice_is_refused() {
    let yaml = [
        svc("default", "a", Some("10.0.0.1")),
        svc("default", "b", Some("240.240.255.255")),
        svc("default", "c", Some("240.240.1.2")),
        svc("other", "d", Some("240.240.1.2")),
    ]
    .concat();
    let e = validate(&yaml).unwrap_err().to_string();
    assert!(e.contains("10.0.0.1 is not a service VIP"), "{e}");
    assert!(e.contains("240.240.0.0/16"), "{e}");
    assert!(e.contains("240.240.255.255 is not a service VIP"), "{e}");
    assert!(
        e.contains("VIP 240.240.1.2 is already pinned by Service default/c"),
        "{e}"
    );
    assert!(e.contains("spec.vip"), "{e}");
    // Not an address at all: refused when loading, naming the field.
    let bad = crate::load_str("m.yaml", &svc("default", "a", Some("not-an-ip")))
        .unwrap_err()
        .to_string();
    assert!(bad.contains("spec.vip") && bad.contains("IPv4"), "{bad}");
}

#[test]
fn explicit_vip_displaces_an_allocated_one() {
    let home = home_vip("default", "catalog");
    let yaml = [
        svc("default", "catalog", None),
        svc("default", "pinned", Some(&home.to_string())),
    ]
    .concat();
    let m = validate(&yaml).unwrap();
    assert_eq!(m.service_vip("default", "pinned"), Some(home));
    let moved = m.service_vip("default", "catalog").unwrap();
    assert_ne!(moved, home);
    assert!(is_usable_vip(moved));
}

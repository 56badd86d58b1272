#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

fn one(yaml: &str) -> Sourced<Resource> {
    let mut v = api::load_str("t.yaml", yaml).unwrap();
    assert_eq!(v.len(), 1);
    v.pop().unwrap()
}

fn service(name: &str, port: u32) -> Sourced<Resource> {
    one(&format!(
        "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{name: http, port: {port}}}]\n"
    ))
}

fn route(name: &str, parent: &str) -> Sourced<Resource> {
    one(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{kind: Service, name: {parent}, port: 80}}]\n  rules:\n  - backendRefs: [{{name: {parent}, port: 80}}]\n"
    ))
}

fn put(r: Sourced<Resource>) -> Op {
    Op::Put {
        resource: r,
        expected: Precondition::Any,
    }
}

fn svc_key(name: &str) -> ResourceKey {
    ResourceKey::new(Kind::Service, "default", name)
}

#[test]
fn versions_are_commit_revisions_and_unchanged_writes_keep_them() {
    let s = MemStore::new();
    assert_eq!(s.revision(), 0);
    let a = s
        .apply_batch(vec![put(service("a", 80)), put(service("b", 80))])
        .unwrap();
    assert_eq!(a.revision, 1);
    assert!(a
        .results
        .iter()
        .all(|r| r.outcome == Outcome::Created && r.version == Some(1)));

    // Same content again: nothing is written, the revision stays.
    let again = s.apply_batch(vec![put(service("a", 80))]).unwrap();
    assert_eq!(again.revision, 1);
    assert_eq!(again.results[0].outcome, Outcome::Unchanged);

    let changed = s.put(service("a", 81), Precondition::Version(1)).unwrap();
    assert_eq!(changed.version, 2);
    assert_eq!(s.get(&svc_key("b")).unwrap().version, 1);
    assert_eq!(s.list(Some(Kind::Service)).len(), 2);
}

#[test]
fn stale_and_create_only_preconditions_conflict() {
    let s = MemStore::new();
    s.put(service("a", 80), Precondition::MustNotExist).unwrap();
    s.put(service("a", 81), Precondition::Any).unwrap();
    let e = s
        .put(service("a", 82), Precondition::Version(1))
        .unwrap_err();
    assert!(e.is_conflict(), "{e}");
    assert!(
        e.to_string().contains("current resourceVersion is 2"),
        "{e}"
    );
    assert!(s
        .put(service("a", 82), Precondition::MustNotExist)
        .unwrap_err()
        .is_conflict());
    assert!(s
        .delete(&svc_key("a"), Precondition::Version(1))
        .unwrap_err()
        .is_conflict());
    assert!(s
        .delete(&svc_key("zz"), Precondition::Any)
        .unwrap_err()
        .is_not_found());
    assert_eq!(s.revision(), 2);
}

#[test]
fn the_whole_set_must_validate_including_deletes() {
    let s = MemStore::new();
    // A route without its service is refused, naming the field.
    let e = s.apply_batch(vec![put(route("r", "a"))]).unwrap_err();
    assert!(e.is_invalid());
    assert!(e.to_string().contains("t.yaml:"), "{e}");
    assert!(e.to_string().contains("spec.parentRefs[0]"), "{e}");
    assert_eq!(s.revision(), 0);

    s.apply_batch(vec![put(service("a", 80)), put(route("r", "a"))])
        .unwrap();
    // Deleting the service alone would leave the stored route dangling.
    let e = s.delete(&svc_key("a"), Precondition::Any).unwrap_err();
    assert!(e.is_invalid(), "{e}");
    let text = e.to_string();
    assert!(text.starts_with("store: HTTPRoute default/r: "), "{text}");
    assert_eq!(s.list(None).len(), 2);
    // Both at once is fine.
    s.apply_batch(vec![
        Op::Delete {
            key: ResourceKey::new(Kind::HttpRoute, "default", "r"),
            expected: Precondition::Any,
        },
        Op::Delete {
            key: svc_key("a"),
            expected: Precondition::Any,
        },
    ])
    .unwrap();
    assert!(s.list(None).is_empty());
}

#[test]
fn a_batch_whose_last_op_fails_changes_nothing() {
    let s = MemStore::new();
    s.put(service("a", 80), Precondition::Any).unwrap();
    let mut rx = s.subscribe();
    rx.borrow_and_update();
    let e = s
        .apply_batch(vec![
            put(service("b", 80)),
            put(service("c", 80)),
            Op::Put {
                resource: service("a", 90),
                expected: Precondition::Version(7),
            },
        ])
        .unwrap_err();
    assert!(e.is_conflict());
    assert_eq!(s.list(None).len(), 1);
    assert!(!rx.has_changed().unwrap());
}

#[test]
fn duplicates_in_one_batch_are_refused() {
    let s = MemStore::new();
    let e = s
        .apply_batch(vec![put(service("a", 80)), put(service("a", 81))])
        .unwrap_err();
    assert!(e.is_invalid());
    assert!(e.to_string().contains("appears twice"), "{e}");
    assert!(s.list(None).is_empty());
}

#[test]
fn dry_run_checks_without_writing() {
    let s = MemStore::new();
    let d = s.dry_run(vec![put(service("a", 80))]).unwrap();
    assert_eq!(d.results[0].outcome, Outcome::Created);
    assert!(s.list(None).is_empty());
    assert!(s
        .dry_run(vec![put(route("r", "zz"))])
        .unwrap_err()
        .is_invalid());
}

#[test]
fn subscribers_see_each_commit() {
    let s = MemStore::new();
    let mut rx = s.subscribe();
    s.put(service("a", 80), Precondition::Any).unwrap();
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), 1);
}

#[test]
fn json_view_carries_the_version_as_a_string() {
    let s = MemStore::new();
    let stored = s.put(service("a", 80), Precondition::Any).unwrap();
    let j = stored.to_json();
    assert_eq!(j["metadata"]["resourceVersion"], "1");
    assert_eq!(j["kind"], "Service");
}

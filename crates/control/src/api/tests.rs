#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

const SVC: &str = "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata:\n  name: a\n  resourceVersion: \"7\"\n  labels: {x: y}\nspec:\n  ports: [{name: http, port: 80}]\n";

#[test]
fn yaml_versions_are_taken_out_and_lines_kept() {
    let text = format!(
        "{SVC}---\n{}",
        SVC.replace("name: a", "name: b").replace("\"7\"", "9")
    );
    let docs = load_documents("f.yaml", &text).unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0].1, Some(7));
    assert_eq!(docs[1].1, Some(9));
    assert_eq!(docs[1].0.line, 10);
    let plain = load_documents("f.yaml", &SVC.replace("  resourceVersion: \"7\"\n", "")).unwrap();
    assert_eq!(plain[0].1, None);
}

#[test]
fn bad_versions_and_bad_documents_are_errors_not_panics() {
    let e = load_documents("f.yaml", &SVC.replace("\"7\"", "seven")).unwrap_err();
    assert!(e[0].contains("f.yaml:5: metadata.resourceVersion"), "{e:?}");
    for garbage in [
        "{",
        "[1,",
        "{\"kind\": 3}",
        ": : :\n  - [",
        "\u{0}",
        "[[[]]]",
        "---\n- 1\n",
    ] {
        assert!(load_documents("f", garbage).is_err(), "{garbage:?}");
    }
}

#[test]
fn json_documents_array_and_list() {
    let one = r#"{"apiVersion":"meshwork.dev/v1alpha1","kind":"Service","metadata":{"name":"a","resourceVersion":"3"},"spec":{"ports":[{"name":"http","port":80}]}}"#;
    let docs = load_documents("j", one).unwrap();
    assert_eq!(docs[0].1, Some(3));
    let arr = format!(
        "[{one}, {}]",
        one.replace("\"a\"", "\"b\"").replace("\"3\"", "4")
    );
    let docs = load_documents("j", &arr).unwrap();
    assert_eq!(
        docs.iter().map(|d| d.1).collect::<Vec<_>>(),
        [Some(3), Some(4)]
    );
    let list = format!("{{\"kind\":\"List\",\"items\":{arr}}}");
    assert_eq!(load_documents("j", &list).unwrap().len(), 2);
}

#[test]
fn kinds_by_any_reasonable_name() {
    for (s, k) in [
        ("service", Kind::Service),
        ("Services", Kind::Service),
        ("svc", Kind::Service),
        ("HTTPRoute", Kind::HttpRoute),
        ("httproutes", Kind::HttpRoute),
        ("trafficpolicies", Kind::TrafficPolicy),
        ("tcproute", Kind::TcpRoute),
    ] {
        assert_eq!(kind_from_arg(s), Some(k), "{s}");
    }
    assert_eq!(kind_from_arg("pods"), None);
}

#[test]
fn query_strings_decode() {
    let q = Query::parse("file=dir%2Fa.yaml&dryRun&x=a+b");
    assert_eq!(q.get("file"), Some("dir/a.yaml"));
    assert_eq!(q.get("dryRun"), Some(""));
    assert_eq!(q.get("x"), Some("a b"));
    assert_eq!(percent_decode("%"), "%");
    assert_eq!(percent_decode("%4"), "%4");
    assert_eq!(percent_decode("%zz"), "%zz");
}

#[test]
fn every_prefix_of_a_document_loads_or_fails_cleanly() {
    let yaml = format!("{SVC}---\n{}", SVC.replace("name: a", "name: é€"));
    let json = r#"[{"apiVersion":"meshwork.dev/v1alpha1","kind":"Service","metadata":{"name":"a","resourceVersion":"3"},"spec":{"ports":[{"name":"http","port":80}]}}]"#;
    for text in [yaml.as_str(), json] {
        for (i, _) in text.char_indices() {
            let _ = load_documents("p", &text[..i]);
        }
    }
}

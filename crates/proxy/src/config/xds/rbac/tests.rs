//! NACK paths of the RBAC subset: the translator's output is accepted, and
//! each field outside the subset is refused with its path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use envoy_types::pb::envoy::config::listener::v3 as lpb;
use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as http_rbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3 as net_rbac;
use prost::Message;

use super::super::listener::listener;

const MESH: &str = "apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {name: api}\nspec:\n  ports: [{name: http, port: 80}]\n---\napiVersion: meshwork.dev/v1alpha1\nkind: Workload\nmetadata: {name: api-0}\nspec: {service: api, address: 127.0.0.1}\n---\napiVersion: meshwork.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  targetRef: {kind: Service, name: api}\n  action: DENY\n  rules:\n  - from: [{namespaces: [jobs]}]\n    to: [{paths: [\"/admin*\"]}]\n";

/// The translated inbound listener (HTTP chain with one DENY RBAC filter,
/// default chain with one network RBAC filter).
fn translated() -> lpb::Listener {
    let mesh = api::validate(api::load_str("t.yaml", MESH).unwrap()).unwrap();
    let ctx = api::ProxyContext {
        workload: Some(("default".into(), "api-0".into())),
        ..Default::default()
    };
    api::translate(&mesh, &ctx)
        .listener("inbound")
        .cloned()
        .unwrap()
}

fn hcm_of(
    l: &mut lpb::Listener,
) -> (
    &mut envoy_types::pb::google::protobuf::Any,
    hcm::HttpConnectionManager,
) {
    let Some(lpb::filter::ConfigType::TypedConfig(any)) =
        &mut l.filter_chains[0].filters[0].config_type
    else {
        panic!("no HCM")
    };
    let h = hcm::HttpConnectionManager::decode(any.value.as_slice()).unwrap();
    (any, h)
}

/// Changes the HTTP RBAC filter's config and returns the NACK text.
fn nack_http(change: impl FnOnce(&mut http_rbac::Rbac)) -> String {
    let mut l = translated();
    let (any, mut h) = hcm_of(&mut l);
    let Some(hcm::http_filter::ConfigType::TypedConfig(fa)) = &mut h.http_filters[0].config_type
    else {
        panic!("no RBAC filter")
    };
    let mut r = http_rbac::Rbac::decode(fa.value.as_slice()).unwrap();
    change(&mut r);
    fa.value = r.encode_to_vec();
    any.value = h.encode_to_vec();
    let e = listener(&l, &Default::default()).expect_err("refused");
    format!("{}: {}", e.path, e.message)
}

fn policy_mut(r: &mut http_rbac::Rbac) -> &mut rbac::Policy {
    r.rules
        .as_mut()
        .unwrap()
        .policies
        .values_mut()
        .next()
        .unwrap()
}

#[test]
fn the_translation_is_accepted() {
    let l = listener(&translated(), &Default::default())
        .unwrap()
        .unwrap();
    assert_eq!(l.http.unwrap().authz.unwrap().filters.len(), 1);
    assert_eq!(l.tcp.unwrap().authz.unwrap().filters.len(), 1);
}

#[test]
fn unsupported_rbac_fields_are_refused_with_their_path() {
    let e = nack_http(|r| r.rules.as_mut().unwrap().action = rbac::rbac::Action::Log as i32);
    assert_eq!(
        e,
        "filter_chains[0].filters[0].typed_config.http_filters[0].typed_config.rules.action: only ALLOW and DENY are supported"
    );
    let e = nack_http(|r| {
        policy_mut(r).permissions.push(rbac::Permission {
            rule: Some(rbac::permission::Rule::DestinationPort(80)),
        })
    });
    assert!(
        e.contains("rules.policies[\"default/p/rules[0]\"].permissions[1].destination_port: unsupported field"),
        "{e}"
    );
    let e = nack_http(|r| {
        policy_mut(r).principals = vec![rbac::Principal {
            identifier: Some(rbac::principal::Identifier::RemoteIp(Default::default())),
        }]
    });
    assert!(
        e.contains("principals[0].remote_ip: unsupported field"),
        "{e}"
    );
    let e = nack_http(|r| policy_mut(r).condition = Some(Default::default()));
    assert!(
        e.ends_with("condition: unsupported field (not in meshwork's xDS subset)"),
        "{e}"
    );
    let e = nack_http(|r| policy_mut(r).permissions.clear());
    assert!(e.ends_with("permissions: at least one is required"), "{e}");
    let e = nack_http(|r| {
        r.shadow_rules = Some(rbac::Rbac {
            action: rbac::rbac::Action::Allow as i32,
            ..Default::default()
        })
    });
    assert!(e.ends_with("shadow_rules.action: only DENY is supported in shadow rules (audit: what would be denied)"), "{e}");
    let e = nack_http(|r| r.matcher = Some(Default::default()));
    assert!(e.ends_with("http_filters[0].typed_config.matcher: unsupported field (not in meshwork's xDS subset)"), "{e}");
    let e = nack_http(|r| {
        let mut nested = rbac::Permission {
            rule: Some(rbac::permission::Rule::Any(true)),
        };
        for _ in 0..40 {
            nested = rbac::Permission {
                rule: Some(rbac::permission::Rule::NotRule(Box::new(nested))),
            };
        }
        policy_mut(r).permissions = vec![nested];
    });
    assert!(e.contains("nested more than 16 levels deep"), "{e}");
}

#[test]
fn filters_in_the_wrong_place_are_refused() {
    // A non-RBAC HTTP filter before the router.
    let mut l = translated();
    let (any, mut h) = hcm_of(&mut l);
    h.http_filters.insert(0, h.http_filters[1].clone());
    any.value = h.encode_to_vec();
    let e = listener(&l, &Default::default()).unwrap_err();
    assert_eq!(
        e.path,
        "filter_chains[0].filters[0].typed_config.http_filters[0].typed_config"
    );
    assert!(
        e.message
            .contains("only envoy.filters.http.rbac, envoy.filters.http.local_ratelimit and envoy.filters.http.fault may come before envoy.filters.http.router"),
        "{}",
        e.message
    );

    // Network RBAC with CONTINUOUS enforcement.
    let mut l = translated();
    let chain = l.default_filter_chain.as_mut().unwrap();
    let Some(lpb::filter::ConfigType::TypedConfig(any)) = &mut chain.filters[0].config_type else {
        panic!()
    };
    let mut r = net_rbac::Rbac::decode(any.value.as_slice()).unwrap();
    r.enforcement_type = net_rbac::rbac::EnforcementType::Continuous as i32;
    any.value = r.encode_to_vec();
    let e = listener(&l, &Default::default()).unwrap_err();
    assert_eq!(
        e.path,
        "default_filter_chain.filters[0].typed_config.enforcement_type"
    );

    // Network RBAC before an HTTP connection manager.
    let mut l = translated();
    let rbac_filter = l.default_filter_chain.as_ref().unwrap().filters[0].clone();
    l.filter_chains[0].filters.insert(0, rbac_filter);
    let e = listener(&l, &Default::default()).unwrap_err();
    assert_eq!(e.path, "filter_chains[0].filters[0]");
    assert!(
        e.message.contains("only supported before tcp_proxy"),
        "{}",
        e.message
    );
}

//! The mTLS subset: the translator's output is accepted (and resolved to
//! the proxy's identity), a proxy without identity refuses it saying how to
//! get one, and each field outside the subset is refused with its path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use envoy_types::pb::envoy::config::cluster::v3 as cpb;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3 as lpb;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use prost::Message;

use super::super::{cluster::cluster, listener::listener, Env};

fn mesh(mode: &str) -> String {
    format!(
        "apiVersion: meshwork.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: default}}\nspec: {{trustDomain: td.test, mtls: {{mode: {mode}}}}}\n---\n\
apiVersion: meshwork.dev/v1alpha1\nkind: Service\nmetadata: {{name: api}}\nspec:\n  serviceAccount: api-sa\n  ports: [{{name: http, port: 80, appProtocol: http2}}]\n---\n\
apiVersion: meshwork.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: api-0\n  annotations: {{meshwork.dev/sidecar-inbound: \"127.0.0.1:15006\"}}\nspec: {{service: api, address: 127.0.0.1}}\n---\n\
apiVersion: meshwork.dev/v1alpha1\nkind: Workload\nmetadata: {{name: api-ext}}\nspec: {{service: api, address: 10.0.0.9}}\n"
    )
}

fn xds(mode: &str) -> api::Xds {
    let m = api::validate(api::load_str("t.yaml", &mesh(mode)).unwrap()).unwrap();
    let ctx = api::ProxyContext {
        workload: Some(("default".into(), "api-0".into())),
        ..Default::default()
    };
    api::translate(&m, &ctx)
}

fn env() -> Env {
    let ca = identity::Ca::generate(identity::TrustDomain::new("td.test").unwrap()).unwrap();
    let id = identity::SpiffeId::new(ca.trust_domain().clone(), "default", "web").unwrap();
    let kc = identity::generate_key_and_csr(&id).unwrap();
    let svid = ca
        .sign_csr(&kc.csr_pem, &id, identity::DEFAULT_SVID_TTL)
        .unwrap();
    Env {
        identity: Some(
            identity::WorkloadIdentity::with_cert(&svid.chain_pem(), &kc.key_pem, ca.bundle())
                .unwrap(),
        ),
    }
}

fn api_cluster(x: &api::Xds) -> cpb::Cluster {
    x.cluster("outbound|80||api.default").cloned().unwrap()
}

/// The UpstreamTlsContext of the first match, to edit and put back.
fn edit_upstream(c: &mut cpb::Cluster, f: impl FnOnce(&mut tls::UpstreamTlsContext)) {
    let ts = c.transport_socket_matches[0]
        .transport_socket
        .as_mut()
        .unwrap();
    let Some(core::transport_socket::ConfigType::TypedConfig(any)) = &mut ts.config_type else {
        panic!()
    };
    let mut u = tls::UpstreamTlsContext::decode(any.value.as_slice()).unwrap();
    f(&mut u);
    any.value = u.encode_to_vec();
}

fn common(u: &mut tls::UpstreamTlsContext) -> &mut tls::CommonTlsContext {
    u.common_tls_context.as_mut().unwrap()
}

/// An edit of an UpstreamTlsContext.
type Edit = Box<dyn Fn(&mut tls::UpstreamTlsContext)>;

fn nack(c: &cpb::Cluster, env: &Env) -> String {
    let e = cluster(c, env).map(|_| ()).expect_err("refused");
    format!("{}: {}", e.path, e.message)
}

#[test]
fn translated_mtls_is_accepted_and_resolved_to_the_local_identity() {
    let x = xds("strict");
    let env = env();
    let c = cluster(&api_cluster(&x), &env).unwrap();
    let t = c.tls.expect("mTLS");
    assert_eq!(t.expected_ids, ["spiffe://td.test/ns/default/sa/api-sa"]);
    assert_eq!(t.alpn, ["h2"]);
    let la = super::super::cluster::load_assignment(
        x.load_assignment("outbound|80||api.default").unwrap(),
    )
    .unwrap();
    let mtls: Vec<bool> = la.endpoints().map(|e| e.mtls).collect();
    assert_eq!(mtls.iter().filter(|m| **m).count(), 1, "{mtls:?}");
    assert_eq!(mtls.len(), 2);

    let l = listener(x.listener("inbound").unwrap(), &env)
        .unwrap()
        .unwrap();
    assert!(l.is_strict_mtls());
    let t = l.tls.as_ref().unwrap();
    assert_eq!(t.alpn, ["h2", "http/1.1", "meshwork-tcp/1"]);
    assert!(t.http.is_some() && t.tcp.is_some());

    let x = xds("permissive");
    let l = listener(x.listener("inbound").unwrap(), &env)
        .unwrap()
        .unwrap();
    assert!(!l.is_strict_mtls());
    assert!(l.tls.is_some() && l.http.is_some() && l.tcp.is_some());
}

#[test]
fn without_identity_mtls_is_refused_with_how_to_get_one() {
    let x = xds("strict");
    let e = nack(&api_cluster(&x), &Env::default());
    assert!(
        e.starts_with("transport_socket_matches[0].transport_socket.typed_config: mTLS is configured but this proxy has no workload identity"),
        "{e}"
    );
    assert!(e.contains("--token") && e.contains("--cert"), "{e}");
    let e = listener(x.listener("inbound").unwrap(), &Env::default())
        .map(|_| ())
        .unwrap_err();
    assert!(e.message.contains("--token"), "{}", e.message);
    // Without mTLS in the mesh, nothing needs an identity.
    let plain = mesh("strict").replace(", mtls: {mode: strict}", "");
    let m = api::validate(api::load_str("t.yaml", &plain).unwrap()).unwrap();
    let x = api::translate(&m, &api::ProxyContext::default());
    assert!(cluster(&api_cluster(&x), &Env::default()).is_ok());
}

#[test]
fn upstream_fields_outside_the_subset_are_refused_with_their_path() {
    let x = xds("strict");
    let env = env();
    let base = api_cluster(&x);
    let p = "transport_socket_matches[0].transport_socket.typed_config.common_tls_context";
    let cases: Vec<(Edit, String)> = vec![
        (
            Box::new(|u| {
                common(u).tls_certificate_sds_secret_configs[0].name = "other".into()
            }),
            format!("{p}.tls_certificate_sds_secret_configs[0].name: unknown SDS secret \"other\""),
        ),
        (
            Box::new(|u| common(u).tls_certificates.push(Default::default())),
            format!("{p}.tls_certificates: inline certificates are not supported"),
        ),
        (
            Box::new(|u| {
                common(u)
                    .tls_params
                    .as_mut()
                    .unwrap()
                    .tls_minimum_protocol_version =
                    tls::tls_parameters::TlsProtocol::TlSv12 as i32
            }),
            format!("{p}.tls_params.tls_minimum_protocol_version: must be TLSv1_3"),
        ),
        (
            Box::new(|u| common(u).alpn_protocols = vec!["spdy/3".into()]),
            format!("{p}.alpn_protocols[0]: unsupported \"spdy/3\""),
        ),
        (
            Box::new(|u| u.sni = "api".into()),
            "transport_socket_matches[0].transport_socket.typed_config.sni: unsupported field".to_string(),
        ),
        (
            Box::new(|u| {
                let Some(tls::common_tls_context::ValidationContextType::CombinedValidationContext(c)) =
                    &mut common(u).validation_context_type
                else {
                    panic!()
                };
                c.default_validation_context
                    .as_mut()
                    .unwrap()
                    .match_typed_subject_alt_names[0]
                    .matcher = Some(matcher::StringMatcher {
                    match_pattern: Some(matcher::string_matcher::MatchPattern::Prefix(
                        "spiffe://".into(),
                    )),
                    ignore_case: false,
                });
            }),
            format!("{p}.combined_validation_context.default_validation_context.match_typed_subject_alt_names[0].matcher: only exact is supported"),
        ),
        (
            Box::new(|u| {
                let Some(tls::common_tls_context::ValidationContextType::CombinedValidationContext(c)) =
                    &mut common(u).validation_context_type
                else {
                    panic!()
                };
                c.validation_context_sds_secret_config
                    .as_mut()
                    .unwrap()
                    .sds_config = Some(core::ConfigSource {
                    config_source_specifier: Some(
                        core::config_source::ConfigSourceSpecifier::ApiConfigSource(
                            Default::default(),
                        ),
                    ),
                    ..Default::default()
                });
            }),
            format!("{p}.combined_validation_context.validation_context_sds_secret_config.sds_config: only ads and path_config_source are supported"),
        ),
    ];
    for (edit, want) in cases {
        let mut c = base.clone();
        edit_upstream(&mut c, |u| edit(u));
        let got = nack(&c, &env);
        assert!(got.starts_with(&want), "got {got}\nwant {want}");
    }

    // The matches themselves.
    let mut c = base.clone();
    c.transport_socket_matches[0]
        .r#match
        .as_mut()
        .unwrap()
        .fields
        .clear();
    assert!(nack(&c, &env)
        .starts_with("transport_socket_matches[0].match: must be {tlsMode: meshwork}"));
    let mut c = base.clone();
    c.transport_socket_matches.swap(0, 1);
    assert!(nack(&c, &env)
        .starts_with("transport_socket_matches[0].transport_socket: the first match must use"));
    let mut c = base.clone();
    c.transport_socket_matches.pop();
    assert!(nack(&c, &env).contains("1 entries"));
}

#[test]
fn downstream_fields_outside_the_subset_are_refused_with_their_path() {
    let x = xds("strict");
    let env = env();
    let base = x.listener("inbound").cloned().unwrap();
    let edit = |l: &mut lpb::Listener, f: &dyn Fn(&mut tls::DownstreamTlsContext)| {
        let ts = l.filter_chains[0].transport_socket.as_mut().unwrap();
        let Some(core::transport_socket::ConfigType::TypedConfig(any)) = &mut ts.config_type else {
            panic!()
        };
        let mut d = tls::DownstreamTlsContext::decode(any.value.as_slice()).unwrap();
        f(&mut d);
        any.value = d.encode_to_vec();
    };
    let err = |l: &lpb::Listener| {
        let e = listener(l, &env).map(|_| ()).unwrap_err();
        format!("{}: {}", e.path, e.message)
    };
    let mut l = base.clone();
    edit(&mut l, &|d| d.require_client_certificate = None);
    assert!(
        err(&l).starts_with("filter_chains[0].transport_socket.typed_config.require_client_certificate: must be true"),
        "{}",
        err(&l)
    );
    let mut l = base.clone();
    edit(&mut l, &|d| {
        d.common_tls_context
            .as_mut()
            .unwrap()
            .tls_params
            .as_mut()
            .unwrap()
            .tls_maximum_protocol_version = tls::tls_parameters::TlsProtocol::TlSv12 as i32
    });
    assert!(err(&l).contains("tls_params.tls_maximum_protocol_version: must be TLSv1_3"));
    // A TLS chain needs tls_inspector.
    let mut l = base.clone();
    l.listener_filters.clear();
    assert!(
        err(&l).starts_with("filter_chains[0].filter_chain_match.transport_protocol: requires the envoy.filters.listener.tls_inspector"),
        "{}",
        err(&l)
    );
    // transport_protocol tls without a TLS socket.
    let mut l = base.clone();
    l.filter_chains[1].transport_socket = None;
    assert!(err(&l)
        .starts_with("filter_chains[1].transport_socket: a chain matching transport_protocol"));
    let mut l = base.clone();
    l.filter_chains[1]
        .filter_chain_match
        .as_mut()
        .unwrap()
        .transport_protocol = "quic".into();
    assert!(err(&l).contains("transport_protocol: unsupported \"quic\""));
}

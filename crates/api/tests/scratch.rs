use prost::Message;
#[test]
fn scratch() {
    let r = api::load_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/bookinfo.yaml"
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let mesh = api::validate(r).unwrap_or_else(|e| panic!("{e}"));
    let ctx = api::ProxyContext {
        outbound_addr: "127.0.0.1:15001".parse().unwrap(),
        inbound_addr: "127.0.0.1:15006".parse().unwrap(),
        workload: Some(("default".into(), "productpage-1".into())),
        detect_timeout: std::time::Duration::from_secs(1),
    };
    let xds = api::translate(&mesh, &ctx);
    let b = api::envoy_bootstrap(&xds, 15000);
    std::fs::write("/tmp/mw-bootstrap.pb", b.encode_to_vec()).unwrap();
    println!(
        "{:#?}",
        xds.route_config("outbound_http")
            .unwrap()
            .virtual_hosts
            .iter()
            .map(|v| (
                &v.name,
                &v.domains,
                v.routes.iter().map(|r| &r.name).collect::<Vec<_>>()
            ))
            .collect::<Vec<_>>()
    );
}

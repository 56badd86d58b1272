//! Gateway API routing through the proxy: path, header, query and method
//! matches, precedence across and within HTTPRoutes, weighted backends, the
//! standard filters, and GRPCRoute service/method matching.
//!
//! Every route attaches to a parent Service (`web`, GAMMA) and sends to other
//! Services, each backed by one echo backend named like the service, so the
//! `x-backend` header of a response says which rule the proxy chose.

use bytes::Bytes;
use http_body_util::Full;
use testkit::{Backend, H1Client, H2Client, Reply};

use crate::harness::*;

/// Request headers of a test case.
type Headers<'a> = &'a [(&'a str, &'a str)];

/// One echo backend per name, each the only workload of a Service of the
/// same name (HTTP, port 80).
async fn backends(names: &[&str]) -> (Vec<Backend>, String) {
    let mut all = Vec::new();
    let mut yaml = String::new();
    for name in names {
        let b = Backend::http(name).await;
        yaml += &http_service(name, &[&b]);
        all.push(b);
    }
    (all, yaml)
}

/// An HTTPRoute attached to Service `parent` port 80; `rules` is the YAML
/// list under `spec.rules`, indented by two spaces.
fn http_route(name: &str, parent: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{kind: Service, name: {parent}, port: 80}}]\n  rules:\n{rules}---\n"
    )
}

async fn send(
    c: &mut H1Client,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    c.send(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap()
}

/// Which backend answered `method path` (with `headers`), or `404` when the
/// proxy found no route.
async fn who(c: &mut H1Client, method: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let r = send(c, method, "web", path, headers).await;
    match r.status.as_u16() {
        200 => r.backend().unwrap_or("?").to_owned(),
        404 => {
            assert_eq!(
                r.header("x-meshwork-error"),
                Some("no_route"),
                "{}",
                r.text()
            );
            "404".to_owned()
        }
        s => panic!("{method} {path}: unexpected {s}: {}", r.text()),
    }
}

#[tokio::test]
async fn path_exact_prefix_by_element_and_regex() {
    let (_b, mut yaml) = backends(&["web", "exact", "prefix", "regex"]).await;
    yaml += &http_route(
        "paths",
        "web",
        "  - matches: [{path: {type: Exact, value: /exact}}]\n    backendRefs: [{name: exact, port: 80}]\n  \
         - matches: [{path: {type: PathPrefix, value: /foo}}]\n    backendRefs: [{name: prefix, port: 80}]\n  \
         - matches: [{path: {type: RegularExpression, value: '/items/[0-9]+'}}]\n    backendRefs: [{name: regex, port: 80}]\n",
    );
    let h = Harness::start(&yaml).await;
    let mut c = h.client().await;
    for (path, want) in [
        ("/exact", "exact"),
        ("/exact?x=1", "exact"),
        ("/exact/", "404"),
        ("/exactly", "404"),
        ("/foo", "prefix"),
        ("/foo/", "prefix"),
        ("/foo/bar", "prefix"),
        ("/foo/bar?q=1", "prefix"),
        // PathPrefix matches whole path elements only.
        ("/foobar", "404"),
        ("/items/42", "regex"),
        // The regex must match the whole path.
        ("/items/42/more", "404"),
        ("/items/4x", "404"),
        // A route is attached: the Service's default route is gone (GAMMA).
        ("/", "404"),
    ] {
        assert_eq!(who(&mut c, "GET", path, &[]).await, want, "GET {path}");
    }
}

#[tokio::test]
async fn header_query_and_method_matches() {
    let (_b, mut yaml) = backends(&["web", "canary", "admin", "debug", "deleter", "stable"]).await;
    yaml += &http_route(
        "conditions",
        "web",
        "  - matches: [{headers: [{name: x-canary, value: 'true'}]}]\n    backendRefs: [{name: canary, port: 80}]\n  \
         - matches: [{headers: [{type: RegularExpression, name: x-user, value: 'admin-[a-z]+'}]}]\n    backendRefs: [{name: admin, port: 80}]\n  \
         - matches: [{queryParams: [{name: debug, value: '1'}]}]\n    backendRefs: [{name: debug, port: 80}]\n  \
         - matches: [{method: DELETE}]\n    backendRefs: [{name: deleter, port: 80}]\n  \
         - backendRefs: [{name: stable, port: 80}]\n",
    );
    let h = Harness::start(&yaml).await;
    let mut c = h.client().await;
    let cases: [(&str, &str, Headers<'_>, &str); 12] = [
        ("GET", "/", &[], "stable"),
        ("GET", "/a", &[("x-canary", "true")], "canary"),
        ("GET", "/a", &[("x-canary", "false")], "stable"),
        ("GET", "/a", &[("X-Canary", "true")], "canary"),
        ("GET", "/", &[("x-user", "admin-bob")], "admin"),
        // Regex values match the whole header value, case-sensitively.
        ("GET", "/", &[("x-user", "admin-Bob")], "stable"),
        ("GET", "/", &[("x-user", "the-admin-bob")], "stable"),
        ("GET", "/?debug=1", &[], "debug"),
        ("GET", "/?x=y&debug=1", &[], "debug"),
        ("GET", "/?debug=10", &[], "stable"),
        ("DELETE", "/thing", &[], "deleter"),
        ("POST", "/thing", &[], "stable"),
    ];
    for (method, path, headers, want) in cases {
        assert_eq!(
            who(&mut c, method, path, headers).await,
            want,
            "{method} {path} {headers:?}"
        );
    }
}

#[tokio::test]
async fn gateway_api_precedence_across_and_within_routes() {
    let names = [
        "web", "old-api", "new-api", "exact", "longer", "h1", "h2", "post", "q1",
    ];
    let (_b, mut yaml) = backends(&names).await;
    // The older route wins ties against the newer one even though its name
    // sorts later; inside one route the rules are listed least specific
    // first, so rule order cannot be what decides.
    let older = http_route(
        "zz-older",
        "web",
        "  - matches: [{path: {type: PathPrefix, value: /api}}]\n    backendRefs: [{name: old-api, port: 80}]\n  \
         - matches: [{path: {type: PathPrefix, value: /api}, queryParams: [{name: q, value: '1'}]}]\n    backendRefs: [{name: q1, port: 80}]\n  \
         - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-a, value: '1'}]}]\n    backendRefs: [{name: h1, port: 80}]\n  \
         - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-a, value: '1'}, {name: x-b, value: '1'}]}]\n    backendRefs: [{name: h2, port: 80}]\n  \
         - matches: [{path: {type: PathPrefix, value: /api}, method: POST}]\n    backendRefs: [{name: post, port: 80}]\n",
    );
    yaml += &older.replace(
        "metadata: {name: zz-older}",
        "metadata: {name: zz-older, creationTimestamp: '2024-01-01T00:00:00Z'}",
    );
    let newer = http_route(
        "aa-newer",
        "web",
        "  - matches: [{path: {type: PathPrefix, value: /api}}]\n    backendRefs: [{name: new-api, port: 80}]\n  \
         - matches: [{path: {type: PathPrefix, value: /api/v1}}]\n    backendRefs: [{name: longer, port: 80}]\n  \
         - matches: [{path: {type: Exact, value: /api/v1}}]\n    backendRefs: [{name: exact, port: 80}]\n",
    );
    yaml += &newer.replace(
        "metadata: {name: aa-newer}",
        "metadata: {name: aa-newer, creationTimestamp: '2024-06-01T00:00:00Z'}",
    );
    let h = Harness::start(&yaml).await;
    let mut c = h.client().await;
    let ab: &[(&str, &str)] = &[("x-a", "1"), ("x-b", "1")];
    let cases: [(&str, &str, Headers<'_>, &str); 10] = [
        // Exact beats any prefix, across routes.
        ("GET", "/api/v1", &[], "exact"),
        // The longest prefix wins.
        ("GET", "/api/v1/users", &[], "longer"),
        // Same match in both routes: the older route.
        ("GET", "/api/users", &[], "old-api"),
        // More header matches win.
        ("GET", "/api/users", &[("x-a", "1")], "h1"),
        ("GET", "/api/users", ab, "h2"),
        // A method match beats header matches.
        ("POST", "/api/users", ab, "post"),
        // Query parameter matches count after headers.
        ("GET", "/api/users?q=1", &[], "q1"),
        ("GET", "/api/users?q=1", &[("x-a", "1")], "h1"),
        // Longer prefix beats a method match on a shorter one.
        ("POST", "/api/v1/users", &[], "longer"),
        ("GET", "/other", &[], "404"),
    ];
    for (method, path, headers, want) in cases {
        assert_eq!(
            who(&mut c, method, path, headers).await,
            want,
            "{method} {path} {headers:?}"
        );
    }
}

#[tokio::test]
async fn weighted_backend_refs_split_traffic() {
    let (_b, mut yaml) = backends(&["web", "v1", "v2", "v3"]).await;
    yaml += &http_route(
        "split",
        "web",
        "  - backendRefs: [{name: v1, port: 80, weight: 80}, {name: v2, port: 80, weight: 20}, {name: v3, port: 80, weight: 0}]\n",
    );
    let h = Harness::start(&yaml).await;
    let m = spread(&h, "web", "/", 1000).await;
    let v1 = m.get("v1").copied().unwrap_or(0);
    let v2 = m.get("v2").copied().unwrap_or(0);
    // 800 expected, standard deviation ~13: +-50 is +-5% of all requests.
    assert!((750..=850).contains(&v1), "80/20 split: {m:?}");
    assert_eq!(v1 + v2, 1000, "weight 0 gets nothing: {m:?}");
}

#[tokio::test]
async fn request_and_response_header_modifiers() {
    let (b, mut yaml) = backends(&["web", "v1"]).await;
    yaml += &http_route(
        "headers",
        "web",
        "  - filters:\n    \
         - type: RequestHeaderModifier\n      requestHeaderModifier:\n        \
           set: [{name: x-env, value: prod}]\n        add: [{name: x-trace, value: mesh}]\n        remove: [x-secret]\n    \
         - type: ResponseHeaderModifier\n      responseHeaderModifier:\n        \
           set: [{name: x-served-by, value: meshwork}]\n        add: [{name: x-extra, value: added}]\n        remove: [content-type]\n    \
         backendRefs:\n    \
         - name: v1\n      port: 80\n      filters:\n      \
           - type: RequestHeaderModifier\n        requestHeaderModifier: {set: [{name: x-backend-filter, value: v1}]}\n",
    );
    let h = Harness::start(&yaml).await;
    let mut c = h.client().await;
    let r = send(
        &mut c,
        "GET",
        "web",
        "/",
        &[
            ("x-env", "dev"),
            ("x-trace", "client"),
            ("x-secret", "hunter2"),
            ("x-keep", "yes"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.backend(), Some("v1"));
    // What the client sees.
    assert_eq!(r.header("x-served-by"), Some("meshwork"));
    assert_eq!(r.header("x-extra"), Some("added"));
    assert_eq!(r.header("content-type"), None, "removed from the response");
    // What the backend saw.
    let seen = b[1].seen().pop().unwrap();
    let values = |name: &str| -> Vec<&str> {
        seen.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(values("x-env"), ["prod"], "set overwrites");
    let mut trace = values("x-trace");
    trace.sort();
    assert_eq!(trace, ["client", "mesh"], "add appends");
    assert!(values("x-secret").is_empty(), "remove drops the header");
    assert_eq!(values("x-keep"), ["yes"], "other headers pass");
    assert_eq!(
        values("x-backend-filter"),
        ["v1"],
        "backendRef filter applies"
    );
}

#[tokio::test]
async fn url_rewrite_hostname_full_path_and_prefix() {
    let (_b, mut yaml) = backends(&["web", "v1"]).await;
    yaml += &http_route(
        "rewrites",
        "web",
        "  - matches: [{path: {type: PathPrefix, value: /full}}]\n    \
           filters: [{type: URLRewrite, urlRewrite: {hostname: internal.example, path: {type: ReplaceFullPath, replaceFullPath: /replaced}}}]\n    \
           backendRefs: [{name: v1, port: 80}]\n  \
         - matches: [{path: {type: PathPrefix, value: /api}}]\n    \
           filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}]\n    \
           backendRefs: [{name: v1, port: 80}]\n  \
         - matches: [{path: {type: PathPrefix, value: /strip}}]\n    \
           filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]\n    \
           backendRefs: [{name: v1, port: 80}]\n",
    );
    let h = Harness::start(&yaml).await;
    let mut c = h.client().await;
    // (request path, path the backend sees, query it sees, host it sees)
    let cases = [
        ("/full/a/b", "/replaced", "", "internal.example"),
        ("/full", "/replaced", "", "internal.example"),
        ("/api/users?x=1", "/v2/users", "x=1", "web"),
        ("/api", "/v2", "", "web"),
        ("/api/", "/v2/", "", "web"),
        // Replacing a prefix with `/` never leaves a double slash.
        ("/strip/users", "/users", "", "web"),
        ("/strip/users/7?q=z", "/users/7", "q=z", "web"),
        ("/strip", "/", "", "web"),
    ];
    for (path, want_path, want_query, want_host) in cases {
        let r = send(&mut c, "GET", "web", path, &[]).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let seen = r.json();
        assert_eq!(seen["path"], want_path, "{path}");
        assert_eq!(seen["query"], want_query, "{path}");
        assert_eq!(seen["host"], want_host, "{path}");
    }
}

#[tokio::test]
async fn request_redirect_sets_status_and_exact_location() {
    let (b, mut yaml) = backends(&["web"]).await;
    let redirect = |prefix: &str, spec: &str| {
        format!("  - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]\n    filters: [{{type: RequestRedirect, requestRedirect: {spec}}}]\n")
    };
    let rules = [
        redirect(
            "/old",
            "{scheme: https, hostname: example.com, port: 8443, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}",
        ),
        redirect("/moved", "{path: {type: ReplaceFullPath, replaceFullPath: /elsewhere}}"),
        redirect("/secure", "{scheme: https, statusCode: 308}"),
        redirect("/host", "{hostname: other.example, statusCode: 303}"),
        redirect("/temp", "{port: 8080, statusCode: 307}"),
    ]
    .concat();
    yaml += &http_route("redirects", "web", &rules);
    let h = Harness::start(&yaml).await;
    let mut c = h.client().await;
    let cases = [
        ("web", "/old/page", 301, "https://example.com:8443/new/page"),
        // Defaults: 302, same scheme, host and (default) port.
        ("web", "/moved/x", 302, "http://web/elsewhere"),
        // https on its well-known port: no port in the Location.
        ("web:80", "/secure/x", 308, "https://web/secure/x"),
        ("web", "/host/x", 303, "http://other.example/host/x"),
        ("web", "/temp/x", 307, "http://web:8080/temp/x"),
    ];
    let mut wrong = Vec::new();
    for (host, path, status, location) in cases {
        let r = send(&mut c, "GET", host, path, &[]).await;
        assert_eq!(r.backend(), None, "redirects are answered by the proxy");
        let got = (r.status.as_u16(), r.header("location"));
        if got != (status, Some(location)) {
            wrong.push(format!(
                "{host}{path}: got {got:?}, want ({status}, {location:?})"
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(b[0].hits(), 0);
}

#[tokio::test]
async fn request_mirror_copies_to_shadow_and_half_with_percent() {
    let (b, mut yaml) = backends(&["web", "primary", "shadow", "half-shadow"]).await;
    yaml += &http_route(
        "mirror",
        "web",
        "  - matches: [{path: {type: PathPrefix, value: /all}}]\n    \
           filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}]\n    \
           backendRefs: [{name: primary, port: 80}]\n  \
         - matches: [{path: {type: PathPrefix, value: /half}}]\n    \
           filters: [{type: RequestMirror, requestMirror: {backendRef: {name: half-shadow, port: 80}, percent: 50}}]\n    \
           backendRefs: [{name: primary, port: 80}]\n",
    );
    let (primary, shadow, half) = (&b[1], &b[2], &b[3]);
    let h = Harness::start(&yaml).await;
    let mut c = h.client().await;

    let req = http::Request::builder()
        .method("POST")
        .uri("/all/orders?id=7")
        .header("host", "web")
        .header("x-client", "c1")
        .body(Full::new(Bytes::from_static(b"{\"order\":7}")))
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.backend(),
        Some("primary"),
        "the client gets the primary's answer"
    );
    wait_until("the mirror received its copy", || shadow.hits() == 1).await;
    let copy = shadow.seen().pop().unwrap();
    assert_eq!(copy.host, "web-shadow");
    assert_eq!(copy.method, "POST");
    assert_eq!(copy.path, "/all/orders");
    assert_eq!(&copy.body[..], b"{\"order\":7}");
    assert!(copy
        .headers
        .iter()
        .any(|(k, v)| k == "x-client" && v == "c1"));
    assert_eq!(primary.seen().pop().unwrap().host, "web");

    for i in 0..200 {
        let r = c.get("web", &format!("/half/{i}")).await.unwrap();
        assert_eq!(r.backend(), Some("primary"));
    }
    // Mirrors are fire-and-forget: wait for the count to settle.
    let mut last = usize::MAX;
    while half.hits() != last {
        last = half.hits();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // 100 expected, standard deviation ~7.
    assert!(
        (60..=140).contains(&last),
        "percent: 50 mirrored {last} of 200"
    );
    assert!(half.seen().iter().all(|s| s.host == "web-shadow"));
}

/// A gRPC-shaped request: POST, `application/grpc`, one empty message.
fn grpc_request(path: &str, headers: &[(&str, &str)]) -> http::Request<Full<Bytes>> {
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://greeter{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap()
}

#[tokio::test]
async fn grpc_route_matches_service_and_method() {
    let mut yaml = String::new();
    let mut keep = Vec::new();
    for name in ["greeter", "hello", "any-greeter", "admin", "variant"] {
        let b = Backend::http(name).await;
        yaml += &service(name, 80, "grpc");
        yaml += &workload(&format!("{name}-0"), name, 80, b.addr);
        keep.push(b);
    }
    yaml += "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: greeter}\nspec:\n  \
             parentRefs: [{kind: Service, name: greeter, port: 80}]\n  rules:\n  \
             - matches: [{method: {service: test.Greeter}}]\n    backendRefs: [{name: any-greeter, port: 80}]\n  \
             - matches: [{method: {service: test.Greeter, method: Hello}}]\n    backendRefs: [{name: hello, port: 80}]\n  \
             - matches: [{method: {type: RegularExpression, service: 'test\\.Admin(V1|V2)', method: 'Get.*'}}]\n    backendRefs: [{name: admin, port: 80}]\n  \
             - matches: [{headers: [{name: x-variant, value: b}]}]\n    backendRefs: [{name: variant, port: 80}]\n---\n";
    let h = Harness::start(&yaml).await;
    let mut c = H2Client::connect(h.outbound()).await.unwrap();
    let cases: [(&str, Headers<'_>, Option<&str>); 7] = [
        // Service and method beats service alone.
        ("/test.Greeter/Hello", &[], Some("hello")),
        ("/test.Greeter/Goodbye", &[], Some("any-greeter")),
        ("/test.AdminV2/GetUser", &[], Some("admin")),
        ("/test.AdminV3/GetUser", &[], None),
        ("/test.AdminV1/DeleteUser", &[], None),
        ("/test.Other/Call", &[("x-variant", "b")], Some("variant")),
        ("/test.Other/Call", &[], None),
    ];
    for (path, headers, want) in cases {
        let r = c.send(grpc_request(path, headers)).await.unwrap();
        assert_eq!(
            r.backend(),
            want,
            "{path} {headers:?}: {} {}",
            r.status,
            r.text()
        );
        if want.is_some() {
            let seen = r.json();
            assert_eq!(seen["path"], path);
            assert_eq!(seen["version"], "HTTP/2.0", "gRPC goes upstream as HTTP/2");
        }
    }
}

//! `meshwork demo`: the mesh on one machine with sample services, so a
//! newcomer sees routing, splitting, metrics and hot reload in a minute.
//!
//! Until the control plane exists this runs one standalone proxy in front of
//! in-process sample applications (HTTP services that say who they are and a
//! TCP echo service), from a mesh YAML file written next to the run, which
//! the user can edit while it runs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Local port of the demo TCP service `db`.
    #[arg(long, default_value_t = 15432)]
    db_port: u16,
    /// Where to write the demo's mesh YAML.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Exit after this many seconds (0: run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let log = proxy::logging::init("info", false);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let v1 = http_app("reviews-v1").await?;
        let v2 = http_app("reviews-v2").await?;
        let ratings = http_app("ratings").await?;
        let db = tcp_echo().await?;
        let dir = args
            .dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("meshwork-demo-{}", std::process::id())));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = dir.join("mesh.yaml");
        std::fs::write(&file, demo_yaml(v1, v2, ratings, db, args.db_port))
            .with_context(|| format!("writing {}", file.display()))?;
        let opts = proxy::Options {
            source: proxy::app::Source::File {
                path: file.clone(),
                poll_interval: Duration::from_millis(500),
            },
            outbound_addr: args.outbound_addr,
            inbound_addr: "127.0.0.1:0".parse()?,
            admin_addr: args.admin_addr,
            workload: None,
            access_log: proxy::accesslog::Target::File(dir.join("access.log")),
            detect_timeout: Duration::from_secs(1),
        };
        let proxy = proxy::Proxy::start(opts, log)
            .await
            .context("starting the demo proxy (is something else on its ports? try --outbound-addr/--admin-addr)")?;
        let out = proxy.listener("outbound_http").unwrap_or(args.outbound_addr);
        let admin = proxy.admin_addr();
        println!(
            r#"
meshwork demo is running: one sidecar proxy, three HTTP services, one TCP service.

  mesh config (edit it; changes apply live):  {file}
  access log (JSON lines):                    {log}
  admin:                                      http://{admin}/

Try:
  curl -s -H 'Host: reviews' http://{out}/                      # 90% reviews-v1, 10% reviews-v2
  curl -s -H 'Host: reviews' -H 'end-user: jason' http://{out}/ # always reviews-v2
  curl -s http://{out}/ -H 'Host: ratings.default:9080'         # service.namespace:port works too
  curl -si -H 'Host: nope' http://{out}/                        # 404 with x-meshwork-error: no_route
  curl -s --http2-prior-knowledge -H 'Host: ratings' http://{out}/
  echo hello | nc -q1 127.0.0.1 {db}                            # TCP service db (netcat)
  curl -s http://{admin}/metrics | grep meshwork_requests_total
  curl -s http://{admin}/config_dump
  meshwork validate -f {file}

Ctrl-C stops it.
"#,
            file = file.display(),
            log = dir.join("access.log").display(),
            db = args.db_port,
        );
        let stop = async {
            if args.seconds > 0 {
                tokio::time::sleep(Duration::from_secs(args.seconds)).await;
            } else {
                let _ = tokio::signal::ctrl_c().await;
            }
        };
        stop.await;
        proxy.shutdown(Duration::from_secs(5)).await;
        Ok(ExitCode::SUCCESS)
    })
}

fn demo_yaml(
    v1: SocketAddr,
    v2: SocketAddr,
    ratings: SocketAddr,
    db: SocketAddr,
    db_port: u16,
) -> String {
    format!(
        r#"# meshwork demo mesh: edit and save; the proxy applies changes live.
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {{name: reviews}}
spec:
  ports: [{{name: http, port: 9080, appProtocol: http}}]
---
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {{name: reviews-v1}}
spec:
  ports: [{{name: http, port: 9080, appProtocol: http}}]
---
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {{name: reviews-v2}}
spec:
  ports: [{{name: http, port: 9080, appProtocol: http}}]
---
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {{name: ratings}}
spec:
  ports: [{{name: http, port: 9080, appProtocol: http}}]
---
apiVersion: meshwork.dev/v1alpha1
kind: Service
metadata: {{name: db}}
spec:
  ports: [{{name: pg, port: 5432, appProtocol: tcp, localPort: {db_port}}}]
---
apiVersion: meshwork.dev/v1alpha1
kind: Workload
metadata: {{name: reviews-v1-0}}
spec: {{service: reviews-v1, address: {v1ip}, ports: {{http: {v1port}}}}}
---
apiVersion: meshwork.dev/v1alpha1
kind: Workload
metadata: {{name: reviews-v2-0}}
spec: {{service: reviews-v2, address: {v2ip}, ports: {{http: {v2port}}}}}
---
apiVersion: meshwork.dev/v1alpha1
kind: Workload
metadata: {{name: ratings-0}}
spec: {{service: ratings, address: {rip}, ports: {{http: {rport}}}}}
---
apiVersion: meshwork.dev/v1alpha1
kind: Workload
metadata: {{name: db-0}}
spec: {{service: db, address: {dip}, ports: {{pg: {dport}}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews}}
spec:
  parentRefs: [{{kind: Service, name: reviews, port: 9080}}]
  rules:
  - matches: [{{headers: [{{name: end-user, value: jason}}]}}]
    backendRefs: [{{name: reviews-v2, port: 9080}}]
  - backendRefs:
    - {{name: reviews-v1, port: 9080, weight: 90}}
    - {{name: reviews-v2, port: 9080, weight: 10}}
"#,
        v1ip = v1.ip(),
        v1port = v1.port(),
        v2ip = v2.ip(),
        v2port = v2.port(),
        rip = ratings.ip(),
        rport = ratings.port(),
        dip = db.ip(),
        dport = db.port(),
    )
}

/// A sample HTTP application that says who it is.
async fn http_app(name: &'static str) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = format!("{name}: {} {}\n", req.method(), req.uri().path());
                        let resp = hyper::Response::builder()
                            .header("x-app", name)
                            .body(Full::new(Bytes::from(body)));
                        Ok::<_, Infallible>(resp.unwrap_or_default())
                    },
                );
                let mut preface = [0u8; 3];
                let io = TokioIo::new(stream);
                let h2 = matches!(io.inner().peek(&mut preface).await, Ok(3) if &preface == b"PRI");
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, svc)
                    .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    Ok(addr)
}

async fn tcp_echo() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

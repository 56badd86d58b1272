//! `meshwork ca status|bundle|rotate` and `meshwork token create`: the
//! control plane's CA through its HTTP API, and where the CLI finds the
//! admin token.
//!
//! Admin token lookup (the first that applies): `--admin-token-file FILE`,
//! `$MESHWORK_ADMIN_TOKEN` (the token itself), `./meshwork-data/admin.token`
//! (the default `--data-dir` of `meshwork control`) when it exists.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::anyhow;
use hyper::Method;
use serde_json::Value;

use crate::resources::{block_on, Control, ControlArgs};

/// Environment variable holding the admin token itself.
const ADMIN_TOKEN_ENV: &str = "MESHWORK_ADMIN_TOKEN";
/// Where `meshwork control` keeps it with its default `--data-dir`.
const DEFAULT_TOKEN_FILE: &str = "meshwork-data/admin.token";

#[derive(Debug, clap::Args)]
pub struct CaArgs {
    #[command(subcommand)]
    command: CaCommand,
}

#[derive(Debug, clap::Subcommand)]
enum CaCommand {
    /// Show the roots (fingerprints, expiry), the rotation phase, counters and issued certificates.
    Status {
        /// Output: a summary (default) or `json`.
        #[arg(long, short = 'o', value_parser = ["json", "table"])]
        output: Option<String>,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Print the trust bundle (PEM, the signing root first): what proxies pass as --ca-bundle.
    Bundle {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Rotate the root: publish the new root beside the old, wait for proxies to ACK it,
    /// let it sign, and retire the old root after --grace.
    Rotate {
        /// How long the old root stays trusted once the new one signs (at least one SVID lifetime).
        #[arg(long, default_value = "1h", value_parser = crate::proxy_cmd::parse_duration)]
        grace: Duration,
        /// How long to wait for connected proxies to ACK the two-root bundle before switching.
        #[arg(long, default_value = "30s", value_parser = crate::proxy_cmd::parse_duration)]
        ack_timeout: Duration,
        #[command(flatten)]
        control: ControlArgs,
    },
}

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Debug, clap::Subcommand)]
enum TokenCommand {
    /// Create a join token for one workload identity; prints the token.
    Create {
        /// Namespace of the identity.
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// Service account of the identity.
        #[arg(long)]
        service_account: String,
        /// How long the token may be used: 90s, 30m, 24h.
        #[arg(long, default_value = "1h", value_parser = crate::proxy_cmd::parse_duration)]
        ttl: Duration,
        /// Allow more than one use (default: single use).
        #[arg(long)]
        reusable: bool,
        /// Output: the token alone (default) or `json`.
        #[arg(long, short = 'o', value_parser = ["json"])]
        output: Option<String>,
        #[command(flatten)]
        control: ControlArgs,
    },
}

/// The admin token per the lookup in the module docs; `Ok(None)` when
/// there is none (reads work without one).
pub(crate) fn admin_token(file: Option<&Path>) -> Result<Option<String>, String> {
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .map(|t| t.trim().to_string())
            .map_err(|e| format!("cannot read the admin token file {}: {e}", p.display()))
    };
    if let Some(p) = file {
        return read(p).map(Some);
    }
    if let Ok(t) = std::env::var(ADMIN_TOKEN_ENV) {
        if !t.trim().is_empty() {
            return Ok(Some(t.trim().to_string()));
        }
    }
    let default = Path::new(DEFAULT_TOKEN_FILE);
    if default.exists() {
        return read(default).map(Some);
    }
    Ok(None)
}

/// `meshwork ca ...`.
pub fn ca(args: CaArgs) -> anyhow::Result<ExitCode> {
    block_on(async move {
        match args.command {
            CaCommand::Status { output, control } => {
                let v = Control::new(&control).get_json("/api/v1/ca").await?;
                if output.as_deref() == Some("json") {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    print!("{}", status_text(&v));
                }
            }
            CaCommand::Bundle { control } => {
                let a = Control::new(&control)
                    .call(Method::GET, "/api/v1/ca/bundle", None)
                    .await?;
                if !a.status.is_success() {
                    return Err(a.error());
                }
                print!("{}", String::from_utf8_lossy(&a.body));
            }
            CaCommand::Rotate {
                grace,
                ack_timeout,
                control,
            } => {
                let body = serde_json::json!({
                    "graceSeconds": grace.as_secs(),
                    "ackTimeoutSeconds": ack_timeout.as_secs(),
                });
                eprintln!(
                    "rotating: publishing the new root, waiting up to {}s for proxies to ACK it...",
                    ack_timeout.as_secs()
                );
                let v = Control::new(&control)
                    .call(
                        Method::POST,
                        "/api/v1/ca/rotate",
                        Some(("application/json", serde_json::to_vec(&body)?)),
                    )
                    .await?
                    .json()?;
                println!("new root {} now signs", s(&v, "new_root"));
                let stragglers: Vec<&str> = v["stragglers"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                if !stragglers.is_empty() {
                    println!(
                        "these proxies had not ACKed the new bundle (they reject leaves from the new root until they do): {}",
                        stragglers.join(", ")
                    );
                }
                println!(
                    "the old root stays trusted until {}; follow with `meshwork ca status`",
                    s(&v, "retire_at")
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `meshwork token create ...`.
pub fn token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    let TokenCommand::Create {
        namespace,
        service_account,
        ttl,
        reusable,
        output,
        control,
    } = args.command;
    block_on(async move {
        let body = serde_json::to_vec(&control::api::TokenRequest {
            namespace,
            service_account,
            ttl_seconds: ttl.as_secs(),
            reusable,
        })?;
        let v = Control::new(&control)
            .call(
                Method::POST,
                "/api/v1/tokens",
                Some(("application/json", body)),
            )
            .await?
            .json()?;
        if output.as_deref() == Some("json") {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            let token = v["token"]
                .as_str()
                .ok_or_else(|| anyhow!("the control plane answered without a token: {v}"))?;
            println!("{token}");
            let left = v["expiresAt"].as_u64().unwrap_or(0).saturating_sub(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            );
            eprintln!(
                "join token for {}, {}, valid {}s",
                s(&v, "spiffeId"),
                if reusable { "reusable" } else { "single use" },
                left
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("-")
}

fn status_text(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "trust domain  {}", s(v, "trust_domain"));
    let _ = writeln!(
        out,
        "phase         {} (since {}){}",
        s(v, "phase"),
        s(v, "phase_started_at"),
        v["retire_at"]
            .as_str()
            .map(|t| format!(", old root retires at {t}"))
            .unwrap_or_default()
    );
    let _ = writeln!(out, "roots (bundle order):");
    for r in v["roots"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {}  not after {}{}",
            s(r, "fingerprint_sha256"),
            s(r, "not_after"),
            if r["signing"].as_bool() == Some(true) {
                "  (signing)"
            } else {
                ""
            }
        );
    }
    let c = &v["counters"];
    let _ = writeln!(
        out,
        "issued        {} with a token, {} renewals; {} TLS handshakes failed",
        c["issued"]["token"], c["issued"]["renewal"], c["tls_handshake_failures"]
    );
    if let Some(refused) = c["refused"].as_object().filter(|m| !m.is_empty()) {
        let list: Vec<String> = refused.iter().map(|(k, n)| format!("{k}={n}")).collect();
        let _ = writeln!(out, "refused       {}", list.join(" "));
    }
    let certs = v["certificates"].as_array().cloned().unwrap_or_default();
    if !certs.is_empty() {
        let _ = writeln!(out, "certificates (latest per identity):");
        for c in &certs {
            let _ = writeln!(
                out,
                "  {}  expires {}  issuer {}",
                s(c, "spiffe_id"),
                s(c, "not_after"),
                s(c, "issuer_fingerprint_sha256").get(..16).unwrap_or("-")
            );
        }
    }
    out
}

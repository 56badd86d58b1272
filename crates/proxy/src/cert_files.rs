//! A workload identity from certificate files (`meshwork proxy --cert
//! --key --ca-bundle`): for standalone proxies and tests, no control plane.
//!
//! The files are read once to start ([`load`]) and then polled
//! ([`watch`]); a change is installed atomically with
//! `WorkloadIdentity::update` / `set_bundle`, so new handshakes use it and
//! established connections keep theirs. A file that fails to parse is
//! logged and the previous certificate stays. Non-goals: renewal (whoever
//! writes the files renews), inotify (polling a few small files is cheap
//! and works on every filesystem).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use identity::{TrustBundle, WorkloadIdentity};

/// The three files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// Certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// Private key, PEM (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// Trusted roots, PEM (same meaning as with `--token`).
    pub ca_bundle: PathBuf,
}

/// Why the files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CertFilesError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--ca-bundle {path}: {message}; pass a PEM file of the mesh's root certificates (`meshwork ca bundle`)")]
    Bundle { path: PathBuf, message: String },
    #[error("--cert {cert} / --key {key}: {message}; pass the SVID chain (leaf first) and its private key")]
    Cert {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
}

#[derive(PartialEq, Eq)]
struct Contents {
    cert: String,
    key: String,
    bundle: String,
}

impl CertFiles {
    fn read(&self) -> Result<Contents, CertFilesError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CertFilesError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        Ok(Contents {
            cert: read(&self.cert)?,
            key: read(&self.key)?,
            bundle: read(&self.ca_bundle)?,
        })
    }

    fn bundle(&self, pem: &str) -> Result<TrustBundle, CertFilesError> {
        TrustBundle::from_pem(pem).map_err(|e| CertFilesError::Bundle {
            path: self.ca_bundle.clone(),
            message: e.to_string(),
        })
    }

    fn cert_error(&self, e: impl std::fmt::Display) -> CertFilesError {
        CertFilesError::Cert {
            cert: self.cert.clone(),
            key: self.key.clone(),
            message: e.to_string(),
        }
    }
}

/// Reads the files into a new identity.
pub fn load(files: &CertFiles) -> Result<Arc<WorkloadIdentity>, CertFilesError> {
    let c = files.read()?;
    let bundle = files.bundle(&c.bundle)?;
    WorkloadIdentity::with_cert(&c.cert, &c.key, bundle).map_err(|e| files.cert_error(e))
}

/// Polls the files every `every` and installs changes into `identity`.
/// Runs until the task is dropped.
pub async fn watch(identity: Arc<WorkloadIdentity>, files: CertFiles, every: Duration) {
    let mut last = files.read().ok();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = match files.read() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "certificate files unreadable; keeping the current certificate");
                continue;
            }
        };
        if last.as_ref() == Some(&now) {
            continue;
        }
        let result = files.bundle(&now.bundle).and_then(|bundle| {
            // Install the bundle first: a new leaf may chain to a new root.
            identity.set_bundle(bundle);
            identity
                .update(&now.cert, &now.key)
                .map_err(|e| files.cert_error(e))
        });
        match result {
            Ok(()) => tracing::info!(
                spiffe_id = ?identity.id().map(|i| i.to_string()),
                "certificate files reloaded"
            ),
            Err(e) => {
                // Half-written files are retried at the next tick.
                tracing::warn!(error = %e, "certificate files changed but cannot be used; keeping the current certificate");
                continue;
            }
        }
        last = Some(now);
    }
}

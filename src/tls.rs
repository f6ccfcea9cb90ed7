//! TLS and mutual TLS for the gRPC port (and TLS for the admin port), with certificates that
//! can be replaced while the daemon runs.
//!
//! The current rustls `ServerConfig`s sit behind a lock that is read once per accepted
//! connection. A reload (SIGHUP, or a changed file seen by [`ReloadableTls::watch`]) builds a
//! complete new config from the files and swaps it in; if the new files are bad, the old
//! config stays and the error is logged, so a botched certificate rotation never takes the
//! daemon down.
//! Established connections keep the config they were accepted with.
//!
//! The cluster's peer port loads its own [`ReloadableTls`] from the `[cluster]` files
//! ([`Section::Cluster`]): the same server side, with client certificates always required,
//! and beside it the rustls `ClientConfig` a node dials its peers with (the cluster CA as the
//! only root, the node's certificate as its client certificate), reloaded with it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::ticker::Ticker;

/// Where the certificate material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle for client certificates; `Some` turns on mutual TLS.
    pub client_ca: Option<PathBuf>,
    /// Which settings name the files: in error messages, and whether a client config for
    /// dialling peers is built too.
    pub section: Section,
}

/// Where a set of TLS files is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// The daemon's `tls_cert`, `tls_key`, `tls_client_ca`: the client and admin ports.
    Daemon,
    /// `cluster.tls_cert`, `cluster.tls_key`, `cluster.tls_ca`: the peer port, and the
    /// client side of the connections to peers.
    Cluster,
}

impl Section {
    /// The settings naming the certificate, the key and the CA bundle.
    fn names(self) -> [&'static str; 3] {
        match self {
            Section::Daemon => ["tls_cert", "tls_key", "tls_client_ca"],
            Section::Cluster => ["cluster.tls_cert", "cluster.tls_key", "cluster.tls_ca"],
        }
    }
}

/// Why certificate material could not be loaded. Names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {setting} {}: {source}", path.display())]
    Read {
        /// The config setting that names the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file held no usable PEM item.
    #[error("{setting} {} holds no {what}", path.display())]
    Empty {
        /// The config setting that names the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
    },
    /// rustls refused the material (key does not match the certificate, bad CA, ...).
    #[error("TLS configuration rejected: {0}")]
    Rustls(String),
}

/// Which port a handshake is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Port {
    /// gRPC: HTTP/2, and a client certificate when `client_ca` is set.
    Grpc,
    /// Admin: HTTP/1.1, no client certificate (Prometheus and probes scrape it).
    Admin,
}

/// The configs built from one set of files.
struct Configs {
    grpc: Arc<ServerConfig>,
    admin: Arc<ServerConfig>,
    /// For dialling peers ([`Section::Cluster`] only).
    dial: Option<Arc<ClientConfig>>,
}

/// The live TLS configuration.
pub struct ReloadableTls {
    files: TlsFiles,
    current: RwLock<Configs>,
    stamp: RwLock<Vec<Option<SystemTime>>>,
}

impl ReloadableTls {
    /// Loads the files; fails with a message naming the bad one.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let config = build(&files)?;
        let stamp = stamps(&files);
        Ok(ReloadableTls {
            files,
            current: RwLock::new(config),
            stamp: RwLock::new(stamp),
        })
    }

    /// Rebuilds from the files and swaps the result in. On error the old config stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = build(&self.files)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
        *self.stamp.write().unwrap_or_else(|p| p.into_inner()) = stamps(&self.files);
        Ok(())
    }

    /// Reloads if any file's modification time changed since the last load.
    pub(crate) fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let now = stamps(&self.files);
        let changed = *self.stamp.read().unwrap_or_else(|p| p.into_inner()) != now;
        changed.then(|| self.reload())
    }

    /// Reloads the files whenever they change, looking every `every`, until `stop` turns
    /// true: a certificate renewed on disk (by cert-manager, certbot, ...) takes effect
    /// without anyone sending SIGHUP.
    pub(crate) async fn watch(self: Arc<Self>, every: Duration, stop: watch::Receiver<bool>) {
        let mut ticker = Ticker::new(every, stop);
        while ticker.tick().await {
            match self.reload_if_changed() {
                Some(Ok(())) => tracing::info!("TLS files changed: reloaded"),
                Some(Err(e)) => {
                    tracing::error!(error = %e, "TLS files changed but cannot be loaded; keeping the previous certificate")
                }
                None => {}
            }
        }
    }

    /// The current client config for dialling peers; `None` unless these are the
    /// cluster's files.
    pub(crate) fn dial_config(&self) -> Option<Arc<ClientConfig>> {
        let configs = self.current.read().unwrap_or_else(|p| p.into_inner());
        configs.dial.clone()
    }

    /// An acceptor with the current certificate, for one connection to `port`.
    pub(crate) fn acceptor(&self, port: Port) -> TlsAcceptor {
        let configs = self.current.read().unwrap_or_else(|p| p.into_inner());
        TlsAcceptor::from(match port {
            Port::Grpc => configs.grpc.clone(),
            Port::Admin => configs.admin.clone(),
        })
    }
}

fn stamps(files: &TlsFiles) -> Vec<Option<SystemTime>> {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    .collect()
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        setting,
        path: path.to_owned(),
        source,
    })
}

fn certs(setting: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(setting, path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Empty {
            setting,
            path: path.to_owned(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

fn build(files: &TlsFiles) -> Result<Configs, TlsError> {
    let [cert_setting, key_setting, ca_setting] = files.section.names();
    let pair = format!("{cert_setting} and {key_setting}");
    let chain = certs(cert_setting, &files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read(key_setting, &files.key)?).map_err(|_| {
        TlsError::Empty {
            setting: key_setting,
            path: files.key.clone(),
            what: "PEM private key",
        }
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = || {
        ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))
    };
    let mut admin = builder()?
        .with_no_client_auth()
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| TlsError::Rustls(format!("{pair}: {e}")))?;
    admin.alpn_protocols = vec![b"http/1.1".to_vec()];
    let builder = builder()?;
    let roots = match &files.client_ca {
        None => None,
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certs(ca_setting, ca)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError::Rustls(format!("{ca_setting} {}: {e}", ca.display())))?;
            }
            Some(Arc::new(roots))
        }
    };
    let builder = match &roots {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| TlsError::Rustls(format!("{pair}: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let dial = match (files.section, roots) {
        (Section::Cluster, Some(roots)) => {
            let mut dial = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Rustls(e.to_string()))?
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Rustls(format!("{pair}: {e}")))?;
            dial.alpn_protocols = vec![b"h2".to_vec()];
            Some(Arc::new(dial))
        }
        _ => None,
    };
    Ok(Configs {
        grpc: Arc::new(config),
        admin: Arc::new(admin),
        dial,
    })
}

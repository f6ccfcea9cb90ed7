//! Certificates made in the test by rcgen, and TLS clients that use them.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use sessiond::config::Config;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A throwaway certificate authority.
pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) for `name`, signed by this CA.
    pub fn issue(&self, name: &str) -> (String, String) {
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

pub fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

pub async fn channel(
    addr: std::net::SocketAddr,
    ca: &Ca,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

/// A test config serving TLS with a `localhost` certificate from `ca`, and mutual TLS
/// against `client_ca` if given; the PEM files are written into `dir`.
pub fn tls_config(dir: &Path, ca: &Ca, client_ca: Option<&Ca>) -> Config {
    let (cert, key) = ca.issue("localhost");
    Config {
        tls_cert: write(dir, "server.pem", &cert),
        tls_key: write(dir, "server.key", &key),
        tls_client_ca: client_ca
            .map(|c| write(dir, "clients.pem", &c.pem))
            .unwrap_or_default(),
        ..super::test_config()
    }
}

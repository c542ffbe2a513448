//! The API's TLS identity: a configured certificate, or one generated on
//! first start and kept under the data dir.

use super::ApiError;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Identity {
    pub config: Arc<rustls::ServerConfig>,
    /// SHA-256 of the leaf certificate, `AB:CD:...`.
    pub fingerprint: String,
    /// Expiry of the leaf certificate (unix seconds), read from the file
    /// at every start, generated or configured; None if it cannot be read.
    pub not_after: Option<i64>,
    /// The certificate chain and key: also the node's identity on the peer link.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

pub use crate::tls::{fingerprint, not_after};

const VALID_YEARS: i64 = 10;

/// Writes a self-signed certificate for `names` (host names and IPs).
fn generate(cert: &Path, key: &Path, names: Vec<String>) -> Result<(), ApiError> {
    let tls_err = |e: rcgen::Error| ApiError::Tls(e.to_string());
    let key_pair = rcgen::KeyPair::generate().map_err(tls_err)?;
    let mut params = rcgen::CertificateParams::new(names).map_err(tls_err)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, crate::host::hostname());
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "NovaCron Edge");
    let (y, m, d) = crate::util::civil_date(-1);
    params.not_before = rcgen::date_time_ymd(y as i32, m as u8, d.min(28) as u8);
    let (y, m, d) = crate::util::civil_date(0);
    let (ey, em, ed) = (y + VALID_YEARS, m, d.min(28));
    params.not_after = rcgen::date_time_ymd(ey as i32, em as u8, ed as u8);
    let certificate = params.self_signed(&key_pair).map_err(tls_err)?;
    write_private(key, key_pair.serialize_pem().as_bytes())?;
    write_private(cert, certificate.pem().as_bytes())
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), ApiError> {
    crate::util::write_atomic(path, data, 0o600)
        .map_err(|e| ApiError::Tls(format!("{}: {e}", path.display())))
}

fn load(cert: &Path, key: &Path) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ApiError> {
    crate::tls::load_pem(cert, key).map_err(ApiError::Tls)
}

/// Loads the configured certificate, or the generated one (creating it on
/// first start), and builds a TLS 1.3-only server config.
pub fn identity(
    configured: Option<(PathBuf, PathBuf)>,
    tls_dir: &Path,
    listen: &[std::net::SocketAddr],
) -> Result<Identity, ApiError> {
    let (cert, key, generated) = match configured {
        Some((c, k)) => (c, k, false),
        None => (tls_dir.join("cert.pem"), tls_dir.join("key.pem"), true),
    };
    if generated && !(cert.exists() && key.exists()) {
        let mut names = vec![crate::host::hostname(), "localhost".to_string()];
        for addr in listen {
            if !addr.ip().is_unspecified() {
                names.push(addr.ip().to_string());
            }
        }
        names.push("127.0.0.1".into());
        names.dedup();
        generate(&cert, &key, names)?;
        tracing::info!(cert = %cert.display(), "generated a self-signed API certificate");
    }
    let (certs, key_der) = load(&cert, &key)?;
    let fingerprint = fingerprint(&certs[0]);
    let not_after = not_after(&certs[0]);
    if not_after.is_none() {
        tracing::warn!(cert = %cert.display(), "cannot read the certificate's expiry; it is not monitored");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ApiError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs.clone(), key_der.clone_key())
        .map_err(|e| ApiError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Identity { config: Arc::new(config), fingerprint, not_after, chain: certs, key: key_der })
}

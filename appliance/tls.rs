//! The TLS pieces the API server, the CLI, the Redfish client and the peer
//! link share: certificate fingerprints, expiry and pinning. (The API server's own
//! certificate is made and loaded in `api/tls.rs`.)

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Colon-separated upper-case hex SHA-256 of a DER certificate, the form
/// `openssl x509 -fingerprint -sha256` prints.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    digest.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// The `notAfter` of a DER certificate, in unix seconds.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Trusts exactly the certificate with the pinned SHA-256 fingerprint, or
/// with `fingerprint: None` any certificate (BMCs under `--insecure`); the
/// handshake signatures made with the certificate's key are checked either
/// way. TLS 1.2 only when `allow_tls12` (many BMCs speak nothing newer).
#[derive(Debug)]
pub struct CertPin {
    pub fingerprint: Option<String>,
    pub allow_tls12: bool,
    pub provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for CertPin {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.fingerprint {
            Some(fp) if fingerprint(end_entity) != *fp => {
                Err(rustls::Error::General("server certificate does not match the pinned fingerprint".into()))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if !self.allow_tls12 {
            return Err(rustls::Error::General("TLS 1.2 is not supported".into()));
        }
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Normalizes a fingerprint to `AB:CD:..` whatever separators were used.
pub fn normalize_fingerprint(fp: &str) -> String {
    let hexdigits: String = fp.chars().filter(|c| c.is_ascii_hexdigit()).collect::<String>().to_uppercase();
    hexdigits
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

/// A client config that trusts exactly the certificate with SHA-256
/// `fingerprint` (any certificate with `None`, for BMCs under `--insecure`),
/// offering the `alpn` protocols. TLS 1.3 only unless `allow_tls12`.
pub fn pinned_client_config(
    fingerprint: Option<&str>,
    allow_tls12: bool,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CertPin {
            fingerprint: fingerprint.map(normalize_fingerprint),
            allow_tls12,
            provider,
        }))
        .with_no_client_auth();
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(tls))
}

#[cfg(test)]
mod tests {
    #[test]
    fn fingerprints_normalize() {
        assert_eq!(super::normalize_fingerprint("ab:cd ef"), "AB:CD:EF");
        assert_eq!(super::normalize_fingerprint("ABCDEF"), "AB:CD:EF");
    }
}

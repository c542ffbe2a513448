//! The TLS pieces the API server, the CLI, the Redfish client and the peer
//! link share: certificate fingerprints, expiry and pinning. (The API server's own
//! certificate is made and loaded in `api/tls.rs`.)

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
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

/// As the server side of the peer link: a client must present exactly the
/// pinned certificate (no CA, no other certificate; without a fingerprint,
/// none is trusted), and prove its key in the TLS 1.3 handshake.
impl ClientCertVerifier for CertPin {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match &self.fingerprint {
            Some(fp) if fingerprint(end_entity) == *fp => Ok(ClientCertVerified::assertion()),
            _ => Err(rustls::Error::General(format!("client certificate {PIN_MISMATCH}"))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ServerCertVerifier::supported_verify_schemes(self)
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

/// A certificate chain and its private key from PEM files (the node's
/// identity: the API server, the peer link and the data plane use it).
pub fn load_pem(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let certs = rustls_pemfile::certs(&mut &read(cert)?[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", cert.display()));
    }
    let key = rustls_pemfile::private_key(&mut &read(key)?[..])
        .map_err(|e| format!("{}: {e}", key.display()))?
        .ok_or_else(|| format!("{}: no private key found", key.display()))?;
    Ok((certs, key))
}

/// A client config that trusts exactly the certificate with SHA-256
/// `fingerprint` (any certificate with `None`, for BMCs under `--insecure`),
/// offering the `alpn` protocols. TLS 1.3 only unless `allow_tls12`.
pub fn pinned_client_config(
    fingerprint: Option<&str>,
    allow_tls12: bool,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let mut tls = pinned_client_builder(fingerprint, allow_tls12)?.with_no_client_auth();
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(tls))
}

fn pinned_client_builder(
    fingerprint: Option<&str>,
    allow_tls12: bool,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CertPin {
            fingerprint: fingerprint.map(normalize_fingerprint),
            allow_tls12,
            provider,
        })))
}

/// Mutual TLS 1.3 for the peer link, client side: trusts only the peer's
/// pinned certificate and presents this node's own (`chain`, `key`).
pub fn mutual_client_config(
    fingerprint: &str,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[u8],
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let mut tls = pinned_client_builder(Some(fingerprint), false)?.with_client_auth_cert(chain, key)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(tls))
}

/// Mutual TLS 1.3 for the peer link, server side: presents this node's
/// certificate and requires the client to present the pinned one.
pub fn mutual_server_config(
    fingerprint: &str,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[u8],
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let pin = CertPin {
        fingerprint: Some(normalize_fingerprint(fingerprint)),
        allow_tls12: false,
        provider: provider.clone(),
    };
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(pin))
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(tls))
}

/// A certificate's SHA-256 fingerprint as a user, a config file or a join
/// code gives it, normalized to `AB:CD:..`; `None` unless it is exactly 32
/// bytes of hex (separated by `:`, `-` or spaces, or not at all): anything
/// else can never match and is a typo, not an unreachable server.
pub fn parse_fingerprint(fp: &str) -> Option<String> {
    let n = normalize_fingerprint(fp);
    let clean = fp.chars().all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '-' | ' '));
    (clean && n.len() == 32 * 3 - 1).then_some(n)
}

/// What every pin refusal of [`CertPin`] says, as server or client.
const PIN_MISMATCH: &str = "does not match the pinned fingerprint";

/// True when a TLS handshake (as tokio-rustls reports it) failed because
/// the other side's certificate is not the pinned one, rather than for a
/// network or protocol reason: the one answer that must not be retried on
/// another address.
pub fn is_pin_mismatch(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| matches!(r, rustls::Error::General(m) if m.contains(PIN_MISMATCH)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_normalize() {
        assert_eq!(super::normalize_fingerprint("ab:cd ef"), "AB:CD:EF");
        assert_eq!(super::normalize_fingerprint("ABCDEF"), "AB:CD:EF");
    }

    #[test]
    fn fingerprints_parse_only_when_whole() {
        let fp = fingerprint(b"x");
        assert_eq!(parse_fingerprint(&fp), Some(fp.clone()));
        assert_eq!(parse_fingerprint(&fp.replace(':', "").to_lowercase()), Some(fp.clone()));
        assert_eq!(parse_fingerprint(&fp.replace(':', "-")), Some(fp.clone()));
        assert_eq!(parse_fingerprint(&fp[3..]), None, "31 bytes");
        assert_eq!(parse_fingerprint(&format!("{fp}:00")), None, "33 bytes");
        assert_eq!(parse_fingerprint(&format!("zz{fp}")), None, "stray characters");
        assert_eq!(parse_fingerprint(""), None);
    }

    /// A self-signed server and a client pinned to `pin`, handshaking over
    /// an in-memory pipe: what the client's handshake returned.
    async fn handshake(pin: impl FnOnce(&str) -> String) -> std::io::Result<()> {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["node-a".into()]).unwrap().self_signed(&key).unwrap();
        let der = cert.der().clone();
        let key = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let server =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![der.clone()], key)
                .unwrap();
        let client = pinned_client_config(Some(&pin(&fingerprint(&der))), false, &[]).unwrap();
        let (c, s) = tokio::io::duplex(64 * 1024);
        let accept =
            tokio::spawn(async move { tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(s).await });
        let name = ServerName::try_from("node-a").unwrap();
        let result = tokio_rustls::TlsConnector::from(client).connect(name, c).await.map(|_| ());
        let _ = accept.await;
        result
    }

    #[tokio::test]
    async fn only_the_pinned_certificate_is_trusted() {
        handshake(|fp| fp.to_string()).await.expect("the pinned certificate was refused");
        // The same fingerprint as a user might type it.
        handshake(|fp| fp.replace(':', "").to_lowercase()).await.expect("a lower-case pin was refused");
        // Another pin: the first byte changed (to 01 when it already is 00,
        // or this failed once in 256 runs).
        let other = |fp: &str| format!("{}{}", if fp.starts_with("00") { "01" } else { "00" }, &fp[2..]);
        let e = handshake(other).await.expect_err("another certificate was trusted");
        assert!(is_pin_mismatch(&e), "{e}");
        assert!(!is_pin_mismatch(&std::io::Error::from(std::io::ErrorKind::ConnectionRefused)));
    }
}

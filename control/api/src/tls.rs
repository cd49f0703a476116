//! The rustls configurations of port 2377: the manager's server (mutual TLS, client
//! certificate optional so a joining node can connect), a node's client, and a joining
//! node's client that trusts the manager only if its CA matches the join token's digest.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The name the manager's certificate carries and agents ask for.
pub const MANAGER_SERVER_NAME: &str = "swarmnet-manager";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("parse {what}: {msg}")]
    Parse { what: &'static str, msg: String },
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A certificate and its key, both PEM.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertKey {
    pub fn cert_der(&self) -> Result<CertificateDer<'static>, TlsError> {
        parse_cert(&self.cert_pem)
    }
    pub fn key_der(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| TlsError::Parse { what: "private key", msg: e.to_string() })
    }
}

pub fn parse_cert(pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Parse { what: "certificate", msg: e.to_string() })
}

pub fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    store.add(parse_cert(ca_pem)?)?;
    Ok(store)
}

/// The manager's TLS server: its certificate chain is [node cert, CA] so a joining node can
/// check the CA against its token; client certificates are verified against the CA but are
/// optional at the TLS layer (a joining node has none yet); the manager refuses every
/// request but `join` from a client without one.
pub fn server_config(ca_pem: &str, me: &CertKey) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider()).allow_unauthenticated().build()?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![me.cert_der()?, parse_cert(ca_pem)?], me.key_der()?)?;
    Ok(cfg)
}

/// A node's client after joining: mutual TLS with its node certificate.
pub fn client_config(ca_pem: &str, me: &CertKey) -> Result<rustls::ClientConfig, TlsError> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(vec![me.cert_der()?], me.key_der()?)?;
    Ok(cfg)
}

/// A joining node's client: no certificate of its own; trusts the manager only if the CA
/// in the manager's chain has the digest from the join token.
pub fn join_client_config(ca_digest: &str) -> Result<rustls::ClientConfig, TlsError> {
    let verifier = TokenDigestVerifier { digest: ca_digest.to_ascii_lowercase(), provider: provider() };
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(cfg)
}

pub fn server_name() -> ServerName<'static> {
    ServerName::DnsName(rustls::pki_types::DnsName::try_from(MANAGER_SERVER_NAME).expect("static name is valid"))
}

#[derive(Debug)]
struct TokenDigestVerifier {
    digest: String,
    provider: Arc<CryptoProvider>,
}

pub const CA_MISMATCH: &str = "the manager's root CA does not match the CA digest in the join token (a token of another cluster, or not the manager you meant)";

impl ServerCertVerifier for TokenDigestVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates.iter().find(|c| sha256_hex(c.as_ref()) == self.digest).ok_or_else(|| rustls::Error::General(CA_MISMATCH.into()))?;
        let mut store = RootCertStore::empty();
        store.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(store), self.provider.clone()).build().map_err(|e| rustls::Error::General(format!("verifier: {e}")))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

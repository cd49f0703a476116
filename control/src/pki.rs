//! The cluster's PKI: a root CA made on the manager's first start, node certificates
//! (CN node id, OU role, O cluster id), and the rustls configurations for port 2377.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use ring::rand::SecureRandom;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::model::Role;

/// The name the manager's certificate carries and agents ask for.
pub const MANAGER_SERVER_NAME: &str = "swarmnet-manager";
const NODE_CERT_DAYS: i64 = 90;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("tls configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("parse {what}: {msg}")]
    Parse { what: &'static str, msg: String },
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("random number generator failed")]
    Random,
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `n` random characters of [0-9a-z].
pub fn random_base36(n: usize) -> Result<String, PkiError> {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let rng = ring::rand::SystemRandom::new();
    let mut out = String::with_capacity(n);
    while out.len() < n {
        let mut buf = [0u8; 32];
        rng.fill(&mut buf).map_err(|_| PkiError::Random)?;
        // 252 = 7 * 36: reject the top values so every character is equally likely.
        for b in buf.iter().filter(|b| **b < 252) {
            if out.len() < n {
                out.push(char::from(ALPHABET[usize::from(*b % 36)]));
            }
        }
    }
    Ok(out)
}

pub fn new_id() -> Result<String, PkiError> {
    random_base36(25)
}

fn ca_params(cluster_id: &str) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "swarmnet-root-ca");
    dn.push(DnType::OrganizationName, cluster_id);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2045, 1, 1);
    Ok(p)
}

/// A certificate and its key, both PEM.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertKey {
    pub fn cert_der(&self) -> Result<CertificateDer<'static>, PkiError> {
        parse_cert(&self.cert_pem)
    }
    pub fn key_der(&self) -> Result<PrivateKeyDer<'static>, PkiError> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| PkiError::Parse {
            what: "private key",
            msg: e.to_string(),
        })
    }
}

pub fn parse_cert(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Parse {
        what: "certificate",
        msg: e.to_string(),
    })
}

pub struct Ca {
    pub cluster_id: String,
    pub cert: CertKey,
    key: KeyPair,
    params: CertificateParams,
}

impl Ca {
    pub fn generate(cluster_id: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let params = ca_params(cluster_id)?;
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cluster_id: cluster_id.to_string(),
            cert: CertKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() },
            key,
            params,
        })
    }

    /// Loads a CA made by `generate`: the issuer fields are rebuilt from the cluster id, so
    /// certificates issued after a restart chain to the same root.
    pub fn load(cluster_id: &str, cert: CertKey) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(&cert.key_pem)?;
        Ok(Ca { cluster_id: cluster_id.to_string(), params: ca_params(cluster_id)?, cert, key })
    }

    /// SHA-256 of the CA certificate, as join tokens carry it.
    pub fn digest(&self) -> Result<String, PkiError> {
        Ok(sha256_hex(self.cert.cert_der()?.as_ref()))
    }

    /// Issues a node certificate: CN node id, OU role, O cluster id; client and server auth.
    pub fn issue_node(&self, node_id: &str, role: &Role, server_ip: Option<std::net::IpAddr>) -> Result<CertKey, PkiError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec![MANAGER_SERVER_NAME.to_string()])?;
        if let Some(ip) = server_ip {
            p.subject_alt_names.push(SanType::IpAddress(ip));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_id);
        dn.push(
            DnType::OrganizationalUnitName,
            match role {
                Role::Manager => "swarmnet-manager",
                Role::Worker => "swarmnet-worker",
            },
        );
        dn.push(DnType::OrganizationName, self.cluster_id.as_str());
        p.distinguished_name = dn;
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(NODE_CERT_DAYS);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(&key, &issuer)?;
        Ok(CertKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

fn roots(ca_pem: &str) -> Result<RootCertStore, PkiError> {
    let mut store = RootCertStore::empty();
    store.add(parse_cert(ca_pem)?)?;
    Ok(store)
}

/// The manager's TLS server: its certificate chain is [node cert, CA] so a joining node can
/// check the CA against its token; client certificates are verified against the CA but are
/// optional at the TLS layer (a joining node has none yet); the manager refuses every
/// request but `join` from a client without one.
pub fn server_config(ca_pem: &str, me: &CertKey) -> Result<rustls::ServerConfig, PkiError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
        .allow_unauthenticated()
        .build()?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![me.cert_der()?, parse_cert(ca_pem)?], me.key_der()?)?;
    Ok(cfg)
}

/// A node's client after joining: mutual TLS with its node certificate.
pub fn client_config(ca_pem: &str, me: &CertKey) -> Result<rustls::ClientConfig, PkiError> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(vec![me.cert_der()?], me.key_der()?)?;
    Ok(cfg)
}

/// A joining node's client: no certificate of its own; trusts the manager only if the CA
/// in the manager's chain has the digest from the join token.
pub fn join_client_config(ca_digest: &str) -> Result<rustls::ClientConfig, PkiError> {
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

pub const CA_MISMATCH: &str =
    "the manager's root CA does not match the CA digest in the join token (a token of another cluster, or not the manager you meant)";

impl ServerCertVerifier for TokenDigestVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| sha256_hex(c.as_ref()) == self.digest)
            .ok_or_else(|| rustls::Error::General(CA_MISMATCH.into()))?;
        let mut store = RootCertStore::empty();
        store.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(store), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(format!("verifier: {e}")))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_reload_issues_certificates_that_chain_to_the_same_root() {
        let ca = Ca::generate("cluster1").expect("ca");
        let reloaded = Ca::load("cluster1", ca.cert.clone()).expect("reload");
        assert_eq!(ca.digest().expect("d"), reloaded.digest().expect("d"));
        let node = reloaded.issue_node("node1", &Role::Worker, None).expect("issue");
        // A server config with the node cert, verified by a client trusting the original CA.
        server_config(&ca.cert.cert_pem, &node).expect("server");
        client_config(&ca.cert.cert_pem, &node).expect("client");
        let roots = roots(&ca.cert.cert_pem).expect("roots");
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .expect("verifier");
        v.verify_server_cert(&node.cert_der().expect("der"), &[], &server_name(), &[], UnixTime::now())
            .expect("node cert chains to the reloaded CA");
    }

    #[test]
    fn ids_are_base36() {
        let id = new_id().expect("id");
        assert_eq!(id.len(), 25);
        assert!(id.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()));
        assert_ne!(id, new_id().expect("id"));
    }
}

//! The cluster's CA: a root made on the manager's first start, and node certificates
//! (CN node id, OU role, O cluster id). The TLS configurations built on them are in
//! `swarmnet_api::tls`.

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use ring::rand::SecureRandom;
pub use swarmnet_api::tls::{sha256_hex, CertKey, TlsError, MANAGER_SERVER_NAME};

use crate::model::Role;

const NODE_CERT_DAYS: i64 = 90;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("random number generator failed")]
    Random,
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
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2045, 1, 1);
    Ok(p)
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
        Ok(Ca { cluster_id: cluster_id.to_string(), cert: CertKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() }, key, params })
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
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(NODE_CERT_DAYS);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(&key, &issuer)?;
        Ok(CertKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::UnixTime;
    use swarmnet_api::tls::{client_config, provider, roots, server_config, server_name};

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
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(std::sync::Arc::new(roots), provider()).build().expect("verifier");
        v.verify_server_cert(&node.cert_der().expect("der"), &[], &server_name(), &[], UnixTime::now()).expect("node cert chains to the reloaded CA");
    }

    #[test]
    fn ids_are_base36() {
        let id = new_id().expect("id");
        assert_eq!(id.len(), 25);
        assert!(id.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()));
        assert_ne!(id, new_id().expect("id"));
    }
}

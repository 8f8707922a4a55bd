//! Certificates: the names a node certificate carries, reading them back, a node's key and
//! signing request, and the CA signing one.

use std::path::Path;

use herd_storage::model::NodeId;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use super::{TlsError, NODE_CERT_DAYS};

/// The DNS name a node's certificate carries.
pub fn node_dns_name(cluster_id: &str, id: NodeId) -> String {
    format!("n{id}.{cluster_id}.herd")
}

/// The name a client asks for when any member of the cluster will do.
pub(super) fn any_member_name(cluster_id: &str) -> String {
    format!("any.{cluster_id}.herd")
}

pub(super) fn parse_node_dns_name(name: &str) -> Option<(NodeId, String)> {
    let rest = name.strip_prefix('n')?;
    let (id, rest) = rest.split_once('.')?;
    let cluster = rest.strip_suffix(".herd")?;
    Some((id.parse().ok()?, cluster.to_string()))
}

/// The node id and cluster id a node certificate names, its common name and its expiry.
pub(super) fn read_node_cert(der: &[u8]) -> Result<(NodeId, String, String, u64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let not_after = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0).saturating_mul(1000);
    let name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap_or_default().to_string();
    let san = cert.subject_alternative_name().map_err(|e| e.to_string())?.ok_or("no subject alternative name")?;
    for gn in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::DNSName(dns) = gn {
            if let Some((id, cluster)) = parse_node_dns_name(dns) {
                return Ok((id, cluster, name, not_after));
            }
        }
    }
    Err("names no herd node".into())
}

pub(super) fn cert_not_after(der: &[u8]) -> Result<u64, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    Ok(u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0).saturating_mul(1000))
}

pub(super) fn one_cert(pem: &str, what: &Path) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| TlsError::BadCertificate(what.to_path_buf(), e.to_string()))
}

/// SHA-256 of a certificate's DER, hex.
pub fn cert_hash(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn node_params(cluster_id: &str, id: NodeId, name: &str) -> Result<CertificateParams, TlsError> {
    let mut params =
        CertificateParams::new(vec![node_dns_name(cluster_id, id)]).map_err(|e| TlsError::Ca(e.to_string()))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.distinguished_name.push(DnType::OrganizationName, format!("herd cluster {cluster_id}"));
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(NODE_CERT_DAYS);
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

pub(super) fn random_serial() -> [u8; 16] {
    let mut b = [0u8; 16];
    rand::fill(&mut b[..]);
    b[0] &= 0x7f; // a positive integer
    b
}

/// A new key pair and a certificate signing request for it (the names in it are advisory: the
/// leader sets the certificate's names itself).
pub fn new_request(name: &str) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate().map_err(|e| TlsError::Request(e.to_string()))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| TlsError::Request(e.to_string()))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params.serialize_request(&key).map_err(|e| TlsError::Request(e.to_string()))?;
    Ok((key.serialize_pem(), csr.pem().map_err(|e| TlsError::Request(e.to_string()))?))
}

pub(super) fn sign_with(
    ca_pem: &str,
    ca_key_pem: &str,
    csr_pem: &str,
    cluster_id: &str,
    id: NodeId,
    name: &str,
) -> Result<String, TlsError> {
    let key = KeyPair::from_pem(ca_key_pem).map_err(|e| TlsError::Ca(e.to_string()))?;
    let issuer = Issuer::from_ca_cert_pem(ca_pem, key).map_err(|e| TlsError::Ca(e.to_string()))?;
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| TlsError::Request(e.to_string()))?;
    let params = node_params(cluster_id, id, name)?;
    let cert = params.signed_by(&csr.public_key, &issuer).map_err(|e| TlsError::Ca(e.to_string()))?;
    Ok(cert.pem())
}

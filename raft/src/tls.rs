//! Mutual TLS on the cluster port: the cluster CA, node certificates, enrolment, and the
//! [`Connector`]/[`Listener`] wrappers that put TLS 1.3 under the cluster protocol.
//!
//! ```text
//!   data_dir/tls/ca.crt     the cluster CA certificate (every node)
//!   data_dir/tls/ca.key     its key, mode 0600, coordinators only
//!   data_dir/tls/node.crt   this node's certificate, signed by the CA
//!   data_dir/tls/node.key   its key, mode 0600, generated on this node and never sent
//!   data_dir/tls/heartbeat.key  the cluster's heartbeat HMAC key (hex), mode 0600, every node
//!   data_dir/tls/coordinator.pub  the coordinators' X25519 public key (hex), every node
//!   data_dir/tls/coordinator.key  its secret key (hex), mode 0600, coordinators only
//! ```
//!
//! Secrets only coordinators need (other nodes' BMC passwords) travel in the Raft log — which
//! every node, learners too, receives and stores — sealed to the coordinator key
//! (libsodium sealed boxes: X25519 + XSalsa20-Poly1305, `crypto_box`): [`Pki::seal`] on the
//! node that owns the secret, [`Pki::unseal`] on the coordinator that uses it.
//!
//! A node certificate names its node as the DNS name `n<id>.<cluster_id>.herd` (ids are never
//! reused, so a removed node's certificate is revoked by its id alone) and carries the node's
//! name as its common name. Clients verify the server's certificate against the CA *and* the id
//! they meant to reach; servers verify the client's certificate against the CA, and the handler
//! checks that every request claims the id its certificate names (see `node::NodeHandler`).
//! A node with no certificate yet may only send a join's first phase, over a connection that
//! pins the CA certificate by the SHA-256 the join token carries.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use futures::future::BoxFuture;
use herd_storage::model::NodeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::transport::{BoxStream, Connector, Listener, Peer};

/// How long a node certificate is valid.
pub const NODE_CERT_DAYS: i64 = 365;
/// How long the cluster CA is valid.
pub const CA_DAYS: i64 = 3650;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is readable by group or others (mode {mode:o}): make it 0600")]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("{0}: not a certificate this cluster issues: {1}")]
    BadCertificate(PathBuf, String),
    #[error("certificate authority: {0}")]
    Ca(String),
    #[error("certificate request: {0}")]
    Request(String),
    #[error("this node holds no cluster CA key (only coordinators do)")]
    NoCaKey,
    #[error("this node has no cluster certificate yet")]
    NoCertificate,
}

/// What a node's certificate says, and when it and the CA expire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub cluster_id: String,
    pub node_id: NodeId,
    pub name: String,
    pub not_after_ms: u64,
    pub ca_not_after_ms: u64,
    /// SHA-256 of the CA certificate (DER), hex: the second part of a join token.
    pub ca_hash: String,
    pub has_ca_key: bool,
}

/// What a joining node receives once the leader has signed its request.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Enrolment {
    pub ca_pem: String,
    pub cert_pem: String,
    /// Only for coordinators (they sign the next joins when they lead).
    pub ca_key_pem: Option<String>,
    /// The cluster's heartbeat key, hex.
    pub heartbeat_key: String,
    /// The coordinators' public key, hex (every node seals its BMC password to it).
    pub coordinator_pub: String,
    /// Its secret key, hex: coordinators only.
    pub coordinator_key: Option<String>,
}

impl std::fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for Enrolment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key, whatever prints this.
        let held = |b: bool| if b { "<held>" } else { "none" };
        write!(
            f,
            "Enrolment {{ ca, cert, ca_key: {}, coordinator_key: {} }}",
            held(self.ca_key_pem.is_some()),
            held(self.coordinator_key.is_some())
        )
    }
}

struct Creds {
    info: CertInfo,
    ca_pem: String,
    server: Arc<ServerConfig>,
    member: Arc<ClientConfig>,
}

/// The node's TLS material and the rustls configurations built from it. Swapped whole when a
/// certificate is installed (init, join); connections already open keep their session.
pub struct Pki {
    dir: PathBuf,
    provider: Arc<CryptoProvider>,
    creds: RwLock<Option<Arc<Creds>>>,
    ca_key: RwLock<Option<String>>,
    heartbeat_key: RwLock<Option<[u8; 32]>>,
    coordinator_pub: RwLock<Option<[u8; 32]>>,
    coordinator_key: RwLock<Option<[u8; 32]>>,
    /// The CA hash a join in progress pins, before this node has a CA of its own.
    enrol_pin: Mutex<Option<[u8; 32]>>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
    move |source| TlsError::Io { path: path.to_path_buf(), source }
}

/// The DNS name a node's certificate carries.
pub fn node_dns_name(cluster_id: &str, id: NodeId) -> String {
    format!("n{id}.{cluster_id}.herd")
}

/// The name a client asks for when any member of the cluster will do.
fn any_member_name(cluster_id: &str) -> String {
    format!("any.{cluster_id}.herd")
}

fn parse_node_dns_name(name: &str) -> Option<(NodeId, String)> {
    let rest = name.strip_prefix('n')?;
    let (id, rest) = rest.split_once('.')?;
    let cluster = rest.strip_suffix(".herd")?;
    Some((id.parse().ok()?, cluster.to_string()))
}

/// The node id and cluster id a node certificate names, its common name and its expiry.
fn read_node_cert(der: &[u8]) -> Result<(NodeId, String, String, u64), String> {
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

fn cert_not_after(der: &[u8]) -> Result<u64, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    Ok(u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0).saturating_mul(1000))
}

fn one_cert(pem: &str, what: &Path) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| TlsError::BadCertificate(what.to_path_buf(), e.to_string()))
}

fn parse_key(hex_key: &str) -> Option<[u8; 32]> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_key.trim(), &mut key).ok()?;
    Some(key)
}

/// How a sealed secret starts (versioned; a BMC password that starts so is refused by the
/// config check).
pub const SEALED_PREFIX: &str = "sealed:v1:";

/// Whether a stored secret is sealed.
pub fn is_sealed(s: &str) -> bool {
    s.starts_with(SEALED_PREFIX)
}

/// SHA-256 of a certificate's DER, hex.
pub fn cert_hash(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Writes a file whole (temporary file, fsync, rename), with `mode` from its creation on.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(contents.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

/// Reads a key file, refusing one that group or others can read.
pub fn read_secret_file(path: &Path) -> Result<String, TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyMode { path: path.to_path_buf(), mode });
    }
    std::fs::read_to_string(path).map_err(io_err(path))
}

fn read_optional(path: &Path) -> Result<Option<String>, TlsError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TlsError::Io { path: path.to_path_buf(), source: e }),
    }
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

fn random_serial() -> [u8; 16] {
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

impl Pki {
    /// Loads what `dir` holds (nothing yet on a fresh node). Key files readable by group or
    /// others are refused, naming the file.
    pub fn open(dir: PathBuf) -> Result<Pki, TlsError> {
        let pki = Pki {
            dir,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            creds: RwLock::new(None),
            ca_key: RwLock::new(None),
            heartbeat_key: RwLock::new(None),
            coordinator_pub: RwLock::new(None),
            coordinator_key: RwLock::new(None),
            enrol_pin: Mutex::new(None),
        };
        let ca_key_path = pki.path("ca.key");
        if ca_key_path.exists() {
            *pki.ca_key.write().unwrap_or_else(|p| p.into_inner()) = Some(read_secret_file(&ca_key_path)?);
        }
        let hb_path = pki.path("heartbeat.key");
        if hb_path.exists() {
            let key = parse_key(&read_secret_file(&hb_path)?)
                .ok_or_else(|| TlsError::BadCertificate(hb_path.clone(), "not 64 hex digits".into()))?;
            *pki.heartbeat_key.write().unwrap_or_else(|p| p.into_inner()) = Some(key);
        }
        for (file, slot, secret) in
            [("coordinator.pub", &pki.coordinator_pub, false), ("coordinator.key", &pki.coordinator_key, true)]
        {
            let path = pki.path(file);
            let text = if secret && path.exists() { Some(read_secret_file(&path)?) } else { read_optional(&path)? };
            if let Some(text) = text {
                let key = parse_key(&text)
                    .ok_or_else(|| TlsError::BadCertificate(path.clone(), "not 64 hex digits".into()))?;
                *slot.write().unwrap_or_else(|p| p.into_inner()) = Some(key);
            }
        }
        let (Some(ca), Some(cert)) = (read_optional(&pki.path("ca.crt"))?, read_optional(&pki.path("node.crt"))?)
        else {
            return Ok(pki);
        };
        let key = read_secret_file(&pki.path("node.key"))?;
        pki.build(&ca, &cert, &key)?;
        Ok(pki)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// What this node's certificate says, once it has one.
    pub fn info(&self) -> Option<CertInfo> {
        self.creds.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|c| c.info.clone())
    }

    fn slot(&self, s: &RwLock<Option<[u8; 32]>>) -> Option<[u8; 32]> {
        *s.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Seals a secret for the coordinators (`sealed:v1:<hex>`), if this node has their key.
    pub fn seal(&self, secret: &str) -> Option<String> {
        let public = crypto_box::PublicKey::from_bytes(self.slot(&self.coordinator_pub)?);
        let sealed = public.seal(&mut crypto_box::aead::OsRng, secret.as_bytes()).ok()?;
        Some(format!("{SEALED_PREFIX}{}", hex::encode(sealed)))
    }

    /// Opens a sealed secret (coordinators only). Errors never include the secret.
    pub fn unseal(&self, sealed: &str) -> Result<String, String> {
        let hex_text = sealed.strip_prefix(SEALED_PREFIX).ok_or("not a sealed secret")?;
        let secret = self
            .slot(&self.coordinator_key)
            .ok_or("sealed for the coordinators; this node holds no coordinator key")?;
        let bytes = hex::decode(hex_text).map_err(|_| "a sealed secret that is not hex")?;
        let plain = crypto_box::SecretKey::from_bytes(secret)
            .unseal(&bytes)
            .map_err(|_| "a sealed secret this coordinator key cannot open")?;
        String::from_utf8(plain).map_err(|_| "a sealed secret that is not UTF-8".to_string())
    }

    /// The cluster's heartbeat key, once this node has one.
    pub fn heartbeat_key(&self) -> Option<[u8; 32]> {
        *self.heartbeat_key.read().unwrap_or_else(|p| p.into_inner())
    }

    fn creds(&self) -> Option<Arc<Creds>> {
        self.creds.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Builds the rustls configurations from PEM material and makes them current.
    fn build(&self, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let ca = one_cert(ca_pem, &self.path("ca.crt"))?;
        let cert = one_cert(cert_pem, &self.path("node.crt"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::BadCertificate(self.path("node.key"), e.to_string()))?;
        let (node_id, cluster_id, name, not_after_ms) =
            read_node_cert(&cert).map_err(|e| TlsError::BadCertificate(self.path("node.crt"), e))?;
        let ca_not_after_ms = cert_not_after(&ca).map_err(|e| TlsError::BadCertificate(self.path("ca.crt"), e))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone()).map_err(|e| TlsError::BadCertificate(self.path("ca.crt"), e.to_string()))?;
        let roots = Arc::new(roots);
        let bad = |e: rustls::Error| TlsError::Ca(e.to_string());
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), self.provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Ca(e.to_string()))?;
        let chain = vec![cert.clone(), ca.clone()];
        let server = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(bad)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(bad)?;
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, self.provider.clone())
            .build()
            .map_err(|e| TlsError::Ca(e.to_string()))?;
        let verifier = Arc::new(MemberVerifier { inner: server_verifier, any: any_member_name(&cluster_id) });
        let member = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(bad)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, key)
            .map_err(bad)?;
        let info = CertInfo {
            cluster_id,
            node_id,
            name,
            not_after_ms,
            ca_not_after_ms,
            ca_hash: cert_hash(&ca),
            has_ca_key: self.ca_key.read().unwrap_or_else(|p| p.into_inner()).is_some(),
        };
        let creds = Creds { info, ca_pem: ca_pem.to_string(), server: Arc::new(server), member: Arc::new(member) };
        *self.creds.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(creds));
        Ok(())
    }

    /// Creates the cluster CA, the heartbeat key and this node's certificate (`init-cluster`).
    /// Returns the CA hash. Blocking file IO: async callers run it on a blocking thread.
    pub fn create_cluster(&self, cluster_id: &str, id: NodeId, name: &str) -> Result<String, TlsError> {
        let ca_key = KeyPair::generate().map_err(|e| TlsError::Ca(e.to_string()))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| TlsError::Ca(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, format!("herd cluster {cluster_id} CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(CA_DAYS);
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        let ca = params.self_signed(&ca_key).map_err(|e| TlsError::Ca(e.to_string()))?;
        let (ca_pem, ca_key_pem) = (ca.pem(), ca_key.serialize_pem());
        let (key_pem, csr_pem) = new_request(name)?;
        let cert_pem = sign_with(&ca_pem, &ca_key_pem, &csr_pem, cluster_id, id, name)?;
        let mut hb = [0u8; 32];
        rand::fill(&mut hb[..]);
        let coordinator = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
        self.install(
            &Enrolment {
                ca_pem,
                cert_pem,
                ca_key_pem: Some(ca_key_pem),
                heartbeat_key: hex::encode(hb),
                coordinator_pub: hex::encode(coordinator.public_key().as_bytes()),
                coordinator_key: Some(hex::encode(coordinator.to_bytes())),
            },
            &key_pem,
        )?;
        Ok(cert_hash(ca.der()))
    }

    /// Signs a joining node's request (the leader, after the token was accepted). CPU only:
    /// no file is read.
    pub fn sign(&self, csr_pem: &str, cluster_id: &str, id: NodeId, name: &str) -> Result<Enrolment, TlsError> {
        let ca_key = self.ca_key.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or(TlsError::NoCaKey)?;
        let ca_pem = self.creds().ok_or(TlsError::NoCertificate)?.ca_pem.clone();
        let cert_pem = sign_with(&ca_pem, &ca_key, csr_pem, cluster_id, id, name)?;
        let heartbeat_key = hex::encode(self.heartbeat_key().ok_or(TlsError::NoCertificate)?);
        let coordinator_pub = hex::encode(self.slot(&self.coordinator_pub).ok_or(TlsError::NoCertificate)?);
        let coordinator_key = Some(hex::encode(self.slot(&self.coordinator_key).ok_or(TlsError::NoCaKey)?));
        Ok(Enrolment { ca_pem, cert_pem, ca_key_pem: Some(ca_key), heartbeat_key, coordinator_pub, coordinator_key })
    }

    /// Writes and loads this node's material (init, join). The CA key only on coordinators.
    /// Blocking file IO: async callers run it on a blocking thread.
    pub fn install(&self, e: &Enrolment, key_pem: &str) -> Result<(), TlsError> {
        let (ca_pem, cert_pem, ca_key_pem) = (&e.ca_pem, &e.cert_pem, e.ca_key_pem.as_deref());
        let hb = parse_key(&e.heartbeat_key)
            .ok_or_else(|| TlsError::BadCertificate(self.path("heartbeat.key"), "not 64 hex digits".into()))?;
        std::fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(&self.dir))?;
        }
        if let Some(k) = ca_key_pem {
            write_file(&self.path("ca.key"), k, 0o600)?;
            *self.ca_key.write().unwrap_or_else(|p| p.into_inner()) = Some(k.to_string());
        }
        let bad = |f: &str| TlsError::BadCertificate(self.path(f), "not 64 hex digits".into());
        let coordinator_pub = parse_key(&e.coordinator_pub).ok_or_else(|| bad("coordinator.pub"))?;
        write_file(&self.path("coordinator.pub"), &e.coordinator_pub, 0o644)?;
        *self.coordinator_pub.write().unwrap_or_else(|p| p.into_inner()) = Some(coordinator_pub);
        if let Some(k) = &e.coordinator_key {
            let key = parse_key(k).ok_or_else(|| bad("coordinator.key"))?;
            write_file(&self.path("coordinator.key"), k, 0o600)?;
            *self.coordinator_key.write().unwrap_or_else(|p| p.into_inner()) = Some(key);
        }
        write_file(&self.path("heartbeat.key"), &e.heartbeat_key, 0o600)?;
        *self.heartbeat_key.write().unwrap_or_else(|p| p.into_inner()) = Some(hb);
        write_file(&self.path("node.key"), key_pem, 0o600)?;
        write_file(&self.path("ca.crt"), ca_pem, 0o644)?;
        write_file(&self.path("node.crt"), cert_pem, 0o644)?;
        self.build(ca_pem, cert_pem, key_pem)
    }

    /// Replaces this node's key and certificate with renewed ones for the same node and CA
    /// (`herd cert rotate`). Blocking file IO.
    pub fn renew(&self, cert_pem: &str, key_pem: &str) -> Result<CertInfo, TlsError> {
        let creds = self.creds().ok_or(TlsError::NoCertificate)?;
        let der = one_cert(cert_pem, &self.path("node.crt"))?;
        let (id, cluster, _, _) =
            read_node_cert(&der).map_err(|e| TlsError::BadCertificate(self.path("node.crt"), e))?;
        if id != creds.info.node_id || cluster != creds.info.cluster_id {
            return Err(TlsError::BadCertificate(
                self.path("node.crt"),
                format!("the renewed certificate names node {id} of {cluster}, not this node"),
            ));
        }
        // Check it before anything is written: a bad renewal leaves the old files in place.
        let ca_pem = creds.ca_pem.clone();
        self.build(&ca_pem, cert_pem, key_pem)?;
        write_file(&self.path("node.key"), key_pem, 0o600)?;
        write_file(&self.path("node.crt"), cert_pem, 0o644)?;
        self.info().ok_or(TlsError::NoCertificate)
    }

    /// Pins the CA a join in progress expects (the token's second part).
    pub fn set_enrol_pin(&self, pin: Option<[u8; 32]>) {
        *self.enrol_pin.lock().unwrap_or_else(|p| p.into_inner()) = pin;
    }

    fn client_config(&self) -> io::Result<(Arc<ClientConfig>, Option<String>)> {
        if let Some(c) = self.creds() {
            return Ok((c.member.clone(), Some(c.info.cluster_id.clone())));
        }
        let pin = *self.enrol_pin.lock().unwrap_or_else(|p| p.into_inner());
        let Some(pin) = pin else {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "this node has no cluster certificate yet"));
        };
        let verifier = Arc::new(PinnedCa { pin, provider: self.provider.clone() });
        let config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(io::Error::other)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok((Arc::new(config), None))
    }
}

fn sign_with(
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

/// Verifies a server against the cluster CA; the name must be the node the client meant,
/// unless it asked for any member.
#[derive(Debug)]
struct MemberVerifier {
    inner: Arc<WebPkiServerVerifier>,
    any: String,
}

impl ServerCertVerifier for MemberVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if server_name.to_str() == self.any => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Enrolment: the server's chain must end in a CA whose SHA-256 is the token's, and its
/// certificate must be one that CA signed.
#[derive(Debug)]
struct PinnedCa {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

pub const CA_MISMATCH: &str = "the cluster's CA certificate does not match the join token's CA hash";

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| Sha256::digest(c.as_ref()).as_slice() == self.pin)
            .ok_or_else(|| rustls::Error::General(CA_MISMATCH.into()))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned()).map_err(|e| rustls::Error::General(format!("the pinned CA: {e}")))?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        // Any node of the cluster may answer a join: the chain matters, not the name.
        let (id, cluster, _, _) = read_node_cert(end_entity).map_err(rustls::Error::General)?;
        let name =
            ServerName::try_from(node_dns_name(&cluster, id)).map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], &name, ocsp_response, now)
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

/// Certificate problems are not worth retrying: they become `PermissionDenied` with the reason.
fn handshake_error(e: io::Error) -> io::Error {
    use rustls::AlertDescription as A;
    let untrusted = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).and_then(|r| match r {
        // Our own verifiers' reasons (a CA hash that does not match, a chain naming no node).
        rustls::Error::General(m) => Some(m.clone()),
        rustls::Error::InvalidCertificate(c) => Some(format!("the peer's certificate is not trusted: {c:?}")),
        rustls::Error::AlertReceived(
            a @ (A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateRequired
            | A::AccessDenied),
        ) => Some(format!("the peer refused this node's certificate ({a:?})")),
        _ => None,
    });
    match untrusted {
        Some(reason) => io::Error::new(io::ErrorKind::PermissionDenied, format!("TLS: {reason}")),
        None => e,
    }
}

/// Mutual TLS over another connector.
pub struct TlsConnector {
    pub inner: Arc<dyn Connector>,
    pub pki: Arc<Pki>,
}

impl Connector for TlsConnector {
    fn connect<'a>(&'a self, addr: &'a str, target: Option<NodeId>) -> BoxFuture<'a, io::Result<BoxStream>> {
        Box::pin(async move {
            let (config, cluster) = self.pki.client_config()?;
            let name = match (&cluster, target) {
                (Some(c), Some(id)) => node_dns_name(c, id),
                (Some(c), None) => any_member_name(c),
                // Enrolment: the pin decides, not the name.
                (None, _) => "enrol.herd".to_string(),
            };
            let name = ServerName::try_from(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let tcp = self.inner.connect(addr, target).await?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(handshake_error)?;
            Ok(Box::new(tls) as BoxStream)
        })
    }
}

/// Mutual TLS over another listener. The handshake runs in the connection's own task.
pub struct TlsListener {
    pub inner: Box<dyn Listener>,
    pub pki: Arc<Pki>,
}

impl Listener for TlsListener {
    fn accept(&self) -> BoxFuture<'_, io::Result<(BoxStream, String)>> {
        self.inner.accept()
    }

    fn local_addr(&self) -> io::Result<String> {
        self.inner.local_addr()
    }

    fn handshake(&self, stream: BoxStream) -> BoxFuture<'_, io::Result<(BoxStream, Peer)>> {
        Box::pin(async move {
            let creds = self.pki.creds().ok_or_else(|| {
                io::Error::new(io::ErrorKind::PermissionDenied, "this node has no cluster certificate yet")
            })?;
            let tls = tokio_rustls::TlsAcceptor::from(creds.server.clone()).accept(stream).await?;
            let peer = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                None => Peer::Anonymous,
                Some(cert) => {
                    let (id, cluster, _, _) =
                        read_node_cert(cert).map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e))?;
                    if cluster != creds.info.cluster_id {
                        return Err(io::Error::new(
                            io::ErrorKind::PermissionDenied,
                            "a certificate of another cluster",
                        ));
                    }
                    Peer::Node(id)
                }
            };
            Ok((Box::new(tls) as BoxStream, peer))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_round_trip() {
        assert_eq!(parse_node_dns_name(&node_dns_name("abc123", 7)), Some((7, "abc123".into())));
        assert_eq!(parse_node_dns_name("any.abc.herd"), None);
        assert_eq!(parse_node_dns_name("n7.abc.example"), None);
    }

    #[test]
    fn a_signed_certificate_names_the_node_the_leader_chose() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::open(dir.path().join("tls")).expect("open");
        let hash = pki.create_cluster("c0ffee", 1, "hv1").expect("create");
        let info = pki.info().expect("installed");
        assert_eq!((info.node_id, info.cluster_id.as_str(), info.name.as_str()), (1, "c0ffee", "hv1"));
        assert_eq!(info.ca_hash, hash);
        assert!(info.has_ca_key);
        // The request asks for another name; the certificate names id 5 and "hv5" anyway.
        let (_, csr) = new_request("hv1").expect("csr");
        let e = pki.sign(&csr, "c0ffee", 5, "hv5").expect("sign");
        let der = one_cert(&e.cert_pem, Path::new("x")).expect("pem");
        let (id, cluster, name, _) = read_node_cert(&der).expect("parse");
        assert_eq!((id, cluster.as_str(), name.as_str()), (5, "c0ffee", "hv5"));
        assert!(!e.to_string().contains("PRIVATE"), "Display never shows the key");
    }

    #[test]
    fn sealed_secrets_open_only_with_the_coordinator_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let coord = Pki::open(dir.path().join("c")).expect("open");
        coord.create_cluster("c0ffee", 1, "c1").expect("create");
        let sealed = coord.seal("hunter2").expect("sealed");
        assert!(is_sealed(&sealed) && !sealed.contains("hunter2"), "{sealed}");
        assert_ne!(coord.seal("hunter2"), Some(sealed.clone()), "randomised");
        assert_eq!(coord.unseal(&sealed).as_deref(), Ok("hunter2"));
        // A hypervisor: the public key only. It can seal, not open.
        let (key, csr) = new_request("h2").expect("csr");
        let mut e = coord.sign(&csr, "c0ffee", 2, "h2").expect("sign");
        e.ca_key_pem = None;
        e.coordinator_key = None;
        let hv = Pki::open(dir.path().join("h")).expect("open");
        hv.install(&e, &key).expect("install");
        let by_hv = hv.seal("pw-of-h2").expect("the hypervisor seals");
        assert!(hv.unseal(&by_hv).is_err_and(|m| m.contains("no coordinator key")));
        assert_eq!(coord.unseal(&by_hv).as_deref(), Ok("pw-of-h2"));
        let mut tampered = by_hv.clone();
        tampered.pop();
        tampered.push(if by_hv.ends_with('0') { '1' } else { '0' });
        assert!(coord.unseal(&tampered).is_err());
        assert!(!dir.path().join("h/coordinator.key").exists() && !dir.path().join("h/ca.key").exists());
        // Reopened from disk, the keys are still there.
        assert_eq!(Pki::open(dir.path().join("c")).expect("reopen").unseal(&by_hv).as_deref(), Ok("pw-of-h2"));
    }

    #[test]
    fn reopening_refuses_a_key_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = dir.path().join("tls");
        Pki::open(tls.clone()).expect("open").create_cluster("c0ffee", 1, "hv1").expect("create");
        assert_eq!(Pki::open(tls.clone()).expect("reopen").info().map(|i| i.node_id), Some(1));
        std::fs::set_permissions(tls.join("node.key"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = Pki::open(tls).err().expect("refused").to_string();
        assert!(err.contains("node.key") && err.contains("0600"), "{err}");
    }
}

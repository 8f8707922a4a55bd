//! `Pki`: this node's TLS material in `data_dir/tls/` (written whole, keys 0600 and refused
//! when group/world readable), the coordinators' sealing key, and the rustls configurations
//! built from them.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use herd_storage::model::NodeId;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SerialNumber};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::cert::{
    any_member_name, cert_hash, cert_not_after, new_request, one_cert, random_serial, read_node_cert, sign_with,
};
use super::verify::{MemberVerifier, PinnedCa};
use super::{CertInfo, Enrolment, TlsError, CA_DAYS};

pub(super) struct Creds {
    pub(super) info: CertInfo,
    ca_pem: String,
    pub(super) server: Arc<ServerConfig>,
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

    pub(super) fn creds(&self) -> Option<Arc<Creds>> {
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

    /// Whether `csr_pem` is a request this CA would sign for `name` (nothing is kept).
    pub fn check_request(&self, csr_pem: &str, cluster_id: &str, name: &str) -> Result<(), TlsError> {
        let ca_key = self.ca_key.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or(TlsError::NoCaKey)?;
        let ca_pem = self.creds().ok_or(TlsError::NoCertificate)?.ca_pem.clone();
        sign_with(&ca_pem, &ca_key, csr_pem, cluster_id, NodeId::MAX, name).map(|_| ())
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

    pub(super) fn client_config(&self) -> io::Result<(Arc<ClientConfig>, Option<String>)> {
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

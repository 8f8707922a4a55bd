//! Mutual TLS on the cluster port: the cluster CA, node certificates, enrolment, and the
//! [`Connector`](crate::transport::Connector)/[`Listener`](crate::transport::Listener) wrappers
//! that put TLS 1.3 under the cluster protocol.
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
//!
//! ```text
//!   mod.rs     errors, what a certificate says (CertInfo), what a joiner receives (Enrolment)
//!   cert.rs    certificates: names, reading, key + signing request, signing by the CA
//!   pki.rs     Pki: the files in data_dir/tls/, keys, sealing, the rustls configurations
//!   verify.rs  the server verifiers (member, pinned CA) and the TLS Connector/Listener
//! ```

use std::io;
use std::path::PathBuf;

use herd_storage::model::NodeId;

mod cert;
mod pki;
mod verify;

pub use cert::{cert_hash, new_request, node_dns_name};
pub use pki::{is_sealed, read_secret_file, Pki, SEALED_PREFIX};
pub use verify::{TlsConnector, TlsListener, CA_MISMATCH};

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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::cert::{one_cert, parse_node_dns_name, read_node_cert};
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

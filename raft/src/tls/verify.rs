//! Verifying servers (a member of the cluster, or any node under the CA a join token pins) and
//! the TLS [`Connector`]/[`Listener`] wrappers over another transport.

use std::io;
use std::sync::Arc;

use futures::future::BoxFuture;
use herd_storage::model::NodeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use super::cert::{any_member_name, node_dns_name, read_node_cert};
use super::Pki;
use crate::transport::{BoxStream, Connector, Listener, Peer};

/// Verifies a server against the cluster CA; the name must be the node the client meant,
/// unless it asked for any member.
#[derive(Debug)]
pub(super) struct MemberVerifier {
    pub(super) inner: Arc<WebPkiServerVerifier>,
    pub(super) any: String,
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
pub(super) struct PinnedCa {
    pub(super) pin: [u8; 32],
    pub(super) provider: Arc<CryptoProvider>,
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

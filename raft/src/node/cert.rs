//! Certificates: a node renewing its own (`herd cert rotate`, and by itself before expiry),
//! the leader signing a renewal, and the leader enrolling a joiner it has just registered.

use std::time::Duration;

use herd_storage::model::{NodeId, Role};
use herd_storage::types::TypeConfig;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::storage::RaftLogStorage;
use tokio::time::Instant;

use super::{ClusterNode, Member, NodeError};
use crate::network::CallError;
use crate::tls::{self, Enrolment};
use crate::transport::Peer;
use crate::wire::{JoinRequest, Rpc, RpcError, RpcReply};

impl<LS> ClusterNode<LS>
where
    LS: RaftLogStorage<TypeConfig> + Clone,
{
    /// Renews this node's certificate: a new key made here, the leader signs a request for it
    /// (asked directly, over the current certificate), and both replace the old ones.
    pub async fn renew_certificate(&self, timeout: Duration) -> Result<tls::CertInfo, NodeError> {
        let member = self.member().ok_or(NodeError::NotMember)?;
        let pki = self.pki.get().cloned().ok_or_else(|| NodeError::Tls("this node runs without TLS".into()))?;
        let (key, csr) = tls::new_request(&self.settings.name).map_err(|e| NodeError::Tls(e.to_string()))?;
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(50);
        let cert = loop {
            let m = member.raft.metrics().borrow_watched().clone();
            let leader = m
                .current_leader
                .and_then(|l| m.membership_config.membership().get_node(&l).map(|n| (l, n.addr.clone())));
            let err = match leader {
                None => "no leader known".to_string(),
                Some((l, addr)) => {
                    let mut client = self.client(addr, Some(l), member.cluster_id.clone());
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    match client.call(Rpc::RenewCert { csr: csr.clone() }, remaining).await {
                        Ok(RpcReply::Renewed(cert)) => break cert,
                        Ok(other) => return Err(NodeError::Refused(format!("unexpected renewal reply {other:?}"))),
                        Err(CallError::Remote(e)) if e.is_retryable() => e.to_string(),
                        Err(e @ CallError::Transport { .. }) => e.to_string(),
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            if Instant::now() + pause >= deadline {
                return Err(NodeError::NoLeader(timeout, err));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        };
        tokio::task::spawn_blocking(move || pki.renew(&cert, &key))
            .await
            .map_err(|e| NodeError::Tls(e.to_string()))?
            .map_err(|e| NodeError::Tls(e.to_string()))
    }

    /// The leader's side of a renewal: signs `csr` for the node whose certificate carried it.
    pub(super) fn sign_renewal(
        &self,
        member: &Member,
        from: Option<NodeId>,
        peer: Peer,
        csr: &str,
    ) -> Result<RpcReply, RpcError> {
        // Only the leader signs, only for the node whose certificate carried the
        // request, and only while that node is still one of the cluster's.
        let (Some(id), Peer::Node(certified)) = (from, peer) else {
            return Err(RpcError::Unauthenticated("a renewal needs the node's current certificate".into()));
        };
        if id != certified {
            return Err(RpcError::Unauthenticated("a renewal for another node".into()));
        }
        let m = member.raft.metrics().borrow_watched().clone();
        if m.current_leader != Some(member.id) {
            let addr =
                m.current_leader.and_then(|l| m.membership_config.membership().get_node(&l).map(|n| n.addr.clone()));
            return Err(RpcError::NotLeader { leader_id: m.current_leader, leader_addr: addr });
        }
        let name = member.view.read().state.node_by_id(id).map(|n| n.name.clone());
        let name = name.ok_or_else(|| RpcError::Refused(format!("node {id} is not a node of this cluster")))?;
        let pki = self.pki.get().ok_or_else(|| RpcError::Refused("this node runs without TLS".into()))?;
        let e = pki
            .sign(csr, &member.cluster_id, id, &name)
            .map_err(|e| RpcError::Refused(format!("cannot sign the certificate: {e}")))?;
        tracing::info!(node = %name, "renewed a node certificate");
        Ok(RpcReply::Renewed(e.cert_pem))
    }

    /// Whether `j` could be enrolled (checked before its registration is proposed): with TLS, a
    /// certificate request this node can sign.
    pub(super) fn check_enrolment(&self, member: &Member, j: &JoinRequest) -> Result<(), RpcError> {
        match (self.pki.get(), &j.csr) {
            (None, _) => Ok(()),
            (Some(_), None) => Err(RpcError::Refused("a join without a certificate request".into())),
            (Some(pki), Some(csr)) => pki
                .check_request(csr, &member.cluster_id, &j.name)
                .map_err(|e| RpcError::Refused(format!("cannot sign the certificate: {e}"))),
        }
    }

    /// A registered joiner's enrolment (with TLS): its certificate for `id`, signed from its
    /// request, and the cluster's keys; the CA and coordinator keys to coordinators only.
    pub(super) fn enrol(&self, member: &Member, j: &JoinRequest, id: NodeId) -> Result<Option<Enrolment>, RpcError> {
        match (self.pki.get(), &j.csr) {
            (None, _) => Ok(None),
            (Some(_), None) => Err(RpcError::Refused("a join without a certificate request".into())),
            (Some(pki), Some(csr)) => {
                let mut e = pki
                    .sign(csr, &member.cluster_id, id, &j.name)
                    .map_err(|e| RpcError::Refused(format!("cannot sign the certificate: {e}")))?;
                if j.role != Role::Coordinator {
                    e.ca_key_pem = None;
                    e.coordinator_key = None;
                }
                Ok(Some(e))
            }
        }
    }
}

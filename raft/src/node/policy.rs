//! What a join writes: the caller's policy, not this crate's. The leader checks a join's token
//! against what it already knows (so a stream of wrong joins does not grow the log), then
//! proposes the ops the [`JoinPolicy`] returns as one request; the model decides on them.

use herd_storage::model::{Command, NewNode, Op};

use crate::wire::JoinRequest;

/// Makes the ops the leader proposes for a join's first phase. They must answer
/// `Reply::NodeRegistered { id }` (the id the joiner gets) or fail with the model's error
/// (`ApplyError::BadToken` for a token the model refuses).
pub trait JoinPolicy: Send + Sync + 'static {
    /// The ops for `join`; `token_hash` is the hash of its token (the form the model stores).
    fn join_ops(&self, join: &JoinRequest, token_hash: &str) -> Vec<Op>;
}

/// The model's `RegisterNode`: the node as the joiner describes itself, under the token it
/// presented. What a node uses when its caller sets no policy.
#[derive(Clone, Copy, Debug, Default)]
pub struct RegisterJoiner;

impl JoinPolicy for RegisterJoiner {
    fn join_ops(&self, j: &JoinRequest, token_hash: &str) -> Vec<Op> {
        let node = NewNode { name: j.name.clone(), role: j.role, cluster_addr: j.cluster_addr.clone() };
        vec![Command::RegisterNode { node, token_hash: token_hash.to_string() }.into()]
    }
}

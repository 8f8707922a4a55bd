//! Test-only switches, each breaking one safety mechanism, so that the simulation can prove
//! every one of its invariants is able to fail (`tests/sim`, "broken variants").
//!
//! Only a build with the `breakage` feature (the simulation crate's) can turn one on; in any
//! other build [`is`] is a constant `false` and the checks compile away.

/// One deliberately broken mechanism.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Breakage {
    /// The primary gate keeps the duties without a quorum-confirmed lease.
    PrimaryIgnoresLease,
    /// The reconciler starts a moving VM before its old node released it.
    StartBeforeRelease,
    /// Fence verdicts from this coordinator's own view only (peer views ignored).
    FenceOnOwnView,
    /// "Linearizable" reads answered from local state without a read index.
    StaleReads,
    /// The reconciler never starts a VM.
    NoStarts,
    /// `vm modify` answers "done" without writing anything (an acknowledged write lost).
    AckWithoutCommit,
    /// A fence executor sends the power-off without its fencing token (no role check, no
    /// committed `ExecuteFence`).
    FenceWithoutToken,
    /// Every fifth change a member serves to followers outside Raft lacks its request.
    ChangesWithoutRequests,
    /// The primary records a client that self-fences on its session self-fenced without the
    /// coordinators' evidence (as if none could have acknowledged it for the whole wait).
    SelfFencedWithoutEvidence,
    /// A coordinator serves sessions as if always in contact with the leader.
    ServeWithoutContact,
    /// Clients are never sent outlines of other nodes' VMs (where those now belong).
    StaleOutlines,
}

#[cfg(feature = "breakage")]
thread_local! {
    static ACTIVE: std::cell::Cell<Option<Breakage>> = const { std::cell::Cell::new(None) };
}

/// Turns `b` on for this thread (the simulation runs every host on one thread).
#[cfg(feature = "breakage")]
pub fn set(b: Option<Breakage>) {
    ACTIVE.with(|a| a.set(b));
    herd_storage::changes::break_changes(b == Some(Breakage::ChangesWithoutRequests));
    herd_storage::changes::break_outlines(b == Some(Breakage::StaleOutlines));
    herd_raft::node::break_contact(b == Some(Breakage::ServeWithoutContact));
}

/// Whether `b` is on.
#[cfg(feature = "breakage")]
pub fn is(b: Breakage) -> bool {
    ACTIVE.with(|a| a.get() == Some(b))
}

/// Whether `b` is on: never, in this build.
#[cfg(not(feature = "breakage"))]
#[inline(always)]
pub fn is(_b: Breakage) -> bool {
    false
}

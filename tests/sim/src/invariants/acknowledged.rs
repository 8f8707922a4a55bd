//! Every acknowledged write is present afterwards, and the client history is linearizable.
//!
//! Why: an operator who was told "done" must be able to rely on it after any failover, and a
//! read must never show the cluster going back in time (a stale leader answering from its
//! old state would let an operator act on a VM's past). Each VM's `<description>` is a
//! register: written by `vm modify`, read by a linearizable `vm info`; the client's final reads
//! come after every write, so a lost acknowledged write shows up as a non-linearizable
//! history. Every acknowledged definition must still exist at the end.

use std::time::Duration;

use super::Violation;
use crate::client::History;
use crate::linearizable;

pub fn check(history: &History, now: Duration) -> Vec<Violation> {
    let mut out = Vec::new();
    for vm in &history.defined {
        let Some(ops) = history.ops.get(vm) else { continue };
        let final_read = ops.iter().rev().find(|o| matches!(o.kind, linearizable::OpKind::Read(_)));
        if final_read.is_none() {
            out.push(Violation {
                invariant: "acknowledged",
                at: now,
                detail: format!("{vm}: no successful read at all"),
            });
        }
        if let Some(linearizable::Op { kind: linearizable::OpKind::Read(None), .. }) = final_read {
            out.push(Violation {
                invariant: "acknowledged",
                at: now,
                detail: format!("{vm}: defined (acknowledged) but its register is gone at the end"),
            });
        }
        // The define is the first write; the register starts empty.
        match linearizable::check(None, ops) {
            Ok(true) => {}
            Ok(false) => out.push(Violation {
                invariant: "linearizable",
                at: now,
                detail: format!("{vm}: history of {} operations is not linearizable: {ops:?}", ops.len()),
            }),
            Err(e) => out.push(Violation { invariant: "linearizable", at: now, detail: format!("{vm}: {e}") }),
        }
    }
    out
}

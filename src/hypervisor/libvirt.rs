//! libvirt through the `virt` crate: one connection per node, every call on a blocking thread
//! behind the panic boundary with a deadline.
//!
//! Traps handled (seen live, `../shared/notes/hw-stack.md` §5): libvirt prints every error on
//! stderr unless its error callback is cleared; `Domain::state()` returns `Unknown` instead of an
//! error for a vanished domain, so states come from `info()`; `Connect`'s drop panics if the
//! close fails (the boundary contains it). The test driver cannot migrate: `migrate_live` is
//! refused there, so the reconciler falls back to a shutdown migration (or aborts a live-only move).

use std::sync::{Arc, Once};
use std::time::Duration;

use futures::future::BoxFuture;
use herd_storage::model::{ActualState, Arrival};
use virt::connect::Connect;
use virt::domain::DomainState;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

use super::{Domain, Hypervisor, HypervisorError};
use crate::boundary;

/// Deadline of one libvirt call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

static QUIET: Once = Once::new();

/// A node's libvirt connection.
pub struct Libvirt {
    conn: Arc<Connect>,
}

fn actual(state: virt::domain::DomainStateEnum) -> ActualState {
    match state {
        Enum::Known(DomainState::Running | DomainState::Blocked) => ActualState::Running,
        Enum::Known(DomainState::Paused | DomainState::PMSuspended) => ActualState::Paused,
        Enum::Known(DomainState::Shutdown | DomainState::Shutoff) => ActualState::Shutoff,
        Enum::Known(DomainState::Crashed) => ActualState::Crashed,
        _ => ActualState::Unknown,
    }
}

fn refused(op: &'static str, name: &str, e: virt::error::Error) -> HypervisorError {
    if matches!(e.code(), Enum::Known(ErrorNumber::NoDomain)) {
        HypervisorError::NoDomain(name.to_string())
    } else {
        HypervisorError::Refused { op, name: name.to_string(), message: e.message().to_string() }
    }
}

fn bounded(e: boundary::BoundaryError) -> HypervisorError {
    HypervisorError::Unavailable(e.to_string())
}

impl Libvirt {
    /// Opens `uri` (e.g. `qemu:///system`, `test:///abs/node.xml`, `test+unix:///default?socket=…`).
    pub async fn open(uri: &str) -> Result<Libvirt, HypervisorError> {
        QUIET.call_once(virt::error::clear_error_callback);
        let owned = uri.to_string();
        let conn = boundary::run(crate::boundary::Library::Libvirt, "libvirt open", CALL_TIMEOUT, move || {
            Connect::open(Some(&owned))
        })
        .await
        .map_err(bounded)?
        .map_err(|e| HypervisorError::Unavailable(format!("{uri}: {}", e.message())))?;
        Ok(Libvirt { conn: Arc::new(conn) })
    }

    /// Runs `f` on a domain looked up by name.
    async fn on_domain(
        &self,
        op: &'static str,
        name: &str,
        f: impl FnOnce(&virt::domain::Domain) -> Result<(), virt::error::Error> + Send + 'static,
    ) -> Result<(), HypervisorError> {
        let (conn, owned) = (self.conn.clone(), name.to_string());
        boundary::run(crate::boundary::Library::Libvirt, op, CALL_TIMEOUT, move || {
            let dom = conn.lookup_domain_by_name(&owned)?;
            f(&dom)
        })
        .await
        .map_err(bounded)?
        .map_err(|e| refused(op, name, e))
    }
}

impl Hypervisor for Libvirt {
    fn list(&self) -> BoxFuture<'_, Result<Vec<Domain>, HypervisorError>> {
        let conn = self.conn.clone();
        Box::pin(async move {
            boundary::run(crate::boundary::Library::Libvirt, "libvirt list", CALL_TIMEOUT, move || {
                let mut out = Vec::new();
                for d in conn.list_all_domains(0)? {
                    // A domain can vanish between the list and the look: skip it.
                    let (Ok(name), Ok(uuid), Ok(info)) = (d.name(), d.uuid_string(), d.info()) else { continue };
                    out.push(Domain { name, uuid, state: actual(info.state), id: d.id() });
                }
                Ok(out)
            })
            .await
            .map_err(bounded)?
            .map_err(|e: virt::error::Error| HypervisorError::Unavailable(e.message().to_string()))
        })
    }

    fn define<'a>(&'a self, xml: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        let (conn, owned) = (self.conn.clone(), xml.to_string());
        Box::pin(async move {
            boundary::run(crate::boundary::Library::Libvirt, "libvirt define", CALL_TIMEOUT, move || {
                conn.define_domain_xml(&owned).map(|_| ())
            })
            .await
            .map_err(bounded)?
            .map_err(|e| HypervisorError::Refused {
                op: "define",
                name: String::new(),
                message: e.message().to_string(),
            })
        })
    }

    fn start<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(self.on_domain("start", name, |d| d.create().map(|_| ())))
    }

    fn shutdown<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(self.on_domain("shutdown", name, |d| d.shutdown().map(|_| ())))
    }

    fn destroy<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(self.on_domain("destroy", name, |d| d.destroy().map(|_| ())))
    }

    fn undefine<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(self.on_domain("undefine", name, |d| d.undefine().map(|_| ())))
    }

    /// `virDomainGetJobStats(COMPLETED)`: an incoming migration's statistics, kept by the
    /// destination after it completed. Read through [`completed_job`], not `virt`'s
    /// `job_stats` (it builds a `Vec` from libvirt's pointer, null when there are no
    /// statistics: a precondition failure that aborts the process, seen live).
    fn arrival<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Arrival>, HypervisorError>> {
        let (conn, owned) = (self.conn.clone(), name.to_string());
        Box::pin(async move {
            boundary::run(crate::boundary::Library::Libvirt, "libvirt job stats", CALL_TIMEOUT, move || {
                let dom = conn.lookup_domain_by_name(&owned)?;
                let job = completed_job(&dom)?;
                let incoming = job.kind == virt::sys::VIR_DOMAIN_JOB_COMPLETED as i32
                    && job.operation == Some(virt::sys::VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN as i32);
                Ok(incoming.then_some(Arrival { live: true, downtime_ms: job.downtime_ms, job_ms: job.elapsed_ms }))
            })
            .await
            .map_err(bounded)?
            .map_err(|e| refused("job stats", name, e))
        })
    }

    /// `virDomainAbortJob`, which the `virt` crate does not wrap: the one `unsafe` call of
    /// this module, on a domain handle the closure owns, behind the panic boundary.
    #[allow(unsafe_code)]
    fn abort_job<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(self.on_domain("abort job", name, |d| {
            // SAFETY: `d` is a live domain handle for the duration of the call; libvirt only
            // reads it, and a failure is reported through its thread-local last error.
            let r = unsafe { virt::sys::virDomainAbortJob(d.as_ptr()) };
            if r < 0 {
                Err(virt::error::Error::last_error())
            } else {
                Ok(())
            }
        }))
    }

    /// `virDomainMigrateToURI` peer to peer: the source libvirtd drives the migration to
    /// `dest_uri`; the domain is made persistent there and undefined here. Coded against
    /// libvirt's API; real guests move in the cluster test t97, the test driver refuses.
    fn migrate_live<'a>(
        &'a self,
        name: &'a str,
        dest_uri: &'a str,
        deadline: Duration,
    ) -> BoxFuture<'a, Result<(), HypervisorError>> {
        let (conn, owned, dest) = (self.conn.clone(), name.to_string(), dest_uri.to_string());
        Box::pin(async move {
            let flags = virt::sys::VIR_MIGRATE_LIVE
                | virt::sys::VIR_MIGRATE_PEER2PEER
                | virt::sys::VIR_MIGRATE_PERSIST_DEST
                | virt::sys::VIR_MIGRATE_UNDEFINE_SOURCE;
            boundary::run(crate::boundary::Library::Libvirt, "libvirt migrate", deadline, move || {
                conn.lookup_domain_by_name(&owned)?.migrate_to_uri(&dest, flags, None, 0)
            })
            .await
            // Past the deadline the job may still finish: `Unavailable` says the outcome is unknown.
            .map_err(bounded)?
            .map_err(|e| refused("migrate", name, e))
        })
    }
}

/// What herd reads of a domain's last completed job.
struct CompletedJob {
    kind: i32,
    operation: Option<i32>,
    downtime_ms: Option<u64>,
    elapsed_ms: Option<u64>,
}

/// The last completed job of `dom`, through libvirt's own typed-parameter accessors;
/// libvirt's array is freed by libvirt.
#[allow(unsafe_code)]
fn completed_job(dom: &virt::domain::Domain) -> Result<CompletedJob, virt::error::Error> {
    use std::os::raw::{c_int, c_ulonglong};
    let mut kind: c_int = 0;
    let mut params: virt::sys::virTypedParameterPtr = std::ptr::null_mut();
    let mut n: c_int = 0;
    // SAFETY: `dom` is a live handle; libvirt allocates `params` (or leaves it null with n = 0)
    // and reports a failure through its thread-local last error.
    let r = unsafe {
        virt::sys::virDomainGetJobStats(
            dom.as_ptr(),
            &mut kind,
            &mut params,
            &mut n,
            virt::sys::VIR_DOMAIN_JOB_STATS_COMPLETED,
        )
    };
    if r < 0 {
        return Err(virt::error::Error::last_error());
    }
    let (mut operation, mut downtime, mut elapsed): (c_int, c_ulonglong, c_ulonglong) = (0, 0, 0);
    // SAFETY: `params`/`n` are what libvirt returned (null with 0 is accepted: the getters
    // find nothing); the names are NUL-terminated literals; the array is freed once, here.
    let (has_op, has_downtime, has_elapsed) = unsafe {
        let op = virt::sys::virTypedParamsGetInt(params, n, c"operation".as_ptr(), &mut operation);
        let dt = virt::sys::virTypedParamsGetULLong(params, n, c"downtime".as_ptr(), &mut downtime);
        let el = virt::sys::virTypedParamsGetULLong(params, n, c"time_elapsed".as_ptr(), &mut elapsed);
        virt::sys::virTypedParamsFree(params, n);
        (op == 1, dt == 1, el == 1)
    };
    Ok(CompletedJob {
        kind,
        operation: has_op.then_some(operation),
        downtime_ms: has_downtime.then_some(downtime),
        elapsed_ms: has_elapsed.then_some(elapsed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xml(name: &str, uuid: &str) -> String {
        format!(
            "<domain type='test'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>256</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>"
        )
    }

    /// The real libvirt library, with its test driver on a private node file.
    #[tokio::test]
    async fn lifecycle_against_libvirts_test_driver() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = dir.path().join("node.xml");
        std::fs::write(&node, "<?xml version='1.0'?><node><cpu><mhz>2400</mhz><model>x86_64</model><active>4</active><nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>1</threads></cpu><memory>8388608</memory></node>").expect("node file");
        let lv = Libvirt::open(&format!("test://{}", node.display())).await.expect("open");
        assert!(lv.list().await.expect("list").is_empty());
        lv.define(&xml("vm1", "11111111-2222-3333-4444-555555555555")).await.expect("define");
        let listed = lv.list().await.expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].name.as_str(), listed[0].state), ("vm1", ActualState::Shutoff));
        lv.start("vm1").await.expect("start");
        let running = lv.list().await.expect("list");
        assert_eq!(running[0].state, ActualState::Running);
        // A domain started here has no incoming migration (no statistics: libvirt's array is
        // null — `virt`'s own reader aborted the process on that).
        assert!(matches!(lv.arrival("vm1").await, Ok(None) | Err(HypervisorError::Refused { .. })));
        assert!(running[0].id.is_some());
        lv.shutdown("vm1").await.expect("shutdown");
        assert_eq!(lv.list().await.expect("list")[0].state, ActualState::Shutoff);
        lv.start("vm1").await.expect("start again");
        lv.destroy("vm1").await.expect("destroy");
        lv.undefine("vm1").await.expect("undefine");
        assert!(lv.list().await.expect("list").is_empty());
        // A vanished domain is NoDomain (not a state of Unknown); bad XML is a refusal.
        assert_eq!(lv.start("vm1").await, Err(HypervisorError::NoDomain("vm1".into())));
        assert!(matches!(lv.define("<domain").await, Err(HypervisorError::Refused { .. })));
    }

    #[tokio::test]
    async fn a_bad_uri_is_a_clear_error() {
        let e = Libvirt::open("test:///no/such/dir/node.xml").await.err().expect("refused");
        assert!(matches!(e, HypervisorError::Unavailable(ref m) if m.contains("test:///no/such")), "{e}");
    }
}

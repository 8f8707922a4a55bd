//! One unprivileged libvirtd per node, holding libvirt's test driver (`test+unix:///default`):
//! the node's domains outlive its herd process (so adoption after a restart can be tested), and
//! the test watches every node's domains through connections of its own (an independent oracle).
//! The daemon runs as `nobody` (libvirtd as root wants the qemu driver's user); the harness
//! holds a connection for the node's lifetime (the test driver's shared state lives only while
//! a client is connected), and kills the daemon on drop.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virt::connect::Connect;

use crate::harness::wait_until;

/// Whether libvirtd tests can run here; says why not, loudly.
pub fn available(test: &str) -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    let libvirtd = Command::new("sh").args(["-c", "command -v libvirtd"]).output().is_ok_and(|o| o.status.success());
    let nobody = nix::unistd::User::from_name("nobody").ok().flatten().is_some();
    if !(root && libvirtd && nobody) {
        crate::harness::skip(
            test,
            &format!("needs root, libvirtd (libvirt-daemon) and a `nobody` user (root: {root}, libvirtd: {libvirtd}, nobody: {nobody})"),
        );
        return false;
    }
    true
}

pub struct Libvirtd {
    dir: PathBuf,
    child: Child,
    /// The harness's own connection: keeps the node's state alive and lets the test look.
    pub conn: Connect,
}

impl Libvirtd {
    /// Starts a libvirtd in `dir` (created, owned by nobody).
    pub fn start(dir: &Path) -> Libvirtd {
        let nobody = nix::unistd::User::from_name("nobody").ok().flatten().expect("nobody");
        for sub in ["sock", "home", "run"] {
            std::fs::create_dir_all(dir.join(sub)).expect("libvirtd dirs");
        }
        let conf = format!(
            "unix_sock_dir = \"{0}/sock\"\nunix_sock_rw_perms = \"0777\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\nlog_outputs = \"3:file:{0}/libvirtd.log\"\n",
            dir.display()
        );
        std::fs::write(dir.join("libvirtd.conf"), conf).expect("libvirtd.conf");
        for p in [dir.to_path_buf(), dir.join("sock"), dir.join("home"), dir.join("run"), dir.join("libvirtd.conf")] {
            nix::unistd::chown(&p, Some(nobody.uid), Some(nobody.gid)).expect("chown to nobody");
        }
        let d = dir.display();
        let child = Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "env"])
            .arg(format!("HOME={d}/home"))
            .arg(format!("XDG_RUNTIME_DIR={d}/run"))
            .arg(format!("XDG_CONFIG_HOME={d}/home/.config"))
            .arg(format!("XDG_CACHE_HOME={d}/home/.cache"))
            .args(["libvirtd", "-f"])
            .arg(dir.join("libvirtd.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn libvirtd");
        let sock = dir.join("sock/libvirt-sock");
        wait_until("libvirtd socket", Duration::from_secs(15), || sock.exists().then_some(()));
        virt::error::clear_error_callback();
        let uri = format!("test+unix:///default?socket={}", sock.display());
        let conn = wait_until("a libvirt connection", Duration::from_secs(10), || Connect::open(Some(&uri)).ok());
        Libvirtd { dir: dir.to_path_buf(), child, conn }
    }

    /// libvirtd's pid (setpriv and env exec it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn uri(&self) -> String {
        format!("test+unix:///default?socket={}", self.dir.join("sock/libvirt-sock").display())
    }

    /// Active domains, or why libvirtd could not say.
    pub fn try_running(&self) -> Result<Vec<(String, u32)>, String> {
        let flags = virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE;
        let list =
            within(self.pid(), "list its domains", || self.conn.list_all_domains(flags)).map_err(|e| e.to_string())?;
        Ok(list.iter().filter_map(|d| Some((d.name().ok()?, d.id()?))).collect())
    }

    /// Starts a transient domain from `xml` behind herd's back (an operator by hand).
    pub fn start_by_hand(&self, xml: &str) {
        within(self.pid(), "start a domain", || self.conn.create_domain_xml(xml, 0)).expect("start a domain by hand");
    }

    /// Destroys domain `name` behind herd's back.
    pub fn destroy_by_hand(&self, name: &str) {
        within(self.pid(), "destroy a domain", || {
            let d = self.conn.lookup_domain_by_name(name).expect("domain by name");
            d.destroy()
        })
        .expect("destroy by hand");
    }

    /// Active domains: name → libvirt id.
    pub fn running(&self) -> Vec<(String, u32)> {
        Domains::running(self)
    }
}

/// A node's hypervisor as the sampler reads it: its running domains, name → libvirt id.
pub trait Domains: Send + Sync + 'static {
    fn running(&self) -> Vec<(String, u32)>;
}

impl Domains for Libvirtd {
    fn running(&self) -> Vec<(String, u32)> {
        listed(&self.conn, self.pid(), virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    }
}

/// The domains `conn` (to the libvirtd whose pid is `pid`) lists with `flags`: name → libvirt
/// id (none when libvirtd cannot say).
pub fn listed(conn: &Connect, pid: u32, flags: virt::sys::virConnectListAllDomainsFlags) -> Vec<(String, u32)> {
    within(pid, "list its domains", || conn.list_all_domains(flags))
        .unwrap_or_default()
        .iter()
        .filter_map(|d| Some((d.name().ok()?, d.id()?)))
        .collect()
}

/// How long the harness waits on one call to a libvirtd of its own (herd's own calls give up
/// after 30 s).
const CALL_LIMIT: Duration = Duration::from_secs(60);

/// Runs `call` on a libvirtd (pid `pid`); a daemon that does not answer within [`CALL_LIMIT`]
/// is killed — its socket closes, so the call returns — and the test fails saying so: a hung
/// libvirtd must fail a test, never stall the suite.
pub fn within<T>(pid: u32, what: &str, call: impl FnOnce() -> T) -> T {
    within_limit(pid, what, CALL_LIMIT, call)
}

fn within_limit<T>(pid: u32, what: &str, limit: Duration, call: impl FnOnce() -> T) -> T {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let killed = &AtomicBool::new(false);
    let out = std::thread::scope(|s| {
        s.spawn(move || {
            if wait.recv_timeout(limit) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                killed.store(true, Ordering::SeqCst);
                let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0));
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        });
        let out = call();
        let _ = done.send(());
        out
    });
    assert!(
        !killed.load(Ordering::SeqCst),
        "libvirtd (pid {pid}) did not {what} within {limit:?}: killed it (a hung libvirtd fails the test)"
    );
    out
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
        // setpriv execs env, which execs libvirtd: the pid is libvirtd's. Anything left of a
        // daemonised child is found by its config path.
        let _ = Command::new("pkill").arg("-9").arg("-f").arg(self.dir.join("libvirtd.conf")).status();
    }
}

/// Lets `nobody` reach a directory inside the test's private temp dir.
pub fn open_path_for_nobody(dir: &Path) {
    let mut p = dir.to_path_buf();
    while p.parent().is_some() && p != Path::new("/tmp") {
        if let Ok(m) = std::fs::metadata(&p) {
            let mode = m.permissions().mode() | 0o011;
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode));
        }
        p.pop();
    }
}

/// Samples every node's libvirt on a thread of its own until [`DoubleSampler::finish`]: a VM
/// must never run on two nodes at once.
///
/// Two passes over the nodes, one after the other. A VM seen on node i with the same libvirt id
/// in both passes ran on i all the time between them (the driver gives every start a new id),
/// so seeing it on a later node j in the first pass, or an earlier node j in the second, proves
/// it ran on both at once (libvirt gives every start, and every migration in, a new id). Reads
/// that are merely not simultaneous cannot raise a false double. The test driver's own `test` domain (on every node, not herd's) is left out.
pub struct DoubleSampler {
    stop: Arc<AtomicBool>,
    doubles: Arc<Mutex<Vec<String>>>,
    samples: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DoubleSampler {
    pub fn start<D: Domains>(daemons: Vec<Arc<D>>) -> DoubleSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let doubles: Arc<Mutex<Vec<String>>> = Arc::default();
        let samples = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, doubles, samples) = (stop.clone(), doubles.clone(), samples.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let first: Vec<Vec<(String, u32)>> = daemons.iter().map(|d| d.running()).collect();
                    let second: Vec<Vec<(String, u32)>> = daemons.iter().map(|d| d.running()).collect();
                    for i in 0..daemons.len() {
                        for (vm, id) in first[i].iter().filter(|(n, _)| n != "test") {
                            if !second[i].contains(&(vm.clone(), *id)) {
                                continue;
                            }
                            let later = first.iter().skip(i + 1).any(|r| r.iter().any(|(n, _)| n == vm));
                            let earlier = second.iter().take(i).any(|r| r.iter().any(|(n, _)| n == vm));
                            let mut d = doubles.lock().unwrap_or_else(|p| p.into_inner());
                            // The first few say it all.
                            if (later || earlier) && d.len() < 5 {
                                d.push(format!("{vm} on node {i} (id {id}) and another: {first:?} / {second:?}"));
                            }
                        }
                    }
                    samples.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        DoubleSampler { stop, doubles, samples, thread: Some(thread) }
    }

    /// Stops sampling; returns how many samples were taken and every double seen.
    /// A sampler that failed (a libvirtd that hung) counts as a double: the test fails.
    pub fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut doubles = Vec::new();
        if let Some(Err(why)) = self.thread.take().map(|t| t.join()) {
            let said = why.downcast_ref::<String>().cloned().unwrap_or_else(|| "a panic".into());
            doubles.push(format!("the sampler stopped: {said}"));
        }
        doubles.extend(self.doubles.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
        (self.samples.load(Ordering::Relaxed), doubles)
    }
}

impl Drop for DoubleSampler {
    /// Stops and joins the sampling thread, so its handles on the libvirtds are dropped (and
    /// the daemons killed) before a failing test's process ends.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A call blocked on a daemon that never answers ends when the deadline kills the daemon, and
/// fails saying so; a call that returns in time leaves the daemon alone.
#[test]
fn a_hung_daemon_is_killed_and_the_call_fails() {
    let mut hung = Command::new("sleep").arg("600").spawn().expect("spawn sleep");
    let pid = hung.id();
    let quick = within_limit(pid, "answer", Duration::from_secs(5), || 7);
    assert_eq!(quick, 7);
    assert!(hung.try_wait().expect("try_wait").is_none(), "a call in time leaves the daemon running");
    let t = std::time::Instant::now();
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        within_limit(pid, "answer", Duration::from_millis(300), || hung.wait().expect("wait"))
    }));
    let said = failed.expect_err("a hung call fails").downcast::<String>().map(|s| *s).unwrap_or_default();
    assert!(said.contains("did not answer within 300ms: killed it"), "{said}");
    assert!(t.elapsed() < Duration::from_secs(30), "the deadline ended the call");
}

//! One qemu libvirtd per node: real guests, as on real hosts (`../shared/notes/qemu-testbed.md`).
//!
//! Each libvirtd runs inside its node's network namespace (listening for its peers' migrations
//! on the node's own address) and in a private mount namespace of its own, where the standard
//! libvirt directories are bind mounts of the test's directory: no system libvirtd, no host
//! cgroup, nothing global is changed but five empty mountpoint directories the libvirt packages
//! would have made. A private `/etc/hosts` resolves the node names herd's `migrate_uri` uses; a
//! private `/etc/passwd` and `/etc/group` add the `libvirt-qemu` user Debian's qemu driver looks
//! up before it reads `qemu.conf`. herd reaches its libvirtd through the unix socket; the test
//! watches every node's guests through connections of its own (an independent oracle).
//!
//! Guests are 64 MiB and diskless; their firmware ([`firmware`]) halts the vCPU at once, so they
//! never answer an ACPI shutdown and cost nothing once running. (SeaBIOS, the default, burns
//! about 2.3 s of a core at each start under this machine's nested KVM — against 0.05 s for
//! the halting ROM — so five guests starting at once on 2 cores measured the firmware, not
//! the cluster; docs/benchmarks.md has both figures.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use virt::connect::Connect;

use crate::harness::wait_until;
use crate::libvirtd::Domains;

/// Mountpoints the private mount namespace binds over (made if missing, left in place).
const MOUNTPOINTS: [&str; 5] =
    ["/run/libvirt", "/etc/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt"];

/// QEMU's capability probe costs seconds per daemon; its result is kept here between runs
/// (libvirt checks it against the qemu binary and probes again when that changed).
const CAPS_CACHE: &str = "/var/tmp/herd-test-qemu-caps";

fn has(cmd: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {cmd}")]).output().is_ok_and(|o| o.status.success())
}

/// Whether real-guest tests can run here; says why not, loudly (and fails under `CI=true`).
pub fn available(test: &str) -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    let driver = Path::new("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so").exists();
    let (libvirtd, qemu, unshare) = (has("libvirtd"), has("qemu-system-x86_64"), has("unshare"));
    if !(root && driver && libvirtd && qemu && unshare) {
        crate::harness::skip(
            test,
            &format!(
                "real guests need root, libvirtd with its qemu driver (libvirt-daemon-driver-qemu), \
                 qemu-system-x86_64 (qemu-system-x86) and unshare: `bash deploy/install-deps.sh` \
                 (root: {root}, qemu driver: {driver}, libvirtd: {libvirtd}, qemu: {qemu}, unshare: {unshare})"
            ),
        );
        return false;
    }
    true
}

/// `kvm` when `/dev/kvm` works here, else `qemu` (TCG: slower, same behaviour).
pub fn accel() -> &'static str {
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if kvm {
        "kvm"
    } else {
        "qemu"
    }
}

/// Writes the guests' firmware into `dir` (once) and returns its path: a 64 KiB ROM of `hlt` (0xF4)
/// bytes. The vCPU starts at the reset vector, 16 bytes below the ROM's end, with interrupts
/// off, and halts there for good: a real qemu guest, migratable, that does nothing.
pub fn firmware(dir: &Path) -> PathBuf {
    let path = dir.join("halt.rom");
    if !path.exists() {
        std::fs::write(&path, [0xF4u8; 65536]).expect("guest firmware");
    }
    path
}

/// A guest's domain XML: `uuid_tail` makes its uuid (12 hex digits at most); `firmware` is
/// [`firmware`]'s ROM.
pub fn guest_xml(name: &str, uuid_tail: u64, firmware: &Path) -> String {
    format!(
        "<domain type='{}'><name>{name}</name><uuid>00000000-0000-4000-8000-{uuid_tail:012x}</uuid>\
         <memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><loader readonly='yes' type='rom'>{}</loader></os>\
         <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>\
         <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
         <controller type='usb' model='none'/><memballoon model='none'/></devices></domain>",
        accel(),
        firmware.display()
    )
}

/// A node's qemu libvirtd.
pub struct Qemud {
    dir: PathBuf,
    child: Child,
    /// The harness's own connection.
    pub conn: Connect,
}

impl Qemud {
    /// Starts the libvirtd of the node at `addr` in namespace `ns`, its files in `dir`;
    /// `hosts` (name, address) is what its `/etc/hosts` resolves; `index` makes its host uuid.
    pub fn start(dir: &Path, ns: &str, addr: &str, index: usize, hosts: &[(String, String)]) -> Qemud {
        for m in MOUNTPOINTS {
            std::fs::create_dir_all(m).expect("libvirt mountpoint");
        }
        for sub in ["run", "etc", "lib", "cache", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("qemud dirs");
        }
        write_config(dir, addr, index, hosts);
        if Path::new(CAPS_CACHE).join("qemu").is_dir() {
            let _ =
                Command::new("cp").arg("-a").arg(Path::new(CAPS_CACHE).join("qemu")).arg(dir.join("cache")).status();
        }
        let d = dir.display();
        let script = format!(
            "mount --bind {d}/passwd /etc/passwd\nmount --bind {d}/group /etc/group\nmount --bind {d}/hosts /etc/hosts\n\
             mount --bind {d}/run /run/libvirt\nmount --bind {d}/etc /etc/libvirt\nmount --bind {d}/lib /var/lib/libvirt\n\
             mount --bind {d}/cache /var/cache/libvirt\nmount --bind {d}/log /var/log/libvirt\n\
             exec /usr/sbin/libvirtd --listen --config /etc/libvirt/libvirtd.conf --pid-file /run/libvirt/libvirtd.pid"
        );
        // `ip netns exec`, `unshare` (no --fork) and `sh`'s `exec` all exec: the child is libvirtd.
        let out = std::fs::File::create(dir.join("libvirtd.out")).expect("libvirtd output file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "unshare", "-m", "--propagation", "private", "sh", "-ec", &script])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("output file"))
            .stderr(out)
            .spawn()
            .expect("spawn libvirtd");
        let mut q = Qemud { dir: dir.to_path_buf(), child, conn: connect_placeholder() };
        let sock = dir.join("run/libvirt-sock");
        virt::error::clear_error_callback();
        let uri = q.uri();
        let conn = wait_until(&format!("qemu libvirtd in {ns}"), Duration::from_secs(30), || {
            if let Ok(Some(st)) = q.child.try_wait() {
                let said = std::fs::read_to_string(dir.join("libvirtd.out")).unwrap_or_default();
                panic!("libvirtd in {ns} exited ({st}): {said}");
            }
            sock.exists().then(|| Connect::open(Some(&uri)).ok()).flatten()
        });
        // The first call probes QEMU (seconds, unless cached): done here, not in a timed step.
        let t = Instant::now();
        conn.capabilities().expect("qemu capabilities");
        if !Path::new(CAPS_CACHE).join("qemu").is_dir() {
            let _ = std::fs::create_dir_all(CAPS_CACHE);
            let _ = Command::new("cp").arg("-a").arg(dir.join("cache/qemu")).arg(CAPS_CACHE).status();
        }
        eprintln!("qemu libvirtd in {ns} ready (capabilities in {} ms)", t.elapsed().as_millis());
        let old = std::mem::replace(&mut q.conn, conn);
        drop(old);
        q
    }

    /// herd's `[hypervisor] uri` for this node.
    pub fn uri(&self) -> String {
        format!("qemu+unix:///system?socket={}", self.dir.join("run/libvirt-sock").display())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pid of guest `name`'s qemu, from libvirt's pid file.
    pub fn qemu_pid(&self, name: &str) -> Option<i32> {
        let s = std::fs::read_to_string(self.dir.join(format!("run/qemu/{name}.pid"))).ok()?;
        let pid: i32 = s.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline).contains(&format!("guest={name}")).then_some(pid)
    }

    /// Every qemu process of this node (the BMC's power-off kills them with the node).
    pub fn qemu_pids(&self) -> Vec<i32> {
        let Ok(rd) = std::fs::read_dir(self.dir.join("run/qemu")) else { return Vec::new() };
        rd.flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".pid").map(str::to_string))
            .filter_map(|name| self.qemu_pid(&name))
            .collect()
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) this libvirtd.
    pub fn freeze(&self, frozen: bool) {
        let sig = if frozen { nix::sys::signal::Signal::SIGSTOP } else { nix::sys::signal::Signal::SIGCONT };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid()).expect("pid"));
        nix::sys::signal::kill(pid, sig).expect("signal libvirtd");
    }
}

/// A connection to nothing useful, replaced as soon as the daemon answers (Qemud must own its
/// child from the start, so a failed start still kills it on drop).
fn connect_placeholder() -> Connect {
    Connect::open(Some("test:///default")).expect("libvirt's built-in test connection")
}

fn write_config(dir: &Path, addr: &str, index: usize, hosts: &[(String, String)]) {
    let conf = format!(
        "listen_tls = 0\nlisten_tcp = 1\nlisten_addr = \"{addr}\"\ntcp_port = \"16509\"\nauth_tcp = \"none\"\n\
         auth_unix_rw = \"none\"\nunix_sock_rw_perms = \"0700\"\n\
         host_uuid = \"6c6d6967-0000-4000-8000-{index:012x}\"\nlog_outputs = \"3:file:/var/log/libvirt/libvirtd.log\"\n"
    );
    std::fs::write(dir.join("etc/libvirtd.conf"), conf).expect("libvirtd.conf");
    let qemu = format!(
        "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\nsecurity_driver = \"none\"\n\
         cgroup_controllers = [ ]\nnamespaces = [ ]\nstdio_handler = \"file\"\n\
         migration_host = \"{addr}\"\nmigration_address = \"{addr}\"\n"
    );
    std::fs::write(dir.join("etc/qemu.conf"), qemu).expect("qemu.conf");
    let mut etc_hosts = String::from("127.0.0.1 localhost\n");
    for (name, a) in hosts {
        etc_hosts.push_str(&format!("{a} {name}\n"));
    }
    std::fs::write(dir.join("hosts"), etc_hosts).expect("hosts");
    let mut passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    if !passwd.lines().any(|l| l.starts_with("libvirt-qemu:")) {
        passwd.push_str("libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin\n");
    }
    std::fs::write(dir.join("passwd"), passwd).expect("passwd");
    let mut group = std::fs::read_to_string("/etc/group").expect("/etc/group");
    if !group.lines().any(|l| l.starts_with("libvirt-qemu:")) {
        group.push_str("libvirt-qemu:x:64055:\n");
    }
    std::fs::write(dir.join("group"), group).expect("group");
}

impl Domains for Qemud {
    /// Guests whose CPUs run: a live migration's incoming copy is active but paused until the
    /// switch-over, and the source is paused from then until it is gone.
    fn running(&self) -> Vec<(String, u32)> {
        crate::libvirtd::listed(&self.conn, self.pid(), virt::sys::VIR_CONNECT_LIST_DOMAINS_RUNNING)
    }
}

impl Drop for Qemud {
    /// Guests first (qemu outlives libvirtd), then the daemon; a frozen one is thawed first.
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        for q in self.qemu_pids() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(q), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

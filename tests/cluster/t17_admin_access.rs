//! Who may use the admin socket: the daemon checks each peer's credentials (SO_PEERCRED), not
//! the file mode alone. Root: everything; members of `admin_socket_group` (primary or
//! supplementary group) with `admin_group_access = "read"`: only requests that change
//! nothing; anyone else: refused. Peers other than root are played by `setpriv`.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::HERD;

struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `herd --socket SOCK ARGS` as `nobody` with primary group `gid` and supplementary
/// `groups` (`None`: as root).
fn herd_as(sock: &std::path::Path, who: Option<(u32, &[u32])>, args: &[&str]) -> Output {
    let mut c = match who {
        None => Command::new(HERD),
        Some((gid, groups)) => {
            let mut c = Command::new("setpriv");
            c.arg("--reuid=65534").arg(format!("--regid={gid}"));
            if groups.is_empty() {
                c.arg("--clear-groups");
            } else {
                let list: Vec<String> = groups.iter().map(u32::to_string).collect();
                c.arg(format!("--groups={}", list.join(",")));
            }
            c.arg(HERD);
            c
        }
    };
    c.arg("--socket").arg(sock).args(args).stdin(Stdio::null()).output().expect("run herd")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn admin_socket_access_follows_peer_credentials() {
    if !nix::unistd::geteuid().is_root() {
        crate::harness::skip("admin_socket_access_follows_peer_credentials", "needs root (setpriv to other users)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    crate::libvirtd::open_path_for_nobody(dir.path());
    let sock = dir.path().join("admin.sock");
    let config = dir.path().join("herd.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"a1\"\nrole = \"coordinator\"\ndata_dir = \"{0}/data\"\nadmin_socket = \"{1}\"\n\
             admin_socket_group = \"nogroup\"\nadmin_group_access = \"read\"\n[cluster]\nlisten = \"127.0.4.2:7410\"\n",
            dir.path().display(),
            sock.display()
        ),
    )
    .expect("config");
    let log = std::fs::File::create(dir.path().join("herd.log")).expect("log");
    let child = Command::new(HERD)
        .args(["daemon", "--config"])
        .arg(&config)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("daemon");
    let _reaper = Reaper(child);
    let end = Instant::now() + Duration::from_secs(20);
    while !herd_as(&sock, None, &["status"]).status.success() {
        assert!(Instant::now() < end, "the daemon's admin socket never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    const NOGROUP: u32 = 65534;
    // A member through its primary group may read ...
    let o = herd_as(&sock, Some((NOGROUP, &[])), &["status", "--json"]);
    assert!(o.status.success(), "group member read: {}", text(&o));
    // ... but not change anything; the refusal says why, and nothing happened.
    let o = herd_as(&sock, Some((NOGROUP, &[])), &["init-cluster"]);
    assert!(!o.status.success() && text(&o).contains("permission denied"), "group member write: {}", text(&o));
    let o = herd_as(&sock, None, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status json");
    assert!(status["cluster_id"].is_null(), "a refused init-cluster must change nothing: {status}");
    // A member through a supplementary group may read too.
    let o = herd_as(&sock, Some((1, &[NOGROUP])), &["status"]);
    assert!(o.status.success(), "supplementary member read: {}", text(&o));
    // Neither user nor group: the socket's mode (0660, group nogroup) keeps it out ...
    let o = herd_as(&sock, Some((1, &[])), &["status"]);
    assert!(!o.status.success() && text(&o).contains("os error 13"), "stranger, file mode: {}", text(&o));
    // ... and the daemon's own check keeps it out when the mode does not (a chmod by mistake,
    // a descriptor passed on): refused from its credentials, with the reason.
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o666)).expect("chmod");
    let o = herd_as(&sock, Some((1, &[])), &["status"]);
    assert!(
        !o.status.success() && text(&o).contains("permission denied: not root, not the daemon's user"),
        "stranger, credentials: {}",
        text(&o)
    );
    // Root may do everything.
    let o = herd_as(&sock, None, &["init-cluster"]);
    assert!(o.status.success(), "root write: {}", text(&o));
}

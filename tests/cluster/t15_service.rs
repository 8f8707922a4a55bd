//! systemd integration and CLI comforts: the daemon's sd_notify messages on a socket the test
//! owns, completion scripts that bash accepts, a manual page that `man -l` renders.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::HERD;

/// Kills the daemon if the test fails before it stops it.
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Collects datagrams until `done` says so or the deadline passes.
fn collect(sock: &UnixDatagram, deadline: Duration, mut done: impl FnMut(&[String]) -> bool) -> Vec<String> {
    let end = Instant::now() + deadline;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    sock.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    while Instant::now() < end && !done(&got) {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

#[test]
fn sd_notify_ready_watchdog_and_stopping_for_a_node_alone() {
    let _share = crate::harness::share();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("notify socket");
    let config = dir.path().join("herd.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"s1\"\nrole = \"coordinator\"\ndata_dir = \"{0}/data\"\nadmin_socket = \"{0}/admin.sock\"\n[cluster]\nlisten = \"127.0.4.1:7400\"\n",
            dir.path().display()
        ),
    )
    .expect("config");
    // As systemd does: WATCHDOG_PID names the daemon itself (`exec` keeps the shell's pid).
    let child = Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" daemon --config \"$1\" --log-format json")
        .arg(HERD)
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "2000000")
        .stdout(std::fs::File::create(dir.path().join("log.json")).expect("log file"))
        .stderr(Stdio::null())
        .spawn()
        .expect("daemon");
    let mut child = Reaper(child);
    // Ready without any quorum (a node alone, not even a member), then fed watchdog pings.
    let got = collect(&sock, Duration::from_secs(15), |m| m.iter().filter(|l| l.contains("WATCHDOG=1")).count() >= 2);
    let ready = got.iter().position(|m| m.contains("READY=1"));
    assert!(ready.is_some(), "no READY=1 in {got:?}");
    assert!(got.iter().any(|m| m.contains("STATUS=not a cluster member")), "{got:?}");
    assert!(got.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2, "{got:?}");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.0.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let got = collect(&sock, Duration::from_secs(15), |m| m.iter().any(|l| l.contains("STOPPING=1")));
    assert!(got.iter().any(|m| m.contains("STOPPING=1")), "no STOPPING=1 in {got:?}");
    let status = child.0.wait().expect("wait");
    assert!(status.success(), "{status}");
    // --log-format json: one JSON object a line, each naming the node.
    let log = std::fs::read_to_string(dir.path().join("log.json")).expect("log");
    assert!(log.lines().count() >= 3, "{log}");
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(v["span"]["node"], "s1", "{line}");
    }
}

#[test]
fn completions_and_man_page_render() {
    let _share = crate::harness::share();
    let dir = tempfile::tempdir().expect("tempdir");
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(HERD).args(["completions", shell]).output().expect("completions");
        assert!(out.status.success() && out.stdout.len() > 500, "{shell}: {out:?}");
        if shell == "bash" {
            let path = dir.path().join("herd.bash");
            std::fs::write(&path, &out.stdout).expect("write");
            let check = Command::new("bash").arg("-n").arg(&path).status().expect("bash -n");
            assert!(check.success(), "bash rejects the completion script");
        }
    }
    let page = Command::new(HERD).arg("man").output().expect("man");
    assert!(page.status.success());
    let path = dir.path().join("herd.1");
    std::fs::write(&path, &page.stdout).expect("write");
    let rendered = Command::new("man")
        .args(["-l"])
        .arg(&path)
        .env("MANPAGER", "cat")
        .env("PAGER", "cat")
        .output()
        .expect("man -l");
    let text = String::from_utf8_lossy(&rendered.stdout);
    assert!(rendered.status.success() && text.contains("NAME") && text.contains("join-cluster"), "{text}");
}

//! Test harness: real `herd daemon` processes on loopback, their admin sockets, and cleanup.
//!
//! Every process a test starts belongs to a [`Node`], and every node to a [`Cluster`] whose
//! `Drop` kills and reaps them, so a failing (panicking) test leaves nothing behind. Waiting is
//! always on a condition with a deadline ([`wait_until`]), never a bare sleep.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const HERD: &str = env!("CARGO_BIN_EXE_herd");

/// A test that cannot run here says so loudly and passes — except under `CI=true`, where a
/// missing prerequisite is a failure: CI installs everything the tests need, so a skip there
/// hides a broken setup.
pub fn skip(test: &str, why: &str) {
    let line = format!("SKIPPED {test}: {why}");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{line} (CI=true: a missing prerequisite fails the test)");
    }
    eprintln!("\n!!!!! {line} !!!!!\n");
}

/// Polls `cond` every 50 ms until it returns `Some` or `timeout` passes; panics with `what`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One herd node: its files and, while running, its process.
pub struct Node {
    pub name: String,
    pub role: String,
    pub addr: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub extra_config: String,
    /// Run inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
}

impl Node {
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("herd.toml")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("herd.log")
    }

    fn write_config(&self) {
        let text = format!(
            "name = \"{}\"\nrole = \"{}\"\ndata_dir = \"{}\"\nadmin_socket = \"{}\"\n[cluster]\nlisten = \"{}\"\n{}",
            self.name,
            self.role,
            self.data_dir().display(),
            self.socket().display(),
            self.addr,
            self.extra_config
        );
        fs::write(self.config_path(), text).expect("write config");
    }

    /// Starts the daemon and waits until its admin socket answers.
    pub fn start(&mut self) {
        self.spawn();
        let name = self.name.clone();
        // Up once the admin socket answers and the node has finished resuming from disk.
        wait_until(&format!("{name} admin socket"), Duration::from_secs(20), || {
            self.assert_alive();
            self.try_admin(&json!({"op": "status"})).ok().filter(|s| s["state"] != "starting")
        });
    }

    /// Starts the daemon (writing its config first) without waiting for anything.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        self.write_config();
        let log = fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("open log");
        let mut cmd = match &self.netns {
            // `ip netns exec` execs the daemon: the child's pid is the daemon's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, HERD]);
                c
            }
            None => Command::new(HERD),
        };
        let child = cmd
            .args(["daemon", "--config"])
            .arg(self.config_path())
            .env("RUST_LOG", "info,openraft=error")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn herd daemon");
        self.child = Some(child);
    }

    pub fn assert_alive(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                let log = fs::read_to_string(self.log_path()).unwrap_or_default();
                panic!("{} exited with {status}; log:\n{log}", self.name);
            }
        }
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit (SIGKILL after `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal_term();
        self.wait_exit(timeout)
    }

    pub fn signal_term(&self) {
        if let Some(c) = &self.child {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).expect("pid"));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }

    /// The applied index the daemon reported in its last "stopped" log line.
    pub fn stopped_applied_index(&self) -> Option<u64> {
        let log = fs::read_to_string(self.log_path()).ok()?;
        let line = log.lines().rev().find(|l| l.contains(" stopped") && l.contains("applied_index="))?;
        line.split("applied_index=").nth(1)?.split_whitespace().next()?.parse().ok()
    }

    /// Waits for the process to exit (SIGKILL after `timeout`, then `None`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one admin request; `Err` carries the daemon's error message or the IO failure.
    pub fn try_admin(&self, req: &Value) -> Result<Value, String> {
        let mut s = UnixStream::connect(self.socket()).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(150))).map_err(|e| e.to_string())?;
        let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        line.push(b'\n');
        s.write_all(&line).map_err(|e| format!("write: {e}"))?;
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).map_err(|e| format!("read: {e}"))?;
        let v: Value = serde_json::from_str(&answer).map_err(|e| format!("bad answer {answer:?}: {e}"))?;
        if v["ok"] == json!(true) {
            Ok(v["result"].clone())
        } else {
            Err(v["error"].as_str().unwrap_or("no error text").to_string())
        }
    }

    /// Sends one admin request that must succeed.
    pub fn admin(&self, req: Value) -> Value {
        match self.try_admin(&req) {
            Ok(v) => v,
            Err(e) => panic!("{} {req}: {e}", self.name),
        }
    }

    pub fn status(&self) -> Value {
        self.admin(json!({"op": "status"}))
    }

    /// Runs the `herd` CLI against this node's socket, feeding `input` on standard input.
    pub fn cli_with_stdin(&self, args: &[&str], input: &str) -> std::process::Output {
        let mut child = Command::new(HERD)
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run herd cli");
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes()).expect("write stdin");
        }
        child.wait_with_output().expect("herd cli output")
    }

    /// Runs the `herd` CLI against this node's socket.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(HERD).arg("--socket").arg(self.socket()).args(args).output().expect("run herd cli")
    }
}

/// Cluster tests share the machine (the harness runs them in parallel); one that loads the
/// machine on purpose (t96's busy host) takes it alone, so no other test runs beside its load.
static MACHINE: std::sync::RwLock<()> = std::sync::RwLock::new(());

thread_local! {
    static ALONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The machine to this test alone until dropped (waits for the running cluster tests to end).
pub struct Alone(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>);

pub fn alone() -> Alone {
    let g = MACHINE.write().unwrap_or_else(|p| p.into_inner());
    ALONE.with(|a| a.set(true));
    Alone(g)
}

impl Drop for Alone {
    fn drop(&mut self) {
        ALONE.with(|a| a.set(false));
    }
}

/// A share of the machine for a test that starts processes without a [`Cluster`].
pub fn share() -> Option<std::sync::RwLockReadGuard<'static, ()>> {
    (!ALONE.with(std::cell::Cell::get)).then(|| MACHINE.read().unwrap_or_else(|p| p.into_inner()))
}

/// A set of nodes sharing a temporary directory; everything is killed on drop.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    /// A share of the machine (none while this thread holds it [`alone`]).
    _share: Option<std::sync::RwLockReadGuard<'static, ()>>,
}

impl Cluster {
    /// `specs`: (name, role, address).
    pub fn new(specs: &[(&str, &str, &str)], extra_config: &str) -> Cluster {
        let share = share();
        let dir = tempfile::Builder::new().prefix("herd-test-").tempdir().expect("tempdir");
        let nodes = specs
            .iter()
            .map(|(name, role, addr)| {
                let d = dir.path().join(name);
                fs::create_dir_all(&d).expect("node dir");
                Node {
                    name: name.to_string(),
                    role: role.to_string(),
                    addr: addr.to_string(),
                    dir: d,
                    child: None,
                    extra_config: extra_config.to_string(),
                    netns: None,
                }
            })
            .collect();
        Cluster { dir, nodes, _share: share }
    }

    pub fn node(&mut self, name: &str) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn token_file(&self, token: &str) -> PathBuf {
        let p = self.dir.path().join("token");
        fs::write(&p, token).expect("token file");
        p
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill9();
        }
        if std::thread::panicking() {
            for n in &self.nodes {
                let log = fs::read_to_string(n.log_path()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                eprintln!("---- last lines of {} log ----", n.name);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

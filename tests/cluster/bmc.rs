//! A simulated BMC per node: `ipmi_sim` (Debian package `openipmi`) with a chassis script.
//! Powering the chassis off kills -9 every process whose pid file the harness put in the BMC's
//! directory (`kill.<what>.pid`: the node's herd daemon, its libvirtd) and records `power` = 0;
//! powering it on records 1 and runs `boot.sh` if the harness wrote one. Power state lives in
//! a file, not in a pid check (a killed child the harness has not reaped yet is a zombie).
//! ipmi_sim is killed on drop, even when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::wait_until;

pub const USER: &str = "admin";

/// The chassis script, shared with the demo.
const CHASSIS: &str = include_str!("../../deploy/bmc-sim/chassis.sh");

/// Whether the BMC tests can run here.
pub fn available(test: &str) -> bool {
    let ok = |c: &str| Command::new(c).arg("-V").output().is_ok() || Command::new(c).arg("-h").output().is_ok();
    let (sim, tool) = (ok("ipmi_sim"), ok("ipmitool"));
    if !sim || !tool {
        crate::harness::skip(
            test,
            &format!("needs ipmi_sim (openipmi) and ipmitool (ipmi_sim: {sim}, ipmitool: {tool})"),
        );
    }
    sim && tool
}

/// A UDP port on 127.0.0.1 nobody uses now (ipmi_sim shares ports silently: never reuse one).
pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr").port()
}

pub struct Bmc {
    pub dir: PathBuf,
    /// `ip:port` the BMC answers on.
    pub addr: String,
    pub password: String,
    netns: Option<String>,
    child: Option<Child>,
}

impl Bmc {
    /// Starts ipmi_sim on `ip:port` (inside `netns` if given), power on, and waits until it
    /// answers a chassis status.
    pub fn start(dir: &Path, ip: &str, port: u16, netns: Option<&str>) -> Bmc {
        Bmc::launch(dir, ip, port, netns, false)
    }

    /// Like `start`, with ipmi_sim's packet trace (`-d`, unbuffered) in `ipmi_sim.log`: who
    /// sent each chassis command can then be told (`power_offs_by`).
    pub fn start_traced(dir: &Path, ip: &str, port: u16, netns: Option<&str>) -> Bmc {
        Bmc::launch(dir, ip, port, netns, true)
    }

    fn launch(dir: &Path, ip: &str, port: u16, netns: Option<&str>, traced: bool) -> Bmc {
        std::fs::create_dir_all(dir.join("state")).expect("bmc dir");
        let password = format!("pw-{}", port);
        let lan = format!(
            "name \"bmc\"\nset_working_mc 0x20\n  startlan 1\n    addr {ip} {port}\n    priv_limit admin\n    \
             allowed_auths_callback none md2 md5 straight\n    allowed_auths_user none md2 md5 straight\n    \
             allowed_auths_operator none md2 md5 straight\n    allowed_auths_admin none md2 md5 straight\n    \
             guid a123456789abcdefa123456789abcdef\n  endlan\n  chassis_control \"{}/chassis.sh\"\n  \
             user 2 true \"{USER}\" \"{password}\" admin 10 none md2 md5 straight\n",
            dir.display()
        );
        std::fs::write(dir.join("lan.conf"), lan).expect("lan.conf");
        std::fs::write(
            dir.join("bmc.emu"),
            "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\nmc_enable 0x20\n",
        )
        .expect("bmc.emu");
        let script = dir.join("chassis.sh");
        std::fs::write(&script, CHASSIS).expect("chassis.sh");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        std::fs::write(dir.join("power"), "1\n").expect("power");
        let pw_file = dir.join("bmc.pass");
        std::fs::write(&pw_file, format!("{password}\n")).expect("password file");
        std::fs::set_permissions(&pw_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
        // Traced: debug output on stdout, unbuffered, and a console on stdin kept open (the
        // pipe lives as long as the child handle) — `-n` would silence the trace.
        let mut argv: Vec<&str> = match netns {
            Some(ns) => vec!["ip", "netns", "exec", ns],
            None => vec![],
        };
        argv.extend(if traced { &["stdbuf", "-o0", "ipmi_sim", "-d"][..] } else { &["ipmi_sim", "-n"][..] });
        argv.extend(["-c", "lan.conf", "-f", "bmc.emu", "-s", "state"]);
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..]);
        let log = std::fs::File::create(dir.join("ipmi_sim.log")).expect("log");
        let child = cmd
            .current_dir(dir)
            .stdin(if traced { Stdio::piped() } else { Stdio::null() })
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn ipmi_sim");
        let bmc = Bmc {
            dir: dir.to_path_buf(),
            addr: format!("{ip}:{port}"),
            password,
            netns: netns.map(str::to_string),
            child: Some(child),
        };
        wait_until("the simulated BMC answers", Duration::from_secs(10), || {
            bmc.ipmitool(&["chassis", "power", "status"]).ok().filter(|o| o.contains("Chassis Power is")).map(|_| ())
        });
        bmc
    }

    /// The password file a herd `[fencing]` section names.
    pub fn password_file(&self) -> PathBuf {
        self.dir.join("bmc.pass")
    }

    /// Runs ipmitool against this BMC (cipher suite 3), from its namespace.
    pub fn ipmitool(&self, args: &[&str]) -> Result<String, String> {
        let (host, port) = self.addr.rsplit_once(':').expect("addr");
        let base = [
            "-I",
            "lanplus",
            "-C",
            "3",
            "-H",
            host,
            "-p",
            port,
            "-U",
            USER,
            "-P",
            &self.password,
            "-N",
            "1",
            "-R",
            "2",
        ];
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "ipmitool"]);
                c
            }
            None => Command::new("ipmitool"),
        };
        let out = cmd.args(base).args(args).output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).to_string())
        } else {
            Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// Registers a process the chassis power-off kills.
    pub fn kill_on_power_off(&self, what: &str, pid: u32) {
        std::fs::write(self.dir.join(format!("kill.{what}.pid")), pid.to_string()).expect("pid file");
    }

    /// The chassis power as the script records it.
    pub fn power_on(&self) -> bool {
        std::fs::read_to_string(self.dir.join("power")).is_ok_and(|s| s.trim() == "1")
    }

    /// Every packet this BMC received: (wall-clock seconds, the sender's IPv4 address). Needs
    /// `start_traced`.
    pub fn received(&self) -> Vec<(f64, String)> {
        let trace = std::fs::read_to_string(self.dir.join("ipmi_sim.log")).unwrap_or_default();
        let mut out = Vec::new();
        let mut lines = trace.lines();
        while let Some(line) = lines.next() {
            // ipmi_sim's console may prefix a line with '\r' and its "> " prompt.
            let Some((_, ts)) = line.split_once("Raw LAN receive from: ") else { continue };
            // The sockaddr_in that follows: family (2 bytes), port (2), address (4).
            let bytes: Vec<u8> =
                lines.next().unwrap_or("").split_whitespace().filter_map(|b| u8::from_str_radix(b, 16).ok()).collect();
            if let (Ok(ts), [_, _, _, _, a, b, c, d, ..]) = (ts.trim().parse::<f64>(), bytes.as_slice()) {
                out.push((ts, format!("{a}.{b}.{c}.{d}")));
            }
        }
        out
    }

    /// Every power-off this BMC carried out: (wall-clock seconds, the sender's IPv4 address).
    /// ipmi_sim handles one packet at a time and runs the chassis script while it does, so the
    /// sender of a chassis command is the last packet received before the script logged it.
    /// Needs `start_traced`.
    pub fn power_offs_by(&self) -> Vec<(f64, String)> {
        let received = self.received();
        self.chassis_log()
            .lines()
            .filter(|l| l.contains("set power 0"))
            .filter_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
            .map(|at| {
                let from = received.iter().rev().find(|(ts, _)| *ts <= at).map_or("?".to_string(), |r| r.1.clone());
                (at, from)
            })
            .collect()
    }

    /// Every chassis command the BMC ran, one per line.
    pub fn chassis_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("chassis.log")).unwrap_or_default()
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            let pid = i32::try_from(c.id()).expect("pid");
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("signal ipmi_sim");
        }
    }

    /// Freezes the BMC (it stops answering: calls time out).
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    /// Stops the BMC for good (nothing listens: refused).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Bmc {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.resume();
        }
        self.kill();
    }
}

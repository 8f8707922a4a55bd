//! The primary's side effects: floating addresses and hook executables.
//!
//! Addresses go through the [`Addresses`] seam: in production ([`IpCommand`]) they are added
//! and removed with iproute2's `ip` and announced with a gratuitous ARP
//! (`arping -U`, Debian's iputils-arping) for IPv4. For IPv6 the address is added without
//! duplicate-address detection, and no unsolicited neighbour advertisement is sent yet (neighbours
//! learn the new holder when their cache entry expires). Every command runs as a child process
//! with a deadline, never on the async runtime's threads.
//!
//! Hooks: executables in `hooks_dir`. Service hooks (any name not ending in `.notify`) run as
//! `HOOK start` in name order on takeover, `HOOK stop` in reverse order on relinquish, `HOOK
//! status` periodically. Notify hooks (`*.notify`) run on every node as `HOOK KIND ARGS...` when
//! the primary announces a change (`primary-change OLD NEW`), and their success is the
//! acknowledgement.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use tokio::process::Command;

/// A floating address: `10.77.0.100/24 dev br-mgmt`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FloatingIp {
    pub ip: IpAddr,
    pub prefix: u8,
    pub dev: String,
}

impl FloatingIp {
    /// Parses `ADDR/PREFIX dev IFACE`.
    pub fn parse(s: &str) -> Result<FloatingIp, String> {
        let words: Vec<&str> = s.split_whitespace().collect();
        let [cidr, "dev", dev] = words.as_slice() else {
            return Err(format!("{s:?}: expected \"ADDRESS/PREFIX dev INTERFACE\""));
        };
        let (ip, prefix) = cidr.split_once('/').ok_or_else(|| format!("{s:?}: the address needs a /prefix"))?;
        let ip: IpAddr = ip.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let prefix: u8 = prefix.parse().map_err(|e| format!("{s:?}: prefix: {e}"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("{s:?}: prefix above {max}"));
        }
        let valid_dev = !dev.is_empty()
            && dev.len() <= 15
            && dev.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
        if !valid_dev {
            return Err(format!("{s:?}: bad interface name"));
        }
        Ok(FloatingIp { ip, prefix, dev: dev.to_string() })
    }

    fn cidr(&self) -> String {
        format!("{}/{}", self.ip, self.prefix)
    }
}

impl std::fmt::Display for FloatingIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} dev {}", self.cidr(), self.dev)
    }
}

/// Runs a program with a deadline; the child is killed if the deadline passes.
async fn run(program: &Path, args: &[&str], timeout: Duration) -> Result<String, String> {
    let mut cmd = Command::new(program);
    cmd.args(args).kill_on_drop(true).stdin(std::process::Stdio::null());
    let shown = format!("{} {}", program.display(), args.join(" "));
    match tokio::time::timeout(timeout, cmd.output()).await {
        Err(_) => Err(format!("{shown}: no result within {timeout:?} (killed)")),
        Ok(Err(e)) => Err(format!("{shown}: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(Ok(out)) => Err(format!("{shown}: {} {}", out.status, String::from_utf8_lossy(&out.stderr).trim())),
    }
}

const IP_TIMEOUT: Duration = Duration::from_secs(5);

/// How floating addresses go on and off this host: `ip addr` in production; the simulation
/// records them in its world, the ground truth of "at most one primary".
pub trait Addresses: Send + Sync + 'static {
    /// Adds `f` (present already is fine).
    fn add<'a>(&'a self, f: &'a FloatingIp) -> BoxFuture<'a, Result<(), String>>;
    /// Removes `f` (absent already is fine).
    fn remove<'a>(&'a self, f: &'a FloatingIp) -> BoxFuture<'a, Result<(), String>>;
}

/// The production addresses: `ip addr add|del`, and a gratuitous ARP for IPv4.
pub struct IpCommand;

impl Addresses for IpCommand {
    fn add<'a>(&'a self, f: &'a FloatingIp) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let cidr = f.cidr();
            let mut args = vec!["addr", "add", cidr.as_str(), "dev", f.dev.as_str()];
            if f.ip.is_ipv6() {
                args.push("nodad");
            }
            let added = match run(Path::new("ip"), &args, IP_TIMEOUT).await {
                Ok(_) => Ok(()),
                Err(e) if e.contains("File exists") => Ok(()),
                Err(e) => Err(e),
            };
            if f.ip.is_ipv4() {
                // Gratuitous ARP so switches and neighbours learn the new holder at once; in
                // the background: it must not delay the next address.
                let (ip, dev) = (f.ip.to_string(), f.dev.clone());
                herd_storage::types::spawn(async move {
                    if let Err(e) =
                        run(Path::new("arping"), &["-U", "-c", "2", "-w", "2", "-I", &dev, &ip], Duration::from_secs(4))
                            .await
                    {
                        tracing::warn!("gratuitous ARP for {ip} on {dev} failed: {e}");
                    }
                });
            }
            added
        })
    }

    fn remove<'a>(&'a self, f: &'a FloatingIp) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let cidr = f.cidr();
            match run(Path::new("ip"), &["addr", "del", cidr.as_str(), "dev", f.dev.as_str()], IP_TIMEOUT).await {
                Ok(_) => Ok(()),
                // Already gone: what removal wants. (iproute2 says "Cannot assign requested
                // address" or, in newer versions, "Address not found".)
                Err(e)
                    if e.contains("Cannot assign requested address")
                        || e.contains("Address not found")
                        || e.contains("Cannot find device") =>
                {
                    Ok(())
                }
                Err(e) => Err(e),
            }
        })
    }
}

/// The configured duties of a primary.
#[derive(Clone)]
pub struct Duties {
    pub ips: Vec<FloatingIp>,
    pub hooks_dir: Option<PathBuf>,
    pub hook_timeout: Duration,
    /// How the addresses go on and off (`IpCommand` unless the environment says otherwise).
    pub addresses: Arc<dyn Addresses>,
}

impl std::fmt::Debug for Duties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Duties").field("ips", &self.ips).field("hooks_dir", &self.hooks_dir).finish_non_exhaustive()
    }
}

impl Duties {
    /// Adds every floating address (present already is fine).
    pub async fn add_ips(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for f in &self.ips {
            match self.addresses.add(f).await {
                Ok(()) => tracing::info!("floating address {f} added"),
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    /// Removes every floating address (absent already is fine).
    pub async fn remove_ips(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for f in &self.ips {
            match self.addresses.remove(f).await {
                Ok(()) => tracing::info!("floating address {f} removed"),
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    /// The hook executables, in name order: service hooks, or notify hooks.
    pub fn hooks(&self, notify: bool) -> Vec<PathBuf> {
        let Some(dir) = &self.hooks_dir else { return Vec::new() };
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut hooks: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "notify") == notify)
            .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
            .collect();
        hooks.sort();
        hooks
    }

    /// Runs each service hook with `action` (`start` in name order, `stop` in reverse);
    /// returns the failures.
    pub async fn run_hooks(&self, action: &str) -> Vec<String> {
        let mut hooks = self.hooks(false);
        if action == "stop" {
            hooks.reverse();
        }
        let mut errors = Vec::new();
        for h in hooks {
            match run(&h, &[action], self.hook_timeout).await {
                Ok(_) => tracing::info!("hook {} {action}: ok", h.display()),
                Err(e) => {
                    tracing::warn!("hook failed: {e}");
                    errors.push(e);
                }
            }
        }
        errors
    }

    /// Runs the notify hooks with `kind` and `args`; all must succeed for an acknowledgement.
    pub async fn run_notify(&self, kind: &str, args: &[String]) -> Result<(), String> {
        let mut all: Vec<&str> = vec![kind];
        all.extend(args.iter().map(String::as_str));
        let mut errors = Vec::new();
        for h in self.hooks(true) {
            if let Err(e) = run(&h, &all, self.hook_timeout).await {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floating_addresses_parse_strictly() {
        let f = FloatingIp::parse("10.77.0.100/24 dev br-mgmt").expect("parses");
        assert_eq!(f.to_string(), "10.77.0.100/24 dev br-mgmt");
        assert!(FloatingIp::parse("fd00::5/64 dev eth0").is_ok());
        for bad in [
            "10.77.0.100 dev br0",
            "10.77.0.100/33 dev br0",
            "10.77.0.100/24 br0",
            "x/24 dev br0",
            "10.0.0.1/24 dev a;b",
        ] {
            assert!(FloatingIp::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn hooks_run_in_order_and_in_reverse_and_notify_hooks_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        for name in ["20-b", "10-a", "30-c.notify"] {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("#!/bin/sh\necho \"{name} $*\" >> {}\n", log.display())).expect("hook");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        std::fs::write(dir.path().join("README"), "not executable").expect("readme");
        let d = Duties {
            ips: vec![],
            hooks_dir: Some(dir.path().into()),
            hook_timeout: Duration::from_secs(5),
            addresses: Arc::new(IpCommand),
        };
        assert!(d.run_hooks("start").await.is_empty());
        assert!(d.run_hooks("stop").await.is_empty());
        d.run_notify("primary-change", &["c1".into(), "c2".into()]).await.expect("notify");
        let got = std::fs::read_to_string(&log).expect("log");
        assert_eq!(got, "10-a start\n20-b start\n20-b stop\n10-a stop\n30-c.notify primary-change c1 c2\n");
    }

    #[tokio::test]
    async fn a_hook_that_hangs_is_killed_at_its_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("10-slow");
        std::fs::write(&p, "#!/bin/sh\nsleep 30\n").expect("hook");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let d = Duties {
            ips: vec![],
            hooks_dir: Some(dir.path().into()),
            hook_timeout: Duration::from_millis(200),
            addresses: Arc::new(IpCommand),
        };
        let errors = d.run_hooks("start").await;
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("killed"), "{errors:?}");
    }
}

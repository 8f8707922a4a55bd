//! The external fence agent: any executable speaking the fence-agents stdin protocol
//! (`fence_ipmilan`, `fence_redfish`, …), one `key=value` per line on stdin:
//! `action=off|on|status`, `ip=`, `ipport=`, `username=`, `password=`, then the policy's extra
//! options. Exit status 0 is success; for `status`, 0 means on and 2 means off (the agents'
//! convention), and a `Status: ON|OFF` line on stdout is read when present.
//!
//! The child runs with a deadline and is killed at it; its output is bounded, and the password
//! is cut out of anything it printed before that becomes an error message.

use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use herd_storage::model::FencePolicy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::agent::{Action, FenceAgent, FenceError, Power};

/// Bytes of an agent's stdout and stderr that are kept.
const MAX_OUTPUT: usize = 16 * 1024;

pub struct ExternalAgent {
    command: String,
    host: String,
    port: Option<String>,
    user: String,
    password: String,
    options: Vec<String>,
}

impl ExternalAgent {
    pub fn from_policy(p: &FencePolicy) -> ExternalAgent {
        let (host, port) = split_host_port(&p.bmc);
        ExternalAgent {
            command: p.command.clone().unwrap_or_default(),
            host,
            port,
            user: p.user.clone(),
            password: p.password.clone(),
            options: p.options.clone(),
        }
    }

    /// The agent's stdin for `action`.
    pub fn stdin_text(&self, action: Action) -> String {
        let mut s = format!("action={}\nip={}\n", action.as_str(), self.host);
        if let Some(p) = &self.port {
            s.push_str(&format!("ipport={p}\n"));
        }
        s.push_str(&format!("username={}\npassword={}\n", self.user, self.password));
        for o in &self.options {
            s.push_str(o);
            s.push('\n');
        }
        s
    }

    fn redact(&self, text: &str) -> String {
        if self.password.is_empty() {
            text.to_string()
        } else {
            text.replace(&self.password, "<redacted>")
        }
    }

    fn error(&self, message: String) -> FenceError {
        FenceError::Agent { command: self.command.clone(), message: self.redact(&message) }
    }

    async fn run(&self, action: Action, deadline: Duration) -> Result<Power, FenceError> {
        let mut child = tokio::process::Command::new(&self.command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group: at the deadline the agent and all it started are killed.
            .process_group(0)
            .spawn()
            .map_err(|e| self.error(format!("cannot start: {e}")))?;
        let pgid = child.id().and_then(|id| i32::try_from(id).ok());
        let input = self.stdin_text(action);
        let mut stdin = child.stdin.take();
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let work = async {
            if let Some(mut i) = stdin.take() {
                // An agent that exits without reading is its own failure, seen in its status.
                let _ = i.write_all(input.as_bytes()).await;
            }
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let read_out = async {
                if let Some(o) = stdout.as_mut() {
                    let _ = o.take(MAX_OUTPUT as u64).read_to_end(&mut out).await;
                }
            };
            let read_err = async {
                if let Some(e) = stderr.as_mut() {
                    let _ = e.take(MAX_OUTPUT as u64).read_to_end(&mut err).await;
                }
            };
            tokio::join!(read_out, read_err);
            let status = child.wait().await;
            (status, out, err)
        };
        let Ok((status, out, err)) = tokio::time::timeout(deadline, work).await else {
            if let Some(pg) = pgid {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pg), nix::sys::signal::Signal::SIGKILL);
            }
            return Err(self.error(format!("no result within {deadline:?} (killed)")));
        };
        let status = status.map_err(|e| self.error(format!("wait: {e}")))?;
        let (out, err) = (String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
        interpret(action, status.code(), &out).map_err(|why| {
            let said = |l: &&str| !l.trim().is_empty();
            let detail = err.lines().rfind(said).or_else(|| out.lines().rfind(said)).unwrap_or("");
            self.error(format!(
                "action={} {why}{}{}",
                action.as_str(),
                if detail.is_empty() { "" } else { ": " },
                detail
            ))
        })
    }
}

/// `host:port`, `[v6]:port` or a bare host.
fn split_host_port(bmc: &str) -> (String, Option<String>) {
    if let Some(rest) = bmc.strip_prefix('[') {
        if let Some((h, p)) = rest.split_once("]:") {
            return (h.to_string(), Some(p.to_string()));
        }
        return (rest.trim_end_matches(']').to_string(), None);
    }
    match bmc.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.parse::<u16>().is_ok() => (h.to_string(), Some(p.to_string())),
        _ => (bmc.to_string(), None),
    }
}

/// The fence-agents result convention: exit 0 = success (`status`: on), exit 2 on `status` =
/// off; a `Status: ON|OFF` line, when printed, must agree.
pub fn interpret(action: Action, code: Option<i32>, stdout: &str) -> Result<Power, String> {
    let printed = stdout.lines().rev().find_map(|l| {
        let v = l.trim().strip_prefix("Status:")?.trim().to_ascii_uppercase();
        match v.as_str() {
            "ON" => Some(Power::On),
            "OFF" => Some(Power::Off),
            _ => None,
        }
    });
    match (action, code) {
        (Action::Status, Some(0)) => match printed {
            Some(Power::Off) => Err("exit 0 but printed Status: OFF".into()),
            _ => Ok(Power::On),
        },
        (Action::Status, Some(2)) => match printed {
            Some(Power::On) => Err("exit 2 but printed Status: ON".into()),
            _ => Ok(Power::Off),
        },
        (Action::Off, Some(0)) => Ok(Power::Off),
        (Action::On, Some(0)) => Ok(Power::On),
        (_, Some(c)) => Err(format!("failed (exit {c})")),
        (_, None) => Err("killed by a signal".into()),
    }
}

impl FenceAgent for ExternalAgent {
    fn call(&self, action: Action, deadline: Duration) -> BoxFuture<'_, Result<Power, FenceError>> {
        Box::pin(self.run(action, deadline))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use herd_storage::model::*;

    use super::*;

    fn policy(command: &str) -> FencePolicy {
        FencePolicy {
            agent: FenceAgentKind::External,
            command: Some(command.into()),
            options: vec!["lanplus=1".into()],
            fence_action: FenceAction::Off,
            ..FencePolicy::ipmi("10.0.0.5:6230", "root", "s3cret-pw")
        }
    }

    #[test]
    fn stdin_protocol_lines() {
        let a = ExternalAgent::from_policy(&policy("/usr/sbin/fence_ipmilan"));
        assert_eq!(
            a.stdin_text(Action::Off),
            "action=off\nip=10.0.0.5\nipport=6230\nusername=root\npassword=s3cret-pw\nlanplus=1\n"
        );
        assert_eq!(split_host_port("bmc1.example"), ("bmc1.example".into(), None));
        assert_eq!(split_host_port("[fd00::5]:623"), ("fd00::5".into(), Some("623".into())));
        assert_eq!(split_host_port("fd00::5"), ("fd00::5".into(), None));
    }

    #[test]
    fn result_convention() {
        assert_eq!(interpret(Action::Status, Some(0), "Status: ON\n"), Ok(Power::On));
        assert_eq!(interpret(Action::Status, Some(2), "Status: OFF\n"), Ok(Power::Off));
        assert_eq!(interpret(Action::Status, Some(2), ""), Ok(Power::Off));
        assert!(interpret(Action::Status, Some(0), "Status: OFF").is_err(), "contradiction");
        assert!(interpret(Action::Status, Some(1), "").is_err());
        assert_eq!(interpret(Action::Off, Some(0), "Success: Powered OFF"), Ok(Power::Off));
        assert!(interpret(Action::Off, Some(1), "").is_err());
        assert!(interpret(Action::On, None, "").is_err());
    }

    /// A fake agent: records its stdin, answers like a fence agent, or hangs.
    fn fake(dir: &std::path::Path, body: &str) -> String {
        let path = dir.join("fence_fake");
        std::fs::write(&path, format!("#!/bin/bash\ncat > {}/stdin.txt\n{body}\n", dir.display())).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path.display().to_string()
    }

    #[tokio::test]
    async fn runs_an_agent_with_a_deadline_and_never_leaks_the_password() {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = fake(
            dir.path(),
            "grep -q action=status $(dirname $0)/stdin.txt && { echo 'Status: OFF'; exit 2; }; exit 0",
        );
        let a = ExternalAgent::from_policy(&policy(&status));
        assert_eq!(a.call(Action::Status, Duration::from_secs(5)).await, Ok(Power::Off));
        let seen = std::fs::read_to_string(dir.path().join("stdin.txt")).expect("stdin");
        assert!(seen.starts_with("action=status\nip=10.0.0.5\n"), "{seen}");
        assert_eq!(a.call(Action::Off, Duration::from_secs(5)).await, Ok(Power::Off));

        let dir = tempfile::tempdir().expect("tempdir");
        let failing =
            fake(dir.path(), "echo \"login failed for root/$(grep password= $(dirname $0)/stdin.txt)\" >&2; exit 1");
        let e = ExternalAgent::from_policy(&policy(&failing)).call(Action::Off, Duration::from_secs(5)).await;
        let msg = e.expect_err("fails").to_string();
        assert!(msg.contains("failed (exit 1)") && msg.contains("login failed"), "{msg}");
        assert!(!msg.contains("s3cret-pw"), "password leaked: {msg}");

        let dir = tempfile::tempdir().expect("tempdir");
        let hanging = fake(dir.path(), "sleep 30");
        let started = std::time::Instant::now();
        let e = ExternalAgent::from_policy(&policy(&hanging)).call(Action::Off, Duration::from_millis(300)).await;
        assert!(e.expect_err("times out").to_string().contains("no result within"));
        assert!(started.elapsed() < Duration::from_secs(3));

        let missing = ExternalAgent::from_policy(&policy("/nonexistent/fence_x"));
        let e = missing.call(Action::Status, Duration::from_secs(1)).await.expect_err("missing");
        assert!(e.to_string().contains("cannot start"), "{e}");
    }
}

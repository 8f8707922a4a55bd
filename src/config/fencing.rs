//! The `[fencing]` section (how this node is fenced) and the `[fence]` section (how it fences
//! others while it is the primary).

use std::path::PathBuf;

use herd_storage::model::{FailedFence, FenceAction, FenceAgentKind, FencePolicy, SuccessfulFence};
use serde::Deserialize;

/// `[fencing]`: how *this* node is fenced. The victim's policy applies.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FencingSection {
    #[serde(default)]
    pub agent: FenceAgentKind,
    /// `host:port` of this node's BMC as the coordinators reach it (IPMI's port is 623).
    pub bmc: String,
    pub user: String,
    /// A file holding the BMC password (first line); not group/world readable.
    pub password_file: PathBuf,
    /// For `agent = "external"`: a fence-agents executable (`/usr/sbin/fence_ipmilan`).
    #[serde(default)]
    pub command: Option<String>,
    /// Extra `key=value` lines for the external agent (`["lanplus=1"]`).
    #[serde(default)]
    pub options: Vec<String>,
    #[serde(default = "default_fence_after_ms")]
    pub fence_after_ms: u64,
    #[serde(default)]
    pub fence_action: FenceAction,
    #[serde(default)]
    pub successful_fence: SuccessfulFence,
    #[serde(default)]
    pub failed_fence: FailedFence,
    #[serde(default = "default_self_fence_after_ms")]
    pub self_fence_after_ms: u64,
    /// Hardware watchdog device (`/dev/watchdog`); required by `recover-after-self-fence`.
    #[serde(default)]
    pub watchdog: String,
    /// The watchdog's timeout as armed on the device.
    #[serde(default = "default_watchdog_timeout_ms")]
    pub watchdog_timeout_ms: u64,
    #[serde(default)]
    pub auto_ready: bool,
}

fn default_fence_after_ms() -> u64 {
    1500
}
fn default_self_fence_after_ms() -> u64 {
    30_000
}
fn default_watchdog_timeout_ms() -> u64 {
    60_000
}

impl FencingSection {
    /// The policy this node publishes; reads the password file (which must be private).
    pub fn policy(&self) -> Result<FencePolicy, (String, String)> {
        let key = "fencing.password_file".to_string();
        let path = &self.password_file;
        let meta = std::fs::metadata(path).map_err(|e| (key.clone(), format!("{}: {e}", path.display())))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                return Err((
                    key,
                    format!(
                        "{} is readable by group or others (mode {:o}): chmod 600 it",
                        path.display(),
                        mode & 0o777
                    ),
                ));
            }
        }
        let text = std::fs::read_to_string(path).map_err(|e| (key.clone(), format!("{}: {e}", path.display())))?;
        let password = text.lines().next().unwrap_or("").to_string();
        if password.is_empty()
            || password.len() > 1024
            || password.chars().any(char::is_control)
            || herd_raft::tls::is_sealed(&password)
        {
            return Err((
                key,
                format!(
                    "{}: the first line must hold the password (1 to 1024 bytes, no control characters, not starting with `sealed:v1:`)",
                    path.display()
                ),
            ));
        }
        Ok(FencePolicy {
            agent: self.agent,
            bmc: self.bmc.clone(),
            user: self.user.clone(),
            password,
            command: self.command.clone(),
            options: self.options.clone(),
            fence_after_ms: self.fence_after_ms,
            fence_action: self.fence_action,
            successful_fence: self.successful_fence,
            failed_fence: self.failed_fence,
            self_fence_after_ms: self.self_fence_after_ms,
            watchdog_timeout_ms: if self.watchdog.is_empty() { 0 } else { self.watchdog_timeout_ms },
            auto_ready: self.auto_ready,
        })
    }

    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        let err = |key: &str, msg: &str| Err((format!("fencing.{key}"), msg.to_string()));
        match self.bmc.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0) => {}
            _ => return err("bmc", "must be host:port (IPMI over LAN listens on 623)"),
        }
        if self.user.is_empty() || self.user.len() > 64 {
            return err("user", "must be 1 to 64 bytes");
        }
        // These travel as `key=value` lines to an external agent: no line breaks or controls.
        let control = |v: &str| v.chars().any(char::is_control);
        if control(&self.user) || control(&self.bmc) || self.command.as_deref().is_some_and(control) {
            return err("user", "bmc, user and command must not contain control characters");
        }
        if self.agent == FenceAgentKind::External && self.command.as_deref().is_none_or(str::is_empty) {
            return err("command", "required with agent = \"external\"");
        }
        if self.options.len() > 32 || self.options.iter().any(|o| !o.contains('=') || o.chars().any(char::is_control)) {
            return err("options", "up to 32 key=value strings");
        }
        if !(200..=600_000).contains(&self.fence_after_ms) {
            return err("fence_after_ms", "must be between 200 and 600000");
        }
        if !(1_000..=3_600_000).contains(&self.self_fence_after_ms) {
            return err("self_fence_after_ms", "must be between 1000 and 3600000");
        }
        if !(1_000..=600_000).contains(&self.watchdog_timeout_ms) {
            return err("watchdog_timeout_ms", "must be between 1000 and 600000");
        }
        if self.failed_fence == FailedFence::RecoverAfterSelfFence && self.watchdog.is_empty() {
            return err(
                "failed_fence",
                "recover-after-self-fence needs an armed hardware watchdog: set fencing.watchdog",
            );
        }
        self.policy().map(|_| ())
    }
}

/// `[fence]`: how this node fences others while it is the primary.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FenceSection {
    /// Fences run at once.
    pub max_parallel: usize,
    /// Each BMC's readiness is checked this often.
    pub check_interval_ms: u64,
    /// Deadline of one fence-agent call.
    pub call_timeout_ms: u64,
    /// After power-off, chassis status is polled until off or this deadline.
    pub confirm_timeout_ms: u64,
    /// A failed fence is tried again after this.
    pub retry_after_ms: u64,
}

impl Default for FenceSection {
    fn default() -> Self {
        FenceSection {
            max_parallel: 4,
            check_interval_ms: 5_000,
            call_timeout_ms: 5_000,
            confirm_timeout_ms: 15_000,
            retry_after_ms: 30_000,
        }
    }
}

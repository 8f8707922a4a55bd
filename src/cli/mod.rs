//! The command line: clap definitions, the admin-socket client, and human output.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use herd_storage::model::Role;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::admin::{AdminRequest, AdminResponse};

mod render;
mod request;
pub use render::render;
pub use request::request;

pub const DEFAULT_SOCKET: &str = "/run/herd/admin.sock";

#[derive(Debug, Parser)]
#[command(name = "herd", version, about = "Keeps virtual machines running on a cluster of hypervisors")]
pub struct Cli {
    /// The daemon's admin socket.
    #[arg(long, global = true, env = "HERD_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print the daemon's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon.
    Daemon {
        #[arg(long)]
        config: PathBuf,
        /// Log lines as text or JSON (overrides the config's log_format).
        #[arg(long)]
        log_format: Option<crate::config::LogFormat>,
    },
    /// Print a shell completion script (bash, zsh, fish, ...).
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff) for `man -l -`.
    Man,
    /// Give up this node's floating addresses (no daemon needed: the unit's stop-post step).
    Release {
        #[arg(long)]
        config: PathBuf,
    },
    /// Bootstrap a new cluster on this (fresh) node and print its join token.
    InitCluster,
    /// Join this (fresh) node to the cluster that PEER belongs to.
    JoinCluster(JoinArgs),
    /// Cluster overview from this node's local state (answers on a minority node too).
    Status,
    /// Node commands.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Cluster-wide settings.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Join tokens: make one (printed once), list them, revoke one.
    #[command(subcommand)]
    Token(TokenCommand),
    /// This node's cluster certificate.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Heartbeat: per coordinator and network, each host's state; peer views; MNFA; verdicts.
    Heartbeat,
    /// The cluster's event log (newest last).
    Events {
        /// How many of the newest events.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// host:port of any cluster member's cluster address.
    #[arg(long)]
    pub peer: String,
    /// File holding the join token (else it is read from standard input).
    #[arg(long, conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// The token itself (visible in the process list: for demos only).
    #[arg(long)]
    pub token: Option<String>,
    /// Must agree with the role in this node's config.
    #[arg(long)]
    pub role: Option<Role>,
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// All nodes, from local state.
    List,
    /// One node (a linearizable read unless --local).
    Info {
        name: String,
        #[arg(long)]
        local: bool,
    },
    /// Move every VM away from NAME (domain_state flush → flushed).
    Flush {
        name: String,
        #[arg(long)]
        wait: bool,
    },
    /// This host is going down: move the primary role away, then every VM (live first, then
    /// shutdown migration), record daemon_state shutdown, and stop the daemon. Run it on that node.
    /// The node stays flushed after its next start until `herd node ready`.
    Shutdown {
        /// This node's name (the default; another node is refused).
        name: Option<String>,
        /// How long moving the VMs may take; after it, nothing is recorded and herd keeps running.
        #[arg(long, value_parser = parse_ttl, default_value = "10m")]
        timeout: u64,
    },
    /// Bring NAME's VMs back (unflush → ready).
    Ready {
        name: String,
        #[arg(long)]
        wait: bool,
    },
    /// Fence NAME by hand: power it off through its BMC and recover its VMs (per its policy).
    Fence {
        name: String,
        /// Confirm: the host is powered off at once.
        #[arg(long)]
        yes: bool,
    },
    /// Make NAME the primary coordinator (the current one relinquishes first).
    Primary {
        name: String,
        /// Return once the new primary holds its duties, printing how long it took.
        #[arg(long)]
        wait: bool,
    },
    /// Make NAME, the primary, step down (another voter takes over).
    Secondary {
        name: String,
        #[arg(long)]
        wait: bool,
    },
    /// Remove a node from the cluster (joint consensus).
    Remove {
        name: String,
        /// Allow leaving fewer than 3 voters.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Define a VM from a libvirt domain XML file (it starts where it is placed).
    Define {
        file: PathBuf,
        /// Put it on this node (else the selector chooses).
        #[arg(long)]
        node: Option<String>,
        #[arg(long, value_parser = ["mem", "memprov", "load", "vcpus", "vms"])]
        selector: Option<String>,
        /// Nodes it may run on, comma-separated.
        #[arg(long, value_delimiter = ',')]
        limit: Vec<String>,
        #[arg(long)]
        autostart: bool,
        #[arg(long, value_parser = ["live", "shutdown", "none"])]
        method: Option<String>,
    },
    /// Every VM with its state, node and what libvirt last reported.
    List,
    /// One VM.
    Info {
        name: String,
        #[arg(long)]
        local: bool,
    },
    Start {
        name: String,
    },
    /// Pull the plug.
    Stop {
        name: String,
    },
    /// Ask the guest to shut down (destroyed after hypervisor.shutdown_timeout_ms).
    Shutdown {
        name: String,
    },
    Restart {
        name: String,
    },
    /// Stop it and keep it stopped.
    Disable {
        name: String,
    },
    /// Forget it (it must be stopped, disabled or failed).
    Undefine {
        name: String,
    },
    /// Replace its domain XML (same name and uuid); it is used at the VM's next start.
    Modify {
        name: String,
        file: PathBuf,
    },
    /// Move it to another node for now (it remembers its home): to --to, or where its selector
    /// places it. Live first unless its method is `shutdown`; refused, it stops on its node before
    /// it starts on the other (shutdown migration).
    Migrate {
        name: String,
        #[arg(long)]
        to: Option<String>,
        /// Live only: fail rather than shut down.
        #[arg(long)]
        force_live: bool,
    },
    /// Send a migrated VM back home.
    Unmigrate {
        name: String,
    },
    /// Move it for good (its home becomes the new node).
    Move {
        name: String,
        #[arg(long)]
        to: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a join token and print it (once: the cluster keeps only its hash).
    Create {
        /// Lifetime, e.g. 30m, 2h, 7d (default: until revoked).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        /// How many joins it admits (default: any number).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        uses: Option<u32>,
    },
    /// The join tokens: id (hash prefix), created, expires, uses left.
    List,
    /// Revoke a join token by its id (at least 8 hex digits).
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Renew this node's certificate now: a new key, signed by the leader (nodes also renew by
    /// themselves 30 days before expiry; `herd status` shows it).
    Rotate,
}

/// A token lifetime (`30m`, `2h`, `7d`, `1h 30m`) in milliseconds.
fn parse_ttl(s: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 30m, 2h, 7d)"))?;
    u64::try_from(d.as_millis()).map_err(|_| format!("{s:?} is too long"))
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Cluster metadata (a linearizable read unless --local).
    Info {
        #[arg(long)]
        local: bool,
    },
    /// While on, no fencing and no recovery.
    Maintenance {
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
}

/// Errors of the client side.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the herd daemon at {path}: {source} (is `herd daemon` running? see --socket)")]
    Connect { path: String, source: std::io::Error },
    #[error("admin socket {path}: {0}", path = .1)]
    Io(std::io::Error, String),
    #[error("the daemon did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Daemon(String),
    #[error("{0}")]
    Usage(String),
}

/// A spinner with `message` on a terminal (stderr); a hidden one otherwise.
pub fn spinner(message: Option<String>) -> indicatif::ProgressBar {
    match message {
        Some(m) if std::io::stderr().is_terminal() => {
            let pb = indicatif::ProgressBar::new_spinner();
            pb.set_message(m);
            pb.enable_steady_tick(std::time::Duration::from_millis(100));
            pb
        }
        _ => indicatif::ProgressBar::hidden(),
    }
}

/// Reads the join token from the file, the flag (with a warning) or standard input.
pub fn read_token(args: &JoinArgs) -> Result<String, CliError> {
    if let Some(t) = &args.token {
        eprintln!("herd: warning: --token is visible in the process list; prefer --token-file");
        return Ok(t.trim().to_string());
    }
    let token = match &args.token_file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| CliError::Usage(format!("cannot read token file {}: {e}", f.display())))?,
        None => {
            if std::io::stdin().is_terminal() {
                eprintln!("herd: reading the join token from standard input");
            }
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| CliError::Usage(format!("cannot read the token: {e}")))?;
            line
        }
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(CliError::Usage("the join token is empty".into()));
    }
    Ok(token)
}

/// Sends one request and returns the daemon's result.
pub async fn call(socket: &Path, req: &AdminRequest, timeout: Duration) -> Result<Value, CliError> {
    let path = socket.display().to_string();
    let fut = async {
        let stream =
            UnixStream::connect(socket).await.map_err(|source| CliError::Connect { path: path.clone(), source })?;
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_vec(req).map_err(|e| CliError::Usage(e.to_string()))?;
        line.push(b'\n');
        // A daemon that refuses the connection says why and closes before reading the request:
        // its line is read even when the write failed.
        let wrote = write.write_all(&line).await;
        let mut answer = String::new();
        let read = BufReader::new(read).read_line(&mut answer).await;
        match (wrote, read) {
            (_, Ok(n)) if n > 0 => {}
            (Err(e), _) | (Ok(()), Err(e)) => return Err(CliError::Io(e, path.clone())),
            (Ok(()), Ok(_)) => {}
        }
        let resp: AdminResponse = serde_json::from_str(&answer)
            .map_err(|e| CliError::Daemon(format!("unreadable answer from the daemon: {e}")))?;
        match (resp.ok, resp.result, resp.error) {
            (true, Some(v), _) => Ok(v),
            (true, None, _) => Ok(Value::Null),
            (false, _, e) => Err(CliError::Daemon(e.unwrap_or_else(|| "unknown error".into()))),
        }
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| CliError::Timeout(timeout))?
}

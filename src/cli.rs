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

/// Colours a state name on a terminal (nothing is coloured in pipes or files).
fn paint(text: String) -> String {
    use anstyle::{AnsiColor, Style};
    if !std::io::stdout().is_terminal() {
        return text;
    }
    let style = match text.as_str() {
        "run" | "ready" | "alive" | "primary" | "voter" => Style::new().fg_color(Some(AnsiColor::Green.into())),
        "init" | "fencing" | "unchecked" | "takeover" | "relinquish" | "flush" | "unflush" | "stop" | "shutdown" => {
            Style::new().fg_color(Some(AnsiColor::Yellow.into()))
        }
        t if t.starts_with("lost")
            || t == "dead"
            || t == "fenced"
            || t == "failed"
            || t == "unreachable"
            || t == "fence-flush" =>
        {
            Style::new().fg_color(Some(AnsiColor::Red.into())).bold()
        }
        _ => return text,
    };
    format!("{style}{text}{style:#}")
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
        write.write_all(&line).await.map_err(|e| CliError::Io(e, path.clone()))?;
        let mut answer = String::new();
        BufReader::new(read).read_line(&mut answer).await.map_err(|e| CliError::Io(e, path.clone()))?;
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

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Renders rows as an aligned table.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(visible_len(c));
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w.saturating_sub(visible_len(c)))))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(headers.iter().map(|h| h.to_uppercase()).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out.join("\n")
}

/// Width on screen: ANSI colour sequences take none.
fn visible_len(s: &str) -> usize {
    let (mut n, mut in_escape) = (0, false);
    for ch in s.chars() {
        match (in_escape, ch) {
            (false, '\u{1b}') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, _) => n += 1,
        }
    }
    n
}

fn members_table(members: &Value) -> String {
    let rows: Vec<Vec<String>> = members
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    let voter = if m["voter"].as_bool() == Some(true) { "voter" } else { "learner" };
                    let age = m["last_keepalive_age_ms"]
                        .as_u64()
                        .map_or("-".into(), |a| format!("{:.1}s", a as f64 / 1000.0));
                    vec![
                        s(&m["name"]),
                        s(&m["id"]),
                        s(&m["role"]),
                        paint(voter.into()),
                        paint(s(&m["daemon_state"])),
                        paint(s(&m["domain_state"])),
                        paint(s(&m["router_state"])),
                        paint(s(&m["heartbeat"])),
                        paint(fence_cell(&m["fencing"])),
                        age,
                        s(&m["address"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &["name", "id", "role", "raft", "daemon", "domain", "router", "heartbeat", "fence", "keepalive", "address"],
        &rows,
    )
}

/// One word for a node's fencing: whether it can be fenced, or where a fence of it stands.
fn fence_cell(f: &Value) -> String {
    match (f["configured"].as_bool(), f["state"].as_str(), f["ready"].as_bool()) {
        (Some(false), _, _) | (None, _, _) => "none".into(),
        (_, Some("fencing"), _) => "fencing".into(),
        (_, Some("fenced"), _) => "fenced".into(),
        (_, Some("fence-failed"), _) => "failed".into(),
        (_, _, Some(true)) => "ready".into(),
        (_, _, Some(false)) => "unreachable".into(),
        _ => "unchecked".into(),
    }
}

/// Human output for each command.
pub fn render(command: &Command, v: &Value) -> String {
    match command {
        Command::Status => {
            let mut out = format!(
                "cluster {}  node {} ({})  leader {}  primary {}  term {}  quorum {}  applied {}{}\n",
                s(&v["cluster_id"]),
                s(&v["node"]),
                s(&v["state"]),
                s(&v["leader"]),
                s(&v["primary"]),
                s(&v["term"]),
                if v["quorum"].as_bool() == Some(true) { "yes" } else { "NO" },
                s(&v["applied_index"]),
                if v["maintenance"].as_bool() == Some(true) { "  MAINTENANCE" } else { "" },
            );
            if let Some(days) = v["tls"]["cert_expires_in_days"].as_u64() {
                let warn = if days < 30 { "  RENEW SOON" } else { "" };
                out.push_str(&format!("certificate expires in {days} days{warn}\n"));
            }
            out.push_str(&members_table(&v["members"]));
            out
        }
        Command::Node(NodeCommand::List) => format!(
            "{}\n(local state at applied index {}; quorum {})",
            members_table(&v["members"]),
            s(&v["applied_index"]),
            if v["quorum"].as_bool() == Some(true) { "yes" } else { "NO" }
        ),
        Command::InitCluster => format!("cluster {} created\njoin token: {}", s(&v["cluster_id"]), s(&v["token"])),
        Command::JoinCluster(_) => format!(
            "joined cluster {} as node {} ({})",
            s(&v["cluster_id"]),
            s(&v["node_id"]),
            if v["voter"].as_bool() == Some(true) { "voter" } else { "learner" }
        ),
        Command::Node(NodeCommand::Remove { name, .. }) => format!("{name} removed"),
        Command::Heartbeat => render_heartbeat(v),
        Command::Vm(VmCommand::List) => {
            let rows: Vec<Vec<String>> = v
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|m| {
                            vec![
                                s(&m["name"]),
                                paint(s(&m["state"])),
                                s(&m["node"]),
                                s(&m["last_node"]),
                                paint(s(&m["actual"])),
                                s(&m["failure_reason"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            table(&["name", "state", "node", "last_node", "actual", "failure"], &rows)
        }
        Command::Vm(VmCommand::Info { .. }) => serde_json::to_string_pretty(v).unwrap_or_default(),
        Command::Vm(_) => s(&v["message"]),
        Command::Node(NodeCommand::Flush { .. } | NodeCommand::Ready { .. }) => {
            format!(
                "{}: {}{}",
                s(&v["node"]),
                s(&v["domain_state"]),
                v["took_ms"].as_u64().map_or(String::new(), |ms| format!(" after {ms} ms"))
            )
        }
        Command::Node(NodeCommand::Fence { .. }) => {
            format!("fence of {} decided; `herd events` shows its outcome", s(&v["node"]))
        }
        Command::Node(NodeCommand::Primary { .. } | NodeCommand::Secondary { .. }) => match v["took_ms"].as_u64() {
            Some(ms) => format!("primary: {} (was {}), after {ms} ms", s(&v["primary"]), s(&v["previous"])),
            None => "hand-over requested".to_string(),
        },
        Command::Events { .. } => {
            let rows: Vec<Vec<String>> = v["events"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|e| {
                            vec![
                                s(&e["index"]),
                                event_time(&e["time_ms"]),
                                s(&e["kind"]),
                                s(&e["node"]),
                                s(&e["message"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            table(&["index", "time (UTC)", "kind", "node", "message"], &rows)
        }
        Command::Cluster(ClusterCommand::Maintenance { state }) => format!("maintenance {state}"),
        Command::Token(TokenCommand::Create { .. }) => format!(
            "join token (shown once; the cluster keeps only its hash):\n{}\nid {}  expires {}  uses {}",
            s(&v["token"]),
            s(&v["id"]),
            v["ttl_ms"]
                .as_u64()
                .map_or("never".into(), |t| format!("in {}", humantime::format_duration(Duration::from_millis(t)))),
            v["uses"].as_u64().map_or("unlimited".into(), |u| u.to_string()),
        ),
        Command::Token(TokenCommand::List) => {
            let rows: Vec<Vec<String>> = v
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|t| {
                            vec![
                                s(&t["id"]),
                                event_time(&t["created_ms"]),
                                if t["expires_ms"].is_null() { "never".into() } else { event_time(&t["expires_ms"]) },
                                if t["uses_left"].is_null() { "unlimited".into() } else { s(&t["uses_left"]) },
                                if t["usable"].as_bool() == Some(true) { "usable".into() } else { "spent".into() },
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            table(&["id", "created (UTC)", "expires (UTC)", "uses left", "state"], &rows)
        }
        Command::Token(TokenCommand::Revoke { id }) => format!("join token {id} revoked"),
        Command::Cert(CertCommand::Rotate) => s(&v["message"]),
        Command::Cluster(ClusterCommand::Info { .. }) => format!(
            "cluster {}  nodes {}  maintenance {}  applied {}",
            s(&v["cluster_id"]),
            s(&v["nodes"]),
            if v["maintenance"].as_bool() == Some(true) { "on" } else { "off" },
            s(&v["applied_index"])
        ),
        _ => serde_json::to_string_pretty(v).unwrap_or_default(),
    }
}

/// A leader-stamped event time (ms since the epoch) as RFC 3339 UTC.
fn event_time(v: &Value) -> String {
    match v.as_u64() {
        Some(ms) => {
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
        }
        None => "-".into(),
    }
}

fn render_heartbeat(v: &Value) -> String {
    let mut out = Vec::new();
    let mnfa: Vec<String> = v["mnfa"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(n, on)| format!("{n}={}", if on.as_bool() == Some(true) { "ACTIVE" } else { "off" }))
                .collect()
        })
        .unwrap_or_default();
    out.push(format!(
        "node {} ({})  MNFA: {}",
        s(&v["node"]),
        s(&v["role"]),
        if mnfa.is_empty() { "-".into() } else { mnfa.join(" ") }
    ));
    let verdicts: Vec<Vec<String>> = v["verdicts"]
        .as_object()
        .map(|m| {
            m.iter().map(|(h, x)| vec![h.clone(), s(&x["verdict"]), s(&x["lost_for_ms"]), s(&x["reason"])]).collect()
        })
        .unwrap_or_default();
    out.push(table(&["host", "verdict", "lost_for_ms", "reason"], &verdicts));
    if let Some(own) = v["own_view"].as_object() {
        out.push(format!("\nown view ({}, period {})", s(&own["coordinator"]), s(&own["seq"])));
        let mut rows = Vec::new();
        for n in own["nets"].as_array().into_iter().flatten() {
            for h in n["hosts"].as_array().into_iter().flatten() {
                rows.push(vec![
                    s(&n["net"]),
                    s(&h["host"]),
                    s(&h["state"]),
                    s(&h["misses"]),
                    s(&h["last_heard_age_ms"]),
                    format!(
                        "{}{}",
                        if n["isolated"].as_bool() == Some(true) { "isolated " } else { "" },
                        if n["mnfa"].as_bool() == Some(true) { "mnfa" } else { "" }
                    ),
                ]);
            }
        }
        out.push(table(&["net", "host", "state", "misses", "last_heard_ms", "net_flags"], &rows));
    }
    let peers = v["peer_views"].as_array().cloned().unwrap_or_default();
    if !peers.is_empty() {
        out.push("\npeer views (through the criss-cross)".to_string());
        let rows: Vec<Vec<String>> = peers
            .iter()
            .flat_map(|p| {
                p["nets"].as_array().cloned().unwrap_or_default().into_iter().map(move |n| {
                    let missing: Vec<String> = n["missing"]
                        .as_array()
                        .map(|m| m.iter().map(|x| format!("{}:{}", s(&x["host"]), s(&x["state"]))).collect())
                        .unwrap_or_default();
                    vec![
                        s(&p["coordinator"]),
                        format!(
                            "{}{}",
                            s(&p["age_ms"]),
                            if p["stale"].as_bool() == Some(true) { " STALE" } else { "" }
                        ),
                        s(&n["net"]),
                        format!("{}/{}", s(&n["responding"]), s(&n["enabled"])),
                        if missing.is_empty() { "-".into() } else { missing.join(" ") },
                    ]
                })
            })
            .collect();
        out.push(table(&["coordinator", "age_ms", "net", "answering", "missing"], &rows));
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_codes_do_not_break_alignment() {
        let red = format!("{}lost{}", "\u{1b}[31m", "\u{1b}[0m");
        assert_eq!(visible_len(&red), 4);
        let t = table(&["a", "b"], &[vec![red, "x".into()], vec!["alive".into(), "y".into()]]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(visible_len(lines[1]), visible_len(lines[2]));
    }
}

//! Human output: aligned tables and one-line answers (`--json` prints the result instead).

use std::io::IsTerminal;
use std::time::Duration;

use serde_json::Value;

use super::{CertCommand, ClusterCommand, Command, NodeCommand, TokenCommand, VmCommand};

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

/// The `raft` column: `voter`, `learner`, or `client` (a hypervisor outside Raft); `-` where
/// it is not known (a client sees no Raft membership: no row is a Raft member).
fn raft_part(m: &Value, sees_raft: bool) -> &'static str {
    if !sees_raft {
        "-"
    } else if m["voter"].as_bool() == Some(true) {
        "voter"
    } else if m["raft_member"].as_bool() == Some(true) {
        "learner"
    } else if m["role"] == "hypervisor" {
        "client"
    } else {
        "-"
    }
}

/// The members of a `status` or `node-list` answer as a table.
fn members_table(members: &Value) -> String {
    let all = members.as_array().map(Vec::as_slice).unwrap_or_default();
    let sees_raft = all.iter().any(|m| m["raft_member"].as_bool() == Some(true));
    let rows: Vec<Vec<String>> = members
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    let voter = raft_part(m, sees_raft);
                    let secs = |v: &Value| v.as_u64().map_or("-".into(), |a| format!("{:.1}s", a as f64 / 1000.0));
                    // A client's keepalive is written when its figures move (up to a minute
                    // apart); when a coordinator last heard its session is its liveness.
                    let (age, heard) = (secs(&m["last_keepalive_age_ms"]), secs(&m["last_heard_age_ms"]));
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
                        paint(m["health"].as_str().map_or("ok".into(), |h| format!("UNHEALTHY: {h}"))),
                        age,
                        heard,
                        s(&m["address"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "name",
            "id",
            "role",
            "raft",
            "daemon",
            "domain",
            "router",
            "heartbeat",
            "fence",
            "health",
            "keepalive",
            "heard",
            "address",
        ],
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
            || t.starts_with("UNHEALTHY")
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

/// The human form of the answer to `command`.
pub fn render(command: &Command, v: &Value) -> String {
    match command {
        Command::Status => status(v),
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
            match (v["voter"].as_bool(), v["client"].as_bool()) {
                (Some(true), _) => "voter",
                (_, Some(true)) => "client outside Raft",
                _ => "learner",
            }
        ),
        Command::Node(NodeCommand::Remove { name, .. }) => format!("{name} removed"),
        Command::Heartbeat => render_heartbeat(v),
        Command::Vm(VmCommand::List) => vm_list(v),
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
        Command::Node(NodeCommand::Shutdown { .. }) => s(&v["message"]),
        Command::Node(NodeCommand::Fence { .. }) => {
            format!("fence of {} decided; `herd events` shows its outcome", s(&v["node"]))
        }
        Command::Node(NodeCommand::Primary { .. } | NodeCommand::Secondary { .. }) => match v["took_ms"].as_u64() {
            Some(ms) => format!("primary: {} (was {}), after {ms} ms", s(&v["primary"]), s(&v["previous"])),
            None => "hand-over requested".to_string(),
        },
        Command::Events { .. } => events(v),
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
        Command::Token(TokenCommand::List) => tokens(v),
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

/// `herd status`: the cluster line, the certificate, the members.
fn status(v: &Value) -> String {
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
    if let Some(e) = v["raft_error"].as_str() {
        out.push_str(&format!("RAFT STOPPED ON THIS NODE: {e}\n"));
    }
    if let Some(line) = session(&v["session"]) {
        out.push_str(&line);
    }
    if let Some(days) = v["tls"]["cert_expires_in_days"].as_u64() {
        let warn = if days < 30 { "  RENEW SOON" } else { "" };
        out.push_str(&format!("certificate expires in {days} days{warn}\n"));
    }
    if let Some(line) = scheduling(v) {
        out.push_str(&line);
    }
    out.push_str(&members_table(&v["members"]));
    out
}

/// A client's session (outside Raft): `session: following c2 (answered 180 ms ago, 0 moves)`,
/// or why it fails.
fn session(sess: &Value) -> Option<String> {
    let moves = sess.get("moves")?;
    let line = match (sess["coordinator"].as_str(), sess["failing"].as_str()) {
        (_, Some(why)) => format!("session: FAILING ({why}), {moves} moves\n"),
        (Some(c), None) => {
            format!("session: following {c} (answered {} ms ago, {moves} moves)\n", s(&sess["answered_ms_ago"]))
        }
        (None, None) => "session: looking for a coordinator\n".to_string(),
    };
    Some(line)
}

/// `scheduling rr/10, memory locked; pauses > lease/3: 0 (longest last minute 3 ms)`, with
/// what the kernel refused.
fn scheduling(v: &Value) -> Option<String> {
    let sc = v.get("scheduling")?;
    let policy = match sc["policy"].as_str()? {
        "other" => "normal (not real time)".to_string(),
        p => format!("{p}/{}", s(&sc["priority"])),
    };
    let memory = if sc["memory_locked"].as_bool() == Some(true) { "memory locked" } else { "memory not locked" };
    let mut line = format!(
        "scheduling {policy}, {memory}; pauses > lease/3: {} (longest in the last minute {} ms)\n",
        s(&v["pauses"]["total"]),
        s(&v["pauses"]["longest_last_minute_ms"])
    );
    for r in sc["refused"].as_array().into_iter().flatten() {
        line.push_str(&format!("  refused: {}\n", s(r)));
    }
    Some(line)
}

/// `herd vm list`.
fn vm_list(v: &Value) -> String {
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
                        if m["failure_reason"].is_string() { s(&m["failure_reason"]) } else { s(&m["waiting"]) },
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["name", "state", "node", "last_node", "actual", "reason"], &rows)
}

/// `herd events`.
fn events(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    vec![s(&e["index"]), event_time(&e["time_ms"]), s(&e["kind"]), s(&e["node"]), s(&e["message"])]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["index", "time (UTC)", "kind", "node", "message"], &rows)
}

/// `herd token list`.
fn tokens(v: &Value) -> String {
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

    #[test]
    fn the_members_table_shows_when_a_client_was_last_heard() {
        let v = serde_json::json!({"node": "c1", "state": "leader", "members": [
            {"name": "h1", "role": "hypervisor", "last_keepalive_age_ms": 41_000, "last_heard_age_ms": 800},
            {"name": "c2", "role": "coordinator", "raft_member": true, "last_keepalive_age_ms": 900},
        ]});
        let out = status(&v);
        let header = out.lines().find(|l| l.contains("KEEPALIVE")).expect("a header");
        assert!(header.contains("HEARD"), "{out}");
        let h1 = out.lines().find(|l| l.starts_with("h1")).expect("h1's row");
        assert!(h1.contains("41.0s") && h1.contains("0.8s"), "{out}");
        let c2 = out.lines().find(|l| l.starts_with("c2")).expect("c2's row");
        assert!(c2.contains("0.9s") && c2.contains(" - "), "a member has no heard age: {out}");
    }

    #[test]
    fn a_clients_status_shows_its_session() {
        let v = serde_json::json!({"node": "h1", "state": "client", "quorum": true, "members": [],
            "session": {"coordinator": "c2", "coordinator_id": 2, "answered_ms_ago": 180, "moves": 1, "failing": null}});
        assert!(status(&v).contains("session: following c2 (answered 180 ms ago, 1 moves)"), "{}", status(&v));
        let v = serde_json::json!({"session": {"coordinator": "c2", "moves": 3, "failing": "c2:7400: refused"}});
        assert!(status(&v).contains("session: FAILING (c2:7400: refused), 3 moves"));
        let member = serde_json::json!({"node": "c1", "state": "leader", "members": []});
        assert!(!status(&member).contains("session"), "a Raft member has no session line");
    }
}

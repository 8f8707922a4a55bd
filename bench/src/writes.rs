//! `herd-bench writes [SECONDS]`: replicated writes, herd beside etcd, on one machine.
//!
//! A 3-coordinator herd cluster (release daemons on 127.0.5.1-3) and a 3-member etcd cluster
//! (Debian's `etcd-server`, 127.0.4.1-3), both on loopback, both with fsync on (herd flushes its
//! log on append; etcd's default), data in the same temporary directory. The same load
//! generator drives both at 1, 16 and 64 concurrent clients, each client bound to one member
//! (round robin), one request in flight per client:
//! - herd: the CLI's own write path — a JSON line on a member's admin socket (`maintenance`
//!   off: one replicated command per request), forwarded to the leader, committed, applied;
//! - etcd: `put` through the `etcd-client` crate (gRPC), to a member, which forwards to its
//!   leader.
//!
//! Runs alternate A B A B (herd, etcd, herd, etcd) for each client count, and the medians of
//! the two runs are reported, so that machine drift cancels.
//!
//! For profiling one side: `HERD_BENCH_ONLY=herd` starts no etcd (its columns and the ratio are
//! then empty), `HERD_BENCH_CLIENTS=64` (or `1,16`) picks the client counts.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::procs::Procs;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

const CLIENTS: [usize; 3] = [1, 16, 64];

fn herd_socket(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("h{i}/admin.sock"))
}

async fn admin(socket: &Path, req: &Value) -> Result<Value> {
    let mut s = UnixStream::connect(socket).await.with_context(|| socket.display().to_string())?;
    s.write_all(format!("{req}\n").as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).await?;
    let v: Value = serde_json::from_str(&line)?;
    if v["ok"] == true {
        Ok(v["result"].clone())
    } else {
        bail!("{}: {}", req["op"], v["error"])
    }
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl AsyncFnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond().await {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn start_herd(p: &mut Procs, herd: &Path) -> Result<()> {
    for i in 1..=3 {
        let d = p.dir.join(format!("h{i}"));
        std::fs::create_dir_all(&d)?;
        let config = format!(
            "name = \"h{i}\"\nrole = \"coordinator\"\ndata_dir = \"{d}/data\"\nadmin_socket = \"{d}/admin.sock\"\n\
             [cluster]\nlisten = \"127.0.5.{i}:7400\"\n",
            d = d.display()
        );
        std::fs::write(d.join("herd.toml"), config)?;
        p.spawn_herd(herd, &d, None)?;
        let sock = herd_socket(&p.dir, i);
        wait_for("a herd admin socket", Duration::from_secs(20), async || {
            admin(&sock, &json!({"op": "status"})).await.is_ok()
        })
        .await?;
    }
    let init = admin(&herd_socket(&p.dir, 1), &json!({"op": "init-cluster"})).await?;
    let token = init["token"].as_str().context("token")?.to_string();
    for i in 2..=3 {
        admin(&herd_socket(&p.dir, i), &json!({"op": "join-cluster", "peer": "127.0.5.1:7400", "token": token}))
            .await?;
    }
    let sock = herd_socket(&p.dir, 2);
    wait_for("3 herd voters in run", Duration::from_secs(60), async || {
        admin(&sock, &json!({"op": "status"})).await.is_ok_and(|s| {
            let m = s["members"].as_array().cloned().unwrap_or_default();
            m.len() == 3 && m.iter().all(|x| x["daemon_state"] == "run" && x["voter"] == true)
        })
    })
    .await
}

fn etcd_endpoint(i: usize) -> String {
    format!("http://127.0.4.{i}:2379")
}

async fn start_etcd(p: &mut Procs) -> Result<()> {
    let cluster: Vec<String> = (1..=3).map(|i| format!("e{i}=http://127.0.4.{i}:2380")).collect();
    for i in 1..=3 {
        let d = p.dir.join(format!("e{i}"));
        std::fs::create_dir_all(&d)?;
        let log = std::fs::File::create(p.dir.join(format!("e{i}.log")))?;
        p.children.push(
            Command::new("etcd")
                .args(["--name", &format!("e{i}"), "--data-dir"])
                .arg(&d)
                .args(["--listen-client-urls", &etcd_endpoint(i), "--advertise-client-urls", &etcd_endpoint(i)])
                .args(["--listen-peer-urls", &format!("http://127.0.4.{i}:2380")])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.4.{i}:2380")])
                .args(["--initial-cluster", &cluster.join(","), "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "herd-bench"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("etcd (Debian package etcd-server)")?,
        );
    }
    wait_for("etcd accepting writes", Duration::from_secs(60), async || {
        match etcd_client::Client::connect([etcd_endpoint(1)], None).await {
            Ok(mut c) => c.put("herd-bench-probe", "1", None).await.is_ok(),
            Err(_) => false,
        }
    })
    .await
}

/// Latencies of every request `clients` clients completed in `window`.
async fn drive<F, Fut>(clients: usize, window: Duration, make_op: F) -> Result<(usize, Vec<Duration>, Duration)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Box<dyn FnMut() -> futures_op::Op + Send>>>,
{
    let mut tasks = Vec::new();
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + window;
    for c in 0..clients {
        let mut op = make_op(c).await?;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let mut lat = Vec::new();
            while Instant::now() < end {
                let t = Instant::now();
                op().await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = start.elapsed();
    Ok((all.len(), all, elapsed))
}

mod futures_op {
    pub type Op = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;
}

fn figures(n: usize, mut lat: Vec<Duration>, elapsed: Duration) -> Value {
    lat.sort();
    let ms = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let at = |p: f64| lat.get(((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len().max(1)) - 1);
    json!({
        "writes": n,
        "writes_per_s": n as f64 / elapsed.as_secs_f64(),
        "p50_ms": ms(at(0.50)),
        "p99_ms": ms(at(0.99)),
        "max_ms": ms(lat.last()),
    })
}

async fn herd_run(dir: &Path, clients: usize, window: Duration) -> Result<Value> {
    let dir = dir.to_path_buf();
    let (n, lat, el) = drive(clients, window, |c| {
        let sock = herd_socket(&dir, c % 3 + 1);
        async move {
            let s = UnixStream::connect(&sock).await?;
            let (r, w) = s.into_split();
            let state = std::sync::Arc::new(tokio::sync::Mutex::new((BufReader::new(r), w)));
            let op: Box<dyn FnMut() -> futures_op::Op + Send> = Box::new(move || {
                let state = state.clone();
                Box::pin(async move {
                    let mut g = state.lock().await;
                    g.1.write_all(b"{\"op\":\"maintenance\",\"on\":false}\n").await?;
                    let mut line = String::new();
                    g.0.read_line(&mut line).await?;
                    if !line.contains("\"ok\":true") {
                        bail!("herd write failed: {line}");
                    }
                    Ok(())
                })
            });
            Ok(op)
        }
    })
    .await?;
    Ok(figures(n, lat, el))
}

async fn etcd_run(clients: usize, window: Duration) -> Result<Value> {
    let (n, lat, el) = drive(clients, window, |c| async move {
        let client = etcd_client::Client::connect([etcd_endpoint(c % 3 + 1)], None).await?;
        let mut seq = 0u64;
        let op: Box<dyn FnMut() -> futures_op::Op + Send> = Box::new(move || {
            let mut kv = client.kv_client();
            seq += 1;
            let key = format!("bench/{c}/{seq}");
            Box::pin(async move {
                kv.put(key, "x", None).await?;
                Ok(())
            })
        });
        Ok(op)
    })
    .await?;
    Ok(figures(n, lat, el))
}

fn median(a: f64, b: f64) -> f64 {
    (a + b) / 2.0
}

pub async fn run(herd: PathBuf, seconds: u64) -> Result<Vec<Value>> {
    let dir = std::env::temp_dir().join(format!("herd-bench-writes-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut p = Procs { dir: dir.clone(), children: Vec::new() };
    // For profiling one side: `HERD_BENCH_ONLY=herd` (no etcd), `HERD_BENCH_CLIENTS=64,16`.
    let herd_only = std::env::var("HERD_BENCH_ONLY").is_ok_and(|v| v == "herd");
    let clients_list: Vec<usize> = match std::env::var("HERD_BENCH_CLIENTS") {
        Ok(v) => {
            v.split(',').map(|c| c.trim().parse().context("HERD_BENCH_CLIENTS: numbers")).collect::<Result<_>>()?
        }
        Err(_) => CLIENTS.to_vec(),
    };
    start_herd(&mut p, &herd).await?;
    if !herd_only {
        start_etcd(&mut p).await?;
    }
    let window = Duration::from_secs(seconds);
    let mut rows = Vec::new();
    println!(
        "{:>7} {:>12} {:>12} {:>7} {:>10} {:>10} {:>10} {:>10}",
        "clients", "herd w/s", "etcd w/s", "ratio", "herd p50", "etcd p50", "herd p99", "etcd p99"
    );
    for clients in clients_list {
        // A B A B: herd, etcd, herd, etcd.
        let h1 = herd_run(&dir, clients, window).await?;
        let e1 = if herd_only { json!({}) } else { etcd_run(clients, window).await? };
        let h2 = herd_run(&dir, clients, window).await?;
        let e2 = if herd_only { json!({}) } else { etcd_run(clients, window).await? };
        let m = |a: &Value, b: &Value, k: &str| median(a[k].as_f64().unwrap_or(0.0), b[k].as_f64().unwrap_or(0.0));
        let row = json!({
            "clients": clients,
            "herd_writes_per_s": m(&h1, &h2, "writes_per_s"),
            "etcd_writes_per_s": m(&e1, &e2, "writes_per_s"),
            "herd_p50_ms": m(&h1, &h2, "p50_ms"),
            "etcd_p50_ms": m(&e1, &e2, "p50_ms"),
            "herd_p99_ms": m(&h1, &h2, "p99_ms"),
            "etcd_p99_ms": m(&e1, &e2, "p99_ms"),
            "herd_max_ms": h1["max_ms"].as_f64().unwrap_or(0.0).max(h2["max_ms"].as_f64().unwrap_or(0.0)),
            "etcd_max_ms": e1["max_ms"].as_f64().unwrap_or(0.0).max(e2["max_ms"].as_f64().unwrap_or(0.0)),
            "runs": {"herd": [h1, h2], "etcd": [e1, e2]},
        });
        let f = |k: &str| row[k].as_f64().unwrap_or(0.0);
        let ratio = (!herd_only).then(|| f("herd_writes_per_s") / f("etcd_writes_per_s").max(1e-9));
        let etcd = |k: &str, unit: &str| if herd_only { "-".to_string() } else { format!("{:.2}{unit}", f(k)) };
        println!(
            "{:>7} {:>12.0} {:>12} {:>7} {:>9.2}ms {:>11} {:>9.2}ms {:>11}",
            clients,
            f("herd_writes_per_s"),
            if herd_only { "-".to_string() } else { format!("{:.0}", f("etcd_writes_per_s")) },
            ratio.map_or("-".to_string(), |r| format!("{r:.2}")),
            f("herd_p50_ms"),
            etcd("etcd_p50_ms", "ms"),
            f("herd_p99_ms"),
            etcd("etcd_p99_ms", "ms"),
        );
        let mut row = row;
        row["ratio_writes_per_s"] = json!(ratio);
        rows.push(row);
    }
    Ok(rows)
}

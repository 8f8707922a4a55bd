//! `[fencing] auto_ready = true` (issue 16): a fenced node that boots again makes itself ready,
//! judged on its own applied fence record (it learns of its fence only by catching up, so it
//! must not read its view before that). 3 coordinators + 1 hypervisor on loopback, a real
//! `ipmi_sim` as the hypervisor's BMC whose power-off kills its daemon; the hypervisor is
//! fenced by hand, "boots" (its daemon started again) and must come back `run`/`ready` by
//! itself — every time, `HERD_T94_REBOOTS` times (default 20).

use std::time::Duration;

use serde_json::{json, Value};

use crate::bmc::{self, Bmc};
use crate::harness::{wait_until, Cluster};

const SPECS: &[(&str, &str, &str)] = &[
    ("a1", "coordinator", "127.0.10.1:7400"),
    ("a2", "coordinator", "127.0.10.2:7400"),
    ("a3", "coordinator", "127.0.10.3:7400"),
    ("ah", "hypervisor", "127.0.10.4:7400"),
];

fn hv(c: &mut Cluster) -> Option<Value> {
    c.node("a1").try_admin(&json!({"op": "node-info", "name": "ah"})).ok()
}

#[test]
fn a_fenced_auto_ready_node_is_ready_after_every_boot() {
    if !bmc::available("a_fenced_auto_ready_node_is_ready_after_every_boot") {
        return;
    }
    let reboots: usize = std::env::var("HERD_T94_REBOOTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let mut c = Cluster::new(SPECS, "");
    let b = Bmc::start(&c.dir.path().join("bmc"), "127.0.0.1", bmc::free_udp_port(), None);
    c.node("ah").extra_config.push_str(&format!(
        "[fence]\ncall_timeout_ms = 1000\nconfirm_timeout_ms = 3000\n\
         [fencing]\nbmc = \"{}\"\nuser = \"{}\"\npassword_file = \"{}\"\nfence_action = \"off\"\nauto_ready = true\n",
        b.addr,
        bmc::USER,
        b.password_file().display()
    ));
    for (name, _, _) in SPECS {
        c.node(name).start();
    }
    let token = c.node("a1").admin(json!({"op": "init-cluster"}))["token"].as_str().expect("token").to_string();
    for (name, _, _) in &SPECS[1..] {
        c.node(name).admin(json!({"op": "join-cluster", "peer": "127.0.10.1:7400", "token": token}));
    }
    wait_until("ah runs and can be fenced", Duration::from_secs(30), || {
        let n = hv(&mut c)?;
        (n["daemon_state"] == "run" && n["fencing"]["can_fence"] == true).then_some(())
    });
    for boot in 1..=reboots {
        b.kill_on_power_off("herd", c.node("ah").child.as_ref().expect("running").id());
        let out = c.node("a1").cli(&["node", "fence", "ah", "--yes"]);
        assert!(out.status.success(), "boot {boot}: {}", String::from_utf8_lossy(&out.stderr));
        wait_until("ah fenced and powered off", Duration::from_secs(20), || {
            let n = hv(&mut c)?;
            (n["daemon_state"] == "fenced" && !b.power_on()).then_some(())
        });
        // The host boots: power on, the daemon starts (its old process was killed by the BMC).
        c.node("ah").kill9();
        b.ipmitool(&["chassis", "power", "on"]).expect("power on");
        c.node("ah").start();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let n = loop {
            let n = hv(&mut c).unwrap_or_default();
            if n["daemon_state"] == "run" && n["domain_state"] == "ready" {
                break n;
            }
            if std::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(c.node("ah").log_path()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                panic!(
                    "boot {boot}: ah not ready by itself: {n}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(n["fence"]["fenced_ms"].is_u64(), "boot {boot}: the fence is on record: {n}");
    }
    eprintln!("t94: a fenced auto_ready node made itself ready after each of {reboots} boots");
}

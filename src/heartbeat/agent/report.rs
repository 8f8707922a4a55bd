//! `herd heartbeat`: the agent's whole picture as JSON (also written to the log on SIGUSR2).

use super::*;

impl Agent {
    /// The whole picture for `herd heartbeat`.
    pub fn report(&self) -> serde_json::Value {
        let now = self.now_ms();
        let verdicts = self.verdicts();
        // Work on a copy: a report over 1000 hosts must not hold up pulses and answers.
        let g = self.lock().clone();
        let name = |id: NodeId| g.targets.get(&id).map_or_else(|| format!("node {id}"), |t| t.name.clone());
        let own = g.view.as_ref().map(|v| {
            let nets: BTreeSet<&NetName> = v.links().keys().map(|(_, n)| n).collect();
            let nets: Vec<serde_json::Value> = nets
                .into_iter()
                .map(|net| {
                    let hosts: Vec<serde_json::Value> = v
                        .links()
                        .iter()
                        .filter(|((_, n), _)| n == net)
                        .map(|((h, _), l)| {
                            serde_json::json!({
                                "host": name(*h), "id": h, "state": l.state, "misses": l.misses,
                                "last_heard_age_ms": l.last_heard_ms.map(|t| now.saturating_sub(t)),
                            })
                        })
                        .collect();
                    let periods: Vec<_> = v.history().iter().filter_map(|p| p.nets.get(net)).collect();
                    let mut missed: BTreeMap<String, usize> = BTreeMap::new();
                    for p in v.history() {
                        if let Some(pn) = p.nets.get(net) {
                            let answered: BTreeSet<NodeId> = pn.responding.iter().copied().collect();
                            for (h, _) in v.links().keys().filter(|(_, n)| n == net) {
                                if !answered.contains(h) {
                                    *missed.entry(name(*h)).or_default() += 1;
                                }
                            }
                        }
                    }
                    serde_json::json!({
                        "net": net,
                        "isolated": v.is_isolated(net),
                        "mnfa": v.mnfa_active(net),
                        "hosts": hosts,
                        "history": {
                            "periods": periods.len(),
                            "window_ms": self.params.history_ms,
                            "min_responding": periods.iter().map(|p| p.responding.len()).min(),
                            "max_responding": periods.iter().map(|p| p.responding.len()).max(),
                            "missed_periods": missed,
                        },
                    })
                })
                .collect();
            serde_json::json!({ "coordinator": name(v.me()), "id": v.me(), "seq": v.seq(), "late_answers": v.late, "nets": nets })
        });
        let peers: Vec<serde_json::Value> = g
            .cache
            .views(now)
            .into_iter()
            .map(|(s, age)| {
                let nets: Vec<serde_json::Value> = s
                    .nets
                    .iter()
                    .map(|n| {
                        let missing: Vec<serde_json::Value> = n
                            .missing
                            .iter()
                            .map(|m| serde_json::json!({"host": name(m.host), "id": m.host, "state": m.state, "misses": m.misses, "last_heard_ago_ms": m.last_heard_ago_ms}))
                            .collect();
                        serde_json::json!({"net": n.net, "enabled": n.enabled, "responding": n.responding, "isolated": n.isolated, "mnfa": n.mnfa, "truncated": n.truncated, "missing": missing})
                    })
                    .collect();
                serde_json::json!({
                    "coordinator": name(s.coordinator), "id": s.coordinator, "seq": s.seq, "age_ms": age,
                    "stale": age >= self.params.history_ms, "nets": nets,
                })
            })
            .collect();
        let (own_summary, peer_inputs) = Self::inputs(&g, now);
        let mut inputs: Vec<ViewInput<'_>> =
            peer_inputs.iter().map(|(s, age)| ViewInput { summary: s, age_ms: *age }).collect();
        if let Some(o) = own_summary.as_ref() {
            inputs.push(ViewInput { summary: o, age_ms: 0 });
        }
        let mnfa = verdict::mnfa_networks(&inputs, &self.params);
        let verdicts: BTreeMap<String, &HostVerdict> = verdicts.iter().map(|(id, v)| (name(*id), v)).collect();
        serde_json::json!({
            "node": self.name,
            "node_id": g.me.as_ref().map(|(id, _)| *id),
            "role": self.role,
            "networks": self.addrs,
            "params": self.params,
            "counters": g.counters,
            "own_view": own,
            "peer_views": peers,
            "mnfa": mnfa,
            "verdicts": verdicts,
        })
    }
}

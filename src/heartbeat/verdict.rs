//! The verdict: is a host alive? Pure, over every fresh coordinator view (used by fencing).
//!
//! A host is `alive` while any fresh view has it not `lost` on some network; it is `lost` when
//! every fresh view that can judge it has it `lost` on every network it can judge, and
//! `lost_for_ms` counts from the moment the last of those became true. A view does not judge a
//! network it is isolated on (it hears nobody there: the fault is the observer's), and cannot
//! judge a host at all when it is isolated on every network the host has.
//! A view is fresh while younger than `history_ms`; stale views are never used. While MNFA is
//! active on any network in any fresh view, no `lost` verdict is given at all.
//! An isolated view's silence is no evidence of death, but what it heard is evidence of life:
//! `lost_for_ms` never counts from before the last time any fresh view heard the host (less the
//! `lost_after` periods a link takes to be lost) — a coordinator cut off with the host, which
//! becomes isolated because the host itself fell silent, still holds its fence back (seed 43333).

use std::collections::{BTreeMap, BTreeSet};

use herd_storage::model::NodeId;
use serde::Serialize;

use super::wire::Summary;
use super::{LinkState, NetName, Params};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Alive,
    Lost,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostVerdict {
    pub verdict: Verdict,
    /// How long the host has been lost in every fresh view (0 when alive).
    pub lost_for_ms: u64,
    pub reason: String,
}

/// One coordinator's view as input: its summary and its age now.
#[derive(Clone, Copy, Debug)]
pub struct ViewInput<'a> {
    pub summary: &'a Summary,
    pub age_ms: u64,
}

/// Networks on which MNFA is active in some fresh view.
/// The other coordinators whose views, younger than `within_ms`, hear `host` (not lost on
/// some network it is pulsed on) — evidence of life for the saving throw, with each view's
/// age. A view that cannot judge (isolated) is no evidence; nor is the host's own view.
pub fn heard_in_views(
    host: NodeId,
    nets: &BTreeSet<NetName>,
    views: &[ViewInput<'_>],
    within_ms: u64,
) -> Vec<(NodeId, u64)> {
    views
        .iter()
        .filter(|v| v.age_ms < within_ms && v.summary.coordinator != host)
        .filter(|v| matches!(judge(v, host, nets), ViewSays::NotLost))
        .map(|v| (v.summary.coordinator, v.age_ms))
        .collect()
}

pub fn mnfa_networks(views: &[ViewInput<'_>], params: &Params) -> BTreeMap<NetName, bool> {
    let mut out = BTreeMap::new();
    for v in views.iter().filter(|v| v.age_ms < params.history_ms) {
        for n in &v.summary.nets {
            // An isolated view's MNFA says nothing about the hosts (the observer is the fault).
            *out.entry(n.net.clone()).or_insert(false) |= n.mnfa && !n.isolated;
        }
    }
    out
}

/// How long `host` has been lost on every network in view `v`, or why it is not.
enum ViewSays {
    Lost { for_ms: u64 },
    NotLost,
    CannotJudge,
}

/// How long ago view `v` last heard `host` on a network it is isolated on, if it did.
fn heard_while_isolated(v: &ViewInput<'_>, host: NodeId, nets: &BTreeSet<NetName>) -> Option<u64> {
    nets.iter()
        .filter_map(|net| v.summary.net(net).filter(|ns| ns.isolated))
        .filter_map(|ns| ns.missing.iter().find(|m| m.host == host)?.last_heard_ago_ms)
        .map(|ago| ago.saturating_add(v.age_ms))
        .min()
}

fn judge(v: &ViewInput<'_>, host: NodeId, nets: &BTreeSet<NetName>) -> ViewSays {
    let mut judged = false;
    let mut lost_for = u64::MAX;
    for net in nets {
        let Some(ns) = v.summary.net(net) else { continue };
        if ns.isolated {
            continue;
        }
        judged = true;
        match ns.missing.iter().find(|m| m.host == host) {
            // A truncated list that does not name the host says nothing: take it as heard.
            Some(m) if m.state == LinkState::Lost => lost_for = lost_for.min(m.state_for_ms.saturating_add(v.age_ms)),
            _ => return ViewSays::NotLost,
        }
    }
    if judged {
        ViewSays::Lost { for_ms: lost_for }
    } else {
        ViewSays::CannotJudge
    }
}

/// Verdicts for `hosts` (each with the networks it has addresses on).
pub fn verdicts(
    hosts: &BTreeMap<NodeId, BTreeSet<NetName>>,
    views: &[ViewInput<'_>],
    params: &Params,
) -> BTreeMap<NodeId, HostVerdict> {
    let fresh: Vec<&ViewInput<'_>> = views.iter().filter(|v| v.age_ms < params.history_ms).collect();
    let mnfa: Vec<NetName> = mnfa_networks(views, params).into_iter().filter(|(_, on)| *on).map(|(n, _)| n).collect();
    hosts
        .iter()
        .map(|(host, nets)| {
            let alive = |reason: String| HostVerdict { verdict: Verdict::Alive, lost_for_ms: 0, reason };
            if !mnfa.is_empty() {
                return (*host, alive(format!("MNFA active on {}: failure verdicts suspended", mnfa.join(", "))));
            }
            // A coordinator's own view says nothing about itself.
            let judging: Vec<(&&ViewInput<'_>, ViewSays)> =
                fresh.iter().filter(|v| v.summary.coordinator != *host).map(|v| (v, judge(v, *host, nets))).collect();
            let mut lost_in = 0;
            let mut lost_for = u64::MAX;
            let mut heard_by = Vec::new();
            for (v, says) in &judging {
                match says {
                    ViewSays::Lost { for_ms } => {
                        lost_in += 1;
                        lost_for = lost_for.min(*for_ms);
                    }
                    ViewSays::NotLost => heard_by.push(v.summary.coordinator),
                    ViewSays::CannotJudge => {}
                }
            }
            let verdict = if !heard_by.is_empty() {
                let ids: Vec<String> = heard_by.iter().map(u64::to_string).collect();
                alive(format!("not lost on some network in the view of coordinator(s) {}", ids.join(", ")))
            } else if lost_in == 0 {
                alive(if judging.is_empty() {
                    "no fresh coordinator view".to_string()
                } else {
                    "every fresh view is isolated on this host's networks".to_string()
                })
            } else {
                let lost_after_ms = u64::from(params.lost_after).saturating_mul(params.interval_ms);
                let heard = judging.iter().filter_map(|(v, _)| heard_while_isolated(v, *host, nets)).min();
                let lost_for = heard.map_or(lost_for, |ago| lost_for.min(ago.saturating_sub(lost_after_ms)));
                HostVerdict {
                    verdict: Verdict::Lost,
                    lost_for_ms: lost_for,
                    reason: format!("lost on every network in all {lost_in} fresh view(s) that can judge it"),
                }
            };
            (*host, verdict)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::wire::{Missing, NetSummary};

    fn lost(host: NodeId, for_ms: u64) -> Missing {
        Missing {
            host,
            state: LinkState::Lost,
            misses: 20,
            last_heard_ago_ms: Some(for_ms + 1000),
            state_for_ms: for_ms,
        }
    }

    fn degraded(host: NodeId) -> Missing {
        Missing { host, state: LinkState::Degraded, misses: 7, last_heard_ago_ms: Some(700), state_for_ms: 100 }
    }

    fn net(name: &str, missing: Vec<Missing>) -> NetSummary {
        NetSummary {
            net: name.into(),
            enabled: 4,
            responding: 4,
            isolated: false,
            mnfa: false,
            missing,
            truncated: false,
        }
    }

    fn view(c: NodeId, nets: Vec<NetSummary>) -> Summary {
        Summary { coordinator: c, seq: 1, nets }
    }

    fn hosts(list: &[(NodeId, &[&str])]) -> BTreeMap<NodeId, BTreeSet<NetName>> {
        list.iter().map(|(h, ns)| (*h, ns.iter().map(|n| n.to_string()).collect())).collect()
    }

    fn verdict_of(h: NodeId, views: &[(Summary, u64)], hs: &BTreeMap<NodeId, BTreeSet<NetName>>) -> HostVerdict {
        let inputs: Vec<ViewInput<'_>> = views.iter().map(|(s, age)| ViewInput { summary: s, age_ms: *age }).collect();
        verdicts(hs, &inputs, &Params::default()).remove(&h).expect("verdict")
    }

    const TWO: &[&str] = &["mgmt", "storage"];

    struct Case {
        name: &'static str,
        views: Vec<(Summary, u64)>,
        expect: Verdict,
        lost_for_ms: u64,
    }

    /// Cases about which views count: networks, freshness, other coordinators.
    fn views_cases() -> Vec<Case> {
        vec![
            Case {
                name: "lost on every network in every view",
                views: vec![
                    (view(1, vec![net("mgmt", vec![lost(9, 500)]), net("storage", vec![lost(9, 700)])]), 0),
                    (view(2, vec![net("mgmt", vec![lost(9, 900)]), net("storage", vec![lost(9, 400)])]), 100),
                ],
                expect: Verdict::Lost,
                lost_for_ms: 500, // the latest moment it became true: 500 ms ago in view 1, 500 in view 2
            },
            Case {
                name: "one network still answers: alive",
                views: vec![(view(1, vec![net("mgmt", vec![lost(9, 500)]), net("storage", vec![])]), 0)],
                expect: Verdict::Alive,
                lost_for_ms: 0,
            },
            Case {
                name: "lost in one view, heard in another: alive",
                views: vec![
                    (view(1, vec![net("mgmt", vec![lost(9, 500)]), net("storage", vec![lost(9, 500)])]), 0),
                    (view(2, vec![net("mgmt", vec![]), net("storage", vec![lost(9, 500)])]), 0),
                ],
                expect: Verdict::Alive,
                lost_for_ms: 0,
            },
            Case {
                name: "degraded is not lost",
                views: vec![(view(1, vec![net("mgmt", vec![degraded(9)]), net("storage", vec![lost(9, 500)])]), 0)],
                expect: Verdict::Alive,
                lost_for_ms: 0,
            },
            Case {
                // StarlingX kept using relayed views with nothing newer; stale views are ignored
                // here, in both directions.
                name: "a stale view that hears the host does not keep it alive",
                views: vec![
                    (view(1, vec![net("mgmt", vec![lost(9, 500)]), net("storage", vec![lost(9, 500)])]), 0),
                    (view(2, vec![net("mgmt", vec![]), net("storage", vec![])]), 6000),
                ],
                expect: Verdict::Lost,
                lost_for_ms: 500,
            },
            Case {
                name: "only stale views: no verdict of loss",
                views: vec![(view(1, vec![net("mgmt", vec![lost(9, 500)]), net("storage", vec![lost(9, 500)])]), 5000)],
                expect: Verdict::Alive,
                lost_for_ms: 0,
            },
        ]
    }

    /// Cases about the flags a view carries: isolated, truncated, MNFA, relayed ages.
    fn flag_cases() -> Vec<Case> {
        vec![
            Case {
                name: "an isolated view cannot judge; the other view decides",
                views: vec![
                    (
                        view(
                            1,
                            vec![
                                NetSummary { isolated: true, ..net("mgmt", vec![lost(9, 9000)]) },
                                NetSummary { isolated: true, ..net("storage", vec![lost(9, 9000)]) },
                            ],
                        ),
                        0,
                    ),
                    (view(2, vec![net("mgmt", vec![lost(9, 300)]), net("storage", vec![lost(9, 300)])]), 0),
                ],
                expect: Verdict::Lost,
                lost_for_ms: 300,
            },
            Case {
                // Seed 43333: c3 was cut off with h1 and heard it until h1 hung 1.2 s ago; c3 is
                // isolated only because h1 fell silent. Lost counts from that last answer.
                name: "an isolated view's last answer bounds how long the host is lost",
                views: vec![
                    (
                        view(
                            1,
                            vec![
                                NetSummary { isolated: true, ..net("mgmt", vec![lost(9, 200)]) },
                                NetSummary { isolated: true, ..net("storage", vec![lost(9, 200)]) },
                            ],
                        ),
                        0,
                    ),
                    (view(2, vec![net("mgmt", vec![lost(9, 3000)]), net("storage", vec![lost(9, 3000)])]), 0),
                ],
                expect: Verdict::Lost,
                lost_for_ms: 200,
            },
            Case {
                name: "every view isolated: alive",
                views: vec![(
                    view(
                        1,
                        vec![
                            NetSummary { isolated: true, ..net("mgmt", vec![lost(9, 900)]) },
                            NetSummary { isolated: true, ..net("storage", vec![]) },
                        ],
                    ),
                    0,
                )],
                expect: Verdict::Alive,
                lost_for_ms: 0,
            },
            Case {
                name: "a truncated list that does not name the host: taken as heard",
                views: vec![(
                    view(
                        1,
                        vec![
                            NetSummary { truncated: true, ..net("mgmt", vec![lost(3, 900)]) },
                            net("storage", vec![lost(9, 900)]),
                        ],
                    ),
                    0,
                )],
                expect: Verdict::Alive,
                lost_for_ms: 0,
            },
            Case {
                name: "MNFA anywhere suspends loss verdicts",
                views: vec![(
                    view(
                        1,
                        vec![
                            NetSummary { mnfa: true, ..net("mgmt", vec![lost(9, 900)]) },
                            net("storage", vec![lost(9, 900)]),
                        ],
                    ),
                    0,
                )],
                expect: Verdict::Alive,
                lost_for_ms: 0,
            },
            Case {
                name: "ages of relayed views add to how long the host has been lost",
                views: vec![(view(1, vec![net("mgmt", vec![lost(9, 500)]), net("storage", vec![lost(9, 500)])]), 1200)],
                expect: Verdict::Lost,
                lost_for_ms: 1700,
            },
        ]
    }

    #[test]
    fn table() {
        let hs = hosts(&[(9, TWO)]);
        for c in views_cases().into_iter().chain(flag_cases()) {
            let v = verdict_of(9, &c.views, &hs);
            assert_eq!((v.verdict, v.lost_for_ms), (c.expect, c.lost_for_ms), "{}: {}", c.name, v.reason);
        }
    }

    /// StarlingX compared counts ("I reach 5, peer reaches 5"); views here name hosts, so two
    /// views with equal counts but different missing hosts give each host its own verdict.
    #[test]
    fn identities_not_counts() {
        let hs = hosts(&[(8, &["mgmt"]), (9, &["mgmt"])]);
        let views =
            [(view(1, vec![net("mgmt", vec![lost(8, 100)])]), 0), (view(2, vec![net("mgmt", vec![lost(9, 100)])]), 0)];
        assert_eq!(verdict_of(8, &views, &hs).verdict, Verdict::Alive);
        assert_eq!(verdict_of(9, &views, &hs).verdict, Verdict::Alive);
        let both = [
            (view(1, vec![net("mgmt", vec![lost(8, 100), lost(9, 100)])]), 0),
            (view(2, vec![net("mgmt", vec![lost(9, 100)])]), 0),
        ];
        assert_eq!(verdict_of(8, &both, &hs).verdict, Verdict::Alive);
        assert_eq!(verdict_of(9, &both, &hs).verdict, Verdict::Lost);
    }

    #[test]
    fn a_coordinator_is_judged_by_the_others_only() {
        let hs = hosts(&[(1, &["mgmt"])]);
        let views = [(view(1, vec![net("mgmt", vec![])]), 0), (view(2, vec![net("mgmt", vec![lost(1, 100)])]), 0)];
        assert_eq!(verdict_of(1, &views, &hs).verdict, Verdict::Lost);
    }

    #[test]
    fn mnfa_status_reads_fresh_views_only() {
        let a = view(1, vec![NetSummary { mnfa: true, ..net("storage", vec![]) }, net("mgmt", vec![])]);
        let inputs = [ViewInput { summary: &a, age_ms: 10 }];
        let m = mnfa_networks(&inputs, &Params::default());
        assert_eq!(m.get("storage"), Some(&true));
        assert_eq!(m.get("mgmt"), Some(&false));
        let stale = [ViewInput { summary: &a, age_ms: 50_000 }];
        assert!(mnfa_networks(&stale, &Params::default()).is_empty());
    }
}

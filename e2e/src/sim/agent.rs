//! The twosite agent on each node: renews its heartbeat Lease, reads the other room's
//! heartbeats and the pairing, probes its partner, claims the room's right at the witness,
//! and stops, reboots, arms and feeds the watchdog as the core (`AgentCore`) says.

use super::api::{Key, LeaseObj, Obj, Precondition, Stored};
use super::cluster::{Cluster, REBOOT_MS, ms};
use super::scenario::Site;
use node_health::agent::CLAIM_EVERY;
use node_health::peer_auth::{Nonce, sign_answer};
use node_health::{AgentCore, ClaimOutcome, MonoTime, PeerReport};
use std::time::Duration;

impl Cluster {
    /// One partner probe of node `i`'s agent, as the shipped agent does it: a fresh nonce, the
    /// answers of whoever answers on the partner's address (a forger first, then the partner if
    /// reachable), each handed to the core, which verifies it. Probes answer instantly.
    fn probe_partner(&mut self, i: usize, local: MonoTime) {
        self.probes_sent += 1;
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&self.probes_sent.to_le_bytes());
        let Some(question) = self.nodes[i]
            .agent
            .as_mut()
            .and_then(|a| a.ask_partner(local, Nonce(nonce)))
        else {
            return;
        };
        let Some(partner) = self.nodes[i]
            .agent
            .as_ref()
            .and_then(|a| a.partner().map(str::to_string))
        else {
            return;
        };
        let mut answers = Vec::new();
        if self.nodes[i].forged && !self.nodes[i].isolated {
            // The forger says what keeps this node running, in the partner's name; it echoes
            // the nonce (it read the question) but cannot sign with the cluster's key.
            let other = if self.nodes[i].room == Site::RoomA {
                Site::RoomB
            } else {
                Site::RoomA
            };
            let vouch = PeerReport {
                node: partner.clone(),
                room: other.name().to_string(),
                partner: Some(self.nodes[i].name.clone()),
                api_reachable: false,
                has_right: true,
            };
            answers.push((
                true,
                sign_answer(Some(&self.forger_keys), &question, &vouch),
            ));
        }
        if let Some(p) = self.node_idx(&partner) {
            let pn = &self.nodes[p];
            if pn.powered && self.nodes_connected(i, p) {
                let at = pn.clock.read(self.now);
                if let Some(agent) = pn.agent.as_ref() {
                    answers.push((false, agent.answer(at, self.peer_keys.as_ref(), &question)));
                }
            }
        }
        for (forged, body) in answers {
            let keys = self.peer_keys.clone();
            let Some(agent) = self.nodes[i].agent.as_mut() else {
                return;
            };
            let taken = agent.partner_answered(keys.as_ref(), &body);
            if forged {
                let figure = if taken.is_ok() {
                    "forged_answers_taken"
                } else {
                    "forged_answers_refused"
                };
                *self.record.counters.entry(figure).or_default() += 1;
            }
        }
    }

    pub(super) fn step_agent(&mut self, i: usize) {
        if self.nodes[i].agent.is_none() {
            return;
        }
        let reach = self.node_reaches(i, Site::Api);
        let local = self.nodes[i].clock.read(self.now);
        let name = self.nodes[i].name.clone();
        let timing = self.cfg.timing;

        if local >= self.nodes[i].next_agent {
            self.nodes[i].next_agent = local + timing.agent_renew;
            let boot = self.nodes[i].boot_id;
            let failures = self.nodes[i]
                .agent
                .as_ref()
                .map_or(0, AgentCore::failures_before_next_renewal);
            let watchdog = if self.nodes[i]
                .agent
                .as_ref()
                .is_some_and(AgentCore::is_watchdog_failed)
            {
                "failed"
            } else {
                "enabled"
            };
            // Read-modify-write with the resourceVersion: the controller's fence marker is kept,
            // and a marker written between the read and the write makes the renewal fail.
            let (pre, marker) = match self.api.get(&Key::AgentLease(name.clone())) {
                Some(Stored {
                    rv,
                    obj: Obj::Lease(l),
                }) => (Precondition::ResourceVersion(*rv), l.fence_marker.clone()),
                _ => (Precondition::Create, None),
            };
            let seq = self.next_seq();
            let ok = reach
                && self
                    .write(
                        Key::AgentLease(name.clone()),
                        pre,
                        Obj::Lease(LeaseObj {
                            holder: Some(name.clone()),
                            transitions: 0,
                            duration_ms: ms(timing.agent_lease),
                            failures_before: failures,
                            boot_id: boot,
                            fence_marker: marker.clone(),
                            watchdog: Some(watchdog),
                            renew_seq: seq,
                        }),
                    )
                    .is_ok();
            let partner = if ok {
                self.partner_in_status(&name)
            } else {
                None
            };
            // While it reaches the API server, the agent reads the other room's heartbeats: one
            // that changed since its last read shows the other room alive.
            // The renewal mark is the Lease's renewTime (`renew_seq` here), never its
            // resourceVersion: the controller's fence-marker write changes only the latter.
            let mut other_alive = false;
            if ok {
                let mine = self.nodes[i].room;
                let listed: Vec<(String, String)> = self
                    .nodes
                    .iter()
                    .filter(|n| n.room != mine)
                    .filter_map(|n| match self.api.get(&Key::AgentLease(n.name.clone())) {
                        Some(Stored {
                            rv,
                            obj: Obj::Lease(l),
                        }) => Some((
                            n.name.clone(),
                            if self.cfg.contact_by_resource_version {
                                rv.to_string()
                            } else {
                                l.renew_seq.to_string()
                            },
                        )),
                        _ => None,
                    })
                    .collect();
                other_alive = self.nodes[i].other_marks.observe(listed);
                let since = self.nodes[i].other_listed_at.replace(self.now);
                if other_alive && let Some(since) = since {
                    self.check_contact_sound(i, since);
                }
            }
            if let Some(agent) = self.nodes[i].agent.as_mut() {
                if ok {
                    agent.renewal_succeeded(local);
                    agent.observe_fence_marker(marker.is_some());
                    if other_alive {
                        agent.observe_other_room(local);
                    }
                    // The agent reads the pairing while it can; it keeps the last one otherwise.
                    agent.set_partner(partner);
                } else {
                    agent.renewal_failed();
                }
            }
        }

        if local >= self.nodes[i].next_probe {
            self.nodes[i].next_probe = local + timing.probe_interval;
            self.probe_partner(i, local);
        }
        // Rooms out of contact: claim (or renew) the room's right at the witness, or join the
        // room's grant, as the core says and as often as the shipped agent does.
        if local >= self.nodes[i].next_claim {
            self.nodes[i].next_claim = local + CLAIM_EVERY;
            let claim = self.nodes[i]
                .agent
                .as_ref()
                .and_then(|a| a.witness_claim(local));
            if let Some(claim) = claim
                && let Some(ClaimOutcome::Granted {
                    epoch,
                    valid_for_ms,
                }) = self.request_at_witness(
                    self.node_reaches(i, Site::Witness),
                    &claim,
                    &format!("agent/{name}"),
                )
                && let Some(agent) = self.nodes[i].agent.as_mut()
            {
                agent.witness_granted(local, epoch, Duration::from_millis(valid_for_ms));
            }
        }

        let Some(step) = self.nodes[i].agent.as_mut().map(|a| a.tick(local)) else {
            return;
        };
        // The guards' deadlines, as the shipped agent's loop applies them on every tick.
        let withheld = self.deadline_withholds_feed(i, local);
        if self.deadline_overdue(i, local) {
            return;
        }
        if step.armed {
            self.nodes[i].workloads_running = true;
        }
        // As the real agent's shell: stop, reboot, arm, feed.
        if step.stop_workloads {
            self.record.right_lost.push((self.now, name.clone()));
            if self.cfg.stop_command_fails {
                self.log(
                    &format!("agent/{name}"),
                    "lost the right to run: the stop command failed, HA workloads still running, \
                     watchdog no longer fed"
                        .into(),
                );
            } else {
                self.nodes[i].workloads_running = false;
                self.log(
                    &format!("agent/{name}"),
                    format!(
                        "lost the right to run ({:?}): HA workloads stopped, watchdog no longer fed",
                        step.lost
                    ),
                );
            }
            self.check_no_storm(i);
        }
        if step.reboot {
            if self.cfg.ignore_reboot_step {
                self.log(
                    &format!("agent/{name}"),
                    "told to reboot the node (watchdog broken), ignores it".into(),
                );
            } else {
                // `b` to /proc/sysrq-trigger: an immediate reset, like the watchdog's.
                self.record
                    .agent_rebooted
                    .entry(name.clone())
                    .or_default()
                    .push(self.now);
                self.log(
                    &format!("node/{name}"),
                    "agent rebooted the node (watchdog broken)".into(),
                );
                self.power_off(i);
                self.nodes[i].reboot_at = Some(self.now + REBOOT_MS);
                self.nodes[i].reset_by = "its agent rebooted it";
                return;
            }
        }
        if step.armed || step.feed {
            if self.nodes[i].watchdog_broken {
                // Arming or feeding fails: the shell tells the core, which reports it on every
                // renewal and reboots the node itself should it lose the right to run.
                if let Some(agent) = self.nodes[i].agent.as_mut() {
                    let first = !agent.is_watchdog_failed();
                    agent.watchdog_failed();
                    if first {
                        self.log(
                            &format!("agent/{name}"),
                            format!(
                                "could not {} the watchdog: reported as failed",
                                if step.armed { "arm" } else { "feed" }
                            ),
                        );
                    }
                }
            } else if step.feed && !withheld {
                self.nodes[i].last_feed = Some(self.now);
            }
        }
    }

    /// `node`'s partner in the controller's last status (what agents and the webhook read).
    pub(super) fn partner_in_status(&self, node: &str) -> Option<String> {
        match self.api.get(&Key::Status) {
            Some(Stored {
                obj: Obj::Status(s),
                ..
            }) => s.pairs.iter().find_map(|p| {
                if p.a == node {
                    Some(p.b.clone())
                } else if p.b == node {
                    Some(p.a.clone())
                } else {
                    None
                }
            }),
            _ => None,
        }
    }

    /// The guards' deadlines ([`node_health::volume::node_deadline`]): the agent feeds its
    /// watchdog only while no armed deadline says withhold, so the node resets by the deadline
    /// plus the fence delay unless the guard disarms first.
    fn deadline_withholds_feed(&mut self, i: usize, local: MonoTime) -> bool {
        let check = self.nodes[i]
            .deadlines
            .check(local, self.cfg.timing.watchdog);
        let withhold = check.withhold_feed && !self.cfg.agent_ignores_deadlines;
        if withhold && !self.nodes[i].feeds_withheld {
            let name = self.nodes[i].name.clone();
            self.log(
                &format!("agent/{name}"),
                "a guard's fence deadline is near and not disarmed: watchdog feeds held back"
                    .into(),
            );
        }
        self.nodes[i].feeds_withheld = withhold;
        withhold
    }

    /// A guard's deadline passed without a disarm: its app may still write. As the shipped
    /// agent: stop the HA workloads and reboot the node at once.
    /// Returns whether the node was reset.
    fn deadline_overdue(&mut self, i: usize, local: MonoTime) -> bool {
        let check = self.nodes[i]
            .deadlines
            .check(local, self.cfg.timing.watchdog);
        if self.cfg.agent_ignores_deadlines {
            return false;
        }
        // The shipped agent's rule (the core's): stop the workloads and reboot, once.
        let mut decided = node_health::AgentStep::default();
        if !self.nodes[i].deadline_enforcer.apply(&check, &mut decided) {
            return false;
        }
        let name = self.nodes[i].name.clone();
        if decided.stop_workloads && !self.cfg.stop_command_fails {
            self.nodes[i].workloads_running = false;
        }
        let reboot = decided.reboot && !self.cfg.ignore_reboot_step;
        self.log(
            &format!("agent/{name}"),
            format!(
                "fence deadline of {} passed: HA workloads stopped{}",
                check.overdue.join(", "),
                if reboot {
                    "; rebooting the node directly"
                } else {
                    ""
                }
            ),
        );
        if reboot {
            self.record
                .volumes
                .fenced_by_deadline
                .push((self.now, name));
            self.reset_node(i, "its agent rebooted it (a guard's deadline)");
        }
        reboot
    }
}

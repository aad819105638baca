//! The partner probes' bookkeeping: which questions are outstanding, and what an answer must be
//! to count. An answer that fails verification, answers a nonce this agent never sent or has
//! had answered already, is for another asker, or comes from anyone but the partner in the
//! other room is no answer: no vouch, and no evidence of contact with the other room.

use super::AgentCore;
use crate::agent::PeerReport;
use crate::peer_auth::{self, Nonce, PeerKeys, PeerRefusal, Question};
use crate::time::MonoTime;
use std::collections::VecDeque;

/// Questions kept outstanding: a probe is answered (or timed out) well within the probe
/// interval, so a few cover a slow answer without keeping stale nonces alive.
const OUTSTANDING: usize = 4;
/// Answered nonces remembered, to name a replay as one.
const ANSWERED: usize = 16;

/// Outstanding and recently answered nonces.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProbeBook {
    outstanding: VecDeque<(Nonce, MonoTime)>,
    answered: VecDeque<Nonce>,
}

impl AgentCore {
    /// A new probe of the partner at `now` with a fresh random `nonce` (the shell's): the
    /// question to send, or `None` while there is no partner.
    pub fn ask_partner(&mut self, now: MonoTime, nonce: Nonce) -> Option<Question> {
        self.partner.as_ref()?;
        let book = &mut self.probes;
        if book.outstanding.len() == OUTSTANDING {
            book.outstanding.pop_front();
        }
        book.outstanding.push_back((nonce, now));
        Some(Question {
            from: self.node.clone(),
            nonce,
        })
    }

    /// The partner's answer `body` to one of this agent's questions. Verified under `keys`
    /// (`None`: the explicit insecure mode) and checked against the question, it counts as the
    /// partner's report at the time the question was sent: a vouch if it vouches, contact with
    /// the other room if the partner may run.
    pub fn partner_answered(
        &mut self,
        keys: Option<&PeerKeys>,
        body: &[u8],
    ) -> Result<PeerReport, PeerRefusal> {
        let answer = peer_auth::verify_answer(keys, body)?;
        if answer.to != self.node {
            return Err(PeerRefusal::WrongAsker);
        }
        let book = &mut self.probes;
        let Some(i) = book
            .outstanding
            .iter()
            .position(|(n, _)| *n == answer.nonce)
        else {
            return Err(if book.answered.contains(&answer.nonce) {
                PeerRefusal::Replay
            } else {
                PeerRefusal::UnknownNonce
            });
        };
        // One answer per question, whatever it says.
        let (nonce, sent_at) = book
            .outstanding
            .remove(i)
            .unwrap_or((answer.nonce, MonoTime(0)));
        if book.answered.len() == ANSWERED {
            book.answered.pop_front();
        }
        book.answered.push_back(nonce);
        let report = answer.report;
        if self.partner.as_deref() != Some(report.node.as_str()) {
            return Err(PeerRefusal::WrongNode);
        }
        if report.room == self.room {
            return Err(PeerRefusal::WrongRoom);
        }
        self.peer_answered(sent_at, &report);
        // A partner of the other room that may run is evidence that the rooms are in contact
        // (counted from when the probe was sent, never from the answer).
        if report.has_right {
            self.observe_other_room(sent_at);
        }
        Ok(report)
    }

    /// This agent's answer at `now` to `question`, signed with `keys` (unsigned without).
    pub fn answer(&self, now: MonoTime, keys: Option<&PeerKeys>, question: &Question) -> Vec<u8> {
        peer_auth::sign_answer(keys, question, &self.report(now))
    }
}

#[cfg(test)]
mod tests {
    use crate::peer_auth::{Nonce, PeerKey, PeerKeys, PeerRefusal, sign_answer};
    use crate::{AgentCore, HealthTiming, MonoTime, PeerReport, RunBasis};

    fn keys() -> PeerKeys {
        PeerKeys::new(PeerKey::new(&[1; 32]).expect("key"), None)
    }

    fn a1() -> AgentCore {
        let mut a = AgentCore::new("a-1", "room-a", HealthTiming::default());
        a.set_partner(Some("b-1".into()));
        a.renewal_succeeded(MonoTime(1_000));
        a.tick(MonoTime(1_000));
        assert!(a.is_armed());
        a
    }

    /// b-1, cut off from the API server too: it vouches.
    fn b1_vouching() -> AgentCore {
        let mut b = AgentCore::new("b-1", "room-b", HealthTiming::default());
        b.set_partner(Some("a-1".into()));
        b.renewal_succeeded(MonoTime(1_000));
        b.tick(MonoTime(1_000));
        b
    }

    fn vouch() -> PeerReport {
        PeerReport {
            node: "b-1".into(),
            room: "room-b".into(),
            partner: Some("a-1".into()),
            api_reachable: false,
            has_right: true,
        }
    }

    #[test]
    fn a_genuine_vouch_keeps_the_node_running_and_a_forged_one_does_not() {
        let keys = keys();
        let at = MonoTime(8_000);
        // Past its lease (8 s shrunk) a-1 runs only on a vouch.
        let late = MonoTime(9_000);

        let mut a = a1();
        let b = b1_vouching();
        let q = a.ask_partner(at, Nonce([1; 16])).expect("partner");
        let body = b.answer(at, Some(&keys), &q);
        assert_eq!(
            a.partner_answered(Some(&keys), &body).map(|r| r.node),
            Ok("b-1".into())
        );
        assert_eq!(
            a.right_to_run(late),
            Some(RunBasis::Vouched { by: "b-1".into() })
        );

        let mut a = a1();
        let q = a.ask_partner(at, Nonce([1; 16])).expect("partner");
        let forger = PeerKeys::new(PeerKey::new(&[9; 32]).expect("key"), None);
        let forged = sign_answer(Some(&forger), &q, &vouch());
        assert_eq!(
            a.partner_answered(Some(&keys), &forged),
            Err(PeerRefusal::UnknownKey)
        );
        assert_eq!(a.right_to_run(late), None);
        // The same forgery passes in the insecure mode: what the keys are for.
        assert!(a.partner_answered(None, &forged).is_ok());
        assert!(a.right_to_run(late).is_some());
    }

    #[test]
    fn a_replay_an_unasked_nonce_and_a_misdirected_answer_are_refused() {
        let keys = keys();
        let b = b1_vouching();
        let mut a = a1();
        let q = a
            .ask_partner(MonoTime(8_000), Nonce([1; 16]))
            .expect("partner");
        let body = b.answer(MonoTime(8_000), Some(&keys), &q);
        assert!(a.partner_answered(Some(&keys), &body).is_ok());
        assert_eq!(
            a.partner_answered(Some(&keys), &body),
            Err(PeerRefusal::Replay)
        );

        let never_asked = crate::peer_auth::Question {
            from: "a-1".into(),
            nonce: Nonce([2; 16]),
        };
        let body = b.answer(MonoTime(8_000), Some(&keys), &never_asked);
        assert_eq!(
            a.partner_answered(Some(&keys), &body),
            Err(PeerRefusal::UnknownNonce)
        );

        // An answer to a-2's question, relayed to a-1.
        let q = a
            .ask_partner(MonoTime(8_000), Nonce([3; 16]))
            .expect("partner");
        let to_a2 = crate::peer_auth::Question {
            from: "a-2".into(),
            nonce: q.nonce,
        };
        let body = b.answer(MonoTime(8_000), Some(&keys), &to_a2);
        assert_eq!(
            a.partner_answered(Some(&keys), &body),
            Err(PeerRefusal::WrongAsker)
        );
    }

    #[test]
    fn only_the_partner_in_the_other_room_counts_and_a_refusal_is_no_contact() {
        let keys = keys();
        let mut a = a1();
        a.set_witness_configured(true);
        for (node, room, refusal) in [
            ("b-2", "room-b", PeerRefusal::WrongNode),
            ("b-1", "room-a", PeerRefusal::WrongRoom),
        ] {
            let q = a
                .ask_partner(MonoTime(8_000), Nonce([4; 16]))
                .expect("partner");
            let mut report = vouch();
            report.node = node.into();
            report.room = room.into();
            let body = sign_answer(Some(&keys), &q, &report);
            assert_eq!(a.partner_answered(Some(&keys), &body), Err(refusal));
        }
        // No contact was taken from either: past the contact timeout the rooms are apart.
        assert!(!a.rooms_in_contact(MonoTime(20_000)));
    }
}

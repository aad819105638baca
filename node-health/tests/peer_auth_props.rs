//! Property tests of the peer answer's decoding and verification: whatever arrives on the peer
//! port, the agent core takes exactly the genuine answer to its own outstanding question from
//! its partner in the other room, and never panics.

use node_health::peer_auth::{
    MAX_ANSWER_BYTES, Nonce, PeerKey, PeerKeys, PeerRefusal, Question, sign_answer, verify_answer,
};
use node_health::{AgentCore, HealthTiming, MonoTime, PeerReport};
use proptest::prelude::*;

fn keys() -> PeerKeys {
    PeerKeys::new(PeerKey::new(&[0x5a; 32]).expect("key"), None)
}

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,20}"
}

fn report() -> impl Strategy<Value = PeerReport> {
    (
        name(),
        name(),
        proptest::option::of(name()),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(node, room, partner, api_reachable, has_right)| PeerReport {
                node,
                room,
                partner,
                api_reachable,
                has_right,
            },
        )
}

/// a-1 in room-a, partner b-1, one question outstanding with `nonce`.
fn asker(nonce: [u8; 16]) -> (AgentCore, Question) {
    let mut a = AgentCore::new("a-1", "room-a", HealthTiming::default());
    a.set_partner(Some("b-1".into()));
    a.renewal_succeeded(MonoTime(0));
    a.tick(MonoTime(0));
    let q = a
        .ask_partner(MonoTime(1_000), Nonce(nonce))
        .expect("partner");
    (a, q)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_signed_answer_round_trips(report in report(), nonce in any::<[u8; 16]>(), from in name()) {
        let q = Question { from, nonce: Nonce(nonce) };
        let body = sign_answer(Some(&keys()), &q, &report);
        prop_assert!(body.len() <= MAX_ANSWER_BYTES);
        let answer = verify_answer(Some(&keys()), &body).expect("genuine");
        prop_assert_eq!(answer.report, report);
        prop_assert_eq!(answer.to, q.from);
        prop_assert_eq!(answer.nonce, q.nonce);
    }

    /// Any change of one byte is refused, or (a change the JSON reader ignores, such as
    /// whitespace between the envelope's fields) verifies to the very same answer.
    #[test]
    fn an_altered_byte_never_yields_another_answer(
        report in report(), at in any::<prop::sample::Index>(), byte in any::<u8>()
    ) {
        let q = Question { from: "a-1".into(), nonce: Nonce([3; 16]) };
        let body = sign_answer(Some(&keys()), &q, &report);
        let original = verify_answer(Some(&keys()), &body).expect("genuine");
        let mut altered = body.clone();
        let i = at.index(altered.len());
        prop_assume!(altered[i] != byte);
        altered[i] = byte;
        if let Ok(answer) = verify_answer(Some(&keys()), &altered) {
            prop_assert_eq!(answer, original);
        }
    }

    #[test]
    fn a_truncated_answer_is_refused(report in report(), at in any::<prop::sample::Index>()) {
        let q = Question { from: "a-1".into(), nonce: Nonce([3; 16]) };
        let body = sign_answer(Some(&keys()), &q, &report);
        let cut = at.index(body.len());
        prop_assert!(verify_answer(Some(&keys()), &body[..cut]).is_err());
    }

    #[test]
    fn garbage_is_refused_without_a_panic(body in proptest::collection::vec(any::<u8>(), 0..6000)) {
        let refused = verify_answer(Some(&keys()), &body);
        prop_assert!(refused.is_err());
        if body.len() > MAX_ANSWER_BYTES {
            prop_assert_eq!(refused, Err(PeerRefusal::TooLarge));
        }
    }

    /// The core takes an answer only if it is signed, for this asker, to its outstanding nonce,
    /// from the partner, in the other room; it says which rule refused anything else.
    #[test]
    fn the_core_takes_only_the_partners_answer_to_its_own_question(
        nonce in any::<[u8; 16]>(),
        other_nonce in any::<[u8; 16]>(),
        to_other in any::<bool>(),
        node in prop_oneof![Just("b-1".to_string()), name()],
        room in prop_oneof![Just("room-b".to_string()), Just("room-a".to_string()), name()],
        report in report(),
    ) {
        let (mut a, q) = asker(nonce);
        let answered_nonce = if to_other { other_nonce } else { nonce };
        let question = Question { from: q.from.clone(), nonce: Nonce(answered_nonce) };
        let mut r = report;
        r.node = node.clone();
        r.room = room.clone();
        let body = sign_answer(Some(&keys()), &question, &r);
        let expected = if answered_nonce != nonce {
            Err(PeerRefusal::UnknownNonce)
        } else if node != "b-1" {
            Err(PeerRefusal::WrongNode)
        } else if room == "room-a" {
            Err(PeerRefusal::WrongRoom)
        } else {
            Ok(r.clone())
        };
        prop_assert_eq!(a.partner_answered(Some(&keys()), &body), expected);
        // Whatever happened, the same body again is never taken.
        prop_assert!(a.partner_answered(Some(&keys()), &body).is_err());
    }

    /// The envelope's fields in another order carry the same answer; the payload's fields in
    /// another order are other bytes under the proof, refused.
    #[test]
    fn reordered_fields(report in report()) {
        let q = Question { from: "a-1".into(), nonce: Nonce([9; 16]) };
        let body = sign_answer(Some(&keys()), &q, &report);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        let swapped = format!(r#"{{"proofs":{},"payload":{}}}"#, v["proofs"], v["payload"]);
        prop_assert_eq!(
            verify_answer(Some(&keys()), swapped.as_bytes()).map(|a| a.report),
            Ok(report.clone())
        );
        let payload: serde_json::Value =
            serde_json::from_str(v["payload"].as_str().expect("string")).expect("payload");
        let reordered_payload = format!(
            r#"{{"report":{},"nonce":{},"to":{},"version":1}}"#,
            payload["report"], payload["nonce"], payload["to"]
        );
        let reordered = serde_json::json!({"payload": reordered_payload, "proofs": v["proofs"]});
        prop_assert_eq!(
            verify_answer(Some(&keys()), reordered.to_string().as_bytes()),
            Err(PeerRefusal::BadProof)
        );
    }
}

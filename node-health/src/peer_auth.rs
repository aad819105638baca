//! Authenticated peer answers: only an agent of this cluster can vouch, and only for the
//! question it was asked.
//!
//! The asker sends its name and a fresh random nonce ([`Question`]). The answer is a signed
//! payload (the asker's name, the nonce and the [`PeerReport`]) with one HMAC-SHA256 proof per
//! key the answering agent holds ([`sign_answer`]). The keys come from a Secret shared by the
//! cluster's agents: `current` signs and verifies, `previous` only lets answers of agents that
//! have not seen a rotation yet through, and since every agent signs with both, a rotation
//! (`previous` := old `current`, `current` := new key) needs no step where some pair of agents
//! holds no key in common. HMAC and its constant-time verification are ring's.
//!
//! [`verify_answer`] checks the envelope only: which nonces are outstanding, who the partner
//! is and which room it must be in are the agent core's ([`crate::AgentCore::partner_answered`]).

use crate::agent::PeerReport;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The largest answer an agent reads (a genuine one is a few hundred bytes).
pub const MAX_ANSWER_BYTES: usize = 4096;
/// The shortest key accepted (256 bits).
pub const MIN_KEY_BYTES: usize = 32;
/// Proofs an answer may carry: one per key held (current and previous).
const MAX_PROOFS: usize = 2;
/// The payload version this agent signs and accepts.
const VERSION: u32 = 1;
/// Domain separation: a MAC over a peer answer is never valid for anything else.
const ANSWER_CONTEXT: &[u8] = b"twosite.dev/peer-answer/v1\n";
const KEY_ID_CONTEXT: &[u8] = b"twosite.dev/peer-key-id/v1";

/// The probe's nonce: 16 random bytes, fresh for every probe.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nonce(pub [u8; 16]);

impl Nonce {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    pub fn decode(text: &str) -> Option<Nonce> {
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        bytes.try_into().ok().map(Nonce)
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce({})", self.encode())
    }
}

/// What a probe asks: who asks, with which nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub from: String,
    pub nonce: Nonce,
}

/// A question that cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuestionError {
    #[error("the probe names no asker (from=<node>)")]
    NoAsker,
    #[error("the probe carries no valid nonce (nonce=<16 bytes, base64url>)")]
    NoNonce,
}

impl Question {
    /// The query string of the probe, `from=<node>&nonce=<nonce>` (node names are DNS labels
    /// and the nonce is base64url: nothing needs escaping).
    pub fn to_query(&self) -> String {
        format!("from={}&nonce={}", self.from, self.nonce.encode())
    }

    /// Reads a probe's query string.
    pub fn from_query(query: &str) -> Result<Question, QuestionError> {
        let (mut from, mut nonce) = (None, None);
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("from", v)) if is_node_name(v) => from = Some(v.to_string()),
                Some(("nonce", v)) => nonce = Nonce::decode(v),
                _ => {}
            }
        }
        Ok(Question {
            from: from.ok_or(QuestionError::NoAsker)?,
            nonce: nonce.ok_or(QuestionError::NoNonce)?,
        })
    }
}

/// A Kubernetes node name (a DNS subdomain).
fn is_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// One key: ring's HMAC key and a short public id (itself a MAC, so it says nothing of the
/// key). Never printed.
#[derive(Clone)]
pub struct PeerKey {
    id: String,
    key: hmac::Key,
}

impl PeerKey {
    pub fn new(secret: &[u8]) -> Result<PeerKey, KeyError> {
        if secret.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort { len: secret.len() });
        }
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let tag = hmac::sign(&key, KEY_ID_CONTEXT);
        let id = URL_SAFE_NO_PAD.encode(&tag.as_ref()[..6]);
        Ok(PeerKey { id, key })
    }

    /// The key's public id (8 characters), safe to log.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerKey({})", self.id)
    }
}

/// A key that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the peer key has {len} bytes; at least {MIN_KEY_BYTES} are required")]
    TooShort { len: usize },
}

/// The keys an agent holds: `current`, and during a rotation `previous`.
#[derive(Debug, Clone)]
pub struct PeerKeys {
    current: PeerKey,
    previous: Option<PeerKey>,
}

impl PeerKeys {
    pub fn new(current: PeerKey, previous: Option<PeerKey>) -> PeerKeys {
        // The same key twice is one key.
        let previous = previous.filter(|p| p.id != current.id);
        PeerKeys { current, previous }
    }

    pub fn current(&self) -> &PeerKey {
        &self.current
    }

    pub fn previous(&self) -> Option<&PeerKey> {
        self.previous.as_ref()
    }

    fn all(&self) -> impl Iterator<Item = &PeerKey> {
        std::iter::once(&self.current).chain(self.previous.as_ref())
    }

    /// The public ids, for logs: `current` or `current,previous`.
    pub fn ids(&self) -> String {
        self.all().map(PeerKey::id).collect::<Vec<_>>().join(",")
    }
}

/// Why an answer was not taken (it counts as no answer and no contact).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum PeerRefusal {
    #[error("the answer is larger than {MAX_ANSWER_BYTES} bytes")]
    TooLarge,
    #[error("the answer is not a peer answer")]
    Malformed,
    #[error("the answer carries no proof under a key this agent holds")]
    UnknownKey,
    #[error("the answer's proof does not verify")]
    BadProof,
    #[error("the answer is unsigned and this agent requires signed answers")]
    Unsigned,
    #[error("the answer is for another asker")]
    WrongAsker,
    #[error("the answer's nonce was never sent")]
    UnknownNonce,
    #[error("the answer's nonce was answered already (a replay)")]
    Replay,
    #[error("the answer comes from another node than the partner")]
    WrongNode,
    #[error("the answering node is not in the other room")]
    WrongRoom,
}

impl PeerRefusal {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            PeerRefusal::TooLarge => "too_large",
            PeerRefusal::Malformed => "malformed",
            PeerRefusal::UnknownKey => "unknown_key",
            PeerRefusal::BadProof => "bad_proof",
            PeerRefusal::Unsigned => "unsigned",
            PeerRefusal::WrongAsker => "wrong_asker",
            PeerRefusal::UnknownNonce => "unknown_nonce",
            PeerRefusal::Replay => "replay",
            PeerRefusal::WrongNode => "wrong_node",
            PeerRefusal::WrongRoom => "wrong_room",
        }
    }

    pub const ALL: [PeerRefusal; 10] = [
        PeerRefusal::TooLarge,
        PeerRefusal::Malformed,
        PeerRefusal::UnknownKey,
        PeerRefusal::BadProof,
        PeerRefusal::Unsigned,
        PeerRefusal::WrongAsker,
        PeerRefusal::UnknownNonce,
        PeerRefusal::Replay,
        PeerRefusal::WrongNode,
        PeerRefusal::WrongRoom,
    ];
}

/// What the proofs cover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    version: u32,
    to: String,
    nonce: String,
    report: PeerReport,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Proof {
    key: String,
    mac: String,
}

/// The answer on the wire: the payload as the exact bytes the proofs cover.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    payload: String,
    proofs: Vec<Proof>,
}

/// A verified answer: to whom, to which nonce, and the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedAnswer {
    pub to: String,
    pub nonce: Nonce,
    pub report: PeerReport,
}

fn mac_input(payload: &str) -> Vec<u8> {
    [ANSWER_CONTEXT, payload.as_bytes()].concat()
}

/// The answer body to `question`, signed with every key held; unsigned without keys (the
/// agent's explicit insecure mode).
pub fn sign_answer(keys: Option<&PeerKeys>, question: &Question, report: &PeerReport) -> Vec<u8> {
    let payload = Payload {
        version: VERSION,
        to: question.from.clone(),
        nonce: question.nonce.encode(),
        report: report.clone(),
    };
    // Serialising plain strings and booleans cannot fail.
    let payload = serde_json::to_string(&payload).unwrap_or_default();
    let input = mac_input(&payload);
    let proofs = keys
        .into_iter()
        .flat_map(PeerKeys::all)
        .map(|k| Proof {
            key: k.id.clone(),
            mac: URL_SAFE_NO_PAD.encode(hmac::sign(&k.key, &input).as_ref()),
        })
        .collect();
    serde_json::to_vec(&Envelope { payload, proofs }).unwrap_or_default()
}

/// Checks an answer's size, shape and proof. `keys: None` is the insecure mode: proofs are not
/// checked (the forged-vouch hole the keys close; tests and the simulation's unsafe variant).
pub fn verify_answer(keys: Option<&PeerKeys>, body: &[u8]) -> Result<SignedAnswer, PeerRefusal> {
    if body.len() > MAX_ANSWER_BYTES {
        return Err(PeerRefusal::TooLarge);
    }
    let envelope: Envelope = serde_json::from_slice(body).map_err(|_| PeerRefusal::Malformed)?;
    if envelope.proofs.len() > MAX_PROOFS {
        return Err(PeerRefusal::Malformed);
    }
    if let Some(keys) = keys {
        if envelope.proofs.is_empty() {
            return Err(PeerRefusal::Unsigned);
        }
        let input = mac_input(&envelope.payload);
        let mut known = false;
        let mut verified = false;
        for proof in &envelope.proofs {
            let Some(key) = keys.all().find(|k| k.id == proof.key) else {
                continue;
            };
            known = true;
            let Ok(mac) = URL_SAFE_NO_PAD.decode(&proof.mac) else {
                continue;
            };
            if hmac::verify(&key.key, &input, &mac).is_ok() {
                verified = true;
                break;
            }
        }
        match (known, verified) {
            (_, true) => {}
            (false, false) => return Err(PeerRefusal::UnknownKey),
            (true, false) => return Err(PeerRefusal::BadProof),
        }
    }
    let payload: Payload =
        serde_json::from_str(&envelope.payload).map_err(|_| PeerRefusal::Malformed)?;
    if payload.version != VERSION {
        return Err(PeerRefusal::Malformed);
    }
    let nonce = Nonce::decode(&payload.nonce).ok_or(PeerRefusal::Malformed)?;
    Ok(SignedAnswer {
        to: payload.to,
        nonce,
        report: payload.report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> PeerKey {
        PeerKey::new(&[byte; 32]).expect("32 bytes")
    }

    fn report() -> PeerReport {
        PeerReport {
            node: "b-1".into(),
            room: "room-b".into(),
            partner: Some("a-1".into()),
            api_reachable: false,
            has_right: true,
        }
    }

    fn question() -> Question {
        Question {
            from: "a-1".into(),
            nonce: Nonce([7; 16]),
        }
    }

    #[test]
    fn an_answer_verifies_under_the_key_it_was_signed_with() {
        let keys = PeerKeys::new(key(1), None);
        let body = sign_answer(Some(&keys), &question(), &report());
        let answer = verify_answer(Some(&keys), &body).expect("verifies");
        assert_eq!(answer.report, report());
        assert_eq!(answer.to, "a-1");
        assert_eq!(answer.nonce, Nonce([7; 16]));
    }

    #[test]
    fn a_rotation_has_no_gap_and_a_retired_key_is_refused() {
        let old = PeerKeys::new(key(1), None);
        let rotated = PeerKeys::new(key(2), Some(key(1)));
        let again = PeerKeys::new(key(3), Some(key(2)));
        for (signer, verifier) in [(&old, &rotated), (&rotated, &old), (&rotated, &again)] {
            let body = sign_answer(Some(signer), &question(), &report());
            assert!(verify_answer(Some(verifier), &body).is_ok());
        }
        let body = sign_answer(Some(&old), &question(), &report());
        assert_eq!(
            verify_answer(Some(&again), &body),
            Err(PeerRefusal::UnknownKey)
        );
    }

    #[test]
    fn a_forged_or_altered_answer_is_refused() {
        let keys = PeerKeys::new(key(1), None);
        let forged = sign_answer(Some(&PeerKeys::new(key(9), None)), &question(), &report());
        assert_eq!(
            verify_answer(Some(&keys), &forged),
            Err(PeerRefusal::UnknownKey)
        );
        let unsigned = sign_answer(None, &question(), &report());
        assert_eq!(
            verify_answer(Some(&keys), &unsigned),
            Err(PeerRefusal::Unsigned)
        );
        // The genuine proof over a payload changed to vouch: the MAC no longer matches.
        let mut honest = report();
        honest.api_reachable = true;
        let body = String::from_utf8(sign_answer(Some(&keys), &question(), &honest)).expect("utf8");
        let tampered = body.replace(r#"\"api_reachable\":true"#, r#"\"api_reachable\":false"#);
        assert_ne!(body, tampered);
        assert_eq!(
            verify_answer(Some(&keys), tampered.as_bytes()),
            Err(PeerRefusal::BadProof)
        );
        // Without keys (insecure mode) the forgery passes: the hole the keys close.
        assert!(verify_answer(None, &forged).is_ok());
    }

    #[test]
    fn keys_are_long_enough_and_never_printed() {
        assert_eq!(
            PeerKey::new(&[1; 31]).map(|_| ()),
            Err(KeyError::TooShort { len: 31 })
        );
        let k = key(0xab);
        assert_eq!(format!("{k:?}"), format!("PeerKey({})", k.id()));
        assert_eq!(k.id().len(), 8);
    }

    #[test]
    fn a_question_round_trips_through_its_query() {
        let q = question();
        assert_eq!(Question::from_query(&q.to_query()), Ok(q));
        assert_eq!(
            Question::from_query("nonce=AAAAAAAAAAAAAAAAAAAAAA"),
            Err(QuestionError::NoAsker)
        );
        assert_eq!(
            Question::from_query("from=a-1&nonce=short"),
            Err(QuestionError::NoNonce)
        );
        assert_eq!(
            Question::from_query("from=A%20B&nonce=AAAAAAAAAAAAAAAAAAAAAA"),
            Err(QuestionError::NoAsker)
        );
    }
}

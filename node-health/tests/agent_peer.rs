//! The peer port over real loopback HTTP: signed answers, a forger on the partner's address (a
//! loopback alias) without the key, a replayed genuine answer, and peers that answer garbage.
#![cfg(feature = "agent")]

use node_health::agentd::SharedCore;
use node_health::agentd::fake::{FakeClock, test_keys, test_probe_context};
use node_health::agentd::partner::PartnerCache;
use node_health::agentd::peer::{self, HttpProbe, PeerMetrics, PeerProbe, ProbeContext};
use node_health::agentd::peer_keys::KeyStore;
use node_health::peer_auth::{Nonce, PeerKey, PeerKeys, PeerRefusal, Question, sign_answer};
use node_health::{AgentCore, Clock, HealthTiming, MonoTime, PeerReport, RunBasis};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn core(node: &str, room: &str, partner: &str) -> SharedCore {
    let mut c = AgentCore::new(node, room, HealthTiming::default());
    c.set_partner(Some(partner.into()));
    SharedCore::new(c)
}

async fn serve_peer(core: SharedCore, clock: FakeClock, ip: [u8; 4]) -> SocketAddr {
    let listener = peer::bind((ip, 0).into()).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let keys = KeyStore::new(Some(test_keys()));
    tokio::spawn(peer::serve(
        listener,
        core,
        Arc::new(clock),
        keys,
        PeerMetrics::new(),
    ));
    addr
}

/// A server on `ip` that answers every connection with `raw` bytes and closes it.
async fn serve_raw(ip: [u8; 4], raw: Vec<u8>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((ip, 0)))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
            let _ = conn.write_all(&raw).await;
            let _ = conn.shutdown().await;
        }
    });
    addr
}

/// An HTTP 200 answer with `body`.
fn http_ok(body: &[u8]) -> Vec<u8> {
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    [head.as_bytes(), body].concat()
}

/// a-1, armed at t = 0 on a renewal, with its partner b-1 at `addr`.
fn a1_at(addr: SocketAddr) -> (SharedCore, PartnerCache) {
    let a = core("a-1", "room-a", "b-1");
    a.lock().renewal_succeeded(MonoTime(0));
    a.lock().tick(MonoTime(0));
    let partners = PartnerCache::new();
    partners.set(Some("b-1".into()), Some(addr));
    (a, partners)
}

/// b-1 cut off from the API server since t = 9 s: at t = 14.5 s it vouches.
fn b1_vouching(clock: &FakeClock) -> SharedCore {
    let b = core("b-1", "room-b", "a-1");
    b.lock().renewal_succeeded(MonoTime(9_000));
    b.lock().tick(MonoTime(9_000));
    clock.set(MonoTime(14_500));
    let r = b.lock().report(clock.now());
    assert!(!r.api_reachable && r.has_right, "{r:?}");
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

#[tokio::test]
async fn the_peer_port_answers_a_signed_report_and_a_genuine_vouch_counts() {
    let clock = FakeClock::new();
    clock.set(MonoTime(10_000));
    let b = core("b-1", "room-b", "a-1");
    b.lock().renewal_succeeded(MonoTime(9_000));
    b.lock().tick(MonoTime(9_000));
    let addr = serve_peer(b.clone(), clock.clone(), [127, 0, 0, 2]).await;

    let q = Question {
        from: "a-1".into(),
        nonce: Nonce([5; 16]),
    };
    let body = HttpProbe::new(Duration::from_secs(2))
        .probe(addr, &q)
        .await
        .expect("answered");
    let answer = node_health::peer_auth::verify_answer(Some(&test_keys()), &body)
        .expect("signed with the cluster key");
    assert_eq!(answer.report, b.lock().report(clock.now()));
    assert_eq!((answer.to.as_str(), answer.nonce), ("a-1", q.nonce));
    assert!(answer.report.api_reachable && answer.report.has_right);

    // b-1 reaches the API: it does not vouch, but it is contact.
    let (a, partners) = a1_at(addr);
    let ctx = test_probe_context();
    let got = peer::probe_partner(
        &HttpProbe::new(Duration::from_secs(2)),
        &partners,
        &a,
        &clock,
        &ctx,
    )
    .await;
    assert!(matches!(got, Some(Ok(_))), "{got:?}");

    // 5.5 s later b-1 has not renewed (no API server for it either) but still holds its
    // lease: its answer now vouches for a-1.
    let vouching = b1_vouching(&clock).lock().clone();
    *b.lock() = vouching;
    peer::probe_partner(
        &HttpProbe::new(Duration::from_secs(2)),
        &partners,
        &a,
        &clock,
        &ctx,
    )
    .await
    .expect("partner known")
    .expect("answered");
    assert_eq!(
        a.lock().right_to_run(MonoTime(14_600)),
        Some(RunBasis::Vouched { by: "b-1".into() }),
        "the vouch over real HTTP counts"
    );
}

#[tokio::test]
async fn a_forger_on_the_partners_address_without_the_key_does_not_vouch() {
    let clock = FakeClock::new();
    clock.set(MonoTime(7_000));
    let forger_keys = PeerKeys::new(PeerKey::new(&[0x42; 32]).expect("key"), None);
    let q = Question {
        from: "a-1".into(),
        nonce: Nonce([0; 16]),
    };
    // What a forger can send: the report of issue 11 with no proof, signed with a key of its
    // own, the pre-authentication format, and a genuine-looking envelope with a made-up MAC.
    let made_up = String::from_utf8(sign_answer(Some(&forger_keys), &q, &vouch()))
        .expect("utf8")
        .replace(forger_keys.current().id(), test_keys().current().id());
    let forgeries: [(Vec<u8>, PeerRefusal); 4] = [
        (sign_answer(None, &q, &vouch()), PeerRefusal::Unsigned),
        (
            sign_answer(Some(&forger_keys), &q, &vouch()),
            PeerRefusal::UnknownKey,
        ),
        (
            br#"{"node":"b-1","room":"room-b","partner":"a-1","api_reachable":false,"has_right":true}"#
                .to_vec(),
            PeerRefusal::Malformed,
        ),
        (made_up.into_bytes(), PeerRefusal::BadProof),
    ];
    for (body, expected) in forgeries {
        // The forger holds the partner's address: a loopback alias, not the asker's 127.0.0.1.
        let addr = serve_raw([127, 0, 0, 3], http_ok(&body)).await;
        let (a, partners) = a1_at(addr);
        let ctx = test_probe_context();
        for _ in 0..3 {
            let got = peer::probe_partner(
                &HttpProbe::new(Duration::from_millis(500)),
                &partners,
                &a,
                &clock,
                &ctx,
            )
            .await
            .expect("partner known");
            assert!(
                matches!(got, Err(node_health::agentd::Error::PeerRefused { refusal, .. }) if refusal == expected),
                "{got:?}"
            );
        }
        assert_eq!(ctx.metrics.refusals(expected), 3);
        // No vouch and no contact: the right runs out with the lease (8 s, shrunk by drift).
        assert_eq!(a.lock().right_to_run(MonoTime(7_990)), None);
        assert!(a.lock().tick(MonoTime(8_000)).lost.is_some());
    }

    // Even with verification off, a fixed answer cannot know the probe's random nonce.
    let addr = serve_raw([127, 0, 0, 3], http_ok(&sign_answer(None, &q, &vouch()))).await;
    let (a, partners) = a1_at(addr);
    let insecure = ProbeContext::new(KeyStore::new(None), PeerMetrics::new());
    let got = peer::probe_partner(
        &HttpProbe::new(Duration::from_millis(500)),
        &partners,
        &a,
        &clock,
        &insecure,
    )
    .await
    .expect("partner known");
    assert!(
        matches!(
            got,
            Err(node_health::agentd::Error::PeerRefused {
                refusal: PeerRefusal::UnknownNonce,
                ..
            })
        ),
        "{got:?}"
    );
}

/// A forger that reads the question and answers it: unsigned (no key) or signed with its own.
async fn serve_echoing_forger(ip: [u8; 4], keys: Option<PeerKeys>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((ip, 0)))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = vec![0u8; 4096];
            let n = conn.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]).to_string();
            let query = request
                .split_whitespace()
                .nth(1)
                .and_then(|path| path.split_once('?'))
                .map(|(_, q)| q.to_string())
                .unwrap_or_default();
            let Ok(q) = Question::from_query(&query) else {
                continue;
            };
            let body = sign_answer(keys.as_ref(), &q, &vouch());
            let _ = conn.write_all(&http_ok(&body)).await;
            let _ = conn.shutdown().await;
        }
    });
    addr
}

#[tokio::test]
async fn a_forger_that_echoes_the_nonce_vouches_only_when_verification_is_off() {
    let clock = FakeClock::new();
    clock.set(MonoTime(7_000));
    let addr = serve_echoing_forger([127, 0, 0, 4], None).await;

    let (a, partners) = a1_at(addr);
    let ctx = test_probe_context();
    let got = peer::probe_partner(
        &HttpProbe::new(Duration::from_millis(500)),
        &partners,
        &a,
        &clock,
        &ctx,
    )
    .await
    .expect("partner known");
    assert!(
        matches!(
            got,
            Err(node_health::agentd::Error::PeerRefused {
                refusal: PeerRefusal::Unsigned,
                ..
            })
        ),
        "{got:?}"
    );
    assert!(a.lock().tick(MonoTime(8_000)).lost.is_some());

    // Verification off: the forged vouch keeps a cut-off a-1 running past its lease.
    let (a, partners) = a1_at(addr);
    let insecure = ProbeContext::new(KeyStore::new(None), PeerMetrics::new());
    peer::probe_partner(
        &HttpProbe::new(Duration::from_millis(500)),
        &partners,
        &a,
        &clock,
        &insecure,
    )
    .await
    .expect("partner known")
    .expect("the forgery is taken");
    assert_eq!(
        a.lock().right_to_run(MonoTime(9_000)),
        Some(RunBasis::Vouched { by: "b-1".into() })
    );
}

#[tokio::test]
async fn a_replayed_genuine_answer_is_refused() {
    let clock = FakeClock::new();
    let b = b1_vouching(&clock);
    let genuine = serve_peer(b, clock.clone(), [127, 0, 0, 5]).await;

    // a-1 probes the real b-1 once and gets a genuine vouch (an eavesdropper records it).
    let (a, partners) = a1_at(genuine);
    let ctx = test_probe_context();
    let probe = HttpProbe::new(Duration::from_millis(500));
    let mut recorded = Vec::new();
    struct Recorder<'a>(&'a HttpProbe, std::sync::Mutex<&'a mut Vec<u8>>);
    impl PeerProbe for Recorder<'_> {
        async fn probe(
            &self,
            addr: SocketAddr,
            q: &Question,
        ) -> node_health::agentd::Result<Vec<u8>> {
            let body = self.0.probe(addr, q).await?;
            **self.1.lock().expect("lock") = body.clone();
            Ok(body)
        }
    }
    let recorder = Recorder(&probe, std::sync::Mutex::new(&mut recorded));
    peer::probe_partner(&recorder, &partners, &a, &clock, &ctx)
        .await
        .expect("partner known")
        .expect("genuine");
    assert!(!recorded.is_empty());

    // Later, b-1 is gone; the eavesdropper on its address plays the recording back.
    let replayer = serve_raw([127, 0, 0, 6], http_ok(&recorded)).await;
    partners.set(Some("b-1".into()), Some(replayer));
    for _ in 0..3 {
        let got = peer::probe_partner(&probe, &partners, &a, &clock, &ctx)
            .await
            .expect("partner known");
        assert!(
            matches!(
                got,
                Err(node_health::agentd::Error::PeerRefused {
                    refusal: PeerRefusal::Replay,
                    ..
                })
            ),
            "{got:?}"
        );
    }
    assert_eq!(ctx.metrics.refusals(PeerRefusal::Replay), 3);
    // The vouch of t = 14.5 s lasts its 3 s (shrunk); the replays extend nothing.
    assert!(a.lock().right_to_run(MonoTime(17_400)).is_some());
    assert_eq!(a.lock().right_to_run(MonoTime(17_500)), None);
}

#[tokio::test]
async fn garbage_and_oversized_answers_are_refused() {
    let clock = FakeClock::new();
    let probe = HttpProbe::new(Duration::from_millis(500));
    let answers: Vec<Vec<u8>> = vec![
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\nnot json!"
            .to_vec(),
        b"HTTP/1.1 200 OK\r\ncontent-length: 13\r\n\r\n{\"node\": 42}\n".to_vec(),
        b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n".to_vec(),
        b"\x00\x01garbage that is not HTTP at all\r\n\r\n".to_vec(),
        b"".to_vec(),
        http_ok(&vec![b' '; 100_000]),
    ];
    let (a, _) = a1_at(([127, 0, 0, 1], 1).into());
    let ctx = test_probe_context();
    for raw in answers {
        let addr = serve_raw([127, 0, 0, 7], raw.clone()).await;
        let partners = PartnerCache::new();
        partners.set(Some("b-1".into()), Some(addr));
        clock.set(MonoTime(7_000));
        let got = peer::probe_partner(&probe, &partners, &a, &clock, &ctx)
            .await
            .expect("partner known");
        assert!(
            got.is_err(),
            "{:?} accepted: {got:?}",
            String::from_utf8_lossy(&raw[..raw.len().min(80)])
        );
    }
    assert_eq!(ctx.metrics.refusals(PeerRefusal::TooLarge), 1);
    // Nothing vouched: the right runs out with the lease.
    assert!(a.lock().tick(MonoTime(8_000)).lost.is_some());
}

#[tokio::test]
async fn a_probe_without_a_nonce_gets_400_and_metrics_are_served() {
    let clock = FakeClock::new();
    let b = core("b-1", "room-b", "a-1");
    let addr = serve_peer(b, clock, [127, 0, 0, 8]).await;
    let get = |path: &'static str| async move {
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        conn.read_to_string(&mut out).await.expect("read");
        out
    };
    let answer = get("/v1/peer").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("no asker"), "{answer}");
    let metrics = get("/metrics").await;
    assert!(
        metrics.contains("twosite_agent_peer_refusals_total{reason=\"replay\"} 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_peer_that_never_answers_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Accept and hold connections without answering.
    let _held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            conns.push(conn);
        }
    });
    let started = std::time::Instant::now();
    let q = Question {
        from: "a-1".into(),
        nonce: Nonce([1; 16]),
    };
    let err = HttpProbe::new(Duration::from_millis(300))
        .probe(addr, &q)
        .await
        .expect_err("no answer");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(err.to_string().contains("no answer"), "{err}");
}

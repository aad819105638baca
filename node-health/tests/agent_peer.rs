//! The peer port over real loopback HTTP, and probes of peers that answer garbage.
#![cfg(feature = "agent")]

use node_health::agentd::SharedCore;
use node_health::agentd::fake::FakeClock;
use node_health::agentd::partner::PartnerCache;
use node_health::agentd::peer::{self, HttpProbe, PeerProbe};
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

async fn serve_peer(core: SharedCore, clock: FakeClock) -> SocketAddr {
    let listener = peer::bind(([127, 0, 0, 1], 0).into()).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(peer::serve(listener, core, Arc::new(clock)));
    addr
}

/// A server that answers every connection with `raw` bytes and closes it.
async fn serve_raw(raw: &'static [u8]) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
            let _ = conn.write_all(raw).await;
            let _ = conn.shutdown().await;
        }
    });
    addr
}

#[tokio::test]
async fn the_peer_port_answers_with_the_core_report() {
    let clock = FakeClock::new();
    clock.set(MonoTime(10_000));
    let b = core("b-1", "room-b", "a-1");
    b.lock().renewal_succeeded(MonoTime(9_000));
    b.lock().tick(MonoTime(9_000));
    let addr = serve_peer(b.clone(), clock.clone()).await;

    let answer = HttpProbe::new(Duration::from_secs(2))
        .probe(addr)
        .await
        .expect("answered");
    assert_eq!(answer, b.lock().report(clock.now()));
    assert_eq!(
        answer,
        PeerReport {
            node: "b-1".into(),
            room: "room-b".into(),
            partner: Some("a-1".into()),
            api_reachable: true,
            has_right: true,
        }
    );

    // A node whose partner (b-1) serves that port: b-1 reaches the API, so it does not vouch.
    let a = core("a-1", "room-a", "b-1");
    let partners = PartnerCache::new();
    partners.set(Some("b-1".into()), Some(addr));
    let probe = HttpProbe::new(Duration::from_secs(2));
    let got = peer::probe_partner(&probe, &partners, &a, &clock).await;
    assert!(matches!(got, Some(Ok(_))), "{got:?}");

    // 5.5 s later b-1 has not renewed (no API server for it either) but still holds its
    // lease: its answer now vouches for a-1.
    clock.set(MonoTime(14_500));
    let vouching = b.lock().report(clock.now());
    assert!(
        !vouching.api_reachable && vouching.has_right,
        "{vouching:?}"
    );
    a.lock().renewal_succeeded(MonoTime(0));
    a.lock().tick(MonoTime(0));
    peer::probe_partner(&probe, &partners, &a, &clock)
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
async fn garbage_answers_are_ignored() {
    let clock = FakeClock::new();
    let a = core("a-1", "room-a", "b-1");
    a.lock().renewal_succeeded(MonoTime(0));
    a.lock().tick(MonoTime(0));
    let probe = HttpProbe::new(Duration::from_millis(500));
    let answers: [&'static [u8]; 5] = [
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\nnot json!",
        b"HTTP/1.1 200 OK\r\ncontent-length: 13\r\n\r\n{\"node\": 42}\n",
        b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n",
        b"\x00\x01garbage that is not HTTP at all\r\n\r\n",
        b"",
    ];
    for raw in answers {
        let addr = serve_raw(raw).await;
        let partners = PartnerCache::new();
        partners.set(Some("b-1".into()), Some(addr));
        clock.set(MonoTime(7_000));
        let got = peer::probe_partner(&probe, &partners, &a, &clock)
            .await
            .expect("partner known");
        assert!(got.is_err(), "{raw:?} accepted: {got:?}");
    }
    // Nothing vouched: the right runs out with the lease.
    assert!(a.lock().tick(MonoTime(8_000)).lost.is_some());
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
    let err = HttpProbe::new(Duration::from_millis(300))
        .probe(addr)
        .await
        .expect_err("no answer");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(err.to_string().contains("no answer"), "{err}");
}

//! The admin port over real HTTP: readiness waits for the Node watch, liveness follows the
//! main loops, metrics are Prometheus text.

use controller::admin::{self, Health};
use controller::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .expect("answer in time")
        .expect("read");
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test]
async fn probes_and_metrics() {
    let health = Health::new();
    let metrics = Arc::new(Metrics::new());
    let listener = admin::bind(([127, 0, 0, 1], 0).into()).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(admin::serve(
        listener,
        Arc::clone(&health),
        Arc::clone(&metrics),
    ));

    let pairing = health.register("pairing", Some(Duration::from_secs(60)));
    let nodes = health.register("node watch", None);
    assert_eq!(get(addr, "/livez").await.0, 200);
    assert_eq!(
        get(addr, "/readyz").await.0,
        503,
        "not ready before the Node watch synced"
    );
    health.set_nodes_synced();
    assert_eq!(get(addr, "/readyz").await.0, 200);

    metrics.pairs.set(3);
    metrics.is_leader.set(1);
    metrics.reconcile_failed("timeout");
    let (code, text) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "twosite_pairs 3",
        "twosite_unpaired_nodes 0",
        "twosite_is_leader 1",
        "twosite_reconcile_errors_total{error=\"timeout\"} 1",
    ] {
        assert!(text.contains(line), "{line:?} in\n{text}");
    }

    pairing.beat();
    drop(nodes);
    let (code, body) = get(addr, "/livez").await;
    assert_eq!(code, 503, "a dead loop fails liveness");
    assert!(body.contains("node watch loop ended"), "{body}");
}

#[test]
fn a_silent_loop_fails_liveness() {
    let health = Health::new();
    let _guard = health.register("leader election", Some(Duration::ZERO));
    std::thread::sleep(Duration::from_millis(5));
    let why = health.liveness().expect_err("silent for too long");
    assert!(why.contains("leader election loop silent"), "{why}");
}

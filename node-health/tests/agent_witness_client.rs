//! The witness client against fake witnesses over loopback: outcomes, refusals, garbage,
//! silence, HTTPS with a private CA, and token files.
#![cfg(feature = "agent")]

use node_health::agentd::fake::{FakeWitness, WitnessAnswer};
use node_health::agentd::witness_client::{WitnessClient, WitnessError, read_token_file};
use node_health::{Claim, ClaimOutcome};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn claim() -> Claim {
    Claim {
        room: "room-a".into(),
        epoch: None,
        api_reachable: true,
    }
}

async fn answering(status: u16, body: &str) -> (FakeWitness, WitnessClient) {
    let w = FakeWitness::start(WitnessAnswer::Raw {
        status,
        body: body.into(),
    })
    .await
    .expect("fake witness");
    let client = WitnessClient::new(&w.url(), "prod", "tok", None).expect("client");
    (w, client)
}

/// A server that reads a request and answers `raw` (or nothing, holding the connection).
async fn serve_raw(raw: Option<&'static [u8]>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                match raw {
                    Some(raw) => {
                        let _ = conn.write_all(raw).await;
                        let _ = conn.shutdown().await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(30)).await,
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn granted_and_held_are_decoded_and_the_claim_is_sent_as_the_witness_expects() {
    let w = FakeWitness::start(WitnessAnswer::Grant {
        epoch: 3,
        valid_for_ms: 10_000,
    })
    .await
    .expect("fake witness");
    // A trailing slash on the base URL is fine.
    let client = WitnessClient::new(&format!("{}/", w.url()), "prod", "tok", None).expect("client");
    assert_eq!(
        client.claim(&claim()).await.expect("answered"),
        ClaimOutcome::Granted {
            epoch: 3,
            valid_for_ms: 10_000
        }
    );
    let received = w.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].cluster, "prod");
    assert_eq!(received[0].authorization.as_deref(), Some("Bearer tok"));
    assert_eq!(received[0].claim, Some(claim()));

    w.set_answer(WitnessAnswer::Held);
    assert!(matches!(
        client.claim(&claim()).await,
        Ok(ClaimOutcome::Held { holder: Some(h), .. }) if h == "room-b"
    ));
    client.healthz().await.expect("healthy");
}

#[tokio::test]
async fn refusals_are_distinct_errors_with_the_witness_s_message() {
    let (_w, c) = answering(401, r#"{"error":"missing or invalid bearer token"}"#).await;
    match c.claim(&claim()).await {
        Err(WitnessError::Unauthorized { cluster, message }) => {
            assert_eq!(cluster, "prod");
            assert_eq!(message, "missing or invalid bearer token");
        }
        other => panic!("{other:?}"),
    }
    let (_w, c) = answering(
        409,
        r#"{"error":"epoch 1 is stale: the current epoch is 2"}"#,
    )
    .await;
    match c.claim(&claim()).await {
        Err(err @ WitnessError::Conflict { .. }) => {
            assert!(err.is_refusal());
            assert!(err.to_string().contains("epoch 1 is stale"), "{err}");
        }
        other => panic!("{other:?}"),
    }
    let (_w, c) = answering(400, r#"{"error":"room name must be 1 to 63 characters"}"#).await;
    assert!(matches!(
        c.claim(&claim()).await,
        Err(WitnessError::BadRequest { message }) if message.contains("room name")
    ));
    let (_w, c) = answering(503, "<html>gateway</html>").await;
    match c.claim(&claim()).await {
        Err(err @ WitnessError::Status { .. }) => {
            assert!(!err.is_refusal());
            assert!(err.to_string().contains("503"), "{err}");
            assert!(err.to_string().contains("gateway"), "{err}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn garbage_answers_are_errors_not_panics() {
    for body in [
        "",
        "not json",
        r#"{"outcome":"granted"}"#,
        r#"{"outcome":"granted","epoch":-1,"valid_for_ms":10}"#,
        r#"{"outcome":"maybe","epoch":1}"#,
        r#"[1,2,3]"#,
    ] {
        let (_w, c) = answering(200, body).await;
        assert!(
            matches!(c.claim(&claim()).await, Err(WitnessError::Malformed { .. })),
            "{body:?}"
        );
    }
    // Not HTTP at all, and a connection closed mid-answer.
    for raw in [
        &b"SSH-2.0-OpenSSH_9.6\r\n"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"outcome\"",
    ] {
        let addr = serve_raw(Some(raw)).await;
        let c = WitnessClient::new(&format!("http://{addr}"), "prod", "tok", None).expect("c");
        assert!(
            matches!(
                c.claim(&claim()).await,
                Err(WitnessError::Unreachable { .. })
            ),
            "{raw:?}"
        );
    }
}

#[tokio::test]
async fn a_silent_witness_times_out_and_a_closed_port_is_unreachable() {
    let addr = serve_raw(None).await;
    let c = WitnessClient::new(&format!("http://{addr}"), "prod", "tok", None)
        .expect("client")
        .with_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    assert!(matches!(
        c.claim(&claim()).await,
        Err(WitnessError::Timeout { .. })
    ));
    assert!(started.elapsed() < Duration::from_secs(3));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let closed = listener.local_addr().expect("addr");
    drop(listener);
    let c = WitnessClient::new(&format!("http://{closed}"), "prod", "tok", None).expect("c");
    assert!(matches!(
        c.claim(&claim()).await,
        Err(WitnessError::Unreachable { .. })
    ));
    assert!(c.healthz().await.is_err());
}

/// An HTTPS witness with a certificate for `localhost` that answers every request `granted`.
async fn https_witness(cert: &rcgen::CertifiedKey<rcgen::KeyPair>) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        cert.signing_key.serialize_der(),
    ));
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let body = r#"{"outcome":"granted","epoch":9,"valid_for_ms":10000}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn https_with_a_private_ca_file() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let addr = https_witness(&cert).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, cert.cert.pem()).expect("write");
    let url = format!("https://localhost:{}", addr.port());

    let client = WitnessClient::new(&url, "prod", "tok", Some(&ca)).expect("client");
    assert_eq!(
        client.claim(&claim()).await.expect("granted over TLS"),
        ClaimOutcome::Granted {
            epoch: 9,
            valid_for_ms: 10_000
        }
    );

    // Another CA: the witness's certificate is not trusted.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let other_ca = dir.path().join("other.crt");
    std::fs::write(&other_ca, other.cert.pem()).expect("write");
    let client = WitnessClient::new(&url, "prod", "tok", Some(&other_ca)).expect("client");
    assert!(matches!(
        client.claim(&claim()).await,
        Err(WitnessError::Unreachable { .. })
    ));
    // The system's roots do not know the private CA either (or the system has none).
    match WitnessClient::new(&url, "prod", "tok", None) {
        Ok(client) => assert!(matches!(
            client.claim(&claim()).await,
            Err(WitnessError::Unreachable { .. })
        )),
        Err(err) => assert!(matches!(err, WitnessError::NativeRoots(_)), "{err}"),
    }
    // An https:// witness is never spoken to in clear text (nor a clear-text one over TLS).
    let plain = FakeWitness::start(WitnessAnswer::Held).await.expect("fake");
    let client = WitnessClient::new(
        &format!("https://127.0.0.1:{}", plain.addr().port()),
        "prod",
        "tok",
        Some(&ca),
    )
    .expect("client");
    assert!(client.claim(&claim()).await.is_err());
    assert!(plain.received().is_empty());

    // CA files that are not.
    let empty = dir.path().join("empty.crt");
    std::fs::write(&empty, "no certificates here\n").expect("write");
    assert!(matches!(
        WitnessClient::new(&url, "prod", "tok", Some(&empty)),
        Err(WitnessError::BadCa { .. })
    ));
    assert!(matches!(
        WitnessClient::new(&url, "prod", "tok", Some(&dir.path().join("missing.crt"))),
        Err(WitnessError::CaFile { .. })
    ));
}

#[test]
fn token_files_are_trimmed_and_must_hold_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token");
    std::fs::write(&path, "  abc-123\n").expect("write");
    assert_eq!(read_token_file(&path).expect("token"), "abc-123");
    for bad in ["", " \n\t", "two words\n"] {
        std::fs::write(&path, bad).expect("write");
        let err = read_token_file(&path).expect_err("refused");
        assert!(matches!(err, WitnessError::BadToken { .. }), "{bad:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
    assert!(matches!(
        read_token_file(dir.path().join("missing")),
        Err(WitnessError::TokenFile { .. })
    ));
}

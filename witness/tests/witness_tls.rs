//! The real witness process serving HTTPS with a certificate made at test time.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use rustls::pki_types::ServerName;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

fn client_config(cert: &rcgen::Certificate) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn https(addr: std::net::SocketAddr, config: &Arc<rustls::ClientConfig>, raw: &[u8]) -> Answer {
    let conn = rustls::ClientConnection::new(
        Arc::clone(config),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    exchange(rustls::StreamOwned::new(conn, tcp), raw)
}

#[test]
fn serves_claims_over_tls_and_nothing_in_clear_text() {
    let site = Site::new();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    write(&site.path("tls.crt"), &key.cert.pem());
    write(&site.path("tls.key"), &key.signing_key.serialize_pem());
    let cert_path = site.path("tls.crt").display().to_string();
    let key_path = site.path("tls.key").display().to_string();
    let w = site.start(
        &["--tls-cert", &cert_path, "--tls-key", &key_path],
        "tls.log",
    );
    let config = client_config(&key.cert);

    let health = https(
        w.addr,
        &config,
        &request_bytes("GET", "/healthz", None, b""),
    );
    assert_eq!(
        (health.status, health.body.as_str()),
        (200, "ok"),
        "{}",
        w.log()
    );
    let granted = https(
        w.addr,
        &config,
        &request_bytes(
            "POST",
            "/v1/clusters/factory/claim",
            Some(FACTORY_TOKEN),
            br#"{"room":"east","api_reachable":true}"#,
        ),
    );
    assert_eq!(granted.status, 200, "{granted:?}");
    assert_eq!(granted.json()["outcome"], "granted");
    assert_eq!(granted.json()["epoch"], 1);
    let wrong = https(
        w.addr,
        &config,
        &request_bytes(
            "POST",
            "/v1/clusters/factory/claim",
            Some("nope-nope-nope-nope"),
            b"{}",
        ),
    );
    assert_eq!(wrong.status, 401);

    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut plain = TcpStream::connect(w.addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = Vec::new();
    use std::io::{Read, Write};
    plain
        .write_all(&request_bytes("GET", "/healthz", None, b""))
        .unwrap();
    let _ = plain.read_to_end(&mut buf);
    assert!(!buf.starts_with(b"HTTP/1.1 200"), "{buf:?}");
}

#[test]
fn refuses_unusable_tls_material() {
    let site = Site::new();
    write(&site.path("tls.crt"), "not a certificate\n");
    write(&site.path("tls.key"), "not a key\n");
    let mut args = site.base_args();
    args.extend([
        "--listen".into(),
        free_addr().to_string(),
        "--tls-cert".into(),
        site.path("tls.crt").display().to_string(),
        "--tls-key".into(),
        site.path("tls.key").display().to_string(),
    ]);
    let (status, stderr) = site.run_to_exit(&args);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("holds no certificate"), "{stderr}");

    // A certificate without its key is refused too.
    let mut args = site.base_args();
    args.extend([
        "--tls-cert".into(),
        site.path("tls.crt").display().to_string(),
    ]);
    let (status, stderr) = site.run_to_exit(&args);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--tls-key"), "{stderr}");
}

//! Property tests of the request path: whatever arrives, the witness answers 200 or a 4xx with
//! a JSON error, and never panics; a 200 always carries a claim outcome.
#![allow(clippy::unwrap_used)]

use axum::body::Body;
use axum::http::{HeaderValue, Request, header};
use http_body_util::BodyExt;
use node_health::witness::{ClaimOutcome, WitnessConfig};
use node_health::{Clock, SystemClock};
use proptest::prelude::*;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;
use witness::grants::RoomGrants;
use witness::http::{MAX_BODY, Witness, decode_claim, router};
use witness::state::StateFile;
use witness::tokens::Tokens;

const TOKEN: &str = "factory-token-0123456789";

struct App {
    router: axum::Router,
    _dir: tempfile::TempDir,
}

fn app() -> App {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Tokens::parse(&format!("factory {TOKEN}\n")).unwrap();
    let store = StateFile::open(&dir.path().join("state.json")).unwrap();
    let clock: Arc<dyn Clock + Send + Sync> = Arc::new(SystemClock::new());
    let cfg = WitnessConfig::default();
    let grants = RoomGrants::load(store, &cfg, tokens.clusters(), clock.now()).unwrap();
    App {
        router: router(Witness::new(grants, tokens, clock)),
        _dir: dir,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Sends one request through the router; returns the status and body.
fn send(
    rt: &tokio::runtime::Runtime,
    app: &App,
    path: &str,
    auth: Option<HeaderValue>,
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    let mut req = Request::post(path);
    if let Some(a) = auth {
        req = req.header(header::AUTHORIZATION, a);
    }
    let req = req.body(Body::from(body)).unwrap();
    rt.block_on(async {
        let res = app.router.clone().oneshot(req).await.unwrap();
        let status = res.status().as_u16();
        let body = res.into_body().collect().await.unwrap().to_bytes().to_vec();
        (status, body)
    })
}

fn check_answer(status: u16, body: &[u8]) -> Result<(), TestCaseError> {
    if status == 200 {
        let outcome: Result<ClaimOutcome, _> = serde_json::from_slice(body);
        prop_assert!(outcome.is_ok(), "200 without an outcome: {:?}", body);
    } else {
        prop_assert!(
            matches!(status, 400 | 401 | 404 | 405 | 409 | 413),
            "status {status}: {}",
            String::from_utf8_lossy(body)
        );
        if !matches!(status, 404 | 405) {
            let err: serde_json::Value = serde_json::from_slice(body)
                .map_err(|e| TestCaseError::fail(format!("{e}: {body:?}")))?;
            prop_assert!(err["error"].as_str().is_some_and(|s| !s.is_empty()));
        }
    }
    Ok(())
}

fn claim_json() -> impl Strategy<Value = Vec<u8>> {
    let room = prop_oneof![
        Just("east".to_string()),
        Just("west".to_string()),
        Just("north".to_string()),
        "[a-z0-9.-]{0,70}",
        ".{0,10}",
    ];
    let epoch = prop_oneof![
        Just(None),
        (0u64..4).prop_map(Some),
        any::<u64>().prop_map(Some)
    ];
    let extra = prop_oneof![
        Just(String::new()),
        Just(r#","api_reachable":true"#.to_string()),
        Just(r#","api_reachable":"yes""#.to_string()),
        Just(r#","epok":1"#.to_string()),
        Just(r#","epoch":-1"#.to_string()),
    ];
    (room, epoch, extra).prop_map(|(room, epoch, extra)| {
        let room = serde_json::to_string(&room).unwrap();
        let epoch = epoch
            .map(|e| format!(r#","epoch":{e}"#))
            .unwrap_or_default();
        format!(r#"{{"room":{room}{epoch}{extra}}}"#).into_bytes()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(body in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Err(err) = decode_claim(&body) {
            prop_assert_eq!(err.status().as_u16(), 400);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bodies_get_200_or_a_4xx(
        body in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            claim_json(),
            proptest::collection::vec(any::<u8>(), MAX_BODY - 8..MAX_BODY + 64),
        ]
    ) {
        let rt = runtime();
        let app = app();
        let auth = HeaderValue::from_str(&format!("Bearer {TOKEN}")).unwrap();
        let (status, answer) = send(&rt, &app, "/v1/clusters/factory/claim", Some(auth), body.clone());
        check_answer(status, &answer)?;
        if body.len() > MAX_BODY {
            prop_assert_eq!(status, 413);
        }
    }

    #[test]
    fn arbitrary_paths_and_tokens_get_a_4xx(
        cluster in "[^/?#]{0,20}",
        auth in proptest::collection::vec(any::<u8>(), 0..60),
        body in claim_json(),
    ) {
        let rt = runtime();
        let app = app();
        let auth = HeaderValue::from_bytes(&auth).ok();
        let path = format!("/v1/clusters/{}/claim", urlencode(&cluster));
        let (status, answer) = send(&rt, &app, &path, auth, body);
        check_answer(status, &answer)?;
        prop_assert!(status == 401 || status == 400 || status == 404, "{}", status);
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Raw bytes on the socket, through hyper and the listener loop: an answer, if any, is never a
/// 5xx, and the server keeps serving.
#[test]
fn raw_garbage_on_the_socket_never_takes_the_server_down() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = app();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(witness::serve::serve(
        listener,
        app.router.clone(),
        None,
        async {
            let _ = stopped.await;
        },
    ));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    });
    let strategy = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..400),
        (claim_json(), proptest::collection::vec(any::<u8>(), 0..40)).prop_map(|(body, junk)| {
            let mut raw = format!(
                "POST /v1/clusters/factory/claim HTTP/1.1\r\nHost: w\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            raw.extend(body);
            raw.extend(junk);
            raw
        }),
    ];
    runner
        .run(&strategy, |raw| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let _ = s.write_all(&raw);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            if let Some(status) = String::from_utf8_lossy(&buf)
                .strip_prefix("HTTP/1.1 ")
                .and_then(|r| r.get(..3))
                .and_then(|c| c.parse::<u16>().ok())
            {
                prop_assert!(status < 500, "{}", String::from_utf8_lossy(&buf));
            }
            Ok(())
        })
        .unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    assert!(buf.starts_with("HTTP/1.1 200"), "{buf}");
    let _ = stop.send(());
    rt.block_on(server).unwrap().unwrap();
}

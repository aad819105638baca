//! Running the real `twosite-witness` binary and talking to it over plain TCP.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_twosite-witness");
pub const FACTORY_TOKEN: &str = "factory-token-0123456789";
pub const CAMPUS_TOKEN: &str = "campus-token-0123456789";

/// A temp directory with a tokens file for two clusters, `factory` and `campus`.
pub struct Site {
    pub dir: tempfile::TempDir,
}

impl Site {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokens"),
            format!("# cluster token\nfactory {FACTORY_TOKEN}\n\ncampus {CAMPUS_TOKEN}\n"),
        )
        .unwrap();
        Site { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn state(&self) -> PathBuf {
        self.path("state.json")
    }

    /// The state file as JSON.
    pub fn state_json(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.state()).unwrap()).unwrap()
    }

    /// The base flags: state file, tokens file.
    pub fn base_args(&self) -> Vec<String> {
        vec![
            "--state-file".into(),
            self.state().display().to_string(),
            "--tokens-file".into(),
            self.path("tokens").display().to_string(),
        ]
    }

    /// Starts the witness on a free loopback port with `extra` flags and waits until /healthz
    /// answers (plain HTTP unless `tls` is set, in which case the caller waits).
    pub fn start(&self, extra: &[&str], log: &str) -> Running {
        let addr = free_addr();
        let mut args = self.base_args();
        args.extend(["--listen".to_string(), addr.to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let log_path = self.path(log);
        let child = Command::new(BIN)
            .args(&args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap();
        let running = Running {
            child,
            addr,
            log: log_path,
            started: Instant::now(),
        };
        running.wait_listening();
        running
    }

    /// Runs the witness with `args`, expecting it to exit by itself within 10 s.
    pub fn run_to_exit(&self, args: &[String]) -> (ExitStatus, String) {
        let err_path = self.path("refused.log");
        let mut child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, std::fs::read_to_string(&err_path).unwrap());
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!(
                    "the witness did not refuse to start: {}",
                    std::fs::read_to_string(&err_path).unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A running witness process.
pub struct Running {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
    /// When the process was spawned: its clock started after this.
    pub started: Instant,
}

impl Running {
    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if TcpStream::connect(self.addr).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "witness did not listen on {}: {}",
            self.addr,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a power cut would.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP/1.1 answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The `error` of a JSON error answer.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message: {:?}", self.body))
            .to_string()
    }
}

/// Builds a request with `Connection: close`.
pub fn request_bytes(method: &str, path: &str, token: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: witness\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Sends `raw` on `stream` and reads the whole answer.
pub fn exchange(mut stream: impl Read + Write, raw: &[u8]) -> Answer {
    stream.write_all(raw).unwrap();
    stream.flush().unwrap();
    let mut buf = Vec::new();
    // The server may close before reading an oversized body: take what was answered.
    let _ = stream.read_to_end(&mut buf);
    parse_answer(&buf)
}

pub fn parse_answer(buf: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head:?}"));
    Answer {
        status,
        headers: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> Answer {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    exchange(stream, &request_bytes(method, path, token, body))
}

pub fn claim(addr: SocketAddr, cluster: &str, token: &str, body: &str) -> Answer {
    request(
        addr,
        "POST",
        &format!("/v1/clusters/{cluster}/claim"),
        Some(token),
        body.as_bytes(),
    )
}

pub fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

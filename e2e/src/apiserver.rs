//! A real kube-apiserver (1.20.2) with its own etcd, for the real-API-server test tier
//! (`e2e/tests/apiserver_*.rs`).
//!
//! [`ApiServer::start`] picks free loopback ports, starts Debian's etcd on a fresh data directory,
//! generates a CA, a serving certificate and a service-account signing key with `openssl`, writes
//! a static token file (an admin in `system:masters` and one token per [`Identity`]), starts
//! kube-apiserver with RBAC on, waits for `/readyz` and writes one kubeconfig per identity. Drop
//! kills both processes and removes the directory, on success and on panic alike.
//!
//! The binary is built by `e2e/apiserver/build-kube-apiserver.sh` into
//! `${TWOSITE_CACHE:-~/.cache/twosite}/kube-apiserver-1.20.2` (override the path with
//! `TWOSITE_KUBE_APISERVER`; etcd with `TWOSITE_ETCD`, default `/usr/bin/etcd`). When either is
//! missing, `start` returns [`Error::Missing`], which tests turn into a skip or, with
//! `TWOSITE_REQUIRE_APISERVER=1`, a failure (see [`require_or_skip`]).
//!
//! The module is plain files and processes: no Kubernetes client, so the e2e library stays light.
//! Its one dependency beyond std is rustls (already in the graph through kube), for the `/readyz`
//! probe over TLS. Set `TWOSITE_KEEP_APISERVER_DIR=1` to keep the directory (logs, certificates,
//! kubeconfigs) after the test.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use thiserror::Error;

/// The Kubernetes version the build script produces.
pub const KUBE_VERSION: &str = "1.20.2";
/// The environment variable that turns a missing binary from a skip into a failure.
pub const REQUIRE_ENV: &str = "TWOSITE_REQUIRE_APISERVER";
/// The script that builds the binary, relative to the workspace root.
pub const BUILD_SCRIPT: &str = "e2e/apiserver/build-kube-apiserver.sh";
/// How long `start` waits for etcd's `/health` and then kube-apiserver's `/readyz`, unless
/// `TWOSITE_APISERVER_READY_SECS` says otherwise. An idle 2-core machine is ready in about 5 s; one
/// busy compiling took 33 s.
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);

fn ready_timeout() -> Duration {
    std::env::var("TWOSITE_APISERVER_READY_SECS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .map_or(READY_TIMEOUT, Duration::from_secs)
}
/// The user name of the admin token (group `system:masters`).
pub const ADMIN_USER: &str = "twosite-test-admin";

/// The controller's ServiceAccount, as deploy/rbac-controller.yaml binds it.
pub const CONTROLLER_SA: (&str, &str) = ("twosite-system", "twosite-controller");
/// The node agent's ServiceAccount, as deploy/rbac-agent.yaml binds it.
pub const AGENT_SA: (&str, &str) = ("twosite-system", "twosite-agent");

#[derive(Debug, Error)]
pub enum Error {
    /// A binary the fixture needs is not there.
    #[error("{what} not found at {}: {hint}", path.display())]
    Missing {
        what: &'static str,
        path: PathBuf,
        hint: String,
    },
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    /// A helper command (openssl) failed.
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    /// etcd or kube-apiserver exited or did not become ready in time.
    #[error("{what} did not become ready: {why}\n--- last lines of {} ---\n{log_tail}", log.display())]
    NotReady {
        what: &'static str,
        why: String,
        log: PathBuf,
        log_tail: String,
    },
    #[error("TLS setup for the /readyz probe failed: {0}")]
    Tls(String),
    #[error("no free loopback port: {0}")]
    Port(std::io::Error),
}

impl Error {
    fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let action = action.into();
        move |source| Error::Io { action, source }
    }
}

/// A user the API server authenticates by a static bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user name, e.g. `system:serviceaccount:twosite-system:twosite-controller`.
    pub user: String,
    /// Extra groups (`system:authenticated` is always added by the server).
    pub groups: Vec<String>,
}

impl Identity {
    pub fn user(user: impl Into<String>, groups: &[&str]) -> Identity {
        Identity {
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    /// The user name and groups a ServiceAccount token authenticates as, so RoleBindings and
    /// ClusterRoleBindings with `kind: ServiceAccount` subjects apply to it.
    pub fn service_account(namespace: &str, name: &str) -> Identity {
        Identity {
            user: format!("system:serviceaccount:{namespace}:{name}"),
            groups: vec![
                "system:serviceaccounts".to_string(),
                format!("system:serviceaccounts:{namespace}"),
            ],
        }
    }

    /// A file-name-safe form of the user name.
    fn slug(&self) -> String {
        self.user
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct Options {
    /// Identities with their own token and kubeconfig, besides the admin.
    pub identities: Vec<Identity>,
    /// Extra kube-apiserver flags (`--flag=value`).
    pub extra_args: Vec<String>,
    pub ready_timeout: Duration,
}

impl Default for Options {
    /// The controller's and the agent's ServiceAccounts.
    fn default() -> Options {
        Options {
            identities: vec![
                Identity::service_account(CONTROLLER_SA.0, CONTROLLER_SA.1),
                Identity::service_account(AGENT_SA.0, AGENT_SA.1),
            ],
            extra_args: Vec::new(),
            ready_timeout: ready_timeout(),
        }
    }
}

/// A running etcd + kube-apiserver pair; stopped and cleaned up on drop.
pub struct ApiServer {
    dir: PathBuf,
    port: u16,
    etcd_port: u16,
    apiserver: Option<Child>,
    etcd: Option<Child>,
    admin_token: String,
    /// (identity, token, kubeconfig)
    identities: Vec<(Identity, String, PathBuf)>,
    admin_kubeconfig: PathBuf,
    keep_dir: bool,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("url", &self.url())
            .field("dir", &self.dir)
            .field("etcd_port", &self.etcd_port)
            .finish_non_exhaustive()
    }
}

/// The kube-apiserver binary: `TWOSITE_KUBE_APISERVER`, else the build script's cache.
pub fn apiserver_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TWOSITE_KUBE_APISERVER") {
        return PathBuf::from(p);
    }
    control_plane_binary("kube-apiserver")
}

/// `kube-apiserver`, `kube-scheduler` or `kube-controller-manager` as the build script caches
/// it (`TWOSITE_CACHE`, else `~/.cache/twosite`).
pub fn control_plane_binary(name: &str) -> PathBuf {
    let cache = std::env::var_os("TWOSITE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home =
                std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
            home.join(".cache").join("twosite")
        });
    cache.join(format!("{name}-{KUBE_VERSION}"))
}

/// The etcd binary: `TWOSITE_ETCD`, else Debian's `/usr/bin/etcd`.
pub fn etcd_binary() -> PathBuf {
    std::env::var_os("TWOSITE_ETCD").map_or_else(|| PathBuf::from("/usr/bin/etcd"), PathBuf::from)
}

/// Whether a missing binary must fail the test (`TWOSITE_REQUIRE_APISERVER=1`).
pub fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Start the API server for a test: `Some` when it runs, `None` (after printing a "skipped"
/// line) when a binary is missing and `TWOSITE_REQUIRE_APISERVER` is unset. Panics with the reason
/// on every other failure, and on a missing binary when the variable is set.
pub fn require_or_skip(test: &str, options: Options) -> Option<ApiServer> {
    match ApiServer::start_with(options) {
        Ok(server) => Some(server),
        Err(e @ Error::Missing { .. }) if !required() => {
            println!("{test}: skipped: {e} (set {REQUIRE_ENV}=1 to fail instead)");
            None
        }
        Err(e) => panic!("{test}: the real API server could not start: {e}"),
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; bind it soon).
pub fn free_port() -> Result<u16, Error> {
    let l = TcpListener::bind(("127.0.0.1", 0)).map_err(Error::Port)?;
    l.local_addr().map(|a| a.port()).map_err(Error::Port)
}

impl ApiServer {
    /// Start with the default identities (the controller's and the agent's ServiceAccounts).
    pub fn start() -> Result<ApiServer, Error> {
        ApiServer::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> Result<ApiServer, Error> {
        let apiserver_bin = apiserver_binary();
        if !is_executable(&apiserver_bin) {
            return Err(Error::Missing {
                what: "kube-apiserver",
                path: apiserver_bin,
                hint: format!("run {BUILD_SCRIPT} (builds it once; 10 to 25 minutes on 2 cores)"),
            });
        }
        let etcd_bin = etcd_binary();
        if !is_executable(&etcd_bin) {
            return Err(Error::Missing {
                what: "etcd",
                path: etcd_bin,
                hint: format!(
                    "install Debian's etcd-server (apt-get install etcd-server) or run {BUILD_SCRIPT}"
                ),
            });
        }
        let dir = unique_dir()?;
        let mut server = ApiServer {
            dir: dir.clone(),
            port: 0,
            etcd_port: 0,
            apiserver: None,
            etcd: None,
            admin_token: random_token(),
            identities: Vec::new(),
            admin_kubeconfig: dir.join("kubeconfig-admin.yaml"),
            keep_dir: std::env::var_os("TWOSITE_KEEP_APISERVER_DIR").is_some(),
        };
        // From here on, Drop cleans up whatever has started.
        server.start_etcd(&etcd_bin, options.ready_timeout)?;
        server.write_certificates()?;
        server.write_tokens(&options.identities)?;
        server.start_apiserver(&apiserver_bin, &options)?;
        server.write_kubeconfigs()?;
        Ok(server)
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory with the logs, certificates, tokens and kubeconfigs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The PEM file of the CA that signed the serving certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// A kubeconfig for the admin (group `system:masters`).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// A kubeconfig for `user`, one of the identities given at start.
    pub fn kubeconfig(&self, user: &str) -> Option<&Path> {
        self.identities
            .iter()
            .find(|(i, _, _)| i.user == user)
            .map(|(_, _, k)| k.as_path())
    }

    /// A kubeconfig for a ServiceAccount identity given at start.
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> Option<&Path> {
        self.kubeconfig(&Identity::service_account(namespace, name).user)
    }

    /// The bearer token of `user`, one of the identities given at start.
    pub fn token(&self, user: &str) -> Option<&str> {
        self.identities
            .iter()
            .find(|(i, _, _)| i.user == user)
            .map(|(_, t, _)| t.as_str())
    }

    /// kube-apiserver's log.
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("kube-apiserver.log")
    }

    /// The last `lines` lines of kube-apiserver's log, for a failing test's message.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_file(), lines)
    }

    /// GET `path` with the admin token; the status code and body.
    pub fn get(&self, path: &str) -> Result<(u16, String), Error> {
        let tls = tls_config(&self.ca_file())?;
        https_get(&tls, self.port, path, &self.admin_token)
    }

    fn start_etcd(&mut self, bin: &Path, timeout: Duration) -> Result<(), Error> {
        let client = free_port()?;
        let peer = free_port()?;
        self.etcd_port = client;
        let data = self.dir.join("etcd-data");
        let log_path = self.dir.join("etcd.log");
        let log = std::fs::File::create(&log_path).map_err(Error::io("create etcd.log"))?;
        let log2 = log.try_clone().map_err(Error::io("dup etcd.log"))?;
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new(bin)
            .arg("--name=twosite-test")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=twosite-test={peer_url}"))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(Error::io(format!("start {}", bin.display())))?;
        self.etcd = Some(child);
        let deadline = Instant::now() + timeout;
        loop {
            let why = match http_get_plain(client, "/health") {
                Ok((200, body)) if body.contains("true") => return Ok(()),
                Ok((code, body)) => format!("/health answered {code}: {body}"),
                Err(e) => e.to_string(),
            };
            if let Some(status) = self.etcd.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(not_ready(
                    "etcd",
                    format!("exited with {status}"),
                    &log_path,
                ));
            }
            if Instant::now() >= deadline {
                return Err(not_ready(
                    "etcd",
                    format!("not healthy within {timeout:?}: {why}"),
                    &log_path,
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn write_certificates(&self) -> Result<(), Error> {
        let d = &self.dir;
        std::fs::write(d.join("openssl.cnf"), OPENSSL_CNF)
            .map_err(Error::io("write openssl.cnf"))?;
        let cnf = d.join("openssl.cnf");
        let p = |name: &str| d.join(name).display().to_string();
        let cnf_s = cnf.display().to_string();
        openssl(&[
            "req",
            "-x509",
            "-config",
            &cnf_s,
            "-extensions",
            "v3_ca",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.crt"),
            "-days",
            "2",
            "-subj",
            "/CN=twosite-test-ca",
        ])?;
        openssl(&[
            "req",
            "-new",
            "-config",
            &cnf_s,
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &p("server.key"),
            "-out",
            &p("server.csr"),
            "-subj",
            "/CN=kube-apiserver",
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p("server.csr"),
            "-CA",
            &p("ca.crt"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &cnf_s,
            "-extensions",
            "v3_server",
            "-out",
            &p("server.crt"),
        ])?;
        // The service-account signing key (RS256, what 1.20 issues tokens with by default).
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &p("sa.key"),
        ])?;
        openssl(&["pkey", "-in", &p("sa.key"), "-pubout", "-out", &p("sa.pub")])?;
        Ok(())
    }

    fn write_tokens(&mut self, identities: &[Identity]) -> Result<(), Error> {
        let mut csv = String::new();
        let _ = writeln!(
            csv,
            "{},{ADMIN_USER},{ADMIN_USER},\"system:masters\"",
            self.admin_token
        );
        for (n, identity) in identities.iter().enumerate() {
            let token = random_token();
            let groups = identity.groups.join(",");
            let _ = writeln!(csv, "{token},{},uid-{n},\"{groups}\"", identity.user);
            let kubeconfig = self
                .dir
                .join(format!("kubeconfig-{}.yaml", identity.slug()));
            self.identities.push((identity.clone(), token, kubeconfig));
        }
        std::fs::write(self.dir.join("tokens.csv"), csv).map_err(Error::io("write tokens.csv"))
    }

    fn start_apiserver(&mut self, bin: &Path, options: &Options) -> Result<(), Error> {
        let d = self.dir.clone();
        let p = |name: &str| d.join(name).display().to_string();
        let port = free_port()?;
        self.port = port;
        let log_path = self.log_file();
        let log =
            std::fs::File::create(&log_path).map_err(Error::io("create kube-apiserver.log"))?;
        let log2 = log
            .try_clone()
            .map_err(Error::io("dup kube-apiserver.log"))?;
        let cert_dir = d.join("certs");
        std::fs::create_dir_all(&cert_dir).map_err(Error::io("create certs/"))?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!(
            "--etcd-servers=http://127.0.0.1:{}",
            self.etcd_port
        ))
        .arg(format!("--secure-port={port}"))
        .arg("--bind-address=127.0.0.1")
        .arg("--advertise-address=127.0.0.1")
        .arg("--insecure-port=0")
        .arg(format!("--cert-dir={}", cert_dir.display()))
        .arg(format!("--tls-cert-file={}", p("server.crt")))
        .arg(format!("--tls-private-key-file={}", p("server.key")))
        .arg(format!("--token-auth-file={}", p("tokens.csv")))
        .arg("--authorization-mode=RBAC")
        .arg("--anonymous-auth=false")
        .arg("--endpoint-reconciler-type=none")
        .arg("--disable-admission-plugins=ServiceAccount")
        .arg("--service-cluster-ip-range=10.96.0.0/24")
        .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
        .arg(format!("--service-account-key-file={}", p("sa.pub")))
        .arg(format!(
            "--service-account-signing-key-file={}",
            p("sa.key")
        ))
        .arg("--profiling=false")
        .arg("--v=1")
        .args(&options.extra_args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
        let child = cmd
            .spawn()
            .map_err(Error::io(format!("start {}", bin.display())))?;
        self.apiserver = Some(child);
        let tls = tls_config(&self.ca_file())?;
        let deadline = Instant::now() + options.ready_timeout;
        loop {
            let why = match https_get(&tls, port, "/readyz", &self.admin_token) {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => format!("/readyz answered {code}: {}", body.trim()),
                Err(e) => e.to_string(),
            };
            if let Some(status) = self
                .apiserver
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(not_ready(
                    "kube-apiserver",
                    format!("exited with {status}"),
                    &log_path,
                ));
            }
            if Instant::now() >= deadline {
                return Err(not_ready(
                    "kube-apiserver",
                    format!("/readyz not 200 within {:?}: {why}", options.ready_timeout),
                    &log_path,
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn write_kubeconfigs(&self) -> Result<(), Error> {
        let ca = self.ca_file();
        std::fs::write(
            &self.admin_kubeconfig,
            kubeconfig(&self.url(), &ca, ADMIN_USER, &self.admin_token),
        )
        .map_err(Error::io("write the admin kubeconfig"))?;
        for (identity, token, path) in &self.identities {
            std::fs::write(path, kubeconfig(&self.url(), &ca, &identity.user, token))
                .map_err(Error::io(format!("write {}", path.display())))?;
        }
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        for child in [self.apiserver.take(), self.etcd.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.keep_dir {
            eprintln!("kept the API server's directory {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = twosite-test
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

fn kubeconfig(url: &str, ca: &Path, user: &str, token: &str) -> String {
    // JSON is YAML; serde_json quotes every string correctly.
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "twosite-test", "cluster": {
            "server": url,
            "certificate-authority": ca.display().to_string(),
        }}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "twosite-test", "context": {"cluster": "twosite-test", "user": user}}],
        "current-context": "twosite-test",
    });
    format!("{config:#}\n")
}

fn openssl(args: &[&str]) -> Result<(), Error> {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Command {
            command: format!("openssl {}", args.join(" ")),
            stderr: format!("{e} (install Debian's openssl)"),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command: format!("openssl {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique_dir() -> Result<PathBuf, Error> {
    let base = std::env::temp_dir();
    for _ in 0..100 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!(
            "twosite-apiserver-{}-{n}-{}",
            std::process::id(),
            nanos() % 1_000_000
        ));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(format!("create {}", dir.display()))(e)),
        }
    }
    Err(Error::io("create a temporary directory")(
        std::io::Error::other("100 names taken"),
    ))
}

fn nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// 32 hex digits from the kernel's random source (tokens only need to be unguessable among
/// the test's own processes; /dev/urandom is always there on Linux).
fn random_token() -> String {
    let mut bytes = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if ok.is_err() {
        let seed = nanos()
            ^ (u64::from(std::process::id()) << 32)
            ^ COUNTER.fetch_add(1, Ordering::Relaxed);
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        bytes[8..].copy_from_slice(
            &seed
                .rotate_left(29)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .to_le_bytes(),
        );
    }
    bytes.iter().fold(String::with_capacity(32), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn not_ready(what: &'static str, why: String, log: &Path) -> Error {
    Error::NotReady {
        what,
        why,
        log: log.to_path_buf(),
        log_tail: tail(log, 30),
    }
}

fn parse_response(raw: &[u8]) -> Result<(u16, String), std::io::Error> {
    let text = String::from_utf8_lossy(raw);
    let code = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:.200}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((code, body))
}

fn request(path: &str, token: Option<&str>) -> String {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n")
}

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

fn http_get_plain(port: u16, path: &str) -> Result<(u16, String), std::io::Error> {
    let mut s = connect(port)?;
    s.write_all(request(path, None).as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn tls_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, Error> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| Error::Tls(e.to_string()))? {
        let cert = cert.map_err(|e| Error::Tls(e.to_string()))?;
        roots.add(cert).map_err(|e| Error::Tls(e.to_string()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

fn https_get(
    tls: &Arc<rustls::ClientConfig>,
    port: u16,
    path: &str,
    token: &str,
) -> Result<(u16, String), Error> {
    let io = |e: std::io::Error| Error::io(format!("GET https://127.0.0.1:{port}{path}"))(e);
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")
        .map_err(|e| Error::Tls(e.to_string()))?;
    let conn = rustls::ClientConnection::new(Arc::clone(tls), name)
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut stream = rustls::StreamOwned::new(conn, connect(port).map_err(io)?);
    stream
        .write_all(request(path, Some(token)).as_bytes())
        .map_err(io)?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // Go's TLS server may close without close_notify after `Connection: close`.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(io(e)),
    }
    parse_response(&raw).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_identity_matches_rbac_subjects() {
        let id = Identity::service_account("twosite-system", "twosite-controller");
        assert_eq!(
            id.user,
            "system:serviceaccount:twosite-system:twosite-controller"
        );
        assert!(
            id.groups
                .contains(&"system:serviceaccounts:twosite-system".to_string())
        );
        assert_eq!(
            id.slug(),
            "system_serviceaccount_twosite-system_twosite-controller"
        );
    }

    #[test]
    fn tokens_are_distinct_hex() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn response_parsing() {
        let (code, body) = parse_response(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nok").expect("parses");
        assert_eq!((code, body.as_str()), (200, "ok"));
        assert!(parse_response(b"garbage").is_err());
    }
}

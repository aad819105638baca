//! What the volume tests share: a loop device standing in for the shared RWX block volume, the
//! real `twosite guard` processes (each in its own mount namespace: a "node" of its own), the
//! writer app that records when it wrote, the test playing a node's watchdog, and the overlap
//! of two consumers' writes.

use super::{Process, binary};
use e2e::apiserver::ApiServer;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The two "nodes" of the volume tests, one per room.
pub fn two_nodes() -> Vec<super::TestNode> {
    vec![
        super::TestNode::new("a-1", "room-a", "127.0.0.2"),
        super::TestNode::new("b-1", "room-b", "127.0.0.3"),
    ]
}

/// The API server's options for the volume tests: the guard's ServiceAccount `ns/sa` as an
/// identity, and privileged pods allowed (the consumers mount), as on kubeadm and kind clusters.
pub fn guard_options(ns: &str, sa: &str) -> e2e::apiserver::Options {
    let mut options = e2e::apiserver::Options::default();
    options
        .identities
        .push(e2e::apiserver::Identity::service_account(ns, sa));
    options.extra_args.push("--allow-privileged=true".into());
    options
}

/// Creates the objects of `examples/<file>` whose kind is in `create` and server-side dry-runs
/// the others (`dry_run_rest`) or skips them: the example must be what the API server accepts.
pub async fn apply_example(admin: &kube::Client, file: &str, create: &[&str], dry_run_rest: bool) {
    let path = super::workspace_root().join("examples").join(file);
    for doc in super::yaml_documents(&path) {
        let kind = doc["kind"].as_str().unwrap_or_default();
        let creating = create.contains(&kind);
        if creating || dry_run_rest {
            super::create_doc(admin, &doc, !creating)
                .await
                .unwrap_or_else(|e| panic!("{file}: refused: {e}"));
        }
    }
}

/// Starts the real agents of `nodes` (test watchdogs) and waits until each feeds its watchdog,
/// so guards can arm deadlines with them.
pub async fn start_agents(server: &ApiServer, nodes: &[super::TestNode]) -> Vec<Process> {
    let peer_port = e2e::apiserver::free_port().expect("a free port");
    let agents: Vec<Process> = nodes
        .iter()
        .map(|n| super::agents::start_agent(server, n, &format!("boot-{}", n.name), peer_port, 1))
        .collect();
    let files: Vec<_> = nodes
        .iter()
        .map(|n| super::agents::agent_files(server, &n.name).watchdog)
        .collect();
    super::wait_for(
        "the agents feed their watchdogs",
        Duration::from_secs(30),
        || async {
            if files.iter().all(|f| super::agents::feeds(f) > 1) {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    )
    .await;
    agents
}

/// Fails (never skips) when the machine cannot run the volume tests.
pub fn require_root_and_tools() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the volume tests need root (loop devices, mkfs, mount, mount namespaces), as CI has"
    );
    for tool in [
        "losetup",
        "wipefs",
        "mkfs.xfs",
        "mkfs.ext4",
        "mount",
        "umount",
        "unshare",
        "python3",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is missing (apt-get install util-linux xfsprogs e2fsprogs python3)"
        );
    }
}

/// A loop device over a sparse file, detached on drop.
pub struct LoopDevice {
    pub dev: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    pub fn new(mib: u64) -> LoopDevice {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(mib * 1024 * 1024))
            .expect("the image file");
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&img)
            .output()
            .expect("losetup runs");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice {
            dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
            _dir: dir,
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// The writer app: every 100 ms it appends `<who> <n>` to `writes.log` on the mounted device
/// and fsyncs it, then records the boot-clock time of that write in `record` (outside the
/// device). Its PID goes to `record.pids`, so the test can kill it like a node reset would.
pub const WRITER: &str = r#"
import os, sys, time
who, record = sys.argv[1], sys.argv[2]
with open(record + ".pids", "a") as f:
    f.write(f"{os.getpid()}\n")
fd = os.open(os.path.join(os.environ["TWOSITE_MOUNT"], "writes.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
out = open(record, "a", buffering=1)
n = 0
while True:
    os.write(fd, f"{who} {n}\n".encode())
    os.fsync(fd)
    out.write(f"{time.clock_gettime(time.CLOCK_BOOTTIME):.6f}\n")
    n += 1
    time.sleep(0.1)
"#;

/// One consumer: its guard's identity, mount point, readiness port and records.
pub struct Consumer {
    pub who: String,
    pub identity: String,
    pub mount: PathBuf,
    pub health_port: u16,
    pub record: PathBuf,
    pub guard: Option<Process>,
}

impl Consumer {
    pub fn new(server: &ApiServer, who: &str, health_port: u16) -> Consumer {
        let mount = server.dir().join(format!("mnt-{who}"));
        std::fs::create_dir_all(&mount).expect("the mount point");
        Consumer {
            who: who.into(),
            identity: format!("uid-{who}"),
            mount,
            health_port,
            record: server.dir().join(format!("writes-{who}.txt")),
            guard: None,
        }
    }

    /// Starts its guard, in a mount namespace of its own, running the writer app.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        &mut self,
        server: &ApiServer,
        kubeconfig: &Path,
        namespace: &str,
        lease: &str,
        device: &Path,
        fs: &str,
        agent_socket: &Path,
    ) {
        let app = vec![
            "python3".into(),
            "-c".into(),
            WRITER.into(),
            self.who.clone(),
            self.record.display().to_string(),
        ];
        self.start_app(
            server,
            kubeconfig,
            &[namespace, lease, fs],
            device,
            agent_socket,
            &[],
            &app,
        );
    }

    /// Starts its guard (`target`: namespace, lease, filesystem) with `extra` guard flags,
    /// running `app`.
    #[allow(clippy::too_many_arguments)]
    pub fn start_app(
        &mut self,
        server: &ApiServer,
        kubeconfig: &Path,
        target: &[&str; 3],
        device: &Path,
        agent_socket: &Path,
        extra: &[String],
        app: &[String],
    ) {
        let [namespace, lease, fs] = *target;
        let mut args: Vec<String> = vec![
            "--mount".into(),
            "--propagation".into(),
            "private".into(),
            "--".into(),
            binary("twosite").display().to_string(),
            "guard".into(),
            format!("--lease={lease}"),
            format!("--namespace={namespace}"),
            format!("--device={}", device.display()),
            format!("--mount={}", self.mount.display()),
            format!("--fs={fs}"),
            format!("--identity={}", self.identity),
            format!("--agent-socket={}", agent_socket.display()),
            format!("--health-addr=127.0.0.1:{}", self.health_port),
        ];
        args.extend(extra.iter().cloned());
        args.push("--".into());
        args.extend(app.iter().cloned());
        self.guard = Some(Process::start(
            server,
            &format!("guard-{}", self.who),
            Path::new("unshare"),
            kubeconfig,
            &args,
        ));
    }

    pub fn pid(&self) -> Option<u32> {
        self.guard.as_ref().map(|g| g.child.id())
    }

    /// /readyz answers 200: the app runs as the active consumer.
    pub fn ready(&self) -> bool {
        super::http_get(self.health_port, "/readyz").is_some_and(|(code, _)| code == 200)
    }

    /// Whether anything is mounted on its mount point, in its guard's namespace.
    pub fn mounted(&self) -> bool {
        let Some(pid) = self.pid() else { return false };
        let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
        let point = self.mount.display().to_string();
        info.lines()
            .any(|l| l.split(' ').nth(4) == Some(point.as_str()))
    }

    /// `writes.log` on the device, as this consumer's namespace sees it while mounted.
    pub fn read_log(&self) -> String {
        let Some(pid) = self.pid() else {
            return String::new();
        };
        let path = format!("/proc/{pid}/root{}/writes.log", self.mount.display());
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Every write time its app recorded (boot clock, seconds).
    pub fn write_times(&self) -> Vec<f64> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// SIGKILL of every process of this consumer: the guard and each app it started (what a
    /// node reset does).
    pub fn kill_all(&mut self) {
        if let Some(g) = self.guard.as_mut() {
            g.kill();
        }
        let pids =
            std::fs::read_to_string(format!("{}.pids", self.record.display())).unwrap_or_default();
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) on a process (group) this test's guard started.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Splits write times into tenures (runs of writes at most 1 s apart).
pub fn tenures(times: &[f64]) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    for &t in times {
        match out.last_mut() {
            Some((_, end)) if t - *end <= 1.0 => *end = t,
            _ => out.push((t, t)),
        }
    }
    out
}

/// How long (ms) the two consumers' tenures overlapped: 0 when their writes never interleave.
pub fn overlap_ms(a: &[f64], b: &[f64]) -> f64 {
    let mut total = 0.0;
    for (sa, ea) in tenures(a) {
        for (sb, eb) in tenures(b) {
            let o = ea.min(eb) - sa.max(sb);
            if o >= 0.0 {
                // Touching tenures count too: one write of each inside the other's span.
                total += o.max(0.001);
            }
        }
    }
    total * 1000.0
}

/// The boot clock now (seconds), as the writer records it.
pub fn boot_now() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// The test as a node's kernel: returns once `feeds` (the agent's test watchdog file) has not
/// grown for `timeout` — the moment the real watchdog would reset the node — or at once when
/// the agent rebooted the node directly (a `REBOOT` line in the file).
pub async fn watchdog_fires(feeds: &Path, timeout: Duration, give_up: Duration) -> Option<Instant> {
    let start = Instant::now();
    let mut last = (super::agents::feeds(feeds), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = super::agents::feeds(feeds);
        if std::fs::read(feeds).is_ok_and(|b| b.windows(6).any(|w| w == b"REBOOT")) {
            return Some(Instant::now());
        }
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= timeout {
            return Some(Instant::now());
        }
        if start.elapsed() > give_up {
            return None;
        }
    }
}

//! The real-API-server tier, the database acceptance test: PostgreSQL (Debian's package) on one
//! loop device under two real `twosite guard` processes, each beside its "node"'s real
//! `twosite-agent`, with the Lease and RBAC of `examples/postgres-active-standby.yaml` (whose
//! other objects are server-side dry-run). A client inserts 10,000 rows, one transaction each,
//! with retry, always through whichever consumer is active (/readyz 200, as a Service would
//! route). Midway the active consumer is killed outright (SIGKILL of guard and postgres); its
//! agent, still holding the deadline, stops feeding the watchdog (the test plays it and resets
//! that node). The standby takes the Lease, mounts, and starts postgres on the same files.
//! Afterwards every acknowledged row is present exactly once. Prints the failover time and the
//! client's retries.
//!
//! Needs root, loop devices, mkfs.ext4, unshare and PostgreSQL: without them it fails saying so.

mod common;

use common::agents::agent_files;
use common::volume::{
    Consumer, LoopDevice, apply_example, guard_options, require_root_and_tools, start_agents,
    two_nodes, watchdog_fires,
};
use common::{AGENT_BIN, CONTROLLER_BIN, Setup, wait_for};
use e2e::apiserver;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const NS: &str = "pg-demo";
const LEASE: &str = "postgres-data";
const GUARD_SA: &str = "postgres-guard";
const ROWS: u32 = 10_000;
const KILL_AT: u32 = 5_000;

/// Debian's PostgreSQL binaries (`/usr/lib/postgresql/<version>/bin`).
fn pg_bin() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .find(|b| b.join("postgres").is_file() && b.join("initdb").is_file());
    found.expect("PostgreSQL is missing (apt-get install postgresql): /usr/lib/postgresql/*/bin")
}

/// The app: initdb on an empty filesystem, then postgres on `port`, as the postgres user.
fn postgres_app(bin: &Path, port: u16, pids: &Path) -> Vec<String> {
    let script = format!(
        r#"set -e
D="$TWOSITE_MOUNT/pg"
mkdir -p "$D"; chown postgres:postgres "$D"; chmod 700 "$D"
if [ ! -s "$D/PG_VERSION" ]; then runuser -u postgres -- {bin}/initdb -D "$D" -A trust >/dev/null; fi
rm -f "$D/postmaster.pid"
echo $$ >> {pids}
exec runuser -u postgres -- {bin}/postgres -D "$D" -p {port} -k /tmp -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on"#,
        bin = bin.display(),
        pids = pids.display(),
    );
    vec!["sh".into(), "-c".into(), script]
}

/// A psql session to `port`: one statement in, one line out.
struct Session {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Session {
    fn open(bin: &Path, port: u16) -> Option<Session> {
        let mut child = tokio::process::Command::new(bin.join("psql"))
            .args([
                "-X",
                "-At",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-p", &port.to_string(), "-v", "ON_ERROR_STOP=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .ok()?;
        let stdin = child.stdin.take()?;
        let lines = BufReader::new(child.stdout.take()?).lines();
        Some(Session {
            child,
            stdin,
            lines,
        })
    }

    /// The statement's first output line, `None` when the session broke.
    async fn run(&mut self, sql: &str) -> Option<String> {
        self.stdin
            .write_all(format!("{sql}\n").as_bytes())
            .await
            .ok()?;
        match tokio::time::timeout(Duration::from_secs(10), self.lines.next_line()).await {
            Ok(Ok(Some(line))) => Some(line),
            _ => None,
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_keeps_every_acknowledged_row_when_the_active_consumer_is_killed() {
    let test = "postgres_keeps_every_acknowledged_row_when_the_active_consumer_is_killed";
    let nodes = two_nodes();
    let options = guard_options(NS, GUARD_SA);
    let setup = Setup {
        binaries: &[CONTROLLER_BIN, AGENT_BIN],
        options,
        rbac: &["rbac-agent.yaml"],
        nodes: &nodes,
    };
    let Some((server, admin)) = common::start(test, setup).await else {
        return;
    };
    require_root_and_tools();
    let bin = pg_bin();
    apply_example(
        &admin,
        "postgres-active-standby.yaml",
        &[
            "Namespace",
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "Lease",
            "Secret",
        ],
        true,
    )
    .await;
    // postgres (its own user) must reach the mount points below the server's directory.
    std::fs::set_permissions(server.dir(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod the test dir");
    let guard_kubeconfig = server
        .service_account_kubeconfig(NS, GUARD_SA)
        .expect("the guard's kubeconfig")
        .to_path_buf();

    let agents = start_agents(&server, &nodes).await;
    let mut agents: Vec<Option<_>> = agents.into_iter().map(Some).collect();
    let files = [agent_files(&server, "a-1"), agent_files(&server, "b-1")];

    let disk = LoopDevice::new(256);
    let mut consumers = Vec::new();
    let mut ports = Vec::new();
    for (i, who) in ["a", "b"].into_iter().enumerate() {
        let mut c = Consumer::new(&server, who, apiserver::free_port().expect("port"));
        std::fs::set_permissions(&c.mount, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the mount point");
        let port = apiserver::free_port().expect("port");
        let pids = PathBuf::from(format!("{}.pids", c.record.display()));
        c.start_app(
            &server,
            &guard_kubeconfig,
            &[NS, LEASE, "ext4"],
            &disk.dev,
            &files[i].guard_socket,
            &["--stop-signal=INT".to_string()],
            &postgres_app(&bin, port, &pids),
        );
        if i == 0 {
            wait_for("a becomes active", Duration::from_secs(30), || async {
                if c.ready() {
                    Ok(())
                } else {
                    Err("not ready".to_string())
                }
            })
            .await;
        }
        consumers.push(c);
        ports.push(port);
    }

    // The client: one row per transaction, acknowledged by "INSERT 0 1" (or "INSERT 0 0": the
    // row of a lost acknowledgement was there already), retried through whichever consumer is
    // active.
    let mut session: Option<Session> = None;
    let (mut retries, mut row) = (0u32, 1u32);
    let mut killed: Option<(usize, Instant)> = None;
    let mut failover = None;
    let t0 = Instant::now();
    while row <= ROWS {
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "the client got stuck at row {row}"
        );
        if row == KILL_AT + 1 && killed.is_none() {
            let active = consumers
                .iter()
                .position(Consumer::ready)
                .expect("an active consumer");
            consumers[active].kill_all();
            killed = Some((active, Instant::now()));
            session = None;
            let feeds_file = files[active].watchdog.clone();
            let node = agents[active].take();
            tokio::spawn(async move {
                // The test as that node's watchdog: reset it once the agent stops feeding.
                let mut node = node;
                if watchdog_fires(&feeds_file, Duration::from_secs(5), Duration::from_secs(60))
                    .await
                    .is_some()
                    && let Some(agent) = node.as_mut()
                {
                    agent.kill();
                }
            });
        }
        if session.is_none() {
            let Some(active) = consumers.iter().position(Consumer::ready) else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            session = Session::open(&bin, ports[active]);
            let created = match session.as_mut() {
                Some(s) => s
                    .run("CREATE TABLE IF NOT EXISTS rows (id int PRIMARY KEY);")
                    .await
                    .is_some(),
                None => false,
            };
            if !created {
                session = None;
                retries += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let answer = match session.as_mut() {
            Some(s) => {
                s.run(&format!(
                    "INSERT INTO rows VALUES ({row}) ON CONFLICT (id) DO NOTHING;"
                ))
                .await
            }
            None => None,
        };
        match answer.as_deref() {
            Some("INSERT 0 1") | Some("INSERT 0 0") => {
                if let (Some((_, at)), None) = (killed, failover) {
                    failover = Some(at.elapsed());
                }
                row += 1;
            }
            _ => {
                session = None;
                retries += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let failover = failover.expect("rows were written after the kill");
    let (dead, _) = killed.expect("the active consumer was killed");
    let survivor = 1 - dead;
    assert!(
        consumers[survivor].ready(),
        "the other consumer is the active one"
    );

    let mut check = Session::open(&bin, ports[survivor]).expect("psql");
    let counts = check
        .run("SELECT count(*) || ' ' || count(DISTINCT id) || ' ' || min(id) || ' ' || max(id) FROM rows;")
        .await
        .expect("the count");
    println!(
        "acknowledged {ROWS}; present (count, distinct, min, max): {counts}; failover {} ms; \
         client retries {retries}; whole run {:.1} s",
        failover.as_millis(),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(
        counts,
        format!("{ROWS} {ROWS} 1 {ROWS}"),
        "every acknowledged row, once"
    );

    // The survivor steps down cleanly on SIGTERM (postgres' fast shutdown, unmount, release).
    drop(check);
    drop(session);
    let guard = consumers[survivor].guard.as_mut().expect("its guard");
    // SAFETY: signals our own child.
    unsafe { libc::kill(guard.child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::block_in_place(|| guard.child.wait()).expect("it exits");
    assert!(
        status.success(),
        "the survivor's guard exits 0 after stepping down: {status}"
    );
}

//! The real-API-server tier: only the real partner can vouch. Real `twosite-agent` processes
//! and the real controller; each agent's link to the API server runs through a proxy the test
//! can cut; the test plays kubelet and the watchdog (a test watchdog file: a node whose agent
//! stopped feeding counts as rebooted).
//!
//! - A forger holds b-1's address (b-1's Node now names a loopback alias the forger listens
//!   on, while the real b-1 renews cleanly) and answers a-1's probes "I vouch" without the key.
//!   a-1 loses its API link: it refuses every forged answer and stops feeding within its lease,
//!   before the controller fences it. Then the hole, shown: the same a-1 with
//!   `--insecure-peer-probes` is kept running by the forger after the controller tainted it
//!   and released its workloads.
//! - Key rotation during a whole-cluster API outage: both agents live on each other's vouches
//!   while each node's copy of the Secret is rotated at a different time, twice; the feeds
//!   never pause. An agent left with only a retired key is refused, and both stop.
//!
//! Build the binaries first (same target directory):
//! `cargo build -p twosite-controller --bin twosite -p twosite-node-health --bin twosite-agent`.

mod common;

use common::agents::{
    AgentOptions, agent_files, feeds, has_taint, play_kubelets, start_agent_with,
};
use common::proxy::CutProxy;
use common::{AGENT_BIN, CONTROLLER_BIN, NAMESPACE, Process, Setup, TestNode, wait_for};
use e2e::apiserver::{self, ApiServer, Options};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use node_health::PeerReport;
use node_health::peer_auth::{Question, sign_answer};
use serde_json::json;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TAINT_KEY: &str = "node.kubernetes.io/out-of-service";
/// The agent's lease (8 s) and the slack of its loop ticks and feeds.
const LEASE: Duration = Duration::from_secs(8);
const SLACK: Duration = Duration::from_millis(1500);

fn cluster() -> Vec<TestNode> {
    vec![
        TestNode::new("a-1", "room-a", "127.0.0.2"),
        TestNode::new("b-1", "room-b", "127.0.0.3"),
    ]
}

/// GET `path` on `ip:port`: the body of a 200, else `None`.
fn get_at(ip: [u8; 4], port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    raw.starts_with("HTTP/1.1 200")
        .then(|| raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()))?
}

/// `twosite_agent_peer_refusals_total{reason}` on the agent at `ip:port`.
fn refusals(ip: [u8; 4], port: u16, reason: &str) -> u64 {
    let series = format!("twosite_agent_peer_refusals_total{{reason=\"{reason}\"}} ");
    get_at(ip, port, "/metrics")
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix(&series).and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(0)
}

/// `twosite_agent_peer_answers_total` on the agent at `ip:port`.
fn answers(ip: [u8; 4], port: u16) -> u64 {
    get_at(ip, port, "/metrics")
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("twosite_agent_peer_answers_total ")
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// Samples a watchdog file's feeds every 100 ms in the background: the instant of each feed.
fn watch_feeds(path: PathBuf) -> Arc<Mutex<Vec<Instant>>> {
    let times: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let out = times.clone();
    tokio::spawn(async move {
        let mut last = feeds(&path);
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = feeds(&path);
            if now != last {
                last = now;
                out.lock().expect("lock").push(Instant::now());
            }
        }
    });
    times
}

fn last_feed(times: &Arc<Mutex<Vec<Instant>>>) -> Option<Instant> {
    times.lock().expect("lock").last().copied()
}

/// The largest pause between feeds (and since the last one) within `[from, to]`.
fn longest_pause(times: &Arc<Mutex<Vec<Instant>>>, from: Instant, to: Instant) -> Duration {
    let mut at = from;
    let mut worst = Duration::ZERO;
    for t in times
        .lock()
        .expect("lock")
        .iter()
        .filter(|t| **t >= from && **t <= to)
    {
        worst = worst.max(t.duration_since(at));
        at = *t;
    }
    worst.max(to.duration_since(at))
}

/// A forger on `ip:port` that answers every probe in b-1's name that it vouches for the asker:
/// an unsigned answer to the very question (it reads the nonce), and, every other time, the
/// pre-authentication answer of issue 11.
async fn start_forger(ip: [u8; 4], port: u16) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((ip, port)))
        .await
        .expect("bind the forger");
    tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok((mut conn, _)) = listener.accept().await {
            n += 1;
            let mut buf = vec![0u8; 4096];
            let got = conn.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..got]).to_string();
            let query = request
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.split_once('?'))
                .map(|(_, q)| q.to_string())
                .unwrap_or_default();
            let Ok(q) = Question::from_query(&query) else {
                continue;
            };
            let vouch = PeerReport {
                node: "b-1".into(),
                room: "room-b".into(),
                partner: Some(q.from.clone()),
                api_reachable: false,
                has_right: true,
            };
            let body = if n.is_multiple_of(2) {
                sign_answer(None, &q, &vouch)
            } else {
                serde_json::to_vec(&vouch).expect("json")
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(&[head.as_bytes(), &body].concat()).await;
            let _ = conn.shutdown().await;
        }
    })
}

/// The agent ServiceAccount's kubeconfig through `proxy`.
fn proxied_kubeconfig(server: &ApiServer, proxy: &CutProxy, node: &str) -> PathBuf {
    let kubeconfig = server
        .service_account_kubeconfig(apiserver::AGENT_SA.0, apiserver::AGENT_SA.1)
        .expect("the agent's kubeconfig");
    proxy.kubeconfig(
        kubeconfig,
        &server.url(),
        server.dir(),
        &format!("kubeconfig-{node}.yaml"),
    )
}

async fn right_to_run(leases: &Api<Lease>, node: &str) -> Result<String, String> {
    let lease = leases
        .get_opt(&format!("twosite-agent-{node}"))
        .await
        .map_err(|e| e.to_string())?
        .ok_or(format!("no heartbeat Lease for {node} yet"))?;
    Ok(lease
        .metadata
        .annotations
        .and_then(|a| a.get("twosite.dev/right-to-run").cloned())
        .unwrap_or_default())
}

async fn wait_running(leases: &Api<Lease>, nodes: &[&str]) {
    wait_for(
        "agents renewing with the right to run",
        Duration::from_secs(60),
        || async {
            for node in nodes {
                let r = right_to_run(leases, node).await?;
                if r != "Lease" {
                    return Err(format!("{node}: right-to-run {r:?}"));
                }
            }
            Ok(())
        },
    )
    .await;
}

async fn wait_taint(nodes: &Api<Node>, name: &str, present: bool, within: Duration) -> Instant {
    wait_for(
        &format!("{name} out-of-service taint {present}"),
        within,
        || async {
            let node = nodes.get(name).await.map_err(|e| e.to_string())?;
            if has_taint(&node, TAINT_KEY) == present {
                Ok(Instant::now())
            } else {
                Err(format!("taints {:?}", node.spec.and_then(|s| s.taints)))
            }
        },
    )
    .await
}

async fn start_cluster(test: &str) -> Option<(ApiServer, Client, Vec<TestNode>)> {
    let all = cluster();
    let setup = Setup {
        binaries: &[CONTROLLER_BIN, AGENT_BIN],
        options: Options::default(),
        rbac: &["rbac-controller.yaml", "rbac-agent.yaml"],
        nodes: &all,
    };
    let (server, admin) = common::start(test, setup).await?;
    Some((server, admin, all))
}

fn upstream(server: &ApiServer) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], server.port()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forger_on_the_partners_address_cannot_keep_a_cut_off_node_running() {
    let test = "a_forger_on_the_partners_address_cannot_keep_a_cut_off_node_running";
    let Some((server, admin, all)) = start_cluster(test).await else {
        return;
    };
    let nodes: Api<Node> = Api::all(admin.clone());
    let leases: Api<Lease> = Api::namespaced(admin.clone(), NAMESPACE);
    let alive = Arc::new(Mutex::new(
        all.iter().map(|n| n.name.clone()).collect::<BTreeSet<_>>(),
    ));
    let _kubelets = play_kubelets(&admin, alive);
    let admin_port = apiserver::free_port().expect("a free port");
    let peer_port = apiserver::free_port().expect("a free port");
    let mut controller = Process::controller(&server, "controller-1", admin_port);
    let link_a1 = CutProxy::start(upstream(&server)).await;
    let a1_options = |extra: &[&str]| AgentOptions {
        kubeconfig: Some(proxied_kubeconfig(&server, &link_a1, "a-1")),
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        ..AgentOptions::default()
    };
    let mut agent_a1 = start_agent_with(
        &server,
        &all[0],
        "boot-a-1-1",
        peer_port,
        1,
        a1_options(&[]),
    );
    let mut agent_b1 = start_agent_with(
        &server,
        &all[1],
        "boot-b-1-1",
        peer_port,
        1,
        AgentOptions::default(),
    );
    wait_running(&leases, &["a-1", "b-1"]).await;
    let a1_feeds = watch_feeds(agent_files(&server, "a-1").watchdog);

    // The forger takes over b-1's address in a-1's eyes: b-1's Node now names 127.0.0.6. The
    // real b-1 keeps renewing on 127.0.0.3.
    let _forger = start_forger([127, 0, 0, 6], peer_port).await;
    nodes
        .patch_status(
            "b-1",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "addresses": [
                { "type": "InternalIP", "address": "127.0.0.6" }
            ] } })),
        )
        .await
        .expect("move b-1's address");
    let a1_ip = [127, 0, 0, 2];
    wait_for(
        "a-1 probing the forger",
        Duration::from_secs(30),
        || async {
            let (u, m) = (
                refusals(a1_ip, peer_port, "unsigned"),
                refusals(a1_ip, peer_port, "malformed"),
            );
            if u > 0 && m > 0 {
                Ok(())
            } else {
                Err(format!("refusals: unsigned {u}, malformed {m}"))
            }
        },
    )
    .await;

    // a-1 loses the API server. Nothing but the forger answers it, and that is no vouch.
    link_a1.cut();
    let cut = Instant::now();
    let tainted = wait_taint(&nodes, "a-1", true, Duration::from_secs(60)).await;
    let stopped = last_feed(&a1_feeds).expect("a-1 fed before the cut");
    agent_a1.assert_running();
    agent_b1.assert_running();
    controller.assert_running();
    println!(
        "with the key: a-1 fed last {:?} after the cut, tainted {:?} after it; refused \
         {} unsigned and {} malformed forged answers",
        stopped.saturating_duration_since(cut),
        tainted.duration_since(cut),
        refusals(a1_ip, peer_port, "unsigned"),
        refusals(a1_ip, peer_port, "malformed"),
    );
    assert!(
        stopped.saturating_duration_since(cut) <= LEASE + SLACK,
        "a-1 kept running {:?} after losing the API server",
        stopped.saturating_duration_since(cut)
    );
    assert!(
        stopped < tainted,
        "a-1 stopped before the controller released its workloads"
    );
    let log = agent_a1.log_text();
    assert!(
        log.contains("refused an answer from the partner's address"),
        "{}",
        agent_a1.log_tail(30)
    );
    assert!(
        log.contains("lost the right to run"),
        "{}",
        agent_a1.log_tail(30)
    );
    assert_eq!(
        right_to_run(&leases, "b-1").await.as_deref(),
        Ok("Lease"),
        "b-1 renews cleanly"
    );

    // The hole, shown: a-1 "reboots" with --insecure-peer-probes, comes back clean, and loses the
    // API server again. The forger's vouch keeps it running after the controller — seeing b-1
    // renew cleanly, so knowing b-1 never vouched — fenced it and released its workloads.
    agent_a1.kill();
    link_a1.heal();
    // The test as kubelet: the node is back with a new boot ID.
    common::set_node_state(&nodes, "a-1", true, Some("boot-a-1-2")).await;
    let mut agent_a1 = start_agent_with(
        &server,
        &all[0],
        "boot-a-1-2",
        peer_port,
        2,
        a1_options(&["--insecure-peer-probes"]),
    );
    wait_taint(&nodes, "a-1", false, Duration::from_secs(60)).await;
    // The marker comes off with the taint; the agent sees that at its next renewal and runs.
    let a1_feeds = watch_feeds(agent_files(&server, "a-1").watchdog);
    wait_for("a-1 running again", Duration::from_secs(30), || async {
        match last_feed(&a1_feeds) {
            Some(t) if t.elapsed() < Duration::from_secs(2) => Ok(()),
            _ => Err(agent_a1.log_tail(5)),
        }
    })
    .await;
    wait_running(&leases, &["a-1"]).await;
    link_a1.cut();
    let cut = Instant::now();
    let tainted = wait_taint(&nodes, "a-1", true, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fed = last_feed(&a1_feeds)
        .unwrap_or_else(|| panic!("a-1 fed after the cut: {}", agent_a1.log_tail(40)));
    agent_a1.assert_running();
    println!(
        "without verification: a-1 tainted {:?} after the cut and still feeding {:?} after the \
         taint (two copies could run)",
        tainted.duration_since(cut),
        fed.saturating_duration_since(tainted)
    );
    assert!(
        fed > tainted + Duration::from_secs(1),
        "the forged vouch keeps an insecure a-1 running"
    );
    assert!(agent_a1.log_text().contains("INSECURE PEER PROBES"));
}

/// Writes a node's copy of the peer-key Secret the way kubelet updates a mounted Secret: a new
/// directory, then an atomic symlink swap.
fn write_keys(link: &Path, version: u32, current: &str, previous: Option<&str>) {
    let parent = link.parent().expect("a parent");
    let data = parent.join(format!(
        "{}-v{version}",
        link.file_name().expect("name").to_string_lossy()
    ));
    std::fs::create_dir_all(&data).expect("create the key data dir");
    std::fs::write(data.join("current"), current).expect("write current");
    if let Some(p) = previous {
        std::fs::write(data.join("previous"), p).expect("write previous");
    }
    let tmp = parent.join(format!(
        "{}.tmp",
        link.file_name().expect("name").to_string_lossy()
    ));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&data, &tmp).expect("symlink");
    std::fs::rename(&tmp, link).expect("swap the symlink");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_keeps_vouching_without_a_gap_and_a_retired_key_is_refused() {
    let test = "key_rotation_keeps_vouching_without_a_gap_and_a_retired_key_is_refused";
    let Some((server, admin, all)) = start_cluster(test).await else {
        return;
    };
    let leases: Api<Lease> = Api::namespaced(admin.clone(), NAMESPACE);
    let alive = Arc::new(Mutex::new(
        all.iter().map(|n| n.name.clone()).collect::<BTreeSet<_>>(),
    ));
    let _kubelets = play_kubelets(&admin, alive);
    let admin_port = apiserver::free_port().expect("a free port");
    let peer_port = apiserver::free_port().expect("a free port");
    let _controller = Process::controller(&server, "controller-1", admin_port);
    let (k1, k2, k3) = (
        "key one of the rotation test, 32+ bytes",
        "key two of the rotation test, 32+ bytes",
        "key three of the rotation test, 32+ bytes",
    );
    let mut agents = Vec::new();
    let mut links = Vec::new();
    let mut key_links = Vec::new();
    for (i, node) in all.iter().enumerate() {
        let link = CutProxy::start(upstream(&server)).await;
        let key_link = server.dir().join(format!("peer-key-{}", node.name));
        write_keys(&key_link, 1, k1, None);
        let options = AgentOptions {
            kubeconfig: Some(proxied_kubeconfig(&server, &link, &node.name)),
            key_dir: Some(key_link.clone()),
            ..AgentOptions::default()
        };
        let boot = format!("boot-{}-1", node.name);
        agents.push(start_agent_with(
            &server,
            node,
            &boot,
            peer_port,
            u32::try_from(i).unwrap_or(0),
            options,
        ));
        links.push(link);
        key_links.push(key_link);
    }
    wait_running(&leases, &["a-1", "b-1"]).await;
    // Each agent knows its partner (read every 10 s) and has had its answers.
    wait_for(
        "the partners answering each other",
        Duration::from_secs(30),
        || async {
            for (i, ip) in [[127, 0, 0, 2], [127, 0, 0, 3]].into_iter().enumerate() {
                let answers = answers(ip, peer_port);
                if answers == 0 {
                    return Err(format!("{}: no partner answer taken yet", agents[i].name));
                }
            }
            Ok(())
        },
    )
    .await;
    let fed: Vec<_> = ["a-1", "b-1"]
        .iter()
        .map(|n| watch_feeds(agent_files(&server, n).watchdog))
        .collect();

    // A whole-cluster API outage: the agents live on each other's vouches.
    for link in &links {
        link.cut();
    }
    let cut = Instant::now();
    tokio::time::sleep(LEASE + Duration::from_secs(2)).await;
    // Each node's copy of the Secret is rotated at its own time, twice.
    let steps: [(usize, u32, &str, Option<&str>); 4] = [
        (0, 2, k2, Some(k1)),
        (1, 2, k2, Some(k1)),
        (0, 3, k3, Some(k2)),
        (1, 3, k3, Some(k2)),
    ];
    for (node, version, current, previous) in steps {
        write_keys(&key_links[node], version, current, previous);
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    let rotated = Instant::now();
    for (agent, times) in agents.iter_mut().zip(&fed) {
        agent.assert_running();
        let pause = longest_pause(times, cut, rotated);
        println!(
            "{}: longest pause between feeds over the outage and both rotations: {pause:?}",
            agent.name
        );
        assert!(
            pause < Duration::from_millis(2500),
            "{} stopped feeding: {}",
            agent.name,
            agent.log_tail(30)
        );
        let log = agent.log_text();
        assert_eq!(
            log.matches("peer keys reloaded").count(),
            2,
            "{}",
            agent.log_tail(30)
        );
        assert!(
            !log.contains("lost the right to run"),
            "{}",
            agent.log_tail(30)
        );
    }

    // a-1's copy is set back to the retired key alone: neither side verifies the other, both stop.
    write_keys(&key_links[0], 4, k1, None);
    let retired = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    for (i, (agent, times)) in agents.iter_mut().zip(&fed).enumerate() {
        let last = last_feed(times).expect("fed");
        let ip = [127, 0, 0, 2 + u8::try_from(i).unwrap_or(0)];
        let unknown = refusals(ip, peer_port, "unknown_key");
        println!(
            "{}: fed last {:?} after the retired key, {unknown} answers under an unknown key refused",
            agent.name,
            last.saturating_duration_since(retired)
        );
        assert!(unknown > 0, "{}", agent.log_tail(30));
        assert!(
            agent.log_text().contains("lost the right to run"),
            "{}",
            agent.log_tail(30)
        );
        assert!(last.saturating_duration_since(retired) < Duration::from_secs(8));
    }
}

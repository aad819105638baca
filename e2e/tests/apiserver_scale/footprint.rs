//! The footprint of the processes `apiserver_scale` watches: RSS and CPU from /proc.

use e2e::apiserver::ApiServer;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    /// utime + stime, seconds.
    pub cpu_s: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

pub fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcSample {
        cpu_s: (utime + stime) as f64 / clock_ticks(),
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// The kube-apiserver and etcd processes of `server` (their command lines name its directory).
pub fn control_plane_pids(server: &ApiServer) -> Vec<(String, u32)> {
    let dir = server.dir().display().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.contains(&dir) {
            continue;
        }
        let exe = cmdline.split_whitespace().next().unwrap_or_default();
        let name = Path::new(exe)
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if name.starts_with("kube-apiserver") {
            found.push(("kube-apiserver".to_string(), pid));
        } else if name.starts_with("etcd") {
            found.push(("etcd".to_string(), pid));
        }
    }
    found.sort();
    found
}

/// Samples every watched process every 500 ms: the peak RSS of each since the last `take`.
pub struct RssWatch {
    peaks: Mutex<BTreeMap<u32, u64>>,
}

impl RssWatch {
    pub fn start(pids: Vec<u32>) -> (Arc<RssWatch>, tokio::task::JoinHandle<()>) {
        let watch = Arc::new(RssWatch {
            peaks: Mutex::new(BTreeMap::new()),
        });
        let w = Arc::clone(&watch);
        let handle = tokio::spawn(async move {
            loop {
                for pid in &pids {
                    if let Some(s) = sample(*pid) {
                        let mut peaks = w.peaks.lock().expect("peaks");
                        let peak = peaks.entry(*pid).or_default();
                        *peak = (*peak).max(s.rss_kib);
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        (watch, handle)
    }

    /// The peak RSS (KiB) of `pid` since the last take, and starts a new period.
    pub fn take(&self, pid: u32) -> u64 {
        self.peaks
            .lock()
            .expect("peaks")
            .insert(pid, 0)
            .unwrap_or(0)
    }
}

pub fn cpu_percent(a: &ProcSample, b: &ProcSample, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    100.0 * (b.cpu_s - a.cpu_s) / secs
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The readings of /proc the figures are made of: the controller at the start and the end of the
/// calm window, at the release and at the end; the real agents, the control plane's processes and
/// the test process itself alike; the controller's peak RSS in the calm window and the failover.
pub struct Samples {
    pub s_ctrl0: ProcSample,
    pub s_ctrl1: ProcSample,
    pub s_ctrl2: ProcSample,
    pub s_ctrl_end: ProcSample,
    pub s_agents0: Vec<ProcSample>,
    pub s_agents1: Vec<ProcSample>,
    pub s_agents_end: Vec<ProcSample>,
    pub s_cp0: Vec<ProcSample>,
    pub s_cp1: Vec<ProcSample>,
    pub s_cp2: Vec<ProcSample>,
    pub s_self0: ProcSample,
    pub s_self1: ProcSample,
    pub calm_peak_kib: u64,
    pub failover_peak_kib: u64,
}

//! `twosite guard` with bad input, as a process: a missing device, a regular file, a device
//! mounted elsewhere, an unknown `--fs`, a lease name Kubernetes would refuse, a bad stop
//! signal, or no app command — each exits 2 with a clear message, before any API call, and
//! leaves the device as it was. (No API server is configured: a guard that got past its checks
//! would fail differently.)
#![cfg(target_os = "linux")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn guard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_twosite"))
        .arg("guard")
        .args(args)
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("POD_UID")
        .env_remove("POD_NAMESPACE")
        .output()
        .expect("twosite runs")
}

fn refused(out: &Output, says: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "exit 2 expected; stderr: {stderr}"
    );
    assert!(stderr.contains(says), "{says:?} not in: {stderr}");
}

fn base<'a>(device: &'a str, mount: &'a str, fs: &'a str, lease: &'a str) -> Vec<&'a str> {
    vec![
        "--lease",
        lease,
        "--namespace",
        "apps",
        "--identity",
        "uid-1",
        "--device",
        device,
        "--mount",
        mount,
        "--fs",
        fs,
    ]
}

#[test]
fn bad_flags_are_refused_before_anything_is_touched() {
    let dir = tempfile::tempdir().expect("dir");
    let mount = dir.path().display().to_string();
    let file = dir.path().join("not-a-device");
    std::fs::write(&file, b"data").expect("file");
    let file = file.display().to_string();

    let mut args = base("/dev/twosite-no-such-device", &mount, "xfs", "db");
    args.extend(["--", "true"]);
    refused(&guard(&args), "does not exist");

    let mut args = base(&file, &mount, "xfs", "db");
    args.extend(["--", "true"]);
    refused(&guard(&args), "is not a block device");
    assert_eq!(std::fs::read(&file).expect("read"), b"data");

    let mut args = base(&file, &mount, "btrfs", "db");
    args.extend(["--", "true"]);
    refused(&guard(&args), "unknown filesystem");

    let mut args = base(&file, &mount, "xfs", "DB_Volume");
    args.extend(["--", "true"]);
    refused(&guard(&args), "is not a valid Lease name");

    let mut args = base(&file, &mount, "xfs", "db");
    args.extend(["--stop-signal", "KILL", "--", "true"]);
    refused(&guard(&args), "unknown stop signal");

    // No app after `--`.
    refused(&guard(&base(&file, &mount, "xfs", "db")), "<APP>");

    let mut args = base(&file, "/nonexistent/mount", "xfs", "db");
    args.extend(["--", "true"]);
    refused(&guard(&args), "is not an existing directory");
}

/// A loop device, detached on drop.
struct Loop(PathBuf, tempfile::TempDir);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.1.path().join("m")).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn a_device_mounted_on_this_node_is_refused() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (a loop device and a mount), as CI has"
    );
    let dir = tempfile::tempdir().expect("dir");
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(64 * 1024 * 1024))
        .expect("image");
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&img)
        .output()
        .expect("losetup");
    assert!(out.status.success(), "losetup failed");
    let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let point = dir.path().join("m");
    std::fs::create_dir(&point).expect("mount point");
    let disk = Loop(dev.clone(), dir);
    let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
    assert!(ok(Command::new("mkfs.ext4").args(["-q"]).arg(&dev)));
    assert!(ok(Command::new("mount").arg(&dev).arg(&point)));

    let other = tempfile::tempdir().expect("dir");
    let dev_s = dev.display().to_string();
    let other_s = other.path().display().to_string();
    let mut args = base(&dev_s, &other_s, "ext4", "db");
    args.extend(["--", "true"]);
    refused(&guard(&args), "already mounted on this node");
    assert!(
        !Path::new(&other_s).join("lost+found").exists(),
        "mounted nothing"
    );
    drop(disk);
}

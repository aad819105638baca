//! The guard's device handling on real loop devices (root, losetup, wipefs, mkfs.xfs,
//! mkfs.ext4, mount): an empty device is formatted once and a file on it survives a remount; a
//! device with any signature, or with data but no signature, is never formatted; a mounted
//! device, a missing one and a regular file are refused. Without root or the tools the test
//! fails saying so: it is never skipped silently.
#![cfg(target_os = "linux")]

use controller::guard::device::{self, DeviceError, Prepared};
use node_health::volume::device::{Filesystem, Refusal};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop device over a sparse file, detached on drop.
struct Loop {
    dev: PathBuf,
    _dir: tempfile::TempDir,
}

fn require_root_and_tools() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the guard's device tests need root (loop devices, mkfs, mount); run them as root as CI does"
    );
    for tool in [
        "losetup",
        "wipefs",
        "mkfs.xfs",
        "mkfs.ext4",
        "mount",
        "umount",
        "mkswap",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is missing (apt-get install util-linux xfsprogs e2fsprogs)"
        );
    }
}

impl Loop {
    fn new(mib: u64) -> Loop {
        require_root_and_tools();
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(mib * 1024 * 1024))
            .expect("image");
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
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Loop { dev, _dir: dir }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn sh(cmd: &str) {
    let st = Command::new("sh").args(["-c", cmd]).status().expect("sh");
    assert!(st.success(), "{cmd}");
}

fn mount_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("mount dir")
}

fn mountinfo() -> &'static Path {
    Path::new("/proc/self/mountinfo")
}

#[test]
fn an_empty_device_is_formatted_once_and_its_data_survives() {
    for fs in [Filesystem::Xfs, Filesystem::Ext4] {
        let disk = Loop::new(320);
        let dev = device::block_device(&disk.dev).expect("a block device");
        device::check_unmounted(&dev, mountinfo()).expect("not mounted");
        let dir = mount_dir();
        assert_eq!(
            device::prepare_and_mount(&dev, dir.path(), fs).expect("formatted and mounted"),
            Prepared::Formatted,
            "{fs}"
        );
        assert!(matches!(
            device::check_unmounted(&dev, mountinfo()),
            Err(DeviceError::MountedElsewhere { .. })
        ));
        std::fs::write(dir.path().join("rows"), "10000 rows").expect("write");
        device::sync_and_unmount(dir.path()).expect("unmounted");
        device::check_unmounted(&dev, mountinfo()).expect("unmounted");

        // The next consumer finds the filesystem, mounts it and never formats it again.
        let again = mount_dir();
        assert_eq!(
            device::prepare_and_mount(&dev, again.path(), fs).expect("mounted"),
            Prepared::Existing,
            "{fs}"
        );
        assert_eq!(
            std::fs::read_to_string(again.path().join("rows")).expect("read"),
            "10000 rows"
        );
        device::sync_and_unmount(again.path()).expect("unmounted");
    }
}

#[test]
fn a_device_with_any_signature_or_unknown_data_is_never_formatted() {
    // Another filesystem than asked for (both ways), a swap signature, and raw data with no
    // signature at all.
    let cases: [(&str, Filesystem); 4] = [
        ("mkfs.ext4 -q {dev}", Filesystem::Xfs),
        ("mkfs.xfs -q {dev}", Filesystem::Ext4),
        ("mkswap {dev} >/dev/null", Filesystem::Ext4),
        (
            "printf 'PGDATA page 1' | dd of={dev} bs=512 seek=8 conv=notrunc status=none",
            Filesystem::Xfs,
        ),
    ];
    for (setup, fs) in cases {
        let disk = Loop::new(320);
        sh(&setup.replace("{dev}", &disk.dev.display().to_string()));
        let before = std::fs::read(&disk.dev).expect("read the device");
        let dev = device::block_device(&disk.dev).expect("a block device");
        let dir = mount_dir();
        let err = device::prepare_and_mount(&dev, dir.path(), fs).expect_err(setup);
        assert!(
            matches!(
                err,
                DeviceError::Refused {
                    source: Refusal::OtherSignature { .. } | Refusal::UnknownData,
                    ..
                }
            ),
            "{setup}: {err}"
        );
        assert!(
            std::fs::read(&disk.dev).expect("read the device") == before,
            "{setup}: the device was changed"
        );
        device::check_unmounted(&dev, mountinfo()).expect("nothing mounted");
    }
}

#[test]
fn a_missing_device_and_a_regular_file_are_refused() {
    assert!(matches!(
        device::block_device(Path::new("/dev/twosite-no-such-device")),
        Err(DeviceError::Missing { .. })
    ));
    let file = tempfile::NamedTempFile::new().expect("file");
    assert!(matches!(
        device::block_device(file.path()),
        Err(DeviceError::NotBlock { .. })
    ));
}

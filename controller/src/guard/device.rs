//! The guard's IO on the shared block device. What to do with it is decided by
//! [`node_health::volume::device::prepare`]; this module only looks and acts: `wipefs
//! --no-act --json` and the first MiB for the probe, `mkfs.xfs`/`mkfs.ext4` (never with a force
//! flag: mkfs refuses a device with a signature on its own, a second lock on the same door),
//! `mount`, `sync`, `umount`.

use node_health::volume::device::{
    self, DeviceProbe, Filesystem, HEAD_BYTES, Preparation, Refusal, WipefsOutput,
};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why the device cannot be used (nothing was changed on it, unless the variant says so).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("the device {path} does not exist or cannot be read")]
    Missing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a block device")]
    NotBlock { path: PathBuf },
    #[error("the device {path} is already mounted on this node at {points}")]
    MountedElsewhere { path: PathBuf, points: String },
    #[error("cannot probe {path}")]
    Probe {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("probing {path} with wipefs failed: {detail}")]
    Wipefs { path: PathBuf, detail: String },
    #[error("cannot read wipefs's answer for {path}")]
    WipefsOutput {
        path: PathBuf,
        #[source]
        source: WipefsOutput,
    },
    #[error("refusing the device {path}")]
    Refused {
        path: PathBuf,
        #[source]
        source: Refusal,
    },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
}

/// A block device the guard may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    pub path: PathBuf,
    pub major: u32,
    pub minor: u32,
}

/// `path` is an existing block device; its numbers.
pub fn block_device(path: &Path) -> Result<BlockDevice, DeviceError> {
    let meta = std::fs::metadata(path).map_err(|source| DeviceError::Missing {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(DeviceError::NotBlock {
            path: path.to_path_buf(),
        });
    }
    let rdev = meta.rdev();
    Ok(BlockDevice {
        path: path.to_path_buf(),
        major: libc::major(rdev),
        minor: libc::minor(rdev),
    })
}

/// Refuses a device mounted anywhere in this mount namespace (another guard, a leftover mount).
pub fn check_unmounted(dev: &BlockDevice, mountinfo: &Path) -> Result<(), DeviceError> {
    let info = std::fs::read_to_string(mountinfo).map_err(|source| DeviceError::Probe {
        path: mountinfo.to_path_buf(),
        source,
    })?;
    let points = device::mounts_of(&info, dev.major, dev.minor);
    if points.is_empty() {
        Ok(())
    } else {
        Err(DeviceError::MountedElsewhere {
            path: dev.path.clone(),
            points: points.join(", "),
        })
    }
}

fn run(cmd: &mut Command) -> Result<std::process::Output, DeviceError> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| DeviceError::Command {
        command: command.clone(),
        detail: e.to_string(),
    })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(DeviceError::Command {
            command,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// What is on the device: wipefs's signatures and whether its first MiB reads as zeros.
pub fn probe(dev: &BlockDevice) -> Result<DeviceProbe, DeviceError> {
    let out = run(Command::new("wipefs")
        .args(["--no-act", "--json"])
        .arg(&dev.path))
    .map_err(|e| DeviceError::Wipefs {
        path: dev.path.clone(),
        detail: e.to_string(),
    })?;
    let signatures =
        device::parse_wipefs(&String::from_utf8_lossy(&out.stdout)).map_err(|source| {
            DeviceError::WipefsOutput {
                path: dev.path.clone(),
                source,
            }
        })?;
    let mut head = Vec::with_capacity(HEAD_BYTES);
    std::fs::File::open(&dev.path)
        .and_then(|f| f.take(HEAD_BYTES as u64).read_to_end(&mut head))
        .map_err(|source| DeviceError::Probe {
            path: dev.path.clone(),
            source,
        })?;
    Ok(DeviceProbe {
        signatures,
        head_is_zero: head.iter().all(|b| *b == 0),
    })
}

/// What preparing the device did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepared {
    Formatted,
    Existing,
}

/// Probes the device and, as the core decides, formats it (only if provably empty) or
/// refuses; then mounts it on `dir`.
pub fn prepare_and_mount(
    dev: &BlockDevice,
    dir: &Path,
    fs: Filesystem,
) -> Result<Prepared, DeviceError> {
    let prepared = match device::prepare(fs, &probe(dev)?) {
        Preparation::Refuse(source) => {
            return Err(DeviceError::Refused {
                path: dev.path.clone(),
                source,
            });
        }
        Preparation::Format => {
            format(dev, fs)?;
            Prepared::Formatted
        }
        Preparation::Mount => Prepared::Existing,
    };
    run(Command::new("mount")
        .args(["-t", fs.name()])
        .arg(&dev.path)
        .arg(dir))?;
    Ok(prepared)
}

fn format(dev: &BlockDevice, fs: Filesystem) -> Result<(), DeviceError> {
    let mut cmd = match fs {
        Filesystem::Xfs => {
            let mut c = Command::new("mkfs.xfs");
            c.arg("-q");
            c
        }
        // No -F: a device that already has a signature makes mkfs.ext4 stop and ask, which,
        // with stdin closed, is a refusal.
        Filesystem::Ext4 => {
            let mut c = Command::new("mkfs.ext4");
            c.args(["-q", "-E", "nodiscard"]);
            c
        }
    };
    cmd.arg(&dev.path).stdin(std::process::Stdio::null());
    run(&mut cmd).map(|_| ())
}

/// Flushes the filesystem on `dir` and unmounts it.
pub fn sync_and_unmount(dir: &Path) -> Result<(), DeviceError> {
    run(Command::new("sync").arg("--file-system").arg(dir))?;
    run(Command::new("umount").arg(dir)).map(|_| ())
}

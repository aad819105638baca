//! The watchdog: the node reboots unless the agent feeds it, which the agent does only while
//! [`crate::AgentCore`] says the node may run.
//!
//! The Linux device is opened when the core first arms (after the first successful renewal):
//! opening a watchdog device starts it. The magic close character `V` is never written, so
//! closing the device — the agent exiting or crashing — never stops it: a node whose agent is
//! gone reboots, which is what the controller's fence deadline assumes.

use super::error::{Error, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default device.
pub const DEFAULT_DEVICE: &str = "/dev/watchdog";

/// What feeds the node's watchdog.
pub trait Watchdog: Send {
    /// Starts the watchdog (the core armed). Called once, before the first feed.
    fn arm(&mut self) -> Result<()>;
    /// Postpones the reboot by one timeout.
    fn feed(&mut self) -> Result<()>;
    /// Whether a stopped feed reboots the node (`false` only when fencing is switched off).
    fn fences(&self) -> bool;
    /// Reboots the node now: the last resort when this watchdog failed and the node lost the
    /// right to run (see [`crate::AgentStep::reboot`]).
    fn reboot(&mut self) -> Result<()>;
}

/// A Linux watchdog device (`/dev/watchdog`, softdog or hardware).
#[derive(Debug)]
pub struct DeviceWatchdog {
    path: PathBuf,
    timeout: Duration,
    device: Option<File>,
}

impl DeviceWatchdog {
    /// Makes sure the device exists and is a character device without opening it (opening
    /// would start it). When the default device is missing, loads `softdog` once with the
    /// agent's watchdog timeout. A regular file is refused: feeding it would report a watchdog
    /// that reboots nothing (tests use [`FileWatchdog`], behind its own flag).
    pub fn prepare(path: &Path, timeout: Duration) -> Result<Self> {
        if !path.exists() && path == Path::new(DEFAULT_DEVICE) {
            load_softdog(timeout, path)?;
        }
        let meta = std::fs::metadata(path).map_err(|source| Error::Watchdog {
            path: path.to_path_buf(),
            what: "no such device",
            source,
        })?;
        if !is_char_device(&meta) {
            return Err(Error::Watchdog {
                path: path.to_path_buf(),
                what: "not a watchdog device",
                source: std::io::Error::other("not a character device"),
            });
        }
        Ok(DeviceWatchdog {
            path: path.to_path_buf(),
            timeout,
            device: None,
        })
    }

    pub fn is_open(&self) -> bool {
        self.device.is_some()
    }

    fn open(&mut self) -> Result<&mut File> {
        let file = match self.device.take() {
            Some(file) => file,
            None => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&self.path)
                    .map_err(|source| Error::Watchdog {
                        path: self.path.clone(),
                        what: "could not open",
                        source,
                    })?;
                set_timeout(&file, &self.path, self.timeout);
                tracing::info!(
                    device = %self.path.display(),
                    timeout = ?self.timeout,
                    "watchdog armed: the node reboots if the agent stops feeding it"
                );
                file
            }
        };
        Ok(self.device.insert(file))
    }
}

impl Watchdog for DeviceWatchdog {
    fn arm(&mut self) -> Result<()> {
        self.open().map(|_| ())
    }

    fn feed(&mut self) -> Result<()> {
        let path = self.path.clone();
        let file = self.open()?;
        // Any byte but the magic close 'V' feeds.
        file.write_all(b"\0")
            .and_then(|()| file.flush())
            .map_err(|source| Error::Watchdog {
                path,
                what: "could not feed",
                source,
            })
    }

    fn fences(&self) -> bool {
        true
    }

    fn reboot(&mut self) -> Result<()> {
        sysrq_reboot()
    }
}

/// The kernel's immediate reboot (`b` to /proc/sysrq-trigger): no sync, no shutdown, like a
/// watchdog reset; root may write it whatever `kernel.sysrq` says.
fn sysrq_reboot() -> Result<()> {
    const TRIGGER: &str = "/proc/sysrq-trigger";
    tracing::error!("rebooting the node now through {TRIGGER}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(TRIGGER)
        .and_then(|mut f| f.write_all(b"b"))
        .map_err(|source| Error::Watchdog {
            path: PathBuf::from(TRIGGER),
            what: "could not reboot",
            source,
        })
}

#[cfg(unix)]
fn is_char_device(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    meta.file_type().is_char_device()
}

#[cfg(not(unix))]
fn is_char_device(_meta: &std::fs::Metadata) -> bool {
    false
}

/// `modprobe softdog soft_margin=<seconds>`, once.
fn load_softdog(timeout: Duration, path: &Path) -> Result<()> {
    let margin = format!("soft_margin={}", timeout.as_secs().max(1));
    tracing::info!(%margin, "no watchdog device: loading softdog");
    let status = std::process::Command::new("modprobe")
        .args(["softdog", &margin])
        .status()
        .map_err(|source| Error::Watchdog {
            path: path.to_path_buf(),
            what: "could not run modprobe softdog",
            source,
        })?;
    if !status.success() {
        return Err(Error::Watchdog {
            path: path.to_path_buf(),
            what: "modprobe softdog failed",
            source: std::io::Error::other(status.to_string()),
        });
    }
    Ok(())
}

/// Asks the driver for our timeout (WDIOC_SETTIMEOUT) and warns when it keeps a longer one:
/// the controller's fence deadline assumes the node reboots within the agent's timeout.
#[cfg(target_os = "linux")]
fn set_timeout(file: &File, path: &Path, timeout: Duration) {
    use std::os::fd::AsRawFd;
    // _IOWR('W', 6, int) and _IOR('W', 7, int) from <linux/watchdog.h>.
    const WDIOC_SETTIMEOUT: libc::c_ulong = 0xC004_5706;
    const WDIOC_GETTIMEOUT: libc::c_ulong = 0x8004_5707;
    let wanted = libc::c_int::try_from(timeout.as_secs().max(1)).unwrap_or(libc::c_int::MAX);
    let mut value = wanted;
    // SAFETY: both ioctls read or write one c_int through a valid pointer on an open fd.
    let set = unsafe { libc::ioctl(file.as_raw_fd(), WDIOC_SETTIMEOUT as _, &mut value) };
    let mut actual: libc::c_int = 0;
    // SAFETY: as above.
    let got = unsafe { libc::ioctl(file.as_raw_fd(), WDIOC_GETTIMEOUT as _, &mut actual) };
    if set != 0 || got != 0 {
        tracing::warn!(
            device = %path.display(),
            wanted,
            "could not set or read the watchdog timeout; make sure it is at most {wanted} s"
        );
    } else if actual > wanted {
        tracing::error!(
            device = %path.display(),
            wanted,
            actual,
            "the watchdog keeps a longer timeout than the agent's: the controller's fence \
             deadline is too short for this node"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn set_timeout(_file: &File, _path: &Path, _timeout: Duration) {}

/// No watchdog (`--no-watchdog --i-understand-no-fencing`): nothing reboots the node.
#[derive(Debug, Default)]
pub struct NoWatchdog;

impl Watchdog for NoWatchdog {
    fn arm(&mut self) -> Result<()> {
        Ok(())
    }
    fn feed(&mut self) -> Result<()> {
        Ok(())
    }
    fn fences(&self) -> bool {
        false
    }
    /// Never asked (nothing here fails); fencing was switched off by the operator anyway.
    fn reboot(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A regular file stands in for the watchdog device (`--test-watchdog-file`, with
/// `--i-understand-no-fencing`): each feed appends one byte, and the agent reports its watchdog
/// as enabled. Nothing reboots the node: whoever runs the agent this way (the real-API-server
/// tests) plays the kernel and treats the node as rebooted once the feeds stop.
#[derive(Debug)]
pub struct FileWatchdog {
    path: PathBuf,
    file: Option<File>,
}

impl FileWatchdog {
    pub fn new(path: &Path) -> Self {
        FileWatchdog {
            path: path.to_path_buf(),
            file: None,
        }
    }
}

impl Watchdog for FileWatchdog {
    fn arm(&mut self) -> Result<()> {
        if self.file.is_none() {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|source| Error::Watchdog {
                    path: self.path.clone(),
                    what: "could not open the test watchdog file",
                    source,
                })?;
            tracing::warn!(
                file = %self.path.display(),
                "test watchdog armed: a file stands in for the device, nothing reboots this node"
            );
            self.file = Some(file);
        }
        Ok(())
    }

    fn feed(&mut self) -> Result<()> {
        self.arm()?;
        let path = self.path.clone();
        match self.file.as_mut() {
            Some(file) => file.write_all(b"\0").map_err(|source| Error::Watchdog {
                path,
                what: "could not feed the test watchdog file",
                source,
            }),
            None => Ok(()),
        }
    }

    fn fences(&self) -> bool {
        true
    }

    /// The test harness plays the kernel: the reboot is a line in the file.
    fn reboot(&mut self) -> Result<()> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(b"REBOOT\n"))
            .map_err(|source| Error::Watchdog {
                path: self.path.clone(),
                what: "could not record the reboot in the test watchdog file",
                source,
            })
    }
}

impl<W: Watchdog + ?Sized> Watchdog for Box<W> {
    fn arm(&mut self) -> Result<()> {
        (**self).arm()
    }
    fn feed(&mut self) -> Result<()> {
        (**self).feed()
    }
    fn fences(&self) -> bool {
        (**self).fences()
    }
    fn reboot(&mut self) -> Result<()> {
        (**self).reboot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_refused_as_the_watchdog_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("watchdog");
        std::fs::write(&file, b"").expect("write");
        let err = DeviceWatchdog::prepare(&file, Duration::from_secs(5)).expect_err("refused");
        assert!(err.to_string().contains("not a watchdog device"), "{err}");
        let missing = dir.path().join("missing");
        let err = DeviceWatchdog::prepare(&missing, Duration::from_secs(5)).expect_err("refused");
        assert!(err.to_string().contains("no such device"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_character_device_is_accepted_without_being_opened() {
        // /dev/null is a character device; prepare must not open (start) it.
        let w = DeviceWatchdog::prepare(Path::new("/dev/null"), Duration::from_secs(5))
            .expect("a character device");
        assert!(!w.is_open());
        assert!(w.fences());
    }

    #[test]
    fn the_test_watchdog_file_records_every_feed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("feeds");
        let mut w = FileWatchdog::new(&file);
        assert!(!file.exists(), "nothing is written before the agent arms");
        w.arm().expect("arm");
        w.feed().expect("feed");
        w.feed().expect("feed");
        assert_eq!(std::fs::metadata(&file).expect("file").len(), 2);
        assert!(w.fences());
    }
}

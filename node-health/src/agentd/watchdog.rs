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
}

/// A Linux watchdog device (`/dev/watchdog`, softdog or hardware).
#[derive(Debug)]
pub struct DeviceWatchdog {
    path: PathBuf,
    timeout: Duration,
    device: Option<File>,
}

impl DeviceWatchdog {
    /// Makes sure the device exists without opening it (opening would start it). When the
    /// default device is missing, loads `softdog` once with the agent's watchdog timeout.
    pub fn prepare(path: &Path, timeout: Duration) -> Result<Self> {
        if !path.exists() && path == Path::new(DEFAULT_DEVICE) {
            load_softdog(timeout, path)?;
        }
        std::fs::metadata(path).map_err(|source| Error::Watchdog {
            path: path.to_path_buf(),
            what: "no such device",
            source,
        })?;
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
}

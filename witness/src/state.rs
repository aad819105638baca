//! The state file: every cluster's [`WitnessRecord`] (highest epoch issued, last holder), as JSON.
//!
//! Written whole on every new grant: to a temporary file in the same directory, fsynced, renamed
//! over the state file, and the directory fsynced, so that after a crash the file holds either
//! the old state or the new one, and a grant is answered only once it would survive a power cut.
//! A file that cannot be read back exactly is refused: starting empty would issue epoch 1 again.

use crate::error::{Error, Result};
use node_health::witness::{WitnessRecord, valid_room};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Every cluster's record, by cluster name.
pub type Records = BTreeMap<String, WitnessRecord>;

const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateDoc {
    version: u32,
    clusters: Records,
}

/// The state file, locked for this process (an exclusive lock on `<state>.lock`, released by
/// the kernel when the process dies, so a second witness on the same file refuses to start).
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    tmp: PathBuf,
    dir: PathBuf,
    _lock: File,
}

impl StateFile {
    /// Locks the state file for this process.
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let Some(name) = name else {
            return Err(Error::StateCorrupt {
                path: path.to_path_buf(),
                reason: "the path names no file".into(),
            });
        };
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let lock_path = dir.join(format!(".{name}.lock"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| Error::StateLock {
                path: lock_path.clone(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::StateLocked {
                    path: path.to_path_buf(),
                    lock: lock_path,
                });
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(Error::StateLock {
                    path: lock_path,
                    source,
                });
            }
        }
        Ok(StateFile {
            path: path.to_path_buf(),
            tmp: dir.join(format!(".{name}.tmp")),
            dir,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The persisted records; none when the file does not exist yet.
    pub fn load(&self) -> Result<Records> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Records::new()),
            Err(source) => {
                return Err(Error::StateRead {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        decode(&bytes).map_err(|reason| Error::StateCorrupt {
            path: self.path.clone(),
            reason,
        })
    }

    /// Writes `records` durably: temp file, fsync, rename, fsync of the directory.
    pub fn save(&self, records: &Records) -> Result<()> {
        let doc = StateDoc {
            version: FORMAT_VERSION,
            clusters: records.clone(),
        };
        let mut bytes = serde_json::to_vec_pretty(&doc).map_err(Error::Encode)?;
        bytes.push(b'\n');
        let persist = |action: &'static str| {
            let path = self.path.clone();
            move |source| Error::Persist {
                path,
                action,
                source,
            }
        };
        let mut tmp = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&self.tmp)
            .map_err(persist("creating the temporary file"))?;
        tmp.write_all(&bytes)
            .map_err(persist("writing the temporary file"))?;
        tmp.sync_all()
            .map_err(persist("syncing the temporary file"))?;
        drop(tmp);
        std::fs::rename(&self.tmp, &self.path).map_err(persist("renaming the temporary file"))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(persist("syncing the directory"))?;
        Ok(())
    }
}

/// Reads a state document, checking what a reissued epoch would follow from.
pub fn decode(bytes: &[u8]) -> Result<Records, String> {
    let doc: StateDoc = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if doc.version != FORMAT_VERSION {
        return Err(format!(
            "format version {} (this witness reads {FORMAT_VERSION})",
            doc.version
        ));
    }
    for (cluster, record) in &doc.clusters {
        if let Some((room, epoch)) = &record.holder {
            if *epoch > record.epoch || *epoch == 0 {
                return Err(format!(
                    "cluster {cluster:?}: holder epoch {epoch} is not in 1..={}",
                    record.epoch
                ));
            }
            if !valid_room(room) {
                return Err(format!("cluster {cluster:?}: bad room {room:?}"));
            }
        }
    }
    Ok(doc.clusters)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(epoch: u64, holder: Option<(&str, u64)>) -> WitnessRecord {
        WitnessRecord {
            epoch,
            holder: holder.map(|(r, e)| (r.to_string(), e)),
            ..WitnessRecord::default()
        }
    }

    #[test]
    fn saves_and_loads_back_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("witness.json");
        let file = StateFile::open(&path).expect("open");
        assert!(file.load().expect("absent is empty").is_empty());
        let mut records = Records::new();
        records.insert("factory".into(), record(3, Some(("east", 3))));
        records.insert("campus".into(), record(0, None));
        file.save(&records).expect("save");
        assert_eq!(file.load().expect("load"), records);
        assert!(!dir.path().join(".witness.json.tmp").exists());
    }

    #[test]
    fn a_second_process_is_locked_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("witness.json");
        let _first = StateFile::open(&path).expect("open");
        assert!(matches!(
            StateFile::open(&path),
            Err(Error::StateLocked { .. })
        ));
    }

    #[test]
    fn corrupt_files_are_refused() {
        for bad in [
            &b""[..],
            b"{",
            b"null",
            br#"{"version":1}"#,
            br#"{"version":2,"clusters":{}}"#,
            br#"{"version":1,"clusters":{},"extra":1}"#,
            br#"{"version":1,"clusters":{"c":{"epoch":1,"holder":["east",2]}}}"#,
            br#"{"version":1,"clusters":{"c":{"epoch":-1,"holder":null}}}"#,
            br#"{"version":1,"clusters":{"c":{"epoch":1,"holder":["East Wing",1]}}}"#,
        ] {
            assert!(decode(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(
            decode(br#"{"version":1,"clusters":{"c":{"epoch":2,"holder":["east",2]}}}"#).is_ok()
        );
    }
}

//! The peer keys: read from a directory (the mounted Secret `twosite-peer-key`: files `current`
//! and, during a rotation, `previous`), re-read while the agent runs, so a rotated Secret is
//! picked up without a restart. Kubelet updates a mounted Secret by swapping a symlink, so a
//! read sees either the old or the new pair, never half of each.

use crate::peer_auth::{KeyError, PeerKey, PeerKeys};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

/// The default key directory (where the DaemonSet mounts the Secret).
pub const DEFAULT_KEY_DIR: &str = "/etc/twosite/peer-key";
/// How often the key directory is read again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read the peer key {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the peer key {path} is unusable")]
    Invalid {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
}

/// The bytes of a key file without surrounding whitespace (a key written with `echo` or
/// pasted into `--from-literal` keeps its newline).
fn key_bytes(raw: &[u8]) -> &[u8] {
    let start = raw
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(raw.len());
    let end = raw
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &raw[start..end]
}

fn read_key(path: &Path) -> Result<PeerKey, KeyFileError> {
    let raw = std::fs::read(path).map_err(|source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    PeerKey::new(key_bytes(&raw)).map_err(|source| KeyFileError::Invalid {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads `dir/current` (required) and `dir/previous` (optional: missing or empty is none).
pub fn load_keys(dir: &Path) -> Result<PeerKeys, KeyFileError> {
    let current = read_key(&dir.join("current"))?;
    let previous_path = dir.join("previous");
    let previous = match std::fs::read(&previous_path) {
        Ok(raw) if key_bytes(&raw).is_empty() => None,
        Ok(_) => Some(read_key(&previous_path)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(KeyFileError::Read {
                path: previous_path,
                source,
            });
        }
    };
    Ok(PeerKeys::new(current, previous))
}

/// The keys in use, shared by the probes and the peer port. `None` only in the explicit
/// insecure mode.
#[derive(Debug, Clone)]
pub struct KeyStore(Arc<RwLock<Option<PeerKeys>>>);

impl KeyStore {
    pub fn new(keys: Option<PeerKeys>) -> KeyStore {
        KeyStore(Arc::new(RwLock::new(keys)))
    }

    pub fn get(&self) -> Option<PeerKeys> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, keys: PeerKeys) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Some(keys);
    }
}

/// Reads `dir` again every `every`; a changed pair replaces the one in use. A read that fails
/// (a Secret being replaced, a deleted file) keeps the keys in use and is logged once until a
/// read succeeds again.
pub async fn run_key_reload(dir: PathBuf, store: KeyStore, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticks.tick().await;
        let read = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || load_keys(&dir)).await
        };
        match read {
            Ok(Ok(keys)) => {
                failing = false;
                let old = store.get().map(|k| k.ids());
                if old.as_deref() != Some(keys.ids().as_str()) {
                    tracing::info!(
                        old = old.as_deref().unwrap_or("none"),
                        new = keys.ids(),
                        "peer keys reloaded (key ids, never the keys)"
                    );
                    store.set(keys);
                }
            }
            Ok(Err(err)) if !failing => {
                failing = true;
                tracing::warn!(
                    error = %crate::report(&err),
                    "cannot read the peer keys again; keeping the ones in use"
                );
            }
            Ok(Err(_)) => {}
            Err(join) => tracing::warn!(error = %join, "reading the peer keys failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_trimmed_and_previous_is_optional() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            load_keys(dir.path()),
            Err(KeyFileError::Read { .. })
        ));
        std::fs::write(dir.path().join("current"), "short\n").expect("write");
        assert!(matches!(
            load_keys(dir.path()),
            Err(KeyFileError::Invalid { .. })
        ));
        let key = "0123456789abcdef0123456789abcdef";
        std::fs::write(dir.path().join("current"), format!("{key}\n")).expect("write");
        let keys = load_keys(dir.path()).expect("keys");
        assert_eq!(
            keys.current().id(),
            PeerKey::new(key.as_bytes()).expect("key").id()
        );
        assert!(keys.previous().is_none());
        std::fs::write(dir.path().join("previous"), "").expect("write");
        assert!(load_keys(dir.path()).expect("keys").previous().is_none());
        std::fs::write(
            dir.path().join("previous"),
            "fedcba9876543210fedcba9876543210",
        )
        .expect("write");
        assert!(load_keys(dir.path()).expect("keys").previous().is_some());
    }
}

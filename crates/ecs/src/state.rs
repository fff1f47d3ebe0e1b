//! The ECS's durable state, in files replaced atomically (write a temporary file, fsync it,
//! rename it over the old one, fsync the directory), so a crash at any moment leaves either
//! the old or the new content, never a torn one:
//! - `ring.bin`: the ring metadata ([`RingFile`]);
//! - `intent.bin`: the intent log ([`IntentFile`]): the change in progress, if any, and the
//!   next change number.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use ringkv_wire::RingMetadata;
use serde::{Deserialize, Serialize};

use crate::executor::Intent;
use crate::EcsError;

/// The file holding the ECS's ring.
#[derive(Debug, Clone)]
pub struct RingFile {
    path: PathBuf,
}

impl RingFile {
    /// The ring file in `dir` (created if missing).
    pub fn in_dir(dir: &Path) -> Result<Self, EcsError> {
        fs::create_dir_all(dir).map_err(|source| EcsError::State {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: dir.join("ring.bin"),
        })
    }

    /// The persisted ring, or an empty one (version 0) if there is none yet.
    pub fn load(&self) -> Result<RingMetadata, EcsError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(RingMetadata::default())
            }
            Err(source) => {
                return Err(EcsError::State {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let corrupt = |reason: String| EcsError::CorruptState {
            path: self.path.clone(),
            reason,
        };
        RingMetadata::from_frame(&bytes).map_err(|e| corrupt(e.to_string()))
    }

    /// Replaces the persisted ring with `metadata`, durably.
    pub fn save(&self, metadata: &RingMetadata) -> Result<(), EcsError> {
        replace(&self.path, &metadata.to_frame()?)
    }
}

/// Writes `bytes` to `path` atomically and durably.
fn replace(path: &Path, bytes: &[u8]) -> Result<(), EcsError> {
    let io = |source| EcsError::State {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

/// The content of the intent log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentLog {
    /// The number the next change gets (so a retried change never reuses one).
    pub next_change: u64,
    /// The change in progress.
    pub pending: Option<Intent>,
}

/// The file holding the ECS's intent log.
#[derive(Debug, Clone)]
pub struct IntentFile {
    path: PathBuf,
}

impl IntentFile {
    /// The intent log in `dir` (which [`RingFile::in_dir`] created).
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            path: dir.join("intent.bin"),
        }
    }

    /// The persisted log, or an empty one.
    pub fn load(&self) -> Result<IntentLog, EcsError> {
        match fs::read(&self.path) {
            Ok(bytes) => postcard::from_bytes(&bytes).map_err(|e| EcsError::CorruptState {
                path: self.path.clone(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(IntentLog::default()),
            Err(source) => Err(EcsError::State {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Replaces the persisted log, durably.
    pub fn save(&self, log: &IntentLog) -> Result<(), EcsError> {
        let bytes = postcard::to_stdvec(log).map_err(|e| EcsError::CorruptState {
            path: self.path.clone(),
            reason: format!("cannot encode: {e}"),
        })?;
        replace(&self.path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringkv_wire::NodeEntry;

    #[test]
    fn save_load_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let file = RingFile::in_dir(dir.path()).unwrap();
        assert_eq!(file.load().unwrap(), RingMetadata::default());
        let md = RingMetadata::new(7, vec![NodeEntry::new("a", "h:1")]).unwrap();
        file.save(&md).unwrap();
        assert_eq!(RingFile::in_dir(dir.path()).unwrap().load().unwrap(), md);
        fs::write(dir.path().join("ring.bin"), b"\x05\x00\x00\x00junk").unwrap();
        assert!(matches!(file.load(), Err(EcsError::CorruptState { .. })));
    }

    #[test]
    fn intent_log_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        RingFile::in_dir(dir.path()).unwrap();
        let file = IntentFile::in_dir(dir.path());
        assert_eq!(file.load().unwrap(), IntentLog::default());
        let ring = RingMetadata::new(1, vec![NodeEntry::new("a", "h:1")]).unwrap();
        let plan = crate::plan::join(&ring, NodeEntry::new("b", "h:2")).unwrap();
        let log = IntentLog {
            next_change: 9,
            pending: Some(Intent {
                change: 8,
                plan,
                phase: crate::executor::Phase::Committed,
                failure: None,
                lock_sent: true,
            }),
        };
        file.save(&log).unwrap();
        assert_eq!(IntentFile::in_dir(dir.path()).load().unwrap(), log);
        fs::write(dir.path().join("intent.bin"), b"\xff\xff").unwrap();
        assert!(matches!(file.load(), Err(EcsError::CorruptState { .. })));
    }
}

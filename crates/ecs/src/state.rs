//! The ECS's durable state: its ring metadata in one file, replaced atomically (write a
//! temporary file, fsync it, rename it over the old one, fsync the directory), so a crash
//! at any moment leaves either the old or the new ring, never a torn one.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use ringkv_wire::RingMetadata;

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
        let io = |source| EcsError::State {
            path: self.path.clone(),
            source,
        };
        let frame = metadata.to_frame()?;
        let tmp = self.path.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&frame).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
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
}

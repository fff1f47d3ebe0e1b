//! Layout of a cert directory and careful file writing.
//!
//! A cert directory holds `ca.pem` + `ca.key` (the cluster CA) and `<name>.pem` + `<name>.key`
//! for every issued leaf. Certificates are world-readable; keys are mode 0600 from the moment
//! they are created (never written first and restricted afterwards). No file is ever written
//! through a symlink: new files are created with `O_EXCL | O_NOFOLLOW`, and an overwrite
//! (`force`) renames a fresh temporary file over the old name, replacing a symlink itself
//! rather than its target.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{CertError, Result};

/// File stem of the cluster CA; reserved, so no leaf can overwrite the CA.
const CA_STEM: &str = "ca";
/// Longest accepted leaf name (the X.520 upper bound for a common name).
const MAX_NAME_LEN: usize = 64;

/// Where one certificate and its private key live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    /// PEM certificate (for a leaf: leaf only; the CA is in `ca.pem`).
    pub cert: PathBuf,
    /// PEM PKCS#8 private key, mode 0600.
    pub key: PathBuf,
}

/// Paths of the cluster CA in `dir`: `ca.pem`, `ca.key`.
pub fn ca_paths(dir: &Path) -> CertPaths {
    stem_paths(dir, CA_STEM)
}

/// Paths of the leaf `name` in `dir`: `<name>.pem`, `<name>.key`.
///
/// This only joins paths; [`issue`](crate::issue) is what validates `name`.
pub fn leaf_paths(dir: &Path, name: &str) -> CertPaths {
    stem_paths(dir, name)
}

fn stem_paths(dir: &Path, stem: &str) -> CertPaths {
    CertPaths {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}.key")),
    }
}

/// Checks that `name` is a safe file stem for a leaf: 1..=64 characters of
/// `[A-Za-z0-9._-]`, not starting with `.`, and not the CA's reserved stem.
pub(crate) fn validate_name(name: &str) -> Result<()> {
    let reject = |reason| {
        Err(CertError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return reject("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return reject("longer than 64 characters");
    }
    if name.starts_with('.') {
        return reject("starts with '.'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return reject("only A-Z, a-z, 0-9, '.', '_' and '-' are allowed");
    }
    if name == CA_STEM {
        return reject("'ca' is reserved for the cluster CA");
    }
    Ok(())
}

/// Creates `dir` (and parents) if missing.
pub(crate) fn ensure_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_owned(),
        source,
    })
}

/// Without `force`, fails with [`CertError::AlreadyExists`] if the cert or key exists.
/// Checked for both files before anything is written, so a refusal writes nothing.
pub(crate) fn check_absent(paths: &CertPaths, force: bool) -> Result<()> {
    if force {
        return Ok(());
    }
    for path in [&paths.key, &paths.cert] {
        // symlink_metadata: a dangling symlink still counts as "exists" (create_new would fail).
        match fs::symlink_metadata(path) {
            Ok(_) => return Err(CertError::AlreadyExists { path: path.clone() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(CertError::Io {
                    path: path.clone(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Writes a PEM pair: the key first (mode 0600), then the certificate (mode 0644).
pub(crate) fn write_pair(
    paths: &CertPaths,
    cert_pem: &str,
    key_pem: &str,
    force: bool,
) -> Result<()> {
    write_file(&paths.key, key_pem.as_bytes(), 0o600, force)?;
    write_file(&paths.cert, cert_pem.as_bytes(), 0o644, force)
}

/// Writes `contents` to `path` with `mode`, never through a symlink.
///
/// Without `force` the file must not exist: it is created with `O_CREAT | O_EXCL | O_NOFOLLOW`,
/// so neither a concurrent writer nor a symlink planted at `path` (even a dangling one) is
/// followed; both are refused with [`CertError::AlreadyExists`].
///
/// With `force` the contents go to a fresh temporary file in the same directory (created the
/// same way, with `mode` from the start), are fsynced, and the temporary file is renamed over
/// `path`. `rename` replaces whatever entry `path` is (a file or a symlink) and never writes
/// through it, so a symlink at `path` cannot redirect a private key to its target, and a
/// reader sees the old file or the new one, never a half-written one.
fn write_file(path: &Path, contents: &[u8], mode: u32, force: bool) -> Result<()> {
    if !force {
        let file = create_exclusive(path, mode).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                CertError::AlreadyExists {
                    path: path.to_owned(),
                }
            } else {
                CertError::Io {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        return fill(file, contents, mode).map_err(|source| CertError::Io {
            path: path.to_owned(),
            source,
        });
    }
    let (tmp, file) = create_temp_beside(path, mode)?;
    let renamed = fill(file, contents, mode)
        .map_err(|source| CertError::Io {
            path: tmp.clone(),
            source,
        })
        .and_then(|()| {
            fs::rename(&tmp, path).map_err(|source| CertError::Io {
                path: path.to_owned(),
                source,
            })
        });
    if renamed.is_err() {
        // Best effort: the error already names what failed.
        let _ = fs::remove_file(&tmp);
    }
    renamed?;
    sync_parent(path)
}

/// Opens a new file at `path` with `mode`: `O_CREAT | O_EXCL | O_NOFOLLOW`. `O_EXCL` alone
/// already fails on any existing entry, symlinks included; `O_NOFOLLOW` says so explicitly.
fn create_exclusive(path: &Path, mode: u32) -> std::io::Result<fs::File> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode).custom_flags(libc::O_NOFOLLOW);
    }
    #[cfg(not(unix))]
    let _ = mode;
    options.open(path)
}

/// Creates a fresh temporary file `.<name>.tmp.<pid>.<n>` next to `path`.
fn create_temp_beside(path: &Path, mode: u32) -> Result<(PathBuf, fs::File)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let io_err = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let name = path.file_name().ok_or_else(|| {
        io_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "path has no file name",
        ))
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut last = std::io::Error::from(std::io::ErrorKind::AlreadyExists);
    // Another process (or a leftover of a crashed run) may hold a name; try a few others.
    for _ in 0..16 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp.{}.{n}", std::process::id()));
        let tmp = dir.join(tmp_name);
        match create_exclusive(&tmp, mode) {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = e,
            Err(source) => return Err(CertError::Io { path: tmp, source }),
        }
    }
    Err(io_err(last))
}

/// Sets `mode` exactly (the creation mode was masked by the umask), writes, fsyncs.
fn fill(mut file: fs::File, contents: &[u8], mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    file.write_all(contents)?;
    file.sync_all()
}

/// Fsyncs the directory holding `path`, so a rename into it survives a crash.
fn sync_parent(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| CertError::Io {
                path: dir.to_owned(),
                source,
            })?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Reads a whole file, mapping errors to [`CertError::Io`].
pub(crate) fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_safe_names() {
        for name in [
            "node1",
            "n-1.example_com",
            "A",
            "ca1",
            "x.ca",
            &"a".repeat(64),
        ] {
            validate_name(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn rejects_unsafe_names() {
        for name in [
            "",
            ".hidden",
            "..",
            "a/b",
            "../x",
            "a b",
            "ca",
            "naïve",
            "x\0",
            &"a".repeat(65),
        ] {
            assert!(
                matches!(validate_name(name), Err(CertError::InvalidName { .. })),
                "{name:?} accepted"
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn force_write_replaces_a_symlink_not_its_target() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"victim").unwrap();
        let key = dir.path().join("x.key");
        std::os::unix::fs::symlink(&victim, &key).unwrap();

        write_file(&key, b"secret", 0o600, true).unwrap();

        assert_eq!(fs::read(&victim).unwrap(), b"victim");
        let meta = fs::symlink_metadata(&key).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read(&key).unwrap(), b"secret");
        // No temporary file left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[cfg(unix)]
    #[test]
    fn plain_write_refuses_a_dangling_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("nowhere");
        let key = dir.path().join("x.key");
        std::os::unix::fs::symlink(&target, &key).unwrap();
        let err = write_file(&key, b"secret", 0o600, false).unwrap_err();
        assert!(matches!(err, CertError::AlreadyExists { .. }), "{err}");
        assert!(!target.exists());
    }

    #[test]
    fn paths() {
        let dir = Path::new("/d");
        assert_eq!(
            ca_paths(dir),
            CertPaths {
                cert: "/d/ca.pem".into(),
                key: "/d/ca.key".into()
            }
        );
        assert_eq!(leaf_paths(dir, "n1").cert, PathBuf::from("/d/n1.pem"));
        assert_eq!(leaf_paths(dir, "n1").key, PathBuf::from("/d/n1.key"));
    }
}

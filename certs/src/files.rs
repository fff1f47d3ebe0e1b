//! Layout of a cert directory and careful file writing.
//!
//! A cert directory holds `ca.pem` + `ca.key` (the cluster CA) and `<name>.pem` + `<name>.key`
//! for every issued leaf. Certificates are world-readable; keys are mode 0600 from the moment
//! they are created (never written first and restricted afterwards).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

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

/// Writes `contents` to `path`, creating it with `mode`. Without `force` the file must not
/// exist (`create_new`, so a concurrent writer cannot be clobbered either); with `force` an
/// existing file is truncated and its mode reset to `mode`.
fn write_file(path: &Path, contents: &[u8], mode: u32, force: bool) -> Result<()> {
    let io_err = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::AlreadyExists {
                path: path.to_owned(),
            }
        } else {
            io_err(source)
        }
    })?;
    // The open mode only applies to newly created files; an overwritten key may have been
    // more permissive before. Restrict it before writing the secret.
    #[cfg(unix)]
    if force {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err)?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    file.write_all(contents).map_err(io_err)?;
    file.sync_all().map_err(io_err)
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

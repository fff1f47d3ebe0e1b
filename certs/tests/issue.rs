//! Cert tool on disk: files, modes, overwrite protection, name checks, roles.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ringkv_certs::{
    ca_paths, init_ca, issue, leaf_paths, role_of_cert, CertError, Identity, IssueOptions, Role,
};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_creates_ca_with_private_key_mode_0600() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nested/certs");
    let paths = init_ca(&dir, false).unwrap();
    assert_eq!(paths, ca_paths(&dir));
    assert!(paths.cert.is_file());
    assert_eq!(mode(&paths.key), 0o600);
    let pem = std::fs::read_to_string(&paths.cert).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
}

#[test]
fn second_init_refused_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let first = init_ca(tmp.path(), false).unwrap();
    let before = std::fs::read(&first.cert).unwrap();
    let err = init_ca(tmp.path(), false).unwrap_err();
    assert!(matches!(err, CertError::AlreadyExists { .. }), "{err}");
    assert_eq!(std::fs::read(&first.cert).unwrap(), before, "CA changed");

    // With force it is replaced, and the key keeps mode 0600 even if it was loosened.
    std::fs::set_permissions(&first.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    init_ca(tmp.path(), true).unwrap();
    assert_ne!(
        std::fs::read(&first.cert).unwrap(),
        before,
        "CA not replaced"
    );
    assert_eq!(mode(&first.key), 0o600);
}

#[test]
fn init_refused_if_only_key_exists() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(ca_paths(tmp.path()).key, "precious").unwrap();
    let err = init_ca(tmp.path(), false).unwrap_err();
    assert!(matches!(err, CertError::AlreadyExists { .. }), "{err}");
    assert!(!ca_paths(tmp.path()).cert.exists(), "wrote half a CA");
}

#[test]
fn issue_every_role() {
    let tmp = tempfile::tempdir().unwrap();
    init_ca(tmp.path(), false).unwrap();
    for (role, name) in [
        (Role::Node, "node1"),
        (Role::Client, "app"),
        (Role::Admin, "ecs"),
    ] {
        let mut opts = IssueOptions::new(role, name);
        opts.sans = vec!["127.0.0.1".into(), "::1".into(), "node1.example".into()];
        let paths = issue(tmp.path(), &opts).unwrap();
        assert_eq!(paths, leaf_paths(tmp.path(), name));
        assert_eq!(mode(&paths.key), 0o600);

        let id = Identity::from_dir(tmp.path(), name).unwrap();
        assert_eq!(id.ca.len(), 1);
        assert_eq!(id.chain.len(), 1);
        assert_eq!(id.role().unwrap(), role);
        assert_eq!(role_of_cert(&id.chain[0]).unwrap(), role);
        // The CA itself carries no role.
        assert!(matches!(role_of_cert(&id.ca[0]), Err(CertError::NoRole)));
        // Loading via explicit paths gives the same identity.
        let ca = ca_paths(tmp.path());
        let again = Identity::load(&ca.cert, &paths.cert, &paths.key).unwrap();
        assert_eq!(again.chain, id.chain);
        assert_eq!(again.clone().key.secret_der(), id.key.secret_der());
    }
}

#[test]
fn reissue_refused_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    init_ca(tmp.path(), false).unwrap();
    let mut opts = IssueOptions::new(Role::Client, "app");
    issue(tmp.path(), &opts).unwrap();
    let err = issue(tmp.path(), &opts).unwrap_err();
    assert!(matches!(err, CertError::AlreadyExists { .. }), "{err}");
    opts.force = true;
    issue(tmp.path(), &opts).unwrap();
}

#[test]
fn issue_rejects_bad_names_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    init_ca(tmp.path(), false).unwrap();
    for name in ["", ".hidden", "../escape", "a/b", "with space", "ca"] {
        let mut opts = IssueOptions::new(Role::Node, name);
        opts.force = true;
        let err = issue(tmp.path(), &opts).unwrap_err();
        assert!(
            matches!(err, CertError::InvalidName { .. }),
            "{name:?}: {err}"
        );
    }
    let mut entries: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    entries.sort();
    assert_eq!(entries, ["ca.key", "ca.pem"]);
    assert!(!tmp.path().parent().unwrap().join("escape.pem").exists());
}

#[test]
fn issue_rejects_bad_san_and_empty_validity() {
    let tmp = tempfile::tempdir().unwrap();
    init_ca(tmp.path(), false).unwrap();
    let mut opts = IssueOptions::new(Role::Node, "n1");
    opts.sans = vec!["not a hostname".into()];
    assert!(matches!(
        issue(tmp.path(), &opts),
        Err(CertError::InvalidSan { .. })
    ));
    let mut opts = IssueOptions::new(Role::Node, "n1");
    opts.not_after = opts.not_before;
    assert!(matches!(
        issue(tmp.path(), &opts),
        Err(CertError::InvalidValidity { .. })
    ));
}

#[test]
fn issue_without_ca_is_io_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = issue(tmp.path(), &IssueOptions::new(Role::Client, "app")).unwrap_err();
    assert!(matches!(err, CertError::Io { .. }), "{err}");
}

#[test]
fn issue_with_foreign_ca_key_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    init_ca(tmp.path(), false).unwrap();
    init_ca(other.path(), false).unwrap();
    std::fs::copy(ca_paths(other.path()).key, ca_paths(tmp.path()).key).unwrap();
    let err = issue(tmp.path(), &IssueOptions::new(Role::Client, "app")).unwrap_err();
    assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");
}

#[test]
fn load_reports_missing_and_malformed_files() {
    let tmp = tempfile::tempdir().unwrap();
    init_ca(tmp.path(), false).unwrap();
    issue(tmp.path(), &IssueOptions::new(Role::Client, "app")).unwrap();
    assert!(matches!(
        Identity::from_dir(tmp.path(), "nobody"),
        Err(CertError::Io { .. })
    ));
    let paths = leaf_paths(tmp.path(), "app");
    std::fs::write(&paths.key, "not a key").unwrap();
    assert!(matches!(
        Identity::from_dir(tmp.path(), "app"),
        Err(CertError::BadPem { .. })
    ));
}

/// A victim file outside the cert directory, and its contents and mode.
fn victim(dir: &Path, name: &str) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join(name);
    let contents = format!("precious data of {name}\n").into_bytes();
    std::fs::write(&path, &contents).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    (path, contents)
}

/// `path` is a regular file (not a symlink) with `mode`.
fn assert_regular_file(path: &Path, want_mode: u32) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    assert!(
        meta.file_type().is_file(),
        "{} is {:?}",
        path.display(),
        meta.file_type()
    );
    assert_eq!(
        meta.permissions().mode() & 0o777,
        want_mode,
        "{}",
        path.display()
    );
}

/// Only `expected` entries are in `dir` (no temporary file left behind).
fn assert_entries(dir: &Path, expected: &[&str]) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    entries.sort();
    assert_eq!(entries, expected);
}

#[test]
fn issue_force_replaces_symlinks_never_their_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    init_ca(tmp.path(), false).unwrap();
    let (key_victim, key_before) = victim(elsewhere.path(), "victim-key");
    let (cert_victim, cert_before) = victim(elsewhere.path(), "victim-cert");
    let paths = leaf_paths(tmp.path(), "app");
    std::os::unix::fs::symlink(&key_victim, &paths.key).unwrap();
    std::os::unix::fs::symlink(&cert_victim, &paths.cert).unwrap();

    let mut opts = IssueOptions::new(Role::Client, "app");
    opts.force = true;
    issue(tmp.path(), &opts).unwrap();

    assert_eq!(
        std::fs::read(&key_victim).unwrap(),
        key_before,
        "key victim overwritten"
    );
    assert_eq!(
        std::fs::read(&cert_victim).unwrap(),
        cert_before,
        "cert victim overwritten"
    );
    assert_eq!(mode(&key_victim), 0o644, "key victim's mode changed");
    assert_regular_file(&paths.key, 0o600);
    assert_regular_file(&paths.cert, 0o644);
    assert_eq!(
        Identity::from_dir(tmp.path(), "app")
            .unwrap()
            .role()
            .unwrap(),
        Role::Client
    );
    assert_entries(tmp.path(), &["app.key", "app.pem", "ca.key", "ca.pem"]);
}

#[test]
fn init_force_replaces_symlinked_ca_key_never_its_target() {
    let tmp = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let (victim_path, before) = victim(elsewhere.path(), "victim");
    let paths = ca_paths(tmp.path());
    std::os::unix::fs::symlink(&victim_path, &paths.key).unwrap();

    init_ca(tmp.path(), true).unwrap();

    assert_eq!(
        std::fs::read(&victim_path).unwrap(),
        before,
        "victim overwritten"
    );
    assert_regular_file(&paths.key, 0o600);
    assert_regular_file(&paths.cert, 0o644);
    // The new CA works: it can issue.
    issue(tmp.path(), &IssueOptions::new(Role::Node, "n1")).unwrap();
    assert_entries(tmp.path(), &["ca.key", "ca.pem", "n1.key", "n1.pem"]);
}

#[test]
fn symlinks_refused_without_force_dangling_or_not() {
    let tmp = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    init_ca(tmp.path(), false).unwrap();
    let (victim_path, before) = victim(elsewhere.path(), "victim");
    let dangling = elsewhere.path().join("does-not-exist");
    for (name, target) in [("live", &victim_path), ("dangling", &dangling)] {
        let paths = leaf_paths(tmp.path(), name);
        std::os::unix::fs::symlink(target, &paths.key).unwrap();
        let err = issue(tmp.path(), &IssueOptions::new(Role::Client, name)).unwrap_err();
        assert!(
            matches!(err, CertError::AlreadyExists { .. }),
            "{name}: {err}"
        );
        assert!(!paths.cert.exists(), "{name}: wrote half a pair");
    }
    assert_eq!(std::fs::read(&victim_path).unwrap(), before);
    assert!(!dangling.exists(), "created the dangling symlink's target");

    // The same for the CA.
    let fresh = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&dangling, ca_paths(fresh.path()).key).unwrap();
    let err = init_ca(fresh.path(), false).unwrap_err();
    assert!(matches!(err, CertError::AlreadyExists { .. }), "{err}");
    assert!(!dangling.exists(), "created the dangling symlink's target");
}

//! The command-line tools as a user runs them: `ringkv-certs` makes the certificates, a
//! spawned `ringkv-node` serves, `ringkv` one-shot commands talk to it.

mod common;

use std::process::Command;

use common::{bin, free_port};

fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("run command");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn cert_tool_node_and_cli_one_shot_commands() {
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("certs");
    let certs_tool = |args: &[&str]| {
        let mut c = Command::new(bin("ringkv-certs"));
        c.args(args).arg("--dir").arg(&certs_dir);
        run(&mut c)
    };
    let (code, out, err) = certs_tool(&["init"]);
    assert_eq!(code, 0, "{out}{err}");
    // No silent overwrite.
    let (code, _, err) = certs_tool(&["init"]);
    assert_ne!(code, 0);
    assert!(err.contains("exists") || err.contains("force"), "{err}");
    // The ecs certificate signs the standalone node's one-node ring.
    for (role, name) in [("node", "n1"), ("client", "client"), ("ecs", "ecs")] {
        let mut args = vec!["issue", "--role", role, "--name", name];
        if role == "node" {
            args.extend(["--san", "127.0.0.1"]);
        }
        let (code, out, err) = certs_tool(&args);
        assert_eq!(code, 0, "{out}{err}");
    }

    // This node runs on the tool's own certificates.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let data = dir.path().join("data");
    let mut node = KillOnDrop(Some(
        std::process::Command::new(bin("ringkv-node"))
            .args(["--name", "n1", "--listen", &addr.to_string(), "--start"])
            .arg("--data-dir")
            .arg(&data)
            .arg("--certs")
            .arg(&certs_dir)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    ));

    let cli = |args: &[&str]| {
        let mut c = Command::new(bin("ringkv"));
        c.arg("--seed")
            .arg(addr.to_string())
            .arg("--certs")
            .arg(&certs_dir)
            .args(["--timeout", "5"])
            .args(args);
        run(&mut c)
    };
    // Wait until the node answers.
    let mut ready = false;
    for _ in 0..100 {
        if cli(&["get", "probe"]).0 == 1 {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ready, "node never answered");

    assert_eq!(
        cli(&["put", "greeting", "hello world"]),
        (0, "OK created\n".into(), String::new())
    );
    assert_eq!(
        cli(&["put", "greeting", "hello again"]),
        (0, "OK updated\n".into(), String::new())
    );
    assert_eq!(
        cli(&["get", "greeting"]),
        (0, "hello again\n".into(), String::new())
    );
    let (code, out, _) = cli(&["ring"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("ring version 1, 1 nodes, 16 partitions, 1 copies of every key\n"),
        "{out}"
    );
    assert!(out.contains(&addr.to_string()), "{out}");
    // The lone node heads, ends and holds every partition.
    assert!(out.contains("16 (100%)   16 (100%)   16 (100%)"), "{out}");
    assert_eq!(
        cli(&["delete", "greeting"]),
        (0, "OK deleted\n".into(), String::new())
    );
    let (code, out, err) = cli(&["get", "greeting"]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.contains("not found: greeting"), "{err}");
    let (code, _, err) = cli(&["put", "", "x"]);
    assert_ne!(code, 0);
    assert!(err.contains("key is empty"), "{err}");

    // Conditional writes: "OK version N", or exit code 2 with the key's version.
    let (code, out, err) = cli(&["put", "cas", "one", "--if-absent"]);
    assert_eq!(code, 0, "{out}{err}");
    let version: u64 = out
        .trim()
        .strip_prefix("OK version ")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    let (code, out, err) = cli(&["put", "cas", "two", "--if-absent"]);
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(
        err.contains(&format!("conflict: the key's version is {version}")),
        "{err}"
    );
    assert_eq!(
        cli(&["get", "cas", "--with-version"]),
        (0, format!("{version} one\n"), String::new())
    );
    let (code, out, err) = cli(&["put", "cas", "two", "--if-version", &version.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("OK version "), "{out}");
    let (code, _, err) = cli(&["delete", "cas", "--if-version", &version.to_string()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("conflict"), "{err}");
    assert_eq!(cli(&["get", "cas"]), (0, "two\n".into(), String::new()));

    // Expiry: a put with --ttl is served until its TTL, then not found.
    let sent = std::time::Instant::now();
    assert_eq!(
        cli(&["put", "session", "s1", "--ttl", "1500ms"]),
        (0, "OK created\n".into(), String::new())
    );
    let (code, out, _) = cli(&["get", "session"]);
    if sent.elapsed() < std::time::Duration::from_millis(1500) {
        assert_eq!((code, out.as_str()), (0, "s1\n"));
    }
    let (code, out, _) = cli(&["put", "lock", "me", "--if-absent", "--ttl", "1h"]);
    assert_eq!(code, 0, "{out}");
    let (code, _, err) = cli(&["put", "session", "x", "--ttl", "soon"]);
    assert_ne!(code, 0);
    assert!(err.contains("bad duration \"soon\""), "{err}");
    tokio::time::sleep(std::time::Duration::from_millis(1600).saturating_sub(sent.elapsed())).await;
    let (code, _, err) = cli(&["get", "session"]);
    assert_eq!(code, 1, "expired: {err}");
    assert!(err.contains("not found: session"), "{err}");
    assert_eq!(cli(&["get", "lock"]), (0, "me\n".into(), String::new()));

    // Large and binary values: a 4 MiB file (the value limit) of every byte value, in and
    // out byte for byte; the same through stdin; one byte more is refused, clearly.
    let big: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(7) ^ (i >> 12)) as u8)
        .collect();
    let (file_in, file_out) = (dir.path().join("in.bin"), dir.path().join("out.bin"));
    std::fs::write(&file_in, &big).unwrap();
    let file_arg = file_in.to_str().unwrap();
    assert_eq!(
        cli(&["put", "big", "--file", file_arg]),
        (0, "OK created\n".into(), String::new())
    );
    let (code, out, err) = cli(&["get", "big", "--out", file_out.to_str().unwrap()]);
    assert_eq!((code, out.as_str(), err.as_str()), (0, "", ""));
    assert!(
        std::fs::read(&file_out).unwrap() == big,
        "4 MiB round trip differs"
    );
    let mut put = Command::new(bin("ringkv"));
    put.arg("--seed")
        .arg(addr.to_string())
        .arg("--certs")
        .arg(&certs_dir)
        .args(["put", "from-stdin", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = put.spawn().unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&big[..100_000])
            .unwrap();
    }
    assert!(child.wait_with_output().unwrap().status.success());
    let (code, _, _) = cli(&["get", "from-stdin", "--out", file_out.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(std::fs::read(&file_out).unwrap() == big[..100_000]);
    let mut over = big.clone();
    over.push(0);
    std::fs::write(&file_in, &over).unwrap();
    let (code, _, err) = cli(&["put", "big", "--file", file_arg]);
    assert_ne!(code, 0);
    assert!(
        err.contains("exceeds the maximum of 4194304 bytes"),
        "{err}"
    );

    // Batches: one line per key, in order.
    assert_eq!(
        cli(&["mput", "m1", "one", "m2", "two"]),
        (0, "m1: OK created\nm2: OK created\n".into(), String::new())
    );
    assert_eq!(
        cli(&["mget", "m1", "nope", "m2"]),
        (0, "one\n(nil)\ntwo\n".into(), String::new())
    );
    assert_eq!(
        cli(&["mdelete", "m1", "nope"]),
        (0, "m1: deleted\nnope: not found\n".into(), String::new())
    );

    // Scans: every key of a prefix, one per line (hash order: compared as sets); with values;
    // one page from a cursor, the next cursor on stderr.
    assert_eq!(cli(&["mput", "s:a", "1", "s:b", "2", "s:c", "3"]).0, 0);
    let (code, out, err) = cli(&["scan", "s:"]);
    assert_eq!((code, err.as_str()), (0, ""));
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(lines, ["s:a", "s:b", "s:c"]);
    let (code, out, _) = cli(&["scan", "s:", "--values"]);
    assert_eq!(code, 0);
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(lines, ["s:a 1", "s:b 2", "s:c 3"]);
    let (code, out, err) = cli(&["scan", "s:", "--count", "1", "--cursor", "0"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().count() <= 1, "{out}");
    let next = err
        .trim()
        .strip_prefix("next cursor: ")
        .unwrap_or_else(|| panic!("{err}"));
    let (code, out, err) = cli(&["scan", "s:", "--cursor", next]);
    assert_eq!((code, err.as_str()), (0, "end of scan\n"), "{out}");
    let (code, _, err) = cli(&["scan", "--count", "5000"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("a scan page holds 1 to 1024 keys, not 5000"),
        "{err}"
    );

    // The interactive shell, driven through stdin.
    use std::io::Write;
    let mut shell = Command::new(bin("ringkv"))
        .arg("--seed")
        .arg(addr.to_string())
        .arg("--certs")
        .arg(&certs_dir)
        .arg("shell")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    shell
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"get k\nconnect\nput k two words\nget k\ndelete k\nget k\ncas c absent first\ncas c absent again\nversion c\nsetex t 1h ticket\nget t\nsetex t soon x\nscan s:\nbogus\ndisconnect\nquit\n",
        )
        .unwrap();
    let out = shell.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "error: not connected",
        "connected: ring version 1, 1 nodes",
        "OK created",
        "two words",
        "OK deleted",
        "not found: k",
        "OK version ",
        "conflict: the key's version is ",
        "ticket",
        "error: bad duration \"soon\"",
        "(3 keys)",
        "error: unknown command 'bogus'",
        "disconnected",
        "bye",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }

    let mut node = node.0.take().unwrap();
    unsafe {
        libc::kill(node.id() as i32, libc::SIGTERM);
    }
    let status = node.wait().unwrap();
    assert!(status.success(), "node exited with {status}");
}

/// A child process killed if the test fails before it ends it (an orphaned node would hold
/// the test's output pipe open).
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

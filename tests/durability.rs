//! Acknowledged writes survive SIGKILL of the node process (real `ringkv-node` binary).

mod common;

use std::sync::Arc;

use common::{free_port, Certs, NodeProcess};

#[tokio::test]
async fn acknowledged_keys_survive_sigkill_and_restart() {
    let certs = Certs::new();
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut node = NodeProcess::spawn(&certs, "n1", addr, data.path()).await;

    let store = certs.client(vec![node.addr.clone()]).await;
    let n = 2000u32;
    for i in 0..n {
        store
            .put(
                format!("key-{i}").as_bytes(),
                format!("value-{i}").as_bytes(),
            )
            .await
            .unwrap();
    }
    store.delete(b"key-0").await.unwrap();
    store.disconnect().await;
    node.kill(); // SIGKILL right after the last acknowledgement

    let node = NodeProcess::spawn(&certs, "n1", addr, data.path()).await;
    let store = certs.client(vec![node.addr.clone()]).await;
    assert_eq!(store.get(b"key-0").await.unwrap(), None);
    for i in 1..n {
        let got = store.get(format!("key-{i}").as_bytes()).await.unwrap();
        assert_eq!(got, Some(format!("value-{i}").into_bytes()), "key-{i} lost");
    }
}

/// Many writers share fsyncs (group commit); killing the node while they write loses none
/// of the writes it acknowledged.
#[tokio::test]
async fn group_committed_writes_survive_sigkill_mid_load() {
    let certs = Arc::new(Certs::new());
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut node = NodeProcess::spawn(&certs, "n1", addr, data.path()).await;

    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel::<(u32, u32)>();
    let mut writers = Vec::new();
    for w in 0..32u32 {
        let certs = certs.clone();
        let seeds = vec![node.addr.clone()];
        let acked = acked_tx.clone();
        writers.push(tokio::spawn(async move {
            let mut config = certs.client_config(seeds);
            config.retry.deadline = std::time::Duration::from_millis(500);
            let store = kvstore::KvStore::connect(config).await.unwrap();
            for i in 0u32.. {
                let key = format!("w{w}-{i}");
                match store.put(key.as_bytes(), &i.to_le_bytes()).await {
                    Ok(_) => acked.send((w, i)).unwrap(),
                    Err(_) => break, // the node is gone
                }
            }
        }));
    }
    drop(acked_tx);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    node.kill();
    for w in writers {
        w.await.unwrap();
    }
    let mut acked = Vec::new();
    while let Some(a) = acked_rx.recv().await {
        acked.push(a);
    }
    assert!(
        acked.len() > 100,
        "only {} writes acknowledged",
        acked.len()
    );

    let node = NodeProcess::spawn(&certs, "n1", addr, data.path()).await;
    let store = certs.client(vec![node.addr.clone()]).await;
    for (w, i) in &acked {
        let got = store.get(format!("w{w}-{i}").as_bytes()).await.unwrap();
        assert_eq!(
            got,
            Some(i.to_le_bytes().to_vec()),
            "acknowledged w{w}-{i} lost"
        );
    }
    println!(
        "{} acknowledged writes from 32 writers all survived SIGKILL",
        acked.len()
    );
}

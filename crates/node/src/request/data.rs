//! The client data path: `Get`, `Put`, `Delete`.

use ringkv_wire::{HashedKey, ReplyBody, WireError};

use super::{error, storage_error};
use crate::node::WriteAdmission;
use crate::Node;

fn invalid(e: WireError) -> ReplyBody {
    error(e.kind(), e.to_string())
}

/// Checks everything a read needs: running, a valid key, ownership.
fn admit(node: &Node, key: &HashedKey<'_>) -> Result<(), ReplyBody> {
    if !node.is_running() {
        return Err(ReplyBody::Stopped);
    }
    node.config.limits.check_key(key.key).map_err(invalid)?;
    node.check_owner(&key.position)
}

/// `Get`: served even while the key's range is write-locked.
pub fn get(node: &Node, key: &[u8]) -> ReplyBody {
    let key = HashedKey::new(key);
    if let Err(reply) = admit(node, &key) {
        return reply;
    }
    match node.store.get_hashed(&key) {
        Ok(Some(v)) => ReplyBody::Value(v),
        Ok(None) => ReplyBody::NotFound,
        Err(e) => storage_error(e),
    }
}

/// Runs a write under the write gate's read guard (see [`Node`]'s invariant): ownership and
/// write locks are checked, then the write is made durable, before the guard is released.
async fn write<F, Fut>(node: &Node, key: &HashedKey<'_>, apply: F) -> ReplyBody
where
    F: FnOnce(WriteAdmission) -> Fut,
    Fut: std::future::Future<Output = ReplyBody>,
{
    if let Err(reply) = admit(node, key) {
        return reply;
    }
    let admitted = node.admit_write().await;
    // Ownership may have changed while we waited for the guard.
    if let Err(reply) = node.check_owner(&key.position) {
        return reply;
    }
    {
        let mut moves = node.moves();
        if moves.is_locked(&key.position) {
            return ReplyBody::WriteLocked;
        }
        moves.track(key);
    }
    // The admission travels with the write to the storage writer, which releases it once
    // the write is durable, even if this handler is cancelled meanwhile.
    apply(admitted).await
}

/// `Put`: acknowledged once durable.
pub async fn put(node: &Node, key: &[u8], value: &[u8]) -> ReplyBody {
    if let Err(e) = node.config.limits.check_put(key, value) {
        return invalid(e);
    }
    let key = HashedKey::new(key);
    write(node, &key, |admitted| async {
        match node.store.put_hashed(&key, value, Some(admitted)).await {
            Ok(created) => ReplyBody::PutOk { created },
            Err(e) => storage_error(e),
        }
    })
    .await
}

/// `Delete`: acknowledged once durable.
pub async fn delete(node: &Node, key: &[u8]) -> ReplyBody {
    let key = HashedKey::new(key);
    write(node, &key, |admitted| async {
        match node.store.delete_hashed(&key, Some(admitted)).await {
            Ok(true) => ReplyBody::Deleted,
            Ok(false) => ReplyBody::NotFound,
            Err(e) => storage_error(e),
        }
    })
    .await
}

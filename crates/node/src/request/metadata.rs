//! `GetMetadata` and `InstallMetadata`.

use ringkv_wire::{ReplyBody, SignedMetadata};

use super::{error, storage_error};
use crate::node::InstallError;
use crate::Node;

/// `GetMetadata`: answered whether or not the node is running, with the metadata as the ECS
/// signed it.
pub fn get(node: &Node) -> ReplyBody {
    ReplyBody::Metadata(node.view().signed.clone())
}

/// `InstallMetadata`: refused (and counted) unless the ECS signed it and it is a valid ring;
/// adopted only if newer. The reply says whether it was adopted, and its version what the
/// node now holds.
pub async fn install(node: &Node, metadata: SignedMetadata) -> ReplyBody {
    match node.install_from_ecs(metadata).await {
        Ok(adopted) => ReplyBody::Installed { adopted },
        Err(e) => install_error(e),
    }
}

/// The reply to metadata that was not installed.
pub(crate) fn install_error(e: InstallError) -> ReplyBody {
    match e {
        InstallError::Refused(e) => error(e.kind(), e.to_string()),
        InstallError::Storage(e) => storage_error(e),
    }
}

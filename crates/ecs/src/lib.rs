//! `ringkv-ecs`: the External Configuration Service (membership, join/leave orchestration,
//! metadata publishing). Being built; see the ring/ECS issue.
#![warn(missing_docs)]

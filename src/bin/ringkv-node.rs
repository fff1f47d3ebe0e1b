//! `ringkv-node`: the storage node (see `ringkv::cli::node`).

/// mimalloc: glibc's allocator took about a tenth of a node's CPU under write load
/// (ARCHITECTURE.md §9).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() -> anyhow::Result<()> {
    ringkv::cli::node::main()
}

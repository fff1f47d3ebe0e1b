//! `ringkv-node`: the storage node (see `ringkv::cli::node`).
fn main() -> anyhow::Result<()> {
    ringkv::cli::node::main()
}

//! `ringkv-node`: the storage node (see `ringkv_node::cli`).
fn main() -> anyhow::Result<()> {
    ringkv_node::cli::main()
}

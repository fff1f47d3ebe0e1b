fn main() -> anyhow::Result<()> {
    ringkv_certs::cli::main()
}

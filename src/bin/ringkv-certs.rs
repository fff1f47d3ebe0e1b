//! `ringkv-certs`: the certificate tool (see `ringkv::cli::certs`).
fn main() -> anyhow::Result<()> {
    ringkv::cli::certs::main()
}

//! `ringkv`: the command-line client (see `ringkv::cli::client`).
fn main() -> anyhow::Result<std::process::ExitCode> {
    let code = ringkv::cli::client::main()?;
    Ok(std::process::ExitCode::from(code as u8))
}

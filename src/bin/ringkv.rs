//! `ringkv`: the command-line client (see `kvstore::cli`).
fn main() -> anyhow::Result<std::process::ExitCode> {
    let code = kvstore::cli::main()?;
    Ok(std::process::ExitCode::from(code as u8))
}

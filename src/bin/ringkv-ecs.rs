//! `ringkv-ecs`: the External Configuration Service and its operator commands (see
//! `ringkv_ecs::cli`).
fn main() -> anyhow::Result<std::process::ExitCode> {
    let code = ringkv_ecs::cli::main()?;
    Ok(std::process::ExitCode::from(code as u8))
}

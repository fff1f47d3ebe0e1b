//! `ringkv-ecs`: the External Configuration Service and its operator commands (see
//! `ringkv::cli::ecs`).
fn main() -> anyhow::Result<std::process::ExitCode> {
    let code = ringkv::cli::ecs::main()?;
    Ok(std::process::ExitCode::from(code as u8))
}

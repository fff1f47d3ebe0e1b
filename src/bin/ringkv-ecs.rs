//! `ringkv-ecs`: the External Configuration Service and its operator commands (see
//! `ringkv::cli::ecs`).

/// mimalloc: glibc's allocator took about a tenth of a node's CPU under write load
/// (ARCHITECTURE.md §9).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() -> anyhow::Result<std::process::ExitCode> {
    let code = ringkv::cli::ecs::main()?;
    Ok(std::process::ExitCode::from(code as u8))
}

//! What a binary was built from, for `switchyard_build_info` and `--version`.

/// The workspace version (Cargo.toml).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit the binaries were built from (`SWITCHYARD_GIT_COMMIT` at build time, else
/// `git rev-parse HEAD`), or "unknown".
pub const GIT_COMMIT: &str = env!("SWITCHYARD_GIT_COMMIT");

//! Records the git commit the binaries are built from, for `switchyard_build_info`: the
//! environment's `SWITCHYARD_GIT_COMMIT` when set (packagers building outside a checkout), else
//! `git rev-parse HEAD`, else "unknown".

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=SWITCHYARD_GIT_COMMIT");
    let commit = std::env::var("SWITCHYARD_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .filter(|c| c.chars().all(|ch| ch.is_ascii_alphanumeric()) && !c.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    // Read again after a checkout (HEAD names another branch). Not after each commit: that
    // would rebuild every crate of the workspace at every commit; a clean build (CI, a
    // release) always reads the current commit.
    if std::path::Path::new("../.git/HEAD").exists() {
        println!("cargo:rerun-if-changed=../.git/HEAD");
    }
    println!("cargo:rustc-env=SWITCHYARD_GIT_COMMIT={commit}");
}

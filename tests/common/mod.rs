#![allow(dead_code)]
//! Shared test support: an in-process S3 server and a tree of databases.

pub mod fleet;
pub mod generations;
pub mod s3;
pub mod stores;

use std::path::Path;
use std::process::{Command, Output};

/// Runs the `litefleet` binary in `dir` with `args` (info logging, state
/// under `dir/state`, no config from the environment).
pub fn litefleet(dir: &Path, args: &[&str]) -> Output {
    litefleet_env(dir, args, &[])
}

/// [`litefleet`] with extra environment variables (e.g. for `${VAR}` in a config).
pub fn litefleet_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    litefleet_command(dir, args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// The command [`litefleet`] runs, for a test that sets more (a user id).
pub fn litefleet_command(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_litefleet"));
    cmd.current_dir(dir)
        .args(args)
        .env_remove("LITEFLEET_CONFIG")
        .env("LITEFLEET_LOG", "info")
        .env("XDG_STATE_HOME", dir.join("state"));
    cmd
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file below `dir` (none if it does not exist).
pub fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk_files(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

pub fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

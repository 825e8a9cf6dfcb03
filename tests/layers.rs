//! The source tree's layering (README "Architecture", `src/lib.rs` Layout):
//! each stage folder may use only the stages below it, so dependencies point
//! one way, from the command line down to storage, and no import circle can
//! form between stages. Reads every `src/**/*.rs` and fails naming the file,
//! the line and the upward reference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Stages from the bottom up, each with what it may use besides itself.
/// `stats` and `error` are shared vocabulary below every stage;
/// `rfc3339` is a serde helper for times in replica metadata; `durable` is
/// the one place that calls `fsync`, for the replica, the state file and
/// restores alike.
fn allowed() -> BTreeMap<&'static str, &'static [&'static str]> {
    BTreeMap::from([
        ("error", &[][..]),
        ("rfc3339", &[][..]),
        ("stats", &[][..]),
        ("durable", &[][..]),
        ("replica", &["error", "rfc3339", "durable"][..]),
        ("source", &["error", "replica", "durable"][..]),
        ("capture", &["error", "stats", "replica", "source"][..]),
        (
            "restore",
            &["error", "replica", "source", "capture", "durable"][..],
        ),
        (
            "daemon",
            &["error", "stats", "replica", "source", "capture"][..],
        ),
        (
            "cli",
            &[
                "error", "stats", "replica", "source", "capture", "restore", "daemon",
            ][..],
        ),
        (
            "lib",
            &[
                "error", "stats", "replica", "source", "capture", "restore", "daemon", "cli",
                "durable",
            ][..],
        ),
        ("main", &[][..]),
    ])
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The stage a file belongs to: its folder under `src/`, or its stem.
fn stage(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The top-level names a line uses through `crate::`: `crate::a::b` gives
/// `a`; `crate::{a::x, b}` gives `a` and `b`.
fn crate_refs(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item_start = true;
            let mut name = String::new();
            for c in group.chars() {
                if item_start && (c.is_ascii_alphanumeric() || c == '_') {
                    name.push(c);
                    continue;
                }
                if !name.is_empty() {
                    out.push(std::mem::take(&mut name));
                    item_start = false;
                }
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    _ => {}
                }
            }
            if !name.is_empty() {
                out.push(name);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            out.push(name);
        }
    }
    out
}

#[test]
fn stages_only_use_the_stages_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let allowed = allowed();
    let stages: Vec<&str> = allowed.keys().copied().collect();
    let mut problems = Vec::new();
    for file in &files {
        let me = stage(&src, file);
        let Some(ok) = allowed.get(me.as_str()) else {
            problems.push(format!("{}: not in a known stage", file.display()));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        // Whole `use` statements, which may span lines; comments skipped.
        let code: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim_start().starts_with("//"))
            .collect();
        let mut i = 0;
        while i < code.len() {
            let (n, line) = code[i];
            let mut stmt = line.to_string();
            if line.trim_start().starts_with("use crate::{")
                || line.trim_start().starts_with("pub use crate::{")
            {
                while !stmt.contains(';') && i + 1 < code.len() {
                    i += 1;
                    stmt.push_str(code[i].1);
                }
            }
            for name in crate_refs(&stmt) {
                let used = name.as_str();
                if used == me || !stages.contains(&used) || ok.contains(&used) {
                    continue;
                }
                problems.push(format!(
                    "{}:{}: stage `{me}` uses `crate::{used}`, which is not below it",
                    file.display(),
                    n + 1
                ));
            }
            i += 1;
        }
    }
    assert!(files.len() > 20, "read the source tree");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_reference_scanner_sees_grouped_and_nested_uses() {
    assert_eq!(crate_refs("use crate::replica::hot::Plan;"), ["replica"]);
    assert_eq!(
        crate_refs("use crate::{daemon::x, Error, capture::{a, b}};"),
        ["daemon", "Error", "capture"]
    );
    assert_eq!(
        crate_refs("let x = crate::cli::f(crate::stats::g());"),
        ["cli", "stats"]
    );
}

//! Storage layout: where each database's objects live in the replica.
//!
//! ```text
//! <prefix>/<key>/<stem>-YYYYMMDD-HH0000.db.lz4
//! ```
//!
//! * `<prefix>` is the path part of the replica URL (`s3://bucket/<prefix>`).
//! * `<key>` is the key template rendered with the values bound by the
//!   pattern's `*` levels, e.g. `{{project}}/{{database}}/{{branch}}/{{tenant}}`
//!   gives `p1/orders/main/acme`. The key identifies one database; `restore`
//!   and `list` speak in keys.
//! * `<stem>` is the database file name without its extension, and the time
//!   is the *next* full hour (UTC) after the snapshot was taken. Every upload
//!   within an hour overwrites the same object, so a database costs at most one
//!   stored object per hour however often it changes, and retention can work
//!   from names alone.
//!
//! Template variables are bound by position: the first distinct `{{name}}` in
//! the template binds the first `*` level of the pattern, the second the
//! second, and so on. Every `*` level must be bound, so two databases can never
//! share a key.

use chrono::{DateTime, Duration as ChronoDuration, NaiveDateTime, TimeZone, Timelike, Utc};
use object_store::path::Path as ObjPath;

use crate::source::discover::Pattern;

/// Suffix of cold-tier snapshot objects.
pub const SNAPSHOT_SUFFIX: &str = ".db.lz4";
/// `-YYYYMMDD-HH0000` between the stem and the suffix.
const TIME_FORMAT: &str = "%Y%m%d-%H%M%S";
const TIME_LEN: usize = 15;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Var(usize),
    /// The database file stem: only in the default template of a wildcard-free pattern.
    Stem,
}

/// A parsed key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    parts: Vec<Part>,
    names: Vec<String>,
}

impl KeyTemplate {
    /// Parses `{{name}}` placeholders; names bind wildcard levels by first appearance.
    pub fn parse(s: &str) -> Result<KeyTemplate, String> {
        let mut parts = Vec::new();
        let mut names: Vec<String> = Vec::new();
        let mut rest = s;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Lit(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| format!("unclosed `{{{{` in {s:?}"))?;
            let name = after[..end].trim();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(format!("bad variable name {name:?} in {s:?}"));
            }
            let idx = match names.iter().position(|n| n == name) {
                Some(i) => i,
                None => {
                    names.push(name.to_string());
                    names.len() - 1
                }
            };
            parts.push(Part::Var(idx));
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        if parts.is_empty() {
            return Err("empty template".into());
        }
        Ok(KeyTemplate { parts, names })
    }

    /// The template used when `replica.path` is not set: the bound values joined by `/`,
    /// or the file stem for a pattern without wildcards.
    pub fn default_for(wildcards: usize) -> KeyTemplate {
        if wildcards == 0 {
            return KeyTemplate {
                parts: vec![Part::Stem],
                names: vec![],
            };
        }
        let mut parts = Vec::new();
        for i in 0..wildcards {
            if i > 0 {
                parts.push(Part::Lit("/".into()));
            }
            parts.push(Part::Var(i));
        }
        KeyTemplate {
            parts,
            names: (1..=wildcards).map(|i| format!("${i}")).collect(),
        }
    }

    /// Checks that the template binds exactly the pattern's wildcard levels.
    pub fn check_binds(&self, pattern: &Pattern) -> Result<(), String> {
        let w = pattern.wildcards();
        if self.names.len() > w {
            return Err(format!(
                "template variable {{{{{}}}}} has no matching `*` segment: the pattern has {w}",
                self.names[w]
            ));
        }
        if self.names.len() < w && !self.parts.contains(&Part::Stem) {
            let n = self.names.len();
            return Err(format!(
                "`*` segment {} ({:?}) of the pattern is not bound by a template variable; \
                 bind every segment so each database gets its own key",
                n + 1,
                pattern.wildcard_text(n).unwrap_or("*")
            ));
        }
        Ok(())
    }

    /// Renders the key for a database given its bound values and file stem.
    pub fn render(&self, captures: &[String], stem: &str) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Var(i) => out.push_str(captures.get(*i).map(String::as_str).unwrap_or("")),
                Part::Stem => out.push_str(stem),
            }
        }
        out
    }
}

/// The database file name without its last extension (`t1.db` -> `t1`).
pub fn stem(file_name: &str) -> &str {
    match file_name.rfind('.') {
        Some(i) if i > 0 => &file_name[..i],
        _ => file_name,
    }
}

/// The next full hour after `t` (a snapshot at 13:00:00 exactly is named 14:00).
pub fn next_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    let floor = t
        .with_nanosecond(0)
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_minute(0))
        .unwrap_or(t);
    floor + ChronoDuration::hours(1)
}

/// Joins the replica prefix and a rendered key into an object path.
pub fn key_path(prefix: &ObjPath, key: &str) -> ObjPath {
    let mut p = prefix.clone();
    for part in key.split('/').filter(|s| !s.is_empty()) {
        p = p.join(part);
    }
    p
}

/// `<prefix>/<key>/<stem>-YYYYMMDD-HH0000.db.lz4` for a snapshot taken at `taken`.
pub fn snapshot_path(prefix: &ObjPath, key: &str, stem: &str, taken: DateTime<Utc>) -> ObjPath {
    let name = format!(
        "{stem}-{}{SNAPSHOT_SUFFIX}",
        next_hour(taken).format(TIME_FORMAT)
    );
    key_path(prefix, key).join(name.as_str())
}

/// A snapshot object name split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotName {
    pub stem: String,
    pub hour: DateTime<Utc>,
}

/// Parses `<stem>-YYYYMMDD-HH0000.db.lz4`; `None` for any other object.
pub fn parse_snapshot_name(name: &str) -> Option<SnapshotName> {
    let base = name.strip_suffix(SNAPSHOT_SUFFIX)?;
    if base.len() < TIME_LEN + 2 || !base.is_char_boundary(base.len() - TIME_LEN) {
        return None;
    }
    let (head, time) = base.split_at(base.len() - TIME_LEN);
    let stem = head.strip_suffix('-')?;
    let naive = NaiveDateTime::parse_from_str(time, TIME_FORMAT).ok()?;
    Some(SnapshotName {
        stem: stem.to_string(),
        hour: Utc.from_utc_datetime(&naive),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn next_hour_naming() {
        let t = Utc.with_ymd_and_hms(2026, 11, 22, 13, 42, 7).unwrap();
        let p = snapshot_path(&ObjPath::from("backups"), "p1/d1/main/t1", "t1", t);
        assert_eq!(
            p.as_ref(),
            "backups/p1/d1/main/t1/t1-20261122-140000.db.lz4"
        );
        let t = Utc.with_ymd_and_hms(2026, 12, 31, 23, 0, 0).unwrap();
        assert_eq!(
            snapshot_path(&ObjPath::default(), "k", "x", t).as_ref(),
            "k/x-20270101-000000.db.lz4"
        );
    }

    #[test]
    fn parse_roundtrip() {
        let n = parse_snapshot_name("my-db-20261122-140000.db.lz4").unwrap();
        assert_eq!(n.stem, "my-db");
        assert_eq!(
            n.hour,
            Utc.with_ymd_and_hms(2026, 11, 22, 14, 0, 0).unwrap()
        );
        assert!(parse_snapshot_name("x-2026112-140000.db.lz4").is_none());
        assert!(parse_snapshot_name("x.db").is_none());
        assert!(parse_snapshot_name("-20261122-140000.db.lz4").is_none());
    }

    #[test]
    fn template_binding_by_position() {
        let pat = Pattern::compile(
            "/data/*/databases/*/branches/*/tenants/*.db",
            Path::new("/"),
        )
        .unwrap();
        let t = KeyTemplate::parse("{{project}}/{{database}}/{{branch}}/{{tenant}}").unwrap();
        t.check_binds(&pat).unwrap();
        let caps = pat
            .captures(Path::new(
                "/data/acme/databases/orders/branches/main/tenants/t42.db",
            ))
            .unwrap();
        assert_eq!(t.render(&caps, "t42"), "acme/orders/main/t42");
        // Names are labels: binding is by order, repeats reuse the value.
        let t = KeyTemplate::parse("x-{{a}}/{{b}}/{{c}}/{{d}}/{{a}}").unwrap();
        assert_eq!(t.render(&caps, "t42"), "x-acme/orders/main/t42/acme");
        let d = KeyTemplate::default_for(4);
        d.check_binds(&pat).unwrap();
        assert_eq!(d.render(&caps, "t42"), "acme/orders/main/t42");
    }

    #[test]
    fn template_errors() {
        let pat = Pattern::compile("/data/*/*.db", Path::new("/")).unwrap();
        let e = KeyTemplate::parse("{{a}}/{{b}}/{{c}}")
            .unwrap()
            .check_binds(&pat)
            .unwrap_err();
        assert!(e.contains("{{c}}"), "{e}");
        let e = KeyTemplate::parse("{{a}}")
            .unwrap()
            .check_binds(&pat)
            .unwrap_err();
        assert!(e.contains("not bound") && e.contains("*.db"), "{e}");
        assert!(KeyTemplate::parse("{{a").is_err());
        assert!(KeyTemplate::parse("{{a b}}").is_err());
    }
}

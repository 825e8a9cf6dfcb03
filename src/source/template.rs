//! Key templates: how a database path becomes its replica key.
//!
//! `replica.path` (for example `{{project}}/{{database}}/{{branch}}/{{tenant}}`)
//! is rendered with the values the pattern's `*` levels bound. Variables are
//! bound by position: the first distinct `{{name}}` in the template binds the
//! first `*` level of the pattern, the second the second, and so on. Every `*`
//! level must be bound, so two databases of one pattern never share a key
//! ([`KeyTemplate::check_binds`]); across patterns see [`super::keys`].

use crate::source::discover::Pattern;

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

    /// Whether two databases of one pattern can render the same key: when
    /// one `/`-separated segment of the template holds two placeholders
    /// (`{{p}}-{{t}}`: `a-b` + `c` and `a` + `b-c` both give `a-b-c`).
    /// With at most one per segment, fixed text around it and `/` between
    /// them, different bound values always render different keys (black-box
    /// probe: two databases of one pattern were both uploaded to one key).
    pub fn may_collide_within_a_pattern(&self) -> bool {
        let mut in_segment = 0;
        for p in &self.parts {
            match p {
                // Text between two placeholders: a `/` in it ends a segment.
                Part::Lit(s) if s.contains('/') => in_segment = 0,
                Part::Lit(_) => {}
                Part::Var(_) | Part::Stem => {
                    in_segment += 1;
                    if in_segment > 1 {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// Renders the key for a database given its bound values and file stem.
    /// A variable that is empty (a `**` level that matched no directory)
    /// also drops the `/` after it, so `{{dir}}/{{name}}` renders `t1`, not `/t1`.
    pub fn render(&self, captures: &[String], stem: &str) -> String {
        let mut out = String::new();
        let mut empty_var = false;
        for p in &self.parts {
            match p {
                Part::Lit(s) if empty_var => out.push_str(s.strip_prefix('/').unwrap_or(s)),
                Part::Lit(s) => out.push_str(s),
                Part::Var(i) => out.push_str(captures.get(*i).map(String::as_str).unwrap_or("")),
                Part::Stem => out.push_str(stem),
            }
            empty_var = matches!(p, Part::Var(i) if captures.get(*i).is_none_or(|c| c.is_empty()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn two_placeholders_in_one_segment_may_collide() {
        let may = |t: &str| {
            KeyTemplate::parse(t)
                .unwrap()
                .may_collide_within_a_pattern()
        };
        for t in ["{{p}}-{{t}}", "x/{{a}}{{b}}/y", "{{a}}/{{b}}_{{c}}"] {
            assert!(may(t), "{t}");
        }
        for t in [
            "{{p}}/{{t}}",
            "pre-{{p}}/x/{{t}}.v1",
            "{{a}}",
            "lit/{{a}}/{{a}}",
        ] {
            assert!(!may(t), "{t}");
        }
        assert!(!KeyTemplate::default_for(3).may_collide_within_a_pattern());
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
        // An empty value (`**` matching no directory) drops its `/`.
        let d = KeyTemplate::default_for(2);
        assert_eq!(d.render(&["".into(), "t1".into()], "t1"), "t1");
        assert_eq!(d.render(&["a/b".into(), "t1".into()], "t1"), "a/b/t1");
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

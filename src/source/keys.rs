//! Which database a replica key belongs to, and which keys are refused.
//!
//! A key is the key template rendered from a path's wildcard values and file
//! stem ([`key_for`]). Two things can make a rendered key unusable:
//!
//! * **It breaks the key rule** [`crate::replica::layout::check_key`], the one
//!   `restore` applies: an empty key, or an empty, `.` or `..` segment. With
//!   `**/*.db`, `k/.db` renders `k/`, `..db` renders `.` and `.db` the empty
//!   key. Uploaded, such a key would be unrestorable, or worse: object paths
//!   drop empty segments, so `k/`'s objects would land among `k`'s and make
//!   `k` unrestorable too.
//! * **Another database renders it too.** Within one pattern two databases
//!   share a key only when a template segment holds two placeholders
//!   ([`crate::source::template::KeyTemplate::may_collide_within_a_pattern`]:
//!   with `{{p}}-{{t}}`, `a-b/c` and `a/b-c` both render `a-b-c`; the
//!   template must bind every wildcard level, see
//!   [`crate::source::template::KeyTemplate::check_binds`]), and across
//!   patterns they can: with `*/*.db` and `*/*.sqlite`, `p1/app.db` and
//!   `p1/app.sqlite` both render `p1/app`, and whichever uploaded last would
//!   overwrite the other's objects, so a restore of one would return the other.
//!
//! This module owns the rules that prevent both:
//! * at config load, patterns that name single files and render the same key
//!   are a config error ([`certain_collision`]): the collision is certain;
//! * at every scan that adds or drops databases, [`Owners::update`] renders
//!   every tracked database's key. One that breaks the key rule is
//!   **refused** ([`Refusal::InvalidKey`]). The others are grouped by key; in
//!   a group of more than one, the database that owned the key already keeps
//!   it (else the one with an upload record, else the one of the earlier
//!   pattern, else the smaller path), and every other one is **refused**
//!   ([`Refusal::Collision`]). A refused database is never uploaded, never
//!   streamed, and logged once by the daemon. Keys that pass the rule are
//!   their own object paths (no segment is dropped), so two of them that
//!   differ never share objects;
//! * a restore by path ([`crate::restore::resolve_key`]) of a path that shares
//!   its key with another file fails instead of returning the other's data
//!   ([`shared_with`]).
//!
//! The update costs one key rendering per database when databases come or
//! go; grouping by key (24 bytes per database while it runs) only when
//! there are two patterns or more, or the template may collide within one.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::Metadata;
use std::hash::BuildHasher;
use std::io;
use std::path::{Path, PathBuf};

use crate::replica::layout::new_key_problem;
use crate::source::discover::{Pattern, Visitor};
use crate::source::template::{self, KeyTemplate};
use crate::source::track::{contested_file, write_state_file, Id, Tracker};

/// The object key (`<rendered template>`) and stem of a database path, from
/// the first pattern that matches it.
pub fn key_for(
    patterns: &[Pattern],
    template: &KeyTemplate,
    path: &Path,
) -> Option<(String, String)> {
    keyed(patterns, template, path).map(|(_, key, stem)| (key, stem))
}

/// [`key_for`] with the index of the matching pattern.
fn keyed(
    patterns: &[Pattern],
    template: &KeyTemplate,
    path: &Path,
) -> Option<(usize, String, String)> {
    // Keys are text: a path that is not UTF-8 anywhere has no key (a lossy
    // conversion would give two such paths one key).
    let name = path.to_str().and_then(|_| path.file_name()?.to_str())?;
    let stem = template::stem(name);
    patterns.iter().enumerate().find_map(|(i, p)| {
        let caps = p.captures(path)?;
        Some((i, template.render(&caps, stem), stem.to_string()))
    })
}

/// Two patterns that each name one file (no wildcard) and render the same
/// key: `(i, j, key)` with `i < j`.
pub fn certain_collision(
    patterns: &[Pattern],
    template: &KeyTemplate,
) -> Option<(usize, usize, String)> {
    let mut seen: HashMap<String, (usize, PathBuf)> = HashMap::new();
    for (j, p) in patterns.iter().enumerate() {
        let Some(path) = p.literal_path() else {
            continue;
        };
        let Some((_, key, _)) = keyed(std::slice::from_ref(p), template, &path) else {
            continue;
        };
        match seen.get(&key) {
            Some((i, other)) if *other != path => return Some((*i, j, key)),
            Some(_) => {}
            None => {
                seen.insert(key, (j, path));
            }
        }
    }
    None
}

/// A database that is not backed up because of its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The key it renders.
    pub key: String,
    pub why: Refusal,
}

/// Why a database's key is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Another database owns the key: that database's path.
    Collision { owner: PathBuf },
    /// The key breaks [`crate::replica::layout::check_key`]; what is wrong
    /// ([`crate::replica::layout::key_problem`]).
    InvalidKey(&'static str),
}

impl Refused {
    /// The database that owns the key, for a collision.
    pub fn owner(&self) -> Option<&Path> {
        match &self.why {
            Refusal::Collision { owner } => Some(owner),
            Refusal::InvalidKey(_) => None,
        }
    }
}

/// The key owners of a fleet and the databases refused for their key (see
/// the module docs).
#[derive(Debug, Default, Clone)]
pub struct Owners {
    /// Owners of keys that more than one database renders. Kept across
    /// scans so the first owner stays the owner.
    owners: HashSet<PathBuf>,
    /// Every key more than one database rendered, and the database that
    /// owned it, until no tracked database renders the key. A refused
    /// database stays refused when the owner is deleted: its first upload
    /// would replace the owner's newest backup under the same hour's name
    /// (black-box probe: `restore` then returned the other database with
    /// exit 0). Kept beside the state file ([`contested_file`]) so a restart
    /// does not hand the key over either.
    contested: HashMap<String, PathBuf>,
    /// `contested` changed since it was last saved or loaded.
    contested_dirty: bool,
    refused: HashMap<Id, Refused>,
}

/// What [`contested_file`] holds: the state tag it is valid for (the
/// replica and key layout, as the state file's) and each contested key's
/// owner.
#[derive(serde::Serialize, serde::Deserialize)]
struct ContestedFile {
    tag: String,
    owners: std::collections::BTreeMap<String, String>,
}

impl Owners {
    /// Databases refused at the last [`Owners::update`].
    pub fn refused(&self) -> &HashMap<Id, Refused> {
        &self.refused
    }

    pub fn is_refused(&self, id: Id) -> bool {
        self.refused.contains_key(&id)
    }

    /// Whether the contested keys changed since they were saved or loaded.
    pub fn contested_dirty(&self) -> bool {
        self.contested_dirty
    }

    /// Writes the contested keys and their owners to [`contested_file`] of
    /// `state`, atomically and durably (or removes it when there are none).
    pub fn save_contested(&mut self, state: &Path, tag: u64) -> io::Result<()> {
        let path = contested_file(state);
        if self.contested.is_empty() {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        } else {
            let file = ContestedFile {
                tag: format!("{tag:016x}"),
                // Only UTF-8 paths render a key, so only those own one.
                owners: self
                    .contested
                    .iter()
                    .filter_map(|(k, p)| Some((k.clone(), p.to_str()?.to_string())))
                    .collect(),
            };
            let json = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
            write_state_file(&path, |mut f| {
                use std::io::Write;
                f.write_all(&json)
            })?;
        }
        self.contested_dirty = false;
        Ok(())
    }

    /// Reads the contested keys [`Owners::save_contested`] wrote; no file
    /// means none. Returns their count. The file sits beside the state file,
    /// which is named by its tag, so another tag in it is a file copied or
    /// edited by hand: an error like a damaged one, not "none" (black-box
    /// probe: the refused database then took the key).
    pub fn load_contested(&mut self, state: &Path, tag: u64) -> io::Result<usize> {
        let path = contested_file(state);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let file: ContestedFile = serde_json::from_slice(&data)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if file.tag != format!("{tag:016x}") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "its tag {:?} is not this config's {tag:016x} (a file of another config?)",
                    file.tag
                ),
            ));
        }
        self.contested = file
            .owners
            .into_iter()
            .map(|(k, p)| (k, PathBuf::from(p)))
            .collect();
        self.contested_dirty = false;
        Ok(self.contested.len())
    }

    /// Databases refused at the last [`Owners::update`] for a key that
    /// breaks the key rule.
    pub fn invalid(&self) -> usize {
        self.refused
            .values()
            .filter(|r| matches!(r.why, Refusal::InvalidKey(_)))
            .count()
    }

    /// Recomputes owners and refusals over every tracked database; returns
    /// the databases refused now that were not refused before (to log).
    /// Costs one key rendering per database (and, with two patterns or
    /// more, 24 bytes each while it runs), so call it only when the set of
    /// databases changed.
    pub fn update(
        &mut self,
        patterns: &[Pattern],
        template: &KeyTemplate,
        tracker: &Tracker,
    ) -> Vec<(PathBuf, Refused)> {
        let multi = patterns.len() > 1 || template.may_collide_within_a_pattern();
        let hasher = std::collections::hash_map::RandomState::new();
        let mut rows: Vec<(u64, usize, Id)> =
            Vec::with_capacity(if multi { tracker.len() } else { 0 });
        let mut refused = HashMap::new();
        for id in tracker.ids() {
            let path = tracker.path(id);
            let Some((pattern, key, _)) = keyed(patterns, template, &path) else {
                // Keys are text: a name that is not UTF-8 has none. Refused
                // (and said so once) rather than failing every cycle with
                // "matches no pattern any more" (black-box probe).
                if path.to_str().is_none() {
                    let why = Refusal::InvalidKey(
                        "its path is not valid UTF-8, and keys are UTF-8 text: rename the file \
                         (or the directory)",
                    );
                    let key = path.to_string_lossy().into_owned();
                    refused.insert(id, Refused { key, why });
                }
                continue;
            };
            if let Some(why) = new_key_problem(&key) {
                let why = Refusal::InvalidKey(why);
                refused.insert(id, Refused { key, why });
            } else if multi {
                rows.push((hasher.hash_one(key.as_str()), pattern, id));
            }
        }
        rows.sort_unstable_by_key(|r| r.0);
        let mut owners = HashSet::new();
        for same_hash in rows.chunk_by(|a, b| a.0 == b.0).filter(|c| c.len() > 1) {
            // Equal hashes: group by the real key.
            let mut groups: HashMap<String, Vec<(usize, Id, PathBuf)>> = HashMap::new();
            for &(_, pattern, id) in same_hash {
                let path = tracker.path(id);
                if let Some((_, key, _)) = keyed(patterns, template, &path) {
                    groups.entry(key).or_default().push((pattern, id, path));
                }
            }
            for (key, mut group) in groups.into_iter().filter(|(_, g)| g.len() > 1) {
                group.sort_by(|a, b| {
                    let rank = |x: &(usize, Id, PathBuf)| {
                        (
                            !self.owners.contains(&x.2),
                            !tracker.has_upload_record(x.1),
                            x.0,
                        )
                    };
                    rank(a).cmp(&rank(b)).then_with(|| a.2.cmp(&b.2))
                });
                let owner = group[0].2.clone();
                if !self.contested.contains_key(&key) {
                    self.contested.insert(key.clone(), owner.clone());
                    self.contested_dirty = true;
                }
                for (_, id, _) in &group[1..] {
                    refused.insert(
                        *id,
                        Refused {
                            key: key.clone(),
                            why: Refusal::Collision {
                                owner: owner.clone(),
                            },
                        },
                    );
                }
                owners.insert(owner);
            }
        }
        // A contested key no tracked database renders any more is free again.
        if !self.contested.is_empty() {
            let rendered: HashSet<u64> = rows.iter().map(|r| r.0).collect();
            let before = self.contested.len();
            self.contested
                .retain(|key, _| rendered.contains(&hasher.hash_one(key.as_str())));
            self.contested_dirty |= self.contested.len() != before;
        }
        // A contested key whose owner is gone: the others stay refused.
        if !self.contested.is_empty() {
            for &(_, _, id) in &rows {
                if refused.contains_key(&id) {
                    continue;
                }
                let path = tracker.path(id);
                let Some((_, key, _)) = keyed(patterns, template, &path) else {
                    continue;
                };
                match self.contested.get(&key) {
                    Some(owner) if *owner != path && !owners.contains(owner) => {
                        refused.insert(
                            id,
                            Refused {
                                key,
                                why: Refusal::Collision {
                                    owner: owner.clone(),
                                },
                            },
                        );
                    }
                    _ => {}
                }
            }
        }
        let new = refused
            .iter()
            .filter(|(id, r)| self.refused.get(id) != Some(r))
            .map(|(id, r)| (tracker.path(*id), r.clone()))
            .collect();
        self.refused = refused;
        self.owners = owners;
        new
    }
}

/// Another database file that renders the same key as `path`, found by
/// walking every pattern (a restore by path pays this; replication does not).
pub fn shared_with(patterns: &[Pattern], template: &KeyTemplate, path: &Path) -> Option<PathBuf> {
    if patterns.len() < 2 && !template.may_collide_within_a_pattern() {
        return None;
    }
    let (_, key, _) = keyed(patterns, template, path)?;
    struct Find<'a> {
        patterns: &'a [Pattern],
        template: &'a KeyTemplate,
        key: &'a str,
        path: &'a Path,
        found: Option<PathBuf>,
    }
    impl Visitor for Find<'_> {
        fn database(&mut self, dir: &Path, name: &OsStr, _: &Metadata, _: Option<&Metadata>) {
            if self.found.is_some() {
                return;
            }
            let candidate = dir.join(name);
            if candidate != self.path
                && key_for(self.patterns, self.template, &candidate)
                    .is_some_and(|(k, _)| k == self.key)
                && crate::source::vfs::has_sqlite_header(&candidate).unwrap_or(false)
            {
                self.found = Some(candidate);
            }
        }
        fn skipped(&mut self, _: &Path, _: &str) {}
        fn error(&mut self, _: &Path, _: io::Error) {}
    }
    let mut find = Find {
        patterns,
        template,
        key: &key,
        path,
        found: None,
    };
    for p in patterns {
        p.walk(&mut find);
    }
    find.found
}

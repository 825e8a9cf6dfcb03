//! Discovery: glob patterns compiled into one matcher per directory level, and
//! a `read_dir` walker that visits only directories a pattern can reach.
//!
//! A pattern such as `/data/*/databases/*/branches/*/tenants/*.db` is split at
//! `/`. Literal levels (`databases`) are joined without listing their parent;
//! wildcard levels are listed with `read_dir` and filtered with a per-level
//! [`globset::GlobMatcher`]. The walker therefore costs one `getdents` per
//! directory on the way and one `fstatat` per candidate file, the same work as
//! `find -printf '%s %T@'`, and never descends into unrelated trees.
//!
//! Each wildcard level binds one template variable (see [`crate::replica::layout`]):
//! a level that is one `*` between literal text (`*.db`, `tenant-*`) binds the
//! text matched by the `*`; any other wildcard level binds the whole name.
//! One level may be `**`: any number of directories (none included), bound
//! to the directory names joined by `/` (empty for none). It exists for
//! Litestream's `recursive: true` directory scans and walks the whole
//! subtree below it, so it costs what `find` costs there.
//!
//! Files are not followed through symlinks, and names ending in `-wal`,
//! `-shm` or `-journal` are SQLite's side files, never databases.

use std::ffi::{OsStr, OsString};
use std::fs::{self, Metadata};
use std::io;
use std::path::{Component, Path, PathBuf};

use globset::{GlobBuilder, GlobMatcher};

use crate::source::shm::SourceFiles;

/// SQLite's side files next to a database; never treated as databases.
pub const AUX_SUFFIXES: [&str; 3] = ["-wal", "-shm", "-journal"];

/// The `-wal` file next to database `db`.
pub fn wal_path(db: &Path) -> PathBuf {
    side_path(db, "-wal")
}

/// The `-shm` file (WAL-index) next to database `db`.
pub fn shm_path(db: &Path) -> PathBuf {
    side_path(db, "-shm")
}

/// Refuses `db` when it, or a side file SQLite would open beside it (`-wal`,
/// `-shm`, `-journal`), is there but is no regular file at its own path: a
/// symbolic link, a FIFO, a socket, a device or a directory. Checked just
/// before SQLite opens a source (a stream, a snapshot, a drill), because:
///
/// * SQLite resolves a link to its target and opens the target's `-wal`,
///   while a stream reads the `-wal` at the link's own path: restores mixed
///   the target with frames of the database the link replaced, and the
///   target's side files were created outside the pattern root (black-box
///   probe). The scan never follows links either.
/// * Opening a FIFO blocks until a writer comes: a FIFO renamed over a
///   database, or named like its `-journal`, stopped every scan and
///   SIGTERM (black-box probe).
///
/// A database that is gone is left to the open, which reports it as before.
///
/// A database whose absolute path is longer than [`SQLITE_PATH_MAX`] is
/// refused too, naming the limit: SQLite cannot open it.
///
/// Returns what the checks saw of the database and its `-shm`, for
/// [`crate::source::shm::claim`].
pub fn check_regular_files(db: &Path) -> crate::Result<SourceFiles> {
    check_regular_files_at(db, &crate::source::pin::Pinned::as_given(db))
}

/// [`check_regular_files`] of the database `db` with its files looked up
/// where SQLite opens them: in its pinned directory
/// ([`crate::source::pin`]). Errors name `db`'s files.
pub fn check_regular_files_at(
    db: &Path,
    at: &crate::source::pin::Pinned,
) -> crate::Result<SourceFiles> {
    if let Some(why) = path_too_long(db) {
        return Err(crate::Error::invalid(db.display(), why));
    }
    let check = |suffix: &str| {
        let named = side_path(db, suffix);
        match at.lstat(suffix) {
            Ok(e) if e.regular => Ok(Some(e.id)),
            // Looked at again for the words: what kind of file it is.
            Ok(_) => Err(match fs::symlink_metadata(side_path(at.path(), suffix)) {
                Ok(m) => not_regular_error(&named, &m),
                Err(e) => crate::Error::io(&named, e),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            // A side file whose name is longer than the file system allows
            // cannot exist: a database named 248-251 bytes has a `-wal` but
            // no possible `-journal`, and SQLite uses it (black-box probe:
            // such databases were never backed up).
            Err(e) if e.raw_os_error() == Some(libc::ENAMETOOLONG) && !suffix.is_empty() => {
                Ok(None)
            }
            Err(e) => Err(crate::Error::io(&named, e)),
        }
    };
    let mut files = SourceFiles {
        db: check("")?,
        shm: None,
    };
    for suffix in AUX_SUFFIXES {
        let seen = check(suffix)?;
        if suffix == "-shm" {
            files.shm = seen;
        }
    }
    Ok(files)
}

/// The longest absolute path of a database SQLite opens, in bytes: its unix
/// VFS takes paths of at most 512 bytes (`MAX_PATHNAME`, fixed at compile
/// time), and the pager wants room for `-journal` (8 bytes) after it.
/// A longer one failed every snapshot with SQLite's "unable to open
/// database file", and `explain` said nothing (black-box probe).
pub const SQLITE_PATH_MAX: usize = 512 - "-journal".len();

/// Why SQLite cannot open `db` because of its path's length, if so.
pub fn path_too_long(db: &Path) -> Option<String> {
    let len = std::path::absolute(db).map_or(db.as_os_str().len(), |p| p.as_os_str().len());
    (len > SQLITE_PATH_MAX).then(|| {
        format!(
            "its absolute path is {len} bytes, and SQLite opens no database whose path is longer \
             than {SQLITE_PATH_MAX} bytes: never backed up (move it to a shorter path)"
        )
    })
}

/// The first directory of `db`'s path below the pattern root `root` that
/// is not a directory of its own (a symbolic link, or gone): the scan never
/// follows links below a pattern's root, so neither may anything that
/// opens a database it found there later (black-box probe: a directory
/// swapped for a link to a tree outside the root between a scan and a
/// stream's start was streamed from outside). `None` when every one is a
/// real directory, or `db` is not below `root`.
pub fn link_below(root: &Path, db: &Path) -> Option<PathBuf> {
    let rel = db.parent()?.strip_prefix(root).ok()?;
    let mut dir = root.to_path_buf();
    for part in rel.components() {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_dir() => {}
            _ => return Some(dir),
        }
    }
    None
}

/// [`link_below`] as an error naming `db` and the directory in the way;
/// `Ok` without a root.
pub fn check_no_link_below(root: Option<&Path>, db: &Path) -> crate::Result<()> {
    match root.and_then(|r| link_below(r, db)) {
        None => Ok(()),
        // Moved away or deleted since the scan (black-box probe: this was
        // reported as "a symbolic link?").
        Some(bad) if fs::symlink_metadata(&bad).is_err() => Err(crate::Error::invalid(
            db.display(),
            format!(
                "{} is gone (moved away or deleted); not opened",
                bad.display()
            ),
        )),
        Some(bad) => Err(crate::Error::invalid(
            db.display(),
            format!(
                "{} is no directory of its own (a symbolic link?), and links below the pattern \
                 root are never followed; not opened",
                bad.display()
            ),
        )),
    }
}

/// The root of the first of `patterns` that matches `path` (the one its
/// key comes from), for [`link_below`].
pub fn root_of<'p>(patterns: &'p [Pattern], path: &Path) -> Option<&'p Path> {
    patterns
        .iter()
        .find(|p| p.captures(path).is_some())
        .map(Pattern::root)
}

/// The error for `path`, which is there but is no regular file (`m`: its
/// metadata); it is not opened.
pub fn not_regular_error(path: &Path, m: &Metadata) -> crate::Error {
    crate::Error::invalid(path.display(), format!("{}; not opened", not_regular(m)))
}

pub use crate::error::not_regular;

fn side_path(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[derive(Debug, Clone)]
enum Level {
    Literal(OsString),
    /// `**`: zero or more directories.
    Any,
    Glob {
        text: String,
        matcher: GlobMatcher,
        /// `Some((prefix, suffix))` when the level is `prefix*suffix`: binds the middle.
        affix: Option<(String, String)>,
    },
}

/// A compiled discovery pattern.
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    /// The longest literal directory prefix; walking starts here.
    root: PathBuf,
    /// The levels below `root`; the last one names files.
    levels: Vec<Level>,
}

fn has_glob_meta(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

/// Puts every glob metacharacter of `name` in a class of its own (`[[]`,
/// `[*]`...), so that a pattern matches exactly that name: for a file
/// named with such characters (Litestream's `path:` names one file;
/// black-box probe U31, F5: `data/db[1].db` was read as a glob, and
/// refused as an unbound wildcard).
pub fn escape_glob(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '*' | '?' | '[' | ']' | '{' | '}' => {
                out.push('[');
                out.push(c);
                out.push(']');
            }
            c => out.push(c),
        }
    }
    out
}

/// The one name a pattern level matches when its only metacharacters are
/// single-character classes (`[[]`, `[*]`, as [`escape_glob`] writes
/// them): such a level is a literal, not a wildcard. `None` otherwise.
fn escaped_literal(level: &str) -> Option<String> {
    let mut out = String::with_capacity(level.len());
    let mut chars = level.chars();
    while let Some(c) = chars.next() {
        match c {
            '[' => {
                let (Some(inner), Some(']')) = (chars.next(), chars.next()) else {
                    return None;
                };
                if inner == '!' || inner == '^' {
                    return None;
                }
                out.push(inner);
            }
            '*' | '?' | '{' | '}' | ']' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// What a restore's staging file adds to the target's name (see
/// [`crate::capture::snapshot::temp_sibling`]): `.<name>.litefleet-XXXXXX`.
pub const STAGING_MARK: &str = ".litefleet-";

/// True for names that are never a database of their own: SQLite's
/// `-wal`, `-shm` and `-journal` side files, and a restore's staging file
/// (`.<name>.litefleet-` and six random characters; black-box probe: with a
/// pattern `*`, a restore into a watched directory had its staging file
/// streamed and uploaded under a key of its own).
pub fn is_aux(name: &OsStr) -> bool {
    let b = name.as_encoded_bytes();
    AUX_SUFFIXES.iter().any(|s| b.ends_with(s.as_bytes())) || is_staging(b)
}

/// What begins the name of every directory litefleet makes for its own
/// scratch work (restore drills, spools) under `temp-dir`: the scan never
/// enters one. Its files are restored and copied databases, which a
/// pattern reaching into `temp-dir` took for sources (black-box probe U31,
/// F3: `**/*.db` over a config directory holding `temp-dir: tmp` uploaded
/// every restore drill's copy under a new key, 7-13 keys and ~350 MB in
/// 30 s, without end).
pub const OWN_DIR_MARK: &str = ".litefleet-";

/// True for a directory litefleet made for itself ([`OWN_DIR_MARK`]).
pub fn is_own_dir(name: &OsStr) -> bool {
    name.as_encoded_bytes().starts_with(OWN_DIR_MARK.as_bytes())
}

/// A restore's staging file name: `.<name>.litefleet-` and six random
/// characters (see [`STAGING_MARK`]).
pub(crate) fn is_staging(name: &[u8]) -> bool {
    let mark = STAGING_MARK.as_bytes();
    name.first() == Some(&b'.')
        && name.len() >= mark.len() + 6
        && name[name.len() - 6..].iter().all(u8::is_ascii_alphanumeric)
        && name[..name.len() - 6].ends_with(mark)
}

impl Pattern {
    /// Compiles `pattern`; relative patterns are resolved against `base`.
    pub fn compile(pattern: &str, base: &Path) -> Result<Pattern, String> {
        if pattern.trim().is_empty() {
            return Err("empty pattern".into());
        }
        let full = if Path::new(pattern).is_absolute() {
            PathBuf::from(pattern)
        } else {
            base.join(pattern)
        };
        let mut root = PathBuf::new();
        let mut levels = Vec::new();
        for comp in full.components() {
            match comp {
                Component::RootDir | Component::Prefix(_) => root.push(comp),
                Component::CurDir => {}
                Component::ParentDir if levels.is_empty() => root.push(".."),
                Component::ParentDir => return Err("`..` after a wildcard is not supported".into()),
                Component::Normal(name) => {
                    let s = name
                        .to_str()
                        .ok_or_else(|| "pattern is not valid UTF-8".to_string())?;
                    if s == "**" {
                        if levels.iter().any(|l| matches!(l, Level::Any)) {
                            return Err("at most one `**` level".into());
                        }
                        levels.push(Level::Any);
                        continue;
                    }
                    if s.contains("**") {
                        return Err(
                            "`**` must be a whole level (`dir/**/*.db`); use one `*` per directory level otherwise"
                                .into(),
                        );
                    }
                    let literal = match has_glob_meta(s) {
                        true => escaped_literal(s),
                        false => Some(s.to_string()),
                    };
                    if literal.is_none() {
                        let matcher = GlobBuilder::new(s)
                            .literal_separator(true)
                            .build()
                            .map_err(|e| e.to_string())?
                            .compile_matcher();
                        let affix = match s.matches('*').count() {
                            1 if !s.contains(['?', '[', '{']) => {
                                let (p, x) = s.split_once('*').unwrap_or_default();
                                Some((p.to_string(), x.to_string()))
                            }
                            _ => None,
                        };
                        levels.push(Level::Glob {
                            text: s.to_string(),
                            matcher,
                            affix,
                        });
                    } else if let Some(lit) = literal {
                        match levels.is_empty() {
                            true => root.push(lit),
                            false => levels.push(Level::Literal(lit.into())),
                        }
                    }
                }
            }
        }
        if matches!(levels.last(), Some(Level::Any)) {
            return Err("`**` must be followed by a file name (`dir/**/*.db`)".into());
        }
        if levels.is_empty() {
            // A pattern with no wildcard names one file: its parent is the root.
            let name = root
                .file_name()
                .ok_or_else(|| "pattern names no file".to_string())?
                .to_os_string();
            root.pop();
            levels.push(Level::Literal(name));
        }
        Ok(Pattern {
            source: pattern.to_string(),
            root,
            levels,
        })
    }

    /// The pattern as written in the config.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Directory where walking starts.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The one file a pattern without wildcards names.
    pub fn literal_path(&self) -> Option<PathBuf> {
        let mut path = self.root.clone();
        for level in &self.levels {
            match level {
                Level::Literal(name) => path.push(name),
                Level::Glob { .. } | Level::Any => return None,
            }
        }
        Some(path)
    }

    /// Number of wildcard levels, i.e. of template variables to bind.
    pub fn wildcards(&self) -> usize {
        self.levels
            .iter()
            .filter(|l| matches!(l, Level::Glob { .. } | Level::Any))
            .count()
    }

    /// The text of the `n`th wildcard level (for error messages).
    pub fn wildcard_text(&self, n: usize) -> Option<&str> {
        self.levels
            .iter()
            .filter_map(|l| match l {
                Level::Glob { text, .. } => Some(text.as_str()),
                Level::Any => Some("**"),
                Level::Literal(_) => None,
            })
            .nth(n)
    }

    /// Matches a concrete path and returns the values bound by each wildcard level.
    pub fn captures(&self, path: &Path) -> Option<Vec<String>> {
        let rest = path.strip_prefix(&self.root).ok()?;
        let comps: Vec<&OsStr> = rest
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n),
                _ => None,
            })
            .collect();
        if rest.components().count() != comps.len() {
            return None;
        }
        // With `**` at level k, the last `levels.len() - k - 1` names match
        // the levels after it and the names between bind it.
        let (before, any) = match self.levels.iter().position(|l| matches!(l, Level::Any)) {
            Some(k) => {
                let tail = self.levels.len() - k - 1;
                if comps.len() < k + tail {
                    return None;
                }
                (k, Some(comps.len() - tail))
            }
            None if comps.len() == self.levels.len() => (comps.len(), None),
            None => return None,
        };
        let mut out = Vec::new();
        for (level, name) in self.levels[..before].iter().zip(&comps[..before]) {
            out.push(Self::bind(level, name)?);
        }
        if let Some(end) = any {
            let dirs: Vec<_> = comps[before..end]
                .iter()
                .map(|c| c.to_string_lossy())
                .collect();
            out.push(Some(dirs.join("/")));
            let levels = &self.levels[before + 1..];
            for (level, name) in levels.iter().zip(&comps[end..]) {
                out.push(Self::bind(level, name)?);
            }
        }
        let out: Vec<String> = out.into_iter().flatten().collect();
        let last = path.file_name()?;
        (!is_aux(last)).then_some(out)
    }

    /// Matches one name against one level: `None` if it does not match,
    /// `Some(None)` for a literal, `Some(Some(value))` for a wildcard.
    fn bind(level: &Level, name: &OsStr) -> Option<Option<String>> {
        match level {
            Level::Literal(l) if l == name => Some(None),
            Level::Literal(_) | Level::Any => None,
            Level::Glob { matcher, affix, .. } => {
                if !matcher.is_match(Path::new(name)) {
                    return None;
                }
                let s = name.to_string_lossy();
                Some(Some(match affix {
                    Some((p, x)) => s[p.len()..s.len() - x.len()].to_string(),
                    None => s.into_owned(),
                }))
            }
        }
    }

    /// Walks the tree and reports every candidate database file to `visitor`.
    pub fn walk(&self, visitor: &mut dyn Visitor) {
        let mut buf = self.root.clone();
        let mut leaf = Vec::new();
        self.walk_level(&mut buf, 0, &mut leaf, visitor);
    }

    fn walk_level(
        &self,
        buf: &mut PathBuf,
        i: usize,
        leaf: &mut Vec<(OsString, fs::DirEntry)>,
        visitor: &mut dyn Visitor,
    ) {
        let last = i + 1 == self.levels.len();
        match (&self.levels[i], last) {
            (Level::Any, _) => {
                // No more directories here, then each subdirectory at this level again.
                self.walk_level(buf, i + 1, leaf, visitor);
                let Some(rd) = read_dir(buf, visitor) else {
                    return;
                };
                let mut dirs = Vec::new();
                for entry in rd {
                    let Some(entry) = listed(entry, buf, visitor) else {
                        continue;
                    };
                    match entry.file_type() {
                        Ok(t) if t.is_dir() && !is_own_dir(&entry.file_name()) => {
                            dirs.push(entry.file_name())
                        }
                        Ok(t) if t.is_symlink() => {
                            buf.push(entry.file_name());
                            if buf.is_dir() {
                                visitor.skipped(buf, "symlinked directory (not followed)");
                            }
                            buf.pop();
                        }
                        _ => {}
                    }
                }
                dirs.sort_unstable();
                for name in dirs {
                    buf.push(&name);
                    self.walk_level(buf, i, leaf, visitor);
                    buf.pop();
                }
            }
            (Level::Literal(name), false) => {
                buf.push(name);
                self.walk_level(buf, i + 1, leaf, visitor);
                buf.pop();
            }
            (Level::Literal(name), true) => {
                buf.push(name);
                match fs::symlink_metadata(&*buf) {
                    Ok(md) => {
                        let wal = fs::symlink_metadata(wal_path(buf)).ok();
                        buf.pop();
                        report(buf, name, &md, wal.as_ref(), visitor);
                        return;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => visitor.error(buf, e),
                }
                buf.pop();
            }
            (Level::Glob { matcher, .. }, false) => {
                let Some(rd) = read_dir(buf, visitor) else {
                    return;
                };
                for entry in rd {
                    let Some(entry) = listed(entry, buf, visitor) else {
                        continue;
                    };
                    let name = entry.file_name();
                    if !matcher.is_match(Path::new(&name)) || is_own_dir(&name) {
                        continue;
                    }
                    match entry.file_type() {
                        Ok(t) if t.is_dir() => {}
                        Ok(t) if t.is_symlink() => {
                            buf.push(&name);
                            visitor.skipped(buf, "symlinked directory (not followed)");
                            buf.pop();
                            continue;
                        }
                        _ => continue,
                    }
                    buf.push(&name);
                    self.walk_level(buf, i + 1, leaf, visitor);
                    buf.pop();
                }
            }
            (Level::Glob { matcher, .. }, true) => {
                let Some(rd) = read_dir(buf, visitor) else {
                    return;
                };
                leaf.clear();
                for entry in rd {
                    if let Some(e) = listed(entry, buf, visitor) {
                        leaf.push((e.file_name(), e));
                    }
                }
                leaf.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                let mut wal_name = OsString::new();
                for (name, entry) in leaf.iter() {
                    if is_aux(name) || !matcher.is_match(Path::new(name)) {
                        continue;
                    }
                    let md = match entry.metadata() {
                        Ok(md) => md,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => {
                            buf.push(name);
                            visitor.error(buf, e);
                            buf.pop();
                            continue;
                        }
                    };
                    wal_name.clear();
                    wal_name.push(name);
                    wal_name.push("-wal");
                    let wal = leaf
                        .binary_search_by(|(n, _)| n.as_os_str().cmp(&wal_name))
                        .ok()
                        .and_then(|k| leaf[k].1.metadata().ok());
                    report(buf, name, &md, wal.as_ref(), visitor);
                }
            }
        }
    }
}

fn report(
    dir: &mut PathBuf,
    name: &OsStr,
    md: &Metadata,
    wal: Option<&Metadata>,
    visitor: &mut dyn Visitor,
) {
    if md.file_type().is_symlink() {
        dir.push(name);
        visitor.skipped(dir, "symlink (not followed)");
        dir.pop();
    } else if md.is_file() {
        visitor.database(dir, name, md, wal);
    } else if !md.is_dir() {
        // A FIFO, socket or device named like a database: never opened,
        // and said once, as a link is (black-box probe C26: no line at
        // all). A directory that matches is a pattern's business, not news.
        dir.push(name);
        visitor.skipped(dir, crate::error::not_regular(md));
        dir.pop();
    }
}

fn read_dir(dir: &Path, visitor: &mut dyn Visitor) -> Option<fs::ReadDir> {
    #[cfg(test)]
    if tests::UNREADABLE.with(|u| u.borrow().iter().any(|p| p == dir)) {
        visitor.error(dir, io::Error::from_raw_os_error(libc::EMFILE));
        return None;
    }
    match fs::read_dir(dir) {
        Ok(rd) => Some(rd),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => None,
        Err(e) => {
            visitor.error(dir, e);
            None
        }
    }
}

/// An entry of `dir`'s listing; an error reading it (the listing stops
/// short) goes to `visitor`, so the databases the listing could not show are
/// not taken for deleted.
fn listed(
    entry: io::Result<fs::DirEntry>,
    dir: &Path,
    visitor: &mut dyn Visitor,
) -> Option<fs::DirEntry> {
    entry.map_err(|e| visitor.error(dir, e)).ok()
}

/// Receives what a [`Pattern::walk`] finds.
pub trait Visitor {
    /// A regular file matching the pattern, with the metadata of its `-wal` if present.
    fn database(&mut self, dir: &Path, name: &OsStr, db: &Metadata, wal: Option<&Metadata>);
    /// A matching path that is deliberately not tracked.
    fn skipped(&mut self, path: &Path, reason: &str);
    /// A directory or file that could not be read.
    fn error(&mut self, path: &Path, err: io::Error);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    thread_local! {
        /// Directories whose listing fails (with `EMFILE`) on this
        /// thread's walks: root bypasses permissions, so tests cannot make
        /// a directory unreadable any other way.
        pub(crate) static UNREADABLE: std::cell::RefCell<Vec<PathBuf>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }

    /// A database named 248-251 bytes can have a `-wal` but no `-journal`
    /// (the name would pass 255 bytes): that side file is absent, not an
    /// error (probe V: such databases were never backed up).
    #[test]
    fn side_files_too_long_to_exist_are_absent() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join(format!("{}.db", "w".repeat(247)));
        fs::write(&db, b"x").unwrap();
        fs::write(side_path(&db, "-wal"), b"").unwrap();
        check_regular_files(&db).unwrap();
        // A database name itself too long is an error, not "absent".
        let long = dir.path().join(format!("{}.db", "w".repeat(300)));
        assert!(check_regular_files(&long).is_err());
    }

    #[test]
    fn staging_files_and_side_files_are_never_databases() {
        use std::ffi::OsStr;
        for name in [
            "t.db-wal",
            "t.db-shm",
            "t.db-journal",
            ".t.db.litefleet-a1B2c3",
        ] {
            assert!(is_aux(OsStr::new(name)), "{name}");
        }
        for name in [
            "t.db",
            ".t.db",
            "x.litefleet-a1B2c3",
            ".t.db.litefleet-abc",
            "litefleet-abcdef",
        ] {
            assert!(!is_aux(OsStr::new(name)), "{name}");
        }
    }

    /// Only the directories below the root count: a root reached through a
    /// link is the operator's choice; a link below it is what the scan
    /// never follows.
    #[test]
    fn links_below_the_root_are_found() {
        let real = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(real.path().join("a/b")).unwrap();
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("root");
        std::os::unix::fs::symlink(real.path(), &root).unwrap();
        let db = root.join("a/b/x.db");
        assert_eq!(link_below(&root, &db), None);
        assert!(check_no_link_below(Some(&root), &db).is_ok());
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::create_dir(elsewhere.path().join("b")).unwrap();
        std::fs::rename(real.path().join("a"), real.path().join("old")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), real.path().join("a")).unwrap();
        assert_eq!(link_below(&root, &db), Some(root.join("a")));
        let e = check_no_link_below(Some(&root), &db)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no directory of its own"), "{e}");
        assert!(check_no_link_below(None, &db).is_ok());
        // Gone (moved away or deleted) is said so, not taken for a link
        // (black-box probe: "a symbolic link?" for a directory moved away).
        std::fs::remove_file(real.path().join("a")).unwrap();
        let e = check_no_link_below(Some(&root), &db)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{} is gone", root.join("a").display())),
            "{e}"
        );
    }

    #[derive(Default)]
    struct Collect {
        found: Vec<(PathBuf, bool)>,
        skipped: Vec<PathBuf>,
    }
    impl Visitor for Collect {
        fn database(&mut self, dir: &Path, name: &OsStr, _: &Metadata, wal: Option<&Metadata>) {
            self.found.push((dir.join(name), wal.is_some()));
        }
        fn skipped(&mut self, path: &Path, _: &str) {
            self.skipped.push(path.to_path_buf());
        }
        fn error(&mut self, path: &Path, err: io::Error) {
            panic!("{}: {err}", path.display());
        }
    }

    /// A name with glob metacharacters, escaped, is one literal file, no
    /// wildcard (black-box probe U31, F5: Litestream's `path:
    /// data/db[1].db` was refused as an unbound wildcard).
    #[test]
    fn escaped_names_are_literal_levels() {
        for name in ["db[1].db", "q?.db", "a*b{c}.db", "plain.db", "]x[.db"] {
            let escaped = escape_glob(name);
            assert_eq!(
                escaped_literal(&escaped).as_deref(),
                Some(name),
                "{escaped}"
            );
            let pat = Pattern::compile(&format!("/data/{escaped}"), Path::new("/")).unwrap();
            assert_eq!(pat.wildcards(), 0, "{escaped}");
            assert_eq!(pat.literal_path(), Some(Path::new("/data").join(name)));
        }
        let pat = Pattern::compile("/data/[[]x[]]/*.db", Path::new("/")).unwrap();
        assert_eq!((pat.root(), pat.wildcards()), (Path::new("/data/[x]"), 1));
        // Real classes and wildcards stay globs.
        for glob in ["[ab].db", "[!a].db", "x*.db", "x?.db", "{a,b}.db"] {
            assert!(escaped_literal(glob).is_none(), "{glob}");
        }
    }

    /// What litefleet makes for itself in `temp-dir` is never a source,
    /// whatever pattern reaches there: its scratch directories
    /// (`.litefleet-*`: restore drills, spools) are not entered, and its
    /// staged copies (`.<what>.litefleet-XXXXXX`) not taken (black-box probe
    /// U31, F3: `**/*.db` over `temp-dir` uploaded every drill's restored
    /// copy under a new key).
    #[test]
    fn litefleets_own_scratch_is_never_a_source() {
        let t = tempfile::tempdir().unwrap();
        let mk = |p: &str| {
            let p = t.path().join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b"x").unwrap();
        };
        mk("app/a.db");
        mk("tmp/.litefleet-verify-Ab12Cd/0.db");
        mk("tmp/hot/.litefleet-spool/7-1.spool");
        mk("tmp/hot/.hot.litefleet-Ab12Cd");
        mk("tmp/.copy.litefleet-Zz99Yy");
        for (pattern, want) in [("**/*.db", "app/a.db"), ("**/*", "app/a.db")] {
            let pat = Pattern::compile(pattern, t.path()).unwrap();
            let mut c = Collect::default();
            pat.walk(&mut c);
            let found: Vec<_> = c.found.iter().map(|(p, _)| p.clone()).collect();
            assert_eq!(found, vec![t.path().join(want)], "{pattern}");
        }
        // One level of glob that matches the scratch directory's name.
        let pat = Pattern::compile("tmp/*/*.db", t.path()).unwrap();
        let mut c = Collect::default();
        pat.walk(&mut c);
        assert!(c.found.is_empty(), "{:?}", c.found);
    }

    #[test]
    fn walks_only_matching_levels_and_binds_captures() {
        let t = tempfile::tempdir().unwrap();
        let mk = |p: &str| {
            let p = t.path().join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b"x").unwrap();
        };
        mk("p1/databases/d1/branches/main/tenants/t1.db");
        mk("p1/databases/d1/branches/main/tenants/t1.db-wal");
        mk("p1/databases/d1/branches/main/tenants/t2.db");
        mk("p1/databases/d1/branches/main/tenants/t2.db-shm");
        mk("p1/databases/d1/branches/main/tenants/notes.txt");
        mk("p1/other/d1/branches/main/tenants/t3.db");
        mk("p2/databases/d9/branches/dev/tenants/t4.db");
        let pat = Pattern::compile("*/databases/*/branches/*/tenants/*.db", t.path()).unwrap();
        assert_eq!(pat.wildcards(), 4);
        assert_eq!(pat.root(), t.path());
        let mut c = Collect::default();
        pat.walk(&mut c);
        c.found.sort();
        let rel: Vec<_> = c
            .found
            .iter()
            .map(|(p, w)| {
                (
                    p.strip_prefix(t.path())
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .to_string(),
                    *w,
                )
            })
            .collect();
        assert_eq!(
            rel,
            vec![
                (
                    "p1/databases/d1/branches/main/tenants/t1.db".to_string(),
                    true
                ),
                (
                    "p1/databases/d1/branches/main/tenants/t2.db".to_string(),
                    false
                ),
                (
                    "p2/databases/d9/branches/dev/tenants/t4.db".to_string(),
                    false
                ),
            ]
        );
        let caps = pat.captures(&c.found[0].0).unwrap();
        assert_eq!(caps, vec!["p1", "d1", "main", "t1"]);
        assert!(pat
            .captures(&t.path().join("p1/other/d1/branches/main/tenants/t3.db"))
            .is_none());
        assert!(pat
            .captures(
                &t.path()
                    .join("p1/databases/d1/branches/main/tenants/t1.db-wal")
            )
            .is_none());
    }

    #[test]
    fn literal_pattern_and_symlinks() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("app.db"), b"x").unwrap();
        std::os::unix::fs::symlink(t.path().join("app.db"), t.path().join("link.db")).unwrap();
        let one = Pattern::compile("app.db", t.path()).unwrap();
        assert_eq!(one.wildcards(), 0);
        let mut c = Collect::default();
        one.walk(&mut c);
        assert_eq!(c.found.len(), 1);
        let all = Pattern::compile("*.db", t.path()).unwrap();
        let mut c = Collect::default();
        all.walk(&mut c);
        assert_eq!(c.found.len(), 1);
        assert_eq!(c.skipped, vec![t.path().join("link.db")]);
        // A FIFO or a socket named like a database is skipped, said once;
        // a directory is not.
        let fifo = std::ffi::CString::new(
            t.path()
                .join("pipe.db")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let _socket = std::os::unix::net::UnixListener::bind(t.path().join("sock.db")).unwrap();
        fs::create_dir(t.path().join("dir.db")).unwrap();
        let mut c = Collect::default();
        all.walk(&mut c);
        c.skipped.sort();
        assert_eq!(
            c.skipped,
            ["link.db", "pipe.db", "sock.db"].map(|n| t.path().join(n))
        );
        let mut c = Collect::default();
        Pattern::compile("pipe.db", t.path()).unwrap().walk(&mut c);
        assert_eq!(c.skipped, vec![t.path().join("pipe.db")]);
    }

    /// A link to a directory at a `*` level is skipped (named), never
    /// walked: its databases would be backed up a second time under other
    /// keys, or from outside the root (black-box audit F19: nothing failed
    /// when the `*` level followed it).
    #[test]
    fn symlinked_directories_at_a_star_level_are_not_followed() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("a")).unwrap();
        fs::write(t.path().join("a/one.db"), b"x").unwrap();
        std::os::unix::fs::symlink(t.path().join("a"), t.path().join("link")).unwrap();
        let pat = Pattern::compile("*/*.db", t.path()).unwrap();
        let mut c = Collect::default();
        pat.walk(&mut c);
        let found: Vec<_> = c.found.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(found, vec![t.path().join("a/one.db")]);
        assert_eq!(c.skipped, vec![t.path().join("link")]);
    }

    #[test]
    fn double_star_rules() {
        for bad in ["/data/a**/x.db", "/data/**/x/**/y.db", "/data/**"] {
            assert!(Pattern::compile(bad, Path::new("/")).is_err(), "{bad}");
        }
    }

    #[test]
    fn double_star_matches_any_depth() {
        let t = tempfile::tempdir().unwrap();
        for p in [
            "top.db",
            "a/one.db",
            "a/b/two.db",
            "a/b/notes.txt",
            "c/d/e/three.db",
        ] {
            let p = t.path().join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b"x").unwrap();
        }
        std::os::unix::fs::symlink(t.path().join("a"), t.path().join("link")).unwrap();
        let pat = Pattern::compile("**/*.db", t.path()).unwrap();
        assert_eq!(pat.wildcards(), 2);
        let mut c = Collect::default();
        pat.walk(&mut c);
        let mut found: Vec<_> = c.found.iter().map(|(p, _)| p.clone()).collect();
        found.sort();
        let rel: Vec<_> = found
            .iter()
            .map(|p| p.strip_prefix(t.path()).unwrap().to_str().unwrap())
            .collect();
        assert_eq!(rel, ["a/b/two.db", "a/one.db", "c/d/e/three.db", "top.db"]);
        assert_eq!(c.skipped, vec![t.path().join("link")]);
        let caps = |p: &str| pat.captures(&t.path().join(p));
        assert_eq!(caps("top.db").unwrap(), ["", "top"]);
        assert_eq!(caps("a/b/two.db").unwrap(), ["a/b", "two"]);
        assert_eq!(caps("a/b/notes.txt"), None);
        // Levels after `**` still match by position.
        let pat = Pattern::compile("x/**/tenants/*.db", t.path()).unwrap();
        let p = t.path().join("x/p1/q/tenants/t1.db");
        assert_eq!(pat.captures(&p).unwrap(), ["p1/q", "t1"]);
        assert_eq!(
            pat.captures(&t.path().join("x/tenants/t1.db")).unwrap(),
            ["", "t1"]
        );
        assert_eq!(pat.captures(&t.path().join("x/p1/other/t1.db")), None);
    }
}

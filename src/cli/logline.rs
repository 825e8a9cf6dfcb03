//! One event, one log line: the text log's writer escapes line breaks and
//! other control characters inside an event.
//!
//! Log lines carry names the host's users choose: database paths and the
//! keys taken from them. A file named `a.db\n2026-12-05T00:00:00Z ERROR ...`
//! would otherwise print a second, forged line, and a carriage return or a
//! terminal control sequence could hide or rewrite what a line says. The
//! text formatter prints field values as they are (`%path`), so the escaping
//! is done once here, on the finished line, for every field of every event.
//! The JSON format escapes its strings itself and is not wrapped.
//!
//! `tracing_subscriber`'s formatter hands over each event as one buffer
//! ending in a single `\n` (it formats into a buffer, then `write_all`s it);
//! everything before that last byte belongs to the one event.

use std::io::{self, Write};

/// A log sink that drops what it cannot write: a line that cannot be
/// written (stderr on a full disk, or closed) is lost, where
/// `tracing_subscriber` would report the failure with `eprintln!` on that
/// same stderr, which panics (black-box probe G27: every command exited 101
/// with its stderr on a full disk, a single restore after installing its
/// output). Wraps both log formats' stderr.
pub struct Lossy<W>(pub W);

impl<W: Write> Write for Lossy<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = self.0.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

/// Writes `text` to stderr, dropping it if stderr cannot take it (see
/// [`Lossy`]): for the closing `error:` line, where `eprint!` would panic.
pub fn to_stderr(text: &str) {
    let _ = Lossy(io::stderr()).write_all(text.as_bytes());
}

/// A writer that keeps each event on one line (see the module docs).
pub struct OneLine<W> {
    inner: W,
    /// The formatter colours its own output: keep ESC (field values are
    /// already stripped of escape sequences by `tracing_subscriber`).
    ansi: bool,
}

impl<W: Write> OneLine<W> {
    pub fn new(inner: W, ansi: bool) -> OneLine<W> {
        OneLine { inner, ansi }
    }
}

/// Appends `c`, escaped when it could break or rewrite a line: C0 and C1
/// control characters, DEL, Unicode's line and paragraph separators (which
/// some log viewers break lines at), and the [`invisible`] characters that
/// reorder or hide text.
fn push_escaped(out: &mut String, c: char, ansi: bool) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\u{1b}' if ansi => out.push(c),
        c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' || invisible(c) => {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
        c => out.push(c),
    }
}

/// Characters that print as nothing but change how the text around them
/// reads: the bidirectional overrides, embeddings, isolates and marks
/// (U+202A to U+202E, U+2066 to U+2069, U+200E, U+200F, U+061C), which can
/// show a key or path as another ("Trojan Source"), and the rest of
/// Unicode's default-ignorable code points (zero-width spaces and joiners,
/// the soft hyphen, fillers, variation selectors, tag characters), which
/// make two different keys look the same (black-box probes U31 and Z32:
/// `list` printed them raw).
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00ad}'
            | '\u{034f}'
            | '\u{061c}'
            | '\u{115f}'..='\u{1160}'
            | '\u{17b4}'..='\u{17b5}'
            | '\u{180b}'..='\u{180f}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}'
            | '\u{3164}'
            | '\u{fe00}'..='\u{fe0f}'
            | '\u{feff}'
            | '\u{ffa0}'
            | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0000}'..='\u{e0fff}'
    )
}

/// `text` (a key, a path) for one line of output: control characters and
/// line separators escaped, so it can neither break the line nor drive the
/// terminal.
pub fn shown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        push_escaped(&mut out, c, false);
    }
    out
}

/// `line` with everything before its final `\n` escaped.
pub fn escape_line(line: &str, ansi: bool) -> String {
    let (body, end) = match line.strip_suffix('\n') {
        Some(body) => (body, "\n"),
        None => (line, ""),
    };
    let mut out = String::with_capacity(line.len() + 8);
    for c in body.chars() {
        push_escaped(&mut out, c, ansi);
    }
    out.push_str(end);
    out
}

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let line = escape_line(&String::from_utf8_lossy(buf), self.ansi);
        self.inner.write_all(line.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A path that carries a forged log line is printed inside its own
    /// event's line, escaped; the real lines around it stay whole.
    #[test]
    fn a_name_cannot_forge_or_hide_a_log_line() {
        let out = Captured::default();
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || OneLine::new(sink.clone(), false))
            .finish();
        let hostile = std::path::Path::new(
            "/data/a.db\n2026-12-05T00:00:00Z ERROR forged\r\u{1b}[2Khidden\u{2028}x",
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("before");
            tracing::warn!(path = %hostile.display(), "snapshot failed");
            tracing::info!("after");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text:?}");
        assert!(lines[0].ends_with("before"), "{text:?}");
        assert!(
            lines[1].contains(r"a.db\n2026-12-05T00:00:00Z ERROR forged\r"),
            "{text:?}"
        );
        assert!(lines[1].contains(r"\u{2028}x"), "{text:?}");
        assert!(!lines[1].contains('\u{1b}'), "{text:?}");
        assert!(lines[2].ends_with("after"), "{text:?}");
    }

    #[test]
    fn colours_stay_and_plain_text_is_unchanged() {
        assert_eq!(
            escape_line("\u{1b}[32mINFO\u{1b}[0m ok\n", true),
            "\u{1b}[32mINFO\u{1b}[0m ok\n"
        );
        assert_eq!(escape_line("\u{1b}[32m\n", false), "\\u{1b}[32m\n");
        assert_eq!(escape_line("päth/ünïcode ok\n", false), "päth/ünïcode ok\n");
    }

    /// A key that reverses the text after it, or differs from another only
    /// by a zero-width space, shows its hidden characters.
    #[test]
    fn characters_that_reorder_or_hide_text_are_shown() {
        assert_eq!(shown("p/\u{202e}bd.a"), "p/\\u{202e}bd.a");
        assert_eq!(shown("p/a\u{200b}b"), "p/a\\u{200b}b");
        assert_eq!(
            shown("\u{2066}x\u{2069}\u{feff}"),
            "\\u{2066}x\\u{2069}\\u{feff}"
        );
        assert_eq!(
            shown("a\u{ad}b\u{e0041}\u{3164}\u{180e}"),
            "a\\u{ad}b\\u{e0041}\\u{3164}\\u{180e}"
        );
        // Letters of right-to-left scripts are text, not controls.
        assert_eq!(shown("p/שלום/مرحبا"), "p/שלום/مرحبا");
    }
}

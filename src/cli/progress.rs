//! How restores show progress: a bar when a person is watching, log lines
//! when a machine is.
//!
//! If stderr is a terminal, [`indicatif`] draws a bar on it: bytes of the
//! object for a single restore, databases for a bulk restore or a restore
//! drill (`verify`, the same [`BulkReporter`]). Otherwise
//! (cron, CI, `2>file`, systemd) nothing is drawn and a bulk restore logs a
//! plain `tracing` line at the start, every [`LOG_EVERY`] databases and at
//! the end; a single restore logs exactly what it logged before progress
//! existed. Log lines carry no ANSI escapes off a terminal (see `cli`).
//!
//! While a bar is on screen, per-database warnings are printed through
//! [`ProgressBar::suspend`] so they do not tear the bar.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::restore::verify::{KeyResult, Status};
use crate::restore::{BulkItem, BulkOutcome, BulkProgress, OnBytes, VerifyProgress};

/// Without a terminal, a bulk restore logs one progress line per this many
/// databases: 200 lines for a 100,000-database fleet, a line every few
/// seconds at typical restore rates, and none in between for small restores.
pub const LOG_EVERY: usize = 500;

/// Bar template for bytes of one download.
const BYTES_TEMPLATE: &str =
    "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}";
/// Bar template for databases of a bulk restore or a drill (`{prefix}`
/// says which).
const DATABASES_TEMPLATE: &str =
    "{spinner} {prefix} [{bar:30}] {pos}/{len} databases {per_sec} eta {eta} {msg}";

/// True when a person is probably watching stderr.
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// A byte progress bar for one download, and the hook that feeds it; `None`
/// when stderr is not a terminal (nothing changes then).
pub fn download_bar(label: &str) -> Option<(ProgressBar, OnBytes)> {
    if !stderr_is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(0)
        .with_style(style(BYTES_TEMPLATE))
        .with_message(label.to_string());
    let b = bar.clone();
    let hook: OnBytes = Arc::new(move |received, total| {
        if b.length() != Some(total) {
            b.set_length(total);
        }
        b.set_position(received);
    });
    Some((bar, hook))
}

/// Bulk restore or drill progress: a bar on a terminal, log lines otherwise.
pub struct BulkReporter {
    bar: Option<ProgressBar>,
    /// `bulk restore` or `verify`, in log lines.
    label: &'static str,
    total: AtomicUsize,
    done: AtomicUsize,
    failed: AtomicUsize,
    start: Instant,
    log_every: usize,
}

impl BulkReporter {
    /// Chooses the bar or log lines from whether stderr is a terminal.
    pub fn for_stderr() -> BulkReporter {
        Self::new(stderr_is_terminal(), LOG_EVERY)
    }

    /// Drill (`verify`) progress, a bar or log lines as [`Self::for_stderr`].
    pub fn verify_for_stderr() -> BulkReporter {
        Self::labeled(stderr_is_terminal(), LOG_EVERY, "verify", "verifying")
    }

    /// `bar`: draw a bar; else log a line every `log_every` databases.
    pub fn new(bar: bool, log_every: usize) -> BulkReporter {
        Self::labeled(bar, log_every, "bulk restore", "restoring")
    }

    fn labeled(
        bar: bool,
        log_every: usize,
        label: &'static str,
        doing: &'static str,
    ) -> BulkReporter {
        BulkReporter {
            bar: bar.then(|| {
                ProgressBar::new(0)
                    .with_style(style(DATABASES_TEMPLATE))
                    .with_prefix(doing)
            }),
            label,
            total: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            start: Instant::now(),
            log_every: log_every.max(1),
        }
    }

    /// Removes the bar (before the summary line is logged).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    fn out_of_band(&self, f: impl FnOnce()) {
        match &self.bar {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }

    fn start(&self, total: usize) {
        self.total.store(total, Ordering::Relaxed);
        match &self.bar {
            Some(bar) => bar.set_length(total as u64),
            None => tracing::info!(databases = total, "{} started", self.label),
        }
    }

    /// One database is done: moves the bar, or logs every `log_every`.
    fn tick(&self, failed: bool) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        let failed = self
            .failed
            .fetch_add(usize::from(failed), Ordering::Relaxed)
            + usize::from(failed);
        match &self.bar {
            Some(bar) => {
                bar.inc(1);
                if failed > 0 {
                    bar.set_message(format!("({failed} failed)"));
                }
            }
            None => {
                let total = self.total.load(Ordering::Relaxed);
                if done.is_multiple_of(self.log_every) && done < total {
                    tracing::info!(
                        done,
                        total,
                        failed,
                        elapsed_s = self.start.elapsed().as_secs(),
                        "{} progress",
                        self.label
                    );
                }
            }
        }
    }
}

impl VerifyProgress for BulkReporter {
    fn started(&self, total: usize) {
        self.start(total);
    }

    fn finished(&self, r: &KeyResult) {
        if let Some(line) = r.failure_line() {
            tracing::debug!("{line}");
        }
        self.tick(r.status != Status::Ok);
    }
}

impl BulkProgress for BulkReporter {
    fn started(&self, total: usize) {
        self.start(total);
    }

    fn finished(&self, item: &BulkItem) {
        let output = item
            .output
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        match &item.outcome {
            BulkOutcome::Failed(e) => {
                self.out_of_band(|| {
                    tracing::warn!(key = %item.key, error = %e, "restore failed; continuing with the others")
                });
            }
            BulkOutcome::Restored { bytes, .. } => {
                tracing::debug!(key = %item.key, %output, bytes, "restored");
            }
            BulkOutcome::SkippedExists => {
                tracing::debug!(key = %item.key, %output, "output exists; skipped");
            }
            BulkOutcome::SkippedNoSnapshotAtTime => {
                // Named, not only counted: a database that existed then but
                // whose snapshot was replaced within the hour is skipped too.
                self.out_of_band(|| {
                    tracing::info!(key = %item.key, "nothing in the replica at or before --timestamp; skipped")
                });
            }
        }
        self.tick(matches!(item.outcome, BulkOutcome::Failed(_)));
    }
}

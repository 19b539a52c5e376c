//! Progress of a full reconciliation, which can take minutes on a large
//! directory: a bar on a terminal, plain lines otherwise (and in logs).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::report::Report;
use crate::model::Category;

/// Told what a full pass is doing, entry by entry.
pub trait Progress: Send {
    /// A category's comparison starts with `total` entries in scope.
    fn category(&mut self, category: Category, total: usize);
    /// One more entry compared; `report` is the pass so far.
    fn scanned(&mut self, report: &Report);
    /// The category is done.
    fn finished(&mut self, report: &Report);
}

/// No progress output.
pub struct Quiet;

impl Progress for Quiet {
    fn category(&mut self, _: Category, _: usize) {}
    fn scanned(&mut self, _: &Report) {}
    fn finished(&mut self, _: &Report) {}
}

/// Changes planned or made so far.
fn changes(report: &Report) -> usize {
    report.associated + report.created_local + report.created_ldap + report.updated + report.deleted + report.disabled
}

/// A line at the start and end of each category and every `every` between.
pub struct Lines {
    say: fn(&str),
    every: Duration,
    category: Option<Category>,
    total: usize,
    scanned: usize,
    started: Instant,
    last: Instant,
}

impl Lines {
    pub fn new(say: fn(&str), every: Duration) -> Lines {
        Lines {
            say,
            every,
            category: None,
            total: 0,
            scanned: 0,
            started: Instant::now(),
            last: Instant::now(),
        }
    }

    fn rate(&self) -> f64 {
        self.scanned as f64 / self.started.elapsed().as_secs_f64().max(0.001)
    }
}

impl Progress for Lines {
    fn category(&mut self, category: Category, total: usize) {
        (self.category, self.total, self.scanned) = (Some(category), total, 0);
        (self.started, self.last) = (Instant::now(), Instant::now());
        (self.say)(&format!("{category}s: comparing {total} entries in scope"));
    }

    fn scanned(&mut self, report: &Report) {
        self.scanned += 1;
        if self.last.elapsed() < self.every {
            return;
        }
        self.last = Instant::now();
        let rate = self.rate();
        let left = self.total.saturating_sub(self.scanned) as f64 / rate.max(0.001);
        (self.say)(&format!(
            "{}s: {}/{} compared ({:.0}%), {rate:.0}/s, about {} left, {} changes",
            self.category.map_or("entrie", |c| c.as_str()),
            self.scanned,
            self.total,
            100.0 * self.scanned as f64 / self.total.max(1) as f64,
            humantime::format_duration(Duration::from_secs(left.ceil() as u64)),
            changes(report)
        ));
    }

    fn finished(&mut self, report: &Report) {
        (self.say)(&format!(
            "{}s: {} compared in {:.1} s ({:.0}/s), {} changes",
            self.category.map_or("entrie", |c| c.as_str()),
            self.scanned,
            self.started.elapsed().as_secs_f64(),
            self.rate(),
            changes(report)
        ));
    }
}

/// A progress bar for a terminal.
#[derive(Default)]
pub struct Bar {
    bar: Option<ProgressBar>,
}

impl Progress for Bar {
    fn category(&mut self, category: Category, total: usize) {
        let bar = ProgressBar::new(total as u64);
        let style = ProgressStyle::with_template("{prefix:>9} [{bar:40}] {pos}/{len} {per_sec} eta {eta} {msg}")
            .expect("a valid template")
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("{category}s"));
        self.bar = Some(bar);
    }

    fn scanned(&mut self, report: &Report) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
            if bar.position() % 64 == 0 {
                bar.set_message(format!("{} changes", changes(report)));
            }
        }
    }

    fn finished(&mut self, report: &Report) {
        if let Some(bar) = self.bar.take() {
            bar.finish_with_message(format!("{} changes", changes(report)));
        }
    }
}

//! What the bench prints: each table as it is measured, then one summary against the targets.

use std::fmt::{self, Write as _};

use imds_guard_tests::Timings;

/// A table being written, and the targets it measured.
#[derive(Default)]
pub struct Report {
    pub text: String,
    pub targets: Vec<Target>,
}

/// One row of the summary: `| target | measured | met |`.
pub struct Target {
    pub goal: String,
    pub measured: String,
    pub met: bool,
}

impl Report {
    /// Records a target this table measured.
    pub fn target(&mut self, target: impl Into<String>, measured: impl Into<String>, met: bool) {
        self.targets.push(Target {
            goal: target.into(),
            measured: measured.into(),
            met,
        });
    }
}

impl fmt::Write for Report {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        self.text.push_str(text);
        Ok(())
    }
}

/// The summary table (tools read its last column: `yes` or `no`).
pub fn summary(targets: &[Target]) -> String {
    let mut text = String::from(
        "## Against the targets\n\n\
         A target is met when the median of its samples meets it (a ratio's: over the \
         interleaved rounds; table 0's: over its rounds; table 0b's: over the agent's starts, \
         each placing its code anew); the brackets are the median's 95% confidence \
         interval.\n\n\
         | target | measured | met |\n|---|---|---|\n",
    );
    for target in targets {
        let _ = writeln!(
            text,
            "| {} | {} | {} |",
            target.goal,
            target.measured,
            if target.met { "yes" } else { "no" }
        );
    }
    text
}

/// Nanoseconds as microseconds, for people.
pub fn micros(ns: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
    let us = ns as f64 / 1000.0;
    format!("{us:.2} µs")
}

pub fn ratio(value: u64, base: u64) -> String {
    if base == 0 {
        return "-".into();
    }
    #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
    let r = value as f64 / base as f64;
    format!("{r:.3}")
}

pub fn spread(t: &Timings) -> String {
    format!(
        "{} ({}–{})",
        micros(t.median_ns),
        micros(t.p10_ns),
        micros(t.p90_ns)
    )
}

//! The event stream: one JSON line per record on stdout, gathered and written in few calls.
//! Enforcement goes on when stdout fails; that is said once, loudly.

use std::io::{self, Write as _};

use tracing::error;

use crate::events::Record;

/// Bytes of JSON lines gathered before they are written to stdout in one call.
const OUTPUT_FLUSH_BYTES: usize = 64 * 1024;

/// JSON lines not yet written to stdout.
pub struct Output {
    out: Vec<u8>,
    failed: bool,
}

impl Default for Output {
    fn default() -> Self {
        Self {
            out: Vec::with_capacity(OUTPUT_FLUSH_BYTES),
            failed: false,
        }
    }
}

impl Output {
    /// Adds `record` as a JSON line; writes out when enough has gathered.
    pub fn emit(&mut self, record: &Record) {
        record.write_line(&mut self.out);
        if self.out.len() >= OUTPUT_FLUSH_BYTES {
            self.flush();
        }
    }

    /// Writes out what was emitted.
    pub fn flush(&mut self) {
        if self.out.is_empty() {
            return;
        }
        let written = io::stdout().lock().write_all(&self.out);
        if let Err(err) = written
            && !self.failed
        {
            self.failed = true;
            error!("cannot write events to stdout ({err}); still enforcing, events are lost");
        }
        self.out.clear();
    }
}

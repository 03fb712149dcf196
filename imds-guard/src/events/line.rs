//! The event stream's line: a [`Record`] as one JSON object, written straight into the output
//! buffer. The keys are constants; the names of verdicts, hooks and families are the agent's
//! own; times and addresses are formatted in place. Only text a workload chose (a command
//! line, a thread or cgroup name) can hold a character JSON must escape, and it is escaped as
//! `serde_json` does; a string without one is copied whole.

use std::{
    fmt,
    io::Write as _,
    net::{IpAddr, Ipv4Addr},
};

use crate::{events::Record, host::workload::Container};

/// A time in nanoseconds since the Unix epoch, written as RFC 3339 in UTC with the fraction of
/// a second it has (`2026-12-03T07:24:08.5Z`), as `jiff` writes a timestamp (and, outside
/// `jiff`'s years, as the number of nanoseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct UnixTime(pub i128);

const NS_PER_SEC: u64 = 1_000_000_000;
const SECS_PER_DAY: u64 = 86_400;

impl UnixTime {
    /// Writes the time, quoted, to `out`.
    fn write_quoted(self, out: &mut Vec<u8>) {
        out.push(b'"');
        // 1970 to 2554, in 64-bit arithmetic; other times are outside what a clock shows, and
        // need not be fast.
        if let Ok(ns) = u64::try_from(self.0) {
            write_fast(ns, out);
        } else {
            let _ = write!(out, "{}", self.slow());
        }
        out.push(b'"');
    }

    /// The time as `jiff` writes it, or the nanoseconds where it has no timestamp for them.
    fn slow(self) -> String {
        jiff::Timestamp::from_nanosecond(self.0)
            .map_or_else(|_| self.0.to_string(), |t| t.to_string())
    }
}

impl fmt::Display for UnixTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = Vec::with_capacity(32);
        self.write_quoted(&mut out);
        // Digits, dashes, colons and the ASCII `jiff` writes.
        f.write_str(std::str::from_utf8(&out[1..out.len() - 1]).map_err(|_| fmt::Error)?)
    }
}

/// `ns` since the epoch as RFC 3339 in UTC: the civil date of its day number (Howard Hinnant's
/// `civil_from_days`), the time of day, the fraction of a second without trailing zeros.
fn write_fast(ns: u64, out: &mut Vec<u8>) {
    let secs = ns / NS_PER_SEC;
    let nanos = u32::try_from(ns % NS_PER_SEC).unwrap_or(0);
    let days = secs / SECS_PER_DAY;
    let of_day = u32::try_from(secs % SECS_PER_DAY).unwrap_or(0);
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let mut text = *b"0000-00-00T00:00:00";
    digits(&mut text[0..4], u32::try_from(year).unwrap_or(0));
    digits(&mut text[5..7], u32::try_from(month).unwrap_or(0));
    digits(&mut text[8..10], u32::try_from(day).unwrap_or(0));
    digits(&mut text[11..13], of_day / 3600);
    digits(&mut text[14..16], of_day / 60 % 60);
    digits(&mut text[17..19], of_day % 60);
    out.extend_from_slice(&text);
    if nanos > 0 {
        let mut fraction = *b".000000000";
        digits(&mut fraction[1..], nanos);
        let end = fraction.iter().rposition(|&b| b != b'0').unwrap_or(0) + 1;
        out.extend_from_slice(&fraction[..end]);
    }
    out.push(b'Z');
}

/// `value`'s last `slot.len()` decimal digits into `slot`, zero-padded.
fn digits(slot: &mut [u8], mut value: u32) {
    for byte in slot.iter_mut().rev() {
        // A digit: `value % 10` is below 10.
        *byte = b'0' + u8::try_from(value % 10).unwrap_or(0);
        value /= 10;
    }
}

/// Whether JSON needs any byte of `bytes` escaped: a control character, `"` or `\`. Reads all
/// of them without stopping early, which the compiler turns into vector compares.
#[expect(
    clippy::needless_bitwise_bool,
    reason = "no branch per byte, so that the loop becomes vector compares"
)]
fn needs_escape(bytes: &[u8]) -> bool {
    bytes.iter().fold(false, |any, &b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    })
}

/// The JSON line being written.
struct Line<'a>(&'a mut Vec<u8>);

impl Line<'_> {
    /// Bytes as they are: keys, punctuation.
    fn raw(&mut self, text: &str) {
        self.0.extend_from_slice(text.as_bytes());
    }

    /// A string, quoted and escaped as `serde_json` escapes it.
    fn str(&mut self, text: &str) {
        let out = &mut *self.0;
        out.push(b'"');
        let bytes = text.as_bytes();
        if needs_escape(bytes) {
            escape(out, bytes);
        } else {
            out.extend_from_slice(bytes);
        }
        out.push(b'"');
    }

    fn opt_str(&mut self, text: Option<&str>) {
        match text {
            Some(text) => self.str(text),
            None => self.raw("null"),
        }
    }

    fn num(&mut self, value: impl itoa::Integer) {
        self.raw(itoa::Buffer::new().format(value));
    }

    fn opt_num(&mut self, value: Option<impl itoa::Integer>) {
        match value {
            Some(value) => self.num(value),
            None => self.raw("null"),
        }
    }

    fn bool(&mut self, value: bool) {
        self.raw(if value { "true" } else { "false" });
    }

    fn time(&mut self, time: UnixTime) {
        time.write_quoted(self.0);
    }

    fn addr(&mut self, addr: IpAddr) {
        self.0.push(b'"');
        match addr {
            IpAddr::V4(addr) => self.ipv4(addr),
            // IPv6 text has its zero-run rules: left to the standard library.
            IpAddr::V6(addr) => {
                let _ = write!(self.0, "{addr}");
            }
        }
        self.0.push(b'"');
    }

    fn ipv4(&mut self, addr: Ipv4Addr) {
        for (index, octet) in addr.octets().into_iter().enumerate() {
            if index > 0 {
                self.0.push(b'.');
            }
            self.num(octet);
        }
    }

    fn container(&mut self, container: Option<&Container>) {
        let Some(container) = container else {
            self.raw("null");
            return;
        };
        self.raw("{\"runtime\":");
        self.opt_str(container.runtime.as_deref());
        self.raw(",\"id\":");
        self.str(&container.id);
        self.raw("}");
    }
}

/// `bytes` (valid UTF-8) with `"`, `\` and control characters escaped as `serde_json` does:
/// `\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`, else `\u00XX`.
fn escape(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut start = 0;
    for (at, &byte) in bytes.iter().enumerate() {
        let short = match byte {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0..0x20 => 0,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..at]);
        start = at + 1;
        if short == 0 {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(byte >> 4)]);
            out.push(HEX[usize::from(byte & 0xf)]);
        } else {
            out.extend_from_slice(&[b'\\', short]);
        }
    }
    out.extend_from_slice(&bytes[start..]);
}

impl Record {
    /// Appends the record's JSON line, with its newline, to `out`.
    pub fn write_line(&self, out: &mut Vec<u8>) {
        let mut line = Line(out);
        line.raw("{\"time\":");
        let time = line.0.len();
        line.time(self.time);
        let time = time..line.0.len();
        line.raw(",\"verdict\":\"");
        line.raw(self.verdict.name());
        line.raw("\",\"count\":");
        line.num(self.count);
        line.raw(",\"aggregated\":");
        line.bool(self.aggregated);
        // A time written once is copied (an event's three are one).
        for (key, at) in [
            (",\"first_seen\":", self.first_seen),
            (",\"last_seen\":", self.last_seen),
        ] {
            line.raw(key);
            if at == self.time {
                line.0.extend_from_within(time.clone());
            } else {
                line.time(at);
            }
        }
        line.raw(",\"pid\":");
        line.opt_num(self.pid);
        line.raw(",\"tgid\":");
        line.opt_num(self.tgid);
        line.raw(",\"ppid\":");
        line.opt_num(self.ppid);
        line.raw(",\"parent_comm\":");
        line.opt_str(self.parent_comm.as_deref());
        line.raw(",\"uid\":");
        line.num(self.uid);
        line.raw(",\"user\":");
        line.opt_str(self.user.as_deref());
        line.raw(",\"gid\":");
        line.opt_num(self.gid);
        line.raw(",\"group\":");
        line.opt_str(self.group.as_deref());
        line.raw(",\"comm\":");
        line.opt_str(self.comm.as_deref());
        line.raw(",\"exe\":");
        line.opt_str(self.exe.as_deref());
        line.raw(",\"cmdline\":");
        line.opt_str(self.cmdline.as_deref());
        line.raw(",\"cgroup_id\":");
        line.num(self.cgroup_id);
        let workload = &*self.workload;
        line.raw(",\"cgroup\":");
        line.opt_str(workload.path.as_deref());
        line.raw(",\"unit\":");
        line.opt_str(workload.placement.unit.as_deref());
        line.raw(",\"container\":");
        line.container(workload.placement.container.as_ref());
        line.raw(",\"pod_uid\":");
        line.opt_str(workload.placement.pod_uid.as_deref());
        line.raw(",\"in_container\":");
        line.bool(self.in_container);
        line.raw(",\"family\":\"");
        line.raw(self.family.name());
        line.raw("\",\"protocol\":");
        line.opt_str(self.protocol.as_deref());
        line.raw(",\"dst\":");
        line.addr(self.dst);
        line.raw(",\"port\":");
        line.opt_num(self.port);
        line.raw(",\"rule\":");
        line.str(&self.rule);
        line.raw(",\"hook\":\"");
        line.raw(self.hook.name());
        line.raw("\",\"rewritten\":");
        line.bool(self.rewritten);
        if self.uid_ignored {
            line.raw(",\"uid_ignored\":true");
        }
        if let Some(version) = self.imds_version {
            line.raw(",\"imds_version\":\"");
            line.raw(version.name());
            line.raw("\"");
        }
        if let Some(request) = &self.request {
            line.raw(",\"request\":");
            line.str(request);
        }
        if let Some(refused) = self.refused {
            line.raw(",\"refused\":\"");
            line.raw(refused.name());
            line.raw("\"");
        }
        if self.posture_check {
            line.raw(",\"posture_check\":true");
        }
        line.raw(",\"unread\":[");
        for (index, field) in self.unread.iter().enumerate() {
            if index > 0 {
                line.raw(",");
            }
            line.str(field);
        }
        line.raw("]}\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A xorshift generator: the same cases on every run.
    struct Cases(u64);

    impl Cases {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn times_are_written_as_jiff_writes_them() {
        let edges = [
            0,
            1,
            999_999_999,
            1_000_000_000,
            // 1972-12-31T23:59:59.999999999Z, 2000-02-29T12:00:00.5Z, 2100-03-01T00:00:00Z.
            94_694_399_999_999_999,
            951_825_600_500_000_000,
            4_107_542_400_000_000_000,
            // The last of 64-bit nanoseconds (2554), jiff's last timestamp (9999), past it.
            i128::from(u64::MAX),
            i128::from(u64::MAX) + 1,
            253_402_207_200_999_999_999,
            253_402_207_201_000_000_000,
            -1,
            i128::MAX,
            i128::MIN,
        ];
        let mut cases = Cases(0x2545_f491_4f6c_dd1d);
        let random = (0..60_000).map(|_| {
            let ns = match cases.below(4) {
                // Any 64-bit time, this century's, beyond 2554 (and 9999), before 1970.
                0 => i128::from(cases.next()),
                1 => i128::from(cases.below(4_000_000_000_000_000_000)),
                2 => i128::from(cases.next()) * i128::from(cases.below(14_000)),
                _ => -i128::from(cases.next()),
            };
            // Whole seconds and milliseconds too: their fractions are trimmed.
            match cases.below(3) {
                0 => ns - ns % i128::from(NS_PER_SEC),
                1 => ns - ns % 1_000_000,
                _ => ns,
            }
        });
        for ns in edges.into_iter().chain(random) {
            let time = UnixTime(ns);
            assert_eq!(time.to_string(), time.slow(), "{ns}");
            let mut quoted = Vec::new();
            time.write_quoted(&mut quoted);
            assert_eq!(quoted, format!("\"{}\"", time.slow()).into_bytes(), "{ns}");
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let pieces = [
            "a", "Z", " ", "/", "\"", "\\", "\n", "\r", "\t", "\u{8}", "\u{c}", "\u{0}", "\u{1f}",
            "\u{7f}", "é", "日", "😀", "\u{2028}",
        ];
        let mut cases = Cases(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let len = cases.below(40);
            let text: String = (0..len)
                .map(|_| pieces[usize::try_from(cases.below(pieces.len() as u64)).unwrap()])
                .collect();
            let mut out = Vec::new();
            Line(&mut out).str(&text);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(&text).unwrap()
            );
        }
    }

    #[test]
    fn addresses_are_written_as_the_standard_library_writes_them() {
        let mut cases = Cases(0x1234_5678_9abc_def1);
        for _ in 0..10_000 {
            let v4 = Ipv4Addr::from(u32::try_from(cases.next() >> 32).unwrap());
            let mut v6 = [0u8; 16];
            for byte in &mut v6 {
                // Zero runs and mapped addresses come often.
                *byte = if cases.below(2) == 0 {
                    0
                } else {
                    cases.next().to_le_bytes()[0]
                };
            }
            for addr in [
                IpAddr::V4(v4),
                IpAddr::V6(v6.into()),
                IpAddr::V6(v4.to_ipv6_mapped()),
            ] {
                let mut out = Vec::new();
                Line(&mut out).addr(addr);
                assert_eq!(out, format!("\"{addr}\"").into_bytes());
            }
        }
    }
}

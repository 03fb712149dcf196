//! The message layer: what the kernel keeps of each HTTP connection to a protected address, how a
//! request is classified (`token`, `v2`, `v1`) and how its path is judged against a rule's
//! `paths` and `deny_paths`. The kernel runs [`judge_request_with`] at the end of each request's
//! headers, each pattern matched by [`pattern_says`] in a function of its own; the agent runs
//! the same functions through [`judge_request`] in its tests.
//!
//! A request line is kept in [`HttpSocket::request`] as it streams in; its path is split into
//! parts, each hashed ([`part_hash`], lowercase, so `IAM` is `iam`: a deny rule can only grow by
//! it), and compared with patterns the agent compiled into the same hashes.

use crate::event::{VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY};

/// The destination port whose TCP connections the message layer reads: IMDS, ECS's and EKS
/// Pod Identity's credential endpoints all serve HTTP on port 80.
pub const HTTP_PORT: u16 = 80;

/// Not classified (no complete request yet).
pub const IMDS_VERSION_NONE: u8 = 0;
/// A request with neither a token nor a token request: IMDSv1.
pub const IMDS_VERSION_V1: u8 = 1;
/// A request carrying `X-aws-ec2-metadata-token`.
pub const IMDS_VERSION_V2: u8 = 2;
/// `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds`.
pub const IMDS_VERSION_TOKEN: u8 = 3;
/// Kinds of request counted per rule ([`http_counter_index`]): v1, v2, token.
pub const IMDS_VERSIONS: u32 = 3;
/// The versions counted per rule, in the order of their counters (and of the agent's arrays of
/// counts).
pub const COUNTED_VERSIONS: [u8; IMDS_VERSIONS as usize] =
    [IMDS_VERSION_V1, IMDS_VERSION_V2, IMDS_VERSION_TOKEN];

/// Bytes of a request line kept (and reported in an event's `request`); a longer line is cut,
/// and its path is judged unreadable. A power of two.
pub const HTTP_REQUEST_BYTES: usize = 256;
/// Header bytes (after the request line) read per request: a request whose headers run longer
/// is judged by what was read (a token header beyond it is not seen: the request counts as v1).
pub const HTTP_HEADER_BYTES_MAX: u32 = 4096;
/// Bytes read per run of the message program: a longer write is judged in chunks
/// (`bpf_msg_apply_bytes`), each a run of its own. Each costs the verifier ~70 instructions
/// (the byte's step is a function it checks once): a request an SDK writes at once is one run.
pub const HTTP_CHUNK_BYTES: u32 = 256;

/// Parts of a path a pattern can name; a request path with more parts matches only patterns
/// ending in `**`. A power of two (indices are masked with it).
pub const PATH_PARTS_MAX: usize = 8;
/// Patterns (`paths` and `deny_paths` together) a rule may have. A power of two.
pub const PATH_PATTERNS_MAX: usize = 16;

/// [`HttpSocket::phase`]: reading the request line.
pub const PHASE_LINE: u8 = 0;
/// [`HttpSocket::phase`]: reading header lines.
pub const PHASE_HEADERS: u8 = 1;
/// [`HttpSocket::phase`]: a request was refused: every later write is refused too (the server
/// holds an incomplete request; nothing after it can be read as a request of its own).
pub const PHASE_REFUSED: u8 = 2;

/// [`HttpSocket::seen`]: `X-aws-ec2-metadata-token` was among the headers.
pub const SEEN_TOKEN: u8 = 1;
/// [`HttpSocket::seen`]: `X-aws-ec2-metadata-token-ttl-seconds` was among the headers.
pub const SEEN_TOKEN_TTL: u8 = 2;

/// [`HttpSocket::name_pos`] once the header name no longer matches the token headers.
pub const NAME_OTHER: u8 = 0xfe;
/// [`HttpSocket::name_pos`] after the colon: in the header's value.
pub const NAME_IN_VALUE: u8 = 0xff;

/// The longer of the two header names, lowercase; the other is its first
/// [`TOKEN_HEADER_LEN`] bytes.
pub const TOKEN_TTL_HEADER: &[u8; 36] = b"x-aws-ec2-metadata-token-ttl-seconds";
/// Length of `x-aws-ec2-metadata-token`.
pub const TOKEN_HEADER_LEN: u8 = 24;

/// What the kernel keeps of one HTTP connection to a protected address, in socket-local
/// storage (`HTTP_SOCKETS`): who was let through at `connect()` and how far the current
/// request has been read.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[expect(
    clippy::pub_underscore_fields,
    reason = "padding is written out and zeroed, never read"
)]
pub struct HttpSocket {
    /// The rule that let the connect through (or `RULE_DEFAULT` in audit mode).
    pub rule: u32,
    /// cgroup v2 id of the task that connected.
    pub cgroup_id: u64,
    /// The policy generation that judged the connect.
    pub generation: u8,
    /// `VERDICT_ALLOW` or `VERDICT_AUDIT`: the connect's verdict.
    pub verdict: u8,
    /// `RULE_FLAG_*` bits of the deciding rule (`RULE_FLAG_V2`, `RULE_FLAG_PATHS`,
    /// `RULE_FLAG_AUDIT`), and `RULE_FLAG_MODE_AUDIT` when the global mode was audit.
    pub rule_flags: u8,
    /// `EVENT_FLAG_CONTAINER` when the connect was judged as a container's.
    pub event_flags: u8,
    /// `PHASE_*`.
    pub phase: u8,
    /// In a header line: how many bytes of its name match [`TOKEN_TTL_HEADER`], or
    /// [`NAME_OTHER`], or [`NAME_IN_VALUE`].
    pub name_pos: u8,
    /// Non-zero while the current header line has had no byte but `\r`.
    pub line_empty: u8,
    /// `SEEN_*` bits of the current request.
    pub seen: u8,
    /// Bytes of the current request line read so far (those past [`HTTP_REQUEST_BYTES`] are
    /// not kept).
    pub line_len: u32,
    /// Header bytes of the current request read so far.
    pub header_bytes: u32,
    /// The request line, as far as it was kept.
    pub request: [u8; HTTP_REQUEST_BYTES],
    /// The request line's parser.
    pub line: LineParser,
    /// The hashes of the path's parts, as far as they were read.
    pub parts: [u64; PATH_PARTS_MAX],
    /// Bytes of the stream the message program let through, counted from its first: the
    /// packet layer drops a segment carrying any byte beyond them (one no write was read for:
    /// TCP Fast Open's, sent in or right after the SYN before the connection is in the
    /// socket map) where the rule refuses requests.
    pub passed: u32,
    /// The sequence number of the stream's first byte (the SYN's plus one), as the packet layer
    /// saw the SYN go out.
    pub data_seq: u32,
    /// Non-zero once `data_seq` is known.
    pub seq_known: u8,
    /// Padding, zeroed.
    pub _pad: [u8; 3],
    /// `Settings::epoch` of the policy that judged the connect: `generation` names its slot,
    /// which the policy after the next reuses (and its rule ids with it).
    pub epoch: u32,
}
const _: () = assert!(core::mem::size_of::<HttpSocket>() == 384);

/// Whether a connection decided with `rule_flags` has its requests refused when the rule does
/// not allow them: the rule judges requests (`imds = "v2"`, `paths`, `deny_paths`) and neither
/// it nor the mode is audit. Only such a connection is ever refused what could not be read.
#[inline]
#[must_use]
pub const fn refuses_requests(rule_flags: u8) -> bool {
    use crate::policy::{RULE_FLAG_AUDIT, RULE_FLAG_MODE_AUDIT, RULE_FLAG_PATHS, RULE_FLAG_V2};
    let flags = rule_flags as u32;
    flags & (RULE_FLAG_V2 | RULE_FLAG_PATHS) != 0
        && flags & (RULE_FLAG_AUDIT | RULE_FLAG_MODE_AUDIT) == 0
}

/// Whether a TCP segment of a followed connection carries a byte the message program did not let
/// through: the segment's bytes end `seq + payload` (sequence space), the stream's first byte is
/// `data_seq`, and `passed` bytes were let through. Wraps as sequence numbers do.
#[inline]
#[must_use]
pub const fn carries_unread(seq: u32, payload: u32, data_seq: u32, passed: u32) -> bool {
    if payload == 0 {
        return false;
    }
    let end = seq.wrapping_add(payload).wrapping_sub(data_seq);
    // `end` past `passed`, as sequence numbers compare (within 2 GiB of each other).
    end.wrapping_sub(passed).cast_signed() > 0
}

/// One pattern of `paths` or `deny_paths`, compiled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[expect(
    clippy::pub_underscore_fields,
    reason = "padding is written out and zeroed, never read"
)]
pub struct PathPattern {
    /// [`part_hash`] of each literal part; [`ANY_PART`] for a part that is `*`.
    pub parts: [u64; PATH_PARTS_MAX],
    /// Parts in `parts`.
    pub len: u8,
    /// `PATTERN_*` bits.
    pub flags: u8,
    /// Explicit padding, always 0.
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<PathPattern>() == 72);

/// [`PathPattern::parts`] of a part written `*`: any one part.
pub const ANY_PART: u64 = 0;
/// [`PathPattern::flags`]: a `deny_paths` pattern (else a `paths` one).
pub const PATTERN_DENY: u8 = 1;
/// [`PathPattern::flags`]: the pattern ends in `**`: one or more parts follow `parts`.
pub const PATTERN_SUBTREE: u8 = 2;

/// Key of `PATH_RULES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathRulesKey {
    /// Policy generation, 0 or 1.
    pub generation: u32,
    /// The rule id.
    pub rule: u32,
}
const _: () = assert!(core::mem::size_of::<PathRulesKey>() == 8);

/// Value of `PATH_RULES`: a rule's `paths` and `deny_paths`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathRules {
    /// Patterns in use.
    pub len: u32,
    /// Non-zero when the rule has `paths` (an allow list): a request matching none is refused.
    pub allow_list: u32,
    /// The patterns, `len` of them.
    pub patterns: [PathPattern; PATH_PATTERNS_MAX],
}
const _: () = assert!(core::mem::size_of::<PathRules>() == 8 + 72 * PATH_PATTERNS_MAX);

impl Default for PathRules {
    fn default() -> Self {
        Self {
            len: 0,
            allow_list: 0,
            patterns: [PathPattern::default(); PATH_PATTERNS_MAX],
        }
    }
}

/// FNV-1a's offset basis: the hash of an empty part.
pub const PART_HASH_START: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// One step of [`part_hash`]: `byte` (lowercased) added to `hash`.
#[inline]
#[must_use]
pub const fn part_hash_step(hash: u64, byte: u8) -> u64 {
    (hash ^ byte.to_ascii_lowercase() as u64).wrapping_mul(FNV_PRIME)
}

/// The hash of one path part (FNV-1a 64 of its lowercase bytes), never [`ANY_PART`].
#[must_use]
pub const fn part_hash(part: &[u8]) -> u64 {
    let mut hash = PART_HASH_START;
    let mut i = 0;
    while i < part.len() {
        hash = part_hash_step(hash, part[i]);
        i += 1;
    }
    // 0 stands for `*`: move a real 0 out of its way.
    if hash == ANY_PART { 1 } else { hash }
}

/// A request line as [`parse_request`] read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// The method is `PUT`.
    pub put: bool,
    /// The path's parts, hashed; `len` of them (at most [`PATH_PARTS_MAX`]).
    pub parts: [u64; PATH_PARTS_MAX],
    /// Parts read.
    pub len: u8,
    /// The path has more parts than [`PATH_PARTS_MAX`].
    pub deeper: bool,
    /// The path cannot be judged safely: not absolute, cut, with an empty, `.` or `..` part,
    /// or with a byte a server may decode or normalise (`%`, `\`, `#`, a control byte).
    pub unreadable: bool,
}

/// Reads a request line one byte at a time: the method is skipped, the target's path split into
/// parts and each hashed as it ends. The kernel keeps it in the socket's record between writes
/// (no loop over the line at the end: a loop whose registers hold the parser's state is one
/// the verifier explores once per combination of their values).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[expect(
    clippy::pub_underscore_fields,
    reason = "padding is written out and zeroed, never read"
)]
pub struct LineParser {
    /// [`part_hash`] of the current part so far.
    pub hash: u64,
    /// Bytes in the current part.
    pub part_bytes: u16,
    /// 0: the method; 4: the target's first byte; 1: the path; 2: the query; 3: done.
    pub stage: u8,
    /// How many of the current part's bytes (at most 2) are leading dots.
    pub dots: u8,
    /// Non-zero once the path cannot be judged safely.
    pub bad: u8,
    /// Parts completed (at most [`PATH_PARTS_MAX`] are kept).
    pub count: u8,
    /// Non-zero when the path has more parts than are kept.
    pub deeper: u8,
    /// Explicit padding, always 0.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<LineParser>() == 16);

impl LineParser {
    /// A parser at the start of a request line.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            hash: PART_HASH_START,
            part_bytes: 0,
            stage: 0,
            dots: 0,
            bad: 0,
            count: 0,
            deeper: 0,
            _pad: 0,
        }
    }

    /// Reads `byte` of the line (`\n` ends it), storing each completed part's hash in `parts`.
    #[expect(
        clippy::inline_always,
        reason = "the message program must not call a subprogram per byte"
    )]
    #[inline(always)]
    pub fn feed(&mut self, byte: u8, parts: &mut [u64; PATH_PARTS_MAX]) {
        match self.stage {
            0 if byte == b' ' => self.stage = 4,
            4 => {
                // An absolute path only (not `http://host/...`, not `*`).
                if byte == b'/' {
                    self.stage = 1;
                } else {
                    self.bad = 1;
                    self.stage = 3;
                }
            }
            1 | 2 => {
                let end_of_target = byte == b' ' || byte == b'\r' || byte == b'\n';
                if self.stage == 1 && (byte == b'/' || byte == b'?' || end_of_target) {
                    // An empty part (`//`) only where it ends the path after a real part:
                    // `/latest/meta-data/` lists a directory.
                    let closing = byte != b'/';
                    if (self.part_bytes == 0 && !(closing && self.count > 0))
                        || (self.part_bytes > 0 && self.part_bytes == u16::from(self.dots))
                    {
                        self.bad = 1;
                    }
                    if self.part_bytes > 0 {
                        let hash = if self.hash == ANY_PART { 1 } else { self.hash };
                        if (self.count as usize) < PATH_PARTS_MAX {
                            // `black_box`: LLVM would drop the mask (the test above implies it)
                            // and the verifier, which lost that test's bound in a spill, would
                            // refuse the store.
                            let slot =
                                core::hint::black_box(self.count as usize & (PATH_PARTS_MAX - 1));
                            parts[slot & (PATH_PARTS_MAX - 1)] = hash;
                            self.count += 1;
                        } else {
                            self.deeper = 1;
                        }
                    }
                    self.hash = PART_HASH_START;
                    self.part_bytes = 0;
                    self.dots = 0;
                    if byte == b'?' {
                        self.stage = 2;
                    }
                } else if self.stage == 1 {
                    if byte == b'%' || byte == b'\\' || byte == b'#' || byte < 0x20 || byte == 0x7f
                    {
                        self.bad = 1;
                    }
                    self.hash = part_hash_step(self.hash, byte);
                    if byte == b'.' && u16::from(self.dots) == self.part_bytes && self.dots < 2 {
                        self.dots += 1;
                    }
                    self.part_bytes = self.part_bytes.saturating_add(1);
                }
                if end_of_target {
                    self.stage = 3;
                }
            }
            _ => {}
        }
    }

    /// The request read: `line` holds its first bytes (for the method), `len` is how long the
    /// line was (longer than the buffer: cut, so unreadable), `parts` what [`feed`] stored.
    ///
    /// [`feed`]: LineParser::feed
    #[must_use]
    #[expect(clippy::inline_always, reason = "one body with the message program's")]
    #[inline(always)]
    pub fn request(
        &self,
        line: &[u8; HTTP_REQUEST_BYTES],
        len: u32,
        parts: &[u64; PATH_PARTS_MAX],
    ) -> Request {
        Request {
            put: line[0] == b'P' && line[1] == b'U' && line[2] == b'T' && line[3] == b' ',
            parts: *parts,
            #[expect(
                clippy::cast_possible_truncation,
                reason = "PATH_PARTS_MAX fits a byte"
            )]
            len: if (self.count as usize) < PATH_PARTS_MAX {
                self.count
            } else {
                PATH_PARTS_MAX as u8
            },
            deeper: self.deeper != 0,
            unreadable: self.bad != 0 || self.stage != 3 || len as usize > HTTP_REQUEST_BYTES,
        }
    }
}

/// Reads a whole request line `line` (its first `len` bytes, without its `\n`) as the kernel
/// does byte by byte: for the agent and the tests.
#[must_use]
pub fn parse_request(line: &[u8; HTTP_REQUEST_BYTES], len: u32) -> Request {
    let mut parser = LineParser::new();
    let mut parts = [0; PATH_PARTS_MAX];
    for &byte in line.iter().take((len as usize).min(HTTP_REQUEST_BYTES)) {
        parser.feed(byte, &mut parts);
    }
    parser.feed(b'\n', &mut parts);
    parser.request(line, len, &parts)
}

/// `/latest/api/token`, as [`Request::parts`].
const TOKEN_PATH: [u64; 3] = [part_hash(b"latest"), part_hash(b"api"), part_hash(b"token")];

impl Request {
    /// The token request's line: `PUT /latest/api/token`.
    #[must_use]
    pub fn is_token_request(&self) -> bool {
        self.put
            && !self.unreadable
            && !self.deeper
            && self.len == 3
            && self.parts[0] == TOKEN_PATH[0]
            && self.parts[1] == TOKEN_PATH[1]
            && self.parts[2] == TOKEN_PATH[2]
    }
}

/// Whether `pattern` matches the path of `request`.
#[inline]
#[must_use]
pub fn pattern_matches(pattern: &PathPattern, request: &Request) -> bool {
    let len = pattern.len as usize;
    let subtree = pattern.flags & PATTERN_SUBTREE != 0;
    let length_fits = if subtree {
        request.deeper || (request.len as usize) > len
    } else {
        !request.deeper && request.len as usize == len
    };
    if !length_fits {
        return false;
    }
    let mut i = 0;
    while i < PATH_PARTS_MAX {
        if i >= len {
            break;
        }
        let part = pattern.parts[i & (PATH_PARTS_MAX - 1)];
        if part != ANY_PART && part != request.parts[i & (PATH_PARTS_MAX - 1)] {
            return false;
        }
        i += 1;
    }
    true
}

/// Why a request was refused ([`Judged::refused`]).
pub const REFUSED_NONE: u8 = 0;
/// An IMDSv1 request where the rule requires IMDSv2.
pub const REFUSED_V1: u8 = 1;
/// A path the rule's `paths`/`deny_paths` do not allow.
pub const REFUSED_PATH: u8 = 2;
/// A path that cannot be judged safely, for a rule with path patterns.
pub const REFUSED_UNREADABLE_PATH: u8 = 3;

/// What [`judge_request`] decided about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Judged {
    /// `IMDS_VERSION_*`.
    pub version: u8,
    /// `REFUSED_*`: what the rule does not allow (in audit, it is reported, not refused).
    pub refused: u8,
    /// `VERDICT_ALLOW` (passes, not reported unless v1), `VERDICT_AUDIT` (passes, reported as
    /// what enforcement would refuse) or `VERDICT_DENY` (the write fails).
    pub verdict: u8,
}

/// Classifies a complete request (its line read into `request`, its headers' `SEEN_*` bits
/// `seen`) and judges it by the rule's flags (`RULE_FLAG_*` of [`HttpSocket::rule_flags`]) and,
/// when it has path patterns, by `paths` (`None` when the rule has them but they cannot be
/// read: refused, fail closed).
#[inline]
#[must_use]
pub fn judge_request(
    rule_flags: u8,
    request: &Request,
    seen: u8,
    paths: Option<&PathRules>,
) -> Judged {
    judge_request_with(rule_flags, request, seen, || match paths {
        None => REFUSED_PATH,
        Some(paths) => paths_refuse(paths.len, paths.allow_list != 0, |i| {
            pattern_says(&paths.patterns[i & (PATH_PATTERNS_MAX - 1)], request)
        }),
    })
}

/// [`judge_request`], with what the rule's path patterns say of the request asked of
/// `path_refused` (`REFUSED_NONE` or `REFUSED_PATH`; only asked for a readable request under a
/// rule with patterns). The kernel judges each pattern in a function of its own (see
/// [`paths_refuse`]).
#[inline]
#[must_use]
pub fn judge_request_with(
    rule_flags: u8,
    request: &Request,
    seen: u8,
    path_refused: impl FnOnce() -> u8,
) -> Judged {
    use crate::policy::{RULE_FLAG_AUDIT, RULE_FLAG_MODE_AUDIT, RULE_FLAG_PATHS, RULE_FLAG_V2};
    let token = request.is_token_request();
    let version = if token && seen & SEEN_TOKEN_TTL != 0 {
        IMDS_VERSION_TOKEN
    } else if seen & SEEN_TOKEN != 0 {
        IMDS_VERSION_V2
    } else {
        IMDS_VERSION_V1
    };
    let mut refused = REFUSED_NONE;
    if u32::from(rule_flags) & RULE_FLAG_PATHS != 0 && !(token && version == IMDS_VERSION_TOKEN) {
        refused = if request.unreadable {
            REFUSED_UNREADABLE_PATH
        } else {
            path_refused()
        };
    }
    if refused == REFUSED_NONE
        && u32::from(rule_flags) & RULE_FLAG_V2 != 0
        && version == IMDS_VERSION_V1
    {
        refused = REFUSED_V1;
    }
    let audit = u32::from(rule_flags) & (RULE_FLAG_AUDIT | RULE_FLAG_MODE_AUDIT) != 0;
    let verdict = match refused {
        REFUSED_NONE => VERDICT_ALLOW,
        _ if audit => VERDICT_AUDIT,
        _ => VERDICT_DENY,
    };
    Judged {
        version,
        refused,
        verdict,
    }
}

/// [`pattern_says`]: the pattern does not match.
pub const PATTERN_NO_MATCH: u64 = 0;
/// [`pattern_says`]: a `paths` pattern matches.
pub const PATTERN_ALLOWS: u64 = 1;
/// [`pattern_says`]: a `deny_paths` pattern matches.
pub const PATTERN_DENIES: u64 = 2;

/// What `pattern` says of `request`: `PATTERN_*`.
#[inline]
#[must_use]
pub fn pattern_says(pattern: &PathPattern, request: &Request) -> u64 {
    if !pattern_matches(pattern, request) {
        PATTERN_NO_MATCH
    } else if pattern.flags & PATTERN_DENY != 0 {
        PATTERN_DENIES
    } else {
        PATTERN_ALLOWS
    }
}

/// `REFUSED_PATH` when a `deny_paths` pattern matches, or the rule has `paths` (`allow_list`)
/// and none matches; else `REFUSED_NONE`. `says(i)` is what the rule's pattern `i` (of `len`)
/// says of the request ([`pattern_says`]); any other value (the kernel could not read the
/// pattern) refuses.
#[inline]
pub fn paths_refuse(len: u32, allow_list: bool, mut says: impl FnMut(usize) -> u64) -> u8 {
    let mut allowed = !allow_list;
    let mut i = 0;
    while i < PATH_PATTERNS_MAX {
        if i >= len as usize {
            break;
        }
        match says(i) {
            PATTERN_NO_MATCH => {}
            PATTERN_ALLOWS => allowed = true,
            _ => return REFUSED_PATH,
        }
        i += 1;
    }
    if allowed { REFUSED_NONE } else { REFUSED_PATH }
}

/// Index in `HTTP_COUNTERS` of requests of `version` (`IMDS_VERSION_V1` to `_TOKEN`) decided
/// by `rule` of `generation`.
#[must_use]
pub const fn http_counter_index(generation: u32, rule: u32, version: u8) -> u32 {
    let version = if version == 0 || version as u32 > IMDS_VERSIONS {
        IMDS_VERSION_V1 as u32
    } else {
        version as u32
    };
    crate::maps::rule_counter_index(generation, rule) * IMDS_VERSIONS + (version - 1)
}

/// Whether a verdict reports the request: every v1 request, and every refused one.
#[must_use]
pub const fn reported(judged: &Judged) -> bool {
    judged.version == IMDS_VERSION_V1 || judged.verdict != VERDICT_ALLOW
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `repr(C)` plain integers and bytes with explicit padding.
    unsafe impl aya::Pod for super::PathRulesKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PathRules {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HttpSocket {}
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_segment_carries_unread_bytes_only_past_what_was_let_through() {
        let first = 1000;
        // Nothing let through: any data is unread (TCP Fast Open's first request).
        assert!(carries_unread(first, 1, first, 0));
        assert!(!carries_unread(first, 0, first, 0), "a pure ACK");
        // 100 bytes let through: a segment up to them (or a retransmission) is read.
        assert!(!carries_unread(first, 100, first, 100));
        assert!(!carries_unread(first + 50, 50, first, 100));
        assert!(carries_unread(first + 50, 51, first, 100));
        // Across the wrap of sequence space.
        let near = u32::MAX - 10;
        assert!(!carries_unread(near, 40, near, 40));
        assert!(carries_unread(near.wrapping_add(40), 1, near, 40));
    }

    #[test]
    fn only_enforcing_rules_that_judge_requests_refuse_what_is_unread() {
        use crate::policy::{RULE_FLAG_AUDIT, RULE_FLAG_MODE_AUDIT, RULE_FLAG_PATHS, RULE_FLAG_V2};
        let flags = |f: u32| u8::try_from(f).unwrap();
        assert!(refuses_requests(flags(RULE_FLAG_V2)));
        assert!(refuses_requests(flags(RULE_FLAG_PATHS)));
        assert!(!refuses_requests(0));
        assert!(!refuses_requests(flags(RULE_FLAG_V2 | RULE_FLAG_AUDIT)));
        assert!(!refuses_requests(flags(
            RULE_FLAG_PATHS | RULE_FLAG_MODE_AUDIT
        )));
    }
    use super::*;
    use crate::policy::{RULE_FLAG_MODE_AUDIT, RULE_FLAG_PATHS, RULE_FLAG_V2};

    fn line(text: &str) -> ([u8; HTTP_REQUEST_BYTES], u32) {
        let mut buf = [0; HTTP_REQUEST_BYTES];
        let n = text.len().min(HTTP_REQUEST_BYTES);
        buf[..n].copy_from_slice(&text.as_bytes()[..n]);
        (buf, u32::try_from(text.len()).unwrap())
    }

    fn parse(text: &str) -> Request {
        let (buf, len) = line(text);
        parse_request(&buf, len)
    }

    fn pattern(text: &str, flags: u8) -> PathPattern {
        let mut pattern = PathPattern {
            flags,
            ..PathPattern::default()
        };
        for part in text.trim_start_matches('/').split('/') {
            if part == "**" {
                pattern.flags |= PATTERN_SUBTREE;
                break;
            }
            pattern.parts[pattern.len as usize] = if part == "*" {
                ANY_PART
            } else {
                part_hash(part.as_bytes())
            };
            pattern.len += 1;
        }
        pattern
    }

    #[test]
    fn request_lines_are_split_into_hashed_parts() {
        let r = parse("GET /latest/meta-data/placement/region HTTP/1.1\r\n");
        assert!(!r.put && !r.unreadable && !r.deeper);
        assert_eq!(r.len, 4);
        assert_eq!(r.parts[3], part_hash(b"region"));
        assert!(parse("PUT /latest/api/token HTTP/1.1\r\n").is_token_request());
        assert!(parse("PUT /LATEST/api/token HTTP/1.1").is_token_request());
        assert!(!parse("GET /latest/api/token HTTP/1.1\r\n").is_token_request());
        // A query is not part of the path; a directory listing's trailing slash is fine.
        let r = parse("GET /latest/meta-data/?x=1 HTTP/1.1\r\n");
        assert_eq!((r.len, r.unreadable), (2, false));
        assert_eq!(parse("GET /latest/meta-data/ HTTP/1.1\r\n").len, 2);
        for bad in [
            "GET /latest/meta-data/placement/../iam/x HTTP/1.1\r\n",
            "GET /latest/./meta-data HTTP/1.1\r\n",
            "GET /latest//meta-data HTTP/1.1\r\n",
            "GET /latest/meta-data/%69am HTTP/1.1\r\n",
            "GET http://169.254.169.254/latest HTTP/1.1\r\n",
            "GET /latest\\meta-data HTTP/1.1\r\n",
        ] {
            assert!(parse(bad).unreadable, "{bad}");
        }
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(300));
        assert!(parse(&long).unreadable);
        let deep = parse("GET /a/b/c/d/e/f/g/h/i HTTP/1.1\r\n");
        assert!(deep.deeper && !deep.unreadable);
    }

    #[test]
    fn patterns_match_parts_any_part_and_subtrees() {
        let region = parse("GET /latest/meta-data/placement/region HTTP/1.1\r\n");
        assert!(pattern_matches(
            &pattern("/latest/meta-data/placement/*", 0),
            &region
        ));
        assert!(pattern_matches(
            &pattern("/latest/meta-data/**", 0),
            &region
        ));
        assert!(pattern_matches(
            &pattern("/latest/*/placement/region", 0),
            &region
        ));
        assert!(!pattern_matches(
            &pattern("/latest/meta-data/placement", 0),
            &region
        ));
        assert!(!pattern_matches(
            &pattern("/latest/meta-data/placement/region/**", 0),
            &region
        ));
        assert!(!pattern_matches(
            &pattern("/latest/meta-data/iam/*", 0),
            &region
        ));
        let deep = parse("GET /a/b/c/d/e/f/g/h/i HTTP/1.1\r\n");
        assert!(pattern_matches(&pattern("/a/**", 0), &deep));
        assert!(!pattern_matches(&pattern("/a/b/c/d/e/f/g/h", 0), &deep));
    }

    fn rules(patterns: &[(&str, u8)]) -> PathRules {
        let mut rules = PathRules::default();
        for (i, (text, flags)) in patterns.iter().enumerate() {
            rules.patterns[i] = pattern(text, *flags);
            rules.allow_list |= u32::from(flags & PATTERN_DENY == 0);
        }
        rules.len = u32::try_from(patterns.len()).unwrap();
        rules
    }

    #[test]
    fn a_deny_pattern_wins_in_any_place_and_an_unreadable_one_refuses() {
        let says = |answers: &'static [u64]| move |i: usize| answers[i];
        let allow_list = true;
        for answers in [
            &[PATTERN_ALLOWS, PATTERN_DENIES][..],
            &[PATTERN_DENIES, PATTERN_ALLOWS],
            &[PATTERN_NO_MATCH, PATTERN_DENIES],
            &[PATTERN_ALLOWS, PATTERN_NO_MATCH, 3],
        ] {
            let len = u32::try_from(answers.len()).unwrap();
            assert_eq!(paths_refuse(len, allow_list, says(answers)), REFUSED_PATH);
            assert_eq!(paths_refuse(len, !allow_list, says(answers)), REFUSED_PATH);
        }
        let none = &[PATTERN_NO_MATCH, PATTERN_NO_MATCH];
        assert_eq!(paths_refuse(2, allow_list, says(none)), REFUSED_PATH);
        assert_eq!(paths_refuse(2, !allow_list, says(none)), REFUSED_NONE);
        let one = &[PATTERN_NO_MATCH, PATTERN_ALLOWS];
        assert_eq!(paths_refuse(2, allow_list, says(one)), REFUSED_NONE);
        // Only the first `len` patterns are asked.
        assert_eq!(
            paths_refuse(1, !allow_list, says(&[PATTERN_NO_MATCH, 3])),
            REFUSED_NONE
        );
    }

    #[test]
    fn requests_are_classified_and_judged() {
        let get = parse("GET /latest/meta-data/iam/security-credentials/r HTTP/1.1\r\n");
        let put = parse("PUT /latest/api/token HTTP/1.1\r\n");
        let any = 0;
        let v2 = u8::try_from(RULE_FLAG_V2).unwrap();
        let judged =
            |flags, request: &Request, seen, paths| judge_request(flags, request, seen, paths);
        assert_eq!(judged(any, &get, 0, None).version, IMDS_VERSION_V1);
        assert_eq!(judged(any, &get, 0, None).verdict, VERDICT_ALLOW);
        assert_eq!(judged(any, &get, SEEN_TOKEN, None).version, IMDS_VERSION_V2);
        assert_eq!(
            judged(any, &put, SEEN_TOKEN_TTL, None).version,
            IMDS_VERSION_TOKEN
        );
        // A token request without its header is not one.
        assert_eq!(judged(any, &put, 0, None).version, IMDS_VERSION_V1);
        let refused = judged(v2, &get, 0, None);
        assert_eq!(
            (refused.refused, refused.verdict),
            (REFUSED_V1, VERDICT_DENY)
        );
        assert_eq!(judged(v2, &get, SEEN_TOKEN, None).verdict, VERDICT_ALLOW);
        assert_eq!(
            judged(v2, &put, SEEN_TOKEN_TTL, None).verdict,
            VERDICT_ALLOW
        );
        let audit = v2 | u8::try_from(RULE_FLAG_MODE_AUDIT).unwrap();
        assert_eq!(judged(audit, &get, 0, None).verdict, VERDICT_AUDIT);

        let paths = u8::try_from(RULE_FLAG_PATHS).unwrap();
        let placement = rules(&[("/latest/meta-data/placement/*", 0)]);
        let region = parse("GET /latest/meta-data/placement/region HTTP/1.1\r\n");
        assert_eq!(
            judged(paths, &region, SEEN_TOKEN, Some(&placement)).verdict,
            VERDICT_ALLOW
        );
        let denied = judged(paths, &get, SEEN_TOKEN, Some(&placement));
        assert_eq!(
            (denied.refused, denied.verdict),
            (REFUSED_PATH, VERDICT_DENY)
        );
        // The token request is always allowed to a rule with paths.
        assert_eq!(
            judged(paths, &put, SEEN_TOKEN_TTL, Some(&placement)).verdict,
            VERDICT_ALLOW
        );
        let no_iam = rules(&[("/latest/meta-data/iam/**", PATTERN_DENY)]);
        assert_eq!(
            judged(paths, &region, 0, Some(&no_iam)).verdict,
            VERDICT_ALLOW
        );
        assert_eq!(judged(paths, &get, 0, Some(&no_iam)).verdict, VERDICT_DENY);
        let upper = parse("GET /latest/meta-data/IAM/security-credentials/r HTTP/1.1\r\n");
        assert_eq!(
            judged(paths, &upper, 0, Some(&no_iam)).verdict,
            VERDICT_DENY
        );
        let dotted = parse("GET /latest/meta-data/placement/../iam/x HTTP/1.1\r\n");
        assert_eq!(
            judged(paths, &dotted, 0, Some(&placement)).refused,
            REFUSED_UNREADABLE_PATH
        );
        // Unreadable patterns: fail closed.
        assert_eq!(judged(paths, &region, 0, None).verdict, VERDICT_DENY);
    }
}

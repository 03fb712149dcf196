//! `iptables-save` and `ip6tables-save` output, parsed: tables, chains and rules, each rule with
//! its line and its matches read into what [`super::translate`] needs to judge it.
//!
//! The format is the one `iptables-restore` reads (the legacy and the nft backends print it
//! alike): `*table`, `:CHAIN POLICY [counters]`, `-A CHAIN options`, `COMMIT`, `#` comments.
//! Anything else, a table without its `COMMIT` (a truncated file), an unknown match or target,
//! is an error naming the line: a firewall half read must never become a policy.

use std::{fmt, net::IpAddr};

/// An address family: which of the two tools printed a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// `iptables-save`.
    V4,
    /// `ip6tables-save`.
    V6,
}

impl Family {
    /// The tool that changes this family's rules: `iptables` or `ip6tables`.
    #[must_use]
    pub fn tool(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }

    /// Whether `address` is of this family.
    #[must_use]
    pub fn holds(self, address: IpAddr) -> bool {
        matches!(
            (self, address),
            (Self::V4, IpAddr::V4(_)) | (Self::V6, IpAddr::V6(_))
        )
    }
}

/// What is wrong with the input, at its line.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}:{line}: {message}")]
pub struct SaveError {
    /// The file (or `<stdin>`, `iptables-save`).
    pub source_name: String,
    /// 1-based line.
    pub line: usize,
    /// What is wrong, with the text.
    pub message: String,
}

/// A network prefix: `169.254.169.254/32`, `fd00:ec2::/64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    /// Its first address.
    pub address: IpAddr,
    /// Its length in bits.
    pub len: u8,
}

impl Prefix {
    /// Whether `address` is in this prefix.
    #[must_use]
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.address, address) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }

    /// Whether this prefix holds one address alone.
    #[must_use]
    pub fn is_host(&self) -> bool {
        self.len == if self.address.is_ipv4() { 32 } else { 128 }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.len)
    }
}

/// A uid or gid as a rule names it: a number, a range, or a name looked up later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ids {
    /// `1000` or `1000-1010` (inclusive).
    Range(u32, u32),
    /// A user or group name (`--uid-owner nobody`).
    Name(String),
}

/// One condition of a rule. `negated` is the `!` before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    /// `-d`: the destination is in one of these prefixes.
    Destination {
        prefixes: Vec<Prefix>,
        negated: bool,
    },
    /// `-o`: the outgoing interface (`+` at the end: any with that start).
    OutInterface { name: String, negated: bool },
    /// `-m owner --uid-owner`.
    UidOwner { ids: Ids, negated: bool },
    /// `-m owner --gid-owner`, with `--suppl-groups` when the supplementary groups count too.
    GidOwner {
        ids: Ids,
        suppl_groups: bool,
        negated: bool,
    },
    /// `-m cgroup --path` (cgroup v2), as written, with a leading `/`.
    CgroupPath { path: String, negated: bool },
    /// `-m state --state` or `-m conntrack --ctstate`: the states listed (upper case), and
    /// whether the `!` before them says "none of these".
    ConnState { states: Vec<String>, negated: bool },
    /// A condition imds-guard has no counterpart for: ports, protocols, sources, marks,
    /// interfaces, `--pid-owner`, … as written without its `!`, e.g. `-p tcp`, `--dport 80`.
    Other {
        text: String,
        negated: bool,
        what: &'static str,
    },
}

/// Where a rule sends what it matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `ACCEPT`.
    Accept,
    /// `DROP`, or `REJECT` (with the option it was written with).
    Drop,
    /// `RETURN`.
    Return,
    /// `-j CHAIN`: a user chain, and back.
    Jump(String),
    /// `-g CHAIN`: a user chain, not back.
    Goto(String),
    /// `LOG`, `NFLOG`: records, does not decide.
    Log,
    /// A target that decides elsewhere (`QUEUE`, `NFQUEUE`), or rewrites the packet
    /// (`DNAT`, `REDIRECT`, `MARK`, …), named.
    Other(String),
    /// No `-j`: counts, does not decide.
    None,
}

/// One `-A` line.
#[derive(Clone, Debug)]
pub struct Rule {
    /// 1-based line in the input.
    pub line: usize,
    /// The rule's words after `-A CHAIN`, unquoted, counters left out: what `-D CHAIN` needs.
    pub args: Vec<String>,
    /// Its conditions, in order.
    pub matches: Vec<Match>,
    /// Its target.
    pub target: Target,
    /// The addresses a `DNAT` (`--to-destination`) or `NETMAP` (`--to`) target rewrites the
    /// destination to, as written (`169.254.169.254:80`, `10.0.0.1-10.0.0.9`).
    pub rewrites_to: Option<String>,
}

/// A chain: built-in (with a policy) or a user chain.
#[derive(Clone, Debug)]
pub struct Chain {
    /// `OUTPUT`, `DOCKER-USER`, …
    pub name: String,
    /// `ACCEPT` or `DROP` for a built-in chain; `None` for a user chain (`-`).
    pub policy: Option<Target>,
    /// Its rules, in order.
    pub rules: Vec<Rule>,
}

/// A table of one family.
#[derive(Clone, Debug)]
pub struct Table {
    /// Which tool printed it.
    pub family: Family,
    /// `filter`, `nat`, `mangle`, `raw`, `security`.
    pub name: String,
    /// The line of its `*table`.
    pub line: usize,
    /// Its chains, in the order declared.
    pub chains: Vec<Chain>,
}

impl Table {
    /// The chain called `name`.
    #[must_use]
    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|chain| chain.name == name)
    }
}

/// What a whole input holds.
#[derive(Clone, Debug, Default)]
pub struct Ruleset {
    /// Its tables, in order.
    pub tables: Vec<Table>,
    /// What the tools said in comments that the reader should hear, e.g. that legacy tables
    /// exist beside the nft ones.
    pub notices: Vec<String>,
}

impl Ruleset {
    /// The families the input has tables of.
    #[must_use]
    pub fn families(&self) -> Vec<Family> {
        let mut families: Vec<Family> = self.tables.iter().map(|t| t.family).collect();
        families.sort_unstable();
        families.dedup();
        families
    }

    /// The rule at `line`.
    #[must_use]
    pub fn rule_at(&self, line: usize) -> Option<(&Table, &Chain, &Rule)> {
        self.tables.iter().find_map(|table| {
            table.chains.iter().find_map(|chain| {
                (chain.rules.iter())
                    .find(|rule| rule.line == line)
                    .map(|rule| (table, chain, rule))
            })
        })
    }
}

/// Targets iptables knows that are not chains. Anything else after `-j` must be a chain the
/// table declares.
const KNOWN_TARGETS: &[&str] = &[
    "AUDIT",
    "CHECKSUM",
    "CLASSIFY",
    "CLUSTERIP",
    "CONNMARK",
    "CONNSECMARK",
    "CT",
    "DNAT",
    "DSCP",
    "ECN",
    "HL",
    "HMARK",
    "IDLETIMER",
    "LED",
    "MARK",
    "MASQUERADE",
    "NETMAP",
    "NFQUEUE",
    "NOTRACK",
    "QUEUE",
    "RATEEST",
    "REDIRECT",
    "SECMARK",
    "SET",
    "SNAT",
    "SYNPROXY",
    "TCPMSS",
    "TCPOPTSTRIP",
    "TEE",
    "TOS",
    "TPROXY",
    "TRACE",
    "TTL",
    "ULOG",
];

/// Match options that take exactly one value.
const ONE_VALUE_OPTIONS: &[(&str, &str)] = &[
    ("comment", "--comment"),
    ("owner", "--uid-owner"),
    ("owner", "--gid-owner"),
    ("cgroup", "--path"),
    ("state", "--state"),
    ("conntrack", "--ctstate"),
];

/// Match modules iptables knows (`-m NAME`). Anything else is not iptables-save output.
const KNOWN_MATCHES: &[&str] = &[
    "addrtype",
    "ah",
    "bpf",
    "cgroup",
    "cluster",
    "comment",
    "connbytes",
    "connlabel",
    "connlimit",
    "connmark",
    "conntrack",
    "cpu",
    "dccp",
    "devgroup",
    "dscp",
    "dst",
    "ecn",
    "esp",
    "eui64",
    "frag",
    "hashlimit",
    "hbh",
    "helper",
    "hl",
    "icmp",
    "icmp6",
    "iprange",
    "ipv6header",
    "ipvs",
    "length",
    "limit",
    "mac",
    "mark",
    "mh",
    "multiport",
    "nfacct",
    "osf",
    "owner",
    "physdev",
    "pkttype",
    "policy",
    "quota",
    "rateest",
    "realm",
    "recent",
    "rpfilter",
    "rt",
    "sctp",
    "set",
    "socket",
    "srh",
    "state",
    "statistic",
    "string",
    "tcp",
    "tcpmss",
    "time",
    "tos",
    "ttl",
    "u32",
    "udp",
    "udplite",
];

/// Parses the output of `iptables-save`, `ip6tables-save`, or both one after the other.
/// `source_name` is what errors call the input.
///
/// # Errors
/// [`SaveError`] at the first line that is not iptables-save output, a table without `COMMIT`,
/// a rule of an undeclared chain, an unknown match or target.
pub fn parse(text: &str, source_name: &str) -> Result<Ruleset, SaveError> {
    let error = |line: usize, message: String| SaveError {
        source_name: source_name.to_owned(),
        line,
        message,
    };
    let mut ruleset = Ruleset::default();
    // The family the last `# Generated by` line named.
    let mut generated_by: Option<Family> = None;
    let mut open: Option<(Table, Option<Family>)> = None;
    let mut last_line = 0;
    for (index, raw_line) in text.lines().enumerate() {
        let line = index + 1;
        last_line = line;
        let text_line = raw_line.trim();
        if text_line.is_empty() {
            continue;
        }
        if let Some(comment) = text_line.strip_prefix('#') {
            read_comment(
                comment.trim(),
                line,
                &mut generated_by,
                &mut ruleset.notices,
            )
            .map_err(|m| error(line, m))?;
            continue;
        }
        if let Some(name) = text_line.strip_prefix('*') {
            if let Some((table, _)) = &open {
                return Err(error(
                    line,
                    format!(
                        "table {} (line {}) has no COMMIT before this table: the output is \
                         truncated or not iptables-save's",
                        table.name, table.line
                    ),
                ));
            }
            open = Some((
                new_table(name, line, generated_by).map_err(|m| error(line, m))?,
                generated_by,
            ));
            continue;
        }
        if text_line == "COMMIT" {
            let Some((table, family)) = open.take() else {
                return Err(error(line, "COMMIT before any table".into()));
            };
            ruleset
                .tables
                .push(finish_table(table, family).map_err(|m| error(line, m))?);
            continue;
        }
        let Some((table, _)) = open.as_mut() else {
            return Err(error(
                line,
                format!(
                    "{text_line:?} before any table: this is not iptables-save or \
                     ip6tables-save output (it starts with `*filter` or another table)"
                ),
            ));
        };
        if let Some(declaration) = text_line.strip_prefix(':') {
            declare_chain(table, declaration).map_err(|m| error(line, m))?;
            continue;
        }
        let words = split_words(text_line).map_err(|m| error(line, m))?;
        let (chain, rule) = parse_rule(&words, line).map_err(|m| error(line, m))?;
        let Some(chain) = table.chains.iter_mut().find(|c| c.name == chain) else {
            return Err(error(
                line,
                format!(
                    "a rule of chain {chain}, which table {} does not declare (`:{chain} - [0:0]`)",
                    table.name
                ),
            ));
        };
        chain.rules.push(rule);
    }
    if let Some((table, _)) = open {
        return Err(error(
            last_line.max(1),
            format!(
                "table {} (line {}) ends without COMMIT: the output is truncated",
                table.name, table.line
            ),
        ));
    }
    if ruleset.tables.is_empty() {
        return Err(error(
            last_line.max(1),
            "no table: this is not iptables-save or ip6tables-save output".into(),
        ));
    }
    if let Some((line, message)) = second_table(&ruleset) {
        return Err(error(line, message));
    }
    Ok(ruleset)
}

/// A `#` line: the tool that printed the tables after it, or what it warns of.
fn read_comment(
    comment: &str,
    line: usize,
    generated_by: &mut Option<Family>,
    notices: &mut Vec<String>,
) -> Result<(), String> {
    if let Some(tool) = comment.strip_prefix("Generated by ") {
        // Older nft backends say `xtables-save` for both: the addresses tell.
        *generated_by = if tool.starts_with("ip6tables") {
            Some(Family::V6)
        } else if tool.starts_with("iptables") {
            Some(Family::V4)
        } else {
            None
        };
    } else if comment.contains("incompatible") {
        // The nft backend cannot print rules made with nft itself: they would be missing.
        return Err(format!(
            "{comment}: rules the tools cannot print would be missing from the translation; \
             translate them by hand (`nft list ruleset`)"
        ));
    } else if comment.starts_with("Warning:") {
        notices.push(format!("line {line}: {comment}"));
    }
    Ok(())
}

/// The table `*name` opens at `line`.
fn new_table(name: &str, line: usize, family: Option<Family>) -> Result<Table, String> {
    if !matches!(name, "filter" | "nat" | "mangle" | "raw" | "security") {
        return Err(format!("{name:?} is not an iptables table"));
    }
    Ok(Table {
        family: family.unwrap_or(Family::V4),
        name: name.to_owned(),
        line,
        chains: Vec::new(),
    })
}

/// A table that repeats an earlier one of its family, with its line.
fn second_table(ruleset: &Ruleset) -> Option<(usize, String)> {
    let mut seen: Vec<(Family, &str)> = Vec::new();
    for table in &ruleset.tables {
        if seen.contains(&(table.family, &table.name)) {
            return Some((
                table.line,
                format!(
                    "a second {} table for {}: concatenate one iptables-save and one \
                     ip6tables-save output, each with its `# Generated by` line",
                    table.name,
                    table.family.tool()
                ),
            ));
        }
        seen.push((table.family, &table.name));
    }
    None
}

/// Adds the chain `:NAME POLICY [counters]` declares to `table`.
fn declare_chain(table: &mut Table, declaration: &str) -> Result<(), String> {
    let mut parts = declaration.split_whitespace();
    let (Some(name), Some(policy)) = (parts.next(), parts.next()) else {
        return Err(format!(
            ":{declaration}: a chain is declared as `:NAME POLICY [n:n]`"
        ));
    };
    let policy = match policy {
        "ACCEPT" => Some(Target::Accept),
        "DROP" => Some(Target::Drop),
        "-" => None,
        other => {
            return Err(format!(
                "chain {name}: {other:?} is not a chain policy (ACCEPT, DROP, -)"
            ));
        }
    };
    if table.chain(name).is_some() {
        return Err(format!("chain {name} is declared twice"));
    }
    table.chains.push(Chain {
        name: name.to_owned(),
        policy,
        rules: Vec::new(),
    });
    Ok(())
}

/// Checks a table's jumps, and settles its family from its addresses when no `# Generated by`
/// line said it.
fn finish_table(mut table: Table, family: Option<Family>) -> Result<Table, String> {
    let (mut v4, mut v6) = (false, false);
    for chain in &table.chains {
        for rule in &chain.rules {
            if let Target::Jump(name) | Target::Goto(name) = &rule.target
                && table.chain(name).is_none()
            {
                return Err(format!(
                    "line {}: -j {name}: neither a target iptables knows nor a chain this \
                     table declares",
                    rule.line
                ));
            }
            for m in &rule.matches {
                if let Match::Destination { prefixes, .. } = m {
                    v4 |= prefixes.iter().any(|p| p.address.is_ipv4());
                    v6 |= prefixes.iter().any(|p| p.address.is_ipv6());
                }
            }
        }
    }
    table.family = match (family, v4, v6) {
        (Some(Family::V4), _, true) | (Some(Family::V6), true, _) => {
            return Err(format!(
                "table {} (line {}) has addresses of the other family than its `# Generated by` \
                 line says",
                table.name, table.line
            ));
        }
        (Some(family), _, _) => family,
        (None, true, false) => Family::V4,
        (None, false, true) => Family::V6,
        (None, true, true) => {
            return Err(format!(
                "table {} (line {}) mixes IPv4 and IPv6 addresses",
                table.name, table.line
            ));
        }
        // Nothing says: the rules match whatever the family is. Only a header can tell.
        (None, false, false) if table.chains.iter().all(|c| c.rules.is_empty()) => Family::V4,
        (None, false, false) => {
            return Err(format!(
                "table {} (line {}): cannot tell whether this is iptables-save or \
                 ip6tables-save output: keep the tools' `# Generated by` line",
                table.name, table.line
            ));
        }
    };
    Ok(table)
}

/// Splits a rule line as iptables-restore does: on blanks, `"…"` quoting (with `\"` inside).
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => match chars.next() {
                Some(next) => word.push(next),
                None => return Err("a `\\` ends the line inside quotes".into()),
            },
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        return Err("a quote is not closed".into());
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// Whether `word` starts an option (`-d`, `--dport`), as opposed to being a value.
fn is_option(word: &str) -> bool {
    word.starts_with('-') && word.len() > 1 && !word[1..].starts_with(|c: char| c.is_ascii_digit())
}

/// Quotes `word` for a line iptables-restore reads, when it needs it.
#[must_use]
pub fn restore_quote(word: &str) -> String {
    if !word.is_empty()
        && !word
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '\\' || c == '\'')
    {
        return word.to_owned();
    }
    format!("\"{}\"", word.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Parses `[counters] -A CHAIN options…` into the chain's name and the rule.
fn parse_rule(words: &[String], line: usize) -> Result<(String, Rule), String> {
    let (chain, options) = appended(words)?;
    let mut spec: Vec<String> = Vec::new();
    let mut matches = Vec::new();
    let mut target = Target::None;
    let mut rewrites_to = None;
    let mut module: Option<&str> = None;
    let mut negated = false;
    let mut i = 0;
    let value = |i: usize, option: &str| -> Result<&String, String> {
        options
            .get(i + 1)
            .ok_or_else(|| format!("{option} without its value"))
    };
    while i < options.len() {
        let word = options[i].as_str();
        if word == "!" {
            if negated {
                return Err("two `!` in a row".into());
            }
            negated = true;
            spec.push("!".into());
            i += 1;
            continue;
        }
        if negated
            && matches!(
                word,
                "-m" | "--match" | "-j" | "--jump" | "-g" | "--goto" | "-c" | "--set-counters"
            )
        {
            return Err(format!("`!` before {word}: iptables does not allow it"));
        }
        match word {
            "-c" | "--set-counters" => {
                let counters = options.get(i + 1..i + 3).unwrap_or_default();
                if counters.len() != 2 || counters.iter().any(|c| c.parse::<u64>().is_err()) {
                    return Err(format!("{word} takes two numbers (packets, bytes)"));
                }
                i += 3;
                continue;
            }
            "-d" | "--destination" | "--dst" | "-o" | "--out-interface" | "-s" | "--source"
            | "--src" | "-p" | "--protocol" | "-i" | "--in-interface" => {
                let text = value(i, word)?;
                let (m, short) = packet_option(word, text, negated)?;
                matches.extend(m);
                spec.extend([short.to_owned(), text.clone()]);
                i += 2;
            }
            "-f" | "--fragment" => {
                matches.push(Match::Other {
                    text: "-f".into(),
                    negated,
                    what: "fragments",
                });
                spec.push("-f".into());
                i += 1;
            }
            "-m" | "--match" => {
                let name = value(i, word)?;
                if !KNOWN_MATCHES.contains(&name.as_str()) {
                    return Err(format!(
                        "-m {name}: not a match iptables knows (owner, cgroup, tcp, …)"
                    ));
                }
                module = Some(name.as_str());
                spec.extend(["-m".to_owned(), name.clone()]);
                i += 2;
            }
            "-j" | "--jump" | "-g" | "--goto" => {
                (target, rewrites_to, i) = target_words(options, i, &mut spec)?;
                module = None;
            }
            option if option.starts_with("--") => {
                let Some(module_name) = module else {
                    return Err(format!("{option}: an option outside any match (-m …)"));
                };
                i = module_words(options, i, module_name, negated, &mut matches, &mut spec)?;
            }
            other => return Err(format!("{other:?}: not an iptables option")),
        }
        negated = false;
    }
    Ok((
        chain.clone(),
        Rule {
            line,
            args: spec,
            matches,
            target,
            rewrites_to,
        },
    ))
}

/// A condition on the packet (`-d`, `-o`, `-s`, `-p`, `-i`) with its value `text`: the match
/// (`None` for `-p all`), and the option's short spelling.
fn packet_option(
    word: &str,
    text: &str,
    negated: bool,
) -> Result<(Option<Match>, &'static str), String> {
    let other = |short: &'static str, what: &'static str| {
        Ok((
            Some(Match::Other {
                text: format!("{short} {text}"),
                negated,
                what,
            }),
            short,
        ))
    };
    match word {
        "-d" | "--destination" | "--dst" => {
            if negated && text.contains(',') {
                return Err(format!(
                    "! -d {text}: iptables allows `!` with one address only"
                ));
            }
            let prefixes = (text.split(','))
                .map(parse_prefix)
                .collect::<Result<Vec<_>, _>>()?;
            Ok((Some(Match::Destination { prefixes, negated }), "-d"))
        }
        "-o" | "--out-interface" => Ok((
            Some(Match::OutInterface {
                name: text.to_owned(),
                negated,
            }),
            "-o",
        )),
        "-s" | "--source" | "--src" => other("-s", "a source address"),
        "-p" | "--protocol" if matches!(text, "all" | "0") && !negated => Ok((None, "-p")),
        "-p" | "--protocol" => other("-p", "a protocol"),
        _ => other("-i", "an incoming interface"),
    }
}

/// The chain and options of `[counters] -A CHAIN options…`.
fn appended(words: &[String]) -> Result<(&String, &[String]), String> {
    let mut words = words;
    // `iptables-save -c` puts `[packets:bytes]` first.
    if let Some(first) = words.first()
        && first.starts_with('[')
        && first.ends_with(']')
    {
        words = &words[1..];
    }
    match words {
        [append, chain, rest @ ..] if append == "-A" || append == "--append" => Ok((chain, rest)),
        _ => Err(format!(
            "{:?}: not an iptables-save line (`*table`, `:CHAIN`, `-A CHAIN …`, `COMMIT`)",
            words.join(" ")
        )),
    }
}

/// The target at `options[i]` (`-j NAME` or `-g NAME`) with its options, written to `spec`:
/// the target, where it rewrites destinations to, and the index after it.
fn target_words(
    options: &[String],
    i: usize,
    spec: &mut Vec<String>,
) -> Result<(Target, Option<String>, usize), String> {
    let word = options[i].as_str();
    let name = options
        .get(i + 1)
        .ok_or_else(|| format!("{word} without its value"))?;
    let goto = matches!(word, "-g" | "--goto");
    spec.extend([if goto { "-g" } else { "-j" }.to_owned(), name.clone()]);
    let mut rewrites_to = None;
    let mut i = i + 2;
    // The target's own options (`--reject-with`, `--log-prefix "…"`).
    while i < options.len() && !matches!(options[i].as_str(), "-m" | "--match") {
        if matches!(options[i].as_str(), "--to-destination" | "--to")
            && let Some(to) = options.get(i + 1)
        {
            rewrites_to = Some(to.clone());
        }
        spec.push(options[i].clone());
        i += 1;
    }
    Ok((target_named(goto, name), rewrites_to, i))
}

/// `-j NAME` (or `-g NAME` when `goto`).
fn target_named(goto: bool, name: &str) -> Target {
    match (goto, name) {
        (true, chain) => Target::Goto(chain.to_owned()),
        (false, "ACCEPT") => Target::Accept,
        (false, "DROP" | "REJECT") => Target::Drop,
        (false, "RETURN") => Target::Return,
        (false, "LOG" | "NFLOG") => Target::Log,
        (false, other) if KNOWN_TARGETS.contains(&other) => Target::Other(other.to_owned()),
        (false, chain) => Target::Jump(chain.to_owned()),
    }
}

/// Reads the match option at `options[i]` of module `module` and its values into `matches`
/// and `spec`; returns the index after them.
fn module_words(
    options: &[String],
    i: usize,
    module: &str,
    negated: bool,
    matches: &mut Vec<Match>,
    spec: &mut Vec<String>,
) -> Result<usize, String> {
    let option = options[i].as_str();
    let mut args: Vec<&String> = Vec::new();
    let mut j = i + 1;
    let mut negated_value = false;
    // Options that take exactly one value, whatever it looks like (`--comment -c`: iptables-save
    // does not quote it).
    if ONE_VALUE_OPTIONS.contains(&(module, option)) {
        if options.get(j).is_some_and(|w| w == "!") {
            negated_value = true;
            j += 1;
        }
        let value = options
            .get(j)
            .ok_or_else(|| format!("-m {module} {option} without its value"))?;
        args.push(value);
        j += 1;
    }
    while !ONE_VALUE_OPTIONS.contains(&(module, option))
        && let Some(next) = options.get(j)
    {
        if next == "!" && args.is_empty() && !negated_value {
            // The old spelling: `--uid-owner ! 0`.
            negated_value = true;
        } else if is_option(next) || next == "!" {
            break;
        } else {
            args.push(next);
        }
        j += 1;
    }
    if negated && negated_value {
        return Err(format!("{option}: two `!`"));
    }
    if (module, option) == ("owner", "--suppl-groups") {
        // It widens the `--gid-owner` before it to the supplementary groups.
        let gid = matches.iter_mut().rev().find_map(|m| match m {
            Match::GidOwner { suppl_groups, .. } => Some(suppl_groups),
            _ => None,
        });
        match gid {
            Some(suppl_groups) => *suppl_groups = true,
            None => return Err("--suppl-groups without --gid-owner".into()),
        }
    } else if let Some(m) = module_option(module, option, &args, negated || negated_value)? {
        matches.push(m);
    }
    if negated_value {
        spec.push("!".into());
    }
    spec.push(option.to_owned());
    spec.extend(args.iter().map(|a| (*a).clone()));
    Ok(j)
}

/// One option of a match module, as a [`Match`]; `None` for one with nothing to say about
/// access (`--comment`).
fn module_option(
    module: &str,
    option: &str,
    args: &[&String],
    negated: bool,
) -> Result<Option<Match>, String> {
    let one = || -> Result<&str, String> {
        match args {
            [arg] => Ok(arg.as_str()),
            _ => Err(format!("-m {module} {option} takes one value")),
        }
    };
    let other = |what: &'static str| Match::Other {
        negated,
        text: format!(
            "{option}{}{}",
            if args.is_empty() { "" } else { " " },
            args.iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        ),
        what,
    };
    Ok(Some(match (module, option) {
        ("comment", "--comment") => return Ok(None),
        ("owner", "--uid-owner") => Match::UidOwner {
            ids: parse_ids(one()?)?,
            negated,
        },
        ("owner", "--gid-owner") => Match::GidOwner {
            ids: parse_ids(one()?)?,
            suppl_groups: false,
            negated,
        },
        // Every connect has a socket.
        ("owner", "--socket-exists") if !negated => return Ok(None),
        ("owner", "--pid-owner" | "--sid-owner" | "--cmd-owner") => other("a process owner"),
        ("owner", _) => other("an owner condition"),
        ("cgroup", "--path") => Match::CgroupPath {
            path: cgroup_path(one()?)?,
            negated,
        },
        ("cgroup", "--cgroup") => other("a cgroup v1 net_cls class"),
        ("state", "--state") | ("conntrack", "--ctstate") => Match::ConnState {
            states: one()?.split(',').map(str::to_ascii_uppercase).collect(),
            negated,
        },
        ("tcp" | "udp" | "udplite" | "sctp" | "dccp" | "multiport", _) => other("ports"),
        ("mark" | "connmark", _) => other("a mark"),
        ("physdev", _) => other("a bridge port"),
        _ => other("a condition imds-guard has no counterpart for"),
    }))
}

/// A `--path` as the kernel walks it: `/` first, empty parts (`a//b`, `a/`) ignored.
fn cgroup_path(text: &str) -> Result<String, String> {
    let parts: Vec<&str> = text.split('/').filter(|p| !p.is_empty()).collect();
    if parts.iter().any(|p| matches!(*p, "." | "..")) {
        return Err(format!(
            "--path {text:?}: `.` and `..` are not cgroup names"
        ));
    }
    Ok(format!("/{}", parts.join("/")))
}

/// `1000`, `1000-1010`, or a name.
fn parse_ids(text: &str) -> Result<Ids, String> {
    if let Some((low, high)) = text.split_once('-')
        && let (Ok(low), Ok(high)) = (low.parse::<u32>(), high.parse::<u32>())
    {
        if low > high {
            return Err(format!("{text}: the range runs backwards"));
        }
        return Ok(Ids::Range(low, high));
    }
    if let Ok(id) = text.parse::<u32>() {
        return Ok(Ids::Range(id, id));
    }
    if text.is_empty() || text.contains(|c: char| c.is_whitespace() || c == ':') {
        return Err(format!("{text:?} is neither an id, a range nor a name"));
    }
    Ok(Ids::Name(text.to_owned()))
}

/// `169.254.169.254`, `169.254.169.254/32`, `169.254.0.0/255.255.0.0`, `fd00:ec2::254/128`.
pub(crate) fn parse_prefix(text: &str) -> Result<Prefix, String> {
    let bad = || format!("{text:?} is not an address or a prefix");
    let (address, len) = text.split_once('/').unwrap_or((text, ""));
    let address: IpAddr = address.parse().map_err(|_| bad())?;
    let max: u8 = if address.is_ipv4() { 32 } else { 128 };
    let len = if len.is_empty() {
        max
    } else if let Ok(len) = len.parse::<u8>() {
        if len > max {
            return Err(bad());
        }
        len
    } else {
        // A dotted mask; only contiguous ones are prefixes.
        let mask: std::net::Ipv4Addr = len.parse().map_err(|_| bad())?;
        let bits = u32::from(mask);
        if bits.leading_ones() + bits.trailing_zeros() != 32 {
            return Err(format!("{text:?}: a mask that is not a prefix"));
        }
        u8::try_from(bits.leading_ones()).map_err(|_| bad())?
    };
    Ok(Prefix { address, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_quoted_words_as_iptables_restore_does() {
        assert_eq!(
            split_words(r#"-A OUTPUT -m comment --comment "block \"imds\" now" -j DROP"#).unwrap(),
            [
                "-A",
                "OUTPUT",
                "-m",
                "comment",
                "--comment",
                "block \"imds\" now",
                "-j",
                "DROP"
            ]
        );
        assert!(split_words(r#"-A OUTPUT -m comment --comment "open"#).is_err());
    }

    #[test]
    fn prefixes_and_ids() {
        let p = parse_prefix("169.254.0.0/16").unwrap();
        assert!(p.contains("169.254.169.254".parse().unwrap()));
        assert!(!p.contains("169.253.169.254".parse().unwrap()));
        assert!(!p.contains("fd00:ec2::254".parse().unwrap()));
        assert_eq!(parse_prefix("169.254.0.0/255.255.0.0").unwrap(), p);
        assert!(parse_prefix("169.254.0.0/255.0.255.0").is_err());
        assert!(parse_prefix("fd00:ec2::254/129").is_err());
        assert!(
            parse_prefix("0.0.0.0/0")
                .unwrap()
                .contains("169.254.169.254".parse().unwrap())
        );
        assert_eq!(parse_ids("1000-1010").unwrap(), Ids::Range(1000, 1010));
        assert_eq!(parse_ids("0").unwrap(), Ids::Range(0, 0));
        assert_eq!(parse_ids("nobody").unwrap(), Ids::Name("nobody".into()));
        assert!(parse_ids("10-1").is_err());
    }

    fn error_of(text: &str) -> SaveError {
        parse(text, "rules.txt").unwrap_err()
    }

    #[test]
    fn what_is_not_iptables_save_output_is_refused_at_its_line() {
        // `iptables -L` prints tables for people, not for iptables-restore.
        let err = error_of(
            "Chain INPUT (policy ACCEPT)\ntarget     prot opt source               destination\n",
        );
        assert_eq!((err.line, err.source_name.as_str()), (1, "rules.txt"));
        assert!(err.message.contains("not iptables-save"), "{err}");
        // A config file.
        let err = error_of("mode = \"enforce\"\n");
        assert!(err.message.contains("before any table"), "{err}");
        // Nothing at all.
        assert!(error_of("\n# nothing\n").message.contains("no table"));
    }

    #[test]
    fn a_truncated_output_is_refused() {
        let err = error_of(
            "# Generated by iptables-save v1.8.9\n*filter\n:OUTPUT ACCEPT [0:0]\n\
             -A OUTPUT -d 169.254.169.254/32 -j DROP\n",
        );
        assert_eq!(err.line, 4);
        assert!(err.message.contains("without COMMIT"), "{err}");
        let err = error_of("*filter\n:OUTPUT ACCEPT [0:0]\n*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n");
        assert_eq!(err.line, 3);
        assert!(err.message.contains("no COMMIT"), "{err}");
    }

    #[test]
    fn unknown_matches_targets_and_chains_are_refused() {
        let table = |rule: &str| {
            format!(
                "# Generated by iptables-save v1.8.9\n*filter\n:OUTPUT ACCEPT [0:0]\n{rule}\nCOMMIT\n"
            )
        };
        let err = error_of(&table(
            "-A OUTPUT -d 169.254.169.254/32 -m frobnicate --x 1 -j DROP",
        ));
        assert_eq!(err.line, 4);
        assert!(err.message.contains("-m frobnicate"), "{err}");
        let err = error_of(&table("-A OUTPUT -d 169.254.169.254/32 -j NOSUCHCHAIN"));
        assert!(err.message.contains("NOSUCHCHAIN"), "{err}");
        let err = error_of(&table("-A IMDS -j DROP"));
        assert!(err.message.contains("does not declare"), "{err}");
        let err = error_of(&table("-A OUTPUT -d 169.254.169.254/33 -j DROP"));
        assert!(err.message.contains("169.254.169.254/33"), "{err}");
        let err = error_of(&table("-A OUTPUT --uid-owner 0 -j DROP"));
        assert!(err.message.contains("outside any match"), "{err}");
        let err = error_of(&table("-A OUTPUT -m owner --suppl-groups -j DROP"));
        assert!(
            err.message.contains("--suppl-groups without --gid-owner"),
            "{err}"
        );
    }

    #[test]
    fn rules_read_as_written() {
        let ruleset = parse(
            "# Generated by ip6tables-save v1.8.9 (nf_tables)\n*filter\n:OUTPUT ACCEPT [0:0]\n\
             [3:180] -A OUTPUT ! -d fd00:ec2::254/128 -m owner --gid-owner 10 --suppl-groups \
             -m comment --comment \"a b\" -j ACCEPT\nCOMMIT\n",
            "x",
        )
        .unwrap();
        let table = &ruleset.tables[0];
        assert_eq!(table.family, Family::V6);
        let rule = &table.chain("OUTPUT").unwrap().rules[0];
        assert_eq!(
            rule.matches,
            [
                Match::Destination {
                    prefixes: vec![parse_prefix("fd00:ec2::254/128").unwrap()],
                    negated: true
                },
                Match::GidOwner {
                    ids: Ids::Range(10, 10),
                    suppl_groups: true,
                    negated: false
                }
            ]
        );
        assert_eq!(rule.target, Target::Accept);
        // What `-D` needs: the words as written, counters left out.
        assert_eq!(
            rule.args.join(" "),
            "! -d fd00:ec2::254/128 -m owner --gid-owner 10 --suppl-groups -m comment --comment a b -j ACCEPT"
        );
        assert_eq!(restore_quote("a b"), "\"a b\"");
    }

    #[test]
    fn what_iptables_would_refuse_is_refused() {
        let table = |rule: &str| {
            format!(
                "# Generated by iptables-save v1.8.9\n*filter\n:OUTPUT ACCEPT [0:0]\n{rule}\nCOMMIT\n"
            )
        };
        for (rule, says) in [
            (
                "-A OUTPUT ! -m owner --uid-owner 0 -j ACCEPT",
                "`!` before -m",
            ),
            (
                "-A OUTPUT ! -d 169.254.169.254,10.0.0.1 -j DROP",
                "one address only",
            ),
            ("-A OUTPUT ! -c 1 2 -j DROP", "`!` before -c"),
            ("-A OUTPUT -c 1 -j DROP", "two numbers"),
            ("-A OUTPUT -m cgroup --path /a/../b -j DROP", "`..`"),
            ("-A OUTPUT -m owner ! --uid-owner ! 0 -j DROP", "two `!`"),
        ] {
            let err = error_of(&table(rule));
            assert_eq!(err.line, 4, "{rule}: {err}");
            assert!(err.message.contains(says), "{rule}: {err}");
        }
    }

    #[test]
    fn the_family_comes_from_the_header_or_the_addresses() {
        // Debian 10's nft backend says `xtables-save` for both families.
        let ruleset = parse(
            "# Generated by xtables-save v1.8.2 on Mon\n*filter\n:OUTPUT ACCEPT [0:0]\n\
             -A OUTPUT -d fd00:ec2::254/128 -j DROP\nCOMMIT\n",
            "x",
        )
        .unwrap();
        assert_eq!(ruleset.tables[0].family, Family::V6);
        let err = error_of(
            "# Generated by iptables-save v1.8.9\n*filter\n:OUTPUT ACCEPT [0:0]\n\
             -A OUTPUT -d fd00:ec2::254/128 -j DROP\nCOMMIT\n",
        );
        assert!(err.message.contains("other family"), "{err}");
        // Rules the nft backend cannot print would be missing: an error, not a warning.
        let err = error_of(
            "# Table `filter' is incompatible, use 'nft' tool.\n*filter\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n",
        );
        assert_eq!(err.line, 1);
        assert!(err.message.contains("by hand"), "{err}");
        // Lower-case states are states.
        let ruleset = parse(
            "# Generated by iptables-save v1.8.9\n*filter\n:OUTPUT ACCEPT [0:0]\n\
             -A OUTPUT -m conntrack --ctstate new -j DROP\nCOMMIT\n",
            "x",
        )
        .unwrap();
        assert_eq!(
            ruleset.tables[0].chains[0].rules[0].matches,
            [Match::ConnState {
                states: vec!["NEW".into()],
                negated: false
            }]
        );
    }
}

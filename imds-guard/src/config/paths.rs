//! A rule's `paths` and `deny_paths`: metadata path patterns, checked as written and compiled
//! into what the message layer compares request paths with (`imds_guard_common::http`).
//!
//! A pattern is an absolute path of at most `PATH_PARTS_MAX` parts; a part is a literal, `*`
//! (any one part) or, as the last part only, `**` (one or more parts). Matching ignores case
//! (so a deny pattern cannot be stepped around by `IAM`), and a request path the kernel cannot
//! judge safely (`..`, `%`-escapes) is refused for a rule that has patterns.

use imds_guard_common::http::{
    ANY_PART, PATH_PARTS_MAX, PATH_PATTERNS_MAX, PATTERN_DENY, PATTERN_SUBTREE, PathPattern,
    PathRules, part_hash,
};

use super::{ConfigError, Setting};

/// One part of a pattern as written.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Any,
}

/// A pattern, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Parsed {
    parts: Vec<Part>,
    subtree: bool,
}

/// Parses and checks one pattern.
fn parse(text: &str) -> Result<Parsed, String> {
    let Some(rest) = text.strip_prefix('/') else {
        return Err(format!(
            "path pattern {text:?} must be absolute, as requests name them \
             (e.g. /latest/meta-data/placement/*)"
        ));
    };
    let mut parsed = Parsed {
        parts: Vec::new(),
        subtree: false,
    };
    let written: Vec<&str> = rest.split('/').collect();
    for (i, part) in written.iter().enumerate() {
        let last = i + 1 == written.len();
        match *part {
            "" if last && i > 0 => {
                return Err(format!(
                    "path pattern {text:?} ends in '/': write {:?} for what is below it, or \
                     drop the '/' for the directory listing itself",
                    format!("{}**", text)
                ));
            }
            "" | "." | ".." => {
                return Err(format!(
                    "path pattern {text:?} has an empty, '.' or '..' part: write the path \
                     as IMDS serves it"
                ));
            }
            "**" if last => parsed.subtree = true,
            "**" => {
                return Err(format!(
                    "path pattern {text:?}: '**' may only end a pattern (e.g. \
                     /latest/meta-data/iam/**)"
                ));
            }
            "*" => parsed.parts.push(Part::Any),
            part if part.contains('*') => {
                return Err(format!(
                    "path pattern {text:?}: '*' stands for a whole part (write \
                     /latest/meta-data/*, not {part:?})"
                ));
            }
            part if part
                .bytes()
                .any(|b| matches!(b, b'%' | b'?' | b'#' | b'\\') || !b.is_ascii_graphic()) =>
            {
                return Err(format!(
                    "path pattern {text:?}: {part:?} has a character requests are refused \
                     for ('%', '?', '#', '\\', a space or a non-ASCII byte)"
                ));
            }
            part => parsed.parts.push(Part::Literal(part.to_ascii_lowercase())),
        }
    }
    if parsed.parts.is_empty() && !parsed.subtree {
        return Err(format!("path pattern {text:?} names no path"));
    }
    if parsed.parts.len() > PATH_PARTS_MAX {
        return Err(format!(
            "path pattern {text:?} has {} parts; the kernel compares at most {PATH_PARTS_MAX} \
             (end it with ** to cover what is deeper)",
            parsed.parts.len()
        ));
    }
    Ok(parsed)
}

/// Whether every path `allow` matches is matched by `deny` too.
fn covers(deny: &Parsed, allow: &Parsed) -> bool {
    let lengths = if deny.subtree {
        allow.parts.len() > deny.parts.len()
            || (allow.subtree && allow.parts.len() >= deny.parts.len())
    } else {
        !allow.subtree && allow.parts.len() == deny.parts.len()
    };
    lengths
        && deny
            .parts
            .iter()
            .zip(&allow.parts)
            .all(|(deny, allow)| match (deny, allow) {
                (Part::Any, _) => true,
                (Part::Literal(deny), Part::Literal(allow)) => deny == allow,
                (Part::Literal(_), Part::Any) => false,
            })
}

/// Checks one `paths` or `deny_paths` value (for the config's first pass).
///
/// # Errors
/// What is wrong with it, in words.
pub fn check(text: &str) -> Result<(), String> {
    parse(text).map(drop)
}

/// Compiles a rule's `paths` and `deny_paths` (each item checked already) into its
/// `PATH_RULES` value; `None` when it has neither.
///
/// # Errors
/// [`ConfigError::Invalid`] at the item when there are more than `PATH_PATTERNS_MAX`, or when
/// a `paths` item can never match because a `deny_paths` item covers it (the two contradict).
pub fn compile(
    paths: &[Setting<String>],
    deny_paths: &[Setting<String>],
) -> Result<Option<PathRules>, ConfigError> {
    if paths.is_empty() && deny_paths.is_empty() {
        return Ok(None);
    }
    let invalid = |item: &Setting<String>, message: String| ConfigError::Invalid {
        origin: item.origin.clone(),
        message,
    };
    if let Some(item) = paths.iter().chain(deny_paths).nth(PATH_PATTERNS_MAX) {
        return Err(invalid(
            item,
            format!(
                "a rule may have at most {PATH_PATTERNS_MAX} paths and deny_paths together: \
                 use '*' or '**' to cover several"
            ),
        ));
    }
    let parsed = |item: &Setting<String>| parse(&item.value).map_err(|m| invalid(item, m));
    let denied: Vec<(&Setting<String>, Parsed)> = deny_paths
        .iter()
        .map(|item| parsed(item).map(|p| (item, p)))
        .collect::<Result<_, _>>()?;
    let mut rules = PathRules::default();
    let mut push = |pattern: &Parsed, flags: u8| {
        let mut compiled = PathPattern {
            flags: flags | if pattern.subtree { PATTERN_SUBTREE } else { 0 },
            ..PathPattern::default()
        };
        for (slot, part) in compiled.parts.iter_mut().zip(&pattern.parts) {
            *slot = match part {
                Part::Any => ANY_PART,
                Part::Literal(text) => part_hash(text.as_bytes()),
            };
        }
        // At most PATH_PARTS_MAX (checked by `parse`).
        compiled.len = u8::try_from(pattern.parts.len()).unwrap_or(u8::MAX);
        rules.patterns[rules.len as usize] = compiled;
        rules.len += 1;
    };
    for item in paths {
        let allow = parsed(item)?;
        if let Some((deny, _)) = denied.iter().find(|(_, deny)| covers(deny, &allow)) {
            return Err(invalid(
                item,
                format!(
                    "paths item {:?} can never match: deny_paths item {:?} at {} covers it \
                     (remove one of them)",
                    item.value, deny.value, deny.origin
                ),
            ));
        }
        push(&allow, 0);
        rules.allow_list = 1;
    }
    for (_, deny) in &denied {
        push(deny, PATTERN_DENY);
    }
    Ok(Some(rules))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(value: &str, origin: &str) -> Setting<String> {
        Setting {
            value: value.into(),
            origin: origin.into(),
        }
    }

    #[test]
    fn patterns_are_checked_with_the_reason() {
        for good in [
            "/latest/meta-data/placement/*",
            "/latest/dynamic/instance-identity/document",
            "/latest/meta-data/iam/**",
            "/latest/*/placement/region",
            "/latest/user-data",
        ] {
            assert_eq!(check(good), Ok(()), "{good}");
        }
        for (bad, says) in [
            ("latest/meta-data", "must be absolute"),
            ("/latest//meta-data", "empty"),
            ("/latest/../iam", "'..'"),
            ("/latest/**/iam", "'**' may only end"),
            ("/latest/meta-data/ami-*", "whole part"),
            ("/latest/meta-data/%69am", "'%'"),
            ("/latest/meta-data/", "ends in '/'"),
            ("/a/b/c/d/e/f/g/h/i", "at most 8"),
        ] {
            let err = check(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn contradictions_are_refused_at_the_allowing_item() {
        let err = compile(
            &[setting("/latest/meta-data/iam/info", "f:3:10")],
            &[setting("/latest/meta-data/iam/**", "f:4:15")],
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("f:3:10:"), "{err}");
        assert!(err.contains("f:4:15"), "{err}");
        assert!(
            compile(
                &[setting("/latest/meta-data/*", "a")],
                &[setting("/latest/meta-data/iam", "b")],
            )
            .is_ok(),
            "a deny item narrower than an allow item is what deny_paths is for"
        );
        assert!(compile(&[setting("/a", "a")], &[setting("/A", "b")]).is_err());
        assert!(compile(&[setting("/a/*", "a")], &[setting("/a/*", "b")]).is_err());
        assert!(compile(&[setting("/a/**", "a")], &[setting("/a/*", "b")]).is_ok());
    }

    #[test]
    fn compiled_patterns_hold_hashes_and_flags() {
        let rules = compile(
            &[setting("/latest/meta-data/placement/*", "a")],
            &[setting("/latest/meta-data/iam/**", "b")],
        )
        .unwrap()
        .unwrap();
        assert_eq!((rules.len, rules.allow_list), (2, 1));
        assert_eq!(rules.patterns[0].len, 4);
        assert_eq!(rules.patterns[0].parts[3], ANY_PART);
        assert_eq!(rules.patterns[0].parts[2], part_hash(b"placement"));
        assert_eq!(rules.patterns[1].flags, PATTERN_DENY | PATTERN_SUBTREE);
        assert_eq!(compile(&[], &[]).unwrap(), None);
        let many: Vec<_> = (0..17).map(|i| setting(&format!("/p{i}"), "x")).collect();
        assert!(compile(&many, &[]).is_err());
    }
}

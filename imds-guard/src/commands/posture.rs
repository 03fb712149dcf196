//! `imds-guard posture`: whether this instance still answers IMDSv1, and its token responses'
//! hop limit, asked of IMDS (see [`crate::host::posture`]).

use std::fmt::Write as _;

use crate::{
    cli::PostureArgs,
    host::posture::{self, HttpTokens, Posture},
};

/// `imds-guard posture`: checks and prints. What it finds is the answer, `unknown` included:
/// it exits 0 whenever it could print one.
pub fn run(args: &PostureArgs) {
    let posture = posture::check(posture::IMDS_ADDR, posture::TIMEOUT);
    if args.json {
        super::print_json(&posture);
    } else {
        print!("{}", describe(&posture));
    }
}

/// The posture for people.
#[must_use]
pub fn describe(posture: &Posture) -> String {
    let tokens = match posture.http_tokens {
        HttpTokens::Optional => {
            "optional: IMDS answers tokenless (IMDSv1) requests (CIS AWS Foundations 5.6 fails)"
        }
        HttpTokens::Required => "required: IMDS refuses tokenless requests (IMDSv2 only)",
        HttpTokens::Unknown => "unknown: the check did not get an answer",
    };
    let hop_limit = match posture.hop_limit {
        Some(1) => "1 (token responses do not cross a bridge into containers)".to_owned(),
        Some(limit) => format!("{limit} (containers behind a bridge can get tokens too)"),
        None => "unknown".to_owned(),
    };
    let mut text = format!("http_tokens: {tokens}\nhop_limit: {hop_limit}\n");
    for problem in &posture.problems {
        let _ = writeln!(text, "  {problem}");
    }
    text
}

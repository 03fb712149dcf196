//! The operator's commands beside `run`, one file each. They read the same config and resolve
//! it the same way as the agent, so what they say is what it does.

pub mod check_config;
pub mod detach;
pub mod explain;
pub mod migrate;
pub mod posture;
pub mod reload;
pub mod report;
pub mod status;

use nix::unistd::{Gid, Group, Uid, User};

/// `uid` and its name: `998 (cwagent)`, or the number alone.
fn with_user_name(uid: u32) -> String {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("{uid} ({})", user.name),
        _ => uid.to_string(),
    }
}

/// `gid` and its name: `998 (cwagent)`, or the number alone.
fn with_group_name(gid: u32) -> String {
    match Group::from_gid(Gid::from_raw(gid)) {
        Ok(Some(group)) => format!("{gid} ({})", group.name),
        _ => gid.to_string(),
    }
}

/// Prints `value` as indented JSON.
fn print_json(value: &impl serde::Serialize) {
    // Only a map with keys that are not strings, or a `Serialize` that fails, can fail to
    // serialise: these types have neither.
    let text = serde_json::to_string_pretty(value).expect("plain structs, string keys");
    println!("{text}");
}

//! The user and group databases, listed whole where a list is complete.
//!
//! Naming an id through NSS costs 10–50 µs or more for each first lookup (`files` reads
//! `/etc/passwd` whole every time), so a flood of distinct unknown uids spends the agent's
//! lookup budget and leaves names unread. When every source `/etc/nsswitch.conf` names for a
//! database can list all its entries (`files`, `systemd`), the agent lists them
//! (`getpwent`/`getgrent`, through NSS like a lookup) and answers from the list, an id absent
//! from it included, without a lookup. With any other source (`sss`, `ldap`, `winbind`, an
//! action such as `[NOTFOUND=return]`, no line at all) a list may be partial, and each id is
//! looked up as before.

use std::{collections::HashMap, ffi::CStr, sync::Arc};

/// A database of names by id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Database {
    /// `passwd`: users.
    Users,
    /// `group`: groups.
    Groups,
}

impl Database {
    /// Its name in `nsswitch.conf`.
    fn name(self) -> &'static str {
        match self {
            Self::Users => "passwd",
            Self::Groups => "group",
        }
    }
}

/// NSS sources whose entries can all be listed: a list of them is the whole database.
const LISTABLE_SOURCES: [&str; 2] = ["files", "systemd"];

/// Whether `nsswitch` (the text of `nsswitch.conf`) has `database` answered only by sources
/// that can list all their entries, with no action that changes the order of asking.
#[must_use]
pub fn listable(nsswitch: &str, database: Database) -> bool {
    let line = nsswitch.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or_default();
        let (name, sources) = line.split_once(':')?;
        (name.trim() == database.name()).then_some(sources)
    });
    line.is_some_and(|sources| {
        let mut sources = sources.split_whitespace().peekable();
        sources.peek().is_some() && sources.all(|source| LISTABLE_SOURCES.contains(&source))
    })
}

/// Every entry of a database, as NSS lists it.
pub struct Listing {
    names: HashMap<u32, Arc<str>>,
}

impl Listing {
    /// Lists `database` now, when `nsswitch.conf` says a list is all of it; `None` when it
    /// does not (or cannot be read).
    #[must_use]
    pub fn take(database: Database) -> Option<Self> {
        let nsswitch = std::fs::read_to_string("/etc/nsswitch.conf").ok()?;
        listable(&nsswitch, database).then(|| Self {
            names: list(database),
        })
    }

    /// A listing of `names`.
    #[cfg(test)]
    #[must_use]
    pub fn of<const N: usize>(names: [(u32, &str); N]) -> Self {
        Self {
            names: names
                .map(|(id, name)| (id, name.into()))
                .into_iter()
                .collect(),
        }
    }

    /// The name of `id`; `None` when the database has none.
    #[must_use]
    pub fn name(&self, id: u32) -> Option<&Arc<str>> {
        self.names.get(&id)
    }
}

/// Every (id, name) NSS lists for `database`; the first name of an id wins, as a lookup's.
fn list(database: Database) -> HashMap<u32, Arc<str>> {
    let mut names = HashMap::new();
    let mut add = |id: u32, name: &CStr| {
        names
            .entry(id)
            .or_insert_with(|| name.to_string_lossy().into());
    };
    // SAFETY: the enumeration's state is the process's own; only the agent's reporting loop
    // (one thread) lists or looks up through it, and each entry is copied before the next
    // call. `getpwent`/`getgrent` return null at the end or on an error.
    unsafe {
        match database {
            Database::Users => {
                libc::setpwent();
                loop {
                    let entry = libc::getpwent();
                    if entry.is_null() {
                        break;
                    }
                    add((*entry).pw_uid, CStr::from_ptr((*entry).pw_name));
                }
                libc::endpwent();
            }
            Database::Groups => {
                libc::setgrent();
                loop {
                    let entry = libc::getgrent();
                    if entry.is_null() {
                        break;
                    }
                    add((*entry).gr_gid, CStr::from_ptr((*entry).gr_name));
                }
                libc::endgrent();
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sources_that_list_everything_make_a_list_complete() {
        let debian = "# comment\npasswd:         files systemd\ngroup:          files systemd\nshadow: files\n";
        assert!(listable(debian, Database::Users));
        assert!(listable(debian, Database::Groups));
        assert!(listable(
            "passwd: files # and nothing else\n",
            Database::Users
        ));
        assert!(!listable("passwd: files\n", Database::Groups), "no line");
        assert!(!listable("passwd:\n", Database::Users), "no source");
        // Amazon Linux: sssd first; a directory's users cannot all be listed.
        assert!(!listable("passwd: sss files systemd\n", Database::Users));
        assert!(!listable("passwd: files ldap\n", Database::Users));
        assert!(
            !listable("passwd: compat\n", Database::Users),
            "NIS entries"
        );
        assert!(
            !listable("passwd: files [NOTFOUND=return] systemd\n", Database::Users),
            "an action"
        );
        assert!(!listable("#passwd: files\n", Database::Users));
        assert!(!listable("passwdx: files\n", Database::Users));
    }

    #[test]
    fn a_listing_names_root_and_not_an_unused_id() {
        // This machine's own databases, listed through NSS.
        let users = list(Database::Users);
        assert_eq!(users.get(&0).map(AsRef::as_ref), Some("root"));
        assert!(!users.contains_key(&3_999_999_999));
        let groups = list(Database::Groups);
        assert_eq!(groups.get(&0).map(AsRef::as_ref), Some("root"));
    }
}

//! How the programs in force tell a container's task, read from those programs themselves
//! (the `TASK_LAYOUT` global of their read-only data), whichever build loaded them and whether
//! or not an agent runs: for `status`, and for an agent deciding whether it may run with less
//! ([`super::Kernel::load`]).

use std::collections::{BTreeSet, HashMap};

use imds_guard_common::{
    event::{CONTAINERS_BY_CGROUP_PATHS, containers_by_names, containers_by_of},
    programs,
};

use super::{btf, pins::PinDir, sys};

/// What the programs linked through the pins tell containers by.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InForce {
    /// A link is pinned on a live cgroup (or one could not be read): programs are in force.
    pub linked: bool,
    /// The `CONTAINERS_BY_*` of each program in force that reads tasks, once each.
    pub containers_by: BTreeSet<u32>,
    /// Why a link or its program could not be read, for each that could not (then how it
    /// tells containers is unknown).
    pub unreadable: Vec<String>,
}

impl InForce {
    /// Reads the programs of the links pinned in `pins`.
    #[must_use]
    pub fn read(pins: &PinDir) -> Self {
        let mut found = Self::default();
        let mut known_by_btf: HashMap<u32, Result<usize, String>> = HashMap::new();
        for name in programs::ALL {
            let mut unreadable = |why: String| found.unreadable.push(format!("{name}: {why}"));
            // A link that cannot be read may be in force: it counts as one (fail closed).
            let link = match sys::open_pinned(&pins.link(name)) {
                Ok(Some(link)) => link,
                Ok(None) => continue,
                Err(err) => {
                    unreadable(format!("opening its pinned link: {err}"));
                    continue;
                }
            };
            let state = match sys::link_info(link.as_fd_borrowed()) {
                Ok(state) if state.cgroup_id == 0 => continue,
                Ok(state) => state,
                Err(err) => {
                    unreadable(format!("reading its link: {err}"));
                    continue;
                }
            };
            found.linked = true;
            let rodata = match sys::program_rodata(state.program_id) {
                Ok(Some(rodata)) => rodata,
                // The one program that reads no global.
                Ok(None) if name == programs::SOCK_OPS => continue,
                Ok(None) => {
                    unreadable(format!(
                        "program {} has no read-only data",
                        state.program_id
                    ));
                    continue;
                }
                Err(err) => {
                    unreadable(format!("reading program {}: {err}", state.program_id));
                    continue;
                }
            };
            // The programs of one build share their BTF: read and parsed once.
            let known = known_by_btf
                .entry(rodata.btf_id)
                .or_insert_with(|| {
                    sys::btf_by_id(rodata.btf_id)
                        .map_err(|err| format!("its BTF: {err}"))
                        .and_then(|btf| btf::task_layout_offset(&btf))
                })
                .clone()
                .and_then(|offset| btf::known_at(&rodata.value, offset));
            match known {
                Ok(known) => {
                    found.containers_by.insert(containers_by_of(known));
                }
                Err(why) => unreadable(format!("its read-only data: {why}")),
            }
        }
        found.linked |= !found.unreadable.is_empty();
        found
    }

    /// Whether programs in force tell (or may tell) containers by more than their cgroup
    /// paths: one does, one could not be read, or none said (fail closed).
    #[must_use]
    pub fn stronger_than_cgroup_paths(&self) -> bool {
        self.linked
            && (!self.unreadable.is_empty()
                || self.containers_by.is_empty()
                || self
                    .containers_by
                    .iter()
                    .any(|&by| by != CONTAINERS_BY_CGROUP_PATHS))
    }

    /// Whether a program in force tells (or may tell) containers by their cgroup paths alone:
    /// one does, one could not be read, or none said. `status` warns of it.
    #[must_use]
    pub fn may_tell_by_cgroup_paths_alone(&self) -> bool {
        self.linked
            && (!self.unreadable.is_empty()
                || self.containers_by.is_empty()
                || self.containers_by.contains(&CONTAINERS_BY_CGROUP_PATHS))
    }

    /// In words: one way, `mixed: ...` when the programs differ, `unknown (...)` when one could
    /// not be read; `None` when nothing is in force.
    #[must_use]
    pub fn describe(&self) -> Option<String> {
        if !self.linked {
            return None;
        }
        if !self.unreadable.is_empty() {
            return Some(format!("unknown ({})", self.unreadable.join("; ")));
        }
        let names: Vec<&str> = self
            .containers_by
            .iter()
            .map(|&by| containers_by_names(by).0)
            .collect();
        Some(match names.as_slice() {
            [] => "unknown (no program in force reads tasks)".to_owned(),
            [one] => (*one).to_owned(),
            many => format!("mixed: {}", many.join("; ")),
        })
    }
}

#[cfg(test)]
mod tests {
    use imds_guard_common::event::{CONTAINERS_BY_NAMESPACES_BTF, CONTAINERS_BY_NAMESPACES_PROBE};

    use super::*;

    fn in_force(containers_by: &[u32], unreadable: &[&str]) -> InForce {
        InForce {
            linked: true,
            containers_by: containers_by.iter().copied().collect(),
            unreadable: unreadable.iter().map(|&why| why.to_owned()).collect(),
        }
    }

    #[test]
    fn an_agent_may_fall_back_to_cgroup_paths_only_where_that_weakens_nothing_in_force() {
        assert!(!InForce::default().stronger_than_cgroup_paths());
        assert!(!in_force(&[CONTAINERS_BY_CGROUP_PATHS], &[]).stronger_than_cgroup_paths());
        for stronger in [
            in_force(&[CONTAINERS_BY_NAMESPACES_BTF], &[]),
            in_force(&[CONTAINERS_BY_NAMESPACES_PROBE], &[]),
            in_force(
                &[CONTAINERS_BY_CGROUP_PATHS, CONTAINERS_BY_NAMESPACES_BTF],
                &[],
            ),
            // Unknown counts as stronger: fail closed.
            in_force(
                &[CONTAINERS_BY_CGROUP_PATHS],
                &["egress: reading its link: EPERM"],
            ),
            in_force(&[], &[]),
        ] {
            assert!(stronger.stronger_than_cgroup_paths(), "{stronger:?}");
        }
    }

    #[test]
    fn warns_where_a_program_in_force_may_tell_containers_by_cgroup_paths_alone() {
        assert!(!InForce::default().may_tell_by_cgroup_paths_alone());
        for namespaces in [
            in_force(&[CONTAINERS_BY_NAMESPACES_BTF], &[]),
            in_force(&[CONTAINERS_BY_NAMESPACES_PROBE], &[]),
            in_force(
                &[CONTAINERS_BY_NAMESPACES_BTF, CONTAINERS_BY_NAMESPACES_PROBE],
                &[],
            ),
        ] {
            assert!(
                !namespaces.may_tell_by_cgroup_paths_alone(),
                "{namespaces:?}"
            );
        }
        for weaker in [
            in_force(&[CONTAINERS_BY_CGROUP_PATHS], &[]),
            in_force(
                &[CONTAINERS_BY_NAMESPACES_BTF, CONTAINERS_BY_CGROUP_PATHS],
                &[],
            ),
            in_force(&[CONTAINERS_BY_NAMESPACES_BTF], &["egress: gone"]),
            in_force(&[], &[]),
        ] {
            assert!(weaker.may_tell_by_cgroup_paths_alone(), "{weaker:?}");
        }
    }

    #[test]
    fn says_how_the_programs_in_force_tell_containers() {
        assert_eq!(InForce::default().describe(), None);
        assert_eq!(
            in_force(&[CONTAINERS_BY_NAMESPACES_BTF], &[])
                .describe()
                .as_deref(),
            Some("namespaces (BTF loads) and cgroup paths")
        );
        assert_eq!(
            in_force(
                &[CONTAINERS_BY_NAMESPACES_BTF, CONTAINERS_BY_CGROUP_PATHS],
                &[]
            )
            .describe()
            .as_deref(),
            Some("mixed: namespaces (BTF loads) and cgroup paths; cgroup paths only")
        );
        assert_eq!(
            in_force(&[CONTAINERS_BY_CGROUP_PATHS], &["egress: gone"])
                .describe()
                .as_deref(),
            Some("unknown (egress: gone)")
        );
    }
}

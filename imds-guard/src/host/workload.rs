//! What a cgroup path says about the workload in it: its systemd unit, its container (id and
//! runtime) and, under Kubernetes, its pod.
//!
//! Container runtimes name their cgroups after the container id, in one of two ways depending
//! on the cgroup driver: systemd scopes (`docker-<id>.scope`, `cri-containerd-<id>.scope`,
//! `crio-<id>.scope`, `libpod-<id>.scope`) or plain directories (`/docker/<id>`,
//! `/kubepods/burstable/pod<uid>/<id>`). Kubelet names pod cgroups after the pod UID
//! (`kubepods-burstable-pod<uid with _ for ->.slice` or `pod<uid>`).

use serde::{Deserialize, Serialize};

/// A container, as its cgroup names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Container {
    /// `docker`, `containerd`, `cri-o` or `podman`; `null` when the path names the container
    /// but not its runtime (Kubernetes with the cgroupfs driver).
    pub runtime: Option<String>,
    /// The container id (64 hex digits).
    pub id: String,
}

/// What a cgroup path tells about its workload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// The innermost systemd unit (`.service` or `.scope`) of the path.
    pub unit: Option<String>,
    /// The innermost container of the path.
    pub container: Option<Container>,
    /// The Kubernetes pod UID, when the path is under `kubepods`.
    pub pod_uid: Option<String>,
}

/// systemd scope prefixes of container runtimes, and the runtime each names. Conmon, the
/// monitor process cri-o and podman start beside a container, is not the container.
const SCOPE_PREFIXES: [(&str, &str); 5] = [
    ("docker-", "docker"),
    ("cri-containerd-", "containerd"),
    ("nerdctl-", "containerd"),
    ("crio-", "cri-o"),
    ("libpod-", "podman"),
];

impl Placement {
    /// Reads a cgroup path as in `/proc/PID/cgroup` (`/system.slice/docker-<id>.scope`).
    #[must_use]
    pub fn of(path: &str) -> Self {
        let parts: Vec<&str> = path.split('/').filter(|part| !part.is_empty()).collect();
        let kubernetes = parts.iter().any(|part| part.starts_with("kubepods"));
        let mut placement = Self::default();
        for (index, part) in parts.iter().enumerate() {
            if is_unit(part) {
                placement.unit = Some((*part).to_owned());
            }
            if let Some(container) = scoped_container(part) {
                placement.container = Some(container);
            } else if is_container_id(part) && index > 0 {
                let parent = parts[index - 1];
                // ECS with the cgroupfs driver: /ecs/<task id>/<container id>.
                let ecs_task = index > 1 && parts[index - 2] == "ecs";
                if parent == "docker" || ecs_task {
                    placement.container = Some(Container {
                        runtime: Some("docker".into()),
                        id: (*part).to_owned(),
                    });
                } else if kubernetes && parent.starts_with("pod") {
                    placement.container = Some(Container {
                        runtime: None,
                        id: (*part).to_owned(),
                    });
                }
            }
            if kubernetes && let Some(uid) = pod_uid(part) {
                placement.pod_uid = Some(uid);
            }
        }
        placement
    }
}

/// Whether the cgroup at `path` is a container's or below one, as its path tells: a container
/// runtime's cgroup ([`Placement::container`]), anything under a `kubepods` cgroup (pods and
/// their containers), or an LXC container's payload, wherever in the tree.
#[must_use]
///
/// Below a user manager (`user@UID.service`) the user makes and names the cgroups: nothing
/// there counts as a container's by its name (a user could name thousands of cgroups
/// `docker-<id>.scope`); a rootless container is known by its namespaces instead.
pub fn is_container_cgroup(path: &str) -> bool {
    let system_part = user_manager(path).unwrap_or(path);
    Placement::of(system_part).container.is_some()
        || system_part
            .split('/')
            .any(|part| part.starts_with("kubepods") || part.starts_with(LXC_PAYLOAD_PREFIX))
}

/// The path of the user manager (`…/user@UID.service`) at or above the cgroup at `path`, if
/// any: below it, the user makes and names the cgroups.
#[must_use]
pub fn user_manager(path: &str) -> Option<&str> {
    let mut end = 0;
    for part in path.split('/') {
        end += part.len();
        if part.starts_with("user@") && part.ends_with(".service") {
            return Some(&path[..end]);
        }
        end += 1;
    }
    None
}

/// LXC (and Incus) name a container's cgroup `lxc.payload.<name>`.
const LXC_PAYLOAD_PREFIX: &str = "lxc.payload.";

/// Whether a cgroup or unit pattern, as written in a rule, names container cgroups: one of its
/// parts is a container runtime's (`docker-…`, `cri-containerd-…`, `crio-…`, `libpod-…`,
/// `nerdctl-…`, `kubepods…`, `lxc.payload.…`, or the cgroupfs drivers' `docker` and `ecs`
/// directories, `ecstasks…`). A rule that names them matches inside containers unless it says
/// `containers = false`.
#[must_use]
pub fn names_container_cgroups(pattern: &str) -> bool {
    pattern.split('/').any(|part| {
        SCOPE_PREFIXES
            .iter()
            .any(|(prefix, _)| part.starts_with(prefix))
            || part.starts_with("kubepods")
            || part.starts_with(LXC_PAYLOAD_PREFIX)
            || part.starts_with("ecstasks")
            || part == "docker"
            || part == "ecs"
    })
}

/// What follows a container runtime's scope prefix in a cgroup name (`docker-` in
/// `docker-<id>.scope`): where the container's id goes.
#[must_use]
pub fn after_scope_prefix(part: &str) -> Option<&str> {
    SCOPE_PREFIXES
        .iter()
        .find_map(|(prefix, _)| part.strip_prefix(prefix))
}

/// systemd unit names are case-sensitive: `.Service` is not a unit type.
fn is_unit(part: &str) -> bool {
    std::path::Path::new(part)
        .extension()
        .is_some_and(|ext| ext == "service" || ext == "scope")
}

/// `docker-<id>.scope` and the like; `libpod-<id>` (podman's cgroupfs driver) too.
fn scoped_container(part: &str) -> Option<Container> {
    let name = part.strip_suffix(".scope").unwrap_or(part);
    SCOPE_PREFIXES.iter().find_map(|(prefix, runtime)| {
        let id = name.strip_prefix(prefix)?;
        is_container_id(id).then(|| Container {
            runtime: Some((*runtime).to_owned()),
            id: id.to_owned(),
        })
    })
}

/// Container ids are 64 lowercase hex digits (docker, containerd, cri-o and podman alike).
fn is_container_id(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `kubepods-burstable-pod<uid>.slice` (systemd driver, `_` for `-`) or `pod<uid>` (cgroupfs).
fn pod_uid(part: &str) -> Option<String> {
    let name = part.strip_suffix(".slice").unwrap_or(part);
    let start = name.rfind("pod")? + "pod".len();
    let uid = name[start..].replace('_', "-");
    let groups: Vec<&str> = uid.split('-').collect();
    let shape = groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(group, len)| group.len() == len && group.bytes().all(|b| b.is_ascii_hexdigit()));
    // `kubepods-burstable-pod…` or a bare `pod…` part: not some other name containing "pod".
    let prefix = &name[..start - "pod".len()];
    (shape && (prefix.is_empty() || prefix.ends_with('-'))).then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1a6c2b9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a";
    const POD: &str = "6a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d";

    fn container(runtime: Option<&str>) -> Container {
        Container {
            runtime: runtime.map(str::to_owned),
            id: ID.into(),
        }
    }

    #[test]
    fn systemd_driver_scopes_name_runtime_and_id() {
        for (scope, runtime) in [
            (format!("docker-{ID}.scope"), "docker"),
            (format!("cri-containerd-{ID}.scope"), "containerd"),
            (format!("nerdctl-{ID}.scope"), "containerd"),
            (format!("crio-{ID}.scope"), "cri-o"),
            (format!("libpod-{ID}.scope"), "podman"),
        ] {
            let placement = Placement::of(&format!("/system.slice/{scope}"));
            assert_eq!(
                placement.container,
                Some(container(Some(runtime))),
                "{scope}"
            );
            assert_eq!(placement.unit.as_deref(), Some(scope.as_str()));
            assert_eq!(placement.pod_uid, None);
        }
        // podman puts the container's processes one level down.
        let nested = Placement::of(&format!("/machine.slice/libpod-{ID}.scope/container"));
        assert_eq!(nested.container, Some(container(Some("podman"))));
    }

    #[test]
    fn cgroupfs_driver_paths() {
        let docker = Placement::of(&format!("/docker/{ID}"));
        assert_eq!(docker.container, Some(container(Some("docker"))));
        assert_eq!(docker.unit, None);
        let podman = Placement::of(&format!("/libpod_parent/libpod-{ID}"));
        assert_eq!(podman.container, Some(container(Some("podman"))));
        let kube = Placement::of(&format!("/kubepods/burstable/pod{POD}/{ID}"));
        assert_eq!(kube.container, Some(container(None)));
        assert_eq!(kube.pod_uid.as_deref(), Some(POD));
        let guaranteed = Placement::of(&format!("/kubepods/pod{POD}/{ID}"));
        assert_eq!(guaranteed.pod_uid.as_deref(), Some(POD));
    }

    #[test]
    fn kubelet_systemd_driver_pods() {
        let underscored = POD.replace('-', "_");
        let path = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{underscored}.slice/\
             cri-containerd-{ID}.scope"
        );
        let placement = Placement::of(&path);
        assert_eq!(placement.pod_uid.as_deref(), Some(POD));
        assert_eq!(placement.container, Some(container(Some("containerd"))));
        let guaranteed = Placement::of(&format!(
            "/kubepods.slice/kubepods-pod{underscored}.slice/crio-{ID}.scope"
        ));
        assert_eq!(guaranteed.pod_uid.as_deref(), Some(POD));
        assert_eq!(guaranteed.container, Some(container(Some("cri-o"))));
    }

    #[test]
    fn container_cgroups_anywhere_in_the_tree() {
        for path in [
            format!("/system.slice/docker-{ID}.scope"),
            format!("/a/b/system.slice/docker-{ID}.scope/init"),
            format!("/docker/{ID}"),
            format!("/ecs/0123456789abcdef0123456789abcdef/{ID}"),
            "/kubepods.slice/kubepods-besteffort.slice".to_owned(),
            "/x/kubepods/burstable/podabc".to_owned(),
            "/lxc.payload.web/init.scope".to_owned(),
        ] {
            assert!(is_container_cgroup(&path), "{path}");
        }
        for path in [
            "/",
            "/system.slice/docker.service",
            "/system.slice/containerd.service",
            "/user.slice/user-1000.slice/session-3.scope",
            "/ecs/agent",
            // Names a user chose, in its own manager's subtree.
            &format!("/user.slice/user-1000.slice/user@1000.service/app.slice/docker-{ID}.scope"),
            "/user.slice/user-1000.slice/user@1000.service/kubepods-x",
        ] {
            assert!(!is_container_cgroup(path), "{path}");
        }
        assert_eq!(
            user_manager("/user.slice/user-1000.slice/user@1000.service/app.slice/a.service"),
            Some("/user.slice/user-1000.slice/user@1000.service")
        );
        assert_eq!(
            user_manager("/user.slice/user-1000.slice/user@1000.service"),
            Some("/user.slice/user-1000.slice/user@1000.service")
        );
        assert_eq!(
            user_manager("/user.slice/user-1000.slice/session-3.scope"),
            None
        );
        let ecs = Placement::of(&format!("/ecs/0123456789abcdef0123456789abcdef/{ID}"));
        assert_eq!(ecs.container, Some(container(Some("docker"))));
    }

    #[test]
    fn patterns_that_name_container_cgroups() {
        for pattern in [
            "/system.slice/docker-*.scope",
            "/system.slice/docker-0123abcd*.scope",
            "/kubepods.slice/**",
            "/docker/**",
            "/ecs/**",
            "/ecstasks.slice/**",
            "/machine.slice/libpod-*.scope",
            "cri-containerd-*.scope",
        ] {
            assert!(names_container_cgroups(pattern), "{pattern}");
        }
        for pattern in [
            "/system.slice/**",
            "/**",
            "/system.slice/docker.service",
            "amazon-ssm-agent.service",
            "/workloads/*",
        ] {
            assert!(!names_container_cgroups(pattern), "{pattern}");
        }
    }

    #[test]
    fn look_alikes_are_not_containers_or_pods() {
        for path in [
            "/system.slice/amazon-ssm-agent.service",
            "/system.slice/docker.service",
            &format!("/system.slice/crio-conmon-{ID}.scope"),
            &format!("/system.slice/docker-{}.scope", &ID[..12]),
            &format!("/system.slice/docker-{}.scope", ID.to_uppercase()),
            &format!("/somewhere/{ID}"),
            // A pod-like part outside kubepods, and a name that merely contains "pod".
            &format!("/pod{POD}"),
            &format!("/kubepods/ipod{POD}"),
        ] {
            let placement = Placement::of(path);
            assert_eq!(placement.container, None, "{path}");
            assert_eq!(placement.pod_uid, None, "{path}");
        }
        assert_eq!(
            Placement::of("/system.slice/docker.service")
                .unit
                .as_deref(),
            Some("docker.service")
        );
        assert_eq!(
            Placement::of("/user.slice/user-1000.slice/session-3.scope")
                .unit
                .as_deref(),
            Some("session-3.scope")
        );
        assert_eq!(Placement::of("/work.Service").unit, None);
    }
}

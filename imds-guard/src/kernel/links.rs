//! Attaching: one cgroup link per program, pinned so that enforcement outlives the agent, and
//! the links a predecessor pinned adopted in place (switched to the new programs, never
//! detached first).

use std::{fs::File, os::fd::AsFd as _};

use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramFd, SockOps,
    links::FdLink,
};
use imds_guard_common::{maps::HTTP_SOCKHASH, programs};
use tracing::{debug, info, warn};

use super::{Kernel, KernelError, PACKET_PROGRAM, load::program_mut, sys};
use crate::host::cgroups::Cgroup;

/// What [`Kernel::attach`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attached {
    /// Links created (and pinned).
    pub created: usize,
    /// Pinned links switched to the new program in place.
    pub updated: usize,
    /// Pinned links on another cgroup, replaced by new ones.
    pub moved: usize,
}

impl Kernel {
    /// Makes every program judge the tasks of `cgroup`, through links pinned in the pin
    /// directory so that they outlive this process. A link already pinned there for the same
    /// cgroup is switched to the new program in place (`BPF_LINK_UPDATE`: every attempt is
    /// judged by the old program or the new one, never by none). A pinned link on another
    /// cgroup (the attach point changed, or its cgroup is gone) is replaced: the new link is
    /// attached before the old one is detached.
    ///
    /// Links are multi-attach: a delegated subtree can add its own programs, and ours still run.
    ///
    /// # Errors
    /// [`KernelError::Attach`] or [`KernelError::Link`]; links attached before the failure stay.
    pub fn attach(&mut self, cgroup: &Cgroup) -> Result<Attached, KernelError> {
        // Before `sock_ops` can add a connection to the map: a socket takes the map's message
        // program when it is added.
        self.attach_message_program()?;
        let mut attached = Attached::default();
        for name in programs::ALL {
            let pin = self.pins.link(name);
            let link_error = |action: &'static str| {
                move |source| KernelError::Link {
                    program: name,
                    action,
                    source,
                }
            };
            let Some(old) =
                sys::open_pinned(&pin).map_err(link_error("opening the pinned link"))?
            else {
                let link = self.new_link(name, cgroup)?;
                link.pin(&pin).map_err(|source| KernelError::Link {
                    program: name,
                    action: "pinning the link",
                    source: std::io::Error::other(source),
                })?;
                attached.created += 1;
                continue;
            };
            let state = sys::link_info(old.as_fd_borrowed())
                .map_err(link_error("reading the pinned link"))?;
            if state.cgroup_id == cgroup.id {
                let program = self.program_fd(name)?;
                sys::link_update(old.as_fd_borrowed(), program.as_fd())
                    .map_err(link_error("switching the pinned link to the new program"))?;
                attached.updated += 1;
                continue;
            }
            // bpffs refuses names with a dot (`EPERM`: reserved by the kernel).
            let staging = pin.with_file_name(format!("{name}-staging"));
            let _ = std::fs::remove_file(&staging);
            let link = self.new_link(name, cgroup)?;
            link.pin(&staging).map_err(|source| KernelError::Link {
                program: name,
                action: "pinning the new link",
                source: std::io::Error::other(source),
            })?;
            if let Err(err) = sys::link_detach(old.as_fd_borrowed()) {
                // Its cgroup is gone already: nothing to detach.
                debug!(program = name, "old link not detached: {err}");
            }
            std::fs::rename(&staging, &pin).map_err(link_error("replacing the pinned link"))?;
            info!(
                program = name,
                from_cgroup_id = state.cgroup_id,
                to = %cgroup.path,
                "replaced the pinned link"
            );
            attached.moved += 1;
        }
        for dir in self.pins.other_map_dirs() {
            // Maps of another layout: no program of ours reads them any more.
            let removed = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .try_for_each(|entry| std::fs::remove_file(entry.path()))
                .and_then(|()| std::fs::remove_dir(&dir));
            match removed {
                Ok(()) => info!(dir = %dir.display(), "removed the maps of another layout"),
                Err(err) => warn!("cannot remove the old maps in {}: {err}", dir.display()),
            }
        }
        Ok(attached)
    }

    /// Attaches the message program to `HTTP_SOCKHASH` (see [`sys::map_prog_attach`]).
    fn attach_message_program(&mut self) -> Result<(), KernelError> {
        let name = programs::HTTP_MSG;
        let map_fd = match self.ebpf.map(HTTP_SOCKHASH) {
            Some(aya::maps::Map::SockHash(map)) => map.fd().as_fd(),
            _ => {
                return Err(KernelError::MissingInObject {
                    kind: "map",
                    name: HTTP_SOCKHASH,
                });
            }
        };
        let program = self.program_fd(name)?;
        sys::map_prog_attach(map_fd, program.as_fd()).map_err(|source| KernelError::Link {
            program: name,
            action: "attaching the message program to its map",
            source,
        })
    }

    /// The descriptor of the loaded program `name`.
    fn program_fd(&self, name: &'static str) -> Result<&ProgramFd, KernelError> {
        self.ebpf
            .program(name)
            .ok_or(KernelError::MissingInObject {
                kind: "program",
                name,
            })?
            .fd()
            .map_err(|source| KernelError::LoadProgram {
                program: name,
                source,
            })
    }

    fn new_link(&mut self, name: &'static str, cgroup: &Cgroup) -> Result<FdLink, KernelError> {
        let file = File::open(&cgroup.dir).map_err(|source| KernelError::OpenCgroup {
            dir: cgroup.dir.clone(),
            source,
        })?;
        let attach_error = |source| KernelError::Attach {
            program: name,
            cgroup: cgroup.dir.clone(),
            source,
        };
        let pinnable = |source: aya::programs::links::LinkError| KernelError::Link {
            program: name,
            action: "making the link pinnable (needs Linux 5.7+)",
            source: std::io::Error::other(source),
        };
        if name == PACKET_PROGRAM {
            let program: &mut CgroupSkb = program_mut(&mut self.ebpf, name)?;
            let id = program
                .attach(
                    file.as_fd(),
                    CgroupSkbAttachType::Egress,
                    multi_attach_mode(),
                )
                .map_err(attach_error)?;
            let link = program.take_link(id).map_err(attach_error)?;
            return FdLink::try_from(link).map_err(pinnable);
        }
        if name == programs::SOCK_OPS {
            let program: &mut SockOps = program_mut(&mut self.ebpf, name)?;
            let id = program
                .attach(file.as_fd(), multi_attach_mode())
                .map_err(attach_error)?;
            let link = program.take_link(id).map_err(attach_error)?;
            return FdLink::try_from(link).map_err(pinnable);
        }
        let program: &mut CgroupSockAddr = program_mut(&mut self.ebpf, name)?;
        let id = program
            .attach(file.as_fd(), multi_attach_mode())
            .map_err(attach_error)?;
        let link = program.take_link(id).map_err(attach_error)?;
        FdLink::try_from(link).map_err(pinnable)
    }
}

/// The attach mode that gives `BPF_F_ALLOW_MULTI` semantics.
///
/// From Linux 5.7 aya attaches with `bpf_link_create`, whose links are always multi-attach and
/// which refuses any flag (`EINVAL`): that is aya's `Single` (flags 0). Before 5.7 it uses
/// `bpf_prog_attach`, where multi-attach must be asked for.
fn multi_attach_mode() -> CgroupAttachMode {
    use aya::util::KernelVersion;
    // The same test aya makes, where an unreadable version counts as old.
    let links =
        KernelVersion::current().is_ok_and(|version| version >= KernelVersion::new(5, 7, 0));
    if links {
        CgroupAttachMode::Single
    } else {
        CgroupAttachMode::AllowMultiple
    }
}

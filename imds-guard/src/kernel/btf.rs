//! Where the running kernel keeps the fields the programs read of a task, from its BTF.
//!
//! The programs read, at the moment of an attempt, the parent of the task (pid and name), its
//! namespaces (to tell a container's task from the host's) and its executable (device, inode
//! and name), so that a `curl` that exits at once still yields an event naming what it ran and
//! its parent. aya does not relocate field offsets (CO-RE) in Rust programs, so the agent
//! looks them up here and hands them to the programs as a read-only global ([`TaskLayout`]).

use std::{cell::RefCell, collections::HashMap, path::Path};

use btf_rs::{Btf, Type};
use imds_guard_common::event::{
    LAYOUT_EXE, LAYOUT_NAMESPACES, LAYOUT_PARENT, TASK_LAYOUT_GLOBAL, TaskLayout,
};

/// The running kernel's BTF.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Why a field's offset could not be found in a BTF file (the file is named when the reasons
/// are reported).
#[derive(Debug, thiserror::Error)]
pub enum FieldError {
    /// The types of that name could not be read.
    #[error("reading the types named {name}: {source}")]
    Resolve {
        /// The struct.
        name: String,
        /// What the BTF parser said.
        source: btf_rs::Error,
    },
    /// No struct of that name.
    #[error("no struct {name}")]
    NoStruct {
        /// The struct.
        name: String,
    },
    /// The struct lacks the member.
    #[error("{field} not found")]
    NoMember {
        /// `struct.member.member`.
        field: String,
    },
    /// The member is a bit field, which the programs cannot read with a byte offset.
    #[error("{field} is a bit field")]
    BitField {
        /// `struct.member`.
        field: String,
    },
    /// A member on the way to the field is not a struct.
    #[error("{field}: {member} is not a struct")]
    NotStructMember {
        /// `struct.member.member`.
        field: String,
        /// The member that is not.
        member: String,
    },
}

/// What the running kernel's BTF gave: the layout, and for each group of fields it could not
/// find, why.
#[derive(Debug)]
pub struct Found {
    /// The offsets found; `known` has a `LAYOUT_*` bit for each complete group.
    pub layout: TaskLayout,
    /// Each missing group's consequence and reason, for the agent's warnings.
    pub missing: Vec<String>,
}

/// The offsets of the fields the programs read, in the running kernel.
#[must_use]
pub fn task_layout() -> Found {
    task_layout_in(Path::new(VMLINUX_BTF))
}

fn task_layout_in(path: &Path) -> Found {
    let mut found = Found {
        layout: TaskLayout::default(),
        missing: Vec::new(),
    };
    // Mapping avoids parsing the whole file (some kernels cannot map it: then it is parsed).
    let btf = match Btf::from_file_with_backend(path, btf_rs::Backend::Mmap)
        .or_else(|_| Btf::from_file(path))
    {
        Ok(btf) => btf,
        Err(err) => {
            found.missing.push(format!(
                "events will not name parent processes or executables, and containers are \
                 known by their cgroup path alone: {}: {err}",
                path.display()
            ));
            return found;
        }
    };
    let offsets = Offsets::new(&btf);
    let groups: [(u32, Group<'_>, &str); 3] = [
        (
            LAYOUT_PARENT,
            Offsets::parent,
            "events will not name parent processes",
        ),
        (
            LAYOUT_NAMESPACES,
            Offsets::namespaces,
            "the kernel cannot tell a container's task by its namespaces; containers are known \
             by their cgroup path alone",
        ),
        (
            LAYOUT_EXE,
            Offsets::executable,
            "events name a process's executable only while it runs",
        ),
    ];
    for (bit, group, consequence) in groups {
        // Into a copy: a group is in the layout whole or not at all.
        let mut layout = found.layout;
        match group(&offsets, &mut layout) {
            Ok(()) => {
                found.layout = layout;
                found.layout.known |= bit;
            }
            Err(why) => (found.missing).push(format!("{consequence}: {}: {why}", path.display())),
        }
    }
    found
}

/// Reads the offsets of one group of fields into a layout.
type Group<'a> = fn(&Offsets<'a>, &mut TaskLayout) -> Result<(), FieldError>;

/// Offsets of fields in the structs of one BTF.
struct Offsets<'a> {
    btf: &'a Btf,
    /// The structs found so far, by name: a lookup by name reads every type's name (the file
    /// is mapped, not indexed), so each struct is looked up once, however many of its fields
    /// are read.
    structs: RefCell<HashMap<&'static str, btf_rs::Struct>>,
}

impl<'a> Offsets<'a> {
    fn new(btf: &'a Btf) -> Self {
        Self {
            btf,
            structs: RefCell::default(),
        }
    }

    /// The struct `name`.
    fn find(&self, name: &'static str) -> Result<btf_rs::Struct, FieldError> {
        if let Some(found) = self.structs.borrow().get(name) {
            return Ok(found.clone());
        }
        let found = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|source| FieldError::Resolve {
                name: name.to_owned(),
                source,
            })?
            .into_iter()
            .find_map(|ty| match ty {
                Type::Struct(ty) => Some(ty),
                _ => None,
            })
            .ok_or_else(|| FieldError::NoStruct {
                name: name.to_owned(),
            })?;
        self.structs.borrow_mut().insert(name, found.clone());
        Ok(found)
    }

    /// `task_struct.real_parent`, `.group_leader`, `.tgid`, `.comm`.
    fn parent(&self, layout: &mut TaskLayout) -> Result<(), FieldError> {
        layout.real_parent = self.of("task_struct", &["real_parent"])?;
        layout.group_leader = self.of("task_struct", &["group_leader"])?;
        layout.tgid = self.of("task_struct", &["tgid"])?;
        layout.comm = self.of("task_struct", &["comm"])?;
        Ok(())
    }

    /// `task_struct.thread_pid`, `pid.level`, `task_struct.nsproxy`, `nsproxy.cgroup_ns`,
    /// `cgroup_namespace.ns.inum`; and, to tell whether the current task sent a packet,
    /// `task_struct.cgroups`, `css_set.dfl_cgrp`, `cgroup.kn`, `kernfs_node.id`,
    /// `task_struct.cred`, `cred.fsuid`; and the task's own ids, `cred.uid`, `cred.gid`.
    fn namespaces(&self, layout: &mut TaskLayout) -> Result<(), FieldError> {
        layout.thread_pid = self.of("task_struct", &["thread_pid"])?;
        layout.pid_level = self.of("pid", &["level"])?;
        layout.nsproxy = self.of("task_struct", &["nsproxy"])?;
        layout.cgroup_ns = self.of("nsproxy", &["cgroup_ns"])?;
        layout.cgroup_ns_inum = self.of("cgroup_namespace", &["ns", "inum"])?;
        layout.cgroups = self.of("task_struct", &["cgroups"])?;
        layout.dfl_cgrp = self.of("css_set", &["dfl_cgrp"])?;
        layout.cgroup_kn = self.of("cgroup", &["kn"])?;
        layout.kn_id = self.of("kernfs_node", &["id"])?;
        layout.cred = self.of("task_struct", &["cred"])?;
        layout.fsuid = self.of("cred", &["fsuid"])?;
        layout.uid = self.of("cred", &["uid"])?;
        layout.gid = self.of("cred", &["gid"])?;
        Ok(())
    }

    /// `task_struct.mm`, `mm_struct.exe_file`, `file.f_inode`, `file.f_path.dentry`,
    /// `inode.i_ino`, `inode.i_sb`, `super_block.s_dev`, `dentry.d_name.name`,
    /// `dentry.d_parent`.
    fn executable(&self, layout: &mut TaskLayout) -> Result<(), FieldError> {
        layout.mm = self.of("task_struct", &["mm"])?;
        layout.exe_file = self.of("mm_struct", &["exe_file"])?;
        layout.f_inode = self.of("file", &["f_inode"])?;
        layout.f_dentry = self.of("file", &["f_path", "dentry"])?;
        layout.i_ino = self.of("inode", &["i_ino"])?;
        layout.i_sb = self.of("inode", &["i_sb"])?;
        layout.s_dev = self.of("super_block", &["s_dev"])?;
        layout.d_name = self.of("dentry", &["d_name", "name"])?;
        layout.d_parent = self.of("dentry", &["d_parent"])?;
        Ok(())
    }

    /// The byte offset of `path` (a member, then members of it) in struct `name`.
    fn of(&self, name: &'static str, path: &[&str]) -> Result<u32, FieldError> {
        let field = || format!("{name}.{}", path.join("."));
        let mut ty = self.find(name)?;
        let mut offset = 0;
        for (i, member) in path.iter().enumerate() {
            let (bits, inner) = member_offset(self.btf, &ty, member, 0)
                .ok_or_else(|| FieldError::NoMember { field: field() })?;
            if !bits.is_multiple_of(8) {
                return Err(FieldError::BitField { field: field() });
            }
            offset += bits / 8;
            if i + 1 < path.len() {
                ty = match inner {
                    Some(Type::Struct(inner)) => inner,
                    _ => {
                        return Err(FieldError::NotStructMember {
                            field: field(),
                            member: (*member).to_owned(),
                        });
                    }
                };
            }
        }
        Ok(offset)
    }
}

/// The bit offset of member `name` of `ty`, looking into anonymous structs and unions, and
/// the member's type (typedefs and qualifiers resolved).
fn member_offset(
    btf: &Btf,
    ty: &btf_rs::Struct,
    name: &str,
    base_bits: u32,
) -> Option<(u32, Option<Type>)> {
    for member in &ty.members {
        let bits = base_bits + member.bit_offset();
        let member_name = btf.resolve_name(member).unwrap_or_default();
        if member_name == name {
            return Some((bits, resolved_type(btf, member)));
        }
        if member_name.is_empty()
            && let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(member)
            && let Some(found) = member_offset(btf, &inner, name, bits)
        {
            return Some(found);
        }
    }
    None
}

/// A member's type through typedefs, `const` and `volatile`.
fn resolved_type(btf: &Btf, member: &btf_rs::Member) -> Option<Type> {
    unqualified(btf, btf.resolve_chained_type(member).ok()?)
}

/// `ty` with its typedefs and qualifiers resolved.
fn unqualified(btf: &Btf, mut ty: Type) -> Option<Type> {
    for _ in 0..16 {
        ty = match ty {
            Type::Typedef(ref inner) => btf.resolve_chained_type(inner).ok()?,
            Type::Const(ref inner) | Type::Volatile(ref inner) => {
                btf.resolve_chained_type(inner).ok()?
            }
            other => return Some(other),
        };
    }
    None
}

/// Where a build keeps `TASK_LAYOUT.known` (the `LAYOUT_*` bits) in its read-only data section
/// (`sys::program_rodata`), from the build's BTF (`btf`, raw): the variable's offset in the
/// section and the member's in it, so this finds any build's, whatever it moved since.
///
/// # Errors
/// Why it cannot be found, in words.
pub fn task_layout_offset(btf: &[u8]) -> Result<usize, String> {
    use btf_rs::BtfType as _;
    let btf = Btf::from_bytes(btf).map_err(|err| format!("its BTF: {err}"))?;
    let sections = btf
        .resolve_types_by_name(".rodata")
        .map_err(|err| format!("no .rodata in its BTF: {err}"))?;
    let (offset, ty) = sections
        .iter()
        .filter_map(|ty| match ty {
            Type::Datasec(section) => Some(section),
            _ => None,
        })
        .flat_map(|section| &section.variables)
        .find_map(|entry| {
            let Ok(Type::Var(var)) = btf.resolve_type_by_id(entry.get_type_id()?) else {
                return None;
            };
            (btf.resolve_name(&var).ok()? == TASK_LAYOUT_GLOBAL).then(|| {
                let ty = btf.resolve_chained_type(&var).ok();
                (entry.offset(), ty.and_then(|ty| unqualified(&btf, ty)))
            })
        })
        .ok_or_else(|| format!("no {TASK_LAYOUT_GLOBAL} in its .rodata"))?;
    let Some(Type::Struct(layout)) = ty else {
        return Err(format!("{TASK_LAYOUT_GLOBAL} is not a struct"));
    };
    let (bits, _) = member_offset(&btf, &layout, "known", 0)
        .ok_or_else(|| format!("no {TASK_LAYOUT_GLOBAL}.known"))?;
    Ok(offset as usize + bits as usize / 8)
}

/// The `TASK_LAYOUT.known` at `offset` ([`task_layout_offset`]) of a read-only data section.
///
/// # Errors
/// When the section is shorter.
pub fn known_at(section: &[u8], offset: usize) -> Result<u32, String> {
    section
        .get(offset..offset + 4)
        .and_then(|bytes| bytes.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or_else(|| format!("{TASK_LAYOUT_GLOBAL}.known is past the section's end"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_running_kernels_fields() {
        let Found { layout, missing } = task_layout();
        assert!(missing.is_empty(), "{missing:?}");
        assert_eq!(
            layout.known,
            LAYOUT_PARENT | LAYOUT_NAMESPACES | LAYOUT_EXE,
            "{layout:?}"
        );
        // Every kernel since 2.6 keeps these far into the struct, in this order.
        assert!(layout.real_parent > layout.tgid, "{layout:?}");
        assert!(layout.comm > layout.real_parent, "{layout:?}");
        // `level` follows the reference count in `struct pid`; `inum` is inside `ns`.
        assert!(layout.pid_level >= 4 && layout.pid_level < 64, "{layout:?}");
        assert!(layout.cgroup_ns_inum < 128, "{layout:?}");
        assert!(layout.d_name > 0, "{layout:?}");
    }

    #[test]
    fn a_missing_field_says_which() {
        let btf = Btf::from_file(VMLINUX_BTF).unwrap();
        let offsets = Offsets::new(&btf);
        let err = offsets.of("task_struct", &["no_such_member"]).unwrap_err();
        assert_eq!(err.to_string(), "task_struct.no_such_member not found");
        let err = offsets.of("task_struct", &["tgid", "x"]).unwrap_err();
        assert_eq!(err.to_string(), "task_struct.tgid.x: tgid is not a struct");
        let err = offsets.of("no_such_struct_imds", &["x"]).unwrap_err();
        assert_eq!(err.to_string(), "no struct no_such_struct_imds");
    }

    #[test]
    fn a_missing_file_is_named() {
        let found = task_layout_in(Path::new("/nonexistent/vmlinux"));
        assert_eq!(found.layout.known, 0);
        assert!(
            found.missing[0].contains("/nonexistent/vmlinux: "),
            "{:?}",
            found.missing
        );
    }
}

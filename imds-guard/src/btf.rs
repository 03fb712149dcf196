//! Where the running kernel keeps the `task_struct` fields the programs read, from its BTF.
//!
//! The programs record the parent of a task making an attempt (pid and name) at the moment of
//! the attempt, so that a `curl` that exits at once still yields an event naming its parent.
//! aya does not relocate field offsets (CO-RE) in Rust programs, so the agent looks them up
//! here and hands them to the programs as a read-only global ([`TaskLayout`]).

use std::path::Path;

use btf_rs::{Btf, Type};
use imds_guard_common::event::TaskLayout;

/// The running kernel's BTF.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The offsets of `task_struct.real_parent`, `.group_leader`, `.tgid` and `.comm` in the
/// running kernel.
///
/// # Errors
/// A text saying what is missing; the agent then runs without parent information (events
/// say it could not be read).
pub fn task_layout() -> Result<TaskLayout, String> {
    task_layout_in(Path::new(VMLINUX_BTF))
}

fn task_layout_in(path: &Path) -> Result<TaskLayout, String> {
    // Mapping avoids parsing the whole file (some kernels cannot map it: then it is parsed).
    let btf = Btf::from_file_with_backend(path, btf_rs::Backend::Mmap)
        .or_else(|_| Btf::from_file(path))
        .map_err(|err| format!("{}: {err}", path.display()))?;
    let task = btf
        .resolve_types_by_name("task_struct")
        .map_err(|err| format!("{}: no task_struct: {err}", path.display()))?
        .into_iter()
        .find_map(|ty| match ty {
            Type::Struct(task) => Some(task),
            _ => None,
        })
        .ok_or_else(|| format!("{}: task_struct is not a struct", path.display()))?;
    let offset = |name: &str| {
        member_offset(&btf, &task, name, 0)
            .ok_or_else(|| format!("{}: task_struct has no field {name}", path.display()))
    };
    Ok(TaskLayout {
        known: 1,
        real_parent: offset("real_parent")?,
        group_leader: offset("group_leader")?,
        tgid: offset("tgid")?,
        comm: offset("comm")?,
    })
}

/// The byte offset of member `name` of `ty`, looking into anonymous structs and unions.
fn member_offset(btf: &Btf, ty: &btf_rs::Struct, name: &str, base_bits: u32) -> Option<u32> {
    for member in &ty.members {
        let bits = base_bits + member.bit_offset();
        let member_name = btf.resolve_name(member).unwrap_or_default();
        if member_name == name {
            return bits.is_multiple_of(8).then_some(bits / 8);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_running_kernels_task_struct_fields() {
        let layout = task_layout().unwrap();
        assert_eq!(layout.known, 1);
        // Every kernel since 2.6 keeps these far into the struct, in this order.
        assert!(layout.real_parent > layout.tgid, "{layout:?}");
        assert!(layout.comm > layout.real_parent, "{layout:?}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = task_layout_in(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.starts_with("/nonexistent/vmlinux: "), "{err}");
    }
}

//! The raw `bpf()` calls aya lacks, each named after the aya API that would replace it.
//!
//! The agent adopts the links a predecessor pinned: it opens them, reads which cgroup each is
//! on, swaps its own programs into them and, on `detach`, detaches them whoever holds them. In
//! aya 0.14 `PinnedLink::from_pin` opens a pinned link, but the `FdLink` it gives does not
//! expose its descriptor, which the three calls after it need; `LinkInfo` has no accessor for
//! the cgroup a link is on; `bpf_link_update` is crate-private; and there is no
//! `BPF_LINK_DETACH` (`FdLink::detach` only closes the descriptor). `status` looks up the
//! program a link runs by its id, which `ProgramInfo` cannot be made from (`loaded_programs()`
//! walks them all, and fails whole when one is unloaded during the walk). The agent and `status`
//! read the read-only data of the programs in force ([`program_rodata`]): aya opens a map by id
//! (`MapData::from_id`) but reads an array's value only as a type it knows at compile time,
//! and has no way to a program's maps, nor to an object's BTF by its id.

use std::{
    ffi::CString,
    fmt::Write as _,
    io,
    mem::MaybeUninit,
    mem::size_of,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya::{Pod, maps::IterableMap};

/// An open BPF object (link, program or map).
#[derive(Debug)]
pub struct BpfFd(OwnedFd);

impl BpfFd {
    /// The descriptor, borrowed.
    #[must_use]
    pub fn as_fd_borrowed(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.0)
    }
}

/// What a pinned cgroup link is: its program and where it is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkState {
    /// The link's id.
    pub id: u32,
    /// The program it runs.
    pub program_id: u32,
    /// The cgroup it is attached to; 0 once that cgroup is gone.
    pub cgroup_id: u64,
    /// `BPF_CGROUP_INET4_CONNECT` and so on.
    pub attach_type: u32,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// `bpf(cmd, attr, size)`, returning the non-negative result.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for `cmd`, valid for reads
    // and writes of `size_of::<T>()` bytes; the kernel zero-extends shorter attrs.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<T>(),
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn owned(fd: i64) -> io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("descriptor out of range"))?;
    // SAFETY: the kernel just returned this new descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the object pinned at `path`; `None` when nothing is pinned there. (aya:
/// `PinnedLink::from_pin`, whose `FdLink` keeps its descriptor to itself.)
///
/// # Errors
/// Any other failure of `BPF_OBJ_GET`.
pub fn open_pinned(path: &Path) -> io::Result<Option<BpfFd>> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    match bpf(BPF_OBJ_GET, &mut attr) {
        Ok(fd) => Ok(Some(BpfFd(owned(fd)?))),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// Reads `size` bytes of an object's info (`struct bpf_*_info`) into `buffer`.
fn object_info(fd: BorrowedFd<'_>, buffer: &mut [u8]) -> io::Result<()> {
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = GetInfo {
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(io::Error::other)?,
        info_len: u32::try_from(buffer.len()).map_err(io::Error::other)?,
        info: buffer.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

fn u32_at(buffer: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes(buffer[offset..offset + 4].try_into().unwrap_or_default())
}

fn u64_at(buffer: &[u8], offset: usize) -> u64 {
    u64::from_ne_bytes(buffer[offset..offset + 8].try_into().unwrap_or_default())
}

/// What a cgroup link is attached to (`struct bpf_link_info`: type, id, `prog_id`, then the
/// 8-aligned union whose `cgroup` member is `cgroup_id`, `attach_type`). (aya: `LinkInfo`,
/// which has no accessor for that union.)
///
/// # Errors
/// When the kernel refuses `BPF_OBJ_GET_INFO_BY_FD`.
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkState> {
    let mut buffer = [0u8; 64];
    object_info(link, &mut buffer)?;
    Ok(LinkState {
        id: u32_at(&buffer, 4),
        program_id: u32_at(&buffer, 8),
        cgroup_id: u64_at(&buffer, 16),
        attach_type: u32_at(&buffer, 24),
    })
}

/// Makes `link` run `program` instead of its current one, atomically: every attempt is judged
/// by one or the other (Linux 5.7+). (aya: its `bpf_link_update` is crate-private.)
///
/// # Errors
/// When the kernel refuses `BPF_LINK_UPDATE` (a program of another type, say).
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = LinkUpdate {
        link_fd: u32::try_from(link.as_raw_fd()).map_err(io::Error::other)?,
        new_prog_fd: u32::try_from(program.as_raw_fd()).map_err(io::Error::other)?,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Detaches `link` now, whoever else holds it (Linux 5.9+). (aya has no `BPF_LINK_DETACH`:
/// `FdLink::detach` closes the descriptor, which leaves a pinned link attached.)
///
/// # Errors
/// When the kernel refuses `BPF_LINK_DETACH`.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    let mut attr = LinkDetach {
        link_fd: u32::try_from(link.as_raw_fd()).map_err(io::Error::other)?,
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// `BPF_SK_MSG_VERDICT`: a message program on a sockmap or sockhash.
pub const ATTACH_SK_MSG_VERDICT: u32 = 7;
const BPF_PROG_ATTACH: libc::c_long = 8;

/// Attaches `program` to the sockhash `map` as its message program (`BPF_PROG_ATTACH` with no
/// link): it stays attached as long as the map lives, which its pin keeps beyond this process;
/// attaching again replaces the map's program (the sockets already in it keep the one they
/// were added under). (aya: `SkMsg::attach` returns a link that detaches the program when it
/// is dropped, which would take enforcement down with the agent.)
///
/// # Errors
/// When the kernel refuses `BPF_PROG_ATTACH`.
pub fn map_prog_attach(map: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct ProgAttach {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
        replace_bpf_fd: u32,
    }
    let mut attr = ProgAttach {
        target_fd: u32::try_from(map.as_raw_fd()).map_err(io::Error::other)?,
        attach_bpf_fd: u32::try_from(program.as_raw_fd()).map_err(io::Error::other)?,
        attach_type: ATTACH_SK_MSG_VERDICT,
        attach_flags: 0,
        replace_bpf_fd: 0,
    };
    bpf(BPF_PROG_ATTACH, &mut attr).map(drop)
}

/// Every entry of the hash map `map`, read `batch` at a time (`BPF_MAP_LOOKUP_BATCH`, 5.6+): a
/// call per batch where stepping from key to key takes two per entry. The kernel reads the map
/// bucket by bucket, so an entry present for the whole read is read once, never twice, and one
/// made or deleted meanwhile may be read or not. The typed map checked that `K` and `V` have
/// its key and value sizes. (aya 0.14 has no batch operations.)
///
/// # Errors
/// When the kernel refuses the call: a map type without batch operations, or a bucket with
/// more than `batch` entries (`ENOSPC`).
pub fn map_entries<K: Pod, V: Pod>(
    map: &impl IterableMap<K, V>,
    batch: usize,
) -> io::Result<Vec<(K, V)>> {
    let mut entries = Vec::new();
    lookup_batches(map.map(), batch, 1, |key: K, values: &[V]| {
        entries.extend(values.first().map(|&value| (key, value)));
    })?;
    Ok(entries)
}

/// Every entry of the per-CPU array `map`, by index, each as its values summed over the
/// possible CPUs with `add`, read `batch` indices at a time (`BPF_MAP_LOOKUP_BATCH`, 5.6+): a
/// call per batch where `PerCpuArray::get` takes one per index. Each index's values are read
/// at once; the indices one after another.
///
/// # Errors
/// When the possible CPUs cannot be counted, or the kernel refuses the call.
pub fn per_cpu_sums<V: Pod + Default>(
    map: &impl IterableMap<u32, aya::maps::PerCpuValues<V>>,
    batch: usize,
    add: impl Fn(V, V) -> V,
) -> io::Result<Vec<V>> {
    // The kernel copies each CPU's value at a multiple of 8 bytes.
    if !size_of::<V>().is_multiple_of(8) {
        return Err(io::Error::other(
            "a per-CPU value of a size not a multiple of 8",
        ));
    }
    let cpus = aya::util::nr_cpus().map_err(|(_, err)| err)?;
    let mut sums = Vec::new();
    lookup_batches(map.map(), batch, cpus, |index: u32, values: &[V]| {
        // Indices come in order from 0: the array has no holes.
        debug_assert_eq!(index as usize, sums.len());
        sums.push(values.iter().copied().fold(V::default(), &add));
    })?;
    Ok(sums)
}

/// Reads every entry of `map` with `BPF_MAP_LOOKUP_BATCH`, `batch` keys a call, handing each
/// key and its `values_per_key` values (one per possible CPU for a per-CPU map, else one) to
/// `each`.
fn lookup_batches<K: Pod, V: Pod>(
    map: &aya::maps::MapData,
    batch: usize,
    values_per_key: usize,
    mut each: impl FnMut(K, &[V]),
) -> io::Result<()> {
    #[repr(C)]
    #[expect(
        clippy::struct_field_names,
        reason = "the kernel's names (`union bpf_attr`, `batch`)"
    )]
    struct Batch {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    // With no room, the kernel reads nothing and says nothing of where it stopped.
    if batch == 0 {
        return Err(io::Error::other("a batch read of no entries"));
    }
    let map_fd = u32::try_from(map.fd().as_fd().as_raw_fd()).map_err(io::Error::other)?;
    let count = u32::try_from(batch).map_err(io::Error::other)?;
    let mut keys: Vec<MaybeUninit<K>> = Vec::with_capacity(batch);
    let mut values: Vec<MaybeUninit<V>> = Vec::with_capacity(batch * values_per_key);
    // Where the next batch starts: the last key read (an array's) or a bucket index (a hash
    // map's), which the kernel writes; 8 bytes hold either.
    let (mut cursor, mut next) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = Batch {
            in_batch: if first {
                0
            } else {
                std::ptr::from_ref(&cursor) as u64
            },
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count,
            map_fd,
            elem_flags: 0,
            flags: 0,
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let read = (attr.count as usize).min(batch);
        for at in 0..read {
            // SAFETY: the kernel wrote `count` keys and as many times `values_per_key` values
            // into the buffers, which hold `batch` of each; `K` and `V` are plain data of the
            // map's key and value sizes (a per-CPU value's is a multiple of 8: no gaps).
            let (key, values) = unsafe {
                (
                    keys.as_ptr().add(at).read().assume_init(),
                    std::slice::from_raw_parts(
                        values.as_ptr().add(at * values_per_key).cast::<V>(),
                        values_per_key,
                    ),
                )
            };
            each(key, values);
        }
        match result {
            Ok(_) => (cursor, first) = (next, false),
            // The end of the map: this call read what was left.
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(err) => return Err(err),
        }
    }
}

/// A loaded program, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProgramInfo {
    /// Its id.
    pub id: u32,
    /// Its name (the kernel keeps 15 bytes).
    pub name: String,
    /// The kernel's hash of its instructions: equal tags, equal programs.
    pub tag: String,
}

/// The loaded program with `id` (`struct bpf_prog_info`: `tag` at 8, `name` at 64); `None`
/// when there is none. (aya: `ProgramInfo` has no constructor from an id.)
///
/// # Errors
/// Any other failure of `BPF_PROG_GET_FD_BY_ID` or `BPF_OBJ_GET_INFO_BY_FD`.
pub fn program_info(id: u32) -> io::Result<Option<ProgramInfo>> {
    let Some(fd) = fd_by_id(BPF_PROG_GET_FD_BY_ID, id)? else {
        return Ok(None);
    };
    let mut buffer = [0u8; 128];
    object_info(std::os::fd::AsFd::as_fd(&fd), &mut buffer)?;
    let tag = buffer[8..16]
        .iter()
        .fold(String::with_capacity(16), |mut tag, byte| {
            let _ = write!(tag, "{byte:02x}");
            tag
        });
    let name_bytes = &buffer[64..80];
    let end = name_bytes
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(name_bytes.len());
    Ok(Some(ProgramInfo {
        id: u32_at(&buffer, 4),
        name: String::from_utf8_lossy(&name_bytes[..end]).into_owned(),
        tag,
    }))
}

/// The object (program, map or BTF, as `cmd` says) with `id`; `None` when there is none.
fn fd_by_id(cmd: libc::c_long, id: u32) -> io::Result<Option<OwnedFd>> {
    #[repr(C)]
    struct GetFdById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = GetFdById {
        id,
        next_id: 0,
        open_flags: 0,
    };
    match bpf(cmd, &mut attr) {
        Ok(fd) => owned(fd).map(Some),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// A map's read-only data section as a program holds it: the value of its one entry, and the
/// id of the BTF of the object it came from (which says where each variable lies in it).
#[derive(Debug)]
pub struct Rodata {
    /// The section's bytes.
    pub value: Vec<u8>,
    /// The program's BTF ([`btf_by_id`]).
    pub btf_id: u32,
}

/// Names the kernel gives a program's `.rodata` map: aya names it after its section (libbpf
/// after its object, `<object>.rodata`, cut to 15 bytes).
fn is_rodata_name(name: &[u8]) -> bool {
    name == b".rodata" || name.ends_with(b".rodata")
}

/// `BPF_MAP_TYPE_ARRAY`.
const MAP_TYPE_ARRAY: u32 = 2;

/// The read-only data section of the loaded program with `id` (an array map of one 4-byte key
/// named `.rodata`, among the maps it uses), with the id of its object's BTF (the program's:
/// aya loads data maps without one). `struct bpf_prog_info`: `nr_map_ids` at 52, `map_ids` at
/// 56, `btf_id` at 128; `struct bpf_map_info`: `type` at 0, `key_size` at 8, `value_size` at
/// 12, `max_entries` at 16, `name` at 24. `None` when there is no such program, or it has no
/// such map.
///
/// # Errors
/// When the kernel refuses one of the calls.
pub fn program_rodata(id: u32) -> io::Result<Option<Rodata>> {
    let Some(program) = fd_by_id(BPF_PROG_GET_FD_BY_ID, id)? else {
        return Ok(None);
    };
    // Asked with room for 16 ids, then again with room for as many as it has.
    let mut map_ids = vec![0u32; 16];
    let (count, btf_id) = loop {
        let mut info = [0u8; 136];
        let capacity = u32::try_from(map_ids.len()).map_err(io::Error::other)?;
        info[52..56].copy_from_slice(&capacity.to_ne_bytes());
        info[56..64].copy_from_slice(&(map_ids.as_mut_ptr() as u64).to_ne_bytes());
        object_info(std::os::fd::AsFd::as_fd(&program), &mut info)?;
        let count = u32_at(&info, 52) as usize;
        if count <= map_ids.len() {
            break (count, u32_at(&info, 128));
        }
        map_ids = vec![0u32; count];
    };
    for &map_id in &map_ids[..count] {
        let Some(map) = fd_by_id(BPF_MAP_GET_FD_BY_ID, map_id)? else {
            continue;
        };
        let mut info = [0u8; 96];
        object_info(std::os::fd::AsFd::as_fd(&map), &mut info)?;
        let name = &info[24..40];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        // Read only as what it must be: a per-CPU value or a wider key would not fit.
        if !is_rodata_name(name)
            || u32_at(&info, 0) != MAP_TYPE_ARRAY
            || u32_at(&info, 8) != 4
            || u32_at(&info, 16) == 0
        {
            continue;
        }
        let mut value = vec![0u8; u32_at(&info, 12) as usize];
        lookup(std::os::fd::AsFd::as_fd(&map), 0, &mut value)?;
        return Ok(Some(Rodata { value, btf_id }));
    }
    Ok(None)
}

/// Reads the value of key `key` of array map `map` into `value` (its whole size).
fn lookup(map: BorrowedFd<'_>, key: u32, value: &mut [u8]) -> io::Result<()> {
    #[repr(C)]
    struct Lookup {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut attr = Lookup {
        map_fd: u32::try_from(map.as_raw_fd()).map_err(io::Error::other)?,
        _pad: 0,
        key: std::ptr::from_ref(&key) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).map(drop)
}

/// The raw BTF with `id` (`struct bpf_btf_info`: `btf` at 0, `btf_size` at 8): asked once for
/// its size, then for its bytes.
///
/// # Errors
/// When there is none, or the kernel refuses a call.
pub fn btf_by_id(id: u32) -> io::Result<Vec<u8>> {
    let btf = fd_by_id(BPF_BTF_GET_FD_BY_ID, id)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no BTF {id}")))?;
    let mut info = [0u8; 32];
    object_info(std::os::fd::AsFd::as_fd(&btf), &mut info)?;
    let mut bytes = vec![0u8; u32_at(&info, 8) as usize];
    let mut info = [0u8; 32];
    info[0..8].copy_from_slice(&(bytes.as_mut_ptr() as u64).to_ne_bytes());
    info[8..12].copy_from_slice(
        &u32::try_from(bytes.len())
            .map_err(io::Error::other)?
            .to_ne_bytes(),
    );
    object_info(std::os::fd::AsFd::as_fd(&btf), &mut info)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_program_is_none() {
        // Ids count up from 1 and are never reused: this one is far beyond any loaded.
        assert_eq!(program_info(u32::MAX).unwrap(), None);
    }

    /// A new map of `map_type` (`BPF_MAP_TYPE_*`), with no flags, of this process alone.
    fn create_map(
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    ) -> aya::maps::MapData {
        #[repr(C)]
        struct MapCreate {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        const BPF_MAP_CREATE: libc::c_long = 0;
        let mut attr = MapCreate {
            map_type,
            key_size,
            value_size,
            max_entries,
            map_flags: 0,
        };
        let fd = owned(bpf(BPF_MAP_CREATE, &mut attr).unwrap()).unwrap();
        aya::maps::MapData::from_fd(fd).unwrap()
    }

    #[test]
    fn a_batch_read_yields_every_entry_of_a_map_once() {
        const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
        let data = create_map(BPF_MAP_TYPE_LRU_HASH, 8, 4, 1024);
        let mut map: aya::maps::HashMap<_, u64, u32> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).unwrap();
        assert!(map_entries(&map, 16).unwrap().is_empty());
        let mut inserted: Vec<(u64, u32)> = (0..500u32).map(|n| (u64::from(n) * 7919, n)).collect();
        for (key, value) in &inserted {
            map.insert(key, value, 0).unwrap();
        }
        // Batches smaller than the map: the read goes on where each left off.
        for batch in [16, 500, 4096] {
            let mut read = map_entries(&map, batch).unwrap();
            read.sort_unstable();
            inserted.sort_unstable();
            assert_eq!(read, inserted, "batches of {batch}");
        }
    }

    #[test]
    fn a_per_cpu_batch_read_sums_every_index_over_the_cpus() {
        const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
        const ENTRIES: u32 = 300;
        let data = create_map(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, ENTRIES);
        let mut map: aya::maps::PerCpuArray<_, [u64; 2]> =
            aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).unwrap();
        let cpus = aya::util::nr_cpus().unwrap();
        // Each CPU's value differs, so that a sum of the wrong CPUs or indices shows.
        let value = |index: u64, cpu: u64| [index * 1000 + cpu, cpu + 1];
        for index in 0..ENTRIES {
            let values = (0..cpus as u64).map(|cpu| value(u64::from(index), cpu));
            let values = aya::maps::PerCpuValues::try_from(values.collect::<Vec<_>>()).unwrap();
            map.set(index, values, 0).unwrap();
        }
        let add = |a: [u64; 2], b: [u64; 2]| [a[0] + b[0], a[1] + b[1]];
        let expected: Vec<[u64; 2]> = (0..u64::from(ENTRIES))
            .map(|index| {
                (0..cpus as u64)
                    .map(|cpu| value(index, cpu))
                    .fold([0, 0], add)
            })
            .collect();
        // Batches smaller than the map: the read goes on where each left off.
        for batch in [7, 300, 1024] {
            assert_eq!(
                per_cpu_sums(&map, batch, add).unwrap(),
                expected,
                "batches of {batch}"
            );
        }
    }

    #[test]
    fn nothing_pinned_is_none() {
        // Not a bpf filesystem: BPF_OBJ_GET fails, but not with "no such file".
        let dir = tempfile::tempdir().unwrap();
        assert!(open_pinned(&dir.path().join("absent")).unwrap().is_none());
    }
}

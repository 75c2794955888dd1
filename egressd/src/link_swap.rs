//! Replacing the program of a cgroup link a previous daemon pinned, in place (BPF_LINK_UPDATE).
//! Attaching a new link and then removing the old one leaves a moment where both programs run on
//! every call, and each counts (and reports) the same decision; swapping the program inside the
//! link leaves none: each call runs exactly one of them. aya 0.14 offers this only for XDP and TC.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

use crate::bpf_sys::bpf;

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info` up to its cgroup member, with room for the rest.
#[repr(C)]
struct LinkInfo {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _rest: [u32; 27],
}

#[repr(C)]
#[derive(Default)]
struct UpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// The link pinned at `pin` when it is a cgroup link of `attach_type` on cgroup `cgroup_id`.
fn pinned_cgroup_link(pin: &Path, cgroup_id: u64, attach_type: u32) -> io::Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut get = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut get)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: all-zero is a valid LinkInfo (plain integers).
    let mut info: LinkInfo = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: &mut info as *mut LinkInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    if info.type_ != BPF_LINK_TYPE_CGROUP
        || info.cgroup_id != cgroup_id
        || info.attach_type != attach_type
    {
        return Err(io::Error::other(format!(
            "the pinned link (id {}) is not on this cgroup's {attach_type} hook",
            info.id
        )));
    }
    Ok(fd)
}

/// Puts `prog` into the cgroup link pinned at `pin` (same cgroup, same attach type) in one step.
/// An error means nothing changed: the caller attaches a new link instead.
pub fn swap_into_pinned(
    pin: &Path,
    prog: BorrowedFd<'_>,
    cgroup_id: u64,
    attach_type: u32,
) -> io::Result<()> {
    let link = pinned_cgroup_link(pin, cgroup_id, attach_type)?;
    let mut attr = UpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

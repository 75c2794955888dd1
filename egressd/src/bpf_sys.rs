//! bpf(2) for the commands aya 0.14 does not wrap (link update, batch map operations), and the
//! `batch` member of union bpf_attr that the batch commands read.

use std::io;

pub const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
pub const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
pub const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// bpf(2) with `attr`, the union bpf_attr member `cmd` reads. Returns the call's result (a new
/// descriptor for the commands that make one).
pub fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is the bpf_attr member `cmd` reads, of the size passed; pointers inside it
    // (set by the callers) outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The `batch` member of union bpf_attr (BPF_MAP_*_BATCH). The kernel writes back `count`, the
/// elements done, also when the call fails.
#[repr(C)]
#[derive(Default)]
pub struct BatchAttr {
    pub in_batch: u64,
    pub out_batch: u64,
    pub keys: u64,
    pub values: u64,
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}

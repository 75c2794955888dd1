//! Which enforcement layers this kernel can run. The cgroup layer is required; the BPF LSM layer
//! (socket families, and more to come) is used where the kernel runs BPF LSM hooks, which many
//! distributions leave out of their default LSM list.

use std::{format, string::String};

pub const LSM_LIST: &str = "/sys/kernel/security/lsm";

/// Whether "bpf" is in the kernel's active LSM list (securityfs must be mounted to tell).
pub fn bpf_lsm_listed() -> Result<bool, String> {
    let list = std::fs::read_to_string(LSM_LIST).map_err(|e| {
        format!("cannot read {LSM_LIST} ({e}); mount securityfs: `mount -t securityfs securityfs /sys/kernel/security`")
    })?;
    Ok(list.split(',').any(|m| m.trim() == "bpf"))
}

/// The Landlock ABI version the kernel offers (`landlock_create_ruleset` with the VERSION flag),
/// or `None` when Landlock is off. Version 6 brought the scopes egressd uses (abstract unix
/// sockets, signals); any version confines ptrace and /proc/PID/mem to the sandbox's own domain.
pub fn landlock_abi() -> Option<i64> {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: landlock_create_ruleset(NULL, 0, VERSION) only returns a number.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            core::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    (v > 0).then_some(v)
}

/// The least Landlock ABI egressd needs for its layer.
pub const LANDLOCK_MIN_ABI: i64 = 6;

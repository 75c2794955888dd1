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

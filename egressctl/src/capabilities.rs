//! Dropping every capability from a root sandbox. Clearing the bounding set is what makes it stick:
//! a process running as uid 0 regains its permitted set on every exec unless the bounding set is
//! empty.

use caps::CapSet;

/// Empties the bounding and ambient sets. Needs CAP_SETPCAP, so it runs before the rest.
pub fn drop_bounding_and_ambient() -> Result<(), String> {
    caps::clear(None, CapSet::Bounding).map_err(|e| format!("clearing the bounding set: {e}"))?;
    caps::clear(None, CapSet::Ambient).map_err(|e| format!("clearing the ambient set: {e}"))
}

/// Empties the inheritable, permitted and effective sets, then checks from /proc that nothing is
/// left anywhere (a capability newer than this build's list would show up here).
pub fn drop_the_rest() -> Result<(), String> {
    for set in [CapSet::Inheritable, CapSet::Permitted, CapSet::Effective] {
        caps::clear(None, set).map_err(|e| format!("clearing the {set:?} set: {e}"))?;
    }
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("reading /proc/self/status: {e}"))?;
    match left_over(&status) {
        None => Ok(()),
        Some(line) => Err(format!("capabilities left after dropping them all: {line}")),
    }
}

/// The first Cap* line of /proc/PID/status with a bit set.
fn left_over(status: &str) -> Option<&str> {
    status.lines().find(|l| {
        ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"]
            .iter()
            .any(|k| l.starts_with(k))
            && l.split_whitespace()
                .nth(1)
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                != Some(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_bit_in_any_capability_set_is_found() {
        let none = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\n";
        assert_eq!(left_over(none), None);
        let bnd = none.replace("CapBnd:\t0000000000000000", "CapBnd:\t0000010000000000");
        assert_eq!(left_over(&bnd), Some("CapBnd:\t0000010000000000"));
        let garbled = none.replace("CapEff:\t0000000000000000", "CapEff:\tzz");
        assert!(left_over(&garbled).is_some());
    }
}

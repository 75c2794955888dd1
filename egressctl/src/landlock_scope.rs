//! The Landlock layer: egressctl confines CMD to a Landlock domain of its own before exec. The
//! domain does not restrict files; it scopes what crosses its border: no ptrace, process_vm_*,
//! pidfd_getfd or /proc/PID/mem of a process outside (Landlock's ptrace rule), no signals to
//! processes outside, and no connect to abstract unix sockets made outside (the session D-Bus on
//! many systems, the X server's abstract socket). Inside the domain all of these still work, so a
//! debugger in the sandbox does.

use landlock::{CompatLevel, Compatible as _, Ruleset, RulesetAttr as _, RulesetStatus, Scope};

pub fn restrict_self() -> Result<(), String> {
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .scope(Scope::AbstractUnixSocket | Scope::Signal)
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self())
        .map_err(|e| format!("Landlock: {e}"))?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => Ok(()),
        other => Err(format!("Landlock enforced only {other:?}")),
    }
}

//! The programs are the `egressd` binary of this crate, built for `bpfel-unknown-none` by egressd's
//! build script. This empty library only lets egressd name the crate as a build dependency, so that
//! cargo rebuilds the daemon whenever the programs change.
#![no_std]

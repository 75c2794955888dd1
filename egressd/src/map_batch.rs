//! Writing and removing many map entries in one system call (BPF_MAP_UPDATE_BATCH,
//! BPF_MAP_DELETE_BATCH; the kernel's generic batch ops, which LPM tries have too). A reload of a
//! thousand allow rules is a thousand trie writes: one call each cost more than the writes. aya
//! 0.14 offers batches for no map type.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::maps::MapData;

use crate::bpf_sys::{bpf, BatchAttr, BPF_MAP_DELETE_BATCH, BPF_MAP_UPDATE_BATCH};

/// Entries per call: bounded so one call never holds the CPU long (the kernel reschedules
/// between elements, but the buffers stay small too).
const CHUNK: usize = 4096;

/// Why a batch call failed: the kernel has no batch op for this map (nothing was done; the
/// caller writes one entry at a time), or an entry failed after `done` were written.
#[derive(Debug)]
pub enum BatchError {
    Unsupported,
    Failed { done: usize, error: io::Error },
}

fn unsupported(e: &io::Error) -> bool {
    // ENOTSUPP (524) is what the kernel returns for a map type without the op; EINVAL for a
    // kernel that predates the command.
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(524)
    )
}

fn run(
    cmd: libc::c_long,
    map: &MapData,
    keys: &[u8],
    values: Option<&[u8]>,
    n: usize,
) -> Result<(), BatchError> {
    if n == 0 {
        return Ok(());
    }
    let key_size = keys.len() / n;
    let value_size = values.map_or(0, |v| v.len() / n);
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut done = 0;
    while done < n {
        let count = (n - done).min(CHUNK);
        let mut attr = BatchAttr {
            keys: keys[done * key_size..].as_ptr() as u64,
            values: values.map_or(0, |v| v[done * value_size..].as_ptr() as u64),
            count: count as u32,
            map_fd: fd,
            ..Default::default()
        };
        // The key and value pointers point at `count` entries of the map's key and value sizes
        // (the callers' slices), live across the call.
        if let Err(error) = bpf(cmd, &mut attr) {
            let processed = attr.count as usize;
            if done == 0 && processed == 0 && unsupported(&error) {
                return Err(BatchError::Unsupported);
            }
            return Err(BatchError::Failed {
                done: done + processed,
                error,
            });
        }
        done += count;
    }
    Ok(())
}

fn bytes<T: aya::Pod>(items: &[T]) -> &[u8] {
    // SAFETY: Pod types are plain bytes with no padding the kernel could read as uninitialised
    // (the shared types have explicit padding), and the slice is live for the borrow.
    unsafe { std::slice::from_raw_parts(items.as_ptr().cast(), std::mem::size_of_val(items)) }
}

/// Writes `keys[i] -> values[i]` (BPF_ANY) for every i.
pub fn update<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    run(
        BPF_MAP_UPDATE_BATCH,
        map,
        bytes(keys),
        Some(bytes(values)),
        keys.len(),
    )
}

/// Removes every key (each must be present).
pub fn delete<K: aya::Pod>(map: &MapData, keys: &[K]) -> Result<(), BatchError> {
    run(BPF_MAP_DELETE_BATCH, map, bytes(keys), None, keys.len())
}

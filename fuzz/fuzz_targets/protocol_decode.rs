//! The control protocol decoder sees whatever a local user writes to the socket: it must refuse
//! garbage with an error, never panic, and round-trip what it accepts.
#![no_main]

use egressd_common::protocol::{Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<Request>(data) {
        let again = serde_json::to_vec(&req).unwrap();
        assert_eq!(serde_json::from_slice::<Request>(&again).unwrap(), req);
    }
    let _ = serde_json::from_slice::<Response>(data);
});

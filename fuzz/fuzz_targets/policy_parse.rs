//! The policy parser must refuse any input with an error, never panic, and everything it accepts
//! must compile into kernel values.
#![no_main]

use std::path::Path;

use egressd_common::policy::{compile_profile, AllowRule, Config};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(config) = Config::parse(Path::new("fuzz.toml"), &text) {
        for profile in config.profiles.values() {
            compile_profile(profile).expect("a validated profile compiles");
        }
    }
    if let Ok(rule) = text.parse::<AllowRule>() {
        // What is printed parses back to the same rule.
        assert_eq!(rule.to_string().parse::<AllowRule>().as_ref(), Ok(&rule));
    }
});

//! The path normaliser: never a panic, and what it returns is canonical.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = std::str::from_utf8(data) {
        if let Ok(n) = portcullis::path::normalize(p) {
            assert_eq!(
                portcullis::path::normalize(&n).as_deref(),
                Ok(n.as_str()),
                "not idempotent: {p:?}"
            );
            assert!(
                n.split('/').skip(1).all(|s| s != "." && s != ".."),
                "dot segment: {p:?} -> {n:?}"
            );
        }
    }
});

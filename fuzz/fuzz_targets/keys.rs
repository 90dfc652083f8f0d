//! The keys-file parser on arbitrary text, then a lookup of the input itself as a key.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(keys) =
            portcullis::auth::api_key::KeySet::parse(std::path::Path::new("keys.toml"), text)
        {
            let _ = keys.lookup(data, std::time::SystemTime::now());
        }
    }
});

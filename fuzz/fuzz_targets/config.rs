//! The config loader on arbitrary text: diagnostics or a config, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ =
            portcullis::Config::from_toml(std::path::Path::new("/nonexistent/proxy.toml"), text);
    }
});

//! The htpasswd parser on arbitrary text; every user it loads is verified against a password.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let parsed = portcullis::auth::htpasswd::Htpasswd::parse(
            std::path::Path::new("htpasswd"),
            text,
            true,
        );
        if let Ok((file, _warnings)) = parsed {
            for user in file.users() {
                // Slow hashes with a huge cost are refused at parse time; verify the rest.
                if !user.hash.is_slow() {
                    let _ = user.hash.verify(b"password");
                }
            }
        }
    }
});

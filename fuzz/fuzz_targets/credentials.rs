//! The credential-header parser: arbitrary bytes as Authorization and X-API-Key values.
#![no_main]
use libfuzzer_sys::fuzz_target;

use portcullis::auth::api_key::KeySet;
use portcullis::auth::Authenticator;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = http::HeaderValue::from_bytes(data) else {
        return;
    };
    let keys = KeySet::default();
    let realm: std::sync::Arc<str> = "fuzz".into();
    let names = [
        http::header::AUTHORIZATION,
        http::HeaderName::from_static("x-api-key"),
    ];
    for name in &names {
        let mut headers = http::HeaderMap::new();
        headers.insert(name.clone(), value.clone());
        let auth = Authenticator {
            keys: &keys,
            api_key_headers: &names,
            anonymous: false,
            basic_realm: Some(&realm),
        };
        let _ = auth.extract(&headers);
    }
});

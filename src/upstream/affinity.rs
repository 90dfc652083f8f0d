//! MCP session affinity without shared state (DESIGN.md §11, MCP.md §4): the `Mcp-Session-Id`
//! a backend instance issued is handed to the client sealed with the instance that issued it
//! and an HMAC over (instance, identity, original id), under a key every replica reads from
//! the same file. Any replica can then route the session to its instance and restore the
//! original id toward it, and a sealed id presented by another identity does not open.
//!
//! Used by the proxy when `[upstream] mcp_session_affinity` is on: the id is opened on the way
//! in (the request goes to its instance with the original id) and sealed on the way out.
//!
//! A sealed id is `ps1.<instance>.<original, base64url>.<tag, base64url>`: visible ASCII, as a
//! header value must be, and under 400 bytes for an original id of 256. The tag is the first
//! 16 bytes of HMAC-SHA-256 (aws-lc-rs), compared in constant time (`subtle`).
//!
//! Fails closed: anything that is not a well-formed sealed id, names an instance outside the
//! configured ones, or whose tag does not verify for the presenting identity is refused (the
//! caller answers 404, MCP's answer for an unknown session).

use aws_lc_rs::hmac;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use subtle::ConstantTimeEq;

/// The longest original session id sealed (MCP ids are UUIDs or hex; a longer one is refused).
pub const MAX_ORIGINAL: usize = 256;

/// The shortest key accepted, in bytes.
pub const MIN_KEY: usize = 32;

const PREFIX: &str = "ps1";
const TAG_LEN: usize = 16;

/// Why a sealed id does not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsealed {
    /// Not a sealed id at all (or one of another format).
    Malformed,
    /// An instance index outside the configured ones.
    UnknownInstance,
    /// The tag does not verify: forged, damaged, sealed under another key, or for another
    /// identity.
    BadTag,
}

/// The sealing key and the number of instances sessions may name.
pub struct Sealer {
    key: hmac::Key,
    instances: usize,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("instances", &self.instances)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer from the key file's bytes (surrounding whitespace ignored). `Err` says what is
    /// wrong, for the operator: never the key itself.
    pub fn new(key_file: &[u8], instances: usize) -> Result<Sealer, String> {
        let key = key_file.trim_ascii();
        if key.len() < MIN_KEY {
            return Err(format!(
                "the session key is {} bytes; use at least {MIN_KEY} random bytes (`openssl rand -base64 48`)",
                key.len()
            ));
        }
        Ok(Sealer {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            instances,
        })
    }

    /// A sealer with a key drawn now from the system's random source: sessions it seals open
    /// only in this process (no `session_key_file`).
    pub fn random(instances: usize) -> Sealer {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .expect("the system random source is available");
        Sealer { key, instances }
    }

    /// What the tag covers: the instance, the identity and the original id, each
    /// length-prefixed so that no two triples share an encoding.
    fn message(instance: usize, owner: &str, original: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(24 + owner.len() + original.len());
        m.extend_from_slice(&(instance as u64).to_be_bytes());
        m.extend_from_slice(&(owner.len() as u64).to_be_bytes());
        m.extend_from_slice(owner.as_bytes());
        m.extend_from_slice(&(original.len() as u64).to_be_bytes());
        m.extend_from_slice(original);
        m
    }

    /// Seal `original`, issued by `instance` to `owner` (`kind:name`). `None` when the id is
    /// too long or the instance unknown (the caller does not hand such an id on).
    pub fn seal(&self, instance: usize, owner: &str, original: &[u8]) -> Option<String> {
        if original.len() > MAX_ORIGINAL || instance >= self.instances {
            return None;
        }
        let tag = hmac::sign(&self.key, &Sealer::message(instance, owner, original));
        Some(format!(
            "{PREFIX}.{instance}.{}.{}",
            URL_SAFE_NO_PAD.encode(original),
            URL_SAFE_NO_PAD.encode(&tag.as_ref()[..TAG_LEN])
        ))
    }

    /// Open a sealed id presented by `owner`: the instance that issued it, and the original id
    /// to send it.
    pub fn open(&self, sealed: &str, owner: &str) -> Result<(usize, Vec<u8>), Unsealed> {
        let mut parts = sealed.split('.');
        let (Some(PREFIX), Some(instance), Some(original), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(Unsealed::Malformed);
        };
        // Digits only, no sign or leading zero: one spelling per instance.
        if instance.is_empty()
            || instance.len() > 4
            || !instance.bytes().all(|b| b.is_ascii_digit())
            || (instance.len() > 1 && instance.starts_with('0'))
        {
            return Err(Unsealed::Malformed);
        }
        let instance: usize = instance.parse().map_err(|_| Unsealed::Malformed)?;
        let original = URL_SAFE_NO_PAD
            .decode(original)
            .map_err(|_| Unsealed::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| Unsealed::Malformed)?;
        if original.len() > MAX_ORIGINAL || tag.len() != TAG_LEN {
            return Err(Unsealed::Malformed);
        }
        if instance >= self.instances {
            return Err(Unsealed::UnknownInstance);
        }
        let full = hmac::sign(&self.key, &Sealer::message(instance, owner, &original));
        if !bool::from(full.as_ref()[..TAG_LEN].ct_eq(&tag[..])) {
            return Err(Unsealed::BadTag);
        }
        Ok((instance, original))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(key: &[u8]) -> Sealer {
        Sealer::new(key, 2).unwrap()
    }

    #[test]
    fn a_sealed_session_opens_for_its_owner_on_any_replica_and_nobody_else() {
        let key = b"0123456789abcdef0123456789abcdef-replicas-share-me\n";
        let (a, b) = (sealer(key), sealer(key));
        let sealed = a.seal(1, "key:claude-desktop", b"4f6c1a7e-9b1d").unwrap();
        assert!(sealed.starts_with("ps1.1."), "{sealed}");
        assert!(sealed.bytes().all(|c| c.is_ascii_graphic()));
        assert_eq!(
            b.open(&sealed, "key:claude-desktop"),
            Ok((1, b"4f6c1a7e-9b1d".to_vec())),
            "another replica with the same key"
        );
        assert_eq!(
            b.open(&sealed, "key:ci-agent"),
            Err(Unsealed::BadTag),
            "another identity"
        );
        let other = sealer(b"another key, just as long as the first one is");
        assert_eq!(
            other.open(&sealed, "key:claude-desktop"),
            Err(Unsealed::BadTag)
        );
        // Moved to the other instance by hand: the tag covers the instance.
        let moved = sealed.replacen("ps1.1.", "ps1.0.", 1);
        assert_eq!(a.open(&moved, "key:claude-desktop"), Err(Unsealed::BadTag));
    }

    #[test]
    fn anything_but_a_well_formed_sealed_id_is_refused() {
        let s = sealer(b"0123456789abcdef0123456789abcdef");
        let good = s.seal(0, "user:alice", b"abc").unwrap();
        for bad in [
            "",
            "abc",
            "4f6c1a7e-9b1d-4c1e",
            "ps2.0.YWJj.AAAA",
            "ps1..YWJj.AAAA",
            "ps1.00.YWJj.AAAA",
            "ps1.-0.YWJj.AAAA",
            "ps1.0.YWJj",
            "ps1.0.YWJj.AAAA.extra",
            "ps1.0.!!!.AAAA",
        ] {
            assert_eq!(
                s.open(bad, "user:alice"),
                Err(Unsealed::Malformed),
                "{bad:?}"
            );
        }
        let far = good.replacen("ps1.0.", "ps1.7.", 1);
        assert_eq!(s.open(&far, "user:alice"), Err(Unsealed::UnknownInstance));
        let mut damaged = good.clone();
        let last = damaged.pop().unwrap();
        damaged.push(if last == 'A' { 'B' } else { 'A' });
        assert!(s.open(&damaged, "user:alice").is_err());
        assert_eq!(s.seal(5, "user:alice", b"abc"), None, "no such instance");
        assert_eq!(s.seal(0, "user:alice", &[b'x'; 300]), None, "too long");
    }

    #[test]
    fn a_short_key_is_refused_without_being_echoed() {
        let e = Sealer::new(b"  short-secret-value \n", 2).unwrap_err();
        assert!(e.contains("18 bytes") && !e.contains("short-secret"), "{e}");
    }
}

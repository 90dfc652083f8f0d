//! Session binding (MCP.md §4): which identity each `Mcp-Session-Id` was issued to, so a
//! session id presented with another credential is refused. In this process's memory,
//! bounded; a session this process never saw issued passes (the backend knows its own).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderValue;
use sha2::{Digest, Sha256};

/// Sessions remembered at most; when full, those idle longest go first.
const SESSIONS: usize = 100_000;

/// A session not used for this long is forgotten when room is needed.
const SESSION_IDLE: Duration = Duration::from_secs(24 * 3600);

/// Which identity each `Mcp-Session-Id` was issued to, by the SHA-256 of the id (a session id
/// is a bearer secret of the backend's: never kept or logged as it is).
#[derive(Default)]
pub struct Sessions {
    owners: Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

impl Sessions {
    fn key(id: &HeaderValue) -> [u8; 32] {
        Sha256::digest(id.as_bytes()).into()
    }

    /// Whether `owner` may use session `id`: yes when it was issued to `owner` or is unknown
    /// here. A use refreshes it.
    pub fn allows(&self, id: &HeaderValue, owner: &str) -> bool {
        let mut owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        match owners.get_mut(&Sessions::key(id)) {
            Some((o, seen)) if o == owner => {
                *seen = Instant::now();
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// The backend issued session `id` in an answer to `owner`. A session already bound
    /// stays with its first owner.
    pub fn issued(&self, id: &HeaderValue, owner: &str) {
        let mut owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        if owners.len() >= SESSIONS {
            let now = Instant::now();
            owners.retain(|_, (_, seen)| now.duration_since(*seen) < SESSION_IDLE);
            if owners.len() >= SESSIONS {
                let mut seen: Vec<Instant> = owners.values().map(|(_, s)| *s).collect();
                seen.sort_unstable();
                let cut = seen[seen.len() / 2];
                owners.retain(|_, (_, s)| *s > cut);
            }
        }
        owners
            .entry(Sessions::key(id))
            .or_insert_with(|| (owner.to_string(), Instant::now()));
    }

    /// Session `id` was ended (a DELETE the backend accepted).
    pub fn ended(&self, id: &HeaderValue) {
        let mut owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        owners.remove(&Sessions::key(id));
    }

    pub fn len(&self) -> usize {
        self.owners.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_belongs_to_the_identity_it_was_issued_to() {
        let s = Sessions::default();
        let id = HeaderValue::from_static("4f6c1a7e");
        assert!(s.allows(&id, "key:a"), "unknown here: the backend decides");
        s.issued(&id, "key:a");
        s.issued(&id, "key:b");
        assert!(s.allows(&id, "key:a"));
        assert!(!s.allows(&id, "key:b"), "the first owner keeps it");
        s.ended(&id);
        assert!(s.allows(&id, "key:b"));
        assert!(s.is_empty());
    }
}

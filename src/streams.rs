//! The registry of live streams (DESIGN.md §6): every WebSocket tunnel and every streaming
//! response is registered under the credential that opened it, so that revoking a credential
//! can close its streams, and so that metrics can count them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::CredId;

/// The kinds of long-lived traffic, as the `kind` label of `portcullis_streams_active`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// An upgraded connection (HTTP/1.1 Upgrade, or HTTP/2 extended CONNECT).
    WebSocket,
    /// A `text/event-stream` response.
    Sse,
    /// Any other response whose length is not known in advance (chunked, NDJSON, gRPC).
    Stream,
}

impl StreamKind {
    pub const ALL: [StreamKind; 3] = [StreamKind::WebSocket, StreamKind::Sse, StreamKind::Stream];

    pub fn label(self) -> &'static str {
        match self {
            StreamKind::WebSocket => "websocket",
            StreamKind::Sse => "sse",
            StreamKind::Stream => "stream",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

struct Entry {
    cred: CredId,
    cancel: CancellationToken,
}

/// Live streams by id, with counts per kind.
pub struct Streams {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Entry>>,
    active: [AtomicUsize; 3],
    revoked: AtomicU64,
    /// Tunnels run on the server's tracker so that shutdown waits for them...
    pub tracker: TaskTracker,
    /// ...and end when the shutdown grace is over.
    pub force: CancellationToken,
}

impl Streams {
    pub fn new(tracker: TaskTracker, force: CancellationToken) -> Streams {
        Streams {
            next_id: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
            active: Default::default(),
            revoked: AtomicU64::new(0),
            tracker,
            force,
        }
    }

    /// Register a stream; it stays registered until the guard is dropped.
    pub fn register(self: &Arc<Self>, cred: CredId, kind: StreamKind) -> StreamGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Entry {
                cred,
                cancel: cancel.clone(),
            },
        );
        self.active[kind.index()].fetch_add(1, Ordering::Relaxed);
        StreamGuard {
            streams: self.clone(),
            id,
            kind,
            cancel,
        }
    }

    /// Streams of this kind open now.
    pub fn active(&self, kind: StreamKind) -> usize {
        self.active[kind.index()].load(Ordering::Relaxed)
    }

    /// Streams closed by [`Streams::revoke`] since start.
    pub fn revoked_total(&self) -> u64 {
        self.revoked.load(Ordering::Relaxed)
    }

    /// Close every live stream whose credential matches; returns how many were closed.
    pub fn revoke(&self, matches: impl Fn(&CredId) -> bool) -> usize {
        self.revoke_each(matches).values().sum()
    }

    /// Close every live stream opened with one of `creds`, in one pass over the registry;
    /// returns how many were closed per credential (absent: none).
    pub fn revoke_all(&self, creds: &std::collections::HashSet<&CredId>) -> HashMap<CredId, usize> {
        self.revoke_each(|c| creds.contains(c))
    }

    /// Close every live stream whose credential matches, in one pass; how many per credential.
    fn revoke_each(&self, matches: impl Fn(&CredId) -> bool) -> HashMap<CredId, usize> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed: HashMap<CredId, usize> = HashMap::new();
        for entry in live.values() {
            if matches(&entry.cred) && !entry.cancel.is_cancelled() {
                entry.cancel.cancel();
                *closed.entry(entry.cred.clone()).or_default() += 1;
            }
        }
        let total: usize = closed.values().sum();
        self.revoked.fetch_add(total as u64, Ordering::Relaxed);
        closed
    }

    /// Live streams per credential, for revocation decisions and audit lines.
    pub fn count_for(&self, cred: &CredId) -> usize {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.values().filter(|e| &e.cred == cred).count()
    }
}

/// A registered stream. Dropping it deregisters the stream.
pub struct StreamGuard {
    streams: Arc<Streams>,
    id: u64,
    kind: StreamKind,
    cancel: CancellationToken,
}

impl StreamGuard {
    /// Cancelled when the stream's credential is revoked.
    pub fn revoked(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Revoke this stream alone: its credential was found no longer valid as it started.
    pub fn revoke(&self) {
        if !self.cancel.is_cancelled() {
            self.cancel.cancel();
            self.streams.revoked.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.streams
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        self.streams.active[self.kind.index()].fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streams() -> Arc<Streams> {
        Arc::new(Streams::new(TaskTracker::new(), CancellationToken::new()))
    }

    #[test]
    fn counts_follow_guards_and_revocation_closes_only_the_matching_credential() {
        let s = streams();
        let alice = CredId::User("alice".into());
        let bob = CredId::User("bob".into());
        let a1 = s.register(alice.clone(), StreamKind::WebSocket);
        let a2 = s.register(alice.clone(), StreamKind::Sse);
        let b1 = s.register(bob.clone(), StreamKind::Sse);
        assert_eq!(s.active(StreamKind::WebSocket), 1);
        assert_eq!(s.active(StreamKind::Sse), 2);
        assert_eq!(s.count_for(&alice), 2);

        assert_eq!(s.revoke(|c| c == &alice), 2);
        assert!(a1.revoked().is_cancelled() && a2.revoked().is_cancelled());
        assert!(!b1.revoked().is_cancelled());
        // Revoking again does not count the same streams twice.
        assert_eq!(s.revoke(|c| c == &alice), 0);
        assert_eq!(s.revoked_total(), 2);

        drop((a1, a2, b1));
        for kind in StreamKind::ALL {
            assert_eq!(s.active(kind), 0, "{kind:?}");
        }
        assert_eq!(s.count_for(&alice), 0);
    }

    #[test]
    fn a_key_is_shown_by_fingerprint_only() {
        let shown = format!("{:?}", CredId::Key([0xab; 32]));
        assert_eq!(shown, "Key(abababababab)");
    }
}

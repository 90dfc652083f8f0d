//! The HTTP/1 connection to the backend that one client connection owns (docs/behaviour.md,
//! "Backend connections").
//!
//! An HTTP/1 client connection sends one request at a time, so it can keep one backend
//! connection for itself: the request is handed to it directly, and the connection is polled by
//! the client connection's own task (`server::accept` drives it beside the client's), so a
//! request costs no pool checkout, no hash of the authority, no channel to another task and no
//! second task waking up. It is opened by the client connection's second request (the proxy
//! decides), so a client that sends one request and idles holds none. The shared pool stays for
//! first requests, HTTP/2 (clients and backends), WebSocket upgrades, whenever the owned
//! connection is busy or goes to another instance, and once [`MAX_OWNED`] client connections
//! already own one.
//!
//! Fails closed: a connection that closed or broke is dropped and never used again; a request
//! it gave back unsent (the backend closed it while idle) goes on a new connection; anything
//! else is the exchange's failure, named as the pool's would be.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;

use super::body::ClientBody;

/// Backend connections owned by client connections at once, per upstream: beyond it, requests
/// take the shared pool. Bounds what idle keep-alive clients hold on the backend.
pub const MAX_OWNED: usize = 1024;

/// How long an owned connection outlives the client connection's last byte: as long as the
/// pool keeps an idle connection (`pool_idle_timeout` in `mod.rs`).
pub const OWNED_IDLE: Duration = Duration::from_secs(60);

type Driven = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// The count of owned connections of one upstream, and the right to one of them.
#[derive(Clone, Default)]
pub(super) struct OwnedCount(Arc<AtomicUsize>);

/// One owned connection's place in [`OwnedCount`], given back when dropped.
pub(super) struct Permit(Arc<AtomicUsize>);

impl OwnedCount {
    /// A permit, or `None` when [`MAX_OWNED`] are taken (the request takes the pool).
    pub(super) fn acquire(&self) -> Option<Permit> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_OWNED).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(self.0.clone()))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One client connection's own backend connection, empty until its first request.
#[derive(Default)]
pub struct OwnConnection {
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    held: Option<Held>,
    /// The client connection's task, to wake when a connection is put in.
    waker: Option<Waker>,
}

struct Held {
    /// The instance it goes to.
    instance: usize,
    /// The handle requests are sent with; lent out while a request is being handed over.
    sender: Option<SendRequest<ClientBody>>,
    /// The connection itself, polled by the client connection's task.
    conn: Driven,
    /// Its place in its upstream's count (which also tells which upstream it belongs to).
    permit: Permit,
}

/// What a request may do with the owned connection.
pub(super) enum Claim {
    /// Go on the connection held: its handle, to give back with [`OwnConnection::put_back`].
    Held(SendRequest<ClientBody>),
    /// Open a new connection, in this place of the count.
    Open(Permit),
}

impl OwnConnection {
    /// Poll the backend connection, from the task that serves the client connection. Never
    /// ready: when the connection ends (the backend closed it, or it broke) it is dropped, and
    /// the next request opens another.
    pub fn poll_drive(&self, cx: &mut Context<'_>) -> Poll<()> {
        let Ok(mut slot) = self.slot.lock() else {
            return Poll::Pending;
        };
        if let Some(held) = slot.held.as_mut() {
            if let Poll::Ready(end) = held.conn.as_mut().poll(cx) {
                if let Err(e) = end {
                    tracing::debug!(error = %e, "backend connection ended with an error");
                }
                slot.held = None;
            }
        }
        match &slot.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => slot.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// What a request to instance `i` of the upstream counted by `count` may do: use the
    /// connection held when it goes there and is free; open one when none is held (or the one
    /// held closed, or belongs to an upstream since replaced) and `count` has room. `None`
    /// sends it to the pool: the connection held is busy or goes to another instance, or
    /// [`MAX_OWNED`] are open.
    pub(super) fn claim(&self, i: usize, count: &OwnedCount) -> Option<Claim> {
        let mut slot = self.slot.lock().ok()?;
        if let Some(held) = slot.held.as_mut() {
            let ours = Arc::ptr_eq(&held.permit.0, &count.0);
            match &held.sender {
                Some(s) if s.is_closed() || !ours => {}
                Some(s) if held.instance == i && s.is_ready() => {
                    return held.sender.take().map(Claim::Held);
                }
                _ => return None,
            }
            slot.held = None;
        }
        count.acquire().map(Claim::Open)
    }

    /// Give back the handle lent by [`OwnConnection::claim`].
    pub(super) fn put_back(&self, sender: SendRequest<ClientBody>) {
        if let Ok(mut slot) = self.slot.lock() {
            if let Some(held) = slot.held.as_mut() {
                if held.sender.is_none() {
                    held.sender = Some(sender);
                }
            }
        }
    }

    /// Hold a new connection to instance `i` (the one held before, if any, is closed) and
    /// wake the task that polls it.
    pub(super) fn install(
        &self,
        i: usize,
        sender: SendRequest<ClientBody>,
        conn: Driven,
        permit: Permit,
    ) {
        let Ok(mut slot) = self.slot.lock() else {
            return;
        };
        slot.held = Some(Held {
            instance: i,
            sender: Some(sender),
            conn,
            permit,
        });
        if let Some(w) = slot.waker.take() {
            w.wake();
        }
    }

    /// Whether a backend connection is held.
    pub fn holds(&self) -> bool {
        self.slot.lock().is_ok_and(|s| s.held.is_some())
    }

    /// Close the backend connection: the client connection ended, or has been idle for
    /// [`OWNED_IDLE`].
    pub fn close(&self) {
        if let Ok(mut slot) = self.slot.lock() {
            slot.held = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_stops_at_max_owned_and_a_dropped_permit_frees_its_place() {
        let count = OwnedCount::default();
        let mut permits: Vec<Permit> = (0..MAX_OWNED).filter_map(|_| count.acquire()).collect();
        assert_eq!(permits.len(), MAX_OWNED);
        assert!(count.acquire().is_none(), "one past MAX_OWNED");
        permits.pop();
        assert!(
            count.acquire().is_some(),
            "a dropped permit frees its place"
        );
    }

    #[test]
    fn nothing_held_claims_a_new_connection_and_none_beyond_the_count() {
        let own = OwnConnection::default();
        assert!(!own.holds());
        let count = OwnedCount::default();
        let permits: Vec<Permit> = (0..MAX_OWNED).filter_map(|_| count.acquire()).collect();
        assert!(
            own.claim(0, &count).is_none(),
            "the pool, with the count full"
        );
        drop(permits);
        assert!(matches!(own.claim(0, &count), Some(Claim::Open(_))));
    }
}

//! Work that must never take the CPU from requests: threads at the lowest scheduling priority
//! (the reloader's, and the pool slow password hashes run on).
//!
//! The pool has a fixed number of threads and a bounded queue: work offered when the queue is
//! full is refused at once ([`IdlePool::try_run`] returns `None`), so the caller can answer
//! (429) instead of waiting behind work it would never see finish in time. Fails closed:
//! work that cannot be queued, or whose thread died, yields no result.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};

/// Put the calling thread in Linux's `SCHED_IDLE` class: any request that wakes the runtime
/// preempts it at once (a nice-19 thread, measured, could still hold the CPU for a scheduler
/// slice, several milliseconds, at each wake-up). It is not starved: on a saturated CPU it
/// still gets a small share, so its work is slower there, never lost. Where `SCHED_IDLE` is
/// refused (a seccomp filter, say), nice 19; where that fails too, normal priority.
#[cfg(target_os = "linux")]
pub fn lowest_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain system calls on the calling thread (pid 0 / its own tid); `param` outlives
    // the call.
    unsafe {
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
            let tid = libc::gettid();
            let _ = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub fn lowest_priority() {}

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of lowest-priority threads with a bounded queue, started on first use.
pub struct IdlePool {
    name: &'static str,
    threads: usize,
    queue: usize,
    sender: OnceLock<Option<SyncSender<Job>>>,
}

impl IdlePool {
    /// `threads` workers (at least one) named `name`, and room for `queue` jobs waiting.
    pub fn new(name: &'static str, threads: usize, queue: usize) -> IdlePool {
        IdlePool {
            name,
            threads: threads.max(1),
            queue,
            sender: OnceLock::new(),
        }
    }

    /// One thread per CPU but one (at least one), so the event loop always has a core.
    pub fn cores_but_one() -> usize {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .saturating_sub(1)
            .max(1)
    }

    fn start(&self) -> Option<SyncSender<Job>> {
        let (tx, rx) = sync_channel::<Job>(self.queue);
        let rx = Arc::new(Mutex::new(rx));
        let mut started = 0;
        for i in 0..self.threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{}-{i}", self.name))
                .spawn(move || {
                    lowest_priority();
                    work(&rx);
                });
            match spawned {
                Ok(_) => started += 1,
                Err(e) => {
                    tracing::error!(pool = self.name, error = %e, "cannot start a worker thread")
                }
            }
        }
        (started > 0).then_some(tx)
    }

    /// Queue `f` and get a receiver for its result, or `None` at once when the queue is full
    /// (or no worker could be started). Dropping the receiver before `f` starts skips it.
    pub fn try_run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<tokio::sync::oneshot::Receiver<T>> {
        let tx = self.sender.get_or_init(|| self.start()).as_ref()?;
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            // Nobody waits for it any more (the client went away): not worth the CPU.
            if !done.is_closed() {
                let _ = done.send(f());
            }
        });
        match tx.try_send(job) {
            Ok(()) => Some(result),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => None,
        }
    }
}

/// A worker: take jobs until the pool is dropped.
fn work(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            rx.recv()
        };
        match job {
            // A job that panics takes its result sender with it (the caller sees no result);
            // the worker goes on.
            Ok(job) => {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_at_the_lowest_priority_and_a_full_queue_refuses_at_once() {
        let pool = IdlePool::new("test-pool", 1, 2);
        #[cfg(target_os = "linux")]
        {
            // SAFETY: a plain system call about the calling thread.
            let policy = pool
                .try_run(|| unsafe { libc::sched_getscheduler(0) })
                .unwrap()
                .await
                .unwrap();
            assert_eq!(policy, libc::SCHED_IDLE);
        }
        // One job holds the only worker, two wait; the fourth is refused without waiting.
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let busy = pool.try_run(move || hold.recv().is_ok()).unwrap();
        // Wait until the worker has taken it (the queue is empty again).
        let mut queued = Vec::new();
        for _ in 0..1000 {
            if let Some(r) = pool.try_run(|| 1) {
                queued.push(r);
                if queued.len() == 2 {
                    break;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(queued.len(), 2);
        assert!(pool.try_run(|| 1).is_none(), "a full queue refuses");
        release.send(()).unwrap();
        assert!(busy.await.unwrap());
        for r in queued {
            assert_eq!(r.await.unwrap(), 1);
        }
        // A job nobody waits for any more is skipped.
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let busy = pool.try_run(move || hold.recv().is_ok()).unwrap();
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        drop(pool.try_run(move || flag.store(true, std::sync::atomic::Ordering::SeqCst)));
        release.send(()).unwrap();
        assert!(busy.await.unwrap());
        assert_eq!(pool.try_run(|| 2).unwrap().await.unwrap(), 2);
        assert!(
            !ran.load(std::sync::atomic::Ordering::SeqCst),
            "an abandoned job ran"
        );
        // A job that panics yields no result, and the worker goes on.
        assert!(pool.try_run(|| panic!("boom")).unwrap().await.is_err());
        assert_eq!(pool.try_run(|| 7).unwrap().await.unwrap(), 7);
    }
}

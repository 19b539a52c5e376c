//! Session threads (`proxy.session_threads`): event loops of ldapsync's
//! own ([`super::event_loop`]), each on an OS thread of its own. A session
//! runs on one of them from its accept to its end, so its own wake-ups
//! never cross threads: clients that wait for each answer before the next
//! request (one blocking connection per thread or process) cost less CPU
//! per operation than on the work-stealing runtime, clients that keep many
//! connections busy at once more (docs/performance.md measures both). A
//! new session goes to the thread with the fewest open.
//!
//! The rest of ldapsync (the accept loops, the workers, the admin side)
//! stays on the main runtime; a multiplexed listener's shared directory
//! connections run on the session thread whose session opened them, and
//! serve sessions on every thread (so do its idle bind-check connections,
//! whose readiness then crosses threads).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::Io;
use super::event_loop::{EventLoop, socket};
use crate::throttle::Throttle;

/// The running session threads. Dropping it tells them to end, without
/// waiting; tasks still on them are dropped (the proxy drops it once its
/// sessions have ended).
pub(super) struct SessionThreads {
    threads: Vec<SessionThread>,
}

struct SessionThread {
    event_loop: EventLoop,
    /// Sessions placed on this thread and not ended yet.
    open: Arc<AtomicUsize>,
}

impl SessionThreads {
    /// Starts `count` threads (at least one); they run sessions once
    /// [`SessionThreads::enter`] has given them a runtime.
    pub(super) fn start(count: usize) -> std::io::Result<SessionThreads> {
        let threads = (0..count.max(1))
            .map(|i| {
                Ok(SessionThread {
                    event_loop: EventLoop::start(format!("ldapsync-sess-{i}"))?,
                    open: Arc::default(),
                })
            })
            .collect::<std::io::Result<_>>()?;
        Ok(SessionThreads { threads })
    }

    /// Lets the threads run, in the context of `runtime` (the proxy's):
    /// sessions' timers and spawns are its.
    pub(super) fn enter(&self, runtime: &tokio::runtime::Handle) {
        for thread in &self.threads {
            thread.event_loop.enter(runtime.clone());
        }
    }

    /// Runs `session` on the client's socket on the thread with the fewest
    /// sessions open, tracked by `tracker`. The socket moves to that
    /// thread's loop, so that its readiness wakes that thread only.
    pub(super) fn spawn<F, S>(&self, tracker: &TaskTracker, stream: TcpStream, session: S)
    where
        S: FnOnce(Box<dyn Io>) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => return handover_failed(&e, "its socket could not leave the accepting thread's reactor"),
        };
        let thread = self
            .threads
            .iter()
            .min_by_key(|t| t.open.load(Ordering::Relaxed))
            .expect("at least one session thread");
        let open = Open::new(&thread.open);
        thread.event_loop.spawn(tracker.track_future(async move {
            let _open = open;
            match socket::adopt_std(stream) {
                Ok(stream) => session(Box::new(stream)).await,
                Err(e) => handover_failed(&e, "the session thread could not register its socket"),
            }
        }));
    }
}

/// A connection dropped on its way to a session thread. The failure
/// repeats for every connection while it lasts (out of memory, the epoll
/// watch limit): said once per interval.
fn handover_failed(e: &std::io::Error, step: &str) {
    static FAILURES: Throttle = Throttle::new(Duration::from_secs(10));
    if let Some(held_back) = FAILURES.allow() {
        warn!(error = %e, step, held_back, "connection dropped: it could not be handed to a session thread");
    }
}

/// One session counted on its thread until it ends (or is dropped unrun).
struct Open(Arc<AtomicUsize>);

impl Open {
    fn new(count: &Arc<AtomicUsize>) -> Open {
        count.fetch_add(1, Ordering::Relaxed);
        Open(Arc::clone(count))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

//! The session threads' event loop: one OS thread, its own epoll (mio) and
//! its own run queue, for sessions that stay on it from accept to end.
//!
//! Why not a tokio runtime per thread: under clients that wait for each
//! answer (ldclt, a thread per connection) a relayed operation is two
//! wake-ups, and each cost more in tokio's machinery than in the session's
//! own work — the readiness registration's lock and tick bookkeeping, the
//! timer driver visited and the clock read at every park, the scheduler's
//! statistics (docs/performance.md counts them). Here a socket's readiness
//! is a word and a waker slot per direction ([`socket`]), a wake-up is a
//! push onto a thread-local queue, and nothing else runs at a park.
//!
//! What the sessions need besides sockets comes from the main runtime,
//! whose context every loop thread enters: timers and timeouts (they fire
//! rarely: idle, slow requests, stalled writes), `tokio::spawn`, the
//! connect of a directory connection before its socket moves here.

pub(super) mod socket;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use mio::{Events, Token};
use slab::Slab;
use tracing::{error, warn};

use crate::throttle::Throttle;
use socket::IoState;

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The token of the loop's own waker (sockets' tokens are their slab keys,
/// which stay far below it).
const WAKE: Token = Token(usize::MAX);
/// Readiness events taken from the kernel at a time.
const EVENTS: usize = 1024;

thread_local! {
    /// The loop's run queue: its tasks woken on its own thread.
    static QUEUE: RefCell<VecDeque<TaskRef>> = const { RefCell::new(VecDeque::new()) };
    /// Tasks spawned on the loop's own thread, for its next turn.
    static SPAWNED: RefCell<Vec<Task>> = const { RefCell::new(Vec::new()) };
    /// The loop this thread runs, if it runs one: where the sockets adopted
    /// and the tasks spawned or woken on this thread go.
    static HANDLE: RefCell<Option<Arc<Shared>>> = const { RefCell::new(None) };
}

/// A running loop, to spawn sessions on. Dropping it tells the thread to
/// end, without waiting: tasks still on it are dropped there.
pub(super) struct EventLoop {
    shared: Arc<Shared>,
    /// Hands the loop the runtime whose context it enters before it runs
    /// anything (see [`EventLoop::enter`]); dropped first at a stop.
    runtime: Option<std::sync::mpsc::SyncSender<tokio::runtime::Handle>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the loop thread shares with the threads that wake it.
struct Shared {
    registry: mio::Registry,
    waker: mio::Waker,
    /// The loop's waker was woken and the loop has not looked yet: further
    /// wake-ups need no system call.
    notified: AtomicBool,
    remote: Mutex<Remote>,
    /// The sockets registered with the loop, by token.
    sockets: Mutex<Slab<Arc<IoState>>>,
}

/// Work handed to the loop from other threads.
#[derive(Default)]
struct Remote {
    spawned: Vec<Task>,
    woken: Vec<TaskRef>,
    stop: bool,
    /// The loop's thread has ended: nothing handed over would run.
    ended: bool,
}

/// A task in the loop's slab; the generation tells a reused slot from the
/// task a late wake-up meant.
#[derive(Clone, Copy)]
struct TaskRef {
    key: usize,
    generation: u64,
}

/// A task's waker.
struct Header {
    task: TaskRef,
    /// In a run queue and not polled yet: further wake-ups are free.
    queued: AtomicBool,
    shared: Arc<Shared>,
}

impl Wake for Header {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.load(Ordering::Acquire) || self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        if runs(&self.shared) {
            QUEUE.with_borrow_mut(|queue| queue.push_back(self.task));
        } else {
            self.shared.lock_remote().woken.push(self.task);
            self.shared.notify();
        }
    }
}

impl Shared {
    fn lock_remote(&self) -> MutexGuard<'_, Remote> {
        self.remote.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_sockets(&self) -> MutexGuard<'_, Slab<Arc<IoState>>> {
        self.sockets.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn notify(&self) {
        if !self.notified.swap(true, Ordering::AcqRel)
            && let Err(e) = self.waker.wake()
        {
            // Not pending after all: the next hand-over tries again.
            self.notified.store(false, Ordering::Release);
            warn_throttled(&e, "waking a session thread failed");
        }
    }
}

impl EventLoop {
    /// Starts a loop on a thread named `name`. It runs tasks once it has a
    /// runtime to enter ([`EventLoop::enter`]); what is spawned before
    /// waits for that.
    pub(super) fn start(name: String) -> std::io::Result<EventLoop> {
        let poll = mio::Poll::new()?;
        let shared = Arc::new(Shared {
            waker: mio::Waker::new(poll.registry(), WAKE)?,
            registry: poll.registry().try_clone()?,
            notified: AtomicBool::new(false),
            remote: Mutex::default(),
            sockets: Mutex::default(),
        });
        let (runtime, entered) = std::sync::mpsc::sync_channel::<tokio::runtime::Handle>(1);
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let _ended = Ended(Arc::clone(&thread_shared));
            // No runtime comes when the proxy is dropped unserved.
            if let Ok(runtime) = entered.recv() {
                let _runtime = runtime.enter();
                run(poll, &thread_shared);
            }
        })?;
        Ok(EventLoop {
            shared,
            runtime: Some(runtime),
            thread: Some(thread),
        })
    }

    /// Lets the loop run, in `runtime`'s context: its sessions' timers,
    /// timeouts and `tokio::spawn`s are that runtime's. Only the first
    /// call's runtime is entered.
    pub(super) fn enter(&self, runtime: tokio::runtime::Handle) {
        if let Some(sender) = &self.runtime {
            _ = sender.try_send(runtime);
        }
    }

    /// Runs `task` on the loop. Should its thread have ended (a panic
    /// outside any task), the task is dropped with a warning: a session's
    /// connection closes rather than waits for a thread that is gone.
    pub(super) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut remote = self.shared.lock_remote();
        if remote.ended {
            drop(remote);
            drop(task);
            return warn_throttled(
                &std::io::Error::other("its thread has ended"),
                "a session thread could not take a session",
            );
        }
        remote.spawned.push(Box::pin(task));
        drop(remote);
        self.shared.notify();
    }
}

impl Drop for EventLoop {
    /// Stops the loop and waits for its thread, which drops the tasks left
    /// while the runtime they may refer to is still there.
    fn drop(&mut self) {
        drop(self.runtime.take());
        self.shared.lock_remote().stop = true;
        self.shared.notify();
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != std::thread::current().id()
        {
            _ = thread.join();
        }
    }
}

/// Marks the loop ended when its thread ends, however it does (a panic
/// outside any task included): what is handed over later is dropped, not
/// left waiting, and the thread-locals no longer send wake-ups to it.
struct Ended(Arc<Shared>);

impl Drop for Ended {
    fn drop(&mut self) {
        HANDLE.set(None);
        let spawned = {
            let mut remote = self.0.lock_remote();
            remote.ended = true;
            std::mem::take(&mut remote.spawned)
        };
        drop(spawned);
    }
}

/// Runs `task` on this thread's loop if it runs one, else on the runtime:
/// a multiplexed listener's shared connection stays with the session
/// thread whose session opened it.
pub(super) fn spawn(task: impl Future<Output = ()> + Send + 'static) {
    match HANDLE.with_borrow(Option::is_some) {
        true => SPAWNED.with_borrow_mut(|spawned| spawned.push(Box::pin(task))),
        false => drop(tokio::spawn(task)),
    }
}

/// Whether this thread runs `shared`'s loop.
fn runs(shared: &Arc<Shared>) -> bool {
    HANDLE.with_borrow(|handle| handle.as_ref().is_some_and(|handle| Arc::ptr_eq(handle, shared)))
}

/// A task on the loop: the future, and its waker as the loop keeps it.
struct Entry {
    future: Task,
    header: Arc<Header>,
    waker: Waker,
}

/// The loop: the tasks woken, then the sockets' events (without waiting
/// while tasks are queued), then what other threads handed over.
fn run(mut poll: mio::Poll, shared: &Arc<Shared>) {
    HANDLE.set(Some(Arc::clone(shared)));
    let mut tasks: Slab<Entry> = Slab::new();
    let mut generation = 0u64;
    let mut events = Events::with_capacity(EVENTS);
    let mut ready = Vec::with_capacity(EVENTS);
    loop {
        // What is queued now runs now; what these polls wake runs after the
        // next look at the sockets, so that a busy session cannot starve
        // the others.
        for _ in 0..QUEUE.with_borrow(VecDeque::len) {
            let Some(task) = QUEUE.with_borrow_mut(VecDeque::pop_front) else {
                break;
            };
            poll_task(&mut tasks, task);
        }
        let mut spawned = SPAWNED.take();
        let wait = match spawned.is_empty() && QUEUE.with_borrow(VecDeque::is_empty) {
            true => None,
            false => Some(Duration::ZERO),
        };
        match poll.poll(&mut events, wait) {
            Ok(()) => {
                // Taken out of the lock before any waker runs: a waker that
                // dropped a socket would take it again.
                {
                    let sockets = shared.lock_sockets();
                    for event in events.iter().filter(|event| event.token() != WAKE) {
                        if let Some(state) = sockets.get(event.token().0) {
                            ready.push((Arc::clone(state), socket::readiness(event)));
                        }
                    }
                }
                for (state, bits) in ready.drain(..) {
                    state.ready(bits);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                warn_throttled(&e, "a session thread could not wait for its sockets");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Cleared before the hand-over is read: a later one wakes the loop.
        if shared.notified.load(Ordering::Acquire) && shared.notified.swap(false, Ordering::AcqRel) {
            let remote = std::mem::take(&mut *shared.lock_remote());
            if remote.stop {
                break;
            }
            QUEUE.with_borrow_mut(|queue| queue.extend(remote.woken));
            spawned.extend(remote.spawned);
        }
        for future in spawned {
            generation += 1;
            let entry = tasks.vacant_entry();
            let task = TaskRef {
                key: entry.key(),
                generation,
            };
            let header = Arc::new(Header {
                task,
                queued: AtomicBool::new(true),
                shared: Arc::clone(shared),
            });
            let waker = Waker::from(Arc::clone(&header));
            entry.insert(Entry { future, header, waker });
            QUEUE.with_borrow_mut(|queue| queue.push_back(task));
        }
    }
    // The tasks go first: their sockets leave the registry as they drop.
    drop(tasks);
    QUEUE.with_borrow_mut(VecDeque::clear);
    SPAWNED.take();
}

/// Polls one task, if it is still the one the wake-up meant; a task that
/// panics ends alone, as on the runtime.
fn poll_task(tasks: &mut Slab<Entry>, task: TaskRef) {
    let Some(entry) = tasks.get_mut(task.key) else { return };
    if entry.header.task.generation != task.generation {
        return;
    }
    // Cleared before the poll: a wake-up during it queues the task again.
    entry.header.queued.store(false, Ordering::Release);
    let mut cx = Context::from_waker(&entry.waker);
    let polled = std::panic::catch_unwind(AssertUnwindSafe(|| entry.future.as_mut().poll(&mut cx)));
    match polled {
        Ok(Poll::Pending) => return,
        Ok(Poll::Ready(())) => {}
        Err(panic) => error!(
            panic = panic_message(panic.as_ref()),
            "a session task panicked; its connections are closed"
        ),
    }
    // Its drop may panic too (a session's guards run there): caught alike.
    let entry = tasks.remove(task.key);
    if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| drop(entry))) {
        error!(
            panic = panic_message(panic.as_ref()),
            "a session task panicked as it ended"
        );
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(message), _) => message,
        (_, Some(message)) => message,
        _ => "(not a message)",
    }
}

fn warn_throttled(e: &std::io::Error, what: &'static str) {
    static WARNINGS: Throttle = Throttle::new(Duration::from_secs(10));
    if let Some(held_back) = WARNINGS.allow() {
        warn!(error = %e, held_back, "{what}");
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::mpsc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const PATIENCE: Duration = Duration::from_secs(10);

    /// A loop running in the context of a multi-threaded runtime, as the
    /// proxy's session threads do.
    fn running(name: &str) -> (tokio::runtime::Runtime, EventLoop) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let event_loop = EventLoop::start(name.into()).unwrap();
        event_loop.enter(runtime.handle().clone());
        (runtime, event_loop)
    }

    /// A connected pair on loopback: the test's end, and the end a task
    /// adopts onto its loop.
    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (theirs, _) = listener.accept().unwrap();
        ours.set_read_timeout(Some(PATIENCE)).unwrap();
        (ours, theirs)
    }

    #[test]
    fn a_task_runs_on_the_loop_thread_and_is_woken_from_other_threads_and_by_timers() {
        let (_runtime, event_loop) = running("loop-wakes");
        let (send, receive) = tokio::sync::oneshot::channel::<u32>();
        let (done, finished) = mpsc::channel();
        event_loop.spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let value = receive.await.unwrap();
            let thread = std::thread::current().name().map(String::from);
            done.send((value, thread)).unwrap();
        });
        std::thread::sleep(Duration::from_millis(50));
        send.send(7).unwrap();
        let (value, thread) = finished.recv_timeout(PATIENCE).unwrap();
        assert_eq!((value, thread.as_deref()), (7, Some("loop-wakes")));
    }

    #[test]
    fn what_a_task_spawns_runs_on_the_same_loop_and_elsewhere_on_the_runtime() {
        let (runtime, event_loop) = running("loop-spawns");
        let (done, finished) = mpsc::channel();
        let on_loop = done.clone();
        event_loop.spawn(async move {
            spawn(async move {
                on_loop.send(std::thread::current().name().map(String::from)).unwrap();
            });
        });
        assert_eq!(finished.recv_timeout(PATIENCE).unwrap().as_deref(), Some("loop-spawns"));
        runtime.block_on(async move {
            spawn(async move {
                done.send(std::thread::current().name().map(String::from)).unwrap();
            });
        });
        assert_ne!(finished.recv_timeout(PATIENCE).unwrap().as_deref(), Some("loop-spawns"));
    }

    #[test]
    fn a_task_that_panics_ends_alone() {
        struct PanicsOnDrop;
        impl Drop for PanicsOnDrop {
            fn drop(&mut self) {
                std::panic::panic_any("a session's bug in a guard");
            }
        }
        /// Finished at its first poll; its guard is dropped with it, after.
        struct Finished {
            _guard: PanicsOnDrop,
        }
        impl Future for Finished {
            type Output = ();
            fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
                Poll::Ready(())
            }
        }
        let (_runtime, event_loop) = running("loop-panics");
        event_loop.spawn(async { std::panic::panic_any("a session's bug") });
        event_loop.spawn(Finished { _guard: PanicsOnDrop });
        let (done, finished) = mpsc::channel();
        event_loop.spawn(async move { done.send(()).unwrap() });
        finished.recv_timeout(PATIENCE).unwrap();
    }

    #[test]
    fn dropping_the_loop_drops_its_tasks() {
        struct Dropped(mpsc::Sender<()>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                _ = self.0.send(());
            }
        }
        let (_runtime, event_loop) = running("loop-drops");
        let (done, dropped) = mpsc::channel();
        let guard = Dropped(done);
        event_loop.spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        std::thread::sleep(Duration::from_millis(20));
        drop(event_loop);
        dropped.recv_timeout(PATIENCE).unwrap();
    }

    #[test]
    fn a_socket_waits_for_its_bytes_and_reads_the_end_of_stream_as_zero() {
        let (_runtime, event_loop) = running("loop-reads");
        let (mut ours, theirs) = pair();
        let (done, finished) = mpsc::channel();
        event_loop.spawn(async move {
            let mut stream = socket::adopt_std(theirs).unwrap();
            let mut request = [0u8; 5];
            stream.read_exact(&mut request).await.unwrap();
            stream.write_all(&request).await.unwrap();
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).await.unwrap();
            done.send(rest).unwrap();
        });
        // Later than the task's first read: it must wait, then be woken.
        std::thread::sleep(Duration::from_millis(50));
        ours.write_all(b"hel").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        ours.write_all(b"lo").unwrap();
        let mut echoed = [0u8; 5];
        ours.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed, b"hello");
        ours.write_all(b"bye").unwrap();
        ours.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(finished.recv_timeout(PATIENCE).unwrap(), b"bye");
    }

    #[test]
    fn a_writer_the_peer_does_not_read_waits_and_resumes_when_it_reads() {
        const TOTAL: usize = 16 * 1024 * 1024;
        let (_runtime, event_loop) = running("loop-writes");
        let (mut ours, theirs) = pair();
        let (done, finished) = mpsc::channel();
        event_loop.spawn(async move {
            let mut stream = socket::adopt_std(theirs).unwrap();
            let data: Vec<u8> = (0..TOTAL).map(|i| (i % 251) as u8).collect();
            stream.write_all(&data).await.unwrap();
            stream.shutdown().await.unwrap();
            done.send(()).unwrap();
        });
        // Far more than the socket buffers hold: the writer is waiting now.
        std::thread::sleep(Duration::from_millis(100));
        assert!(finished.try_recv().is_err(), "16 MiB cannot all be buffered unread");
        let mut received = Vec::new();
        ours.read_to_end(&mut received).unwrap();
        finished.recv_timeout(PATIENCE).unwrap();
        assert_eq!(received.len(), TOTAL);
        assert!(received.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    }
}

//! A TCP socket on a session thread's loop: tokio's `AsyncRead` and
//! `AsyncWrite` over a mio socket registered (edge-triggered) with the
//! loop's epoll, its readiness one word and a waker slot per direction.

use std::io::{IoSlice, Write};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{HANDLE, Shared};
use crate::proxy::Io;

const READABLE: u32 = 1;
const WRITABLE: u32 = 1 << 1;
const READ_CLOSED: u32 = 1 << 2;
const WRITE_CLOSED: u32 = 1 << 3;
/// Above the bits, a count of the events seen: a wait may clear a bit only
/// if no event came since the look that found the socket drained.
const EVENT: u32 = 1 << 8;

/// One way through a socket: the bits that let it go on, the one a
/// "would block" clears.
#[derive(Clone, Copy)]
enum Way {
    Read,
    Write,
}

impl Way {
    fn go_bits(self) -> u32 {
        match self {
            Way::Read => READABLE | READ_CLOSED,
            Way::Write => WRITABLE | WRITE_CLOSED,
        }
    }

    fn ready_bit(self) -> u32 {
        match self {
            Way::Read => READABLE,
            Way::Write => WRITABLE,
        }
    }
}

/// A socket's readiness, shared by the loop (which sets it from events)
/// and the socket's owner (which clears it when the kernel says "would
/// block").
#[derive(Default)]
pub(super) struct IoState {
    readiness: AtomicU32,
    /// The waker of whoever waits to read, and to write. Kept after a wake
    /// (a session's is the same from wait to wait), replaced when another
    /// comes.
    read: Mutex<Option<Waker>>,
    write: Mutex<Option<Waker>>,
}

/// An event's readiness bits.
pub(super) fn readiness(event: &mio::event::Event) -> u32 {
    let mut bits = 0;
    if event.is_readable() {
        bits |= READABLE;
    }
    if event.is_writable() {
        bits |= WRITABLE;
    }
    if event.is_read_closed() || event.is_error() {
        bits |= READ_CLOSED | READABLE;
    }
    if event.is_write_closed() || event.is_error() {
        bits |= WRITE_CLOSED | WRITABLE;
    }
    bits
}

impl IoState {
    fn optimistic() -> IoState {
        // A new socket is tried before any event: a request that came with
        // the connection is read without a turn of the loop.
        IoState {
            readiness: AtomicU32::new(READABLE | WRITABLE),
            ..IoState::default()
        }
    }

    /// Records an event's readiness ([`readiness`]); wakes a direction
    /// that was not ready before.
    pub(super) fn ready(&self, bits: u32) {
        let update = |r: u32| Some(r.wrapping_add(EVENT) | bits);
        let Ok(before) = self.readiness.fetch_update(Ordering::AcqRel, Ordering::Acquire, update) else {
            return;
        };
        let new = bits & !before;
        for (way, slot) in [(Way::Read, &self.read), (Way::Write, &self.write)] {
            if new & way.go_bits() != 0
                && let Some(waker) = lock(slot).as_ref()
            {
                waker.wake_by_ref();
            }
        }
    }

    fn slot(&self, way: Way) -> &Mutex<Option<Waker>> {
        match way {
            Way::Read => &self.read,
            Way::Write => &self.write,
        }
    }

    fn wait(&self, way: Way, waker: &Waker) {
        let mut slot = lock(self.slot(way));
        if !slot.as_ref().is_some_and(|kept| kept.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    /// Runs `io` when `way` is ready; waits (the waker kept first, so that
    /// an event after the look wakes it) when it is not or the kernel says
    /// "would block". A read or write short of `drained_below` bytes
    /// drained an edge-triggered socket too: then the next call waits
    /// without a system call. (Not said of vectored writes, which the
    /// standard library may cut at the kernel's slice limit.)
    fn poll_io(
        &self,
        cx: &Context<'_>,
        way: Way,
        drained_below: Option<usize>,
        mut io: impl FnMut() -> std::io::Result<usize>,
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let seen = self.readiness.load(Ordering::Acquire);
            if seen & way.go_bits() == 0 {
                self.wait(way, cx.waker());
                if self.readiness.load(Ordering::Acquire) == seen {
                    return Poll::Pending;
                }
                continue;
            }
            match io() {
                Ok(n) => {
                    if n > 0 && drained_below.is_some_and(|len| n < len) {
                        self.clear(seen, way);
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.wait(way, cx.waker());
                    if self.clear(seen, way) {
                        return Poll::Pending;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Clears `way`'s ready bit unless an event came since `seen`.
    fn clear(&self, seen: u32, way: Way) -> bool {
        let cleared = seen & !way.ready_bit();
        self.readiness
            .compare_exchange(seen, cleared, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

fn lock(slot: &Mutex<Option<Waker>>) -> std::sync::MutexGuard<'_, Option<Waker>> {
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A socket registered with the loop of the thread that adopted it.
pub(crate) struct LoopStream {
    stream: mio::net::TcpStream,
    state: Arc<IoState>,
    key: usize,
    shared: Arc<Shared>,
}

/// Moves `stream` to this thread's loop if the thread runs one; elsewhere
/// it stays with the runtime's reactor.
pub(crate) fn adopt(stream: tokio::net::TcpStream) -> std::io::Result<Box<dyn Io>> {
    match HANDLE.with_borrow(Option::is_some) {
        true => Ok(Box::new(adopt_std(stream.into_std()?)?)),
        false => Ok(Box::new(stream)),
    }
}

/// Registers a socket handed over from another thread with this thread's
/// loop.
pub(crate) fn adopt_std(stream: std::net::TcpStream) -> std::io::Result<LoopStream> {
    match HANDLE.with_borrow(Clone::clone) {
        Some(shared) => LoopStream::register(stream, shared),
        None => Err(std::io::Error::other("this thread runs no session loop")),
    }
}

impl LoopStream {
    fn register(stream: std::net::TcpStream, shared: Arc<Shared>) -> std::io::Result<LoopStream> {
        stream.set_nonblocking(true)?;
        let mut stream = mio::net::TcpStream::from_std(stream);
        let state = Arc::new(IoState::optimistic());
        let key = shared.lock_sockets().insert(Arc::clone(&state));
        let interest = mio::Interest::READABLE | mio::Interest::WRITABLE;
        if let Err(e) = shared.registry.register(&mut stream, mio::Token(key), interest) {
            shared.lock_sockets().remove(key);
            return Err(e);
        }
        Ok(LoopStream {
            stream,
            state,
            key,
            shared,
        })
    }
}

impl Drop for LoopStream {
    fn drop(&mut self) {
        // Closing the socket would take it out of the epoll set as well,
        // but only once no other descriptor refers to it.
        _ = self.shared.registry.deregister(&mut self.stream);
        self.shared.lock_sockets().remove(self.key);
    }
}

impl AsyncRead for LoopStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let len = buf.remaining();
        if len == 0 {
            return Poll::Ready(Ok(()));
        }
        let this = self.get_mut();
        let read = this
            .state
            .poll_io(cx, Way::Read, Some(len), || read_into(&this.stream, buf));
        read.map_ok(|_| ())
    }
}

/// One recv(2) into the buffer's unfilled part, which the buffer's owner
/// (a `BytesMut`'s spare capacity, most often) has not initialised: tokio's
/// own sockets read the same way. Zeroing it first would cost a memset of
/// the whole chunk per read. recv(2), not read(2): read(2) on a socket
/// passes through the file layer first (`fdget_pos`, `vfs_read`), which
/// `perf` counted at about 1.3 % of a relay's samples.
#[allow(unsafe_code)]
fn read_into(stream: &mio::net::TcpStream, buf: &mut ReadBuf<'_>) -> std::io::Result<usize> {
    // SAFETY: `unfilled_mut` lends bytes that may be uninitialised; recv(2)
    // only writes them, and only the `n` it reports are then marked
    // initialised and filled.
    let unfilled: &mut [MaybeUninit<u8>] = unsafe { buf.unfilled_mut() };
    let ((filled, _), _) = rustix::net::recv(stream, unfilled, rustix::net::RecvFlags::empty())?;
    let n = filled.len();
    // SAFETY: recv(2) wrote these `n` bytes just now.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Ok(n)
}

impl AsyncWrite for LoopStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.state
            .poll_io(cx, Way::Write, Some(bytes.len()), || (&this.stream).write(bytes))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.state
            .poll_io(cx, Way::Write, None, || (&this.stream).write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(self.stream.shutdown(std::net::Shutdown::Write))
    }
}

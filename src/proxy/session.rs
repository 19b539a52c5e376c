//! One client connection and the directory connection that serves it.
//!
//! A session is one task that owns both sockets and polls them itself
//! ([`Session::poll_event`]): what waits to be written goes first, then
//! the client's requests, then the directory's responses. Each direction
//! has its own back-pressure, so a client that pipelines and reads nothing
//! cannot deadlock the relay:
//! - requests are read while the directory takes what was relayed to it
//!   and ldapsync's own answers (refusals, say) stay under
//!   [`OUTBOX_LIMIT`] unwritten;
//! - the directory is read while the client takes what was relayed to it.
//!
//! Nothing crosses a task boundary: one read from the directory, every
//! whole PDU in it written to the client in one write, straight from the
//! read buffer; the operations in flight are the session's own map.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use rasn_ldap::ResultCode;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Sleep, sleep_until, timeout};
use tokio_util::io::poll_read_buf;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{Instrument, debug, info, warn};

use super::ber;
use super::capture::{CaptureLoss, CapturedWrite, Opacity, WriteKind};
use super::codec::{FrameError, PduCodec, rewind};
use super::conformance::Checker;
use super::limits::AddressSlot;
use super::message::{self, Envelope, Op, STARTTLS_OID};
use super::pool::Slot;
use super::upstream;
use super::wake::{Source, Wakers};
use super::{Io, Settings, Shared};
use crate::config::{DirectoryLoss, Listener, ListenerMode, ListenerTls};
use crate::metrics::{METRICS, SessionOperations};

type Stream = Box<dyn Io>;

/// ldapsync's own answers a client may leave unread before its requests
/// are no longer read.
const OUTBOX_LIMIT: usize = 64 * 1024;
/// Bytes read from either side at a time, at least.
const READ_CHUNK: usize = 8 * 1024;
/// How long an abandoned operation still counts against `max_outstanding`:
/// the directory may be finishing it.
const ABANDONED_GRACE: Duration = Duration::from_secs(1);

/// An operation the directory has not finished answering.
struct Pending {
    op: Op,
    started: Instant,
    on_success: OnSuccess,
}

/// What a successful response means beyond relaying it.
enum OnSuccess {
    Nothing,
    /// A write: its request goes to the capture sink.
    Capture(WriteKind, Bytes),
    /// A SASL bind: the mechanism may have negotiated a security layer, after
    /// which the session's bytes are no longer LDAP PDUs (RFC 4513 §5.2.1.2).
    SaslBound,
    /// StartTLS passed through: the directory's next bytes are its side of
    /// the client's TLS handshake.
    EndToEndTls,
}

/// A request the relay cannot finish without waiting: a session's first
/// request opens the directory connection, StartTLS ends a session's
/// identity, a bind refused here closes the directory's session first.
enum Deferred {
    Connect(Envelope, OnSuccess),
    /// `more`: the client sent bytes after it.
    StartTls(Envelope, bool),
    RefuseBind(Envelope, ResultCode, Cow<'static, str>),
}

/// The operations in flight on the session's directory connection, by
/// message id. One is kept in place, beside the rest of the session:
/// a client that waits for each answer (most do) never reaches the map,
/// which would be more cache lines per operation. `more` holds operations
/// only while `one` does.
#[derive(Default)]
struct Inflight {
    one: Option<(i64, Pending)>,
    more: HashMap<i64, Pending, foldhash::fast::RandomState>,
}

impl Inflight {
    fn len(&self) -> usize {
        match self.one {
            Some(_) => 1 + self.more.len(),
            None => 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.one.is_none()
    }

    fn contains(&self, id: i64) -> bool {
        match &self.one {
            Some((one, _)) => *one == id || self.more.contains_key(&id),
            None => false,
        }
    }

    /// Adds an operation whose message id is not in flight.
    fn insert(&mut self, id: i64, pending: Pending) {
        match self.one {
            None => self.one = Some((id, pending)),
            Some(_) => drop(self.more.insert(id, pending)),
        }
    }

    fn remove(&mut self, id: i64) -> Option<Pending> {
        match &self.one {
            Some((one, _)) if *one == id => {
                let next = self.more.keys().next().copied();
                let next = next.and_then(|next| self.more.remove_entry(&next));
                std::mem::replace(&mut self.one, next).map(|(_, pending)| pending)
            }
            Some(_) => self.more.remove(&id),
            None => None,
        }
    }

    /// Forgets every operation in flight; the kind of write among them, if
    /// any (a delete or rename before others: polls may not see those).
    fn abandon_all(&mut self) -> Option<WriteKind> {
        let one = self.one.take().map(|(_, pending)| pending);
        let kinds = one.into_iter().chain(self.more.drain().map(|(_, pending)| pending));
        kinds
            .filter_map(|p| match p.on_success {
                OnSuccess::Capture(kind, _) => Some(kind),
                _ => None,
            })
            .max_by_key(|kind| matches!(kind, WriteKind::Delete | WriteKind::ModifyDn))
    }
}

/// How a side's bytes are read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    Pdus,
    /// Wrapped (a SASL security layer, TLS the directory ends): relayed as
    /// they come.
    Opaque,
}

/// The client's connection.
struct Client {
    stream: Stream,
    /// Requests as they arrive: framed in place, relayed from here. Once the
    /// client's bytes are opaque they are read straight into the
    /// directory's `outgoing`.
    inbox: BytesMut,
    codec: PduCodec,
    framing: Framing,
    /// ldapsync's own messages for the client, written after what was
    /// relayed before them.
    outbox: BytesMut,
    /// Written and not flushed yet (TLS holds records until flushed).
    unflushed: bool,
    /// Since when bytes for the client have waited for it to read.
    stalled: Option<tokio::time::Instant>,
    parked: Parked,
}

/// The session's directory connection.
struct Directory {
    stream: Stream,
    /// What the directory sent; its first `relayed` bytes go to the client.
    buffer: BytesMut,
    relayed: usize,
    framing: Framing,
    /// The directory announced it is closing (a Notice of Disconnection),
    /// and the client is told by that notice.
    noticed: bool,
    /// Requests relayed and not written yet.
    outgoing: BytesMut,
    /// Since when requests have waited for the directory to read.
    stalled: Option<tokio::time::Instant>,
    parked: Parked,
    /// Counts this session on its directory URL while it is connected.
    _slot: Slot,
}

/// A socket's reads and writes that wait for it to wake the session: not
/// polled again until it has.
#[derive(Default)]
struct Parked {
    read: bool,
    write: bool,
}

/// Why the session ends; decides what the client is told.
#[derive(Debug)]
enum End {
    ClientClosed,
    Unbind,
    Malformed(String),
    UpstreamLost(String),
    Idle,
    /// A request's bytes did not all arrive within the read timeout.
    SlowRequest(Duration),
    /// The session would take more than its share of a shared resource.
    Overloaded(String),
    Shutdown,
    /// A TLS handshake failed: the connection is in no state for a notice.
    TlsFailed(String),
    /// The directory closed an opaque session.
    TunnelClosed,
}

/// What woke the session.
enum Event {
    /// A whole request of this length starts the inbox.
    Request(usize),
    /// The client's bytes could not be framed, or reading them failed.
    Unframed(FrameError),
    /// The client closed its connection between requests.
    ClientClosed,
    /// Opaque bytes from the client, now in the directory's `outgoing`.
    ClientBytes,
    /// One read from the directory.
    Directory(std::io::Result<usize>),
    /// Writing to the client failed.
    ClientGone(std::io::Error),
    /// Writing to the directory failed.
    DirectoryGone(std::io::Error),
    Shutdown,
    /// The session's timer: idle, a slow request, a stalled write.
    Timer,
}

/// What a PDU from the directory means for the bytes after it.
enum Seen {
    Response,
    /// A Notice of Disconnection: the directory is closing the connection.
    Notice,
    /// The bytes after it are opaque (StartTLS passed through succeeded).
    Opaque,
}

/// How the directory connection ended, as one read showed it.
enum DirectoryEnd {
    /// It closed; `noticed` if it said so first with a Notice of
    /// Disconnection, which the client then receives.
    Closed {
        noticed: bool,
    },
    Failed(FrameError),
}

/// A connection the accept loop admitted: its session's number, the
/// client's address, and the limits' slots it holds until it ends.
pub(super) struct Accepted {
    pub(super) id: u64,
    pub(super) peer: SocketAddr,
    pub(super) permit: OwnedSemaphorePermit,
    pub(super) slot: AddressSlot,
}

/// The session of an accepted connection, to run. Built here rather than
/// in the future: every layer of async state between the task and the
/// relay loop is memory that each wake-up of the session reads again.
pub(super) fn run(
    accepted: Accepted,
    stream: Stream,
    listener: Arc<Listener>,
    shared: Arc<Shared>,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + use<> {
    let span = tracing::info_span!("session", id = accepted.id, peer = %accepted.peer);
    METRICS.sessions.inc();
    let session = Session::new(accepted, stream, listener, shared, settings, shutdown);
    Box::new(session).run().instrument(span)
}

/// Counts a session among those open until it is dropped, however it ends.
struct Open;

impl Open {
    fn count() -> Open {
        METRICS.sessions_open.inc();
        Open
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        METRICS.sessions_open.dec();
    }
}

/// The server side of a TLS handshake, within the handshake timeout.
async fn handshake(shared: &Shared, settings: &Settings, stream: impl Io) -> Result<Stream, String> {
    let tls = shared.tls.as_ref().ok_or("no certificate is configured (proxy.tls)")?;
    match timeout(settings.config.handshake_timeout, tls.acceptor().accept(stream)).await {
        Ok(Ok(stream)) => Ok(Box::new(stream)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no handshake within {}",
            humantime::format_duration(settings.config.handshake_timeout)
        )),
    }
}

struct Session {
    id: u64,
    shared: Arc<Shared>,
    /// As they were when the session started.
    settings: Arc<Settings>,
    listener: Arc<Listener>,
    peer: IpAddr,
    /// The client's connection is under TLS (`ldaps://` or StartTLS).
    tls: bool,
    /// Conformance mode: both directions' PDUs are checked.
    checker: Option<Checker>,
    client: Client,
    directory: Option<Directory>,
    /// Frames the directory's PDUs (of every directory connection the
    /// session has).
    directory_codec: PduCodec,
    inflight: Inflight,
    /// Requests are read (not while shutting down).
    accepting: bool,
    wakers: Wakers,
    /// Made once: each new one would join (and leave) a wait list all
    /// sessions share, twice per request.
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    /// One timer for the session, moved only when it fires or a write
    /// starts to wait: re-arming it at every request would take the
    /// runtime's timer lock twice per operation.
    timer: Pin<Box<Sleep>>,
    /// The shutdown token and the timer wait for their waker (`wakers`).
    signals_parked: bool,
    /// The last request, or in an opaque session the last bytes either way.
    active_at: tokio::time::Instant,
    /// Set once the directory agreed to wrap the session's bytes (a SASL
    /// bind succeeded, or StartTLS passed through): from then on, bytes that
    /// are not an LDAPMessage are taken as wrapped, not as garbage.
    wrapped: bool,
    /// Set once the directory accepted a StartTLS passed through to it.
    end_to_end: bool,
    /// The message id of a StartTLS relayed to the directory: nothing may
    /// follow it until it is answered.
    start_tls_id: Option<i64>,
    /// The session relays opaque bytes (a SASL security layer or the
    /// client's own TLS with the directory), so ldapsync can no longer
    /// speak LDAP to the client itself.
    tunneled: bool,
    /// Operations abandoned lately, with when (see `request`): they still
    /// count, and their message ids are not free yet.
    abandoned: VecDeque<(tokio::time::Instant, i64)>,
    /// When the request being relayed was whole: its operation's start
    /// (one clock read per request serves the idle timer too).
    received_at: Instant,
    operations: SessionOperations,
    _open: Open,
    _admitted: (OwnedSemaphorePermit, AddressSlot),
}

impl Session {
    fn new(
        accepted: Accepted,
        stream: Stream,
        listener: Arc<Listener>,
        shared: Arc<Shared>,
        settings: Arc<Settings>,
        shutdown: CancellationToken,
    ) -> Self {
        let Accepted { id, peer, permit, slot } = accepted;
        let checker = shared
            .conformance
            .as_ref()
            .map(|report| Checker::new(Arc::clone(report), id));
        let now = tokio::time::Instant::now();
        let first_check = settings.config.idle_timeout.min(settings.config.request_read_timeout);
        Session {
            id,
            client: Client {
                stream,
                inbox: BytesMut::with_capacity(READ_CHUNK),
                codec: client_codec(&shared, &settings),
                framing: Framing::Pdus,
                outbox: BytesMut::new(),
                unflushed: false,
                stalled: None,
                parked: Parked::default(),
            },
            directory: None,
            directory_codec: PduCodec::new(settings.config.max_upstream_pdu),
            inflight: Inflight::default(),
            accepting: true,
            wakers: Wakers::new(),
            shutdown: Box::pin(shutdown.cancelled_owned()),
            timer: Box::pin(sleep_until(now + first_check)),
            signals_parked: false,
            active_at: now,
            settings,
            listener,
            peer: peer.ip(),
            tls: false,
            checker,
            shared,
            wrapped: false,
            end_to_end: false,
            start_tls_id: None,
            tunneled: false,
            abandoned: VecDeque::new(),
            received_at: Instant::now(),
            operations: SessionOperations::default(),
            _open: Open::count(),
            _admitted: (permit, slot),
        }
    }

    /// Runs the session, after the TLS handshake on an `ldaps://`
    /// listener that ends TLS itself.
    async fn run(mut self: Box<Self>) {
        let (ldaps, tls) = (self.listener.url.is_ldaps(), self.listener.tls);
        if ldaps && tls == ListenerTls::Terminate {
            let plain = std::mem::replace(&mut self.client.stream, Box::new(tokio::io::empty()));
            match Box::pin(handshake(&self.shared, &self.settings, plain)).await {
                Ok(stream) => self.client.stream = stream,
                Err(reason) => return info!(%reason, "TLS handshake failed; connection closed"),
            }
            self.tls = true;
            // Idle from the end of the handshake, which has its own timeout.
            self.active_at = tokio::time::Instant::now();
        }
        debug!("session opened");
        let end = match (ldaps, tls) {
            (true, ListenerTls::Passthrough) => Box::pin(self.pass_through()).await,
            _ => self.relay().await,
        };
        Box::pin(self.close(end)).await;
    }

    /// An `ldaps://` passthrough session: relayed untouched, from the first
    /// byte, to an `ldaps://` directory URL, which ends the client's TLS.
    async fn pass_through(&mut self) -> End {
        // A client that says nothing holds no directory connection: its
        // ClientHello within the handshake timeout, as a TLS listener's.
        let first = poll_fn(|cx| poll_read_buf(Pin::new(&mut self.client.stream), cx, &mut self.client.inbox));
        match timeout(self.settings.config.handshake_timeout, first).await {
            Ok(Ok(0)) | Ok(Err(_)) => return End::ClientClosed,
            Ok(Ok(_)) => {}
            Err(_) => return End::TlsFailed("no TLS handshake from the client within the handshake timeout".into()),
        }
        let route = self.settings.passthrough_route(true);
        let (stream, slot) = match upstream::connect(&route, &self.shared.pool).await {
            Ok(connected) => connected,
            Err(e) => return End::UpstreamLost(e.to_string()),
        };
        self.start_upstream(stream, slot, Framing::Opaque);
        self.tunnel(Opacity::EndToEndTls);
        self.relay().await
    }

    /// Relays until the session ends.
    async fn relay(&mut self) -> End {
        loop {
            let event = poll_fn(|cx| self.poll_event(cx)).await;
            let end = match self.handle(event) {
                Ok(end) => end,
                // Boxed: its state stays out of this loop's future, which
                // every wake-up of every session touches.
                Err((deferred, len)) => Box::pin(self.finish_request(deferred, len)).await,
            };
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// What happens next: bytes written as far as the sockets take them,
    /// then a request, a directory read, shutdown or the timer.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let wakers = &self.wakers;
        wakers.register(cx.waker());
        if wakers.woke(Source::Client) {
            self.client.parked = Parked::default();
        }
        if wakers.woke(Source::Directory)
            && let Some(directory) = self.directory.as_mut()
        {
            directory.parked = Parked::default();
        }
        if wakers.woke(Source::Signals) {
            self.signals_parked = false;
        }
        let client_cx = &mut Context::from_waker(&wakers.client_waker);
        let directory_cx = &mut Context::from_waker(&wakers.directory_waker);
        if let Poll::Ready(Err(e)) = poll_to_client(&mut self.client, self.directory.as_mut(), client_cx) {
            return Poll::Ready(Event::ClientGone(e));
        }
        // Requests pipelined in one read go out in one write: written once
        // no whole one is left to relay, or none can be taken now.
        let takes_requests = self.accepting && self.client.outbox.len() < OUTBOX_LIMIT;
        let batching = takes_requests && self.client.framing == Framing::Pdus && holds_whole_pdu(&self.client.inbox);
        if let Some(directory) = self.directory.as_mut()
            && !batching
            && let Poll::Ready(Err(e)) = poll_to_directory(directory, directory_cx)
        {
            return Poll::Ready(Event::DirectoryGone(e));
        }
        // A write that began to wait must not wait past the I/O timeout.
        if let Some(by) = self.stalled_until()
            && by < self.timer.deadline()
        {
            self.timer.as_mut().reset(by);
            self.signals_parked = false;
        }
        if takes_requests && let Poll::Ready(event) = poll_request(&mut self.client, self.directory.as_mut(), client_cx)
        {
            return Poll::Ready(event);
        }
        if let Some(directory) = self.directory.as_mut().filter(|d| d.relayed == 0 && !d.parked.read) {
            self.directory_codec.reserve_read(&mut directory.buffer, READ_CHUNK);
            match poll_read_buf(Pin::new(&mut directory.stream), directory_cx, &mut directory.buffer) {
                Poll::Ready(read) => return Poll::Ready(Event::Directory(read)),
                Poll::Pending => directory.parked.read = true,
            }
        }
        if !self.signals_parked {
            let signals_cx = &mut Context::from_waker(&wakers.signals_waker);
            if self.accepting && self.shutdown.as_mut().poll(signals_cx).is_ready() {
                return Poll::Ready(Event::Shutdown);
            }
            if self.timer.as_mut().poll(signals_cx).is_ready() {
                return Poll::Ready(Event::Timer);
            }
            self.signals_parked = true;
        }
        Poll::Pending
    }

    /// Acts on an event without waiting (`Some` ends the session); a request that must wait comes
    /// back deferred, with its length at the start of the inbox.
    fn handle(&mut self, event: Event) -> Result<Option<End>, (Deferred, usize)> {
        Ok(match event {
            Event::Shutdown => Some(End::Shutdown),
            Event::ClientClosed => Some(End::ClientClosed),
            Event::ClientGone(e) => {
                debug!(error = %e, "client write failed");
                Some(End::ClientClosed)
            }
            Event::DirectoryGone(e) => Some(End::UpstreamLost(format!("writing to the directory failed: {e}"))),
            Event::ClientBytes => {
                self.active_at = tokio::time::Instant::now();
                None
            }
            Event::Directory(read) => self.directory_read(read),
            Event::Timer => self.timer_fired(),
            Event::Unframed(FrameError::Io(e)) => {
                debug!(error = %e, "client read failed");
                Some(End::ClientClosed)
            }
            Event::Unframed(FrameError::NotASequence(_)) if self.wrapped => {
                let opacity = match self.end_to_end {
                    true => Opacity::EndToEndTls,
                    false => Opacity::SecurityLayer,
                };
                if self.directory.is_none() {
                    return Ok(Some(End::ClientClosed));
                }
                self.tunnel(opacity);
                None
            }
            Event::Unframed(e @ FrameError::OverBudget(_)) => Some(End::Overloaded(e.to_string())),
            Event::Unframed(e) => Some(End::Malformed(e.to_string())),
            Event::Request(len) => {
                self.received_at = Instant::now();
                self.active_at = tokio::time::Instant::from_std(self.received_at);
                // Lent out while the request is relayed from it.
                let mut inbox = std::mem::take(&mut self.client.inbox);
                let relayed = self.request(&inbox[..len], inbox.len() > len);
                if relayed.is_ok() {
                    inbox.advance(len);
                    rewind(&mut inbox);
                }
                self.client.inbox = inbox;
                return relayed.map_err(|deferred| (deferred, len));
            }
        })
    }

    /// Finishes a deferred request, the first `len` bytes of the inbox.
    async fn finish_request(&mut self, deferred: Deferred, len: usize) -> Option<End> {
        let mut inbox = std::mem::take(&mut self.client.inbox);
        let pdu = &inbox[..len];
        let end = match deferred {
            Deferred::Connect(request, on_success) => {
                let settings = Arc::clone(&self.settings);
                match self.connect(&settings.route(), &request).await {
                    Ok(()) => {
                        self.send(&request, pdu, on_success);
                        None
                    }
                    Err(end) => end,
                }
            }
            Deferred::StartTls(request, more) => self.start_tls(&request, pdu, more).await,
            Deferred::RefuseBind(request, code, why) => self.refuse_bind(&request, code, &why).await,
        };
        inbox.advance(len);
        rewind(&mut inbox);
        self.client.inbox = inbox;
        end
    }

    /// From now on the client's bytes are relayed as they come (a SASL
    /// security layer, the client's TLS with the directory); the directory
    /// side switches on its own (see `directory_read`).
    fn tunnel(&mut self, opacity: Opacity) {
        self.tunneled = true;
        info!(relayed = opacity.as_str(), "relaying this session opaquely");
        self.shared.sink.capture_lost(self.id, CaptureLoss::Opaque(opacity));
        self.client.framing = Framing::Opaque;
        let pending = std::mem::take(&mut self.client.inbox);
        self.client.codec.forget_partial();
        if let Some(directory) = self.directory.as_mut() {
            directory.outgoing.extend_from_slice(&pending);
        }
    }

    /// The timer fired: a session idle for too long, a request arriving for
    /// too long, a write waiting for too long. Sets it for the next check.
    fn timer_fired(&mut self) -> Option<End> {
        let config = &self.settings.config;
        let (idle_timeout, read_timeout, io_timeout) =
            (config.idle_timeout, config.request_read_timeout, config.io_timeout);
        let now = tokio::time::Instant::now();
        let past = |since: Option<tokio::time::Instant>| since.is_some_and(|since| since + io_timeout <= now);
        if past(self.client.stalled) {
            warn!("client accepted no data within the I/O timeout; dropping it");
            return Some(End::ClientClosed);
        }
        if past(self.directory.as_ref().and_then(|d| d.stalled)) {
            return Some(End::UpstreamLost("the directory stopped reading requests".into()));
        }
        // A request still arriving: due in full by its deadline.
        let read_by = self
            .client
            .codec
            .partial_since()
            .map(|since| tokio::time::Instant::from_std(since) + read_timeout);
        if read_by.is_some_and(|by| by <= now) {
            return Some(End::SlowRequest(read_timeout));
        }
        let mut idle_until = self.active_at + idle_timeout;
        if idle_until <= now {
            if self.tunneled || self.inflight.is_empty() {
                return Some(End::Idle);
            }
            idle_until = now + idle_timeout;
        }
        let next = [self.stalled_until(), read_by]
            .into_iter()
            .flatten()
            .fold(idle_until.min(now + read_timeout), tokio::time::Instant::min);
        self.timer.as_mut().reset(next);
        self.signals_parked = false;
        None
    }

    /// When the write that has waited longest, to either side, is past the
    /// I/O timeout.
    fn stalled_until(&self) -> Option<tokio::time::Instant> {
        let directory = self.directory.as_ref().and_then(|d| d.stalled);
        let since = match (self.client.stalled, directory) {
            (Some(client), Some(directory)) => Some(client.min(directory)),
            (client, directory) => client.or(directory),
        };
        since.map(|since| since + self.settings.config.io_timeout)
    }

    /// Relays one client PDU (`more`: the client has sent more bytes after
    /// it); `Ok(Some)` ends the session, `Err` defers what must wait.
    fn request(&mut self, pdu: &[u8], more: bool) -> Result<Option<End>, Deferred> {
        // RFC 4511 §4.14.1: nothing follows a StartTLS request until its
        // response; here it would reach the directory's TLS as garbage.
        if let Some(id) = self.start_tls_id
            && self.inflight.contains(id)
        {
            return Ok(Some(End::Malformed(
                "a request was sent while StartTLS was pending".into(),
            )));
        }
        if let Some(checker) = &mut self.checker {
            checker.client(pdu);
        }
        let env = match Envelope::peek(pdu) {
            Ok(env) => env,
            Err(e) => return Ok(Some(End::Malformed(format!("undecodable LDAPMessage: {e}")))),
        };
        debug!(message_id = env.message_id, op = env.op.name(), "request");
        // MessageID ::= INTEGER (0 .. maxInt) (RFC 4511 §4.1.1.1): anything
        // else cannot be answered, and directories just drop the connection.
        if !(0..=i64::from(i32::MAX)).contains(&env.message_id) {
            return Ok(Some(End::Malformed(format!(
                "message id {} is outside 0..2147483647",
                env.message_id
            ))));
        }
        // RFC 4511 §4.1.1.1: a message id names one operation at a time.
        // Relaying a second one would make its response (and the first
        // one's capture) ambiguous.
        let (in_use, in_flight) = match env.op.expects_response() {
            true => (self.inflight.contains(env.message_id), self.inflight.len()),
            false => (false, 0),
        };
        self.forget_abandoned();
        if env.op.expects_response() && (in_use || self.abandoned.iter().any(|(_, id)| *id == env.message_id)) {
            return Ok(Some(End::Malformed(format!(
                "message id {} is already in use by an operation in progress",
                env.message_id
            ))));
        }
        match env.op {
            Op::Unbind => {
                // Best effort (see `close`): the directory learns the client
                // left cleanly.
                if let Some(directory) = &mut self.directory {
                    directory.outgoing.extend_from_slice(pdu);
                }
                return Ok(Some(End::Unbind));
            }
            // Without a directory connection nothing is in flight to abandon.
            Op::Abandon if self.directory.is_none() => return Ok(None),
            Op::Abandon => {
                // An abandoned operation gets no further response; a write
                // may have been applied all the same, unseen.
                if let Some(target) = env.abandoned_id(pdu)
                    && let Some(pending) = self.inflight.remove(target)
                {
                    self.abandoned.push_back((tokio::time::Instant::now(), target));
                    if let OnSuccess::Capture(kind, _) = pending.on_success {
                        outcome_unknown(&self.shared, self.id, Some(kind));
                    }
                }
            }
            Op::Extended if env.extended_name(pdu) == Some(STARTTLS_OID.as_bytes()) => {
                return Err(Deferred::StartTls(env, more));
            }
            // A password must not cross the network in clear text here.
            Op::Bind if self.listener.require_tls && !self.tls && !env.is_anonymous_bind(pdu) => {
                info!("bind refused: this listener requires TLS first");
                let why = "ldapsync: this listener requires TLS (StartTLS or ldaps://) before a bind";
                return Err(Deferred::RefuseBind(
                    env,
                    ResultCode::ConfidentialityRequired,
                    why.into(),
                ));
            }
            Op::Bind => {
                if let Some(wait) = self.shared.failed_binds.blocked(self.peer) {
                    warn!(retry_in = ?wait, "bind refused: too many failed binds from this address");
                    let why = format!(
                        "ldapsync: too many failed binds from your address; retry in {} s",
                        wait.as_secs() + 1
                    );
                    return Err(Deferred::RefuseBind(env, ResultCode::UnwillingToPerform, why.into()));
                }
            }
            _ => {}
        }
        // Abandoned operations still count: the directory may be finishing
        // them, and abandon-and-ask-again must not escape the limit.
        if env.op.expects_response() && in_flight + self.abandoned.len() >= self.settings.config.max_outstanding {
            let why = "ldapsync: too many operations outstanding on this connection";
            if env.op == Op::Bind {
                return Err(Deferred::RefuseBind(env, ResultCode::Busy, why.into()));
            }
            return Ok(self.refuse(&env, ResultCode::Busy, why));
        }
        let on_success = match write_kind(env.op) {
            // Kept beyond the request buffer only for the capture sink.
            Some(kind) => OnSuccess::Capture(kind, Bytes::copy_from_slice(pdu)),
            None if env.is_sasl_bind(pdu) => OnSuccess::SaslBound,
            None => OnSuccess::Nothing,
        };
        if self.directory.is_none() {
            return Err(Deferred::Connect(env, on_success));
        }
        self.send(&env, pdu, on_success);
        Ok(None)
    }

    /// Opens the session's directory connection over `route`; when there
    /// is none, `Err` holds what `request` returns.
    async fn connect(&mut self, route: &upstream::Route<'_>, request: &Envelope) -> Result<(), Option<End>> {
        let connected = match (&self.shared.multiplexer, self.listener.mode) {
            (Some(multiplexer), ListenerMode::Multiplexed) => multiplexer.open(route, &self.shared.pool).await,
            _ => upstream::connect(route, &self.shared.pool).await,
        };
        match connected {
            Ok((stream, slot)) => {
                self.start_upstream(stream, slot, Framing::Pdus);
                Ok(())
            }
            Err(e) => {
                let diagnostic = format!("ldapsync: {e}");
                if self.settings.config.on_directory_loss == DirectoryLoss::Close {
                    return Err(Some(End::UpstreamLost(diagnostic)));
                }
                if let Some(held_back) = self.shared.directory_lost.allow() {
                    warn!(error = %e, op = request.op.name(), held_back, "request refused: directory unavailable");
                }
                Err(
                    match message::error_response(request, ResultCode::Unavailable, &diagnostic) {
                        Some(pdu) => {
                            self.reply(&pdu);
                            None
                        }
                        None => Some(End::UpstreamLost(diagnostic)),
                    },
                )
            }
        }
    }

    /// Relays a request to the directory, awaiting its response if it has
    /// one.
    fn send(&mut self, request: &Envelope, pdu: &[u8], on_success: OnSuccess) {
        if request.op.expects_response() {
            let pending = Pending {
                op: request.op,
                started: self.received_at,
                on_success,
            };
            self.inflight.insert(request.message_id, pending);
        }
        let directory = self.directory.as_mut().expect("connected before a request is sent");
        directory.outgoing.extend_from_slice(pdu);
    }

    /// Queues a message ldapsync itself answers with.
    fn reply(&mut self, pdu: &[u8]) {
        self.client.outbox.extend_from_slice(pdu);
    }

    /// Forgets the operations abandoned longer than `ABANDONED_GRACE` ago.
    fn forget_abandoned(&mut self) {
        if self.abandoned.is_empty() {
            return;
        }
        let now = tokio::time::Instant::now();
        while self
            .abandoned
            .front()
            .is_some_and(|(at, _)| now - *at > ABANDONED_GRACE)
        {
            self.abandoned.pop_front();
        }
    }

    /// Refuses a bind that ldapsync answers itself. A failed bind leaves a
    /// session anonymous (RFC 4513 §5.1; slapd does so), so the directory
    /// connection, bound as whoever bound before, is closed: the next
    /// request opens a fresh, anonymous one. Operations still in flight
    /// on it are abandoned, as a bind abandons them (RFC 4511 §4.2.1).
    async fn refuse_bind(&mut self, request: &Envelope, code: ResultCode, why: &str) -> Option<End> {
        if let Some(end) = self.end_directory_session().await {
            return Some(end);
        }
        self.refuse(request, code, why)
    }

    /// Closes the directory connection (with an unbind), so that whatever
    /// identity it holds ends with it; what it already answered still
    /// reaches the client, and writes in flight on it are reported to the
    /// capture sink as of unknown outcome.
    async fn end_directory_session(&mut self) -> Option<End> {
        self.directory.as_ref()?;
        if let Err(end) = self.flush_to_client().await {
            return Some(end);
        }
        let mut directory = self.directory.take()?;
        directory.outgoing.extend_from_slice(&message::unbind_request());
        let unbind = directory.stream.write_all(&directory.outgoing);
        let _ = timeout(self.settings.config.io_timeout, unbind).await;
        outcome_unknown(&self.shared, self.id, self.inflight.abandon_all());
        None
    }

    /// Answers a request with an error instead of relaying it.
    fn refuse(&mut self, request: &Envelope, code: ResultCode, why: &str) -> Option<End> {
        match message::error_response(request, code, why) {
            Some(pdu) => {
                self.reply(&pdu);
                None
            }
            None => Some(End::Malformed(format!(
                "{} with an invalid message id",
                request.op.name()
            ))),
        }
    }

    /// StartTLS (RFC 4511 §4.14): refused alone by the same rules on every
    /// listener; otherwise the directory connection, which may hold a bind
    /// made in clear text, is closed (the session continues anonymous, as
    /// slapd's own StartTLS leaves it), and the TLS is ended here or, on a
    /// passthrough listener, by the directory.
    async fn start_tls(&mut self, request: &Envelope, pdu: &[u8], more: bool) -> Option<End> {
        let refusal = match self.listener.tls {
            ListenerTls::Terminate if self.shared.tls.is_none() => Some((
                ResultCode::Unavailable,
                "StartTLS is not configured on this ldapsync listener",
            )),
            ListenerTls::Terminate if self.tls => Some((ResultCode::OperationsError, "TLS is already established")),
            _ if !self.inflight.is_empty() => Some((
                ResultCode::OperationsError,
                "operations are outstanding; StartTLS must be requested alone",
            )),
            _ => None,
        };
        if let Some((code, why)) = refusal {
            return match message::named_extended_response(request.message_id, STARTTLS_OID, code, why) {
                Some(response) => {
                    self.reply(&response);
                    None
                }
                None => Some(End::Malformed("StartTLS request with an invalid message id".into())),
            };
        }
        if more {
            return Some(End::Malformed("data sent after StartTLS before its response".into()));
        }
        // Before the response: after it, only TLS may reach the client.
        // Nothing awaits a response (see above); an abandon may be pending.
        if let Some(end) = self.end_directory_session().await {
            return Some(end);
        }
        match self.listener.tls {
            ListenerTls::Terminate => self.end_tls_here(request).await,
            ListenerTls::Passthrough => self.pass_start_tls(request, pdu).await,
        }
    }

    /// Answers StartTLS with success, then makes the handshake on the same
    /// socket, once the response is written.
    async fn end_tls_here(&mut self, request: &Envelope) -> Option<End> {
        let Some(response) =
            message::named_extended_response(request.message_id, STARTTLS_OID, ResultCode::Success, "")
        else {
            return Some(End::Malformed("StartTLS request with an invalid message id".into()));
        };
        self.reply(&response);
        if let Err(end) = self.flush_to_client().await {
            return Some(end);
        }
        let plain = std::mem::replace(&mut self.client.stream, Box::new(tokio::io::empty()));
        match handshake(&self.shared, &self.settings, plain).await {
            Ok(stream) => {
                self.client.stream = stream;
                self.client.parked = Parked::default();
            }
            Err(reason) => return Some(End::TlsFailed(reason)),
        }
        self.tls = true;
        info!("StartTLS: the session is now under TLS");
        None
    }

    /// StartTLS relayed to the directory on a fresh `ldap://` connection
    /// that ldapsync has not upgraded itself, so that the handshake after
    /// its success is between the client and the directory (which then
    /// sees the client's certificate).
    async fn pass_start_tls(&mut self, request: &Envelope, pdu: &[u8]) -> Option<End> {
        let settings = Arc::clone(&self.settings);
        if let Err(end) = self.connect(&settings.passthrough_route(false), request).await {
            return end;
        }
        self.start_tls_id = Some(request.message_id);
        self.send(request, pdu, OnSuccess::EndToEndTls);
        None
    }

    /// Relays this directory connection from now on.
    fn start_upstream(&mut self, stream: Stream, slot: Slot, framing: Framing) {
        self.directory = Some(Directory {
            stream,
            buffer: BytesMut::new(),
            relayed: 0,
            framing,
            noticed: false,
            outgoing: BytesMut::new(),
            stalled: None,
            parked: Parked::default(),
            _slot: slot,
        });
    }

    /// Takes in what one read from the directory brought: every whole PDU
    /// (all the bytes, once they are opaque) is for the client.
    fn directory_read(&mut self, read: std::io::Result<usize>) -> Option<End> {
        let directory = self
            .directory
            .as_mut()
            .expect("only read while relaying a directory connection");
        // Lent out while its PDUs are taken in.
        let buffer = std::mem::take(&mut directory.buffer);
        let mut side = (directory.framing, directory.noticed);
        let (relayed, ended) = self.take_in(&buffer, read, &mut side);
        let directory = self.directory.as_mut().expect("still relaying");
        (directory.buffer, directory.relayed) = (buffer, relayed);
        (directory.framing, directory.noticed) = side;
        // What came before the end (a Notice of Disconnection) still goes
        // out, from `close`.
        match ended? {
            DirectoryEnd::Closed { .. } if self.tunneled => Some(End::TunnelClosed),
            DirectoryEnd::Closed { noticed: true } => Some(End::ClientClosed),
            DirectoryEnd::Closed { noticed: false } => {
                Some(End::UpstreamLost("the directory closed the connection".into()))
            }
            DirectoryEnd::Failed(e) => Some(End::UpstreamLost(format!("the directory sent an unreadable PDU: {e}"))),
        }
    }

    /// Frames what `read` added to the directory's `buffer` (its framing
    /// and whether it gave notice in `side`): how many bytes at its start
    /// go to the client, and `Some` when the directory connection is done.
    fn take_in(
        &mut self,
        buffer: &[u8],
        read: std::io::Result<usize>,
        side: &mut (Framing, bool),
    ) -> (usize, Option<DirectoryEnd>) {
        let noticed = side.1;
        match read {
            Err(e) => {
                debug!(error = %e, "directory read failed");
                return (0, Some(DirectoryEnd::Closed { noticed }));
            }
            Ok(0) if buffer.is_empty() || side.0 == Framing::Opaque => {
                return (0, Some(DirectoryEnd::Closed { noticed }));
            }
            Ok(0) => return (0, Some(DirectoryEnd::Failed(FrameError::Truncated))),
            Ok(_) => {}
        }
        let (whole, ended) = self.frame(buffer, side);
        METRICS.bytes_to_client.inc_by(whole as u64);
        if side.0 == Framing::Opaque {
            self.active_at = tokio::time::Instant::now();
        }
        (whole, ended)
    }

    /// The length of the whole PDUs at the start of the directory's buffer
    /// (of all its bytes once they are opaque), each completing its
    /// operation.
    fn frame(&mut self, buffer: &[u8], (framing, noticed): &mut (Framing, bool)) -> (usize, Option<DirectoryEnd>) {
        if *framing == Framing::Opaque {
            return (buffer.len(), None);
        }
        let mut whole = 0;
        loop {
            let rest = &buffer[whole..];
            match self.directory_codec.pdu_len(rest) {
                Ok(Some(len)) if len <= rest.len() => {
                    let seen = self.response(&rest[..len]);
                    whole += len;
                    match seen {
                        Seen::Response => {}
                        Seen::Notice => *noticed = true,
                        Seen::Opaque => {
                            *framing = Framing::Opaque;
                            return (buffer.len(), None);
                        }
                    }
                }
                Ok(_) => return (whole, None),
                // The SASL bind negotiated a security layer (see `tunnel`).
                Err(FrameError::NotASequence(_)) if self.wrapped => {
                    *framing = Framing::Opaque;
                    return (buffer.len(), None);
                }
                Err(e) => return (whole, Some(DirectoryEnd::Failed(e))),
            }
        }
    }

    /// One PDU from the directory: checked, its operation completed.
    fn response(&mut self, pdu: &[u8]) -> Seen {
        if let Some(checker) = &mut self.checker {
            checker.directory(pdu);
        }
        match Envelope::peek(pdu) {
            Ok(env) if env.message_id == 0 && env.op == Op::ExtendedResponse => {
                warn!(
                    result = env.result_code(pdu),
                    "unsolicited notification from the directory"
                );
                return Seen::Notice;
            }
            Ok(env) if env.op.is_final_response() => {
                if let Some(pending) = self.inflight.remove(env.message_id)
                    && self.complete(&env, pdu, pending)
                {
                    return Seen::Opaque;
                }
            }
            Ok(_) => {}
            // Relayed regardless: the client may understand what we don't.
            Err(e) => debug!(error = %e, "directory PDU not understood; relayed as is"),
        }
        Seen::Response
    }

    /// Completes an operation; true when the directory's bytes after this
    /// response are opaque (StartTLS passed through succeeded).
    fn complete(&mut self, env: &Envelope, response: &[u8], pending: Pending) -> bool {
        let result = env.result_code(response);
        let took = pending.started.elapsed();
        let op = pending.op.name();
        self.operations.done(op, result.unwrap_or(-1), took.as_secs_f64());
        debug!(
            message_id = env.message_id,
            op,
            result,
            micros = took.as_micros() as u64,
            "operation done"
        );
        const INVALID_CREDENTIALS: i64 = 49;
        if pending.op == Op::Bind && result == Some(INVALID_CREDENTIALS) {
            self.shared.failed_binds.record(self.peer);
        }
        if result != Some(0) {
            return false;
        }
        match pending.on_success {
            OnSuccess::Nothing => {}
            // Applied by the directory: the sync core has it whether or not
            // the client is still there to read the answer.
            OnSuccess::Capture(kind, request) => self.shared.sink.write_succeeded(CapturedWrite {
                session: self.id,
                message_id: env.message_id,
                kind,
                request,
            }),
            OnSuccess::SaslBound => self.wrapped = true,
            OnSuccess::EndToEndTls => {
                // Before the response reaches the client, whose handshake follows it.
                self.end_to_end = true;
                self.wrapped = true;
                return true;
            }
        }
        false
    }

    /// Writes everything that waits for the client, within the I/O timeout.
    async fn flush_to_client(&mut self) -> Result<(), End> {
        let io_timeout = self.settings.config.io_timeout;
        // Polled with the task's own waker here, not the client's.
        self.client.parked.write = false;
        let (client, mut directory) = (&mut self.client, self.directory.as_mut());
        let flushed = poll_fn(|cx| poll_to_client(client, directory.as_deref_mut(), cx));
        match timeout(io_timeout, flushed).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                debug!(error = %e, "client write failed");
                Err(End::ClientClosed)
            }
            Err(_) => {
                warn!("client accepted no data within the I/O timeout; dropping it");
                Err(End::ClientClosed)
            }
        }
    }

    /// Relays the directory's answers to the operations in flight, and
    /// nothing new from the client, until none is left or `grace` ends.
    async fn drain(&mut self, grace: Duration) {
        self.accepting = false;
        let drained = async {
            while !self.inflight.is_empty() {
                let event = poll_fn(|cx| self.poll_event(cx)).await;
                let end = match event {
                    Event::Directory(read) => self.directory_read(read),
                    Event::Timer => self.timer_fired(),
                    Event::ClientGone(_) | Event::DirectoryGone(_) => Some(End::ClientClosed),
                    _ => None,
                };
                if end.is_some() {
                    return;
                }
            }
        };
        if timeout(grace, drained).await.is_err() {
            info!("operations still in flight at the end of the shutdown grace period");
        }
    }

    async fn close(mut self: Box<Self>, end: End) {
        let io_timeout = self.settings.config.io_timeout;
        // Requests already relayed reach the directory, which may answer
        // them within the shutdown grace period.
        if !matches!(end, End::UpstreamLost(_))
            && let Some(directory) = self.directory.as_mut()
        {
            directory.parked.write = false;
            let pending = poll_fn(|cx| poll_to_directory(directory, cx));
            let _ = timeout(io_timeout, pending).await;
        }
        let notice = match &end {
            End::ClientClosed | End::Unbind | End::TlsFailed(_) | End::TunnelClosed => None,
            End::Malformed(reason) => {
                warn!(%reason, "protocol error from client; disconnecting");
                Some((ResultCode::ProtocolError, reason.clone()))
            }
            End::UpstreamLost(reason) => {
                if let Some(held_back) = self.shared.directory_lost.allow() {
                    warn!(%reason, held_back, "no directory connection; disconnecting client");
                }
                (self.settings.config.on_directory_loss == DirectoryLoss::Notice)
                    .then(|| (ResultCode::Unavailable, format!("ldapsync: {reason}")))
            }
            End::Idle => Some((ResultCode::Unavailable, "ldapsync: idle timeout".to_owned())),
            End::SlowRequest(timeout) => Some((
                ResultCode::Unavailable,
                format!(
                    "ldapsync: a request was not received in full within {}",
                    humantime::format_duration(*timeout)
                ),
            )),
            End::Overloaded(reason) => Some((ResultCode::Unavailable, format!("ldapsync: {reason}; retry later"))),
            End::Shutdown => {
                self.drain(self.settings.config.shutdown_grace).await;
                Some((ResultCode::Unavailable, "ldapsync is shutting down".to_owned()))
            }
        };
        // Inside a SASL security layer a plain-text notice would be garbage.
        if let Some((code, reason)) = notice.filter(|_| !self.tunneled) {
            self.reply(&message::notice_of_disconnection(code, &reason));
        }
        // What the directory answered goes out first, the notice last; a
        // client that is gone is written no more.
        let client_gone = matches!(end, End::ClientClosed | End::TlsFailed(_));
        if !client_gone && self.flush_to_client().await.is_ok() {
            let _ = timeout(io_timeout, self.client.stream.shutdown()).await;
        }
        self.directory = None;
        outcome_unknown(&self.shared, self.id, self.inflight.abandon_all());
        match end {
            // A lost directory was said above, once per interval.
            End::ClientClosed | End::Unbind | End::UpstreamLost(_) | End::TunnelClosed => {
                debug!(?end, "session closed")
            }
            End::TlsFailed(reason) => info!(%reason, "TLS handshake failed; session closed"),
            _ => info!(?end, "session closed"),
        }
    }
}

/// Writes what waits for the client: the directory's relayed bytes, then
/// ldapsync's own. Ready once nothing waits.
fn poll_to_client(
    client: &mut Client,
    directory: Option<&mut Directory>,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<()>> {
    if client.parked.write {
        return Poll::Pending;
    }
    if let Some(directory) = directory {
        while directory.relayed > 0 {
            let relayed = &directory.buffer[..directory.relayed];
            let n = std::task::ready!(write_some(client, cx, relayed))?;
            directory.buffer.advance(n);
            directory.relayed -= n;
            rewind(&mut directory.buffer);
        }
    }
    while !client.outbox.is_empty() {
        let outbox = std::mem::take(&mut client.outbox);
        let written = write_some(client, cx, &outbox);
        client.outbox = outbox;
        let n = std::task::ready!(written)?;
        client.outbox.advance(n);
        rewind(&mut client.outbox);
    }
    if client.unflushed {
        // Under TLS, written means encrypted and sent.
        if Pin::new(&mut client.stream).poll_flush(cx)?.is_pending() {
            client.parked.write = true;
            client.stalled.get_or_insert_with(tokio::time::Instant::now);
            return Poll::Pending;
        }
        client.unflushed = false;
    }
    client.stalled = None;
    Poll::Ready(Ok(()))
}

/// One write to the client; one that must wait parks the client's writes
/// and marks since when.
fn write_some(client: &mut Client, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
    match Pin::new(&mut client.stream).poll_write(cx, bytes) {
        Poll::Ready(Ok(0)) => Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
        Poll::Ready(Ok(n)) => {
            client.unflushed = true;
            Poll::Ready(Ok(n))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => {
            client.parked.write = true;
            client.stalled.get_or_insert_with(tokio::time::Instant::now);
            Poll::Pending
        }
    }
}

/// The client's next whole request in its inbox, reading more as needed
/// (or, in an opaque session, its next bytes, read straight into the
/// directory's `outgoing`).
fn poll_request(client: &mut Client, directory: Option<&mut Directory>, cx: &mut Context<'_>) -> Poll<Event> {
    if client.framing == Framing::Opaque {
        // Once the directory took the last bytes.
        let Some(directory) = directory.filter(|d| d.outgoing.is_empty()) else {
            return Poll::Pending;
        };
        if client.parked.read {
            return Poll::Pending;
        }
        return match poll_read_buf(Pin::new(&mut client.stream), cx, &mut directory.outgoing) {
            Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(Event::ClientClosed),
            Poll::Ready(Ok(_)) => Poll::Ready(Event::ClientBytes),
            Poll::Pending => {
                client.parked.read = true;
                Poll::Pending
            }
        };
    }
    // More is read once the directory took what was relayed.
    let relaying = directory.is_some_and(|d| !d.outgoing.is_empty());
    loop {
        match client.codec.whole(&mut client.inbox) {
            Ok(Some(len)) => return Poll::Ready(Event::Request(len)),
            Ok(None) => {}
            Err(e) => return Poll::Ready(Event::Unframed(e)),
        }
        if relaying || client.parked.read {
            return Poll::Pending;
        }
        if client.inbox.len() == client.inbox.capacity() {
            client.inbox.reserve(READ_CHUNK);
        }
        match poll_read_buf(Pin::new(&mut client.stream), cx, &mut client.inbox) {
            Poll::Ready(Ok(0)) if client.inbox.is_empty() => return Poll::Ready(Event::ClientClosed),
            Poll::Ready(Ok(0)) => return Poll::Ready(Event::Unframed(FrameError::Truncated)),
            Poll::Ready(Ok(_)) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Event::Unframed(e.into())),
            Poll::Pending => {
                client.parked.read = true;
                return Poll::Pending;
            }
        }
    }
}

/// Writes what was relayed to the directory. Ready once nothing waits.
fn poll_to_directory(directory: &mut Directory, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
    if directory.parked.write {
        return Poll::Pending;
    }
    while !directory.outgoing.is_empty() {
        match Pin::new(&mut directory.stream).poll_write(cx, &directory.outgoing) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                METRICS.bytes_from_client.inc_by(n as u64);
                directory.outgoing.advance(n);
                rewind(&mut directory.outgoing);
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                directory.parked.write = true;
                directory.stalled.get_or_insert_with(tokio::time::Instant::now);
                return Poll::Pending;
            }
        }
    }
    directory.stalled = None;
    Poll::Ready(Ok(()))
}

/// A write of this kind was relayed on `session` and its outcome will never
/// be seen.
fn outcome_unknown(shared: &Shared, session: u64, kind: Option<WriteKind>) {
    if let Some(kind) = kind {
        shared.sink.capture_lost(session, CaptureLoss::OutcomeUnknown(kind));
    }
}

/// The framer of a client's requests, its partial PDUs on the shared budget.
fn client_codec(shared: &Shared, settings: &Settings) -> PduCodec {
    PduCodec::with_budget(settings.config.max_client_pdu, Arc::clone(&shared.request_buffer))
}

/// A whole PDU is buffered: the next request is already here.
fn holds_whole_pdu(buffer: &[u8]) -> bool {
    matches!(ber::read_header(buffer), Ok(Some(header)) if buffer.len() >= header.total_len())
}

fn write_kind(op: Op) -> Option<WriteKind> {
    match op {
        Op::Add => Some(WriteKind::Add),
        Op::Modify => Some(WriteKind::Modify),
        Op::Delete => Some(WriteKind::Delete),
        Op::ModifyDn => Some(WriteKind::ModifyDn),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(on_success: OnSuccess) -> Pending {
        Pending {
            op: Op::Search,
            started: Instant::now(),
            on_success,
        }
    }

    fn write(kind: WriteKind) -> Pending {
        pending(OnSuccess::Capture(kind, Bytes::new()))
    }

    #[test]
    fn operations_in_flight_are_found_by_message_id_wherever_they_are_kept() {
        let mut inflight = Inflight::default();
        assert!(inflight.is_empty());
        for id in [7, 3, 9] {
            inflight.insert(id, pending(OnSuccess::Nothing));
        }
        assert_eq!(inflight.len(), 3);
        assert!([7, 3, 9].iter().all(|&id| inflight.contains(id)) && !inflight.contains(4));
        assert!(inflight.remove(7).is_some(), "the one kept in place");
        assert!(inflight.remove(7).is_none() && !inflight.contains(7));
        inflight.insert(4, pending(OnSuccess::Nothing));
        for id in [3, 9, 4] {
            assert!(inflight.remove(id).is_some(), "message id {id}");
        }
        assert!(inflight.is_empty());
    }

    #[test]
    fn abandoning_all_reports_a_delete_or_rename_before_other_writes() {
        let mut inflight = Inflight::default();
        inflight.insert(1, write(WriteKind::Modify));
        inflight.insert(2, write(WriteKind::Delete));
        inflight.insert(3, write(WriteKind::Add));
        assert_eq!(inflight.abandon_all(), Some(WriteKind::Delete));
        assert!(inflight.is_empty());
        inflight.insert(1, write(WriteKind::ModifyDn));
        inflight.insert(2, pending(OnSuccess::Nothing));
        assert_eq!(inflight.abandon_all(), Some(WriteKind::ModifyDn));
        inflight.insert(1, pending(OnSuccess::Nothing));
        assert_eq!(inflight.abandon_all(), None);
    }
}

//! One client connection and the upstream connection that serves it.
//!
//! Two tasks per session, one per direction, so that each applies TCP
//! back-pressure on its own and a client that pipelines cannot deadlock the
//! relay:
//! - the session task reads client PDUs and writes them upstream;
//! - the responder task reads directory PDUs and writes them to the client,
//!   completing operations and handing successful writes to the capture
//!   sink. It also writes what ldapsync answers itself, which the session
//!   task queues for it (a bounded queue: a client that reads nothing
//!   pauses the session).
//!
//! A response crosses no task boundary: one read from the directory, every
//! whole PDU in it relayed in one write to the client.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use rasn_ldap::ResultCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::ber;
use super::capture::{CaptureLoss, CapturedWrite, Opacity, WriteKind};
use super::codec::{FrameError, PduCodec};
use super::conformance::Checker;
use super::message::{self, Envelope, Op, STARTTLS_OID};
use super::pool::Slot;
use super::upstream;
use super::{Io, Settings, Shared};
use crate::config::{DirectoryLoss, Listener, ListenerMode, ListenerTls};
use crate::metrics::{METRICS, SessionOperations};

type Stream = Box<dyn Io>;

/// Messages the session task queues for the responder before it waits.
const CLIENT_QUEUE: usize = 64;
/// How long an abandoned operation still counts against `max_outstanding`:
/// the directory may be finishing it.
const ABANDONED_GRACE: Duration = Duration::from_secs(1);

/// What the session task asks of the responder, in order.
enum ToClient {
    /// A message ldapsync answers with itself.
    Pdu(Bytes),
    /// Relay this directory connection's responses from now on.
    Upstream(DirectoryReader),
    /// Relay nothing more from the directory connection (it is being
    /// closed: StartTLS, or the end of the session).
    DropUpstream,
    /// Hand the socket back (for StartTLS) once everything before is
    /// written, with the queue and the responder, to be started again on
    /// the TLS stream.
    Upgrade(oneshot::Sender<(Responder, WriteHalf<Stream>, mpsc::Receiver<ToClient>)>),
}

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

/// The operations in flight on one session, shared by its two relay tasks.
#[derive(Default)]
struct Inflight {
    ops: Mutex<HashMap<i64, Pending, foldhash::fast::RandomState>>,
    /// Someone waits for `drained` (at shutdown): told when `ops` empties.
    draining: AtomicBool,
    drained: Notify,
    /// When the responder last relayed opaque bytes (a tunnel's idle
    /// timer counts both directions).
    relayed_at: Mutex<Option<tokio::time::Instant>>,
}

impl Inflight {
    fn relayed_now(&self) {
        *self.relayed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(tokio::time::Instant::now());
    }

    fn relayed_at(&self) -> Option<tokio::time::Instant> {
        *self.relayed_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, id: i64, pending: Pending) {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).insert(id, pending);
    }

    fn remove(&self, id: i64) -> Option<Pending> {
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let removed = ops.remove(&id);
        // Read under the lock that `wait_drained` checks `ops` with.
        if ops.is_empty() && self.draining.load(Ordering::Acquire) {
            self.drained.notify_waiters();
        }
        removed
    }

    fn is_empty(&self) -> bool {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    /// Whether `id` names an operation in flight, and how many are: one
    /// lock for both, on every request.
    fn occupancy(&self, id: i64) -> (bool, usize) {
        let ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        (ops.contains_key(&id), ops.len())
    }

    /// Forgets every operation in flight; the kind of write among them, if
    /// any (a delete or rename before others: polls may not see those).
    fn abandon_all(&self) -> Option<WriteKind> {
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let kinds = ops.values().filter_map(|p| match p.on_success {
            OnSuccess::Capture(kind, _) => Some(kind),
            _ => None,
        });
        let kind = kinds.max_by_key(|kind| matches!(kind, WriteKind::Delete | WriteKind::ModifyDn));
        ops.clear();
        self.drained.notify_waiters();
        kind
    }

    async fn wait_drained(&self) {
        self.draining.store(true, Ordering::Release);
        let notified = self.drained.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !self.is_empty() {
            notified.await;
        }
    }
}

/// Why the responder stopped relaying the directory connection.
#[derive(Debug)]
enum UpstreamEnd {
    /// The directory closed the connection; `noticed` if it said so first
    /// with a Notice of Disconnection, which the client has then received.
    Closed {
        noticed: bool,
    },
    Failed(FrameError),
    ClientGone,
}

/// The session task's side of the directory connection.
struct Upstream {
    writer: WriteHalf<Stream>,
    /// Requests relayed but not written yet: those a client pipelined in
    /// one read go to the directory in one write.
    outgoing: BytesMut,
    ended: oneshot::Receiver<UpstreamEnd>,
    /// Counts this session on its directory URL while it is connected.
    _slot: Slot,
}

/// The responder's side of the directory connection.
struct DirectoryReader {
    read: ReadHalf<Stream>,
    buffer: BytesMut,
    codec: PduCodec,
    framing: Framing,
    /// The directory announced it is closing (a Notice of Disconnection),
    /// and the client has been told by that notice.
    noticed: bool,
    /// Told why the relaying stopped.
    report: oneshot::Sender<UpstreamEnd>,
}

/// How the directory's bytes are read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    Pdus,
    /// A SASL security layer wraps them: relayed as they come.
    Opaque,
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

enum Event {
    /// The length of a whole request at the start of the inbox.
    Request(Option<Result<usize, FrameError>>),
    Upstream(UpstreamEnd),
    Idle,
    Shutdown,
}

pub(super) async fn run(
    id: u64,
    stream: TcpStream,
    peer: SocketAddr,
    listener: Arc<Listener>,
    shared: Arc<Shared>,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
) {
    let span = tracing::info_span!("session", id, %peer);
    METRICS.sessions.inc();
    METRICS.sessions_open.inc();
    let _open = scopeguard(|| {
        METRICS.sessions_open.dec();
    });
    async move {
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "could not set TCP_NODELAY");
        }
        let ldaps = listener.url.is_ldaps();
        let passthrough = listener.tls == ListenerTls::Passthrough;
        let stream: Stream = if ldaps && !passthrough {
            match handshake(&shared, &settings, stream).await {
                Ok(stream) => stream,
                Err(reason) => return info!(%reason, "TLS handshake failed; connection closed"),
            }
        } else {
            Box::new(stream)
        };
        let session = Session::new(id, stream, peer.ip(), listener, shared, settings);
        Session {
            tls: ldaps && !passthrough,
            ..session
        }
        .run(shutdown)
        .await
    }
    .instrument(span)
    .await
}

/// Runs `f` when dropped, however the session ends.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
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
    checker: Option<Arc<Mutex<Checker>>>,
    /// The client's side of its connection, and its requests as they
    /// arrive: framed in place, relayed from this buffer.
    client: ReadHalf<Stream>,
    inbox: BytesMut,
    codec: PduCodec,
    to_client: mpsc::Sender<ToClient>,
    responder: JoinHandle<()>,
    inflight: Arc<Inflight>,
    upstream: Option<Upstream>,
    /// Set once the directory agreed to wrap the session's bytes (a SASL
    /// bind succeeded, or StartTLS passed through): from then on, bytes that
    /// are not an LDAPMessage are taken as wrapped, not as garbage.
    wrapped: Arc<AtomicBool>,
    /// Set once the directory accepted a StartTLS passed through to it.
    end_to_end: Arc<AtomicBool>,
    /// The message id of a StartTLS relayed to the directory: nothing may
    /// follow it until it is answered.
    start_tls_id: Option<i64>,
    /// The session relays opaque bytes (a SASL security layer or the
    /// client's own TLS with the directory), so ldapsync can no longer
    /// speak LDAP to the client itself.
    tunneled: bool,
    /// Operations abandoned lately, with when (see `outstanding`): they
    /// still count, and their message ids are not free yet.
    abandoned: VecDeque<(tokio::time::Instant, i64)>,
    /// When the request being relayed was whole: its operation's start
    /// (one clock read per request serves the idle timer too).
    received_at: Instant,
}

impl Session {
    fn new(
        id: u64,
        stream: Stream,
        peer: IpAddr,
        listener: Arc<Listener>,
        shared: Arc<Shared>,
        settings: Arc<Settings>,
    ) -> Self {
        let (read, write) = tokio::io::split(stream);
        let (to_client, queue) = mpsc::channel(CLIENT_QUEUE);
        let checker = shared
            .conformance
            .as_ref()
            .map(|report| Arc::new(Mutex::new(Checker::new(Arc::clone(report), id))));
        let inflight = Arc::<Inflight>::default();
        let wrapped = Arc::<AtomicBool>::default();
        let end_to_end = Arc::<AtomicBool>::default();
        let responder = Responder {
            session: id,
            peer,
            checker: checker.clone(),
            wrapped: Arc::clone(&wrapped),
            end_to_end: Arc::clone(&end_to_end),
            shared: Arc::clone(&shared),
            inflight: Arc::clone(&inflight),
            io_timeout: settings.config.io_timeout,
            operations: SessionOperations::default(),
        }
        .spawn(write, queue);
        Session {
            id,
            client: read,
            inbox: BytesMut::with_capacity(READ_CHUNK),
            codec: client_codec(&shared, &settings),
            settings,
            listener,
            peer,
            tls: false,
            checker,
            shared,
            to_client,
            responder,
            inflight,
            upstream: None,
            wrapped,
            end_to_end,
            start_tls_id: None,
            tunneled: false,
            abandoned: VecDeque::new(),
            received_at: Instant::now(),
        }
    }

    async fn run(mut self, shutdown: CancellationToken) {
        debug!("session opened");
        let end = match (self.listener.url.is_ldaps(), self.listener.tls) {
            (true, ListenerTls::Passthrough) => self.pass_through(&shutdown).await,
            _ => self.relay(&shutdown).await,
        };
        self.close(end).await;
    }

    /// An `ldaps://` passthrough session: relayed untouched, from the first
    /// byte, to an `ldaps://` directory URL, which ends the client's TLS.
    async fn pass_through(&mut self, shutdown: &CancellationToken) -> End {
        // Nothing ldapsync could write would be readable inside the client's TLS.
        self.tunneled = true;
        // A client that says nothing holds no directory connection: its
        // ClientHello within the handshake timeout, as a TLS listener's.
        let waited = timeout(
            self.settings.config.handshake_timeout,
            self.client.read_buf(&mut self.inbox),
        );
        match waited.await {
            Ok(Ok(0)) | Ok(Err(_)) => return End::ClientClosed,
            Ok(Ok(_)) => {}
            Err(_) => return End::TlsFailed("no TLS handshake from the client within the handshake timeout".into()),
        }
        let route = self.settings.passthrough_route(true);
        let (stream, slot) = match upstream::connect(&route, &self.shared.pool).await {
            Ok(connected) => connected,
            Err(e) => return End::UpstreamLost(e.to_string()),
        };
        if let Some(end) = self.start_upstream(stream, slot, Framing::Opaque).await {
            return end;
        }
        self.tunnel(shutdown, Opacity::EndToEndTls).await
    }

    async fn relay(&mut self, shutdown: &CancellationToken) -> End {
        let idle_timeout = self.settings.config.idle_timeout;
        let read_timeout = self.settings.config.request_read_timeout;
        let mut last_request = tokio::time::Instant::now();
        // One timer for the session, moved only when it fires: re-arming it
        // at every request would take the runtime's timer lock twice per
        // operation. It fires at least once per read timeout, to see a
        // request that has been arriving for too long.
        let idle = sleep_until(last_request + idle_timeout.min(read_timeout));
        tokio::pin!(idle);
        // Made once: each new one would join (and leave) a wait list all
        // sessions share, twice per request.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        loop {
            let event = tokio::select! {
                // The request first: a session woken by one polls nothing
                // else (the others cost 5 % of the relay's instructions).
                // Shutdown cannot starve behind a flood of requests: past
                // its budget of operations in one turn, the runtime makes
                // the socket read wait, and the token is looked at.
                biased;
                frame = next_request(&mut self.client, &mut self.inbox, &mut self.codec) => Event::Request(frame),
                end = upstream_ended(&mut self.upstream) => Event::Upstream(end),
                () = &mut cancelled => Event::Shutdown,
                () = &mut idle => Event::Idle,
            };
            match event {
                Event::Shutdown => return End::Shutdown,
                Event::Upstream(end) => {
                    self.upstream = None;
                    match end {
                        UpstreamEnd::ClientGone => return End::ClientClosed,
                        UpstreamEnd::Closed { noticed: true } => return End::ClientClosed,
                        UpstreamEnd::Closed { noticed: false } => {
                            return End::UpstreamLost("the directory closed the connection".into());
                        }
                        UpstreamEnd::Failed(e) => {
                            return End::UpstreamLost(format!("the directory sent an unreadable PDU: {e}"));
                        }
                    }
                }
                Event::Idle => {
                    let now = tokio::time::Instant::now();
                    // A request still arriving: due in full by its deadline.
                    let read_by = self
                        .codec
                        .partial_since()
                        .map(|since| tokio::time::Instant::from_std(since) + read_timeout);
                    if read_by.is_some_and(|by| by <= now) {
                        return End::SlowRequest(read_timeout);
                    }
                    let mut idle_until = last_request + idle_timeout;
                    if idle_until <= now {
                        if self.inflight.is_empty() {
                            return End::Idle;
                        }
                        idle_until = now + idle_timeout;
                    }
                    idle.as_mut()
                        .reset(idle_until.min(read_by.unwrap_or(now + read_timeout)));
                }
                Event::Request(None) => return End::ClientClosed,
                Event::Request(Some(Err(FrameError::Io(e)))) => {
                    debug!(error = %e, "client read failed");
                    return End::ClientClosed;
                }
                Event::Request(Some(Err(FrameError::NotASequence(_)))) if self.wrapped.load(Ordering::Acquire) => {
                    let opacity = match self.end_to_end.load(Ordering::Acquire) {
                        true => Opacity::EndToEndTls,
                        false => Opacity::SecurityLayer,
                    };
                    return self.tunnel(shutdown, opacity).await;
                }
                Event::Request(Some(Err(e @ FrameError::OverBudget(_)))) => return End::Overloaded(e.to_string()),
                Event::Request(Some(Err(e))) => return End::Malformed(e.to_string()),
                Event::Request(Some(Ok(len))) => {
                    self.received_at = Instant::now();
                    last_request = tokio::time::Instant::from_std(self.received_at);
                    // Lent out while the request is relayed from it.
                    let mut inbox = std::mem::take(&mut self.inbox);
                    let end = self.request(&inbox[..len], inbox.len() > len).await;
                    inbox.advance(len);
                    self.inbox = inbox;
                    if let Some(end) = end {
                        return end;
                    }
                    if !holds_whole_pdu(&self.inbox)
                        && let Some(end) = self.write_upstream().await
                    {
                        return end;
                    }
                }
            }
        }
    }

    /// Relays one client PDU (`more`: the client has sent more bytes after
    /// it); `Some` ends the session.
    async fn request(&mut self, pdu: &[u8], more: bool) -> Option<End> {
        // RFC 4511 §4.14.1: nothing follows a StartTLS request until its
        // response; here it would reach the directory's TLS as garbage.
        if let Some(id) = self.start_tls_id
            && self.inflight.occupancy(id).0
        {
            return Some(End::Malformed("a request was sent while StartTLS was pending".into()));
        }
        if let Some(checker) = &self.checker {
            checker.lock().unwrap_or_else(|e| e.into_inner()).client(pdu);
        }
        let env = match Envelope::peek(pdu) {
            Ok(env) => env,
            Err(e) => return Some(End::Malformed(format!("undecodable LDAPMessage: {e}"))),
        };
        debug!(message_id = env.message_id, op = env.op.name(), "request");
        // MessageID ::= INTEGER (0 .. maxInt) (RFC 4511 §4.1.1.1): anything
        // else cannot be answered, and directories just drop the connection.
        if !(0..=i64::from(i32::MAX)).contains(&env.message_id) {
            return Some(End::Malformed(format!(
                "message id {} is outside 0..2147483647",
                env.message_id
            )));
        }
        // RFC 4511 §4.1.1.1: a message id names one operation at a time.
        // Relaying a second one would make its response (and the first
        // one's capture) ambiguous.
        let (in_use, in_flight) = match env.op.expects_response() {
            true => self.inflight.occupancy(env.message_id),
            false => (false, 0),
        };
        self.forget_abandoned();
        if env.op.expects_response() && (in_use || self.abandoned.iter().any(|(_, id)| *id == env.message_id)) {
            return Some(End::Malformed(format!(
                "message id {} is already in use by an operation in progress",
                env.message_id
            )));
        }
        match env.op {
            Op::Unbind => {
                if let Some(upstream) = &mut self.upstream {
                    // Best effort: the directory learns the client left cleanly.
                    upstream.outgoing.extend_from_slice(pdu);
                    let _ = self.write_upstream().await;
                }
                return Some(End::Unbind);
            }
            // Without a directory connection nothing is in flight to abandon.
            Op::Abandon if self.upstream.is_none() => return None,
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
                return self.start_tls(&env, pdu, more).await;
            }
            // A password must not cross the network in clear text here.
            Op::Bind if self.listener.require_tls && !self.tls && !env.is_anonymous_bind(pdu) => {
                info!("bind refused: this listener requires TLS first");
                let why = "ldapsync: this listener requires TLS (StartTLS or ldaps://) before a bind";
                return self.refuse_bind(&env, ResultCode::ConfidentialityRequired, why).await;
            }
            Op::Bind => {
                if let Some(wait) = self.shared.failed_binds.blocked(self.peer) {
                    warn!(retry_in = ?wait, "bind refused: too many failed binds from this address");
                    let why = format!(
                        "ldapsync: too many failed binds from your address; retry in {} s",
                        wait.as_secs() + 1
                    );
                    return self.refuse_bind(&env, ResultCode::UnwillingToPerform, &why).await;
                }
            }
            _ => {}
        }
        // Abandoned operations still count: the directory may be finishing
        // them, and abandon-and-ask-again must not escape the limit.
        if env.op.expects_response() && in_flight + self.abandoned.len() >= self.settings.config.max_outstanding {
            let why = "ldapsync: too many operations outstanding on this connection";
            if env.op == Op::Bind {
                return self.refuse_bind(&env, ResultCode::Busy, why).await;
            }
            return self.refuse(&env, ResultCode::Busy, why).await;
        }
        if self.upstream.is_none() {
            let settings = Arc::clone(&self.settings);
            if let Err(end) = self.connect(&settings.route(), &env).await {
                return end;
            }
        }
        let on_success = match write_kind(env.op) {
            // Kept beyond the request buffer only for the capture sink.
            Some(kind) => OnSuccess::Capture(kind, Bytes::copy_from_slice(pdu)),
            None if env.is_sasl_bind(pdu) => OnSuccess::SaslBound,
            None => OnSuccess::Nothing,
        };
        self.send(&env, pdu, on_success);
        None
    }

    /// Opens the session's directory connection over `route`; when there
    /// is none, `Err` holds what `request` returns.
    async fn connect(&mut self, route: &upstream::Route<'_>, request: &Envelope) -> Result<(), Option<End>> {
        let connected = match (&self.shared.multiplexer, self.listener.mode) {
            (Some(multiplexer), ListenerMode::Multiplexed) => multiplexer.open(route, &self.shared.pool).await,
            _ => upstream::connect(route, &self.shared.pool).await,
        };
        match connected {
            Ok((stream, slot)) => match self.start_upstream(stream, slot, Framing::Pdus).await {
                None => Ok(()),
                Some(end) => Err(Some(end)),
            },
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
                        Some(pdu) => self.reply(pdu).await,
                        None => Some(End::UpstreamLost(diagnostic)),
                    },
                )
            }
        }
    }

    /// Queues a request for the directory connection, awaiting its
    /// response if it has one.
    fn send(&mut self, request: &Envelope, pdu: &[u8], on_success: OnSuccess) {
        if request.op.expects_response() {
            self.inflight.insert(
                request.message_id,
                Pending {
                    op: request.op,
                    started: self.received_at,
                    on_success,
                },
            );
        }
        let upstream = self.upstream.as_mut().expect("connected before a request is sent");
        upstream.outgoing.extend_from_slice(pdu);
    }

    /// Writes the requests relayed so far to the directory.
    async fn write_upstream(&mut self) -> Option<End> {
        let upstream = self.upstream.as_mut().filter(|u| !u.outgoing.is_empty())?;
        let written = within(
            self.settings.config.io_timeout,
            upstream.writer.write_all(&upstream.outgoing),
        )
        .await;
        METRICS.bytes_from_client.inc_by(upstream.outgoing.len() as u64);
        upstream.outgoing.clear();
        match written {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(End::UpstreamLost(format!("writing to the directory failed: {e}"))),
            Err(_) => Some(End::UpstreamLost("the directory stopped reading requests".into())),
        }
    }

    /// Relays the client's bytes opaquely once they are wrapped (a SASL
    /// security layer, the client's TLS with the directory); the directory
    /// side switches on its own (see `Responder::relay`).
    async fn tunnel(&mut self, shutdown: &CancellationToken, opacity: Opacity) -> End {
        self.tunneled = true;
        info!(relayed = opacity.as_str(), "relaying this session opaquely");
        if let Some(end) = self.write_upstream().await {
            return end;
        }
        self.shared.sink.capture_lost(self.id, CaptureLoss::Opaque(opacity));
        let Some(upstream) = self.upstream.as_mut() else {
            return End::ClientClosed;
        };
        let mut chunk = std::mem::take(&mut self.inbox);
        let io_timeout = self.settings.config.io_timeout;
        let idle_timeout = self.settings.config.idle_timeout;
        let mut client_at = tokio::time::Instant::now();
        loop {
            if !chunk.is_empty() {
                match within(io_timeout, upstream.writer.write_all(&chunk)).await {
                    Ok(Ok(())) => chunk.clear(),
                    Ok(Err(e)) => {
                        return End::UpstreamLost(format!("writing to the directory failed: {e}"));
                    }
                    Err(_) => {
                        return End::UpstreamLost("the directory stopped reading requests".into());
                    }
                }
            }
            let active = self.inflight.relayed_at().map_or(client_at, |at| at.max(client_at));
            tokio::select! {
                _ = shutdown.cancelled() => return End::Shutdown,
                // A directory closing an opaque session (after an unbind
                // inside it, say) is the session's end, not a lost directory.
                _ = &mut upstream.ended => return End::TunnelClosed,
                () = sleep_until(active + idle_timeout) => {
                    let active = self.inflight.relayed_at().map_or(client_at, |at| at.max(client_at));
                    if active + idle_timeout <= tokio::time::Instant::now() {
                        return End::Idle;
                    }
                }
                read = self.client.read_buf(&mut chunk) => match read {
                    Ok(0) | Err(_) => return End::ClientClosed,
                    Ok(_) => client_at = tokio::time::Instant::now(),
                },
            }
        }
    }

    /// Queues a message ldapsync itself answers with.
    async fn reply(&mut self, pdu: Bytes) -> Option<End> {
        match self.to_client.send(ToClient::Pdu(pdu)).await {
            Ok(()) => None,
            Err(_) => Some(End::ClientClosed),
        }
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
        self.refuse(request, code, why).await
    }

    /// Closes the directory connection (with an unbind), so that whatever
    /// identity it holds ends with it; writes in flight on it are reported
    /// to the capture sink as of unknown outcome.
    async fn end_directory_session(&mut self) -> Option<End> {
        let mut upstream = self.upstream.take()?;
        upstream.outgoing.extend_from_slice(&message::unbind_request());
        let unbind = upstream.writer.write_all(&upstream.outgoing);
        let _ = timeout(self.settings.config.io_timeout, unbind).await;
        if self.to_client.send(ToClient::DropUpstream).await.is_err() {
            return Some(End::ClientClosed);
        }
        outcome_unknown(&self.shared, self.id, self.inflight.abandon_all());
        None
    }

    /// Answers a request with an error instead of relaying it.
    async fn refuse(&mut self, request: &Envelope, code: ResultCode, why: &str) -> Option<End> {
        match message::error_response(request, code, why) {
            Some(pdu) => self.reply(pdu).await,
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
                Some(response) => self.reply(response).await,
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
    /// socket.
    async fn end_tls_here(&mut self, request: &Envelope) -> Option<End> {
        let Some(response) =
            message::named_extended_response(request.message_id, STARTTLS_OID, ResultCode::Success, "")
        else {
            return Some(End::Malformed("StartTLS request with an invalid message id".into()));
        };
        if let Some(end) = self.reply(response).await {
            return Some(end);
        }
        // Take the socket back from the writer once it has written the response.
        let (give, take) = oneshot::channel();
        if self.to_client.send(ToClient::Upgrade(give)).await.is_err() {
            return Some(End::ClientClosed);
        }
        let Ok((responder, write, queue)) = take.await else {
            return Some(End::ClientClosed);
        };
        let (placeholder, _) = tokio::io::split(Box::new(tokio::io::empty()) as Stream);
        let client = std::mem::replace(&mut self.client, placeholder);
        let stream = match handshake(&self.shared, &self.settings, client.unsplit(write)).await {
            Ok(stream) => stream,
            Err(reason) => return Some(End::TlsFailed(reason)),
        };
        let (read, write) = tokio::io::split(stream);
        self.client = read;
        self.responder = responder.spawn(write, queue);
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

    /// Hands the directory connection's reading side to the responder.
    async fn start_upstream(&mut self, stream: Stream, slot: Slot, framing: Framing) -> Option<End> {
        let (read, writer) = tokio::io::split(stream);
        let (report, ended) = oneshot::channel();
        let reader = DirectoryReader {
            read,
            buffer: BytesMut::new(),
            codec: PduCodec::new(self.settings.config.max_upstream_pdu),
            framing,
            noticed: false,
            report,
        };
        if self.to_client.send(ToClient::Upstream(reader)).await.is_err() {
            return Some(End::ClientClosed);
        }
        self.upstream = Some(Upstream {
            writer,
            outgoing: BytesMut::new(),
            ended,
            _slot: slot,
        });
        None
    }

    async fn close(mut self, end: End) {
        // Requests already relayed reach the directory, which may answer
        // them within the shutdown grace period.
        if !matches!(end, End::UpstreamLost(_)) {
            let _ = self.write_upstream().await;
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
                let grace = self.settings.config.shutdown_grace;
                if timeout(grace, self.inflight.wait_drained()).await.is_err() {
                    info!("operations still in flight at the end of the shutdown grace period");
                }
                Some((ResultCode::Unavailable, "ldapsync is shutting down".to_owned()))
            }
        };
        // Stop relaying directory responses before the notice, so it is last.
        if self.upstream.take().is_some() {
            let _ = self.to_client.send(ToClient::DropUpstream).await;
        }
        // Inside a SASL security layer a plain-text notice would be garbage.
        if let Some((code, reason)) = notice.filter(|_| !self.tunneled) {
            let _ = self
                .to_client
                .send(ToClient::Pdu(message::notice_of_disconnection(code, &reason)))
                .await;
        }
        drop(self.to_client);
        let _ = self.responder.await;
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

/// The length of the client's next request, whole at the start of `inbox`
/// (reading more as needed); `None` when the client closed between requests.
async fn next_request(
    client: &mut ReadHalf<Stream>,
    inbox: &mut BytesMut,
    codec: &mut PduCodec,
) -> Option<Result<usize, FrameError>> {
    loop {
        match codec.whole(inbox) {
            Ok(Some(len)) => return Some(Ok(len)),
            Ok(None) => {}
            Err(e) => return Some(Err(e)),
        }
        if inbox.len() == inbox.capacity() {
            inbox.reserve(READ_CHUNK);
        }
        match client.read_buf(inbox).await {
            Ok(0) if inbox.is_empty() => return None,
            Ok(0) => return Some(Err(FrameError::Truncated)),
            Ok(_) => {}
            Err(e) => return Some(Err(e.into())),
        }
    }
}

/// `io` within `limit`. Most writes complete at once: the timer (a clock
/// read and the runtime's timer handle, which showed in the relay's
/// profile) is set only for one that waits.
async fn within<F: Future>(limit: Duration, io: F) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut io = std::pin::pin!(io);
    if let std::task::Poll::Ready(done) = futures_util::poll!(io.as_mut()) {
        return Ok(done);
    }
    timeout(limit, io).await
}

async fn upstream_ended(upstream: &mut Option<Upstream>) -> UpstreamEnd {
    match upstream {
        Some(u) => (&mut u.ended).await.unwrap_or(UpstreamEnd::ClientGone),
        None => std::future::pending().await,
    }
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

/// The directory-to-client half of a session (see the module doc).
struct Responder {
    session: u64,
    peer: IpAddr,
    checker: Option<Arc<Mutex<Checker>>>,
    wrapped: Arc<AtomicBool>,
    end_to_end: Arc<AtomicBool>,
    shared: Arc<Shared>,
    inflight: Arc<Inflight>,
    /// A client that accepts nothing for this long is dropped.
    io_timeout: Duration,
    operations: SessionOperations,
}

/// Bytes read from either side at a time, at least.
const READ_CHUNK: usize = 8 * 1024;

/// What a PDU from the directory means for the bytes after it.
enum Seen {
    Response,
    /// A Notice of Disconnection: the directory is closing the connection.
    Notice,
    /// The bytes after it are opaque (StartTLS passed through succeeded).
    Opaque,
}

enum Next {
    Queued(Option<ToClient>),
    Read(std::io::Result<usize>),
}

/// The client's connection failed or it stopped reading.
struct ClientGone;

impl Responder {
    fn spawn(self, client: WriteHalf<Stream>, queue: mpsc::Receiver<ToClient>) -> JoinHandle<()> {
        tokio::spawn(self.run(client, queue).in_current_span())
    }

    async fn run(mut self, mut client: WriteHalf<Stream>, mut queue: mpsc::Receiver<ToClient>) {
        let mut directory: Option<DirectoryReader> = None;
        let mut captured = Vec::new();
        loop {
            let next = tokio::select! {
                // The queue first: once the session says DropUpstream,
                // nothing more from the directory reaches the client.
                biased;
                queued = queue.recv() => Next::Queued(queued),
                read = fill(&mut directory) => Next::Read(read),
            };
            match next {
                // The session is over and everything it queued is written.
                Next::Queued(None) => break,
                Next::Queued(Some(ToClient::Pdu(pdu))) => {
                    if self.write(&mut client, &pdu).await.is_err() {
                        return client_gone(directory);
                    }
                }
                Next::Queued(Some(ToClient::Upstream(reader))) => directory = Some(reader),
                Next::Queued(Some(ToClient::DropUpstream)) => directory = None,
                Next::Queued(Some(ToClient::Upgrade(give))) => {
                    let _ = give.send((self, client, queue));
                    return;
                }
                Next::Read(read) => {
                    let reader = directory
                        .as_mut()
                        .expect("only read while relaying a directory connection");
                    let (relayed, ended) = self.relay(reader, read, &mut captured);
                    // What came before the end (a Notice of Disconnection) still goes out.
                    if relayed > 0 {
                        METRICS.bytes_to_client.inc_by(relayed as u64);
                        let written = self.write(&mut client, &reader.buffer[..relayed]).await;
                        reader.buffer.advance(relayed);
                        // The writes the directory applied go to the sync core
                        // once their answers are on their way, whether or not
                        // the client is still there to read them.
                        self.hand_over(&mut captured);
                        if written.is_err() {
                            return client_gone(directory);
                        }
                    }
                    if let Some(end) = ended
                        && let Some(reader) = directory.take()
                    {
                        let _ = reader.report.send(end);
                    }
                }
            }
        }
        let _ = client.shutdown().await;
    }

    /// Takes in what one read from the directory brought. Returns how many
    /// bytes at the start of the reader's buffer go to the client (every
    /// whole PDU, framed in place; all of them once they are opaque), and
    /// `Some` when the directory connection is done.
    fn relay(
        &mut self,
        reader: &mut DirectoryReader,
        read: std::io::Result<usize>,
        captured: &mut Vec<CapturedWrite>,
    ) -> (usize, Option<UpstreamEnd>) {
        let noticed = reader.noticed;
        match read {
            Err(e) => {
                debug!(error = %e, "directory read failed");
                return (0, Some(UpstreamEnd::Closed { noticed }));
            }
            Ok(0) if reader.buffer.is_empty() || reader.framing == Framing::Opaque => {
                return (0, Some(UpstreamEnd::Closed { noticed }));
            }
            Ok(0) => return (0, Some(UpstreamEnd::Failed(FrameError::Truncated))),
            Ok(_) => {}
        }
        if reader.framing == Framing::Opaque {
            self.inflight.relayed_now();
            return (reader.buffer.len(), None);
        }
        let mut whole = 0;
        loop {
            let rest = &reader.buffer[whole..];
            match reader.codec.pdu_len(rest) {
                Ok(Some(len)) if len <= rest.len() => {
                    let seen = self.pdu(&rest[..len], captured);
                    whole += len;
                    match seen {
                        Seen::Response => {}
                        Seen::Notice => reader.noticed = true,
                        Seen::Opaque => {
                            reader.framing = Framing::Opaque;
                            return (reader.buffer.len(), None);
                        }
                    }
                }
                Ok(_) => return (whole, None),
                // The SASL bind negotiated a security layer (see `Session::tunnel`).
                Err(FrameError::NotASequence(_)) if self.wrapped.load(Ordering::Acquire) => {
                    reader.framing = Framing::Opaque;
                    return (reader.buffer.len(), None);
                }
                Err(e) => return (whole, Some(UpstreamEnd::Failed(e))),
            }
        }
    }

    /// One PDU from the directory: checked, its operation completed.
    fn pdu(&mut self, pdu: &[u8], captured: &mut Vec<CapturedWrite>) -> Seen {
        if let Some(checker) = &self.checker {
            checker.lock().unwrap_or_else(|e| e.into_inner()).directory(pdu);
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
                    && self.complete(&env, pdu, pending, captured)
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

    async fn write(&self, client: &mut WriteHalf<Stream>, bytes: &[u8]) -> Result<(), ClientGone> {
        // Flushed too: under TLS, written means encrypted and sent.
        let write = async {
            client.write_all(bytes).await?;
            client.flush().await
        };
        match within(self.io_timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                debug!(error = %e, "client write failed");
                Err(ClientGone)
            }
            Err(_) => {
                warn!("client accepted no data within the I/O timeout; dropping it");
                Err(ClientGone)
            }
        }
    }

    /// Hands the writes captured from one read to the capture sink.
    fn hand_over(&self, captured: &mut Vec<CapturedWrite>) {
        for write in captured.drain(..) {
            self.shared.sink.write_succeeded(write);
        }
    }

    /// Completes an operation; true when the directory's bytes after this
    /// response are opaque (StartTLS passed through succeeded).
    fn complete(
        &mut self,
        env: &Envelope,
        response: &[u8],
        pending: Pending,
        captured: &mut Vec<CapturedWrite>,
    ) -> bool {
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
            OnSuccess::Capture(kind, request) => captured.push(CapturedWrite {
                session: self.session,
                message_id: env.message_id,
                kind,
                request,
            }),
            OnSuccess::SaslBound => self.wrapped.store(true, Ordering::Release),
            OnSuccess::EndToEndTls => {
                // Before the response reaches the client, whose handshake follows it.
                self.end_to_end.store(true, Ordering::Release);
                self.wrapped.store(true, Ordering::Release);
                return true;
            }
        }
        false
    }
}

/// Reads more of the directory's bytes; never ready without a directory.
async fn fill(directory: &mut Option<DirectoryReader>) -> std::io::Result<usize> {
    match directory {
        Some(reader) => {
            reader.codec.reserve_read(&mut reader.buffer, READ_CHUNK);
            reader.read.read_buf(&mut reader.buffer).await
        }
        None => std::future::pending().await,
    }
}

/// Tells the session, through the directory connection's report if there
/// is one (otherwise its next queued message fails).
fn client_gone(directory: Option<DirectoryReader>) {
    if let Some(reader) = directory {
        let _ = reader.report.send(UpstreamEnd::ClientGone);
    }
}

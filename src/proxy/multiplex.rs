//! Multiplexed listeners (`mode = "multiplexed"`): many client sessions
//! share a few directory connections, bound as `proxy.multiplex.bind_dn`.
//!
//! The session above sees an ordinary directory connection: a
//! [`MuxStream`], whose writes are taken here as they are made. Each request
//! is queued on the session's shared connection (one per session, so that
//! what the directory keeps per connection — paged results' cookies — stays
//! whole) under a message id of that connection's, with a Proxied
//! Authorization control (RFC 4370) that asserts the client's identity.
//! Per shared connection, one writer task sends whatever has queued in one
//! write, and one reader task puts each response, with the client's message
//! id, where its session reads. No task stands between a session and its
//! shared connection, and no session can hold up the others: one whose
//! client leaves more than `max_unread` bytes of answers unread is closed.
//!
//! A simple bind is checked on a connection of its own and sets the
//! identity asserted from then on (a failed one leaves the session
//! anonymous, as the directory would); the session's next requests wait for
//! it. An anonymous bind is answered here once the directory has accepted
//! one in the last minute: its answer is the directory's policy, and the
//! session's operations assert the anonymous identity, which the directory
//! judges at each. A SASL bind takes the session to a dedicated connection, relayed
//! byte for byte. A request that carries its own proxied authorization is
//! refused: it would run with the shared connections' right to assert
//! anyone.
//!
//! The directory holds at most twice `connections` of ldapsync's: the
//! shared ones, and as many checking binds.
//!
//! The bytes are rewritten, not decoded: the message id and the controls
//! element are replaced, the protocolOp is copied as it came.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use rasn_ldap::ResultCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::sync::{Notify, Semaphore};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Io;
use super::ber;
use super::codec::{PduCodec, rewind};
use super::event_loop;
use super::message::{self, Envelope, Op};
use super::pool::{Pool, Slot};
use super::upstream::{self, Route, UnreachableError};
use crate::config::{LdapUrl, MultiplexConfig, Secret};
use crate::throttle::Throttle;

const PROXIED_AUTHZ_OID: &[u8] = b"2.16.840.1.113730.3.4.18";
/// Proxied Authorization v1 (draft-weltman), which some servers still take.
const PROXIED_AUTHZ_V1_OID: &[u8] = b"2.16.840.1.113730.3.4.12";
const CONTROLS: u8 = 0xa0;
/// How long the directory's acceptance of an anonymous bind is taken as
/// its policy, before the next anonymous bind is checked with it again.
const ANONYMOUS_BINDS_KNOWN: Duration = Duration::from_secs(60);
const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const BOOLEAN: u8 = 0x01;
/// A session's requests held while its bind is checked, or on their way
/// to its dedicated connection, before its writes wait; and the answers a
/// dedicated connection reads ahead of the client.
const HELD: usize = 256 * 1024;
/// Bytes read from a dedicated connection at a time.
const READ_CHUNK: usize = 8 * 1024;
/// Bytes read from a shared connection at a time (more when a PDU needs
/// it): the answers of many sessions.
const SHARED_READ: usize = 64 * 1024;

/// The shared connections and the binds' connections.
pub struct Multiplexer {
    bind_dn: String,
    password: Secret,
    shared: Vec<tokio::sync::Mutex<Option<Arc<SharedConnection>>>>,
    next: AtomicUsize,
    next_session: AtomicU64,
    /// Idle connections that check binds, one bind at a time each.
    binds: Mutex<Vec<FramedIo>>,
    /// Binds checked at once, at most: a storm of clients binding waits
    /// its turn rather than open a directory connection each.
    checking: Semaphore,
    max_pdu: usize,
    max_unread: usize,
    /// Sessions closed for reading too slowly, said at most once per interval.
    too_slow: Throttle,
    /// When the directory last accepted an anonymous bind checked here.
    anonymous_accepted: Mutex<Option<Instant>>,
}

type FramedIo = FramedRead<Box<dyn Io>, PduCodec>;

/// One shared directory connection: its queue of requests, and who waits
/// for which message id.
struct SharedConnection {
    /// Counts the connection on its URL; each session takes another.
    slot: Slot,
    /// Requests not yet written, sent together by the writer task.
    outgoing: Mutex<Outgoing>,
    queued: Notify,
    routes: Mutex<HashMap<i32, Waiting>>,
    next_id: AtomicI32,
    /// The sessions on this connection, ended when it is lost.
    sessions: Mutex<HashMap<u64, Weak<VirtualSession>>>,
    lost: CancellationToken,
}

/// Requests queued on a shared connection.
#[derive(Default)]
struct Outgoing {
    bytes: BytesMut,
    requests: usize,
}

/// What handing a response to its session needs done.
enum Routed {
    /// Wake the session once the read's other responses are handed over.
    Wake(Waker),
    /// Wake the session after the next read, or when there is none.
    WakeLater(Waker),
    /// Nothing: the session was awake, or is gone.
    Quiet,
}

/// An operation in flight on a shared connection.
struct Waiting {
    client_id: i64,
    session: Arc<VirtualSession>,
}

impl Multiplexer {
    pub fn new(config: &MultiplexConfig, password: Secret, max_pdu: usize) -> Multiplexer {
        Multiplexer {
            bind_dn: config.bind_dn.clone(),
            password,
            shared: (0..config.connections())
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
            next_session: AtomicU64::new(0),
            binds: Mutex::default(),
            checking: Semaphore::new(config.connections()),
            max_pdu,
            max_unread: config.max_unread(),
            too_slow: Throttle::new(Duration::from_secs(10)),
            anonymous_accepted: Mutex::default(),
        }
    }

    /// Whether an anonymous bind may be answered here: the directory
    /// accepted one lately. It changes nothing on the directory (the
    /// session's operations assert the anonymous identity either way), and
    /// a storm of clients that bind anonymously then waits for no bind
    /// connection.
    fn answers_anonymous_binds(&self) -> bool {
        let accepted = *self.anonymous_accepted.lock().unwrap_or_else(|e| e.into_inner());
        accepted.is_some_and(|at| at.elapsed() < ANONYMOUS_BINDS_KNOWN)
    }

    fn anonymous_bind_checked(&self, accepted: bool) {
        *self.anonymous_accepted.lock().unwrap_or_else(|e| e.into_inner()) = accepted.then(Instant::now);
    }

    /// A session's directory connection, served over the next shared
    /// connection.
    pub async fn open(
        self: &Arc<Self>,
        route: &Route<'_>,
        pool: &Arc<Pool>,
    ) -> Result<(Box<dyn Io>, Slot), UnreachableError> {
        let connection = self.shared_connection(route, pool).await?;
        let slot = connection.slot.another();
        let session = Arc::new(VirtualSession {
            id: self.next_session.fetch_add(1, Ordering::Relaxed),
            mux: Arc::clone(self),
            connection: Arc::clone(&connection),
            route: OwnedRoute::of(route),
            pool: Arc::clone(pool),
            state: Mutex::new(State {
                mode: Mode::Shared,
                control: proxied_authorization(b""),
                requests: BytesMut::new(),
                outstanding: HashMap::new(),
                answers: BytesMut::new(),
                ending: Ending::Open,
                reader: None,
                writer: None,
            }),
        });
        connection.attach(&session);
        Ok((Box::new(MuxStream(session)), slot))
    }

    /// The next shared connection, opened (again) if need be.
    async fn shared_connection(
        &self,
        route: &Route<'_>,
        pool: &Arc<Pool>,
    ) -> Result<Arc<SharedConnection>, UnreachableError> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.shared.len();
        let mut shared = self.shared[index].lock().await;
        if let Some(connection) = shared.as_ref().filter(|c| !c.lost.is_cancelled()) {
            return Ok(Arc::clone(connection));
        }
        let (stream, slot) = self
            .bound_connection(route, pool, &self.bind_dn, self.password.expose())
            .await?;
        let (reader, writer) = tokio::io::split(stream);
        let connection = Arc::new(SharedConnection {
            slot,
            outgoing: Mutex::default(),
            queued: Notify::new(),
            routes: Mutex::default(),
            next_id: AtomicI32::new(1),
            sessions: Mutex::default(),
            lost: CancellationToken::new(),
        });
        event_loop::spawn(Arc::clone(&connection).read(reader, PduCodec::new(self.max_pdu)));
        event_loop::spawn(Arc::clone(&connection).write(writer));
        info!(
            index,
            url = connection.slot.url(),
            "multiplexed: shared directory connection open"
        );
        *shared = Some(Arc::clone(&connection));
        Ok(connection)
    }

    /// A directory connection bound as `dn`, with its slot.
    async fn bound_connection(
        &self,
        route: &Route<'_>,
        pool: &Arc<Pool>,
        dn: &str,
        password: &str,
    ) -> Result<(Box<dyn Io>, Slot), UnreachableError> {
        let (stream, slot) = upstream::connect(route, pool).await?;
        let mut framed = FramedRead::new(stream, PduCodec::new(self.max_pdu));
        let bind = message::simple_bind_request(1, dn, password);
        match exchange(&mut framed, &bind).await {
            Some(response) if result_code(&response) == Some(0) => Ok((framed.into_inner(), slot)),
            answer => {
                let code = answer.as_deref().and_then(result_code);
                let why = format!("the multiplexed identity's bind was refused (result code {code:?})");
                Err(UnreachableError::refused(slot.url(), why))
            }
        }
    }

    /// Checks a client's bind on a connection of the binds' (message id
    /// rewritten); the directory's response, with the client's id.
    async fn check_bind(&self, route: &Route<'_>, pool: &Arc<Pool>, pdu: &Bytes, client_id: i64) -> Option<Bytes> {
        let _turn = self.checking.acquire().await.ok()?;
        let idle = self.binds.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut framed = match idle {
            Some(framed) => framed,
            None => {
                let (stream, slot) = upstream::connect(route, pool).await.ok()?;
                drop(slot);
                FramedRead::new(stream, PduCodec::new(self.max_pdu))
            }
        };
        let request = rewrite(pdu, 1, None)?;
        let response = exchange(&mut framed, &request).await?;
        // The connection is whole again: the next bind may use it.
        let mut binds = self.binds.lock().unwrap_or_else(|e| e.into_inner());
        if binds.len() < self.shared.len() {
            binds.push(framed);
        }
        drop(binds);
        rewrite(&response, client_id, None)
    }
}

/// Writes `request` and reads until the response with its message id.
async fn exchange(framed: &mut FramedIo, request: &[u8]) -> Option<Bytes> {
    framed.get_mut().write_all(request).await.ok()?;
    while let Some(frame) = framed.next().await {
        let pdu = frame.ok()?;
        if Envelope::peek(&pdu).ok()?.message_id == 1 {
            return Some(pdu);
        }
    }
    None
}

fn result_code(pdu: &[u8]) -> Option<i64> {
    Envelope::peek(pdu).ok()?.result_code(pdu)
}

/// What a session needs to open a dedicated connection later.
struct OwnedRoute {
    urls: Vec<LdapUrl>,
    connect_timeout: std::time::Duration,
    tls: Option<tokio_rustls::TlsConnector>,
    starttls: bool,
    options: Vec<(usize, usize)>,
    balance: crate::config::Balance,
}

impl OwnedRoute {
    fn of(route: &Route<'_>) -> OwnedRoute {
        OwnedRoute {
            urls: route.urls.to_vec(),
            connect_timeout: route.connect_timeout,
            tls: route.tls.cloned(),
            starttls: route.starttls,
            options: route.options.to_vec(),
            balance: route.balance,
        }
    }

    fn route(&self) -> Route<'_> {
        Route {
            urls: &self.urls,
            connect_timeout: self.connect_timeout,
            tls: self.tls.as_ref(),
            starttls: self.starttls,
            options: &self.options,
            balance: self.balance,
        }
    }
}

impl SharedConnection {
    fn attach(&self, session: &Arc<VirtualSession>) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(session.id, Arc::downgrade(session));
        // Lost while the session was being made: it ends as the others did.
        if self.lost.is_cancelled() {
            session.lost();
        }
    }

    /// Routes each response to the session waiting for it; when the
    /// connection ends, so do its sessions.
    ///
    /// A session is woken once the responses of a read are all handed
    /// over. When all it got was part of an operation's answer (a search's
    /// entry) and the read brought others' too, it is woken one read
    /// later, or as soon as nothing more is there to read: the directory
    /// writes an entry and its search's result apart, and a client sent
    /// both at once costs one write instead of two. A read of one response
    /// says the connection is quiet: nothing is worth waiting for.
    async fn read(self: Arc<Self>, mut from: ReadHalf<Box<dyn Io>>, codec: PduCodec) {
        let lost = self.lost.clone();
        let lost = lost.cancelled();
        tokio::pin!(lost);
        let mut buffer = BytesMut::new();
        let mut woken = Vec::new();
        let (mut later, mut held) = (Vec::new(), Vec::new());
        let why = 'reading: loop {
            buffer.reserve(SHARED_READ);
            let read = match from.read_buf(&mut buffer).now_or_never() {
                Some(read) => read,
                None => {
                    held.drain(..).for_each(Waker::wake);
                    tokio::select! {
                        biased;
                        read = from.read_buf(&mut buffer) => read,
                        () = &mut lost => return,
                    }
                }
            };
            match read {
                Ok(0) => break "the directory closed it".to_owned(),
                Ok(_) => {}
                Err(e) => break e.to_string(),
            }
            let (mut taken, mut responses) = (0, 0);
            loop {
                let len = match codec.pdu_len(&buffer[taken..]) {
                    Ok(Some(len)) if taken + len <= buffer.len() => len,
                    Ok(_) => break,
                    Err(e) => break 'reading format!("it sent an unreadable PDU: {e}"),
                };
                let pdu = &buffer[taken..taken + len];
                taken += len;
                responses += 1;
                match self.route(pdu) {
                    Some(Routed::Wake(waker)) => woken.push(waker),
                    Some(Routed::WakeLater(waker)) => later.push(waker),
                    Some(Routed::Quiet) => {}
                    None => break 'reading "it sent a Notice of Disconnection".to_owned(),
                }
            }
            buffer.advance(taken);
            rewind(&mut buffer);
            if responses == 1 {
                woken.append(&mut later);
            }
            woken.drain(..).chain(held.drain(..)).for_each(Waker::wake);
            std::mem::swap(&mut held, &mut later);
        };
        woken.into_iter().chain(held).chain(later).for_each(Waker::wake);
        warn!(
            url = self.slot.url(),
            %why,
            "multiplexed: a shared directory connection is lost; its sessions end"
        );
        self.lose();
    }

    /// Hands one response to the session waiting for it; `None` when the
    /// directory is closing the connection.
    fn route(&self, pdu: &[u8]) -> Option<Routed> {
        let Ok(env) = Envelope::peek(pdu) else {
            return Some(Routed::Quiet);
        };
        if env.message_id == 0 {
            // A Notice of Disconnection: the directory is closing it.
            return None;
        }
        let id = i32::try_from(env.message_id).ok();
        let last = env.op.is_final_response();
        let waiting = id.and_then(|id| {
            let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            match last {
                true => routes.remove(&id).map(|w| (w.session, w.client_id)),
                false => routes.get(&id).map(|w| (Arc::clone(&w.session), w.client_id)),
            }
        });
        match (waiting, parts(pdu)) {
            (Some((session, client_id)), Some(parts)) => Some(session.deliver(&parts, client_id, last)),
            _ => {
                debug!(id, "multiplexed: a response for an operation no session waits for");
                Some(Routed::Quiet)
            }
        }
    }

    /// Sends what the sessions queued, as much as has queued at a time.
    async fn write(self: Arc<Self>, mut writer: WriteHalf<Box<dyn Io>>) {
        let mut batch = Outgoing::default();
        // The last write carried several requests: sessions are sending
        // at once, and waiting for the others to run costs little.
        let mut crowded = false;
        loop {
            std::mem::swap(
                &mut batch,
                &mut *self.outgoing.lock().unwrap_or_else(|e| e.into_inner()),
            );
            if batch.requests == 0 {
                tokio::select! {
                    () = self.queued.notified() => {}
                    () = self.lost.cancelled() => return,
                }
                if crowded {
                    // The sessions that are ready to run add their
                    // requests first: one write carries them all.
                    tokio::task::yield_now().await;
                }
                continue;
            }
            if let Err(e) = writer.write_all(&batch.bytes).await {
                warn!(url = self.slot.url(), error = %e, "multiplexed: writing to a shared directory connection failed");
                break;
            }
            crowded = batch.requests > 1;
            batch.bytes.clear();
            batch.requests = 0;
        }
        self.lose();
    }

    /// Appends to the requests not yet written, waking the writer when it
    /// may be waiting.
    fn queue(&self, append: impl FnOnce(&mut BytesMut)) {
        let mut outgoing = self.outgoing.lock().unwrap_or_else(|e| e.into_inner());
        let was_empty = outgoing.requests == 0;
        append(&mut outgoing.bytes);
        outgoing.requests += 1;
        drop(outgoing);
        if was_empty {
            self.queued.notify_one();
        }
    }

    /// The connection is gone: its sessions end (those on dedicated
    /// connections go on).
    fn lose(&self) {
        if self.lost.is_cancelled() {
            return;
        }
        self.lost.cancel();
        let waiting = std::mem::take(&mut *self.routes.lock().unwrap_or_else(|e| e.into_inner()));
        drop(waiting);
        let sessions = std::mem::take(&mut *self.sessions.lock().unwrap_or_else(|e| e.into_inner()));
        for session in sessions.into_values().filter_map(|s| s.upgrade()) {
            session.lost();
        }
    }

    /// A message id of this connection's that no operation uses.
    fn next_id(&self, routes: &HashMap<i32, Waiting>) -> i32 {
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id <= 0 {
                // Wrapped past i32::MAX: start again at 1.
                self.next_id.store(1, Ordering::Relaxed);
                continue;
            }
            if !routes.contains_key(&id) {
                return id;
            }
        }
    }

    /// Abandons the operation with message id `shared`: its answers, if
    /// any still come, go nowhere.
    fn abandon(&self, shared: i32) {
        let (id, waiting) = {
            let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            let waiting = routes.remove(&shared);
            (self.next_id(&routes), waiting)
        };
        // Dropped outside the lock: it may be the session's last reference.
        drop(waiting);
        self.queue(|out| abandon_request(out, id, shared));
    }
}

/// A client session's directory connection, as the session above sees it.
pub struct MuxStream(Arc<VirtualSession>);

/// One client session on a shared connection.
struct VirtualSession {
    id: u64,
    mux: Arc<Multiplexer>,
    connection: Arc<SharedConnection>,
    /// Where a bind is checked, or a dedicated connection opened.
    route: OwnedRoute,
    pool: Arc<Pool>,
    state: Mutex<State>,
}

struct State {
    mode: Mode,
    /// The Proxied Authorization control asserting the client's identity
    /// (`dn:…`, or empty for anonymous).
    control: Vec<u8>,
    /// The client's bytes not taken yet: part of a PDU, requests held
    /// while a bind is checked, or bytes for a dedicated connection.
    requests: BytesMut,
    /// Operations in flight: client message id → shared message id.
    outstanding: HashMap<i64, i32>,
    /// Answers for the client not read yet.
    answers: BytesMut,
    ending: Ending,
    /// The session waiting for answers.
    reader: Option<Waker>,
    /// The session waiting to hand over requests.
    writer: Option<Waker>,
}

/// Where a session's requests go.
enum Mode {
    /// On its shared connection.
    Shared,
    /// Held until the bind being checked is answered.
    Binding,
    /// To a connection of its own, after a SASL bind; its task is woken
    /// by this when there are requests to send or room for answers.
    Dedicated(Arc<Notify>),
    /// Nowhere: the session unbound, or its connection is gone.
    Closed,
}

/// How the answers end, once read.
enum Ending {
    Open,
    /// As a closed connection.
    Eof,
    /// The client left more than `max_unread` bytes unread.
    TooSlow,
}

impl VirtualSession {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the whole requests at the start of `written` while the
    /// session is on its shared connection; how many bytes it took.
    fn take(self: &Arc<Self>, state: &mut State, written: &[u8]) -> usize {
        let mut taken = 0;
        while matches!(state.mode, Mode::Shared) {
            let rest = &written[taken..];
            let len = match ber::read_header(rest) {
                Ok(Some(header)) if rest.len() >= header.total_len() => header.total_len(),
                Ok(_) => break,
                // The session above frames what it writes: this is not LDAP.
                Err(_) => {
                    self.end(state, Ending::Eof);
                    break;
                }
            };
            self.request(state, &rest[..len]);
            taken += len;
        }
        taken
    }

    /// Takes the requests held while the session was not on its shared
    /// connection (a bind was being checked).
    fn take_held(self: &Arc<Self>, state: &mut State) {
        if !matches!(state.mode, Mode::Shared) {
            return;
        }
        let held = std::mem::take(&mut state.requests);
        let taken = self.take(state, &held);
        state.requests.extend_from_slice(&held[taken..]);
    }

    fn request(self: &Arc<Self>, state: &mut State, pdu: &[u8]) {
        let (Ok(env), Some(parts)) = (Envelope::peek(pdu), parts(pdu)) else {
            return self.end(state, Ending::Eof);
        };
        match env.op {
            Op::Unbind => self.end(state, Ending::Eof),
            Op::Bind if env.is_sasl_bind(pdu) => {
                let wake = Arc::new(Notify::new());
                state.mode = Mode::Dedicated(Arc::clone(&wake));
                event_loop::spawn(Arc::clone(self).dedicated(Bytes::copy_from_slice(pdu), wake));
            }
            Op::Bind => {
                let anonymous = plain_anonymous_bind(&env, pdu, &parts);
                if anonymous && self.mux.answers_anonymous_binds() {
                    state.control = proxied_authorization(&[]);
                    let accepted = message::success_response(&env).unwrap_or_default();
                    return self.answer(state, &accepted);
                }
                state.mode = Mode::Binding;
                event_loop::spawn(Arc::clone(self).bind(Bytes::copy_from_slice(pdu), env, anonymous));
            }
            Op::Abandon => {
                if let Some(shared) = env.abandoned_id(pdu).and_then(|t| state.outstanding.remove(&t)) {
                    self.connection.abandon(shared);
                }
            }
            _ if asserts_identity(&parts) => {
                let refused = refusal(
                    &env,
                    ResultCode::UnwillingToPerform,
                    "ldapsync: a multiplexed listener asserts the client's identity itself; \
                     proxied authorization from the client needs a transparent listener",
                );
                self.answer(state, &refused);
            }
            _ => self.relay(state, &env, &parts),
        }
    }

    /// Queues one request on the shared connection, as the client.
    fn relay(self: &Arc<Self>, state: &mut State, env: &Envelope, parts: &Parts<'_>) {
        let id = {
            let mut routes = self.connection.routes.lock().unwrap_or_else(|e| e.into_inner());
            let id = self.connection.next_id(&routes);
            if env.op.expects_response() {
                let session = Arc::clone(self);
                routes.insert(
                    id,
                    Waiting {
                        client_id: env.message_id,
                        session,
                    },
                );
                state.outstanding.insert(env.message_id, id);
            }
            id
        };
        self.connection
            .queue(|out| rewrite_into(out, parts, i64::from(id), Some(&state.control)));
    }

    /// Checks a simple bind; its answer sets the identity the requests
    /// held meanwhile, and those after, are made with. The answer to a
    /// plain `anonymous` one is also the directory's policy for the next.
    async fn bind(self: Arc<Self>, pdu: Bytes, env: Envelope, anonymous: bool) {
        let answer = self
            .mux
            .check_bind(&self.route.route(), &self.pool, &pdu, env.message_id)
            .await;
        let answer = answer.unwrap_or_else(|| {
            refusal(
                &env,
                ResultCode::Unavailable,
                "ldapsync: the directory cannot check binds now",
            )
        });
        let accepted = result_code(&answer) == Some(0);
        if anonymous {
            self.mux.anonymous_bind_checked(accepted);
        }
        // A failed bind leaves the session anonymous, as on the directory.
        let identity = env
            .bind_name(&pdu)
            .filter(|name| accepted && !name.is_empty())
            .map_or_else(Vec::new, |name| [b"dn:", name].concat());
        let mut state = self.state();
        if !matches!(state.mode, Mode::Binding) {
            return;
        }
        state.control = proxied_authorization(&identity);
        self.answer(&mut state, &answer);
        state.mode = Mode::Shared;
        self.take_held(&mut state);
        if let Some(writer) = state.writer.take() {
            writer.wake();
        }
    }

    /// The rest of the session, from its SASL bind, over a directory
    /// connection of its own, byte for byte.
    async fn dedicated(self: Arc<Self>, bind: Bytes, wake: Arc<Notify>) {
        let Ok((stream, _slot)) = upstream::connect(&self.route.route(), &self.pool).await else {
            let mut state = self.state();
            if let Ok(env) = Envelope::peek(&bind) {
                let refused = refusal(&env, ResultCode::Unavailable, "ldapsync: no directory server reachable");
                self.answer(&mut state, &refused);
            }
            return self.end(&mut state, Ending::Eof);
        };
        info!("multiplexed: a SASL bind takes this session to a directory connection of its own");
        let (mut from, mut to) = tokio::io::split(stream);
        let mut sending = BytesMut::from(&bind[..]);
        let mut read = BytesMut::new();
        loop {
            let room = {
                let mut state = self.state();
                if matches!(state.mode, Mode::Closed) {
                    return;
                }
                sending.extend_from_slice(&state.requests.split());
                if let Some(writer) = state.writer.take() {
                    writer.wake();
                }
                state.answers.len() < HELD
            };
            if !sending.is_empty() {
                if to.write_all(&sending).await.is_err() {
                    break;
                }
                sending.clear();
                continue;
            }
            read.reserve(READ_CHUNK);
            tokio::select! {
                () = wake.notified() => {}
                n = from.read_buf(&mut read), if room => {
                    if !matches!(n, Ok(1..)) {
                        break;
                    }
                    let mut state = self.state();
                    self.answer(&mut state, &read.split());
                }
            }
        }
        self.end(&mut self.state(), Ending::Eof);
    }

    /// A response from the shared connection, for the client.
    fn deliver(&self, parts: &Parts<'_>, client_id: i64, last: bool) -> Routed {
        let mut state = self.state();
        if last {
            state.outstanding.remove(&client_id);
        }
        if !matches!(state.ending, Ending::Open) {
            return Routed::Quiet;
        }
        // One answer always fits, however large: the limit is on what
        // piles up behind it.
        if !state.answers.is_empty() && state.answers.len() + parts.len > self.mux.max_unread {
            if let Some(held_back) = self.mux.too_slow.allow() {
                warn!(
                    max_unread = self.mux.max_unread,
                    held_back, "multiplexed: a client reads its answers too slowly; its session is closed"
                );
            }
            self.end(&mut state, Ending::TooSlow);
            return Routed::Quiet;
        }
        rewrite_into(&mut state.answers, parts, client_id, None);
        match (state.reader.take(), last) {
            (Some(reader), true) => Routed::Wake(reader),
            (Some(reader), false) => Routed::WakeLater(reader),
            (None, _) => Routed::Quiet,
        }
    }

    /// An answer ldapsync gives itself, or the checked bind's.
    fn answer(&self, state: &mut State, pdu: &[u8]) {
        state.answers.extend_from_slice(pdu);
        if let Some(reader) = state.reader.take() {
            reader.wake();
        }
    }

    /// Its shared connection is lost: the session ends, unless it has a
    /// connection of its own.
    fn lost(&self) {
        let mut state = self.state();
        if !matches!(state.mode, Mode::Dedicated(_)) {
            self.end(&mut state, Ending::Eof);
        }
    }

    /// No more requests are taken; what was in flight is abandoned, and the
    /// answers end as `ending` says once those already here are read (at
    /// once, when the client is too slow to read them).
    fn end(&self, state: &mut State, ending: Ending) {
        for (_, shared) in state.outstanding.drain() {
            self.connection.abandon(shared);
        }
        if let Mode::Dedicated(wake) = std::mem::replace(&mut state.mode, Mode::Closed) {
            wake.notify_one();
        }
        if matches!(ending, Ending::TooSlow) {
            state.answers = BytesMut::new();
        }
        if matches!(state.ending, Ending::Open) {
            state.ending = ending;
        }
        for waker in [state.reader.take(), state.writer.take()].into_iter().flatten() {
            waker.wake();
        }
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let session = &self.0;
        let mut state = session.state();
        match &state.mode {
            Mode::Closed => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            Mode::Binding | Mode::Dedicated(_) if state.requests.len() >= HELD => {
                state.writer = Some(cx.waker().clone());
                return Poll::Pending;
            }
            _ => {}
        }
        // Requests are taken from where the session wrote them when
        // nothing is held before them.
        if matches!(state.mode, Mode::Shared) && state.requests.is_empty() {
            let taken = session.take(&mut state, buf);
            state.requests.extend_from_slice(&buf[taken..]);
        } else {
            state.requests.extend_from_slice(buf);
            session.take_held(&mut state);
        }
        if let Mode::Dedicated(wake) = &state.mode {
            wake.notify_one();
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut state = self.0.state();
        if !state.answers.is_empty() {
            let n = buf.remaining().min(state.answers.len());
            buf.put_slice(&state.answers[..n]);
            state.answers.advance(n);
            rewind(&mut state.answers);
            if let Mode::Dedicated(wake) = &state.mode {
                wake.notify_one();
            }
            return Poll::Ready(Ok(()));
        }
        match state.ending {
            Ending::Open => {
                if !state.reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    state.reader = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Ending::Eof => Poll::Ready(Ok(())),
            Ending::TooSlow => Poll::Ready(Err(io::Error::other(
                "the client read its answers too slowly for a multiplexed listener",
            ))),
        }
    }
}

impl Drop for MuxStream {
    /// The session is over: what it left in flight is abandoned.
    fn drop(&mut self) {
        let session = &self.0;
        session.end(&mut session.state(), Ending::Eof);
        session
            .connection
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&session.id);
    }
}

/// A response ldapsync makes itself for `request`.
fn refusal(request: &Envelope, code: ResultCode, diagnostic: &str) -> Bytes {
    message::error_response(request, code, diagnostic).unwrap_or_default()
}

/// An LDAPv3 anonymous bind without controls: the one bind whose outcome
/// depends on the directory's policy alone.
fn plain_anonymous_bind(env: &Envelope, pdu: &[u8], parts: &Parts<'_>) -> bool {
    parts.controls.is_none() && env.bind_version(pdu) == Some(3) && env.is_anonymous_bind(pdu)
}

/// Whether a request carries a proxied authorization control of its own.
fn asserts_identity(parts: &Parts<'_>) -> bool {
    let Some(controls) = parts.controls else {
        return false;
    };
    let mut rest = controls;
    while let Ok((header, control)) = ber::read_element(rest) {
        if let Ok((oid_header, oid)) = ber::read_element(control)
            && oid_header.tag == OCTET_STRING
            && (oid == PROXIED_AUTHZ_OID || oid == PROXIED_AUTHZ_V1_OID)
        {
            return true;
        }
        rest = &rest[header.total_len()..];
    }
    false
}

/// An LDAPMessage's protocolOp element and its controls' contents.
struct Parts<'a> {
    /// The whole PDU's length.
    len: usize,
    op: &'a [u8],
    controls: Option<&'a [u8]>,
}

fn parts(pdu: &[u8]) -> Option<Parts<'_>> {
    let (_, body) = ber::read_element(pdu).ok()?;
    let (id, _) = ber::read_element(body).ok()?;
    let rest = body.get(id.total_len()..)?;
    let (op, _) = ber::read_element(rest).ok()?;
    let after = rest.get(op.total_len()..)?;
    let controls = match ber::read_element(after) {
        Ok((header, contents)) if header.tag == CONTROLS => Some(contents),
        _ => None,
    };
    Some(Parts {
        len: pdu.len(),
        op: &rest[..op.total_len()],
        controls,
    })
}

/// The PDU with message id `id`, and `control` added to its controls.
fn rewrite(pdu: &[u8], id: i64, control: Option<&[u8]>) -> Option<Bytes> {
    let parts = parts(pdu)?;
    let mut out = BytesMut::with_capacity(pdu.len() + control.map_or(0, <[u8]>::len) + 8);
    rewrite_into(&mut out, &parts, id, control);
    Some(out.freeze())
}

/// Appends `parts` as a PDU with message id `id`, and `control` added to
/// its controls, to `out`: written in place, lengths first, so that a
/// request or response is copied once.
fn rewrite_into(out: &mut BytesMut, parts: &Parts<'_>, id: i64, control: Option<&[u8]>) {
    let id = Integer::new(id);
    let id_octets = id.octets();
    let controls = parts.controls.map_or(0, <[u8]>::len) + control.map_or(0, <[u8]>::len);
    let has_controls = parts.controls.is_some() || control.is_some();
    let body = tlv_len(id_octets.len()) + parts.op.len() + if has_controls { tlv_len(controls) } else { 0 };
    out.reserve(tlv_len(body));
    put_header(out, SEQUENCE, body);
    put_tlv(out, INTEGER, id_octets);
    out.extend_from_slice(parts.op);
    if has_controls {
        put_header(out, CONTROLS, controls);
        out.extend_from_slice(parts.controls.unwrap_or_default());
        out.extend_from_slice(control.unwrap_or_default());
    }
}

/// The Proxied Authorization control (RFC 4370), critical: a directory
/// that does not honour it refuses the operation rather than run it as
/// the shared connections' identity.
fn proxied_authorization(identity: &[u8]) -> Vec<u8> {
    let mut contents = BytesMut::new();
    put_tlv(&mut contents, OCTET_STRING, PROXIED_AUTHZ_OID);
    put_tlv(&mut contents, BOOLEAN, &[0xff]);
    put_tlv(&mut contents, OCTET_STRING, identity);
    let mut control = BytesMut::new();
    put_tlv(&mut control, SEQUENCE, &contents);
    control.to_vec()
}

/// Appends an AbandonRequest with message id `id` for `target` to `out`.
fn abandon_request(out: &mut BytesMut, id: i32, target: i32) {
    let (id, target) = (Integer::new(i64::from(id)), Integer::new(i64::from(target)));
    let (id, target) = (id.octets(), target.octets());
    put_header(out, SEQUENCE, tlv_len(id.len()) + tlv_len(target.len()));
    put_tlv(out, INTEGER, id);
    // [APPLICATION 16] MessageID: the INTEGER's contents under the op's tag.
    put_tlv(out, 0x50, target);
}

/// A tag and the length of `len` octets of contents, in the fewest octets.
fn put_header(out: &mut BytesMut, tag: u8, len: usize) {
    out.put_u8(tag);
    if len < 0x80 {
        out.put_u8(len as u8);
    } else {
        let octets = len.to_be_bytes();
        let skip = octets.iter().take_while(|b| **b == 0).count();
        out.put_u8(0x80 | (octets.len() - skip) as u8);
        out.extend_from_slice(&octets[skip..]);
    }
}

fn put_tlv(out: &mut BytesMut, tag: u8, contents: &[u8]) {
    put_header(out, tag, contents.len());
    out.extend_from_slice(contents);
}

/// An element's whole length, `len` octets of contents with their header.
fn tlv_len(len: usize) -> usize {
    let length_octets = match len {
        0..0x80 => 1,
        _ => 1 + (usize::BITS - len.leading_zeros()).div_ceil(8) as usize,
    };
    1 + length_octets + len
}

/// A non-negative INTEGER's contents, in the fewest octets.
struct Integer([u8; 8], usize);

impl Integer {
    fn new(value: i64) -> Integer {
        let octets = value.to_be_bytes();
        let mut skip = 0;
        while skip < 7 && octets[skip] == 0 && octets[skip + 1] & 0x80 == 0 {
            skip += 1;
        }
        Integer(octets, skip)
    }

    fn octets(&self) -> &[u8] {
        &self.0[self.1..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn search(id: u8, controls: &[u8]) -> Vec<u8> {
        // SearchRequest-shaped op: only its bytes matter here.
        let op = [0x63, 0x03, 0x04, 0x01, b'x'];
        let mut body = vec![INTEGER, 0x01, id];
        body.extend_from_slice(&op);
        body.extend_from_slice(controls);
        let mut pdu = vec![SEQUENCE, body.len() as u8];
        pdu.extend(body);
        pdu
    }

    #[test]
    fn a_rewritten_request_keeps_its_operation_takes_the_new_id_and_adds_the_control() {
        let pdu = search(7, &[]);
        let control = proxied_authorization(b"dn:uid=alice,ou=people,dc=example,dc=com");
        let rewritten = rewrite(&pdu, 300, Some(&control)).unwrap();
        let env = Envelope::peek(&rewritten).unwrap();
        assert_eq!(env.message_id, 300);
        let p = parts(&rewritten).unwrap();
        assert_eq!(p.op, &pdu[5..]);
        assert_eq!(p.controls.unwrap(), &control[..]);
        assert!(asserts_identity(&parts(&rewritten).unwrap()));
        // And back: the client's id, its bytes otherwise as they were.
        let back = rewrite(&search(1, &[]), 7, None).unwrap();
        assert_eq!(&back[..], &pdu[..]);
    }

    #[test]
    fn a_clients_own_controls_are_kept_and_its_proxied_authorization_is_seen() {
        let mut own = BytesMut::new();
        put_tlv(&mut own, SEQUENCE, &[OCTET_STRING, 3, b'1', b'.', b'2']);
        let mut controls = BytesMut::new();
        put_tlv(&mut controls, CONTROLS, &own);
        let pdu = search(9, &controls);
        assert!(!asserts_identity(&parts(&pdu).unwrap()));
        let rewritten = rewrite(&pdu, 1, Some(&proxied_authorization(b""))).unwrap();
        let p = parts(&rewritten).unwrap();
        assert!(p.controls.unwrap().starts_with(&own));
        let mut theirs = BytesMut::new();
        put_tlv(&mut theirs, CONTROLS, &proxied_authorization(b"dn:cn=admin"));
        assert!(asserts_identity(&parts(&search(3, &theirs)).unwrap()));
    }

    #[test]
    fn integers_and_lengths_are_encoded_in_the_fewest_octets() {
        for (value, encoded) in [
            (0, vec![2, 1, 0]),
            (127, vec![2, 1, 127]),
            (128, vec![2, 2, 0, 128]),
            (i64::from(i32::MAX), vec![2, 4, 0x7f, 0xff, 0xff, 0xff]),
        ] {
            let mut out = BytesMut::new();
            put_tlv(&mut out, INTEGER, Integer::new(value).octets());
            assert_eq!(&out[..], &encoded[..], "{value}");
        }
        let mut out = BytesMut::new();
        put_tlv(&mut out, OCTET_STRING, &[0; 300]);
        assert_eq!(&out[..4], &[OCTET_STRING, 0x82, 0x01, 0x2c]);
        for len in [0, 1, 127, 128, 255, 256, 65_535, 65_536, 1 << 24] {
            let mut out = BytesMut::new();
            put_tlv(&mut out, OCTET_STRING, &vec![0; len]);
            assert_eq!(out.len(), tlv_len(len), "{len}");
        }
        let mut abandon = BytesMut::new();
        abandon_request(&mut abandon, 5, 300);
        let env = Envelope::peek(&abandon).unwrap();
        assert_eq!((env.message_id, env.abandoned_id(&abandon)), (5, Some(300)));
    }
}

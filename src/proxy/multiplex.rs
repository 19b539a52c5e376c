//! Multiplexed listeners (`mode = "multiplexed"`): many client sessions
//! share a few directory connections, bound as `proxy.multiplex.bind_dn`.
//!
//! The session above sees an ordinary directory connection: the other end
//! of an in-memory pipe, served here. Each request it writes is sent on the
//! session's shared connection (one per session, so that what the directory
//! keeps per connection — paged results' cookies — stays whole) under a
//! message id of that connection's, with a Proxied Authorization control
//! (RFC 4370) that asserts the client's identity; each response comes back
//! with the client's message id. A simple bind is checked on a connection
//! of its own and sets the identity asserted from then on (a failed one
//! leaves the session anonymous, as the directory would). A SASL bind takes
//! the session to a dedicated connection, relayed byte for byte. A request
//! that carries its own proxied authorization is refused: it would run with
//! the shared connections' right to assert anyone.
//!
//! The directory holds at most twice `connections` of ldapsync's: the
//! shared ones, and as many checking binds.
//!
//! The bytes are rewritten, not decoded: the message id and the controls
//! element are replaced, the protocolOp is copied as it came.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use rasn_ldap::ResultCode;
use tokio::io::{AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Io;
use super::ber;
use super::codec::PduCodec;
use super::message::{self, Envelope, Op};
use super::pool::{Pool, Slot};
use super::upstream::{self, Route, UnreachableError};
use crate::config::{LdapUrl, MultiplexConfig, Secret};

const PROXIED_AUTHZ_OID: &[u8] = b"2.16.840.1.113730.3.4.18";
/// Proxied Authorization v1 (draft-weltman), which some servers still take.
const PROXIED_AUTHZ_V1_OID: &[u8] = b"2.16.840.1.113730.3.4.12";
const CONTROLS: u8 = 0xa0;
const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const BOOLEAN: u8 = 0x01;
/// The pipe between a session and its end here.
const PIPE: usize = 256 * 1024;
/// Responses queued for one session before its shared connection waits.
const SESSION_QUEUE: usize = 256;

/// The shared connections and the binds' connections.
pub struct Multiplexer {
    bind_dn: String,
    password: Secret,
    shared: Vec<tokio::sync::Mutex<Option<Arc<SharedConnection>>>>,
    next: AtomicUsize,
    /// Idle connections that check binds, one bind at a time each.
    binds: Mutex<Vec<FramedIo>>,
    /// Binds checked at once, at most: a storm of clients binding waits
    /// its turn rather than open a directory connection each.
    checking: Semaphore,
    max_pdu: usize,
}

type FramedIo = FramedRead<Box<dyn Io>, PduCodec>;

/// One shared directory connection: who waits for which message id.
struct SharedConnection {
    /// Counts the connection on its URL; each session takes another.
    slot: Slot,
    writer: tokio::sync::Mutex<WriteHalf<Box<dyn Io>>>,
    routes: Mutex<HashMap<i32, Waiting>>,
    next_id: AtomicI32,
    /// Cancelled when the connection is lost: its sessions end.
    lost: CancellationToken,
}

/// An operation in flight on a shared connection.
struct Waiting {
    client_id: i64,
    to: mpsc::Sender<Bytes>,
    /// The session's own map of its operations in flight (client id →
    /// shared id), cleared as they finish.
    outstanding: Arc<Mutex<HashMap<i64, i32>>>,
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
            binds: Mutex::default(),
            checking: Semaphore::new(config.connections()),
            max_pdu,
        }
    }

    /// A session's directory connection: the near end of a pipe whose far
    /// end is served here, over the next shared connection.
    pub async fn open(
        self: &Arc<Self>,
        route: &Route<'_>,
        pool: &Arc<Pool>,
    ) -> Result<(Box<dyn Io>, Slot), UnreachableError> {
        let connection = self.shared_connection(route, pool).await?;
        let slot = connection.slot.another();
        let (near, far) = tokio::io::duplex(PIPE);
        let session = VirtualSession {
            mux: Arc::clone(self),
            connection,
            identity: Vec::new(),
            outstanding: Arc::default(),
        };
        let route = OwnedRoute::of(route);
        let pool = Arc::clone(pool);
        tokio::spawn(session.serve(far, route, pool));
        Ok((Box::new(near), slot))
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
            writer: tokio::sync::Mutex::new(writer),
            routes: Mutex::default(),
            next_id: AtomicI32::new(1),
            lost: CancellationToken::new(),
        });
        tokio::spawn(Arc::clone(&connection).read(FramedRead::new(reader, PduCodec::new(self.max_pdu))));
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
    /// Routes each response to the session waiting for it; when the
    /// connection ends, so do its sessions.
    async fn read(self: Arc<Self>, mut frames: FramedRead<ReadHalf<Box<dyn Io>>, PduCodec>) {
        while let Some(frame) = frames.next().await {
            let Ok(pdu) = frame else { break };
            let Ok(env) = Envelope::peek(&pdu) else { break };
            let Ok(id) = i32::try_from(env.message_id) else {
                continue;
            };
            if id == 0 {
                // A Notice of Disconnection: the directory is closing it.
                break;
            }
            let waiting = {
                let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
                match env.op.is_final_response() {
                    true => routes.remove(&id).map(|w| {
                        w.outstanding
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&w.client_id);
                        (w.to, w.client_id)
                    }),
                    false => routes.get(&id).map(|w| (w.to.clone(), w.client_id)),
                }
            };
            let Some((to, client_id)) = waiting else {
                debug!(id, "multiplexed: a response for an operation no session waits for");
                continue;
            };
            if let Some(response) = rewrite(&pdu, client_id, None) {
                // A session that is gone no longer needs it.
                let _ = to.send(response).await;
            }
        }
        warn!(
            url = self.slot.url(),
            "multiplexed: a shared directory connection is lost; its sessions end"
        );
        self.lost.cancel();
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).clear();
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

    async fn send(&self, pdu: &[u8]) -> bool {
        self.writer.lock().await.write_all(pdu).await.is_ok()
    }

    /// Abandons the operation with message id `shared`: its answers, if
    /// any still come, go nowhere.
    async fn abandon(&self, shared: i32) {
        let id = {
            let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            routes.remove(&shared);
            self.next_id(&routes)
        };
        self.send(&abandon_request(id, shared)).await;
    }
}

/// One client session's end of the pipe.
struct VirtualSession {
    mux: Arc<Multiplexer>,
    connection: Arc<SharedConnection>,
    /// The authzId asserted: `dn:…`, or empty for anonymous.
    identity: Vec<u8>,
    outstanding: Arc<Mutex<HashMap<i64, i32>>>,
}

/// How a session's pipe ended.
enum Ended {
    /// The client unbound or closed, or its shared connection was lost.
    Closed,
    /// A SASL bind: the rest of the session goes over a connection of
    /// its own.
    Dedicated(Bytes),
}

impl VirtualSession {
    async fn serve(mut self, far: DuplexStream, route: OwnedRoute, pool: Arc<Pool>) {
        let (reader, writer) = tokio::io::split(far);
        let (to, mut queue) = mpsc::channel::<Bytes>(SESSION_QUEUE);
        let answers = tokio::spawn(async move {
            let mut writer = writer;
            while let Some(pdu) = queue.recv().await {
                if writer.write_all(&pdu).await.is_err() {
                    break;
                }
            }
            writer
        });
        let mut frames = FramedRead::new(reader, PduCodec::new(self.mux.max_pdu));
        let ended = self.requests(&mut frames, &to, &route, &pool).await;
        self.forget().await;
        drop(to);
        let Ended::Dedicated(bind) = ended else { return };
        // Every answer queued so far is written before the directory's own.
        let Ok(writer) = answers.await else { return };
        let rest = frames.read_buffer().clone();
        let far = frames.into_inner().unsplit(writer);
        dedicated(far, &route.route(), &pool, bind, rest).await;
    }

    async fn requests(
        &mut self,
        frames: &mut FramedRead<ReadHalf<DuplexStream>, PduCodec>,
        to: &mpsc::Sender<Bytes>,
        route: &OwnedRoute,
        pool: &Arc<Pool>,
    ) -> Ended {
        loop {
            let frame = tokio::select! {
                frame = frames.next() => frame,
                _ = self.connection.lost.cancelled() => return Ended::Closed,
            };
            let Some(Ok(pdu)) = frame else {
                return Ended::Closed;
            };
            let Ok(env) = Envelope::peek(&pdu) else {
                return Ended::Closed;
            };
            match env.op {
                Op::Unbind => return Ended::Closed,
                Op::Bind if env.is_sasl_bind(&pdu) => return Ended::Dedicated(pdu),
                Op::Bind => {
                    let answer = self.mux.check_bind(&route.route(), pool, &pdu, env.message_id).await;
                    let answer = answer.unwrap_or_else(|| {
                        refusal(
                            &env,
                            ResultCode::Unavailable,
                            "ldapsync: the directory cannot check binds now",
                        )
                    });
                    self.identity = match result_code(&answer) {
                        Some(0) => env
                            .bind_name(&pdu)
                            .filter(|n| !n.is_empty())
                            .map_or_else(Vec::new, |name| [b"dn:", name].concat()),
                        // A failed bind leaves the session anonymous, as on the directory.
                        _ => Vec::new(),
                    };
                    if to.send(answer).await.is_err() {
                        return Ended::Closed;
                    }
                }
                Op::Abandon => self.abandon(&env, &pdu).await,
                _ if asserts_identity(&pdu) => {
                    let refused = refusal(
                        &env,
                        ResultCode::UnwillingToPerform,
                        "ldapsync: a multiplexed listener asserts the client's identity itself; \
                         proxied authorization from the client needs a transparent listener",
                    );
                    if to.send(refused).await.is_err() {
                        return Ended::Closed;
                    }
                }
                _ => {
                    if !self.relay(&env, &pdu, to).await {
                        return Ended::Closed;
                    }
                }
            }
        }
    }

    /// Sends one request on the shared connection, as the client.
    async fn relay(&mut self, env: &Envelope, pdu: &Bytes, to: &mpsc::Sender<Bytes>) -> bool {
        let id = {
            let mut routes = self.connection.routes.lock().unwrap_or_else(|e| e.into_inner());
            let id = self.connection.next_id(&routes);
            if env.op.expects_response() {
                routes.insert(
                    id,
                    Waiting {
                        client_id: env.message_id,
                        to: to.clone(),
                        outstanding: Arc::clone(&self.outstanding),
                    },
                );
                self.outstanding
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(env.message_id, id);
            }
            id
        };
        let control = proxied_authorization(&self.identity);
        let Some(request) = rewrite(pdu, i64::from(id), Some(&control)) else {
            return false;
        };
        self.connection.send(&request).await
    }

    /// An AbandonRequest names the client's message id: the directory's is
    /// the shared connection's.
    async fn abandon(&mut self, env: &Envelope, pdu: &Bytes) {
        let Some(target) = env.abandoned_id(pdu) else { return };
        let shared = self
            .outstanding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&target);
        if let Some(shared) = shared {
            self.connection.abandon(shared).await;
        }
    }

    /// The session is over: what it left in flight is abandoned.
    async fn forget(&mut self) {
        let left: Vec<i32> = self
            .outstanding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, shared)| shared)
            .collect();
        for shared in left {
            self.connection.abandon(shared).await;
        }
    }
}

/// A session taken off the shared connections: a connection of its own,
/// which gets `bind` and whatever the client sends next, byte for byte.
async fn dedicated(mut far: DuplexStream, route: &Route<'_>, pool: &Arc<Pool>, bind: Bytes, rest: BytesMut) {
    let Ok((mut stream, _slot)) = upstream::connect(route, pool).await else {
        if let Ok(env) = Envelope::peek(&bind) {
            let refused = refusal(&env, ResultCode::Unavailable, "ldapsync: no directory server reachable");
            let _ = far.write_all(&refused).await;
        }
        return;
    };
    info!("multiplexed: a SASL bind takes this session to a directory connection of its own");
    if stream.write_all(&bind).await.is_err() || stream.write_all(&rest).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut far, &mut stream).await;
}

/// A response ldapsync makes itself for `request`.
fn refusal(request: &Envelope, code: ResultCode, diagnostic: &str) -> Bytes {
    message::error_response(request, code, diagnostic).unwrap_or_default()
}

/// Whether a request carries a proxied authorization control of its own.
fn asserts_identity(pdu: &[u8]) -> bool {
    let Some(controls) = parts(pdu).and_then(|p| p.controls) else {
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
        op: &rest[..op.total_len()],
        controls,
    })
}

/// The PDU with message id `id`, and `control` added to its controls.
fn rewrite(pdu: &[u8], id: i64, control: Option<&[u8]>) -> Option<Bytes> {
    let parts = parts(pdu)?;
    let mut body = BytesMut::with_capacity(pdu.len() + control.map_or(0, <[u8]>::len) + 8);
    put_integer(&mut body, id);
    body.extend_from_slice(parts.op);
    match (parts.controls, control) {
        (None, None) => {}
        (Some(controls), None) => put_tlv(&mut body, CONTROLS, controls),
        (controls, Some(control)) => put_tlv(&mut body, CONTROLS, &[controls.unwrap_or_default(), control].concat()),
    }
    let mut out = BytesMut::with_capacity(body.len() + 6);
    put_tlv(&mut out, SEQUENCE, &body);
    Some(out.freeze())
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

fn abandon_request(id: i32, target: i32) -> Bytes {
    let mut target_integer = BytesMut::new();
    put_integer(&mut target_integer, i64::from(target));
    // [APPLICATION 16] MessageID: the INTEGER's contents under the op's tag.
    let mut body = BytesMut::new();
    put_integer(&mut body, i64::from(id));
    put_tlv(&mut body, 0x50, &target_integer[2..]);
    let mut out = BytesMut::new();
    put_tlv(&mut out, SEQUENCE, &body);
    out.freeze()
}

fn put_tlv(out: &mut BytesMut, tag: u8, contents: &[u8]) {
    out.put_u8(tag);
    let len = contents.len();
    if len < 0x80 {
        out.put_u8(len as u8);
    } else {
        let octets = len.to_be_bytes();
        let skip = octets.iter().take_while(|b| **b == 0).count();
        out.put_u8(0x80 | (octets.len() - skip) as u8);
        out.extend_from_slice(&octets[skip..]);
    }
    out.extend_from_slice(contents);
}

/// A non-negative INTEGER, in the fewest octets.
fn put_integer(out: &mut BytesMut, value: i64) {
    let octets = value.to_be_bytes();
    let mut skip = 0;
    while skip < 7 && octets[skip] == 0 && octets[skip + 1] & 0x80 == 0 {
        skip += 1;
    }
    put_tlv(out, INTEGER, &octets[skip..]);
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
        assert!(asserts_identity(&rewritten));
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
        assert!(!asserts_identity(&pdu));
        let rewritten = rewrite(&pdu, 1, Some(&proxied_authorization(b""))).unwrap();
        let p = parts(&rewritten).unwrap();
        assert!(p.controls.unwrap().starts_with(&own));
        let mut theirs = BytesMut::new();
        put_tlv(&mut theirs, CONTROLS, &proxied_authorization(b"dn:cn=admin"));
        assert!(asserts_identity(&search(3, &theirs)));
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
            put_integer(&mut out, value);
            assert_eq!(&out[..], &encoded[..], "{value}");
        }
        let mut out = BytesMut::new();
        put_tlv(&mut out, OCTET_STRING, &[0; 300]);
        assert_eq!(&out[..4], &[OCTET_STRING, 0x82, 0x01, 0x2c]);
        let abandon = abandon_request(5, 300);
        let env = Envelope::peek(&abandon).unwrap();
        assert_eq!((env.message_id, env.abandoned_id(&abandon)), (5, Some(300)));
    }
}

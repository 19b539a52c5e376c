//! The conformance harness: real slapd instances from `fixtures/`, ldapsync
//! relaying to them, and helpers to drive both paths with the same client
//! and compare what each returns.
//!
//! A differential test starts two identical directories, one reached
//! directly and one through ldapsync, runs the same operations against
//! each, and asserts the transcripts are equal. Writes therefore never
//! interfere between the two paths.

pub mod hostile;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use ldapsync::config::{LdapUrl, Listener, ProxyConfig};
use ldapsync::proxy::BoundListener;
use ldapsync::proxy::codec::PduCodec;
use ldapsync::proxy::{CaptureLoss, CaptureSink, CapturedWrite, Proxy, WriteKind};
use ldapsync::tls::ServerTls;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

pub use ldapsync_fixtures::{BASE_DN, ROOT_DN, ROOT_PW, Slapd, person};

/// A capture sink that remembers what it was given.
#[derive(Default)]
pub struct RecordingSink {
    writes: Mutex<Vec<CapturedWrite>>,
    losses: Mutex<Vec<(u64, CaptureLoss)>>,
}

impl RecordingSink {
    /// (kind, target DN) of every captured write, in order.
    pub fn writes(&self) -> Vec<(WriteKind, String)> {
        self.writes
            .lock()
            .unwrap()
            .iter()
            .map(|w| (w.kind, w.target_dn().expect("captured request decodes")))
            .collect()
    }

    /// Why each session whose writes became invisible did so.
    pub fn losses(&self) -> Vec<CaptureLoss> {
        self.losses.lock().unwrap().iter().map(|(_, why)| *why).collect()
    }
}

impl CaptureSink for RecordingSink {
    fn write_succeeded(&self, write: CapturedWrite) {
        self.writes.lock().unwrap().push(write);
    }

    fn capture_lost(&self, session: u64, why: CaptureLoss) {
        self.losses.lock().unwrap().push((session, why));
    }
}

/// ldapsync running in its own thread and runtime, so that blocking tests
/// (which run ldap-utils) and async tests can both use it.
pub struct ProxyHandle {
    addr: SocketAddr,
    url: String,
    pub sink: Arc<RecordingSink>,
    server_tls: Option<Arc<ServerTls>>,
    shutdown: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl ProxyHandle {
    /// Relays to `upstreams` with the default limits.
    pub fn start(upstreams: &[String]) -> ProxyHandle {
        ProxyHandle::start_with(upstreams, |_| {})
    }

    /// Relays to `upstreams` with settings adjusted by `tune`.
    pub fn start_with(upstreams: &[String], tune: impl FnOnce(&mut ProxyConfig)) -> ProxyHandle {
        let mut config = ProxyConfig {
            upstream: upstreams.iter().map(|u| u.parse().expect("upstream URL")).collect(),
            connect_timeout: Duration::from_secs(2),
            session_threads: session_threads(),
            ..ProxyConfig::default()
        };
        tune(&mut config);
        // The listener is the first configured one (default plain LDAP) on
        // a free loopback port.
        let mut listener_config: Listener = config
            .listen
            .first()
            .cloned()
            .unwrap_or_else(|| "ldap://127.0.0.1:0".parse::<LdapUrl>().unwrap().into());
        let sink = Arc::new(RecordingSink::default());
        let shutdown = CancellationToken::new();
        let socket = std::net::TcpListener::bind(listener_config.url.authority()).expect("binding the proxy listener");
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let scheme = if listener_config.url.is_ldaps() {
            "ldaps"
        } else {
            "ldap"
        };
        listener_config.url = format!("{scheme}://{addr}").parse().unwrap();
        let proxy = Proxy::new(config, Arc::clone(&sink) as Arc<dyn CaptureSink>).expect("TLS material loads");
        let server_tls = proxy.server_tls();
        let token = shutdown.clone();
        let url = listener_config.url.to_string();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let socket = tokio::net::TcpListener::from_std(socket).unwrap();
                proxy
                    .serve(vec![BoundListener::new(socket, listener_config)], token)
                    .await;
            });
        });
        ProxyHandle {
            addr,
            url,
            sink,
            server_tls,
            shutdown,
            thread: Some(thread),
        }
    }

    /// Re-reads the certificate, as SIGHUP does.
    pub fn reload_tls(&self) {
        self.server_tls
            .as_ref()
            .expect("TLS configured")
            .reload()
            .expect("certificate reloads");
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Graceful shutdown, as on SIGTERM; returns when the proxy has stopped.
    pub fn shutdown(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            thread.join().expect("proxy thread panicked");
        }
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `LDAPSYNC_TEST_LISTENER=multiplexed` (`make test`'s third run): the
/// differential suites run through a multiplexed listener.
pub fn multiplexed() -> bool {
    match std::env::var("LDAPSYNC_TEST_LISTENER").as_deref() {
        Ok("multiplexed") => true,
        Ok("transparent") | Ok("") | Err(_) => false,
        Ok(other) => panic!("LDAPSYNC_TEST_LISTENER={other}: say transparent or multiplexed"),
    }
}

/// `LDAPSYNC_TEST_SESSION_THREADS=N` (`make test`'s fourth run): the relay's
/// suites run with sessions on N session threads of their own.
fn session_threads() -> Option<usize> {
    let n = std::env::var("LDAPSYNC_TEST_SESSION_THREADS").ok()?;
    Some(
        n.parse()
            .unwrap_or_else(|_| panic!("LDAPSYNC_TEST_SESSION_THREADS={n}: say a number of threads")),
    )
}

/// The identity a multiplexed listener's shared connections bind as: an
/// entry allowed to assert any identity the tests use (the root DN too).
pub struct MultiplexService {
    secret: tempfile::NamedTempFile,
}

pub const MULTIPLEX_SERVICE: &str = "cn=ldapsync,dc=example,dc=com";

impl MultiplexService {
    pub fn add(directories: &[&Slapd]) -> MultiplexService {
        for directory in directories {
            ldapsync_fixtures::ldapmodify(
                &directory.url(),
                ldapsync_fixtures::ROOT_DN,
                ldapsync_fixtures::ROOT_PW,
                &format!(
                    "dn: {MULTIPLEX_SERVICE}\nchangetype: add\nobjectClass: organizationalRole\n\
                     objectClass: simpleSecurityObject\ncn: ldapsync\nuserPassword: mux-secret\n\
                     authzTo: {{0}}dn.regex:.*\n"
                ),
            );
        }
        let secret = tempfile::NamedTempFile::new().expect("a temporary file");
        std::fs::write(secret.path(), "mux-secret\n").expect("writing the secret");
        MultiplexService { secret }
    }

    /// A multiplexed listener over two shared connections.
    pub fn configure(&self, config: &mut ProxyConfig) {
        let mut listener: Listener = config
            .listen
            .first()
            .cloned()
            .unwrap_or_else(|| "ldap://127.0.0.1:0".parse::<LdapUrl>().unwrap().into());
        listener.mode = ldapsync::config::ListenerMode::Multiplexed;
        config.listen = vec![listener];
        config.multiplex = Some(ldapsync::config::MultiplexConfig {
            bind_dn: MULTIPLEX_SERVICE.into(),
            password_file: Some(self.secret.path().to_owned()),
            password_env: None,
            connections: Some(2),
            max_unread: None,
        });
    }
}

/// Two identical directories: one reached directly, one through ldapsync.
pub struct Pair {
    pub direct: Slapd,
    pub behind_proxy: Slapd,
    pub proxy: ProxyHandle,
}

impl Pair {
    pub fn start() -> Pair {
        Pair::start_with_bulk(0)
    }

    pub fn start_with_bulk(bulk: usize) -> Pair {
        let direct = Slapd::start_with_bulk(bulk);
        let behind_proxy = Slapd::start_with_bulk(bulk);
        let proxy = match multiplexed() {
            false => ProxyHandle::start(&[behind_proxy.url()]),
            true => {
                // Both directories get the service entry: they stay alike.
                let service = MultiplexService::add(&[&direct, &behind_proxy]);
                ProxyHandle::start_with(&[behind_proxy.url()], |config| service.configure(config))
            }
        };
        Pair {
            direct,
            behind_proxy,
            proxy,
        }
    }

    /// The two URLs a differential test compares: (direct, through ldapsync).
    pub fn urls(&self) -> (String, String) {
        (self.direct.url(), self.proxy.url())
    }
}

/// A raw LDAP connection for the tests that must control the bytes.
pub struct RawConn {
    write: tokio::net::tcp::OwnedWriteHalf,
    read: FramedRead<tokio::net::tcp::OwnedReadHalf, PduCodec>,
}

/// What a raw connection received next.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    Pdu(Bytes),
    Closed,
    Silent,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).await.expect("connecting");
        RawConn::over(stream)
    }

    /// Connects from the loopback address `source` (e.g. 127.0.0.2), as
    /// another client host would.
    pub async fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> RawConn {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(source, 0))
            .expect("binding the source address");
        RawConn::over(socket.connect(addr).await.expect("connecting"))
    }

    fn over(stream: TcpStream) -> RawConn {
        let (read, write) = stream.into_split();
        RawConn {
            write,
            read: FramedRead::new(read, PduCodec::new(64 * 1024 * 1024)),
        }
    }

    /// Sends bytes; a peer that already closed is not an error here, since
    /// hostile-input tests expect exactly that.
    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.write.write_all(bytes).await;
    }

    /// Ends the sending side (an end of stream for the peer).
    pub async fn finish(&mut self) {
        let _ = self.write.shutdown().await;
    }

    /// Everything received until the connection closes or stays silent for
    /// `quiet`: the raw PDUs, and how it ended.
    pub async fn transcript(&mut self, quiet: Duration) -> (Vec<Bytes>, Received) {
        let mut pdus = Vec::new();
        loop {
            match self.receive(quiet).await {
                Received::Pdu(pdu) => pdus.push(pdu),
                end => return (pdus, end),
            }
        }
    }

    /// The next PDU, the end of the connection, or silence for `wait`.
    pub async fn receive(&mut self, wait: Duration) -> Received {
        match tokio::time::timeout(wait, self.read.next()).await {
            Err(_) => Received::Silent,
            Ok(None) | Ok(Some(Err(_))) => Received::Closed,
            Ok(Some(Ok(pdu))) => Received::Pdu(pdu),
        }
    }
}

/// Decodes a PDU the test expects to be a well-formed LDAPMessage.
pub fn decode(pdu: &[u8]) -> rasn_ldap::LdapMessage {
    rasn::ber::decode(pdu).unwrap_or_else(|e| panic!("undecodable response {pdu:02x?}: {e}"))
}

/// Encodes an LDAPMessage for sending over a [`RawConn`].
pub fn encode(message: &rasn_ldap::LdapMessage) -> Vec<u8> {
    rasn::ber::encode(message).expect("encoding a test message")
}

/// A base search of the root DSE, the cheapest "are you there?".
pub fn root_dse_search(message_id: u32) -> Vec<u8> {
    root_dse_search_for(message_id, "supportedLDAPVersion")
}

/// A base search of the root DSE asking for `attribute`.
pub fn root_dse_search_for(message_id: u32, attribute: &str) -> Vec<u8> {
    use rasn_ldap::{Filter, LdapMessage, ProtocolOp, SearchRequest, SearchRequestDerefAliases, SearchRequestScope};
    let request = SearchRequest::new(
        "".into(),
        SearchRequestScope::BaseObject,
        SearchRequestDerefAliases::NeverDerefAliases,
        0,
        0,
        false,
        Filter::Present("objectClass".into()),
        vec![attribute.into()],
    );
    encode(&LdapMessage::new(message_id, ProtocolOp::SearchRequest(request)))
}

/// An extended request with the given OID and no value.
pub fn extended_request(message_id: u32, oid: &str) -> Vec<u8> {
    use rasn_ldap::{ExtendedRequest, LdapMessage, ProtocolOp};
    let request = ExtendedRequest {
        request_name: oid.as_bytes().to_vec().into(),
        request_value: None,
    };
    encode(&LdapMessage::new(message_id, ProtocolOp::ExtendedReq(request)))
}

/// True when a new connection to `addr` gets a successful root DSE search
/// within five seconds.
pub async fn answers_root_dse(addr: SocketAddr) -> bool {
    let mut conn = RawConn::connect(addr).await;
    conn.send(&root_dse_search(1)).await;
    loop {
        match conn.receive(Duration::from_secs(5)).await {
            Received::Pdu(pdu) => {
                if let rasn_ldap::ProtocolOp::SearchResDone(done) = decode(&pdu).protocol_op {
                    return done.0.result_code == rasn_ldap::ResultCode::Success;
                }
            }
            Received::Closed | Received::Silent => return false,
        }
    }
}

/// Asserts that the next thing on `conn` is a Notice of Disconnection with
/// `code`, and that the connection is then closed. Returns its diagnostic.
pub async fn expect_notice_of_disconnection(conn: &mut RawConn, code: rasn_ldap::ResultCode) -> String {
    let received = conn.receive(Duration::from_secs(10)).await;
    let Received::Pdu(pdu) = received else {
        panic!("expected a Notice of Disconnection, got {received:?}");
    };
    let message = decode(&pdu);
    assert_eq!(message.message_id, 0, "a notice is unsolicited (message id 0)");
    let rasn_ldap::ProtocolOp::ExtendedResp(notice) = message.protocol_op else {
        panic!("expected an ExtendedResponse, got {message:?}");
    };
    assert_eq!(notice.result_code, code);
    assert_eq!(
        notice.response_name.as_deref(),
        Some(ldapsync::proxy::message::NOTICE_OF_DISCONNECTION_OID.as_bytes())
    );
    assert_eq!(
        conn.receive(Duration::from_secs(10)).await,
        Received::Closed,
        "the connection closes after the notice"
    );
    notice.diagnostic_message.0
}

/// A subtree search of `base` with the RFC 4533 sync control in
/// refreshAndPersist mode: it never completes while the connection lives.
pub fn persistent_search(message_id: u32, base: &str) -> Vec<u8> {
    use rasn_ldap::{
        Control, Filter, LdapMessage, ProtocolOp, SearchRequest, SearchRequestDerefAliases, SearchRequestScope,
    };
    let request = SearchRequest::new(
        base.into(),
        SearchRequestScope::WholeSubtree,
        SearchRequestDerefAliases::NeverDerefAliases,
        0,
        0,
        false,
        Filter::Present("objectClass".into()),
        vec!["1.1".into()],
    );
    let mut message = LdapMessage::new(message_id, ProtocolOp::SearchRequest(request));
    // syncRequestValue ::= SEQUENCE { mode ENUMERATED refreshAndPersist(3) }
    message.controls = Some(vec![Control::new(
        b"1.3.6.1.4.1.4203.1.9.1.1".to_vec().into(),
        true,
        Some(vec![0x30, 0x03, 0x0a, 0x01, 0x03].into()),
    )]);
    encode(&message)
}

/// The final response to `message_id` on `conn`, skipping everything else
/// (search entries, references and intermediate messages included).
pub async fn response_to(conn: &mut RawConn, message_id: u32) -> rasn_ldap::LdapMessage {
    use rasn_ldap::ProtocolOp;
    loop {
        match conn.receive(Duration::from_secs(10)).await {
            Received::Pdu(pdu) => {
                let message = decode(&pdu);
                let partial = matches!(
                    message.protocol_op,
                    ProtocolOp::SearchResEntry(_) | ProtocolOp::SearchResRef(_) | ProtocolOp::IntermediateResponse(_)
                );
                if message.message_id == message_id && !partial {
                    return message;
                }
            }
            other => panic!("expected the response to message {message_id}, got {other:?}"),
        }
    }
}

/// The result code and diagnostic of a response.
pub fn result_of(message: &rasn_ldap::LdapMessage) -> (rasn_ldap::ResultCode, String) {
    use rasn_ldap::ProtocolOp;
    let result = match &message.protocol_op {
        ProtocolOp::BindResponse(r) => (r.result_code, r.diagnostic_message.clone()),
        ProtocolOp::SearchResDone(r) => (r.0.result_code, r.0.diagnostic_message.clone()),
        ProtocolOp::ExtendedResp(r) => (r.result_code, r.diagnostic_message.clone()),
        other => panic!("not a response with a result: {other:?}"),
    };
    (result.0, result.1.to_string())
}

//! The admin HTTP API (`[admin] listen`): JSON under `/api/v1`, over the
//! admin core, for operators' scripts and the application side.
//!
//! Operators are authenticated by the directory itself: `POST
//! /api/v1/login` finds the login name among the configured connector's
//! accounts (as the service identity), binds as that entry with the given
//! password, and reads the configured groups' members: `admin_group`
//! grants read-write, `auditor_group` read-only. A login returns a bearer
//! token (kept in memory as its SHA-256, expiring after `session_timeout`
//! unused). Failed logins are limited per client address. Every error is a
//! problem document (RFC 9457) with a stable `code`; a client's mistake is
//! a 4xx, never a 500.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    AdminError, AssociationView, ConnectorView, DeleteOptions, Deleted, ListQuery, ObjectEdit, ObjectView, Outcome,
    Page,
};
use crate::config::{AdminConfig, Config, ConnectorConfig};
use crate::directory::{Directory, DirectoryError, DirectoryOps};
use crate::model::Category;
use crate::proxy::FailedBinds;
use crate::store::{self, AnyStore, Association, JournalEntry, JournalQuery, LocalObject};
use crate::sync::engine::LinkTarget;
use crate::tls::ServerTls;

/// What an operator may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Admin,
    Auditor,
}

struct Session {
    operator: String,
    role: Role,
    last_used: Instant,
}

/// Open sessions at most, so that logins cannot grow memory without bound.
const MAX_SESSIONS: usize = 10_000;

struct ApiState {
    config: Config,
    /// The API's own connection to the store; operations take turns.
    store: tokio::sync::Mutex<AnyStore>,
    /// By the SHA-256 of their token: a memory dump shows no usable token.
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    failed_logins: FailedBinds,
}

/// A problem document (RFC 9457) as the API sends it, for the OpenAPI
/// document.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct ProblemDocument {
    /// Always `about:blank`.
    r#type: String,
    title: String,
    status: u16,
    /// A stable code for programs: `bad-credentials`, `not-found`, …
    code: String,
    detail: String,
}

/// An error as the API answers it.
pub struct Problem {
    status: StatusCode,
    code: &'static str,
    detail: String,
}

impl Problem {
    fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Problem {
        Problem {
            status,
            code,
            detail: detail.into(),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "type": "about:blank",
            "title": self.status.canonical_reason().unwrap_or("Error"),
            "status": self.status.as_u16(),
            "code": self.code,
            "detail": self.detail,
        });
        (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response()
    }
}

impl From<AdminError> for Problem {
    fn from(e: AdminError) -> Problem {
        let status = match &e {
            AdminError::NotFound { .. } | AdminError::NoAssociation { .. } => StatusCode::NOT_FOUND,
            AdminError::Exists { .. } => StatusCode::CONFLICT,
            AdminError::Invalid(_) | AdminError::Config(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AdminError::Store(_) | AdminError::Sync(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        if status == StatusCode::SERVICE_UNAVAILABLE {
            warn!(error = %e, "admin API: an operation failed");
        }
        Problem::new(status, e.code(), e.to_string())
    }
}

fn bad_json(rejection: JsonRejection) -> Problem {
    let status = rejection.status();
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too-large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "not-json",
        _ => "bad-json",
    };
    Problem::new(status, code, rejection.body_text())
}

fn bad_query(rejection: QueryRejection) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "bad-query", rejection.body_text())
}

/// The operator a request's bearer token names.
struct Operator {
    name: String,
    role: Role,
}

impl Operator {
    /// For state-changing calls: admins only.
    fn may_change(&self) -> Result<(), Problem> {
        match self.role {
            Role::Admin => Ok(()),
            Role::Auditor => Err(Problem::new(
                StatusCode::FORBIDDEN,
                "read-only",
                format!("{} is an auditor: read-only", self.name),
            )),
        }
    }

    /// As the journal records them.
    fn journaled(&self) -> String {
        format!("api:{}", self.name)
    }
}

impl FromRequestParts<Arc<ApiState>> for Operator {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<ApiState>) -> Result<Operator, Problem> {
        let unauthorized = |why: &str| Problem::new(StatusCode::UNAUTHORIZED, "unauthenticated", why);
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| unauthorized("log in (POST /api/v1/login) and send Authorization: Bearer TOKEN"))?;
        let mut sessions = state.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let timeout = state.config.admin.session_timeout;
        sessions.retain(|_, s| s.last_used.elapsed() < timeout);
        let session = sessions
            .get_mut(&digest(token))
            .ok_or_else(|| unauthorized("the session is unknown or has expired: log in again"))?;
        session.last_used = Instant::now();
        Ok(Operator {
            name: session.operator.clone(),
            role: session.role,
        })
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn new_token() -> Result<String, Problem> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|e| {
        warn!(error = %e, "admin API: no randomness for a session token");
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no-randomness",
            "cannot create a session now",
        )
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The API's listening socket, with the TLS it serves when configured.
pub struct Bound {
    tcp: TcpListener,
    tls: Option<TlsAcceptor>,
}

/// Binds `admin.listen` now, so that a taken port or a broken certificate
/// fails the start.
pub async fn bind(admin: &AdminConfig) -> Result<Option<Bound>, ApiError> {
    let Some(listen) = &admin.listen else {
        return Ok(None);
    };
    let tls = match &admin.tls {
        Some(paths) => Some(ServerTls::load(paths)?.acceptor()),
        None => None,
    };
    let tcp = TcpListener::bind(listen).await.map_err(|source| ApiError::Bind {
        listen: listen.clone(),
        source,
    })?;
    if let Ok(addr) = tcp.local_addr() {
        info!(%addr, https = tls.is_some(), "admin API listening");
    }
    Ok(Some(Bound { tcp, tls }))
}

/// Why the API cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("admin.listen {listen}: {source}")]
    Bind { listen: String, source: std::io::Error },
    #[error("admin.tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// TLS connections, handshaken apart from one another (a slow client
/// holds up no one), at most `HANDSHAKES` at once, each within the
/// proxy's handshake timeout.
struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

const HANDSHAKES: usize = 256;

impl TlsListener {
    fn start(tcp: TcpListener, acceptor: TlsAcceptor, handshake_timeout: Duration) -> std::io::Result<TlsListener> {
        let addr = tcp.local_addr()?;
        let (done, ready) = mpsc::channel(HANDSHAKES);
        let slots = Arc::new(Semaphore::new(HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let (stream, peer) = match tcp.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        debug!(error = %e, "admin API: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, handed) = (acceptor.clone(), done.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = handed.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "admin API: TLS handshake failed"),
                        Err(_) => debug!(%peer, "admin API: no TLS handshake within the timeout"),
                    }
                });
                if done.is_closed() {
                    return;
                }
            }
        });
        Ok(TlsListener { ready, addr })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The acceptor is gone only when the runtime stops.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// The client's address, for the failed-login limiter, over TCP or TLS.
#[derive(Clone, Copy)]
struct Peer(SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

/// Serves the API on `bound` until `shutdown`.
pub async fn serve(bound: Bound, config: Config, shutdown: CancellationToken) {
    let store = match tokio::task::spawn_blocking({
        let settings = config.store.clone();
        move || store::open(&settings)
    })
    .await
    {
        Ok(Ok(store)) => store,
        Ok(Err(e)) => return warn!(error = %e, "admin API: the store cannot be opened; the API is off"),
        Err(e) => return warn!(error = %e, "admin API: opening the store failed"),
    };
    let max_body = config.admin.max_body;
    let failed_logins = FailedBinds::new(config.admin.max_failed_logins, config.admin.failed_login_window);
    let state = Arc::new(ApiState {
        config,
        store: tokio::sync::Mutex::new(store),
        sessions: Mutex::default(),
        failed_logins,
    });
    let handshake_timeout = state.config.proxy.handshake_timeout;
    let app = router(state)
        .layer(DefaultBodyLimit::max(max_body))
        .into_make_service_with_connect_info::<Peer>();
    let stop = async move { shutdown.cancelled().await };
    let served = match bound.tls {
        None => axum::serve(bound.tcp, app).with_graceful_shutdown(stop).await,
        Some(acceptor) => match TlsListener::start(bound.tcp, acceptor, handshake_timeout) {
            Ok(listener) => axum::serve(listener, app).with_graceful_shutdown(stop).await,
            Err(e) => Err(e),
        },
    };
    if let Err(e) = served {
        warn!(error = %e, "admin API stopped");
    }
}

/// The OpenAPI document, from the handlers' annotations and the types.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "ldapsync admin API", description = "See docs/admin-api.md."),
    paths(
        login,
        logout,
        whoami,
        connectors,
        list,
        show,
        create,
        edit,
        delete,
        associations,
        association,
        remove_association,
        link,
        journal
    ),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

async fn openapi() -> Response {
    use utoipa::OpenApi;
    match ApiDoc::openapi().to_json() {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "openapi", e.to_string()).into_response(),
    }
}

fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/login", post(login))
        .route("/api/v1/logout", post(logout))
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/{category}", get(list).post(create))
        .route("/api/v1/{category}/{name}", get(show).patch(edit).delete(delete))
        .route("/api/v1/connectors", get(connectors))
        .route("/api/v1/associations", get(associations))
        .route(
            "/api/v1/associations/{connector}/{category}/{name}",
            get(association).delete(remove_association).put(link),
        )
        .route("/api/v1/journal", get(journal))
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "no-such-resource", "see docs/admin-api.md") })
        .with_state(state)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Login {
    username: String,
    password: String,
}

#[derive(Serialize, utoipa::ToSchema)]
struct LoggedIn {
    token: String,
    operator: String,
    role: Role,
    /// Seconds a session holds without being used.
    timeout: u64,
}

#[utoipa::path(post, path = "/api/v1/login", summary = "Log in with directory credentials", request_body = Login, responses((status = 200, body = LoggedIn), (status = 401, body = ProblemDocument), (status = 403, body = ProblemDocument), (status = 429, body = ProblemDocument)))]
async fn login(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    body: Result<Json<Login>, JsonRejection>,
) -> Result<Json<LoggedIn>, Problem> {
    let Json(login) = body.map_err(bad_json)?;
    if let Some(wait) = state.failed_logins.blocked(peer.ip()) {
        return Err(Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too-many-failed-logins",
            format!(
                "too many failed logins from your address; retry in {} s",
                wait.as_secs() + 1
            ),
        ));
    }
    let role = match authenticate(&state.config, &login.username, &login.password).await {
        Ok(role) => role,
        Err(problem) => {
            if problem.status == StatusCode::UNAUTHORIZED || problem.status == StatusCode::FORBIDDEN {
                state.failed_logins.record(peer.ip());
                info!(%peer, user = %login.username, code = problem.code, "admin API: login refused");
            }
            return Err(problem);
        }
    };
    let token = new_token()?;
    {
        let mut sessions = state.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let timeout = state.config.admin.session_timeout;
        sessions.retain(|_, s| s.last_used.elapsed() < timeout);
        // Logins cost the directory a bind each; sessions cost memory.
        if sessions.len() >= MAX_SESSIONS {
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too-many-sessions",
                "too many open sessions; log out unused ones or retry later",
            ));
        }
        sessions.insert(
            digest(&token),
            Session {
                operator: login.username.clone(),
                role,
                last_used: Instant::now(),
            },
        );
    }
    info!(%peer, operator = %login.username, ?role, "admin API: logged in");
    Ok(Json(LoggedIn {
        token,
        operator: login.username,
        role,
        timeout: state.config.admin.session_timeout.as_secs(),
    }))
}

/// Whether the directory knows `username` with `password`, and what its
/// groups let it do.
async fn authenticate(config: &Config, username: &str, password: &str) -> Result<Role, Problem> {
    let refused = || Problem::new(StatusCode::UNAUTHORIZED, "bad-credentials", "wrong name or password");
    // An empty password would be an unauthenticated bind, which succeeds
    // (RFC 4513 §5.1.2) without proving anything.
    if username.is_empty() || password.is_empty() || username.len() > 256 || username.chars().any(char::is_control) {
        return Err(refused());
    }
    let connector = login_connector(config)?;
    let unavailable = |e: DirectoryError| {
        warn!(error = %e, "admin API: the directory cannot check a login");
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "directory-unavailable",
            "the directory cannot check logins now",
        )
    };
    let secret = connector.password().map_err(|e| {
        // The error names the file or variable, never what it holds.
        warn!(error = %e, "admin API: no service password");
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "directory-unavailable",
            "the directory cannot check logins now",
        )
    })?;
    let timeout = config.proxy.connect_timeout;
    let mut service = Directory::connect(&connector, secret.expose(), timeout)
        .await
        .map_err(unavailable)?;
    let scope = connector
        .accounts
        .as_ref()
        .expect("check-config requires the login connector's accounts");
    let found = service.entries_named(scope, username).await;
    let entries = match found {
        Ok(entries) => entries,
        Err(e) => {
            service.close().await;
            return Err(unavailable(e));
        }
    };
    let [entry] = entries.as_slice() else {
        service.close().await;
        return Err(refused());
    };
    let as_operator = ConnectorConfig {
        bind_dn: entry.dn.clone(),
        ..connector.clone()
    };
    match Directory::connect(&as_operator, password, timeout).await {
        Ok(session) => session.close().await,
        Err(DirectoryError::Bind { .. }) => {
            service.close().await;
            return Err(refused());
        }
        Err(e) => {
            service.close().await;
            return Err(unavailable(e));
        }
    }
    let admin = &config.admin;
    let mut role = None;
    for (group, granted) in [(&admin.admin_group, Role::Admin), (&admin.auditor_group, Role::Auditor)] {
        let Some(group) = group else { continue };
        let members = service.read(group, &["member", "uniqueMember"]).await;
        let members = match members {
            Ok(members) => members,
            Err(e) => {
                service.close().await;
                return Err(unavailable(e));
            }
        };
        let key = crate::dn::key(&entry.dn);
        if members.values().flatten().any(|m| crate::dn::key(m) == key) {
            role = Some(granted);
            break;
        }
    }
    service.close().await;
    role.ok_or_else(|| {
        Problem::new(
            StatusCode::FORBIDDEN,
            "not-an-operator",
            format!("{username} is in neither the admin nor the auditor group"),
        )
    })
}

fn login_connector(config: &Config) -> Result<ConnectorConfig, Problem> {
    let name = match &config.admin.connector {
        Some(name) => name.clone(),
        None => config.connectors.first().map(|c| c.name.clone()).unwrap_or_default(),
    };
    config.connector(&name).ok_or_else(|| {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no-connector",
            "no connector checks logins",
        )
    })
}

#[utoipa::path(post, path = "/api/v1/logout", summary = "End the session", responses((status = 204)), security(("bearer" = [])))]
async fn logout(State(state): State<Arc<ApiState>>, parts: axum::http::HeaderMap) -> StatusCode {
    if let Some(token) = parts
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        state
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&digest(token));
    }
    StatusCode::NO_CONTENT
}

#[utoipa::path(get, path = "/api/v1/whoami", summary = "The operator and role of the session", responses((status = 200, body = Object), (status = 401, body = ProblemDocument)), security(("bearer" = [])))]
async fn whoami(operator: Operator) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "operator": operator.name, "role": operator.role }))
}

fn category(segment: &str) -> Result<Category, Problem> {
    match segment {
        "accounts" => Ok(Category::Account),
        "groups" => Ok(Category::Group),
        _ => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "no-such-resource",
            format!("/api/v1/{segment}: say accounts or groups"),
        )),
    }
}

/// Runs a store operation off the runtime's threads (the stores block).
async fn with_store<T: Send>(
    state: &ApiState,
    work: impl FnOnce(&Config, &mut AnyStore) -> Result<T, AdminError> + Send,
) -> Result<T, Problem> {
    let mut store = state.store.lock().await;
    Ok(tokio::task::block_in_place(|| work(&state.config, &mut store))?)
}

#[utoipa::path(get, path = "/api/v1/{category}", summary = "A page of local accounts or groups", params(("category" = String, Path, description = "accounts or groups"), ListQuery), responses((status = 200, body = Page<LocalObject>), (status = 401, body = ProblemDocument)), security(("bearer" = [])))]
async fn list(
    State(state): State<Arc<ApiState>>,
    _operator: Operator,
    Path(segment): Path<String>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let category = category(&segment)?;
    let Query(query) = query.map_err(bad_query)?;
    let page = with_store(&state, |_, store| super::list(store, category, &query)).await?;
    Ok(Json(page).into_response())
}

#[utoipa::path(get, path = "/api/v1/{category}/{name}", summary = "One object and its associations", params(("category" = String, Path, description = "accounts or groups"), ("name" = String, Path)), responses((status = 200, body = ObjectView), (status = 404, body = ProblemDocument)), security(("bearer" = [])))]
async fn show(
    State(state): State<Arc<ApiState>>,
    _operator: Operator,
    Path((segment, name)): Path<(String, String)>,
) -> Result<Response, Problem> {
    let category = category(&segment)?;
    let view = with_store(&state, |_, store| super::show(store, category, &name)).await?;
    Ok(Json(view).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
    #[serde(flatten)]
    edit: ObjectEdit,
}

#[utoipa::path(post, path = "/api/v1/{category}", summary = "Create a local account or group", params(("category" = String, Path, description = "accounts or groups")), request_body = Create, responses((status = 201, body = LocalObject), (status = 403, body = ProblemDocument), (status = 409, body = ProblemDocument), (status = 422, body = ProblemDocument)), security(("bearer" = [])))]
async fn create(
    State(state): State<Arc<ApiState>>,
    operator: Operator,
    Path(segment): Path<String>,
    body: Result<Json<Create>, JsonRejection>,
) -> Result<Response, Problem> {
    let category = category(&segment)?;
    operator.may_change()?;
    let Json(Create { name, edit }) = body.map_err(bad_json)?;
    let who = operator.journaled();
    let object = with_store(&state, |config, store| {
        super::create(config, store, category, &name, &edit, &who)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(object)).into_response())
}

#[utoipa::path(patch, path = "/api/v1/{category}/{name}", summary = "Change a local object", params(("category" = String, Path, description = "accounts or groups"), ("name" = String, Path)), request_body = ObjectEdit, responses((status = 200, body = LocalObject), (status = 404, body = ProblemDocument), (status = 422, body = ProblemDocument)), security(("bearer" = [])))]
async fn edit(
    State(state): State<Arc<ApiState>>,
    operator: Operator,
    Path((segment, name)): Path<(String, String)>,
    body: Result<Json<ObjectEdit>, JsonRejection>,
) -> Result<Response, Problem> {
    let category = category(&segment)?;
    operator.may_change()?;
    let Json(edit) = body.map_err(bad_json)?;
    let who = operator.journaled();
    let object = with_store(&state, |config, store| {
        super::edit(config, store, category, &name, &edit, &who)
    })
    .await?;
    Ok(Json(object).into_response())
}

#[utoipa::path(delete, path = "/api/v1/{category}/{name}", summary = "Delete a local object (an associated one as its connector says)", params(("category" = String, Path, description = "accounts or groups"), ("name" = String, Path), DeleteOptions), responses((status = 200, body = Deleted), (status = 404, body = ProblemDocument)), security(("bearer" = [])))]
async fn delete(
    State(state): State<Arc<ApiState>>,
    operator: Operator,
    Path((segment, name)): Path<(String, String)>,
    options: Result<Query<DeleteOptions>, QueryRejection>,
) -> Result<Response, Problem> {
    let category = category(&segment)?;
    operator.may_change()?;
    let Query(options) = options.map_err(bad_query)?;
    let mut store = state.store.lock().await;
    let deleted = super::delete(
        &state.config,
        &mut store,
        category,
        &name,
        options,
        &operator.journaled(),
    )
    .await?;
    Ok(Json(deleted).into_response())
}

#[utoipa::path(get, path = "/api/v1/connectors", summary = "Every connector: its policy, watermarks, polls, held deletes", responses((status = 200, body = Vec<ConnectorView>)), security(("bearer" = [])))]
async fn connectors(State(state): State<Arc<ApiState>>, _operator: Operator) -> Result<Response, Problem> {
    let listed = with_store(&state, |config, store| super::connectors(config, store)).await?;
    Ok(Json(listed).into_response())
}

#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields, default)]
#[into_params(parameter_in = Query)]
struct AssociationQuery {
    connector: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/associations", summary = "Every association with its object", params(AssociationQuery), responses((status = 200, body = Vec<AssociationView>)), security(("bearer" = [])))]
async fn associations(
    State(state): State<Arc<ApiState>>,
    _operator: Operator,
    query: Result<Query<AssociationQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(query) = query.map_err(bad_query)?;
    let listed = with_store(&state, |config, store| {
        super::associations(config, store, query.connector.as_deref())
    })
    .await?;
    Ok(Json(listed).into_response())
}

#[utoipa::path(get, path = "/api/v1/associations/{connector}/{category}/{name}", summary = "One object's association with a connector", params(("connector" = String, Path), ("category" = String, Path, description = "accounts or groups"), ("name" = String, Path)), responses((status = 200, body = Association), (status = 404, body = ProblemDocument)), security(("bearer" = [])))]
async fn association(
    State(state): State<Arc<ApiState>>,
    _operator: Operator,
    Path((connector, segment, name)): Path<(String, String, String)>,
) -> Result<Response, Problem> {
    let category = category(&segment)?;
    let found = with_store(&state, |config, store| {
        super::association(config, store, &connector, category, &name)
    })
    .await?;
    Ok(Json(found).into_response())
}

/// An association changes only by an explicit act: the request says so.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Confirmed {
    confirm: bool,
}

fn confirmed(body: Result<Json<Confirmed>, JsonRejection>, what: &str) -> Result<(), Problem> {
    let Json(Confirmed { confirm }) = body.map_err(bad_json)?;
    match confirm {
        true => Ok(()),
        false => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not-confirmed",
            format!("{what} is done only with {{\"confirm\": true}}"),
        )),
    }
}

#[utoipa::path(delete, path = "/api/v1/associations/{connector}/{category}/{name}", summary = "Remove an association (confirmed)", params(("connector" = String, Path), ("category" = String, Path, description = "accounts or groups"), ("name" = String, Path)), request_body = Confirmed, responses((status = 204), (status = 404, body = ProblemDocument), (status = 422, body = ProblemDocument)), security(("bearer" = [])))]
async fn remove_association(
    State(state): State<Arc<ApiState>>,
    operator: Operator,
    Path((connector, segment, name)): Path<(String, String, String)>,
    body: Result<Json<Confirmed>, JsonRejection>,
) -> Result<StatusCode, Problem> {
    let category = category(&segment)?;
    operator.may_change()?;
    confirmed(body, "removing an association")?;
    let who = operator.journaled();
    with_store(&state, |config, store| {
        super::remove_association(config, store, &connector, category, &name, &who)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The entry an object is linked with: by DN or by stable id.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Link {
    confirm: bool,
    dn: Option<String>,
    entry_id: Option<String>,
}

#[utoipa::path(put, path = "/api/v1/associations/{connector}/{category}/{name}", summary = "Link an object with an entry (confirmed)", params(("connector" = String, Path), ("category" = String, Path, description = "accounts or groups"), ("name" = String, Path)), request_body = Link, responses((status = 200, body = Outcome), (status = 422, body = ProblemDocument)), security(("bearer" = [])))]
async fn link(
    State(state): State<Arc<ApiState>>,
    operator: Operator,
    Path((connector, segment, name)): Path<(String, String, String)>,
    body: Result<Json<Link>, JsonRejection>,
) -> Result<Response, Problem> {
    let category = category(&segment)?;
    operator.may_change()?;
    let Json(link) = body.map_err(bad_json)?;
    confirmed(Ok(Json(Confirmed { confirm: link.confirm })), "linking")?;
    let target = match (link.dn, link.entry_id) {
        (Some(dn), None) => LinkTarget::Dn(dn),
        (None, Some(id)) => LinkTarget::EntryId(id),
        _ => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                "name the entry with dn or entry_id, one of them",
            ));
        }
    };
    let mut store = state.store.lock().await;
    let who = operator.journaled();
    let report = super::link(&state.config, &mut store, &connector, category, &name, &target, &who).await?;
    Ok(Json(report).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct JournalParams {
    connector: Option<String>,
    object: Option<String>,
    /// The most recent lines (1–1000; 100 when unset).
    #[serde(default = "default_journal_limit")]
    limit: usize,
}

fn default_journal_limit() -> usize {
    100
}

#[utoipa::path(get, path = "/api/v1/journal", summary = "The latest journal lines", params(JournalParams), responses((status = 200, body = Vec<JournalEntry>)), security(("bearer" = [])))]
async fn journal(
    State(state): State<Arc<ApiState>>,
    _operator: Operator,
    query: Result<Query<JournalParams>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(params) = query.map_err(bad_query)?;
    let query = JournalQuery {
        connector: params.connector,
        object: params.object,
        limit: params.limit.clamp(1, super::MAX_PAGE),
    };
    let entries = with_store(&state, |config, store| super::journal(config, store, &query)).await?;
    Ok(Json(entries).into_response())
}

//! The admin HTTP API: JSON under `/api/v1`, over the admin core, for
//! operators' scripts and the application side — objects, associations,
//! connectors and their passes, disputes, the journal, the change feed
//! (pages, long polls, server-sent events) and webhooks. Who may call is
//! `auth`'s; every error is a problem document with a stable `code`, and a
//! client's mistake is a 4xx, never a 500.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete as delete_route, get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tracing::info;

use super::auth::{self, Operator};
use super::feed::{self, FeedChange, FeedPage};
use super::http::Peer;
use super::state::{AdminState, Problem, ProblemDocument, bad_json, bad_query};
use super::webhooks::{self, WebhookView};
use super::{
    AdminError, AssociationView, Cluster, ConnectorView, DeleteOptions, Deleted, DisputeView, ListQuery, ObjectEdit,
    ObjectView, Outcome, Page,
};
use crate::model::{Action, Category, ChangeSource, Role};
use crate::store::{
    self, ApiToken, Association, ConsumerState, Cursor, DeadLetter, JournalLine, JournalQuery, LocalObject,
};
use crate::sync::engine::{Comparison, LinkTarget, PassOptions};
use crate::sync::progress::Quiet;
use crate::worker::Poll;

/// The OpenAPI document, from the handlers' annotations and the types.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "ldapsync admin API", description = "See docs/admin-api.md."),
    paths(
        login,
        logout,
        whoami,
        instances,
        connectors,
        sync,
        list,
        show,
        compare,
        create,
        edit,
        delete,
        associations,
        association,
        remove_association,
        link,
        disputes,
        journal,
        changes,
        stream,
        consumers,
        acknowledge,
        webhooks_list,
        dead_letters,
        retry_dead_letter,
        discard_dead_letter,
        tokens
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

pub fn router() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/login", post(login))
        .route("/api/v1/logout", post(logout))
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/instances", get(instances))
        .route("/api/v1/connectors", get(connectors))
        .route("/api/v1/connectors/{connector}/sync", post(sync))
        .route("/api/v1/associations", get(associations))
        .route(
            "/api/v1/associations/{connector}/{category}/{name}",
            get(association).delete(remove_association).put(link),
        )
        .route("/api/v1/disputes", get(disputes))
        .route("/api/v1/journal", get(journal))
        .route("/api/v1/changes", get(changes))
        .route("/api/v1/changes/stream", get(stream))
        .route("/api/v1/changes/consumers", get(consumers))
        .route("/api/v1/changes/consumers/{name}", put(acknowledge))
        .route("/api/v1/webhooks", get(webhooks_list))
        .route("/api/v1/webhooks/dead-letters", get(dead_letters))
        .route("/api/v1/webhooks/dead-letters/{id}", delete_route(discard_dead_letter))
        .route("/api/v1/webhooks/dead-letters/{id}/retry", post(retry_dead_letter))
        .route("/api/v1/tokens", get(tokens))
        .route("/api/v1/{category}", get(list).post(create))
        .route("/api/v1/{category}/{name}", get(show).patch(edit).delete(delete))
        .route("/api/v1/{category}/{name}/compare", get(compare))
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "no-such-resource", "see docs/admin-api.md") })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Login {
    username: String,
    password: String,
}

#[derive(Serialize, utoipa::ToSchema)]
struct LoggedIn {
    /// For `Authorization: Bearer`; a browser gets the same session as a
    /// cookie.
    token: String,
    /// Sent as `X-CSRF-Token` with every change a cookie authenticates.
    csrf: String,
    operator: String,
    role: Role,
    /// Seconds a session holds without being used.
    timeout: u64,
}

#[utoipa::path(post, path = "/api/v1/login", summary = "Log in with directory credentials", request_body = Login, responses((status = 200, body = LoggedIn), (status = 401, body = ProblemDocument), (status = 403, body = ProblemDocument), (status = 429, body = ProblemDocument)))]
async fn login(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    body: Result<Json<Login>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(login) = body.map_err(bad_json)?;
    let (token, session) = auth::log_in(&state, peer.ip(), &login.username, &login.password).await?;
    let cookie = auth::session_cookie(Some(&token), state.config.admin.tls.is_some());
    let body = LoggedIn {
        token,
        csrf: session.csrf,
        operator: session.operator,
        role: session.role,
        timeout: state.sessions.timeout().as_secs(),
    };
    Ok(([(header::SET_COOKIE, cookie)], Json(body)).into_response())
}

#[utoipa::path(post, path = "/api/v1/logout", summary = "End the session", responses((status = 204)), security(("bearer" = [])))]
async fn logout(State(state): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    auth::log_out(&state, &headers);
    let cookie = auth::session_cookie(None, state.config.admin.tls.is_some());
    (StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response()
}

#[utoipa::path(get, path = "/api/v1/whoami", summary = "The operator and role of the session", responses((status = 200, body = Object), (status = 401, body = ProblemDocument)), security(("bearer" = [])))]
async fn whoami(operator: Operator) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "operator": operator.name, "role": operator.role }))
}

#[utoipa::path(get, path = "/api/v1/instances", summary = "The instances sharing the store and the connectors' leases (null on SQLite: one instance)", responses((status = 200, body = Option<Cluster>)), security(("bearer" = [])))]
async fn instances(State(state): State<Arc<AdminState>>, _operator: Operator) -> Result<Response, Problem> {
    let cluster = state.with_store(|config, store| super::cluster(config, store)).await?;
    Ok(Json(cluster).into_response())
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

#[utoipa::path(get, path = "/api/v1/{category}", summary = "A page of local accounts or groups", params(("category" = String, Path, description = "accounts or groups"), ListQuery), responses((status = 200, body = Page<LocalObject>), (status = 401, body = ProblemDocument)), security(("bearer" = [])))]
async fn list(
    State(state): State<Arc<AdminState>>,
    _operator: Operator,
    Path(segment): Path<String>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let category = category(&segment)?;
    let Query(query) = query.map_err(bad_query)?;
    let page = state
        .with_store(|_, store| super::list(store, category, &query))
        .await?;
    Ok(Json(page).into_response())
}

#[utoipa::path(get, path = "/api/v1/{category}/{name}", summary = "One object and its associations", params(("category" = String, Path, description = "accounts or groups"), ("name" = String, Path)), responses((status = 200, body = ObjectView), (status = 404, body = ProblemDocument)), security(("bearer" = [])))]
async fn show(
    State(state): State<Arc<AdminState>>,
    _operator: Operator,
    Path((segment, name)): Path<(String, String)>,
) -> Result<Response, Problem> {
    let category = category(&segment)?;
    let view = state.with_store(|_, store| super::show(store, category, &name)).await?;
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
    State(state): State<Arc<AdminState>>,
    operator: Operator,
    Path(segment): Path<String>,
    body: Result<Json<Create>, JsonRejection>,
) -> Result<Response, Problem> {
    let category = category(&segment)?;
    operator.may_change()?;
    let Json(Create { name, edit }) = body.map_err(bad_json)?;
    let who = operator.journaled();
    let object = state
        .with_store(|config, store| super::create(config, store, category, &name, &edit, &who))
        .await?;
    Ok((StatusCode::CREATED, Json(object)).into_response())
}

#[utoipa::path(patch, path = "/api/v1/{category}/{name}", summary = "Change a local object", params(("category" = String, Path, description = "accounts or groups"), ("name" = String, Path)), request_body = ObjectEdit, responses((status = 200, body = LocalObject), (status = 404, body = ProblemDocument), (status = 422, body = ProblemDocument)), security(("bearer" = [])))]
async fn edit(
    State(state): State<Arc<AdminState>>,
    operator: Operator,
    Path((segment, name)): Path<(String, String)>,
    body: Result<Json<ObjectEdit>, JsonRejection>,
) -> Result<Response, Problem> {
    let category = category(&segment)?;
    operator.may_change()?;
    let Json(edit) = body.map_err(bad_json)?;
    let who = operator.journaled();
    let object = state
        .with_store(|config, store| super::edit(config, store, category, &name, &edit, &who))
        .await?;
    Ok(Json(object).into_response())
}

#[utoipa::path(delete, path = "/api/v1/{category}/{name}", summary = "Delete a local object (an associated one as its connector says)", params(("category" = String, Path, description = "accounts or groups"), ("name" = String, Path), DeleteOptions), responses((status = 200, body = Deleted), (status = 404, body = ProblemDocument)), security(("bearer" = [])))]
async fn delete(
    State(state): State<Arc<AdminState>>,
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
async fn connectors(State(state): State<Arc<AdminState>>, _operator: Operator) -> Result<Response, Problem> {
    let listed = state
        .with_store(|config, store| super::connectors(config, store))
        .await?;
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
    State(state): State<Arc<AdminState>>,
    _operator: Operator,
    query: Result<Query<AssociationQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(query) = query.map_err(bad_query)?;
    let listed = state
        .with_store(|config, store| super::associations(config, store, query.connector.as_deref()))
        .await?;
    Ok(Json(listed).into_response())
}

#[utoipa::path(get, path = "/api/v1/associations/{connector}/{category}/{name}", summary = "One object's association with a connector", params(("connector" = String, Path), ("category" = String, Path, description = "accounts or groups"), ("name" = String, Path)), responses((status = 200, body = Association), (status = 404, body = ProblemDocument)), security(("bearer" = [])))]
async fn association(
    State(state): State<Arc<AdminState>>,
    _operator: Operator,
    Path((connector, segment, name)): Path<(String, String, String)>,
) -> Result<Response, Problem> {
    let category = category(&segment)?;
    let found = state
        .with_store(|config, store| super::association(config, store, &connector, category, &name))
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
    State(state): State<Arc<AdminState>>,
    operator: Operator,
    Path((connector, segment, name)): Path<(String, String, String)>,
    body: Result<Json<Confirmed>, JsonRejection>,
) -> Result<StatusCode, Problem> {
    let category = category(&segment)?;
    operator.may_change()?;
    confirmed(body, "removing an association")?;
    let who = operator.journaled();
    state
        .with_store(|config, store| super::remove_association(config, store, &connector, category, &name, &who))
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
    State(state): State<Arc<AdminState>>,
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

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
struct SyncRequest {
    /// Decide and report, change nothing.
    dry_run: bool,
    /// Apply deletes past the mass-delete guard.
    confirm_deletes: bool,
}

#[utoipa::path(post, path = "/api/v1/connectors/{connector}/sync", summary = "Run a full pass now, or a dry run (its plan)", params(("connector" = String, Path)), request_body = SyncRequest, responses((status = 200, body = Outcome), (status = 403, body = ProblemDocument), (status = 422, body = ProblemDocument), (status = 503, body = ProblemDocument)), security(("bearer" = [])))]
async fn sync(
    State(state): State<Arc<AdminState>>,
    operator: Operator,
    Path(connector): Path<String>,
    body: Result<Json<SyncRequest>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(request) = body.map_err(bad_json)?;
    // A dry run changes nothing: an auditor may see the plan.
    if !request.dry_run {
        operator.may_change()?;
    }
    let who = operator.journaled();
    let outcome = run_pass(&state, &connector, request.dry_run, request.confirm_deletes, &who).await?;
    Ok(Json(outcome).into_response())
}

/// A connector's full pass on a store connection of its own: a pass is
/// long, and the server's connection serves every other request.
pub async fn run_pass(
    state: &AdminState,
    connector: &str,
    dry_run: bool,
    confirm_deletes: bool,
    operator: &str,
) -> Result<Outcome, Problem> {
    let config = &state.config;
    config.require_connector(connector).map_err(AdminError::from)?;
    // A dry run changes nothing: any number may run.
    let _running = match dry_run {
        true => None,
        false => Some(state.start_pass(connector)?),
    };
    info!(%operator, %connector, dry_run, confirm_deletes, "admin server: a full pass requested");
    if !dry_run {
        state
            .with_store(|config, store| {
                super::journal_pass_request(config, store, connector, confirm_deletes, operator)
            })
            .await?;
    }
    let settings = config.store.clone();
    let mut store = tokio::task::spawn_blocking(move || store::open(&settings))
        .await
        .map_err(|e| Problem::new(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", e.to_string()))?
        .map_err(AdminError::from)?;
    let poll = Poll::Full(PassOptions {
        dry_run,
        confirm_deletes,
    });
    let outcome = super::sync(config, &mut store, connector, poll, &mut Quiet).await?;
    Ok(Outcome::new(connector, outcome.report))
}

#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields, default)]
#[into_params(parameter_in = Query)]
struct CompareQuery {
    /// The connector whose entry is compared; the object's only
    /// association's when unset.
    connector: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/{category}/{name}/compare", summary = "Local, directory and baseline values side by side, and what the next pass would do", params(("category" = String, Path, description = "accounts or groups"), ("name" = String, Path), CompareQuery), responses((status = 200, body = Comparison), (status = 404, body = ProblemDocument), (status = 503, body = ProblemDocument)), security(("bearer" = [])))]
async fn compare(
    State(state): State<Arc<AdminState>>,
    _operator: Operator,
    Path((segment, name)): Path<(String, String)>,
    query: Result<Query<CompareQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let category = category(&segment)?;
    let Query(query) = query.map_err(bad_query)?;
    let comparison = compare_object(&state, category, &name, query.connector).await?;
    Ok(Json(comparison).into_response())
}

/// The comparison of an object with its entry of `connector`, or of its
/// only association's connector.
pub async fn compare_object(
    state: &AdminState,
    category: Category,
    name: &str,
    connector: Option<String>,
) -> Result<Comparison, Problem> {
    let mut store = state.store.lock().await;
    let connector = match connector {
        Some(connector) => connector,
        None => {
            let view = super::show(&store, category, name)?;
            match view.associations.as_slice() {
                [only] => only.connector.clone(),
                [] => {
                    return Err(Problem::new(
                        StatusCode::NOT_FOUND,
                        "no-association",
                        format!("{category} {name} has no association to compare"),
                    ));
                }
                _ => {
                    return Err(Problem::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid",
                        format!("{category} {name} has several associations: name the connector (?connector=)"),
                    ));
                }
            }
        }
    };
    Ok(super::compare(&state.config, &mut store, &connector, category, name).await?)
}

#[utoipa::path(get, path = "/api/v1/disputes", summary = "The disputes each connector's last full pass left, with their candidates", responses((status = 200, body = Vec<DisputeView>)), security(("bearer" = [])))]
async fn disputes(State(state): State<Arc<AdminState>>, _operator: Operator) -> Result<Response, Problem> {
    let listed = state.with_store(|config, store| super::disputes(config, store)).await?;
    Ok(Json(listed).into_response())
}

#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields, default)]
#[into_params(parameter_in = Query)]
pub struct JournalParams {
    pub connector: Option<String>,
    pub object: Option<String>,
    /// An action (`updated`, `conflict-resolved`, `disputed`, …).
    #[param(value_type = Option<String>)]
    #[serde(deserialize_with = "empty_as_none")]
    pub action: Option<Action>,
    /// `proxy`, `poll` or `local`.
    #[param(value_type = Option<String>)]
    #[serde(deserialize_with = "empty_as_none")]
    pub source: Option<ChangeSource>,
    /// Lines at or after this time (seconds since the epoch).
    pub since: Option<i64>,
    /// Lines before this time.
    pub until: Option<i64>,
    /// Lines older than this id: the next page back (`next_before`).
    pub before: Option<i64>,
    /// Lines per page (1–1000; 100 when unset).
    pub limit: Option<usize>,
}

/// A filter left empty (a form's "any") filters nothing.
fn empty_as_none<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    let text: Option<String> = Option::deserialize(deserializer)?;
    match text.as_deref() {
        None | Some("") => Ok(None),
        Some(text) => text.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

impl JournalParams {
    pub fn query(self) -> JournalQuery {
        JournalQuery {
            connector: self.connector,
            object: self.object,
            action: self.action,
            source: self.source,
            since: self.since,
            until: self.until,
            before: self.before,
            limit: self.limit.unwrap_or(100).clamp(1, super::MAX_PAGE),
        }
    }
}

/// A page of the journal, oldest first, and where the page before it ends.
#[derive(Serialize, utoipa::ToSchema)]
pub struct JournalPage {
    pub lines: Vec<JournalLine>,
    /// `before=` for the page of older lines, when there may be one.
    pub next_before: Option<i64>,
}

pub fn journal_page(lines: Vec<JournalLine>, limit: usize) -> JournalPage {
    let next_before = match lines.len() >= limit {
        true => lines.first().map(|l| l.id),
        false => None,
    };
    JournalPage { lines, next_before }
}

#[utoipa::path(get, path = "/api/v1/journal", summary = "Journal lines, filtered, newest page first", params(JournalParams), responses((status = 200, body = JournalPage)), security(("bearer" = [])))]
async fn journal(
    State(state): State<Arc<AdminState>>,
    _operator: Operator,
    query: Result<Query<JournalParams>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(params) = query.map_err(bad_query)?;
    let query = params.query();
    let limit = query.limit;
    let lines = state
        .with_store(|config, store| super::journal(config, store, &query))
        .await?;
    Ok(Json(journal_page(lines, limit)).into_response())
}

#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields, default)]
#[into_params(parameter_in = Query)]
struct FeedQuery {
    /// Changes after this cursor (`next` of the last page).
    after: Option<String>,
    /// A consumer whose acknowledged cursor is the start (instead of
    /// `after`); a new one starts at the oldest change held.
    consumer: Option<String>,
    /// Changes per page (1–1000; 100 when unset).
    limit: Option<usize>,
    /// Seconds to wait for a change when there is none (0–60): a long poll.
    wait: Option<u64>,
}

const MAX_WAIT: u64 = 60;
/// How often a waiting reader looks at the store: the feed may be written
/// by another instance, so there is nothing to be told by.
const FEED_POLL: Duration = Duration::from_millis(500);

fn cursor(text: &str) -> Result<Cursor, Problem> {
    text.parse()
        .map_err(|why: String| Problem::new(StatusCode::BAD_REQUEST, "bad-cursor", why))
}

impl FeedQuery {
    async fn start(&self, state: &AdminState) -> Result<Cursor, Problem> {
        match (&self.after, &self.consumer) {
            (Some(_), Some(_)) => Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "bad-query",
                "say after or consumer, not both",
            )),
            (Some(after), None) => cursor(after),
            (None, Some(name)) => {
                let name = name.clone();
                state
                    .with_store(move |_, store| feed::consumer_cursor(store, &name))
                    .await
            }
            // From the oldest change kept.
            (None, None) => {
                state
                    .with_store(|_, store| Ok(store::AdminStore::pruned_through(store)?))
                    .await
            }
        }
    }
}

#[utoipa::path(get, path = "/api/v1/changes", summary = "Changes to the local store in commit order (a page, or a long poll with wait=)", params(FeedQuery), responses((status = 200, body = FeedPage), (status = 400, body = ProblemDocument), (status = 410, body = ProblemDocument)), security(("bearer" = [])))]
async fn changes(
    State(state): State<Arc<AdminState>>,
    _operator: Operator,
    query: Result<Query<FeedQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(query) = query.map_err(bad_query)?;
    let after = query.start(&state).await?;
    let limit = query.limit.unwrap_or(100);
    let wait = Duration::from_secs(query.wait.unwrap_or(0).min(MAX_WAIT));
    let read = |after: Cursor| state.with_store(move |_, store| feed::changes(store, after, limit));
    let page = read(after).await?;
    if !page.changes.is_empty() || wait.is_zero() {
        return Ok(Json(page).into_response());
    }
    let _slot = state.waiting.try_acquire().map_err(|_| too_many_waiting())?;
    let deadline = Instant::now() + wait;
    loop {
        tokio::time::sleep(FEED_POLL).await;
        let page = read(after).await?;
        if !page.changes.is_empty() || Instant::now() >= deadline {
            return Ok(Json(page).into_response());
        }
    }
}

fn too_many_waiting() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too-many-waiting",
        "too many readers are waiting for changes; retry shortly",
    )
}

#[utoipa::path(get, path = "/api/v1/changes/stream", summary = "Changes as server-sent events (id: the cursor; resumes from Last-Event-ID)", params(FeedQuery), responses((status = 200, content_type = "text/event-stream", body = FeedChange)), security(("bearer" = [])))]
async fn stream(
    State(state): State<Arc<AdminState>>,
    _operator: Operator,
    headers: HeaderMap,
    query: Result<Query<FeedQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(query) = query.map_err(bad_query)?;
    let resumed = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let after = match resumed {
        Some(id) => cursor(id)?,
        None => query.start(&state).await?,
    };
    // Refused before the stream starts, rather than as an event.
    state.with_store(move |_, store| feed::changes(store, after, 1)).await?;
    let slot = Arc::clone(&state.waiting)
        .try_acquire_owned()
        .map_err(|_| too_many_waiting())?;
    let events = futures_util::stream::unfold((state, after, slot), |(state, after, slot)| async move {
        loop {
            let read = state
                .with_store(move |_, store| feed::changes(store, after, feed::MAX_CHANGES))
                .await;
            match read {
                Ok(page) if !page.changes.is_empty() => {
                    let events: Vec<Result<Event, Infallible>> = page.changes.iter().map(|c| Ok(event(c))).collect();
                    return Some((futures_util::stream::iter(events), (state, page.next, slot)));
                }
                Ok(_) => tokio::time::sleep(FEED_POLL).await,
                // The client reconnects with Last-Event-ID when the store is back.
                Err(_) => return None,
            }
        }
    });
    let events = futures_util::StreamExt::flatten(events);
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

fn event(change: &FeedChange) -> Event {
    Event::default()
        .id(change.cursor.to_string())
        .event("change")
        .data(serde_json::to_string(change).expect("a change serializes"))
}

#[utoipa::path(get, path = "/api/v1/changes/consumers", summary = "The feed's consumers and their acknowledged cursors", responses((status = 200, body = Vec<ConsumerState>)), security(("bearer" = [])))]
async fn consumers(State(state): State<Arc<AdminState>>, _operator: Operator) -> Result<Response, Problem> {
    let listed = state
        .with_store(|_, store| Ok(store::AdminStore::cursors(store, feed::CONSUMER)?))
        .await?;
    Ok(Json(listed).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Acknowledge {
    /// Every change up to this one is handled.
    cursor: String,
}

#[utoipa::path(put, path = "/api/v1/changes/consumers/{name}", summary = "Acknowledge a consumer's changes up to a cursor (durable)", params(("name" = String, Path)), request_body = Acknowledge, responses((status = 204), (status = 400, body = ProblemDocument)), security(("bearer" = [])))]
async fn acknowledge(
    State(state): State<Arc<AdminState>>,
    _operator: Operator,
    Path(name): Path<String>,
    body: Result<Json<Acknowledge>, JsonRejection>,
) -> Result<StatusCode, Problem> {
    let Json(ack) = body.map_err(bad_json)?;
    let at = cursor(&ack.cursor)?;
    state
        .with_store(move |_, store| feed::acknowledge(store, &name, at))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/webhooks", summary = "The configured webhooks, where each has delivered to, and their dead letters", responses((status = 200, body = Vec<WebhookView>)), security(("bearer" = [])))]
async fn webhooks_list(State(state): State<Arc<AdminState>>, _operator: Operator) -> Result<Response, Problem> {
    let listed = state.with_store(|config, store| webhooks::views(config, store)).await?;
    Ok(Json(listed).into_response())
}

#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields, default)]
#[into_params(parameter_in = Query)]
struct DeadLetterQuery {
    webhook: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/webhooks/dead-letters", summary = "Changes a webhook gave up on", params(DeadLetterQuery), responses((status = 200, body = Vec<DeadLetter>)), security(("bearer" = [])))]
async fn dead_letters(
    State(state): State<Arc<AdminState>>,
    _operator: Operator,
    query: Result<Query<DeadLetterQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(query) = query.map_err(bad_query)?;
    let listed = state
        .with_store(move |_, store| Ok(store::AdminStore::dead_letters(store, query.webhook.as_deref())?))
        .await?;
    Ok(Json(listed).into_response())
}

#[utoipa::path(post, path = "/api/v1/webhooks/dead-letters/{id}/retry", summary = "Deliver a dead letter again now; it goes when delivered", params(("id" = i64, Path)), responses((status = 204), (status = 404, body = ProblemDocument), (status = 502, body = ProblemDocument)), security(("bearer" = [])))]
async fn retry_dead_letter(
    State(state): State<Arc<AdminState>>,
    operator: Operator,
    Path(id): Path<i64>,
) -> Result<StatusCode, Problem> {
    operator.may_change()?;
    webhooks::retry_dead_letter(&state, id, &operator.journaled()).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/api/v1/webhooks/dead-letters/{id}", summary = "Discard a dead letter", params(("id" = i64, Path)), responses((status = 204), (status = 404, body = ProblemDocument)), security(("bearer" = [])))]
async fn discard_dead_letter(
    State(state): State<Arc<AdminState>>,
    operator: Operator,
    Path(id): Path<i64>,
) -> Result<StatusCode, Problem> {
    operator.may_change()?;
    let who = operator.journaled();
    state
        .with_store(move |_, store| webhooks::discard_dead_letter(store, id, &who))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/tokens", summary = "The API tokens (names and roles; the CLI creates and revokes them)", responses((status = 200, body = Vec<ApiToken>), (status = 403, body = ProblemDocument)), security(("bearer" = [])))]
async fn tokens(State(state): State<Arc<AdminState>>, operator: Operator) -> Result<Response, Problem> {
    operator.may_change()?;
    let listed = state.with_store(|_, store| super::tokens(store)).await?;
    Ok(Json(listed).into_response())
}

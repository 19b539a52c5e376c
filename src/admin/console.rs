//! The web console under `/console`: pages rendered by the server (maud
//! escapes every value), no script, the style sheet embedded in the
//! binary. Operators log in with their directory credentials (`auth`);
//! the session travels as a `SameSite=Strict`, `HttpOnly` cookie and every
//! form that changes something carries the session's CSRF token. Each
//! action calls the admin core, as the API and the CLI do, and the ones
//! that change an association or run a pass ask for a confirmation.

use std::sync::Arc;

use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{ConnectInfo, Form, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use super::api::{JournalParams, compare_object, journal_page, run_pass};
use super::auth::{self, ConsoleOperator, Operator};
use super::http::Peer;
use super::state::{AdminState, Problem, bad_form, bad_query};
use super::{AdminError, ConnectorView, DisputeView, ListQuery, Outcome};
use crate::model::{Action, Category, ChangeSource, Role};
use crate::store::{JournalLine, JournalQuery};
use crate::sync::engine::{Comparison, LinkTarget};

const STYLE: &str = include_str!("console.css");

pub fn router() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/console", get(dashboard))
        .route("/console/", get(|| async { Redirect::to("/console") }))
        .route("/console/style.css", get(style))
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/connectors/{name}", get(connector))
        .route("/console/connectors/{name}/dry-run", post(dry_run))
        .route("/console/connectors/{name}/sync", post(run))
        .route("/console/objects", get(objects))
        .route("/console/objects/{category}/{name}", get(object))
        .route("/console/disputes", get(disputes))
        .route("/console/disputes/link", post(link))
        .route("/console/associations/remove", post(remove_association))
        .route("/console/journal", get(journal))
        .layer(middleware::map_response(headers))
}

/// No page of the console may be framed, sniffed, or load anything from
/// elsewhere.
async fn headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
}

/// An object's page, its name escaped as a path segment.
fn object_href(category: Category, name: &str) -> String {
    let mut url = url::Url::parse("http://console/console/objects").expect("a constant URL");
    if let Ok(mut segments) = url.path_segments_mut() {
        segments.push(category.as_str()).push(name);
    }
    url.path().to_owned()
}

fn time(secs: i64) -> String {
    super::timestamp(secs)
}

/// A page: the navigation, the operator, and `body`.
fn page(title: &str, operator: Option<&Operator>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " — ldapsync" }
                link rel="stylesheet" href="/console/style.css";
            }
            body {
                a.skip href="#main" { "Skip to the content" }
                header {
                    span.brand { "ldapsync" }
                    @if let Some(operator) = operator {
                        nav aria-label="Sections" {
                            a href="/console" { "Dashboard" }
                            a href="/console/objects" { "Objects" }
                            a href="/console/disputes" { "Disputes" }
                            a href="/console/journal" { "Journal" }
                        }
                        form.logout method="post" action="/console/logout" {
                            (csrf(operator))
                            span.who { (operator.name) " (" (operator.role) ")" }
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main id="main" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

fn csrf(operator: &Operator) -> Markup {
    html! { input type="hidden" name="csrf" value=(operator.csrf.as_deref().unwrap_or_default()); }
}

/// A problem as a page, with the status it has.
fn problem_page(operator: Option<&Operator>, problem: Problem) -> Response {
    let status = problem.status;
    let body = html! {
        p.error role="alert" { (problem.detail) }
        p { a href="/console" { "Dashboard" } }
    };
    (
        status,
        page(status.canonical_reason().unwrap_or("Error"), operator, body),
    )
        .into_response()
}

type PageResult = Result<Response, Response>;

fn failed(operator: &Operator) -> impl Fn(Problem) -> Response + '_ {
    move |problem| problem_page(Some(operator), problem)
}

/// A form that acts: whole, posted from a page of this session (its CSRF
/// token), and, when `admins_only`, by an admin.
fn acting<T>(
    operator: &Operator,
    form: Result<Form<T>, FormRejection>,
    csrf: impl Fn(&T) -> Option<&str>,
    admins_only: bool,
) -> Result<T, Problem> {
    let Form(form) = form.map_err(bad_form)?;
    operator.check_csrf(csrf(&form))?;
    if admins_only {
        operator.may_change()?;
    }
    Ok(form)
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct LoginForm {
    username: String,
    password: String,
}

async fn login_page() -> Markup {
    login_form(None)
}

fn login_form(error: Option<&str>) -> Markup {
    page(
        "Log in",
        None,
        html! {
            @if let Some(error) = error {
                p.error role="alert" { (error) }
            }
            form.login method="post" action="/console/login" {
                label for="username" { "Directory user name" }
                input id="username" name="username" autocomplete="username" required autofocus;
                label for="password" { "Password" }
                input id="password" name="password" type="password" autocomplete="current-password" required;
                button type="submit" { "Log in" }
            }
        },
    )
}

async fn login(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return (
            StatusCode::BAD_REQUEST,
            login_form(Some("The form did not arrive whole.")),
        )
            .into_response();
    };
    match auth::log_in(&state, peer.ip(), &form.username, &form.password).await {
        Ok((token, _)) => {
            let cookie = auth::session_cookie(Some(&token), state.config.admin.tls.is_some());
            ([(header::SET_COOKIE, cookie)], Redirect::to("/console")).into_response()
        }
        Err(problem) => (problem.status, login_form(Some(&problem.detail))).into_response(),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CsrfForm {
    csrf: Option<String>,
}

async fn logout(
    State(state): State<Arc<AdminState>>,
    ConsoleOperator(operator): ConsoleOperator,
    headers: axum::http::HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> PageResult {
    acting(&operator, form, |f| f.csrf.as_deref(), false).map_err(failed(&operator))?;
    auth::log_out(&state, &headers);
    let cookie = auth::session_cookie(None, state.config.admin.tls.is_some());
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/console/login")).into_response())
}

fn connectors_table(connectors: &[ConnectorView], disputes: &[DisputeView]) -> Markup {
    html! {
        table {
            caption { "Connectors" }
            thead { tr {
                th scope="col" { "Connector" } th scope="col" { "Direction" } th scope="col" { "Conflicts" }
                th scope="col" { "Last poll" } th scope="col" { "Last full pass" } th scope="col" { "Health" }
                th scope="col" { "Held deletes" } th scope="col" { "Disputes" }
            } }
            tbody {
                @for c in connectors {
                    @let disputed = disputes.iter().filter(|d| d.connector == c.name).count();
                    tr {
                        th scope="row" { a href={ "/console/connectors/" (c.name) } { (c.name) } }
                        td { (c.direction) } td { (c.conflict) }
                        td { (c.last_poll_at.map(time).unwrap_or_else(|| "never".into())) }
                        td { (c.last_sync_at.map(time).unwrap_or_else(|| "never".into())) }
                        td {
                            @if let Some(error) = &c.last_error { span.bad { "error: " (error) } }
                            @else if let Some(why) = &c.out_of_sync { span.warn { "full pass due: " (why) } }
                            @else { span.good { "ok" } }
                        }
                        td.num { (c.held_deletes.len()) }
                        td.num { @if disputed > 0 { a href="/console/disputes" { (disputed) } } @else { "0" } }
                    }
                }
            }
        }
    }
}

async fn dashboard(State(state): State<Arc<AdminState>>, ConsoleOperator(operator): ConsoleOperator) -> PageResult {
    let (connectors, disputes, cluster, webhooks) = state
        .with_store(|config, store| {
            Ok((
                super::connectors(config, store)?,
                super::disputes(config, store)?,
                super::cluster(config, store)?,
                super::webhooks::views(config, store)?,
            ))
        })
        .await
        .map_err(failed(&operator))?;
    let held: usize = connectors.iter().map(|c| c.held_deletes.len()).sum();
    let body = html! {
        section aria-labelledby="attention" {
            h2 id="attention" { "Needs attention" }
            @if held == 0 && disputes.is_empty() {
                p.good { "Nothing: no held deletes, no disputes." }
            } @else {
                ul {
                    @if !disputes.is_empty() {
                        li { a href="/console/disputes" { (disputes.len()) " dispute(s)" } " to settle" }
                    }
                    @for c in &connectors {
                        @for h in &c.held_deletes {
                            li { "Held delete: " (h.category) " " (h.name) " (" (h.dn) ") on "
                                a href={ "/console/connectors/" (c.name) } { (c.name) } }
                        }
                    }
                }
            }
        }
        section aria-labelledby="connectors" {
            h2 id="connectors" { "Connectors" }
            (connectors_table(&connectors, &disputes))
        }
        section aria-labelledby="instances" {
            h2 id="instances" { "Instances" }
            @match &cluster {
                None => p { "One instance on an embedded (SQLite) store." },
                Some(cluster) => table {
                    caption { "Instances sharing the store" }
                    thead { tr { th scope="col" { "Instance" } th scope="col" { "Version" } th scope="col" { "Alive" } th scope="col" { "Syncs" } } }
                    tbody { @for i in &cluster.instances { tr {
                        th scope="row" { (i.instance.id) } td { (i.instance.version) }
                        td { @if i.alive { span.good { "yes" } } @else { span.bad { "no" } } }
                        td { (i.holds.join(", ")) }
                    } } }
                },
            }
        }
        @if !webhooks.is_empty() {
            section aria-labelledby="webhooks" {
                h2 id="webhooks" { "Webhooks" }
                table {
                    caption { "Webhooks" }
                    thead { tr { th scope="col" { "Webhook" } th scope="col" { "URL" } th scope="col" { "Delivered to" } th scope="col" { "Dead letters" } } }
                    tbody { @for w in &webhooks { tr {
                        th scope="row" { (w.name) } td { (w.url) }
                        td { (w.cursor.as_deref().unwrap_or("not started")) }
                        td.num { (w.dead_letters) }
                    } } }
                }
            }
        }
    };
    Ok(page("Dashboard", Some(&operator), body).into_response())
}

fn journal_table(lines: &[JournalLine]) -> Markup {
    html! {
        table.journal {
            caption { "Journal" }
            thead { tr {
                th scope="col" { "When" } th scope="col" { "Connector" } th scope="col" { "Object" }
                th scope="col" { "Source" } th scope="col" { "Action" } th scope="col" { "Detail" }
            } }
            tbody { @for line in lines.iter().rev() {
                @let e = &line.entry;
                tr {
                    td { (time(e.at)) } td { (if e.connector.is_empty() { "-" } else { &e.connector }) }
                    td {
                        // "*": a line about the connector's whole scope (a pass, held deletes).
                        @if e.object == "*" { (e.category) "s" }
                        @else { a href=(object_href(e.category, &e.object)) { (e.category) " " (e.object) } }
                    }
                    td { (e.source) } td { span class={ "action " (e.action) } { (e.action) } }
                    td { (detail(e.action, &e.detail)) }
                }
            } }
        }
    }
}

/// A journal line's detail: the fields a decision changed, with the
/// values a conflict's losing side lost marked.
fn detail(action: Action, text: &str) -> Markup {
    let value: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    let lost = |side: &str| -> Vec<String> {
        value
            .pointer(&format!("/outcome/{side}"))
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|f| f.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    let (local_lost, ldap_lost) = (lost("local_lost"), lost("ldap_lost"));
    let changes = value.get("changes").and_then(|c| c.as_object());
    let show = |v: Option<&serde_json::Value>| -> String {
        match v.and_then(|v| v.as_array()) {
            Some(values) => values.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(", "),
            None => v.map(|v| v.to_string()).unwrap_or_default(),
        }
    };
    html! {
        @if let Some(operator) = value.get("operator").and_then(|o| o.as_str()) { span.who { "by " (operator) } " " }
        @if let Some(reason) = value.get("reason").and_then(|o| o.as_str()) { (reason) " " }
        @if let Some(changes) = changes.filter(|c| !c.is_empty()) {
            table.fields {
                thead { tr { th scope="col" { "Field" } th scope="col" { "Baseline" } th scope="col" { "Local" } th scope="col" { "Directory" } th scope="col" { "Result" } } }
                tbody { @for (field, change) in changes {
                    tr {
                        th scope="row" { (field) }
                        @if change.is_string() { td colspan="4" { (show(Some(change))) } }
                        @else {
                            td { (show(change.get("baseline"))) }
                            td class=[local_lost.contains(field).then_some("lost")] {
                                (show(change.get("local")))
                                @if local_lost.contains(field) { " " strong { "(lost)" } }
                            }
                            td class=[ldap_lost.contains(field).then_some("lost")] {
                                (show(change.get("directory")))
                                @if ldap_lost.contains(field) { " " strong { "(lost)" } }
                            }
                            td { (show(change.get("result"))) }
                        }
                    }
                } }
            }
        } @else if action != Action::Disputed {
            @if let Some(fields) = value.get("fields").and_then(|f| f.as_object()) {
                @for (field, change) in fields {
                    span.field { (field) ": " (show(change.get("old"))) " → " (show(change.get("new"))) } " "
                }
            }
        }
    }
}

async fn connector(
    State(state): State<Arc<AdminState>>,
    ConsoleOperator(operator): ConsoleOperator,
    Path(name): Path<String>,
) -> PageResult {
    let query = JournalQuery {
        connector: Some(name.clone()),
        limit: 20,
        ..JournalQuery::default()
    };
    let (view, lines) = state
        .with_store(|config, store| {
            config.require_connector(&name)?;
            let views = super::connectors(config, store)?;
            let view = views
                .into_iter()
                .find(|c| c.name == name)
                .ok_or_else(|| AdminError::Invalid(name.clone()))?;
            Ok((view, super::journal(config, store, &query)?))
        })
        .await
        .map_err(failed(&operator))?;
    let body = html! {
        dl.facts {
            dt { "Direction" } dd { (view.direction) }
            dt { "Conflict policy" } dd { (view.conflict) }
            dt { "Poll mechanism" } dd { (view.poll_mechanism.as_deref().unwrap_or("detected at the next poll")) }
            @for w in &view.watermarks {
                dt { "Watermark (" (w.category) ")" } dd { (w.mechanism) ", moved " (time(w.updated_at)) }
            }
            dt { "Last poll" } dd { (view.last_poll_at.map(time).unwrap_or_else(|| "never".into())) }
            dt { "Last full pass" } dd { (view.last_sync_at.map(time).unwrap_or_else(|| "never".into())) }
            @if let Some(why) = &view.out_of_sync { dt { "Out of sync" } dd.warn { (why) } }
            @if let Some(error) = &view.last_error { dt { "Last error" } dd.bad { (error) } }
            dt { "Held deletes" } dd { (view.held_deletes.len()) }
        }
        section aria-labelledby="pass" {
            h2 id="pass" { "Sync pass" }
            p { "A dry run compares every entry with its object and says what a pass would do, changing nothing." }
            form method="post" action={ "/console/connectors/" (view.name) "/dry-run" } {
                (csrf(&operator))
                button type="submit" { "Dry run" }
            }
        }
        section aria-labelledby="recent" {
            h2 id="recent" { "Recent journal" }
            (journal_table(&lines))
            p { a href={ "/console/journal?connector=" (view.name) } { "The whole journal of " (view.name) } }
        }
    };
    Ok(page(&format!("Connector {}", view.name), Some(&operator), body).into_response())
}

fn outcome_summary(outcome: &Outcome) -> Markup {
    let r = &outcome.report;
    html! {
        ul.counts {
            li { "associated: " (r.associated) } li { "created locally: " (r.created_local) }
            li { "created in the directory: " (r.created_ldap) } li { "updated: " (r.updated) }
            li { "conflicts: " (r.conflicts) } li { "disputed: " (r.disputed) }
            li { "deleted: " (r.deleted) } li { "disabled: " (r.disabled) }
            li { "deletes held: " (r.deletes_held) } li { "failed: " (r.failed) }
        }
        @if outcome.lines.is_empty() { p { "Nothing to do: every pair is in step." } }
        @else { ol.plan { @for line in &outcome.lines { li { (line) } } } }
    }
}

async fn dry_run(
    State(state): State<Arc<AdminState>>,
    ConsoleOperator(operator): ConsoleOperator,
    Path(name): Path<String>,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> PageResult {
    acting(&operator, form, |f| f.csrf.as_deref(), false).map_err(failed(&operator))?;
    let who = operator.journaled_from_console();
    let outcome = run_pass(&state, &name, true, false, &who)
        .await
        .map_err(failed(&operator))?;
    let body = html! {
        p { "What a full pass of " (name) " would do now (nothing was changed):" }
        (outcome_summary(&outcome))
        @if operator.role == Role::Admin {
            form method="post" action={ "/console/connectors/" (name) "/sync" } {
                (csrf(&operator))
                @if outcome.report.deletes_held > 0 {
                    p {
                        input type="checkbox" id="confirm_deletes" name="confirm_deletes" value="true";
                        label for="confirm_deletes" { "Also apply the deletes the mass-delete guard holds" }
                    }
                }
                p {
                    input type="checkbox" id="confirm" name="confirm" value="true" required;
                    label for="confirm" { "I have read the plan: run the pass" }
                }
                button type="submit" { "Run the pass" }
            }
        } @else {
            p { "An auditor may not run passes." }
        }
    };
    Ok(page(&format!("Dry run of {name}"), Some(&operator), body).into_response())
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RunForm {
    csrf: Option<String>,
    confirm: Option<String>,
    confirm_deletes: Option<String>,
}

fn confirmed(confirm: &Option<String>) -> Result<(), Problem> {
    match confirm.as_deref() {
        Some("true") => Ok(()),
        _ => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not-confirmed",
            "tick the confirmation box: this is done only when confirmed",
        )),
    }
}

async fn run(
    State(state): State<Arc<AdminState>>,
    ConsoleOperator(operator): ConsoleOperator,
    Path(name): Path<String>,
    form: Result<Form<RunForm>, FormRejection>,
) -> PageResult {
    let form = acting(&operator, form, |f| f.csrf.as_deref(), true).map_err(failed(&operator))?;
    confirmed(&form.confirm).map_err(failed(&operator))?;
    let confirm_deletes = form.confirm_deletes.as_deref() == Some("true");
    let who = operator.journaled_from_console();
    let outcome = run_pass(&state, &name, false, confirm_deletes, &who)
        .await
        .map_err(failed(&operator))?;
    let body = html! {
        p role="status" { "The pass of " (name) " ran:" }
        (outcome_summary(&outcome))
        p { a href={ "/console/connectors/" (name) } { "Back to " (name) } }
    };
    Ok(page(&format!("Pass of {name}"), Some(&operator), body).into_response())
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct SearchQuery {
    category: Option<Category>,
    q: Option<String>,
}

async fn objects(
    State(state): State<Arc<AdminState>>,
    ConsoleOperator(operator): ConsoleOperator,
    query: Result<Query<SearchQuery>, QueryRejection>,
) -> PageResult {
    let Query(query) = query.map_err(|r| problem_page(Some(&operator), bad_query(r)))?;
    let category = query.category.unwrap_or(Category::Account);
    let needle = query.q.clone().unwrap_or_default();
    let list = ListQuery {
        contains: Some(needle.clone()).filter(|n| !n.is_empty()),
        after: None,
        limit: Some(100),
    };
    let found = state
        .with_store(|_, store| super::list(store, category, &list))
        .await
        .map_err(failed(&operator))?;
    let body = html! {
        form.search method="get" action="/console/objects" role="search" {
            label for="category" { "Category" }
            select id="category" name="category" {
                @for c in Category::ALL {
                    option value=(c) selected[*c == category] { (c) "s" }
                }
            }
            label for="q" { "Name contains" }
            input id="q" name="q" type="search" value=(needle);
            button type="submit" { "Search" }
        }
        table {
            caption { (found.items.len()) " " (category) "(s)" @if found.next.is_some() { ", the first 100" } }
            thead { tr { th scope="col" { "Name" } th scope="col" { "Enabled" } th scope="col" { "Fields" } } }
            tbody { @for o in &found.items { tr {
                th scope="row" { a href=(object_href(o.category, &o.name)) { (o.name) } }
                td { @if o.enabled { "yes" } @else { "no" } }
                td { (o.values.keys().cloned().collect::<Vec<_>>().join(", ")) }
            } } }
        }
    };
    Ok(page("Objects", Some(&operator), body).into_response())
}

fn values(v: Option<&Vec<String>>) -> String {
    v.map(|v| v.join(", ")).unwrap_or_default()
}

fn comparison_table(c: &Comparison) -> Markup {
    let fields: std::collections::BTreeSet<&String> = c
        .local
        .keys()
        .chain(c.baseline.keys())
        .chain(c.directory.iter().flat_map(|d| d.keys()))
        .collect();
    html! {
        table.compare {
            caption { "Local, directory (" (c.dn) ") and baseline" }
            thead { tr { th scope="col" { "Field" } th scope="col" { "Local" } th scope="col" { "Directory" } th scope="col" { "Baseline" } th scope="col" { "After the next pass" } } }
            tbody { @for f in fields {
                @let (l, d, b) = (c.local.get(f), c.directory.as_ref().and_then(|d| d.get(f)), c.baseline.get(f));
                tr class=[(l != b || (c.directory.is_some() && d != b)).then_some("differs")] {
                    th scope="row" { (f) }
                    td { (values(l)) }
                    td { @if c.directory.is_some() { (values(d)) } @else { em { "gone" } } }
                    td { (values(b)) }
                    td { (values(c.result.as_ref().and_then(|r| r.get(f)))) }
                }
            } }
        }
        p { strong { "Next pass: " } (c.next)
            @if c.writes_local { " — writes the local object" }
            @if c.writes_directory { " — writes the directory entry" } }
    }
}

async fn object(
    State(state): State<Arc<AdminState>>,
    ConsoleOperator(operator): ConsoleOperator,
    Path((category, name)): Path<(String, String)>,
) -> PageResult {
    let category: Category = category.parse().map_err(|e: String| {
        problem_page(
            Some(&operator),
            Problem::new(StatusCode::NOT_FOUND, "no-such-resource", e),
        )
    })?;
    let query = JournalQuery {
        object: Some(name.clone()),
        limit: 50,
        ..JournalQuery::default()
    };
    let (view, history) = state
        .with_store(|config, store| {
            Ok((
                super::show(store, category, &name)?,
                super::journal(config, store, &query)?,
            ))
        })
        .await
        .map_err(failed(&operator))?;
    let mut comparisons = Vec::new();
    for association in &view.associations {
        let compared = compare_object(&state, category, &name, Some(association.connector.clone())).await;
        comparisons.push((association.connector.clone(), compared));
    }
    let mut shown = view.object.values.clone();
    super::masked(&mut shown);
    let body = html! {
        dl.facts {
            dt { "Enabled" } dd { @if view.object.enabled { "yes" } @else { "no" } }
            @for (field, v) in &shown { dt { (field) } dd { (v.join(", ")) } }
        }
        section aria-labelledby="associations" {
            h2 id="associations" { "Associations" }
            @if view.associations.is_empty() { p { "None: the next pass of a connector matches it by name." } }
            @for a in &view.associations {
                h3 { (a.connector) ": " (a.dn) }
                p { "Entry id " code { (a.entry_id) } ", last synced " (time(a.synced_at))
                    @if a.entry_gone { " — " span.warn { "the entry has left the scope" } } }
                @if let Some((_, compared)) = comparisons.iter().find(|(c, _)| *c == a.connector) {
                    @match compared {
                        Ok(c) => (comparison_table(c)),
                        Err(p) => p.error { "Cannot compare now: " (p.detail) },
                    }
                }
                @if operator.role == Role::Admin {
                    form method="post" action="/console/associations/remove" {
                        (csrf(&operator))
                        input type="hidden" name="connector" value=(a.connector);
                        input type="hidden" name="category" value=(category);
                        input type="hidden" name="name" value=(name);
                        input type="checkbox" id={ "confirm-" (a.connector) } name="confirm" value="true" required;
                        label for={ "confirm-" (a.connector) } { "The next pass matches " (name) " afresh" }
                        button type="submit" { "Remove the association with " (a.connector) }
                    }
                }
            }
        }
        section aria-labelledby="history" {
            h2 id="history" { "History" }
            (journal_table(&history))
        }
    };
    Ok(page(&format!("{category} {name}"), Some(&operator), body).into_response())
}

async fn disputes(State(state): State<Arc<AdminState>>, ConsoleOperator(operator): ConsoleOperator) -> PageResult {
    let disputes = state
        .with_store(|config, store| super::disputes(config, store))
        .await
        .map_err(failed(&operator))?;
    let body = html! {
        @if disputes.is_empty() { p.good { "No disputes: the last full pass of every connector matched every entry." } }
        @for (i, d) in disputes.iter().enumerate() {
            article.dispute aria-labelledby={ "dispute-" (i) } {
                h2 id={ "dispute-" (i) } { (d.dispute.category) " " (d.dispute.key) " (" (d.connector) ")" }
                p { (d.dispute.reason) }
                @if let Some(at) = d.found_at { p.small { "Found by the full pass of " (time(at)) } }
                @if d.dispute.candidates.is_empty() {
                    p { "Settle it in the directory (give the entry its name, or remove the clash), or remove the other association from its object's page." }
                } @else if operator.role == Role::Admin {
                    form method="post" action="/console/disputes/link" {
                        (csrf(&operator))
                        input type="hidden" name="connector" value=(d.connector);
                        input type="hidden" name="category" value=(d.dispute.category);
                        input type="hidden" name="name" value=(d.dispute.key);
                        fieldset {
                            legend { "The entry " (d.dispute.key) " is" }
                            @for (j, dn) in d.dispute.candidates.iter().enumerate() {
                                div {
                                    input type="radio" id={ "c-" (i) "-" (j) } name="dn" value=(dn) required;
                                    label for={ "c-" (i) "-" (j) } { (dn) }
                                }
                            }
                        }
                        input type="checkbox" id={ "confirm-" (i) } name="confirm" value="true" required;
                        label for={ "confirm-" (i) } { "Link them: from now on they sync together" }
                        button type="submit" { "Link" }
                    }
                } @else {
                    ul { @for dn in &d.dispute.candidates { li { (dn) } } }
                }
            }
        }
    };
    Ok(page("Disputes", Some(&operator), body).into_response())
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AssociationForm {
    csrf: Option<String>,
    confirm: Option<String>,
    connector: String,
    category: String,
    name: String,
    dn: Option<String>,
}

impl AssociationForm {
    /// The form of an admin's confirmed act on an association, with the
    /// category it names.
    fn confirmed(
        operator: &Operator,
        form: Result<Form<AssociationForm>, FormRejection>,
    ) -> Result<(AssociationForm, Category), Problem> {
        let form = acting(operator, form, |f| f.csrf.as_deref(), true)?;
        confirmed(&form.confirm)?;
        let category = form
            .category
            .parse()
            .map_err(|e: String| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e))?;
        Ok((form, category))
    }
}

async fn link(
    State(state): State<Arc<AdminState>>,
    ConsoleOperator(operator): ConsoleOperator,
    form: Result<Form<AssociationForm>, FormRejection>,
) -> PageResult {
    let (form, category) = AssociationForm::confirmed(&operator, form).map_err(failed(&operator))?;
    let Some(dn) = form.dn.clone() else {
        return Err(problem_page(
            Some(&operator),
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                "choose the entry to link with",
            ),
        ));
    };
    let who = operator.journaled_from_console();
    let mut store = state.store.lock().await;
    let outcome = super::link(
        &state.config,
        &mut store,
        &form.connector,
        category,
        &form.name,
        &LinkTarget::Dn(dn.clone()),
        &who,
    )
    .await
    .map_err(|e| problem_page(Some(&operator), e.into()))?;
    let body = html! {
        p role="status" { (category) " " (form.name) " is linked with " (dn) "." }
        (outcome_summary(&outcome))
        p { a href=(object_href(category, &form.name)) { "See " (form.name) } }
    };
    Ok(page("Linked", Some(&operator), body).into_response())
}

async fn remove_association(
    State(state): State<Arc<AdminState>>,
    ConsoleOperator(operator): ConsoleOperator,
    form: Result<Form<AssociationForm>, FormRejection>,
) -> PageResult {
    let (form, category) = AssociationForm::confirmed(&operator, form).map_err(failed(&operator))?;
    let who = operator.journaled_from_console();
    state
        .with_store(|config, store| {
            super::remove_association(config, store, &form.connector, category, &form.name, &who)
        })
        .await
        .map_err(failed(&operator))?;
    let body = html! {
        p role="status" { "The association of " (category) " " (form.name) " with " (form.connector) " is removed; the next pass matches it afresh." }
        p { a href=(object_href(category, &form.name)) { "See " (form.name) } }
    };
    Ok(page("Association removed", Some(&operator), body).into_response())
}

async fn journal(
    State(state): State<Arc<AdminState>>,
    ConsoleOperator(operator): ConsoleOperator,
    query: Result<Query<JournalParams>, QueryRejection>,
) -> PageResult {
    let Query(params) = query.map_err(|r| problem_page(Some(&operator), bad_query(r)))?;
    let (connector, object, action, source) = (
        params.connector.clone().unwrap_or_default(),
        params.object.clone().unwrap_or_default(),
        params.action,
        params.source,
    );
    let mut query = params.query();
    // An empty field of the filter form filters nothing.
    query.connector = query.connector.filter(|c| !c.is_empty());
    query.object = query.object.filter(|o| !o.is_empty());
    let limit = query.limit;
    let lines = state
        .with_store(|config, store| super::journal(config, store, &query))
        .await
        .map_err(failed(&operator))?;
    let page_of = journal_page(lines, limit);
    let older = page_of.next_before.map(|before| {
        let mut link = format!("/console/journal?before={before}");
        for (key, value) in [("connector", &connector), ("object", &object)] {
            if !value.is_empty() {
                link.push_str(&format!(
                    "&{key}={}",
                    url::form_urlencoded::byte_serialize(value.as_bytes()).collect::<String>()
                ));
            }
        }
        if let Some(action) = action {
            link.push_str(&format!("&action={action}"));
        }
        if let Some(source) = source {
            link.push_str(&format!("&source={source}"));
        }
        link
    });
    let body = html! {
        form.filters method="get" action="/console/journal" {
            label for="connector" { "Connector" }
            input id="connector" name="connector" value=(connector);
            label for="object" { "Object" }
            input id="object" name="object" value=(object);
            label for="action" { "Action" }
            select id="action" name="action" {
                option value="" { "any" }
                @for a in Action::ALL { option value=(a) selected[Some(*a) == action] { (a) } }
            }
            label for="source" { "Source" }
            select id="source" name="source" {
                option value="" { "any" }
                @for s in ChangeSource::ALL { option value=(s) selected[Some(*s) == source] { (s) } }
            }
            button type="submit" { "Filter" }
        }
        (journal_table(&page_of.lines))
        @if let Some(older) = older { p { a href=(older) { "Older lines" } } }
    };
    Ok(page("Journal", Some(&operator), body).into_response())
}

//! What the admin server's handlers share — the configuration, the
//! server's own store connection, the open sessions, the failed-login
//! limiter — and the problem document (RFC 9457) every error becomes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::rejection::{FormRejection, JsonRejection, QueryRejection};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;
use tracing::warn;

use super::{AdminError, digest, new_secret};
use crate::config::Config;
use crate::model::Role;
use crate::proxy::FailedBinds;
use crate::store::AnyStore;

pub struct AdminState {
    pub config: Config,
    /// The server's own connection to the store; operations take turns.
    pub store: tokio::sync::Mutex<AnyStore>,
    pub sessions: Sessions,
    pub failed_logins: FailedBinds,
    /// Requests waiting for changes (long polls and event streams) at
    /// most: each reads the store twice a second while it waits.
    pub waiting: Arc<Semaphore>,
    /// The connectors a pass started here is running for: one at a time
    /// each, so that two operators' clicks do not create an entry twice.
    passes: Mutex<HashSet<String>>,
}

/// A pass started here, running; its connector is free again when dropped.
pub struct RunningPass<'a> {
    state: &'a AdminState,
    connector: String,
}

impl Drop for RunningPass<'_> {
    fn drop(&mut self) {
        self.state
            .passes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.connector);
    }
}

/// Waiting feed readers at most.
pub const MAX_WAITING: usize = 64;

impl AdminState {
    pub fn new(config: Config, store: AnyStore) -> AdminState {
        AdminState {
            failed_logins: FailedBinds::new(config.admin.max_failed_logins, config.admin.failed_login_window),
            sessions: Sessions::new(config.admin.session_timeout),
            store: tokio::sync::Mutex::new(store),
            waiting: Arc::new(Semaphore::new(MAX_WAITING)),
            passes: Mutex::default(),
            config,
        }
    }

    /// Marks a pass of `connector` as running, unless one is.
    pub fn start_pass(&self, connector: &str) -> Result<RunningPass<'_>, Problem> {
        let mut passes = self.passes.lock().unwrap_or_else(|e| e.into_inner());
        if !passes.insert(connector.to_owned()) {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "pass-running",
                format!("a pass of {connector} started here is running; wait for its report"),
            ));
        }
        Ok(RunningPass {
            state: self,
            connector: connector.to_owned(),
        })
    }

    /// Runs a store operation off the runtime's threads (the stores block).
    pub async fn with_store<T: Send>(
        &self,
        work: impl FnOnce(&Config, &mut AnyStore) -> Result<T, AdminError> + Send,
    ) -> Result<T, Problem> {
        let mut store = self.store.lock().await;
        Ok(tokio::task::block_in_place(|| work(&self.config, &mut store))?)
    }
}

/// A logged-in operator's session.
#[derive(Clone)]
pub struct Session {
    pub operator: String,
    pub role: Role,
    /// Sent back with every state-changing request a cookie carries.
    pub csrf: String,
    last_used: Instant,
}

/// Open sessions at most, so that logins cannot grow memory without bound.
pub const MAX_SESSIONS: usize = 10_000;

/// Sessions by the SHA-256 of their token: a memory dump shows no usable
/// token. They live in memory: a restart logs everyone out.
pub struct Sessions {
    open: Mutex<HashMap<String, Session>>,
    timeout: Duration,
}

impl Sessions {
    fn new(timeout: Duration) -> Sessions {
        Sessions {
            open: Mutex::default(),
            timeout,
        }
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|_, s| s.last_used.elapsed() < self.timeout);
        open
    }

    /// A new session: its token and CSRF token.
    pub fn start(&self, operator: &str, role: Role) -> Result<(String, Session), Problem> {
        let no_randomness = |e: getrandom::Error| {
            warn!(error = %e, "admin server: no randomness for a session token");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-randomness",
                "cannot create a session now",
            )
        };
        let token = new_secret().map_err(no_randomness)?;
        let session = Session {
            operator: operator.to_owned(),
            role,
            csrf: new_secret().map_err(no_randomness)?,
            last_used: Instant::now(),
        };
        let mut open = self.open();
        // Logins cost the directory a bind each; sessions cost memory.
        if open.len() >= MAX_SESSIONS {
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too-many-sessions",
                "too many open sessions; log out unused ones or retry later",
            ));
        }
        open.insert(digest(&token), session.clone());
        Ok((token, session))
    }

    /// The session of `token`, if open; its use keeps it open.
    pub fn find(&self, token: &str) -> Option<Session> {
        let mut open = self.open();
        let session = open.get_mut(&digest(token))?;
        session.last_used = Instant::now();
        Some(session.clone())
    }

    pub fn end(&self, token: &str) {
        self.open().remove(&digest(token));
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// A problem document (RFC 9457) as the API sends it, for the OpenAPI
/// document.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ProblemDocument {
    /// Always `about:blank`.
    r#type: String,
    title: String,
    status: u16,
    /// A stable code for programs: `bad-credentials`, `not-found`, …
    code: String,
    detail: String,
}

/// An error as the server answers it.
#[derive(Debug)]
pub struct Problem {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Problem {
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
            AdminError::NotFound { .. }
            | AdminError::NoAssociation { .. }
            | AdminError::NoToken(_)
            | AdminError::NoDeadLetter(_) => StatusCode::NOT_FOUND,
            AdminError::Exists { .. } | AdminError::Taken { .. } => StatusCode::CONFLICT,
            AdminError::CursorExpired { .. } => StatusCode::GONE,
            AdminError::Invalid(_) | AdminError::Config(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AdminError::Store(_) | AdminError::Sync(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        if status == StatusCode::SERVICE_UNAVAILABLE {
            warn!(error = %e, "admin server: an operation failed");
        }
        Problem::new(status, e.code(), e.to_string())
    }
}

pub fn bad_json(rejection: JsonRejection) -> Problem {
    let status = rejection.status();
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too-large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "not-json",
        _ => "bad-json",
    };
    Problem::new(status, code, rejection.body_text())
}

pub fn bad_query(rejection: QueryRejection) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "bad-query", rejection.body_text())
}

pub fn bad_form(rejection: FormRejection) -> Problem {
    let status = rejection.status();
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too-large",
        _ => "bad-form",
    };
    Problem::new(status, code, rejection.body_text())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    #[test]
    fn a_connector_runs_one_pass_started_here_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = AnyStore::Sqlite(SqliteStore::open(&dir.path().join("db")).unwrap());
        let state = AdminState::new(Config::default(), store);
        let running = state.start_pass("example").unwrap();
        let refused = state.start_pass("example").map(|_| ()).unwrap_err();
        assert_eq!((refused.status, refused.code), (StatusCode::CONFLICT, "pass-running"));
        assert!(state.start_pass("other").is_ok(), "another connector's pass may run");
        drop(running);
        assert!(state.start_pass("example").is_ok(), "free again once the pass is over");
    }
}

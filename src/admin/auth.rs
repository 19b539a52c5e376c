//! Who is calling the admin server. Operators log in with their directory
//! credentials: the login name is looked up among the login connector's
//! accounts (as the service identity), ldapsync binds as that entry with
//! the password, and reads the configured groups' members — `admin_group`
//! grants read-write, `auditor_group` read-only. A login opens a session,
//! carried as a bearer token (scripts) or a cookie (the console, where
//! every state-changing request must also carry the session's CSRF
//! token). Scripts may instead use API tokens the CLI creates. Failed
//! logins are limited per client address.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use tracing::{info, warn};

use super::state::{AdminState, Problem, Session};
use super::{TOKEN_PREFIX, digest};
use crate::config::{Config, ConnectorConfig};
use crate::directory::{Directory, DirectoryError, DirectoryOps};
use crate::model::Role;
use crate::store::AdminStore;

pub const SESSION_COOKIE: &str = "ldapsync_session";
pub const CSRF_HEADER: &str = "x-csrf-token";

/// How a request proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A session's token as `Authorization: Bearer`.
    Bearer,
    /// A session's cookie (the console, or a browser calling the API).
    Cookie,
    /// An API token as `Authorization: Bearer`.
    Token,
}

/// The operator a request comes from.
pub struct Operator {
    pub name: String,
    pub role: Role,
    pub via: Via,
    /// The session's CSRF token (none for an API token).
    pub csrf: Option<String>,
}

impl Operator {
    /// For state-changing calls: admins only.
    pub fn may_change(&self) -> Result<(), Problem> {
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
    pub fn journaled(&self) -> String {
        match self.via {
            Via::Token => format!("token:{}", self.name),
            Via::Bearer | Via::Cookie => format!("api:{}", self.name),
        }
    }

    /// As the journal records the console's acts.
    pub fn journaled_from_console(&self) -> String {
        format!("console:{}", self.name)
    }

    /// A form's CSRF token must be the session's.
    pub fn check_csrf(&self, sent: Option<&str>) -> Result<(), Problem> {
        match (&self.csrf, sent) {
            (Some(expected), Some(sent)) if constant_time_eq(expected.as_bytes(), sent.as_bytes()) => Ok(()),
            _ => Err(Problem::new(
                StatusCode::FORBIDDEN,
                "csrf",
                "the request lacks this session's CSRF token: reload the page and try again",
            )),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// The session cookie's value, if the request has one.
pub fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value)
}

/// The `Set-Cookie` value that carries a session (`token`) or ends it.
pub fn session_cookie(token: Option<&str>, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let value = match token {
        Some(token) => format!("{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{secure}"),
        None => format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    };
    HeaderValue::from_str(&value).expect("a token is hex")
}

fn unauthorized(why: &str) -> Problem {
    Problem::new(StatusCode::UNAUTHORIZED, "unauthenticated", why)
}

/// The operator of a session cookie, if it is open.
fn from_cookie(state: &AdminState, headers: &HeaderMap) -> Option<Operator> {
    let session = state.sessions.find(cookie(headers)?)?;
    Some(Operator {
        name: session.operator,
        role: session.role,
        via: Via::Cookie,
        csrf: Some(session.csrf),
    })
}

impl FromRequestParts<Arc<AdminState>> for Operator {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AdminState>) -> Result<Operator, Problem> {
        if let Some(token) = bearer(&parts.headers) {
            if token.starts_with(TOKEN_PREFIX) {
                let digest = digest(token);
                let found = state.with_store(|_, store| Ok(store.use_token(&digest)?)).await?;
                let found = found.ok_or_else(|| unauthorized("the API token is unknown or revoked"))?;
                return Ok(Operator {
                    name: found.name,
                    role: found.role,
                    via: Via::Token,
                    csrf: None,
                });
            }
            let session = state
                .sessions
                .find(token)
                .ok_or_else(|| unauthorized("the session is unknown or has expired: log in again"))?;
            return Ok(Operator {
                name: session.operator,
                role: session.role,
                via: Via::Bearer,
                csrf: None,
            });
        }
        let operator = from_cookie(state, &parts.headers).ok_or_else(|| match cookie(&parts.headers) {
            Some(_) => unauthorized("the session is unknown or has expired: log in again"),
            None => {
                unauthorized("log in (POST /api/v1/login) and send Authorization: Bearer TOKEN, or the session cookie")
            }
        })?;
        // A browser sends the cookie with any request, a forged one too:
        // a change must also prove it comes from a page of the session.
        if !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS) {
            let sent = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
            operator.check_csrf(sent)?;
        }
        Ok(operator)
    }
}

/// The console's operator: a session cookie, or the way to the login page.
pub struct ConsoleOperator(pub Operator);

impl FromRequestParts<Arc<AdminState>> for ConsoleOperator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AdminState>) -> Result<ConsoleOperator, Response> {
        match from_cookie(state, &parts.headers) {
            Some(operator) => Ok(ConsoleOperator(operator)),
            None => Err(Redirect::to("/console/login").into_response()),
        }
    }
}

/// Checks a login with the directory and opens a session: its token and
/// the session. Failed attempts count against the client's address.
pub async fn log_in(
    state: &AdminState,
    peer: IpAddr,
    username: &str,
    password: &str,
) -> Result<(String, Session), Problem> {
    if let Some(wait) = state.failed_logins.blocked(peer) {
        return Err(Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too-many-failed-logins",
            format!(
                "too many failed logins from your address; retry in {} s",
                wait.as_secs() + 1
            ),
        ));
    }
    let role = match authenticate(&state.config, username, password).await {
        Ok(role) => role,
        Err(problem) => {
            if problem.status == StatusCode::UNAUTHORIZED || problem.status == StatusCode::FORBIDDEN {
                state.failed_logins.record(peer);
                info!(%peer, user = %username, code = problem.code, "admin server: login refused");
            }
            return Err(problem);
        }
    };
    let opened = state.sessions.start(username, role)?;
    info!(%peer, operator = %username, ?role, "admin server: logged in");
    Ok(opened)
}

/// Ends the session a request carries (bearer token or cookie).
pub fn log_out(state: &AdminState, headers: &HeaderMap) {
    if let Some(token) = bearer(headers).or_else(|| cookie(headers)) {
        state.sessions.end(token);
    }
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
        warn!(error = %e, "admin server: the directory cannot check a login");
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "directory-unavailable",
            "the directory cannot check logins now",
        )
    };
    let secret = connector.password().map_err(|e| {
        // The error names the file or variable, never what it holds.
        warn!(error = %e, "admin server: no service password");
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
    let checked = async {
        let scope = connector
            .accounts
            .as_ref()
            .expect("check-config requires the login connector's accounts");
        let entries = service.entries_named(scope, username).await.map_err(unavailable)?;
        let [entry] = entries.as_slice() else {
            return Err(refused());
        };
        let as_operator = ConnectorConfig {
            bind_dn: entry.dn.clone(),
            ..connector.clone()
        };
        match Directory::connect(&as_operator, password, timeout).await {
            Ok(session) => session.close().await,
            Err(DirectoryError::Bind { .. }) => return Err(refused()),
            Err(e) => return Err(unavailable(e)),
        }
        let admin = &config.admin;
        let key = crate::dn::key(&entry.dn);
        for (group, granted) in [(&admin.admin_group, Role::Admin), (&admin.auditor_group, Role::Auditor)] {
            let Some(group) = group else { continue };
            let members = service
                .read(group, &["member", "uniqueMember"])
                .await
                .map_err(unavailable)?;
            if members.values().flatten().any(|m| crate::dn::key(m) == key) {
                return Ok(granted);
            }
        }
        Err(Problem::new(
            StatusCode::FORBIDDEN,
            "not-an-operator",
            format!("{username} is in neither the admin nor the auditor group"),
        ))
    }
    .await;
    service.close().await;
    checked
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("theme=dark; ldapsync_session=abc123; x=y"),
        );
        assert_eq!(cookie(&headers), Some("abc123"));
        headers.insert(header::COOKIE, HeaderValue::from_static("other=1"));
        assert_eq!(cookie(&headers), None);
    }
}

//! Webhooks (`[[webhook]]`) and the feed's upkeep. Each webhook follows
//! the change feed with a durable cursor and POSTs every change its filter
//! selects, in order and at least once: signed with HMAC-SHA256 over
//! `timestamp.body`, the change's cursor as idempotency key. A refused
//! delivery is retried with doubling waits; after `max_attempts` it
//! becomes a dead letter and the webhook goes on. On a shared PostgreSQL
//! store one instance at a time delivers each webhook (a lease). The
//! feed's changes older than `admin.feed_retention` are pruned.

use std::sync::Arc;
use std::time::Duration;

use ring::hmac;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use super::feed::{self, FeedChange};
use super::state::{AdminState, Problem};
use super::{AdminError, local_journal};
use crate::config::{Config, WebhookConfig};
use crate::metrics::{METRICS, WebhookLabels};
use crate::model::Action;
use crate::store::{self, AdminStore, AnyStore, Cursor, DeadLetter, Store, now};

/// The cursors' kind in the store.
pub const KIND: &str = "webhook";
/// Changes read at once.
const BATCH: usize = 100;
/// The wait when the feed has nothing new.
const IDLE: Duration = Duration::from_secs(1);
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// How often old changes are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// One webhook's HTTP client and signing key.
pub struct Deliverer {
    hook: WebhookConfig,
    client: reqwest::Client,
    key: hmac::Key,
}

impl Deliverer {
    pub fn new(hook: &WebhookConfig) -> Result<Deliverer, String> {
        let secret = hook.secret().map_err(|e| e.to_string())?;
        let client = reqwest::Client::builder()
            .timeout(hook.timeout)
            .user_agent(concat!("ldapsync/", env!("CARGO_PKG_VERSION")))
            // A redirect would send the signed change somewhere unconfigured.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("webhook {:?}: {e}", hook.name))?;
        Ok(Deliverer {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes()),
            hook: hook.clone(),
            client,
        })
    }

    fn selects(&self, change: &FeedChange) -> bool {
        let hook = &self.hook;
        (hook.categories.is_empty() || hook.categories.contains(&change.category))
            && (hook.sources.is_empty() || change.source.is_some_and(|s| hook.sources.contains(&s)))
    }

    /// One attempt: a 2xx answer is a delivery, anything else an error
    /// that says what happened (never the secret).
    pub async fn send(&self, cursor: Cursor, body: &str) -> Result<(), String> {
        let timestamp = now().to_string();
        let signed = format!("{timestamp}.{body}");
        let signature = hmac::sign(&self.key, signed.as_bytes());
        let signature: String = signature.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let answer = self
            .client
            .post(&self.hook.url)
            .header("content-type", "application/json")
            .header("idempotency-key", cursor.to_string())
            .header("x-ldapsync-delivery", cursor.to_string())
            .header("x-ldapsync-timestamp", &timestamp)
            .header("x-ldapsync-signature", format!("sha256={signature}"))
            .body(body.to_owned())
            .send()
            .await;
        match answer {
            Ok(answer) if answer.status().is_success() => Ok(()),
            Ok(answer) => Err(format!("answered HTTP {}", answer.status())),
            Err(e) if e.is_timeout() => Err(format!("no answer within {:?}", self.hook.timeout)),
            Err(e) if e.is_connect() => Err(format!("cannot connect: {}", error_chain(&e))),
            Err(e) => Err(error_chain(&e)),
        }
    }

    fn count(&self, outcome: &'static str) {
        METRICS
            .webhook_deliveries
            .get_or_create(&WebhookLabels {
                webhook: self.hook.name.clone(),
                outcome,
            })
            .inc();
    }

    /// Delivers with retries; `Err` after the last attempt, with its error.
    async fn deliver(&self, cursor: Cursor, body: &str, shutdown: &CancellationToken) -> Option<Result<(), String>> {
        let mut wait = self.hook.retry_backoff;
        let mut attempt = 1;
        loop {
            match self.send(cursor, body).await {
                Ok(()) => {
                    self.count("delivered");
                    return Some(Ok(()));
                }
                Err(e) if attempt >= self.hook.max_attempts => return Some(Err(e)),
                Err(e) => {
                    self.count("failed");
                    warn!(%cursor, attempt, error = %e, retry_in = ?wait, "webhook delivery failed; retrying");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(MAX_BACKOFF);
            attempt += 1;
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Starts the webhooks' deliveries and the feed's pruning, until `shutdown`.
pub fn start(config: &Config, shutdown: &CancellationToken, tasks: &TaskTracker) {
    tasks.spawn(prune(config.clone(), shutdown.clone()));
    for hook in &config.webhooks {
        let span = info_span!("webhook", webhook = %hook.name);
        tasks.spawn(run(config.clone(), hook.clone(), shutdown.clone()).instrument(span));
    }
}

async fn open(config: &Config) -> Result<AnyStore, String> {
    let settings = config.store.clone();
    match tokio::task::spawn_blocking(move || store::open(&settings)).await {
        Ok(opened) => opened.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

async fn prune(config: Config, shutdown: CancellationToken) {
    let retention = config.admin.feed_retention.as_secs() as i64;
    loop {
        match open(&config).await {
            Ok(mut store) => match store.prune_changes(now() - retention) {
                Ok(0) => {}
                Ok(pruned) => info!(pruned, "change feed: changes past the retention pruned"),
                Err(e) => warn!(error = %e, "change feed: pruning failed"),
            },
            Err(e) => warn!(error = %e, "change feed: the store cannot be opened to prune"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
        }
    }
}

/// One webhook, for as long as the process runs: restarted after a
/// failure (the store gone), waiting for its lease on a shared store.
async fn run(config: Config, hook: WebhookConfig, shutdown: CancellationToken) {
    let deliverer = match Deliverer::new(&hook) {
        Ok(deliverer) => deliverer,
        Err(e) => return warn!(error = %e, "webhook disabled"),
    };
    while !shutdown.is_cancelled() {
        let ended = follow(&config, &deliverer, &shutdown).await;
        if let Err(e) = ended {
            warn!(error = %e, "webhook stopped; starting again in 10 s");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
}

async fn follow(config: &Config, deliverer: &Deliverer, shutdown: &CancellationToken) -> Result<(), String> {
    let name = &deliverer.hook.name;
    let mut store = open(config).await?;
    // On a shared store one instance delivers: the others would only
    // send duplicates.
    let mut stop = shutdown.clone();
    if store.shared().is_some() {
        let Some(leases) = open(config).await?.into_shared() else {
            return Err("the store is no longer shared".into());
        };
        let holder = crate::cluster::this_instance(config).id;
        let Some(held) = crate::cluster::hold(
            &Arc::new(leases),
            &format!("webhook:{name}"),
            &holder,
            config.store.lease_ttl,
            shutdown,
        )
        .await
        else {
            return Ok(());
        };
        stop = held.lost;
    }
    let mut cursor = match store.cursor(KIND, name).map_err(|e| e.to_string())? {
        Some(state) => state.cursor,
        // A new webhook hears what changes from now on.
        None => {
            let end = store.feed_end().map_err(|e| e.to_string())?;
            store.set_cursor(KIND, name, end).map_err(|e| e.to_string())?;
            end
        }
    };
    info!(%cursor, url = %deliverer.hook.url, "webhook delivering");
    while !stop.is_cancelled() {
        let page = match feed::changes(&store, cursor, BATCH) {
            Ok(page) => page,
            Err(AdminError::CursorExpired { oldest, .. }) => {
                warn!(%cursor, %oldest, "webhook fell behind the feed's retention: changes in between were never sent");
                cursor = oldest.parse().map_err(|e: String| e)?;
                continue;
            }
            Err(e) => return Err(e.to_string()),
        };
        if page.changes.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(IDLE) => {}
            }
            continue;
        }
        for change in page.changes {
            if deliverer.selects(&change) {
                let body = serde_json::to_string(&change).expect("a change serializes");
                match deliverer.deliver(change.cursor, &body, &stop).await {
                    None => return Ok(()),
                    Some(Ok(())) => {}
                    Some(Err(e)) => {
                        deliverer.count("dead-letter");
                        warn!(cursor = %change.cursor, error = %e, "webhook gave up on a change: it is a dead letter now");
                        let letter = DeadLetter {
                            id: 0,
                            webhook: name.clone(),
                            cursor: change.cursor,
                            body,
                            attempts: deliverer.hook.max_attempts,
                            last_error: e,
                            failed_at: now(),
                        };
                        store.add_dead_letter(&letter).map_err(|e| e.to_string())?;
                    }
                }
            }
            cursor = change.cursor;
            store.set_cursor(KIND, name, cursor).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// A webhook as the API and console show it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookView {
    pub name: String,
    pub url: String,
    /// The last change it delivered (or gave up on).
    pub cursor: Option<String>,
    pub cursor_updated_at: Option<i64>,
    pub dead_letters: usize,
}

pub fn views(config: &Config, store: &AnyStore) -> Result<Vec<WebhookView>, AdminError> {
    config
        .webhooks
        .iter()
        .map(|hook| {
            let state = store.cursor(KIND, &hook.name)?;
            Ok(WebhookView {
                name: hook.name.clone(),
                url: hook.url.clone(),
                cursor: state.as_ref().map(|s| s.cursor.to_string()),
                cursor_updated_at: state.map(|s| s.updated_at),
                dead_letters: store.dead_letters(Some(&hook.name))?.len(),
            })
        })
        .collect()
}

/// Journals an operator's act on a dead letter, under its change's object.
fn journal_letter(store: &mut AnyStore, letter: &DeadLetter, action: Action, operator: &str) -> Result<(), AdminError> {
    let change: serde_json::Value = serde_json::from_str(&letter.body).unwrap_or_default();
    let category = change
        .get("category")
        .and_then(|c| c.as_str())
        .and_then(|c| c.parse().ok())
        .unwrap_or(crate::model::Category::Account);
    let object = change.get("object").and_then(|o| o.as_str()).unwrap_or_default();
    let detail =
        serde_json::json!({ "operator": operator, "webhook": letter.webhook, "cursor": letter.cursor.to_string() });
    let entry = local_journal(category, object, action, detail);
    Ok(store
        .commit(store::Commit {
            journal: vec![entry],
            ..store::Commit::default()
        })
        .map(drop)?)
}

/// Sends a dead letter again, once, now; it goes when delivered.
pub async fn retry_dead_letter(state: &AdminState, id: i64, operator: &str) -> Result<(), Problem> {
    let letter = state
        .with_store(move |_, store| store.dead_letter(id)?.ok_or(AdminError::NoDeadLetter(id)))
        .await?;
    let hook = state
        .config
        .webhooks
        .iter()
        .find(|h| h.name == letter.webhook)
        .ok_or_else(|| AdminError::Invalid(format!("webhook {:?} is no longer configured", letter.webhook)))?;
    let deliverer = Deliverer::new(hook).map_err(AdminError::Invalid)?;
    if let Err(e) = deliverer.send(letter.cursor, &letter.body).await {
        deliverer.count("failed");
        return Err(Problem::new(
            axum::http::StatusCode::BAD_GATEWAY,
            "delivery-failed",
            format!("webhook {} refused the change again: {e}", letter.webhook),
        ));
    }
    deliverer.count("delivered");
    let who = operator.to_owned();
    state
        .with_store(move |_, store| {
            store.remove_dead_letter(id)?;
            journal_letter(store, &letter, Action::DeadLetterRetried, &who)
        })
        .await
}

pub fn discard_dead_letter(store: &mut AnyStore, id: i64, operator: &str) -> Result<(), AdminError> {
    let letter = store.dead_letter(id)?.ok_or(AdminError::NoDeadLetter(id))?;
    store.remove_dead_letter(id)?;
    journal_letter(store, &letter, Action::DeadLetterDiscarded, operator)
}

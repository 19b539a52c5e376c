//! What sessions and probes have seen of each directory URL. A URL whose
//! connection failed is *down*: new sessions try it only after every URL
//! that is up, so a dead or black-holed directory costs one session the
//! connect timeout, not every session. A probe (connected as sessions
//! connect, then an anonymous root DSE read) retries a down URL with
//! back-off and re-admits it when it answers; a session that reaches it
//! (when nothing else answered) re-admits it too. The probing itself is
//! `upstream::probe_down_urls`.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::LdapUrl;
use crate::metrics::{METRICS, UrlLabel};

/// The first probe of a URL found down, and the longest wait between two.
const FIRST_RETRY: Duration = Duration::from_millis(500);
const LONGEST_RETRY: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct Health {
    /// The URLs known down, by their text.
    down: Mutex<HashMap<String, Down>>,
}

struct Down {
    retry_at: Instant,
    backoff: Duration,
}

impl Health {
    fn down(&self) -> MutexGuard<'_, HashMap<String, Down>> {
        self.down.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `urls` in the order a new session tries them: those up as
    /// configured, then those down (a last resort, as configured).
    pub fn order<'a>(&self, urls: &'a [LdapUrl]) -> Vec<&'a LdapUrl> {
        let down = self.down();
        let (up, known_down): (Vec<_>, Vec<_>) = urls.iter().partition(|u| !down.contains_key(&u.to_string()));
        up.into_iter().chain(known_down).collect()
    }

    /// A connection to `url` failed: down, probed from now on. Said once
    /// per outage, not once per session.
    pub fn failed(&self, url: &LdapUrl, reason: &dyn Display) {
        let newly = self
            .down()
            .insert(
                url.to_string(),
                Down {
                    retry_at: Instant::now() + FIRST_RETRY,
                    backoff: FIRST_RETRY,
                },
            )
            .is_none();
        if newly {
            warn!(%url, %reason, "directory URL down: new sessions try the others first until it answers a probe");
            set_up(url, false);
        }
    }

    /// `url` answered: up again.
    pub fn answered(&self, url: &LdapUrl) {
        if self.down().remove(&url.to_string()).is_some() {
            info!(%url, "directory URL answers again");
        }
        set_up(url, true);
    }

    /// Forgets URLs no longer configured (a reload removed them).
    pub fn retain(&self, urls: &[LdapUrl]) {
        let keep: Vec<String> = urls.iter().map(ToString::to_string).collect();
        self.down().retain(|url, _| keep.contains(url));
    }

    /// The down URLs among `urls` whose probe is due; each next one is
    /// pushed back, twice as far each time up to `LONGEST_RETRY`.
    pub fn due<'a>(&self, urls: &'a [LdapUrl]) -> Vec<&'a LdapUrl> {
        let now = Instant::now();
        let mut down = self.down();
        urls.iter()
            .filter(|url| match down.get_mut(&url.to_string()) {
                Some(d) if d.retry_at <= now => {
                    d.backoff = (d.backoff * 2).min(LONGEST_RETRY);
                    d.retry_at = now + d.backoff;
                    true
                }
                _ => false,
            })
            .collect()
    }
}

fn set_up(url: &LdapUrl, up: bool) {
    METRICS
        .upstream_up
        .get_or_create(&UrlLabel { url: url.to_string() })
        .set(i64::from(up));
}

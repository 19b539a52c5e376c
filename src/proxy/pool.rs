//! The directory URLs as new sessions choose among them: what sessions and
//! probes have seen of each, the open sessions on each, and the balance,
//! weights and tiers of the configuration.
//!
//! A URL whose connection failed is *down*: new sessions try it only after
//! every URL that is up, so a dead or black-holed directory costs one
//! session the connect timeout, not every session. A probe (connected as
//! sessions connect, then an anonymous root DSE read; `upstream::probe_urls`)
//! retries a down URL with back-off and re-admits it when it answers; a
//! session that reaches it (when nothing else answered) re-admits it too.
//! URLs that are up are probed every `health_interval`, so that a frozen
//! directory is found down before sessions hang on it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt::Display;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{Balance, LdapUrl};
use crate::metrics::{METRICS, UrlLabel};

/// The first probe of a URL found down, and the longest wait between two.
const FIRST_RETRY: Duration = Duration::from_millis(500);
const LONGEST_RETRY: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct Pool {
    state: Mutex<State>,
    /// Sessions started under `round-robin`: where the next one begins.
    turn: AtomicUsize,
}

#[derive(Default)]
struct State {
    /// The URLs known down, by their text.
    down: HashMap<String, Down>,
    /// Open sessions per URL.
    sessions: HashMap<String, usize>,
    /// When each URL that is up was last probed (or first seen).
    checked: HashMap<String, Instant>,
}

struct Down {
    retry_at: Instant,
    backoff: Duration,
}

/// A session's place on a URL, given back when the session drops it.
pub struct Slot {
    pool: Arc<Pool>,
    url: String,
}

impl Slot {
    /// Another session on the same URL (one that shares this slot's
    /// connection, in multiplexed mode).
    pub fn another(&self) -> Slot {
        self.pool.take_named(self.url.clone())
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.pool.state();
        let open = state.sessions.entry(self.url.clone()).or_default();
        *open = open.saturating_sub(1);
        set_sessions(&self.url, *open);
    }
}

impl Pool {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `urls` in the order a new session tries them: those up, by tier,
    /// within a tier as `balance` says; then those down, as configured (a
    /// last resort). `options` holds each URL's (weight, tier).
    pub fn order<'a>(&self, urls: &'a [LdapUrl], options: &[(usize, usize)], balance: Balance) -> Vec<&'a LdapUrl> {
        let keys: Vec<String> = urls.iter().map(ToString::to_string).collect();
        let state = self.state();
        let (mut up, down): (Vec<usize>, Vec<usize>) =
            (0..urls.len()).partition(|&i| !state.down.contains_key(&keys[i]));
        let weight = |i: usize| options.get(i).map_or(1, |o| o.0.max(1));
        let tier = |i: usize| options.get(i).map_or(1, |o| o.1);
        up.sort_by_key(|&i| tier(i));
        let turn = match balance {
            Balance::RoundRobin => self.turn.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        for group in up.chunk_by_mut(|a, b| tier(*a) == tier(*b)) {
            match balance {
                Balance::Ordered => {}
                Balance::RoundRobin => {
                    // The turn falls in one URL's share of the weights.
                    let total: usize = group.iter().map(|&i| weight(i)).sum();
                    let mut slot = turn % total;
                    let first = group
                        .iter()
                        .position(|&i| {
                            let inside = slot < weight(i);
                            slot = slot.saturating_sub(weight(i));
                            inside
                        })
                        .unwrap_or(0);
                    group.rotate_left(first);
                }
                Balance::LeastConnections => {
                    let open = |i: usize| state.sessions.get(&keys[i]).copied().unwrap_or(0);
                    // Fewest sessions per unit of weight; the configured order breaks ties.
                    group.sort_by(|&a, &b| (open(a) * weight(b)).cmp(&(open(b) * weight(a))).then(a.cmp(&b)));
                }
            }
        }
        up.into_iter().chain(down).map(|i| &urls[i]).collect()
    }

    /// A session connected to `url`: counted until the slot is dropped.
    pub fn take(self: &Arc<Self>, url: &LdapUrl) -> Slot {
        self.take_named(url.to_string())
    }

    fn take_named(self: &Arc<Self>, url: String) -> Slot {
        let mut state = self.state();
        let open = state.sessions.entry(url.clone()).or_default();
        *open += 1;
        set_sessions(&url, *open);
        METRICS
            .upstream_sessions_started
            .get_or_create(&UrlLabel { url: url.clone() })
            .inc();
        Slot {
            pool: Arc::clone(self),
            url,
        }
    }

    /// A connection to `url` failed, or its probe: down, probed from now
    /// on (a URL already down keeps its back-off). Said once per outage,
    /// not once per session.
    pub fn failed(&self, url: &LdapUrl, reason: &dyn Display) {
        let newly = match self.state().down.entry(url.to_string()) {
            Entry::Occupied(_) => false,
            Entry::Vacant(vacant) => {
                vacant.insert(Down {
                    retry_at: Instant::now() + FIRST_RETRY,
                    backoff: FIRST_RETRY,
                });
                true
            }
        };
        if newly {
            warn!(%url, %reason, "directory URL down: new sessions try the others first until it answers a probe");
            set_up(url, false);
        }
    }

    /// `url` answered: up again.
    pub fn answered(&self, url: &LdapUrl) {
        if self.state().down.remove(&url.to_string()).is_some() {
            info!(%url, "directory URL answers again");
        }
        set_up(url, true);
    }

    /// `urls` are configured (at start, after a reload): those not known
    /// down show as up.
    pub fn admit(&self, urls: &[LdapUrl]) {
        let state = self.state();
        for url in urls.iter().filter(|u| !state.down.contains_key(&u.to_string())) {
            set_up(url, true);
        }
    }

    /// Forgets URLs no longer configured (a reload removed them; their
    /// open sessions go on, counted until they end).
    pub fn retain(&self, urls: &[LdapUrl]) {
        let keep: Vec<String> = urls.iter().map(ToString::to_string).collect();
        let mut state = self.state();
        state.down.retain(|url, _| keep.contains(url));
        state.checked.retain(|url, _| keep.contains(url));
    }

    /// The URLs among `urls` whose probe is due: those down whose retry
    /// has come (the next one pushed back twice as far each time, up to
    /// `LONGEST_RETRY`), and those up not probed for `interval` (a
    /// directory that accepts connections but no longer answers is found
    /// before sessions hang on it).
    pub fn due<'a>(&self, urls: &'a [LdapUrl], interval: Duration) -> Vec<&'a LdapUrl> {
        let now = Instant::now();
        let mut state = self.state();
        let State { down, checked, .. } = &mut *state;
        urls.iter()
            .filter(|url| match down.get_mut(&url.to_string()) {
                Some(d) if d.retry_at <= now => {
                    d.backoff = (d.backoff * 2).min(LONGEST_RETRY);
                    d.retry_at = now + d.backoff;
                    true
                }
                Some(_) => false,
                None => {
                    let last = checked.entry(url.to_string()).or_insert(now);
                    let due = now.duration_since(*last) >= interval;
                    if due {
                        *last = now;
                    }
                    due
                }
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

fn set_sessions(url: &str, open: usize) {
    METRICS
        .upstream_sessions
        .get_or_create(&UrlLabel { url: url.to_owned() })
        .set(i64::try_from(open).unwrap_or(i64::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(n: usize) -> Vec<LdapUrl> {
        (1..=n)
            .map(|i| format!("ldap://dir{i}.example.com").parse().unwrap())
            .collect()
    }

    fn names(order: Vec<&LdapUrl>) -> Vec<String> {
        order
            .iter()
            .map(|u| u.host().trim_end_matches(".example.com").to_owned())
            .collect()
    }

    /// One row of the ordering table.
    struct Case {
        name: &'static str,
        balance: Balance,
        /// Each URL's (weight, tier).
        options: [(usize, usize); 3],
        down: &'static [usize],
        turn: usize,
        expected: [&'static str; 3],
    }

    #[test]
    fn each_balance_orders_the_urls_that_are_up_and_puts_the_down_ones_last() {
        let urls = urls(3);
        let even = [(1, 1); 3];
        let case = |name, balance, options, down, turn, expected| Case {
            name,
            balance,
            options,
            down,
            turn,
            expected,
        };
        let cases = [
            case(
                "ordered: as configured",
                Balance::Ordered,
                even,
                &[],
                0,
                ["dir1", "dir2", "dir3"],
            ),
            case(
                "ordered: a down URL last",
                Balance::Ordered,
                even,
                &[0],
                0,
                ["dir2", "dir3", "dir1"],
            ),
            case(
                "tiers first",
                Balance::Ordered,
                [(1, 2), (1, 1), (1, 1)],
                &[],
                0,
                ["dir2", "dir3", "dir1"],
            ),
            case(
                "a higher tier when the lower is down",
                Balance::Ordered,
                [(1, 1), (1, 2), (1, 2)],
                &[0],
                0,
                ["dir2", "dir3", "dir1"],
            ),
            case(
                "round-robin: the third session starts at the third",
                Balance::RoundRobin,
                even,
                &[],
                2,
                ["dir3", "dir1", "dir2"],
            ),
            case(
                "round-robin skips a down URL",
                Balance::RoundRobin,
                even,
                &[1],
                1,
                ["dir3", "dir1", "dir2"],
            ),
            case(
                "least-connections: ties as configured",
                Balance::LeastConnections,
                even,
                &[],
                0,
                ["dir1", "dir2", "dir3"],
            ),
        ];
        for c in cases {
            let pool = Pool::default();
            pool.turn.store(c.turn, Ordering::Relaxed);
            for &i in c.down {
                pool.failed(&urls[i], &"refused");
            }
            assert_eq!(
                names(pool.order(&urls, &c.options, c.balance)),
                c.expected,
                "{}",
                c.name
            );
        }
    }

    #[test]
    fn round_robin_gives_each_url_its_weight_in_sessions() {
        let urls = urls(3);
        let pool = Pool::default();
        let options = [(2, 1), (1, 1), (1, 1)];
        let mut first = HashMap::new();
        for _ in 0..400 {
            *first
                .entry(names(pool.order(&urls, &options, Balance::RoundRobin))[0].clone())
                .or_insert(0) += 1;
        }
        assert_eq!((first["dir1"], first["dir2"], first["dir3"]), (200, 100, 100));
    }

    #[test]
    fn least_connections_picks_the_url_with_fewest_sessions_for_its_weight() {
        let urls = urls(2);
        let pool = Arc::new(Pool::default());
        let options = [(1, 1), (2, 1)];
        let mut slots = Vec::new();
        for _ in 0..6 {
            let url = pool.order(&urls, &options, Balance::LeastConnections)[0];
            slots.push((url.host().to_owned(), pool.take(url)));
        }
        let on = |host: &str| slots.iter().filter(|(h, _)| h.starts_with(host)).count();
        assert_eq!((on("dir1"), on("dir2")), (2, 4), "in proportion to the weights");
        slots.retain(|(h, _)| !h.starts_with("dir2"));
        let url = pool.order(&urls, &options, Balance::LeastConnections)[0];
        assert_eq!(url.host(), "dir2.example.com", "closed sessions are given back");
    }
}

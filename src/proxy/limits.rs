//! Limits against abuse that span sessions: connections per client address
//! and failed binds per client address.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Open connections per client address.
#[derive(Default)]
pub struct AddressCounts {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; uncounted when dropped.
pub struct AddressSlot {
    counts: Arc<AddressCounts>,
    address: IpAddr,
}

impl AddressCounts {
    /// Connections open from `address`.
    pub fn count(&self, address: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&address).copied().unwrap_or(0)
    }

    /// A slot for one more connection from `address`, unless it has `limit`.
    pub fn admit(self: &Arc<Self>, address: IpAddr, limit: usize) -> Option<AddressSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(address).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            counts: Arc::clone(self),
            address,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

/// Recent failed binds per client address, to slow down password guessing.
pub struct FailedBinds {
    max: usize,
    window: Duration,
    recent: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

impl FailedBinds {
    pub fn new(max: usize, window: Duration) -> FailedBinds {
        FailedBinds {
            max,
            window,
            recent: Mutex::default(),
        }
    }

    pub fn record(&self, address: IpAddr) {
        if self.max == 0 {
            return;
        }
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        // Forget addresses whose failures are all past the window, so the
        // map stays as small as the set of recent offenders.
        if recent.len() > 1024 {
            recent.retain(|_, times| times.back().is_some_and(|t| now.duration_since(*t) < self.window));
        }
        let times = recent.entry(address).or_default();
        times.push_back(now);
        while times.len() > self.max {
            times.pop_front();
        }
    }

    /// How long `address` must wait before its next bind, if it must.
    pub fn blocked(&self, address: IpAddr) -> Option<Duration> {
        if self.max == 0 {
            return None;
        }
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let times = recent.get(&address)?;
        let oldest = times.front()?;
        let age = oldest.elapsed();
        (times.len() >= self.max && age < self.window).then(|| self.window - age)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_slots_are_counted_until_dropped() {
        let counts = Arc::new(AddressCounts::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = counts.admit(a, 2).unwrap();
        let _second = counts.admit(a, 2).unwrap();
        assert!(counts.admit(a, 2).is_none(), "a third from the same address");
        assert!(counts.admit(b, 2).is_some(), "another address is not affected");
        drop(first);
        assert!(counts.admit(a, 2).is_some(), "a slot frees when its connection ends");
    }

    #[test]
    fn binds_are_blocked_after_max_failures_within_the_window() {
        let binds = FailedBinds::new(3, Duration::from_secs(60));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..2 {
            binds.record(a);
        }
        assert_eq!(binds.blocked(a), None, "two failures are allowed");
        binds.record(a);
        let wait = binds.blocked(a).expect("the third failure blocks");
        assert!(wait <= Duration::from_secs(60) && wait > Duration::from_secs(50));
        assert_eq!(binds.blocked("192.0.2.2".parse().unwrap()), None);

        let expired = FailedBinds::new(1, Duration::ZERO);
        expired.record(a);
        assert_eq!(expired.blocked(a), None, "failures past the window are forgiven");
    }
}

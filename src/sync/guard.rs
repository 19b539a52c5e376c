//! The mass-delete guard: how many deletes (or disables) a connector may
//! apply at once, or within an hour, before they are held for an
//! operator's confirmation.

use crate::config::ConnectorConfig;
use crate::model::{Action, Category};
use crate::store::{Store, StoreError, now};

/// What the mass-delete guard says of a delete.
pub(super) struct Guard {
    /// Deletes of the window applied already.
    pub(super) earlier: usize,
    /// The connector's associated objects of the category.
    pub(super) total: usize,
    pub(super) trips: bool,
}

/// Which deletes the mass-delete guard counts together.
#[derive(Debug, Clone, Copy)]
pub(super) enum Window {
    /// Those of one full pass.
    Pass,
    /// Those of the last hour, for deletes seen one capture or poll at a time.
    Recent,
}

impl Guard {
    /// The guard for deleting (or disabling) `deleting` more objects of
    /// `category`. Deletes seen one poll or capture at a time are counted
    /// together with the others of the last hour, so a slow mass delete
    /// trips too.
    pub(super) fn check<S: Store>(
        store: &S,
        connector: &ConnectorConfig,
        category: Category,
        deleting: usize,
        window: Window,
    ) -> Result<Guard, StoreError> {
        let total = store.association_count(&connector.name, category)?;
        let earlier = match window {
            Window::Pass => 0,
            Window::Recent => {
                store.count_journal(&connector.name, &[Action::Deleted, Action::Disabled], now() - 3600)?
            }
        };
        let count = earlier + deleting;
        let trips = count > connector.max_deletes || count * 100 > usize::from(connector.max_delete_percent) * total;
        Ok(Guard { earlier, total, trips })
    }
}

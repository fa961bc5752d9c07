//! The cap on connections that have not logged in yet.
//!
//! Over the cap, a new connection takes the slot of the one that has been logging in the longest,
//! which is told to give up (53300). Refusing the newcomer instead would let a few hundred idle
//! sockets lock every client out until they time out; this way an idle or trickling socket holds a
//! slot only until newer connections need it, memory stays bounded by the cap, and a client that
//! logs in promptly (a few round trips) gets in even during a flood of half-open connections.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;

pub(crate) struct LoginSlots {
    cap: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    next: u64,
    /// Connections logging in, oldest first, each with the token that tells it to give up.
    by_age: BTreeMap<u64, CancellationToken>,
}

/// A connection's place among those logging in; dropping it frees the place.
pub(crate) struct LoginSlot {
    slots: Arc<LoginSlots>,
    id: u64,
    evicted: CancellationToken,
}

impl LoginSlots {
    /// At most `cap` (at least one) connections logging in at once.
    pub(crate) fn new(cap: usize) -> Arc<LoginSlots> {
        Arc::new(LoginSlots {
            cap: cap.max(1),
            open: Mutex::default(),
        })
    }

    /// A slot for a new connection, evicting the oldest login in progress if all are taken.
    pub(crate) fn admit(self: &Arc<Self>) -> LoginSlot {
        let mut open = self.open();
        while open.by_age.len() >= self.cap {
            if let Some((_, oldest)) = open.by_age.pop_first() {
                oldest.cancel();
            }
        }
        let id = open.next;
        open.next += 1;
        let evicted = CancellationToken::new();
        open.by_age.insert(id, evicted.clone());
        LoginSlot {
            slots: self.clone(),
            id,
            evicted,
        }
    }

    #[cfg(test)]
    fn in_progress(&self) -> usize {
        self.open().by_age.len()
    }

    fn open(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LoginSlot {
    /// Resolves when a newer connection has taken this slot.
    pub(crate) async fn evicted(&self) {
        self.evicted.cancelled().await
    }
}

impl Drop for LoginSlot {
    fn drop(&mut self) {
        self.slots.open().by_age.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_login_makes_room() {
        let slots = LoginSlots::new(2);
        let first = slots.admit();
        let second = slots.admit();
        assert_eq!(slots.in_progress(), 2);
        let third = slots.admit();
        assert_eq!(slots.in_progress(), 2);
        assert!(first.evicted.is_cancelled());
        assert!(!second.evicted.is_cancelled() && !third.evicted.is_cancelled());
        drop(first);
        assert_eq!(slots.in_progress(), 2, "an evicted slot is already free");
        drop(second);
        assert_eq!(slots.in_progress(), 1);
        let _fourth = slots.admit();
        assert!(!third.evicted.is_cancelled(), "room was free");
    }

    #[test]
    fn a_finished_login_frees_its_slot() {
        let slots = LoginSlots::new(1);
        drop(slots.admit());
        assert_eq!(slots.in_progress(), 0);
        let only = slots.admit();
        assert!(!only.evicted.is_cancelled());
    }
}

//! A DatabaseServer's connection budget (`maxConnections`). Every connection the router holds on
//! the server counts, idle ones included, and the budget is divided among the router's replicas
//! ([`crate::peers`]), so that together they never hold more than `maxConnections`.
//!
//! Within a replica's share, tenants share fairly: a tenant alone may use all of it, but once
//! other tenants wait, one at or above its fair share (share / tenants with demand) yields. A
//! tenant that needs a connection when the share is spent takes the place of another tenant's
//! idle one, which is closed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;

use super::TenantPool;
use crate::peers::Peers;

/// The most a tenant may hold while others wait.
pub(crate) fn fair_share(share: usize, tenants_with_demand: usize) -> usize {
    (share / tenants_with_demand.max(1)).max(1)
}

/// The fair share now: divided among the tenants with connections open or checkouts waiting.
fn fair_share_now(
    share: usize,
    open: &HashMap<String, usize>,
    waiting: &HashMap<String, usize>,
) -> usize {
    let with_demand = open
        .iter()
        .chain(waiting.iter())
        .filter(|(_, n)| **n > 0)
        .map(|(t, _)| t)
        .collect::<HashSet<_>>()
        .len();
    fair_share(share, with_demand)
}

/// What a tenant that needs one more server connection may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Open one: there is room.
    Open,
    /// The share is spent: close another tenant's idle connection, if there is one, and open.
    MakeRoom,
    /// Wait for a connection to be released or closed.
    Wait,
}

/// Whether `tenant` must let others go first: other tenants wait, and it holds its fair share
/// already (pure).
pub(crate) fn yields(
    share: usize,
    open: &HashMap<String, usize>,
    waiting: &HashMap<String, usize>,
    tenant: &str,
) -> bool {
    if !waiting.iter().any(|(t, n)| t != tenant && *n > 0) {
        return false;
    }
    open.get(tenant).copied().unwrap_or(0) >= fair_share_now(share, open, waiting)
}

/// Whether a connection `tenant` releases should be closed rather than kept idle, so that a
/// waiting tenant below its fair share gets the place: the share is spent and `tenant` holds more
/// than its fair share (pure). Tenants at their fair share keep their connections: closing and
/// reopening on every transaction would cost a login each.
pub(crate) fn gives_way(
    share: usize,
    open: &HashMap<String, usize>,
    waiting: &HashMap<String, usize>,
    tenant: &str,
) -> bool {
    if open.values().sum::<usize>() < share {
        return false;
    }
    let fair = fair_share_now(share, open, waiting);
    let starved = waiting
        .iter()
        .any(|(t, n)| t != tenant && *n > 0 && open.get(t).copied().unwrap_or(0) < fair);
    starved && open.get(tenant).copied().unwrap_or(0) > fair
}

/// What `tenant` may do, with `share` connections for this replica, `open` connections per
/// tenant (idle included) and `waiting` checkouts per tenant (pure).
pub(crate) fn decide(
    share: usize,
    open: &HashMap<String, usize>,
    waiting: &HashMap<String, usize>,
    tenant: &str,
) -> Decision {
    if yields(share, open, waiting, tenant) {
        Decision::Wait
    } else if open.values().sum::<usize>() < share {
        Decision::Open
    } else {
        Decision::MakeRoom
    }
}

#[derive(Default)]
struct State {
    open: HashMap<String, usize>,
    waiting: HashMap<String, usize>,
    /// `open` and `waiting` summed, kept as they change: a release asks on every transaction.
    open_total: usize,
    waiting_total: usize,
}

/// One server's budget on this replica.
pub(crate) struct ServerBudget {
    /// The DatabaseServer's `maxConnections`, for all replicas together.
    limit: AtomicUsize,
    peers: Arc<Peers>,
    state: Mutex<State>,
    /// The pools of the tenants on this server, whose idle connections may make room.
    members: Mutex<HashMap<String, Weak<TenantPool>>>,
    /// Signalled whenever a connection is released or closed.
    pub(crate) changed: Notify,
}

/// A place in a server's budget: held by an open connection, idle or not; given back on drop.
pub(crate) struct Slot {
    budget: Arc<ServerBudget>,
    tenant: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.budget.lock();
        if let Some(n) = s.open.get_mut(&self.tenant) {
            *n -= 1;
            s.open_total -= 1;
        }
        drop(s);
        self.budget.changed.notify_waiters();
    }
}

/// A checkout waiting for a slot, counted for fairness until dropped.
pub(crate) struct Waiting<'a> {
    budget: &'a ServerBudget,
    tenant: &'a str,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut s = self.budget.lock();
        if let Some(n) = s.waiting.get_mut(self.tenant) {
            *n -= 1;
            s.waiting_total -= 1;
        }
        drop(s);
        // A waiter leaving can change another's answer.
        self.budget.changed.notify_waiters();
    }
}

impl ServerBudget {
    pub(crate) fn new(limit: usize, peers: Arc<Peers>) -> Self {
        ServerBudget {
            limit: AtomicUsize::new(limit.max(1)),
            peers,
            state: Mutex::new(State::default()),
            members: Mutex::new(HashMap::new()),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The DatabaseServer's `maxConnections` changed.
    pub(crate) fn set_limit(&self, limit: usize) {
        self.limit.store(limit.max(1), Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// The DatabaseServer's `maxConnections`.
    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// This replica's part of the budget: `maxConnections` divided among the replicas, at least
    /// one (with more replicas than `maxConnections`, each still holds one).
    pub(crate) fn share(&self) -> usize {
        (self.limit() / self.peers.replicas().max(1)).max(1)
    }

    /// Whether this replica holds more than its share (the replicas became more, or
    /// `maxConnections` less).
    pub(crate) fn over(&self) -> bool {
        self.lock().open_total > self.share()
    }

    /// Whether a connection `tenant` releases should be closed rather than kept idle: this
    /// replica holds more than its share, or a starved tenant waits ([`gives_way`]). Asked on
    /// every release: with nobody waiting it looks at no tenant's counts.
    pub(crate) fn keeps_no_idle(&self, tenant: &str) -> bool {
        let share = self.share();
        let s = self.lock();
        s.open_total > share
            || (s.waiting_total > 0 && gives_way(share, &s.open, &s.waiting, tenant))
    }

    /// Closes idle connections while this replica holds more than its share, then wakes the
    /// waiters (a larger share lets them in).
    pub(crate) fn trim(&self) {
        while self.over() && self.close_idle_of_others(None) {}
        self.changed.notify_waiters();
    }

    /// A tenant's pool, whose idle connections may make room for other tenants.
    pub(crate) fn join(&self, tenant: &str, pool: Weak<TenantPool>) {
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        members.retain(|_, p| p.strong_count() > 0);
        members.insert(tenant.to_string(), pool);
    }

    /// Counts a checkout of `tenant` as waiting until the guard drops.
    pub(crate) fn wait_as<'a>(&'a self, tenant: &'a str) -> Waiting<'a> {
        let mut s = self.lock();
        *s.waiting.entry(tenant.to_string()).or_default() += 1;
        s.waiting_total += 1;
        drop(s);
        Waiting {
            budget: self,
            tenant,
        }
    }

    /// A slot for a new connection of `tenant`, now, if the budget allows: closing another
    /// tenant's idle connection when the share is spent. None means wait for [`Self::changed`].
    pub(crate) fn try_take(self: &Arc<Self>, tenant: &str) -> Option<Slot> {
        loop {
            {
                let mut s = self.lock();
                match decide(self.share(), &s.open, &s.waiting, tenant) {
                    Decision::Open => {
                        *s.open.entry(tenant.to_string()).or_default() += 1;
                        s.open_total += 1;
                        return Some(Slot {
                            budget: self.clone(),
                            tenant: tenant.to_string(),
                        });
                    }
                    Decision::Wait => return None,
                    Decision::MakeRoom => {}
                }
            }
            // Outside the lock: closing a connection gives its slot back through it.
            if !self.close_idle_of_others(Some(tenant)) {
                return None;
            }
        }
    }

    /// Closes the oldest idle connection of the tenant with the most connections open, other
    /// than `except`. False when no such tenant has one idle.
    fn close_idle_of_others(&self, except: Option<&str>) -> bool {
        let pools: Vec<Arc<TenantPool>> = {
            let members = self.members.lock().unwrap_or_else(|p| p.into_inner());
            members
                .iter()
                .filter(|(t, _)| Some(t.as_str()) != except)
                .filter_map(|(_, p)| p.upgrade())
                .collect()
        };
        let mut candidates: Vec<(usize, Arc<TenantPool>)> = {
            let s = self.lock();
            pools
                .into_iter()
                .map(|p| (s.open.get(&p.key).copied().unwrap_or(0), p))
                .collect()
        };
        candidates.sort_by_key(|(open, _)| std::cmp::Reverse(*open));
        candidates.iter().any(|(_, pool)| pool.close_oldest_idle())
    }

    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        let s = self.lock();
        assert_eq!(s.open_total, s.open.values().sum::<usize>());
        s.open_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::*;
    use std::time::Duration;

    /// Open connections, or waiting checkouts, by tenant.
    type Counts = &'static [(&'static str, usize)];

    fn map(pairs: &[(&str, usize)]) -> HashMap<String, usize> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn fair_share_divides_and_never_reaches_zero() {
        assert_eq!(fair_share(100, 4), 25);
        assert_eq!(fair_share(10, 3), 3);
        assert_eq!(fair_share(2, 5), 1);
        assert_eq!(fair_share(10, 0), 10);
    }

    #[test]
    fn decisions() {
        // (what, share, open, waiting, tenant asking, decision)
        let cases: [(&str, usize, Counts, Counts, &str, Decision); 8] = [
            ("room", 10, &[("a", 3)], &[("a", 1)], "a", Open),
            (
                "alone, the whole share",
                10,
                &[("a", 9)],
                &[("a", 1)],
                "a",
                Open,
            ),
            (
                "alone, share spent by its own connections",
                10,
                &[("a", 10)],
                &[("a", 1)],
                "a",
                MakeRoom,
            ),
            (
                "idle connections of others count",
                4,
                &[("a", 2), ("b", 2)],
                &[("c", 1)],
                "c",
                MakeRoom,
            ),
            (
                "over its fair share while another waits",
                10,
                &[("a", 8)],
                &[("a", 3), ("b", 1)],
                "a",
                Wait,
            ),
            (
                "under its fair share while another waits",
                10,
                &[("a", 8)],
                &[("a", 3), ("b", 1)],
                "b",
                Open,
            ),
            (
                "fair share with the share spent",
                4,
                &[("a", 4)],
                &[("a", 1), ("b", 1)],
                "b",
                MakeRoom,
            ),
            (
                "a share of one, two tenants",
                1,
                &[("a", 1)],
                &[("b", 1)],
                "b",
                MakeRoom,
            ),
        ];
        for (what, share, open, waiting, tenant, expected) in cases {
            assert_eq!(
                decide(share, &map(open), &map(waiting), tenant),
                expected,
                "{what}"
            );
        }
    }

    #[test]
    fn a_tenant_over_its_fair_share_gives_way_to_a_starved_one() {
        // (what, share, open, waiting, tenant releasing, closes its connection)
        let cases: [(&str, usize, Counts, Counts, &str, bool); 6] = [
            ("nobody else waits", 4, &[("a", 4)], &[("a", 3)], "a", false),
            (
                "b waits, a holds all",
                4,
                &[("a", 4)],
                &[("b", 1)],
                "a",
                true,
            ),
            (
                "b waits, but there is room",
                4,
                &[("a", 3)],
                &[("b", 1)],
                "a",
                false,
            ),
            (
                "both at their fair share: no churn",
                4,
                &[("a", 2), ("b", 2)],
                &[("a", 1), ("b", 1)],
                "a",
                false,
            ),
            (
                "three tenants, a over, c starved",
                4,
                &[("a", 3), ("b", 1)],
                &[("c", 1)],
                "a",
                true,
            ),
            (
                "b over its share releases, a starved",
                4,
                &[("a", 1), ("b", 3)],
                &[("a", 1)],
                "b",
                true,
            ),
        ];
        for (what, share, open, waiting, tenant, expected) in cases {
            assert_eq!(
                gives_way(share, &map(open), &map(waiting), tenant),
                expected,
                "{what}"
            );
        }
    }

    #[tokio::test]
    async fn a_waiting_checkout_gets_the_slot_that_comes_back() {
        let budget = Arc::new(ServerBudget::new(1, Arc::new(Peers::alone())));
        let held = budget.try_take("a");
        assert!(held.is_some());
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move {
                let _waiting = budget.wait_as("b");
                loop {
                    let changed = budget.changed.notified();
                    if let Some(slot) = budget.try_take("b") {
                        return slot.tenant.clone();
                    }
                    changed.await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the budget is spent");
        drop(held);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap_or_else(|_| panic!("the waiter was not woken"));
        assert_eq!(got.ok().as_deref(), Some("b"));
    }

    /// The totals a release reads are kept as slots and waiters come and go: its answer is the
    /// one the per-tenant counts give, whatever the order of events.
    #[test]
    fn a_release_answers_from_totals_as_the_counts_would() {
        let budget = Arc::new(ServerBudget::new(4, Arc::new(Peers::alone())));
        let tenants = ["a", "b", "c"];
        let mut slots: Vec<Slot> = Vec::new();
        let mut waiting: Vec<Waiting<'_>> = Vec::new();
        let mut answers = HashSet::new();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for step in 0..2_000 {
            let tenant = tenants[next(tenants.len())];
            match next(4) {
                0 => slots.extend(budget.try_take(tenant)),
                1 if !slots.is_empty() => drop(slots.swap_remove(next(slots.len()))),
                2 => waiting.push(budget.wait_as(tenant)),
                _ if !waiting.is_empty() => drop(waiting.swap_remove(next(waiting.len()))),
                _ => {}
            }
            let s = budget.lock();
            let open: usize = s.open.values().sum();
            assert_eq!(s.open_total, open, "step {step}");
            assert_eq!(
                s.waiting_total,
                s.waiting.values().sum::<usize>(),
                "step {step}"
            );
            let expected: Vec<bool> = tenants
                .iter()
                .map(|t| open > 4 || gives_way(4, &s.open, &s.waiting, t))
                .collect();
            drop(s);
            let got: Vec<bool> = tenants.iter().map(|t| budget.keeps_no_idle(t)).collect();
            assert_eq!(got, expected, "step {step}");
            answers.extend(got);
        }
        assert_eq!(answers.len(), 2, "the walk saw both answers");
    }

    #[test]
    fn the_budget_is_divided_among_replicas() {
        let peers = Arc::new(Peers::at([10, 0, 0, 1].into()));
        let budget = Arc::new(ServerBudget::new(10, peers.clone()));
        assert_eq!(budget.share(), 10);
        let slots: Vec<Slot> = (0..4).filter_map(|_| budget.try_take("a")).collect();
        assert_eq!(slots.len(), 4);
        peers.update(
            ["10.0.0.1:6432", "10.0.0.2:6432", "10.0.0.3:6432"]
                .map(|a| a.parse().unwrap_or_else(|e| panic!("{e}"))),
        );
        assert_eq!(budget.share(), 3);
        assert!(budget.over(), "4 open, a share of 3");
        assert!(
            budget.try_take("a").is_none(),
            "no idle connection to close"
        );
        drop(slots);
        assert_eq!(budget.open(), 0, "slots come back on drop");
        assert!(!budget.over());
    }
}

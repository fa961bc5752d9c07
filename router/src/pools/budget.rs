//! A DatabaseServer's connection budget (`maxConnections`), shared fairly by the tenants on it:
//! a tenant alone may use all of it, but once other tenants wait, one at or above its fair share
//! (budget / tenants with demand) yields the next free slot to them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// The most a tenant may hold while others wait.
fn fair_share(budget: usize, tenants_with_demand: usize) -> usize {
    (budget / tenants_with_demand.max(1)).max(1)
}

/// Whether `tenant` may take a slot now (pure).
fn may_take(
    budget: usize,
    held: &HashMap<String, usize>,
    waiting: &HashMap<String, usize>,
    tenant: &str,
) -> bool {
    let total: usize = held.values().sum();
    if total >= budget {
        return false;
    }
    let others_waiting = waiting.iter().any(|(t, n)| t != tenant && *n > 0);
    if !others_waiting {
        return true;
    }
    let with_demand = held
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(t, _)| t)
        .chain(waiting.iter().filter(|(_, n)| **n > 0).map(|(t, _)| t))
        .collect::<std::collections::HashSet<_>>()
        .len()
        .max(1);
    held.get(tenant).copied().unwrap_or(0) < fair_share(budget, with_demand)
}

#[derive(Default)]
struct State {
    held: HashMap<String, usize>,
    waiting: HashMap<String, usize>,
}

/// One server's budget.
pub(crate) struct ServerBudget {
    pub(crate) budget: usize,
    state: Mutex<State>,
    changed: Notify,
}

/// A slot of a server's budget, given back on drop.
pub(crate) struct Slot {
    budget: Arc<ServerBudget>,
    tenant: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.budget.lock();
        if let Some(n) = s.held.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
        }
        drop(s);
        self.budget.changed.notify_waiters();
    }
}

impl ServerBudget {
    pub(crate) fn new(budget: usize) -> Self {
        ServerBudget {
            budget: budget.max(1),
            state: Mutex::new(State::default()),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a slot for `tenant`, at most `timeout`; None when it did not come.
    pub(crate) async fn take(self: &Arc<Self>, tenant: &str, timeout: Duration) -> Option<Slot> {
        let deadline = tokio::time::Instant::now() + timeout;
        *self.lock().waiting.entry(tenant.to_string()).or_default() += 1;
        let result = loop {
            let notified = self.changed.notified();
            {
                let mut s = self.lock();
                if may_take(self.budget, &s.held, &s.waiting, tenant) {
                    *s.held.entry(tenant.to_string()).or_default() += 1;
                    break Some(Slot {
                        budget: self.clone(),
                        tenant: tenant.to_string(),
                    });
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break None;
            }
        };
        if let Some(n) = self.lock().waiting.get_mut(tenant) {
            *n = n.saturating_sub(1);
        }
        // A waiter leaving can change another's answer.
        self.changed.notify_waiters();
        result
    }

    #[cfg(test)]
    fn in_use(&self) -> usize {
        self.lock().held.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_lone_tenant_may_use_the_whole_budget() {
        assert!(may_take(10, &map(&[("a", 9)]), &map(&[("a", 1)]), "a"));
        assert!(
            !may_take(10, &map(&[("a", 10)]), &map(&[("a", 1)]), "a"),
            "budget spent"
        );
    }

    #[test]
    fn a_busy_tenant_yields_to_waiting_ones() {
        // a holds 8 of 10, b waits: a is over its share (5) and must let b go first.
        let held = map(&[("a", 8)]);
        let waiting = map(&[("a", 3), ("b", 1)]);
        assert!(!may_take(10, &held, &waiting, "a"));
        assert!(may_take(10, &held, &waiting, "b"));
    }

    #[tokio::test]
    async fn slots_come_back_and_waiters_time_out() {
        let budget = Arc::new(ServerBudget::new(2));
        let a1 = budget.take("a", Duration::from_millis(10)).await;
        let a2 = budget.take("a", Duration::from_millis(10)).await;
        assert!(a1.is_some() && a2.is_some());
        assert!(
            budget.take("b", Duration::from_millis(20)).await.is_none(),
            "budget spent"
        );
        drop(a1);
        assert!(budget.take("b", Duration::from_millis(20)).await.is_some());
        assert_eq!(
            budget.in_use(),
            1,
            "b's slot went back when dropped; a2 remains"
        );
        drop(a2);
    }
}

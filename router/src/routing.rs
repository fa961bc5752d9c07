//! The tenant table: which database a tenant name leads to, and whether it may connect (pure).

use std::sync::Arc;

/// Whether a tenant's connections are admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
pub enum TenantState {
    Ready,
    Suspended,
    /// A restore runs into its database.
    Restoring,
    Deleting,
    /// Known but not provisioned yet.
    Pending,
}

/// Everything the router needs to route one tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantRoute {
    pub namespace: String,
    pub name: String,
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub password: String,
    /// During a password rotation: the previous password (until the overlap ends) and the next
    /// one (a moment before the Secret switches to it), which clients may prove as well; the
    /// router logs in upstream as the current login only.
    pub other_passwords: Vec<String>,
    pub connection_limit: usize,
    pub state: TenantState,
    /// TLS toward the tenant's server.
    pub upstream_tls: crate::backend::UpstreamTls,
    /// The DatabaseServer the tenant is on, and that server's connection budget, if known.
    pub server: Option<(String, usize)>,
    /// Host names and path prefixes the HTTP resolve API matches.
    pub hosts: Vec<String>,
    pub path_prefixes: Vec<String>,
    /// When the Tenant was created (seconds since the epoch; `i64::MAX` when unknown): of two
    /// tenants claiming the same route, the older keeps it.
    pub created: i64,
}

impl TenantRoute {
    pub fn key(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }

    /// Whether `other` leads to the same place under the same rules, whatever the credentials:
    /// a rotated password keeps the tenant's pool and its server connections.
    pub fn same_but_credentials(&self, other: &TenantRoute) -> bool {
        let blank = |r: &TenantRoute| TenantRoute {
            user: String::new(),
            password: String::new(),
            other_passwords: Vec::new(),
            ..r.clone()
        };
        blank(self) == blank(other)
    }

    /// The passwords a client may prove: the current one first.
    pub fn passwords(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.password.as_str())
            .chain(self.other_passwords.iter().map(String::as_str))
    }

    /// The order of claims, the same rule the controller reports conflicts by.
    pub fn precedence(&self) -> silo_crds::routing::Precedence {
        silo_crds::routing::Precedence {
            created: self.created,
            key: format!("{}/{}", self.namespace, self.name),
        }
    }
}

/// Why a name does not lead to a routable tenant.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Found(Arc<TenantRoute>),
    Unknown,
    /// The bare name exists in several namespaces; `namespace.name` is needed.
    Ambiguous(Vec<String>),
}

/// Tenants by `namespace.name`, plus an index of bare names. Persistent maps: a clone shares
/// their structure, so that a table with some tenants changed costs as much as the changes, not
/// as the fleet, and every other route stays the same `Arc`.
#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub struct RoutingTable {
    by_key: imbl::HashMap<String, Arc<TenantRoute>>,
    by_name: imbl::HashMap<String, Vec<String>>,
}

/// A tenant's new route, or `None` when the tenant is gone: (`namespace.name`, route).
pub type RouteChange = (String, Option<TenantRoute>);

impl RoutingTable {
    pub fn new(routes: impl IntoIterator<Item = TenantRoute>) -> Self {
        let mut table = RoutingTable::default();
        for route in routes {
            table.insert(route);
        }
        table
    }

    /// Puts each change in force, except where the route is already the one in force (that one
    /// stays, `Arc` and all). Returns the tenants that changed, each with its route before.
    pub fn apply(
        &mut self,
        changes: impl IntoIterator<Item = RouteChange>,
    ) -> Vec<(String, Option<Arc<TenantRoute>>)> {
        let mut changed = Vec::new();
        for (key, route) in changes {
            let before = self.by_key.get(&key).cloned();
            if before.as_deref() == route.as_ref() {
                continue;
            }
            match route {
                Some(route) => self.insert(route),
                None => self.remove(&key),
            }
            changed.push((key, before));
        }
        changed
    }

    fn insert(&mut self, route: TenantRoute) {
        let key = route.key();
        let keys = self.by_name.entry(route.name.clone()).or_default();
        if let Err(at) = keys.binary_search(&key) {
            keys.insert(at, key.clone());
        }
        self.by_key.insert(key, Arc::new(route));
    }

    fn remove(&mut self, key: &str) {
        let Some(route) = self.by_key.remove(key) else {
            return;
        };
        if let Some(keys) = self.by_name.get_mut(&route.name) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.by_name.remove(&route.name);
            }
        }
    }

    /// The tenant `namespace.name`, by its key only.
    pub fn get(&self, key: &str) -> Option<&Arc<TenantRoute>> {
        self.by_key.get(key)
    }

    /// `name` or `namespace.name`.
    pub fn lookup(&self, tenant: &str) -> Lookup {
        if let Some(route) = self.by_key.get(tenant) {
            return Lookup::Found(route.clone());
        }
        match self.by_name.get(tenant).map(Vec::as_slice) {
            Some([only]) => self
                .by_key
                .get(only)
                .cloned()
                .map_or(Lookup::Unknown, Lookup::Found),
            Some(many) if many.len() > 1 => Lookup::Ambiguous(many.to_vec()),
            _ => Lookup::Unknown,
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn routes(&self) -> impl Iterator<Item = &Arc<TenantRoute>> {
        self.by_key.values()
    }

    /// The tenant an HTTP request belongs to: among tenants whose hosts (if any) include `host`
    /// and whose path prefixes (if any) match `path`, the most specific one (a host match, then
    /// the longest prefix); of equally specific ones, the first claim (the oldest Tenant, see
    /// `silo_crds::routing`). Tenants with neither hosts nor prefixes, and tenants being deleted,
    /// never match.
    pub fn resolve(&self, host: Option<&str>, path: Option<&str>) -> Option<Arc<TenantRoute>> {
        let host = host.map(|h| h.split(':').next().unwrap_or(h).to_ascii_lowercase());
        self.by_key
            .values()
            .filter(|r| !r.hosts.is_empty() || !r.path_prefixes.is_empty())
            .filter(|r| r.state != TenantState::Deleting)
            .filter_map(|r| {
                let host_ok = r.hosts.is_empty()
                    || host
                        .as_ref()
                        .is_some_and(|h| r.hosts.iter().any(|x| x == h));
                let prefix = if r.path_prefixes.is_empty() {
                    Some(0)
                } else {
                    let path = path?;
                    r.path_prefixes
                        .iter()
                        .filter(|p| path.starts_with(p.as_str()))
                        .map(|p| p.len())
                        .max()
                };
                match (host_ok, prefix) {
                    (true, Some(len)) => Some(((!r.hosts.is_empty(), len), r)),
                    _ => None,
                }
            })
            .max_by(|(a, ra), (b, rb)| a.cmp(b).then_with(|| rb.precedence().cmp(&ra.precedence())))
            .map(|(_, r)| r.clone())
    }
}

/// The tenant a client names: the startup `database`, or a `user.tenant` suffix when the
/// database is absent or the user's own name. Returns (tenant, user).
/// An explicit `database` wins; then a `user.tenant` suffix; then the TLS SNI name; then the user.
pub fn tenant_from_startup<'a>(
    user: &'a str,
    database: Option<&'a str>,
    sni: Option<&'a str>,
) -> (&'a str, &'a str) {
    match database {
        Some(db) if !db.is_empty() && db != user => (db, user),
        _ => match (user.rsplit_once('.'), sni) {
            (Some((u, tenant)), _) if !tenant.is_empty() => (tenant, u),
            (_, Some(tenant)) => (tenant, user),
            _ => (user, user),
        },
    }
}

/// The tenant named by an SNI host name `tenant.<domain>`.
pub fn tenant_from_sni<'a>(server_name: &'a str, domain: Option<&str>) -> Option<&'a str> {
    let tenant = server_name.strip_suffix(domain?)?.strip_suffix('.')?;
    (!tenant.is_empty() && !tenant.contains('.')).then_some(tenant)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(ns: &str, name: &str) -> TenantRoute {
        TenantRoute {
            namespace: ns.into(),
            name: name.into(),
            host: "127.0.0.1".into(),
            port: 5432,
            database: format!("t_{ns}_{name}"),
            user: format!("t_{ns}_{name}"),
            password: "pw".into(),
            other_passwords: Vec::new(),
            connection_limit: 10,
            state: TenantState::Ready,
            upstream_tls: Default::default(),
            server: None,
            hosts: vec![],
            path_prefixes: vec![],
            created: 0,
        }
    }

    #[test]
    fn the_first_claim_keeps_a_contested_route() {
        let mut late = route("a", "aaa-late");
        late.hosts = vec!["acme.example.com".into()];
        late.created = 200;
        let mut early = route("z", "zzz-early");
        early.hosts = vec!["acme.example.com".into()];
        early.created = 100;
        let mut gone = route("0", "gone");
        gone.hosts = vec!["acme.example.com".into()];
        gone.created = 1;
        gone.state = TenantState::Deleting;
        let t = RoutingTable::new([late, early, gone]);
        let name = t
            .resolve(Some("acme.example.com"), None)
            .map(|r| r.name.clone());
        assert_eq!(name.as_deref(), Some("zzz-early"));
    }

    #[test]
    fn resolve_prefers_host_then_longest_prefix() {
        let mut a = route("p", "acme");
        a.hosts = vec!["acme.example.com".into()];
        let mut b = route("p", "beta");
        b.path_prefixes = vec!["/t/beta".into()];
        let mut c = route("p", "beta-eu");
        c.path_prefixes = vec!["/t/beta/eu".into()];
        let t = RoutingTable::new([a, b, c, route("p", "plain")]);
        let name = |h: Option<&str>, p: Option<&str>| t.resolve(h, p).map(|r| r.name.clone());
        assert_eq!(
            name(Some("ACME.example.com:443"), Some("/t/beta")),
            Some("acme".into())
        );
        assert_eq!(
            name(Some("other"), Some("/t/beta/eu/x")),
            Some("beta-eu".into())
        );
        assert_eq!(name(None, Some("/t/beta/x")), Some("beta".into()));
        assert_eq!(name(Some("other"), Some("/nothing")), None);
        assert_eq!(name(None, None), None);
    }

    #[test]
    fn bare_names_and_qualified_names() {
        let t = RoutingTable::new([
            route("a", "acme"),
            route("a", "shared"),
            route("b", "shared"),
        ]);
        assert!(matches!(t.lookup("acme"), Lookup::Found(r) if r.namespace == "a"));
        assert!(matches!(t.lookup("b.shared"), Lookup::Found(r) if r.namespace == "b"));
        assert_eq!(
            t.lookup("shared"),
            Lookup::Ambiguous(vec!["a.shared".into(), "b.shared".into()])
        );
        assert_eq!(t.lookup("nope"), Lookup::Unknown);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn applied_changes_keep_bare_names_in_step_and_equal_routes_in_place() {
        let mut t = RoutingTable::new([route("a", "shared"), route("b", "shared")]);
        let kept = t.get("b.shared").cloned();
        let changed = t.apply([
            ("a.shared".to_string(), None),
            ("b.shared".to_string(), Some(route("b", "shared"))),
        ]);
        assert_eq!(changed.len(), 1, "only a.shared changed");
        assert_eq!(
            changed[0].1.as_ref().map(|r| r.key()).as_deref(),
            Some("a.shared")
        );
        assert!(matches!(t.lookup("shared"), Lookup::Found(r) if r.namespace == "b"));
        assert!(kept.is_some_and(|r| t.get("b.shared").is_some_and(|now| Arc::ptr_eq(&r, now))));

        t.apply([("a.shared".to_string(), Some(route("a", "shared")))]);
        assert_eq!(
            t.lookup("shared"),
            Lookup::Ambiguous(vec!["a.shared".into(), "b.shared".into()])
        );
        assert_eq!(
            t,
            RoutingTable::new([route("b", "shared"), route("a", "shared")])
        );
    }

    #[test]
    fn tenant_comes_from_database_or_user_suffix() {
        assert_eq!(
            tenant_from_startup("app", Some("acme"), None),
            ("acme", "app")
        );
        assert_eq!(tenant_from_startup("app.acme", None, None), ("acme", "app"));
        assert_eq!(
            tenant_from_startup("app.acme", Some("app.acme"), None),
            ("acme", "app")
        );
        assert_eq!(tenant_from_startup("acme", None, None), ("acme", "acme"));
        assert_eq!(
            tenant_from_startup("app", Some("app"), Some("beta")),
            ("beta", "app")
        );
        assert_eq!(
            tenant_from_startup("app", Some("acme"), Some("beta")),
            ("acme", "app")
        );
    }

    #[test]
    fn sni_names_a_tenant_under_the_domain() {
        assert_eq!(
            tenant_from_sni("acme.db.example.com", Some("db.example.com")),
            Some("acme")
        );
        assert_eq!(
            tenant_from_sni("a.b.db.example.com", Some("db.example.com")),
            None
        );
        assert_eq!(
            tenant_from_sni("db.example.com", Some("db.example.com")),
            None
        );
        assert_eq!(
            tenant_from_sni("acme.other.com", Some("db.example.com")),
            None
        );
        assert_eq!(tenant_from_sni("acme.db.example.com", None), None);
    }
}

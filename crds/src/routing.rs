//! Who holds a route of `spec.routing`. The controller reports conflicts with this and the router
//! resolves with it, so the two always agree: of several Tenants claiming the same host and path
//! prefix, the first claim keeps the route (the oldest Tenant, then the lowest
//! `namespace/name`), and every later claimant is told so.

use crate::{RoutingSpec, Tenant};

/// One route: a host name (empty: any host) with a path prefix (empty: any path).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub host: String,
    pub path_prefix: String,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.host.as_str(), self.path_prefix.as_str()) {
            (host, "") => write!(f, "host {host}"),
            ("", prefix) => write!(f, "path prefix {prefix}"),
            (host, prefix) => write!(f, "host {host} with path prefix {prefix}"),
        }
    }
}

/// The routes a spec claims: every host with every prefix.
pub fn routes(spec: Option<&RoutingSpec>) -> Vec<Route> {
    let Some(spec) = spec else { return Vec::new() };
    let hosts: Vec<&str> = if spec.hosts.is_empty() {
        vec![""]
    } else {
        spec.hosts.iter().map(String::as_str).collect()
    };
    let prefixes: Vec<&str> = if spec.path_prefixes.is_empty() {
        vec![""]
    } else {
        spec.path_prefixes.iter().map(String::as_str).collect()
    };
    let mut routes: Vec<Route> = hosts
        .iter()
        .flat_map(|host| {
            prefixes.iter().map(move |prefix| Route {
                host: host.to_ascii_lowercase(),
                path_prefix: prefix.to_string(),
            })
        })
        .filter(|r| !(r.host.is_empty() && r.path_prefix.is_empty()))
        .collect();
    routes.sort();
    routes.dedup();
    routes
}

/// The order in which claims count: creation time, then `namespace/name`. Smaller claims first.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Precedence {
    /// Seconds since the epoch of `metadata.creationTimestamp` (`i64::MAX` when unknown).
    pub created: i64,
    pub key: String,
}

impl Precedence {
    pub fn of(tenant: &Tenant) -> Self {
        Precedence {
            created: tenant
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(i64::MAX, |t| t.0.as_second()),
            key: format!(
                "{}/{}",
                tenant.metadata.namespace.as_deref().unwrap_or_default(),
                tenant.metadata.name.as_deref().unwrap_or_default()
            ),
        }
    }
}

/// A route that another Tenant claims too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contest {
    pub route: Route,
    /// `namespace/name` of the other Tenant.
    pub other: String,
    /// Whether this tenant's claim came first, so it keeps the route.
    pub kept: bool,
}

/// The routes `tenant` shares with `others`, and who keeps each (pure).
pub fn contests<'a>(tenant: &Tenant, others: impl IntoIterator<Item = &'a Tenant>) -> Vec<Contest> {
    let mine = routes(tenant.spec.routing.as_ref());
    if mine.is_empty() {
        return Vec::new();
    }
    let me = Precedence::of(tenant);
    let mut contests: Vec<Contest> = others
        .into_iter()
        .filter(|other| other.metadata.deletion_timestamp.is_none())
        .map(|other| (Precedence::of(other), other))
        .filter(|(precedence, _)| precedence.key != me.key)
        .flat_map(|(precedence, other)| {
            let theirs = routes(other.spec.routing.as_ref());
            let kept = me < precedence;
            mine.iter()
                .filter(move |r| theirs.contains(r))
                .map(move |route| Contest {
                    route: route.clone(),
                    other: precedence.key.clone(),
                    kept,
                })
                .collect::<Vec<_>>()
        })
        .collect();
    contests.sort_by(|a, b| (&a.route, &a.other).cmp(&(&b.route, &b.other)));
    contests
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TenantSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn tenant(ns: &str, name: &str, created: i64, hosts: &[&str], prefixes: &[&str]) -> Tenant {
        let mut t = Tenant::new(
            name,
            TenantSpec {
                routing: Some(RoutingSpec {
                    hosts: hosts.iter().map(|h| h.to_string()).collect(),
                    path_prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
                }),
                ..TenantSpec::default()
            },
        );
        t.metadata.namespace = Some(ns.into());
        t.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(created).unwrap_or_default(),
        ));
        t
    }

    #[test]
    fn routes_are_hosts_times_prefixes() {
        let t = tenant("a", "x", 0, &["A.example.com"], &["/a", "/b"]);
        let r = routes(t.spec.routing.as_ref());
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].to_string(), "host a.example.com with path prefix /a");
        assert!(routes(None).is_empty());
        assert!(routes(Some(&RoutingSpec::default())).is_empty());
    }

    #[test]
    fn the_first_claim_keeps_the_route() {
        let first = tenant("a", "first", 100, &["acme.example.com"], &[]);
        let second = tenant(
            "b",
            "second",
            200,
            &["acme.example.com", "b.example.com"],
            &[],
        );
        let other = tenant("c", "other", 50, &["other.example.com"], &[]);
        let won = contests(&first, [&second, &other, &first]);
        assert_eq!(won.len(), 1);
        assert!(won[0].kept);
        assert_eq!(won[0].other, "b/second");
        let lost = contests(&second, [&first, &other]);
        assert_eq!(lost.len(), 1);
        assert!(!lost[0].kept);
        assert_eq!(lost[0].route.host, "acme.example.com");
        // Same creation second: the lower namespace/name comes first.
        let twin = tenant("a", "aaa", 100, &["acme.example.com"], &[]);
        assert!(contests(&twin, [&first]).iter().all(|c| c.kept));
        assert!(contests(&first, [&twin]).iter().all(|c| !c.kept));
    }

    #[test]
    fn a_more_specific_route_is_no_conflict() {
        let whole = tenant("a", "whole", 1, &["acme.example.com"], &[]);
        let part = tenant("b", "part", 2, &["acme.example.com"], &["/api"]);
        assert!(contests(&part, [&whole]).is_empty());
    }

    #[test]
    fn a_tenant_being_deleted_holds_nothing() {
        let mut old = tenant("a", "old", 1, &["acme.example.com"], &[]);
        old.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let new = tenant("b", "new", 2, &["acme.example.com"], &[]);
        assert!(contests(&new, [&old]).is_empty());
    }
}

//! The tenant's credentials Secret (pure builders).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Resource;
use kube::api::ObjectMeta;
use silo_crds::Tenant;

use crate::sql::TenantNames;

pub use silo_crds::contract::secret_name;
use silo_crds::contract::{self, keys};

/// Where a tenant's clients reach its database: directly, and through the router if there is one.
pub struct Endpoint<'a> {
    pub host: &'a str,
    pub port: i32,
    /// The router's `host:port`, and the name the tenant has there (`namespace.name`).
    pub router: Option<(&'a str, String)>,
}

/// The tenant's credentials as its Secret holds them: the login and password clients use, and
/// during a rotation's overlap the previous ones, which still work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
    pub previous: Option<(String, String)>,
    /// A rotation's next login and password, proved, before the Secret switches to them.
    pub next: Option<(String, String)>,
}

impl Credentials {
    /// A tenant's first credentials: its owner role logs in.
    pub fn first(names: &TenantNames, password: String) -> Self {
        Credentials {
            user: names.role.clone(),
            password,
            previous: None,
            next: None,
        }
    }

    /// Whether the owner role itself logs in (a tenant never rotated, or in its first overlap).
    pub fn owner_logs_in(&self, owner: &str) -> bool {
        self.user == owner
            || self
                .previous
                .as_ref()
                .is_some_and(|(user, _)| user == owner)
    }
}

/// The credentials an existing Secret holds, if it has a usable password. A user that is not the
/// tenant's owner role or one of its login roles (edited by hand, or removed) counts as `login`
/// (the one the status last showed) or else the owner, and so is put back.
pub fn stored_credentials(
    secret: &Secret,
    names: &TenantNames,
    login: Option<&str>,
) -> Option<Credentials> {
    let text = |key: &str| {
        let bytes = secret.data.as_ref()?.get(key)?;
        String::from_utf8(bytes.0.clone())
            .ok()
            .filter(|s| !s.is_empty())
    };
    let owner = &names.role;
    let ours = |user: &String| user == owner || contract::login_roles(owner).contains(user);
    let password = text(keys::PASSWORD)?;
    let user = text(keys::USER)
        .filter(ours)
        .or_else(|| login.map(str::to_string).filter(ours))
        .unwrap_or_else(|| owner.clone());
    let other = |user_key: &str, password_key: &str| match (text(user_key), text(password_key)) {
        (Some(other), Some(password)) if ours(&other) && other != user => Some((other, password)),
        _ => None,
    };
    Some(Credentials {
        previous: other(keys::PREVIOUS_USER, keys::PREVIOUS_PASSWORD),
        next: other(keys::NEXT_USER, keys::NEXT_PASSWORD),
        user,
        password,
    })
}

/// The Secret's data: `host`, `port`, `dbname`, `user`, `password`, `uri` (a `DATABASE_URL`),
/// with a router `router-uri` (the same through the router), and during an overlap
/// `previous-user` and `previous-password`, and for a moment before a rotation switches it
/// `next-user` and `next-password`.
pub fn secret_data(
    names: &TenantNames,
    endpoint: &Endpoint<'_>,
    credentials: &Credentials,
) -> BTreeMap<String, ByteString> {
    let Credentials {
        user,
        password,
        previous,
        next,
    } = credentials;
    // Role names and generated passwords are URI-safe ([A-Za-z0-9_-]); an IPv6 host needs brackets.
    let host = if endpoint.host.contains(':') {
        format!("[{}]", endpoint.host)
    } else {
        endpoint.host.to_string()
    };
    let uri = format!(
        "postgresql://{user}:{password}@{host}:{}/{}",
        endpoint.port, names.database
    );
    let router_uri = endpoint
        .router
        .as_ref()
        .map(|(address, tenant)| format!("postgresql://{user}:{password}@{address}/{tenant}"));
    let previous = previous.iter().flat_map(|(user, password)| {
        [
            (keys::PREVIOUS_USER, user.clone()),
            (keys::PREVIOUS_PASSWORD, password.clone()),
        ]
    });
    let next = next.iter().flat_map(|(user, password)| {
        [
            (keys::NEXT_USER, user.clone()),
            (keys::NEXT_PASSWORD, password.clone()),
        ]
    });
    [
        (keys::HOST, endpoint.host.to_string()),
        (keys::PORT, endpoint.port.to_string()),
        (keys::DBNAME, names.database.clone()),
        (keys::USER, user.clone()),
        (keys::PASSWORD, password.clone()),
        (keys::URI, uri),
    ]
    .into_iter()
    .chain(router_uri.map(|u| (keys::ROUTER_URI, u)))
    .chain(previous)
    .chain(next)
    .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
    .collect()
}

/// A new Secret for `tenant`, owned by it so that it goes when the Tenant goes.
pub fn build_secret(tenant: &Tenant, data: BTreeMap<String, ByteString>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: tenant.metadata.name.as_deref().map(secret_name),
            namespace: tenant.metadata.namespace.clone(),
            labels: Some(labels(tenant)),
            owner_references: tenant.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

pub fn labels(tenant: &Tenant) -> BTreeMap<String, String> {
    [
        (
            contract::MANAGED_BY_LABEL.to_string(),
            contract::MANAGED_BY.to_string(),
        ),
        (
            contract::TENANT_LABEL.to_string(),
            tenant.metadata.name.clone().unwrap_or_default(),
        ),
    ]
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(data: &BTreeMap<String, ByteString>, key: &str) -> String {
        String::from_utf8(data[key].0.clone()).unwrap_or_default()
    }

    #[test]
    fn data_has_every_key_and_a_working_uri() {
        let names = TenantNames::derive("prod", "acme");
        let data = secret_data(
            &names,
            &Endpoint {
                host: "127.0.0.1",
                port: 5433,
                router: Some(("router.silo:6432", "prod.acme".into())),
            },
            &Credentials::first(&names, "pw".into()),
        );
        let keys: Vec<&str> = data.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "dbname",
                "host",
                "password",
                "port",
                "router-uri",
                "uri",
                "user"
            ]
        );
        assert_eq!(
            text(&data, "router-uri"),
            "postgresql://t_prod_acme:pw@router.silo:6432/prod.acme"
        );
        assert_eq!(
            text(&data, "uri"),
            "postgresql://t_prod_acme:pw@127.0.0.1:5433/t_prod_acme"
        );
    }

    #[test]
    fn ipv6_hosts_are_bracketed_in_the_uri() {
        let names = TenantNames::derive("a", "b");
        let data = secret_data(
            &names,
            &Endpoint {
                host: "::1",
                port: 5432,
                router: None,
            },
            &Credentials::first(&names, "pw".into()),
        );
        assert_eq!(text(&data, "uri"), "postgresql://t_a_b:pw@[::1]:5432/t_a_b");
        assert_eq!(text(&data, "host"), "::1");
        assert!(!data.contains_key("router-uri"));
    }

    #[test]
    fn during_an_overlap_the_previous_login_is_kept_and_a_foreign_user_is_not() {
        let names = TenantNames::derive("prod", "acme");
        let endpoint = Endpoint {
            host: "db",
            port: 5432,
            router: None,
        };
        let rotated = Credentials {
            user: "t_prod_acme_a".into(),
            password: "new".into(),
            previous: Some(("t_prod_acme".into(), "old".into())),
            next: None,
        };
        let data = secret_data(&names, &endpoint, &rotated);
        assert_eq!(
            text(&data, "uri"),
            "postgresql://t_prod_acme_a:new@db:5432/t_prod_acme"
        );
        assert_eq!(text(&data, "previous-user"), "t_prod_acme");
        let secret = Secret {
            data: Some(data.clone()),
            ..Default::default()
        };
        assert_eq!(stored_credentials(&secret, &names, None), Some(rotated));

        // Another tenant's role typed into `user`: the login the status shows is put back (the
        // owner's, without one), and no previous login is taken from a hand-edited key.
        let mut edited = data;
        for (key, value) in [("user", "t_prod_other"), ("previous-user", "postgres")] {
            edited.insert(key.into(), ByteString(value.as_bytes().to_vec()));
        }
        let secret = Secret {
            data: Some(edited),
            ..Default::default()
        };
        assert_eq!(
            stored_credentials(&secret, &names, Some("t_prod_acme_a")),
            Some(Credentials {
                user: "t_prod_acme_a".into(),
                password: "new".into(),
                previous: None,
                next: None,
            })
        );
        let owner = stored_credentials(&secret, &names, Some("postgres")).map(|c| c.user);
        assert_eq!(owner.as_deref(), Some("t_prod_acme"));
    }
}

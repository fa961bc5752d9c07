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

/// The Secret's data: `host`, `port`, `dbname`, `user`, `password`, `uri` (a `DATABASE_URL`) and,
/// with a router, `router-uri` (the same through the router).
pub fn secret_data(
    names: &TenantNames,
    endpoint: &Endpoint<'_>,
    password: &str,
) -> BTreeMap<String, ByteString> {
    // Role names and generated passwords are URI-safe ([A-Za-z0-9_-]); an IPv6 host needs brackets.
    let host = if endpoint.host.contains(':') {
        format!("[{}]", endpoint.host)
    } else {
        endpoint.host.to_string()
    };
    let uri = format!(
        "postgresql://{}:{password}@{host}:{}/{}",
        names.role, endpoint.port, names.database
    );
    let router_uri = endpoint.router.as_ref().map(|(address, tenant)| {
        format!("postgresql://{}:{password}@{address}/{tenant}", names.role)
    });
    [
        (keys::HOST, endpoint.host.to_string()),
        (keys::PORT, endpoint.port.to_string()),
        (keys::DBNAME, names.database.clone()),
        (keys::USER, names.role.clone()),
        (keys::PASSWORD, password.to_string()),
        (keys::URI, uri),
    ]
    .into_iter()
    .chain(router_uri.map(|u| (keys::ROUTER_URI, u)))
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

/// The password stored in an existing Secret, if it has a usable one.
pub fn stored_password(secret: &Secret) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(keys::PASSWORD)?;
    let password = String::from_utf8(bytes.0.clone()).ok()?;
    (!password.is_empty()).then_some(password)
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
            "pw",
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
            "pw",
        );
        assert_eq!(text(&data, "uri"), "postgresql://t_a_b:pw@[::1]:5432/t_a_b");
        assert_eq!(text(&data, "host"), "::1");
        assert!(!data.contains_key("router-uri"));
    }
}

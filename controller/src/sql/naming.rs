//! Deterministic PostgreSQL names for a tenant.

use sha2::{Digest, Sha256};

/// PostgreSQL truncates identifiers longer than this many bytes (NAMEDATALEN - 1).
pub const MAX_IDENT_BYTES: usize = 63;

/// The database and role names of one tenant, derived from its namespace and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantNames {
    pub database: String,
    pub role: String,
}

impl TenantNames {
    /// `t_<namespace>_<name>`. Kubernetes names never contain `_`, so the separator keeps distinct
    /// (namespace, name) pairs distinct. Past 63 bytes the name is cut and a hash of the full name is
    /// appended, so it stays unique. Database and role share the name: they live in separate
    /// catalogs, and an admin reading `pg_stat_activity` sees at once which role owns which database.
    pub fn derive(namespace: &str, name: &str) -> Self {
        let full = format!("t_{namespace}_{name}");
        let name = if full.len() <= MAX_IDENT_BYTES {
            full
        } else {
            let hash = Sha256::digest(full.as_bytes());
            let suffix: String = hash[..5].iter().map(|b| format!("{b:02x}")).collect();
            // Names are ASCII (DNS labels), so cutting at a byte index is safe.
            format!("{}_{suffix}", &full[..MAX_IDENT_BYTES - suffix.len() - 1])
        };
        TenantNames {
            database: name.clone(),
            role: name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_readable() {
        let n = TenantNames::derive("prod", "acme");
        assert_eq!(n.database, "t_prod_acme");
        assert_eq!(n.role, "t_prod_acme");
    }

    #[test]
    fn separator_keeps_pairs_apart() {
        assert_ne!(
            TenantNames::derive("a-b", "c"),
            TenantNames::derive("a", "b-c")
        );
    }

    #[test]
    fn long_names_fit_and_stay_unique() {
        let ns = "n".repeat(63);
        let a = TenantNames::derive(&ns, &format!("{}a", "x".repeat(59)));
        let b = TenantNames::derive(&ns, &format!("{}b", "x".repeat(59)));
        assert_eq!(a.database.len(), MAX_IDENT_BYTES);
        assert_eq!(b.database.len(), MAX_IDENT_BYTES);
        assert_ne!(a, b);
        assert_eq!(
            a,
            TenantNames::derive(&ns, &format!("{}a", "x".repeat(59))),
            "deterministic"
        );
    }

    #[test]
    fn exactly_63_bytes_is_kept_as_is() {
        let name = "x".repeat(63 - "t_ns_".len());
        assert_eq!(
            TenantNames::derive("ns", &name).database,
            format!("t_ns_{name}")
        );
    }
}

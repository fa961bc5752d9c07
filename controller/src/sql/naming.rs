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

/// Hex digits of the hash that ends a shortened name: 64 bits, far beyond anything a search
/// for a colliding (namespace, name) pair can reach.
const HASH_HEX: usize = 16;

impl TenantNames {
    /// `t_<namespace>_<name>`. Kubernetes names never contain `_`, so the separator keeps distinct
    /// (namespace, name) pairs distinct, and such a name never contains `__`. Past 63 bytes the
    /// name is cut and `__` plus a hash of the full name is appended: the two forms can never
    /// produce the same name (only shortened names contain `__`), and two shortened names are
    /// equal only if their full names' hashes are. Database and role share the name: they live in
    /// separate catalogs, and an admin reading `pg_stat_activity` sees at once which role owns
    /// which database.
    ///
    /// Names alone are not trusted: the role and database also carry the tenant's identity (see
    /// `sql::identity`), and a name held by anything else is a conflict, never adopted.
    pub fn derive(namespace: &str, name: &str) -> Self {
        let full = format!("t_{namespace}_{name}");
        let name = if full.len() <= MAX_IDENT_BYTES {
            full
        } else {
            let hash = Sha256::digest(full.as_bytes());
            let suffix: String = hash[..HASH_HEX / 2]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            // Names are ASCII (DNS labels), so cutting at a byte index is safe.
            format!("{}__{suffix}", &full[..MAX_IDENT_BYTES - HASH_HEX - 2])
        };
        TenantNames {
            database: name.clone(),
            role: name,
        }
    }

    /// The names recorded in the tenant's status (they never change once recorded, whatever
    /// version of the derivation recorded them), else freshly derived ones.
    pub fn of(tenant: &silo_crds::Tenant) -> Self {
        let status = tenant.status.as_ref();
        match (
            status.and_then(|s| s.database.clone()),
            status.and_then(|s| s.role.clone()),
        ) {
            (Some(database), Some(role)) => TenantNames { database, role },
            _ => TenantNames::derive(
                tenant.metadata.namespace.as_deref().unwrap_or_default(),
                tenant.metadata.name.as_deref().unwrap_or_default(),
            ),
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

    /// The takeover a review found: a namespace equal to the first 50 characters of a victim's
    /// long namespace, and a Tenant named like the victim's hash suffix, derived exactly the
    /// victim's name under the old scheme (cut to 52 + `_` + 10 hex).
    #[test]
    fn short_and_shortened_names_never_meet() {
        let victim_ns = format!("team-{}", "v".repeat(55));
        let victim = TenantNames::derive(&victim_ns, "acme");
        assert_eq!(victim.database.len(), MAX_IDENT_BYTES);
        assert!(victim.database.contains("__"), "{}", victim.database);
        // Every short form an attacker could pick: the victim's cut prefix as namespace, and any
        // suffix of the victim's name (as long as it is a DNS label) as tenant name.
        let (prefix, suffix) = victim
            .database
            .rsplit_once("__")
            .unwrap_or_else(|| unreachable!());
        let attacker_ns = &prefix["t_".len()..];
        for cut in 1..=suffix.len() {
            let name = &suffix[suffix.len() - cut..];
            assert_ne!(TenantNames::derive(attacker_ns, name), victim);
        }
        // The old scheme's exact attack: 50-character namespace, 10-hex tenant name.
        let old_suffix: String = Sha256::digest(format!("t_{victim_ns}_acme").as_bytes())[..5]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let attacker = TenantNames::derive(&victim_ns[..50], &old_suffix);
        assert_eq!(
            attacker.database,
            format!("t_{}_{old_suffix}", &victim_ns[..50])
        );
        assert_ne!(attacker, victim);
    }

    #[test]
    fn short_names_never_contain_a_double_underscore() {
        for (ns, name) in [("a", "b"), ("prod", "acme-1"), ("x-y", "z")] {
            assert!(!TenantNames::derive(ns, name).database.contains("__"));
        }
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

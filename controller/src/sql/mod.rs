//! Everything that talks to PostgreSQL: one pool per server, tenant naming, DDL and password verifiers.

pub mod catalog;
pub mod ddl;
pub mod identity;
pub mod naming;
pub mod pools;
pub mod restore;
pub mod rotation;
pub mod scram;
pub mod scratch;

pub use naming::TenantNames;
pub use pools::{ServerHandle, ServerPools};

/// `"ident"` with embedded quotes doubled: every identifier Silo sends is quoted this way.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// `'literal'` with embedded quotes doubled, for the few utility statements (ALTER ROLE ... PASSWORD,
/// COMMENT) that cannot take bind parameters. Backslashes are literal under
/// `standard_conforming_strings`, which PostgreSQL has defaulted to on since 9.1.
pub fn quote_literal(literal: &str) -> String {
    format!("'{}'", literal.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_ident("acme"), "\"acme\"");
        assert_eq!(
            quote_ident("a\"; DROP TABLE x; --"),
            "\"a\"\"; DROP TABLE x; --\""
        );
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}

//! Whose a role or a database is. A name is never proof: Silo records the tenant's namespace,
//! name and uid in the comment of the role and of the database it creates, and acts on an
//! existing role or database only when that record says it is the tenant's.

/// Prefix of the comment on a tenant's role and database while the Tenant exists.
pub const COMMENT_ACTIVE: &str = "silo: tenant";
/// Prefix of the comment on the role and database of a Tenant deleted with policy `Retain`.
pub const COMMENT_RETAINED: &str = "silo: retained";
/// Prefix of the comment on the role and database of a Tenant deleted with policy `Snapshot`:
/// its tombstone, kept on the server itself until the database is purged.
pub const COMMENT_TOMBSTONE: &str = "silo: tombstone";

/// The identity recorded in a Silo comment:
/// `silo: tenant <namespace>/<name> uid <uid>`,
/// `silo: retained <namespace>/<name> uid <uid> deleted <time>` or
/// `silo: tombstone <namespace>/<name> uid <uid> deleted <time> purge <time> backup <uri>`.
/// Comments written before the uid was recorded lack `uid <uid>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `namespace/name`.
    pub tenant: String,
    pub uid: Option<String>,
    /// The Tenant was deleted and its database kept (`Retain`, or `Snapshot` until the purge).
    pub retained: bool,
    pub tombstone: Option<Tombstone>,
}

/// What a `Snapshot` deletion records beside the database it keeps for the grace period.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tombstone {
    /// RFC 3339 times.
    pub deleted: String,
    pub purge_after: String,
    /// The final backup's URI.
    pub backup: String,
}

impl Identity {
    /// The identity in a comment, or `None` for a comment Silo did not write (or no comment).
    pub fn parse(comment: Option<&str>) -> Option<Identity> {
        let comment = comment?;
        let (prefix, rest) = [COMMENT_ACTIVE, COMMENT_RETAINED, COMMENT_TOMBSTONE]
            .into_iter()
            .find_map(|prefix| Some((prefix, comment.strip_prefix(prefix)?)))?;
        let retained = prefix != COMMENT_ACTIVE;
        let mut words = rest.strip_prefix(' ')?.split(' ');
        let tenant = words.next().filter(|t| t.contains('/'))?.to_string();
        let (mut uid, mut deleted, mut purge_after, mut backup) = (None, None, None, None);
        while let Some(word) = words.next() {
            match (word, words.next()) {
                ("uid", Some(value)) => uid = Some(value.to_string()),
                ("deleted", Some(value)) if retained => deleted = Some(value.to_string()),
                ("purge", Some(value)) if prefix == COMMENT_TOMBSTONE => {
                    purge_after = Some(value.to_string())
                }
                // The URI is the rest of the comment, whatever it holds.
                ("backup", Some(first)) if prefix == COMMENT_TOMBSTONE => {
                    backup = Some(
                        std::iter::once(first)
                            .chain(words.by_ref())
                            .collect::<Vec<_>>()
                            .join(" "),
                    )
                }
                _ => return None,
            }
        }
        let tombstone = match prefix {
            COMMENT_TOMBSTONE => Some(Tombstone {
                deleted: deleted?,
                purge_after: purge_after?,
                backup: backup?,
            }),
            _ => None,
        };
        Some(Identity {
            tenant,
            uid,
            retained,
            tombstone,
        })
    }

    /// Whether `tenant` may act on an object with this identity: it names the same namespace and
    /// name, and either the same uid or none (written before uids were recorded), or it was
    /// retained (re-applying a deleted Tenant takes its retained database back, as documented).
    /// An active object of another uid belongs to another Tenant of the same name: one in another
    /// cluster sharing the server, or one removed without its finalizer.
    pub fn admits(&self, tenant: &Claimant<'_>) -> bool {
        self.tenant == tenant.key
            && (self.retained || self.uid.as_deref().is_none_or(|uid| uid == tenant.uid))
    }

    /// For messages: whose the object is.
    pub fn describe(&self) -> String {
        let state = match (self.retained, &self.tombstone) {
            (_, Some(_)) => "deleted ",
            (true, None) => "retained ",
            (false, None) => "",
        };
        match &self.uid {
            Some(uid) => format!("{state}Tenant {} (uid {uid})", self.tenant),
            None => format!("{state}Tenant {}", self.tenant),
        }
    }
}

/// The tenant a reconcile acts for.
#[derive(Clone, Copy, Debug)]
pub struct Claimant<'a> {
    /// `namespace/name`.
    pub key: &'a str,
    pub uid: &'a str,
}

impl Claimant<'_> {
    /// The comment on the role and database of a live tenant.
    pub fn active_comment(&self) -> String {
        format!("{COMMENT_ACTIVE} {} uid {}", self.key, self.uid)
    }

    /// The comment on the role and database of a tenant deleted with policy `Retain` at `at`.
    pub fn retained_comment(&self, at: &str) -> String {
        format!(
            "{COMMENT_RETAINED} {} uid {} deleted {at}",
            self.key, self.uid
        )
    }

    /// The comment on the role and database of a tenant deleted with policy `Snapshot`: its
    /// tombstone.
    pub fn tombstone_comment(&self, tombstone: &Tombstone) -> String {
        let Tombstone {
            deleted,
            purge_after,
            backup,
        } = tombstone;
        format!(
            "{COMMENT_TOMBSTONE} {} uid {} deleted {deleted} purge {purge_after} backup {backup}",
            self.key, self.uid
        )
    }
}

/// What the catalog says about the names a tenant would use.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The role of that name and its comment, if the role exists.
    pub role: Option<Option<String>>,
    /// The database of that name: its owner and comment, if it exists.
    pub database: Option<(String, Option<String>)>,
}

/// A role or database that carries the tenant's name but is not the tenant's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// `role` or `database`.
    pub object: &'static str,
    pub name: String,
    /// Whose it is, in words.
    pub holder: String,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} belongs to {}",
            self.object, self.name, self.holder
        )
    }
}

/// Whether the tenant may use (create, adopt, change or drop) the role and database of these
/// names (pure). A role is the tenant's when its comment says so, or - for roles made before
/// roles carried comments - when it owns a database whose comment says so. A database is the
/// tenant's when its comment says so, or, without a Silo comment (a crash between CREATE DATABASE
/// and COMMENT), when its owner is the tenant's role.
pub fn verdict(
    observed: &Observed,
    role: &str,
    database: &str,
    tenant: &Claimant<'_>,
) -> Result<(), Conflict> {
    let db_identity = observed
        .database
        .as_ref()
        .map(|(owner, comment)| (owner.as_str(), Identity::parse(comment.as_deref())));
    let db_admits = matches!(&db_identity, Some((_, Some(id))) if id.admits(tenant));
    let role_ok = match &observed.role {
        None => true,
        Some(comment) => match Identity::parse(comment.as_deref()) {
            Some(id) if id.admits(tenant) => true,
            Some(id) => {
                return Err(Conflict {
                    object: "role",
                    name: role.to_string(),
                    holder: id.describe(),
                });
            }
            None if db_admits && db_identity.as_ref().is_some_and(|(o, _)| *o == role) => true,
            None => {
                return Err(Conflict {
                    object: "role",
                    name: role.to_string(),
                    holder: "a role Silo did not create for this tenant".into(),
                });
            }
        },
    };
    match db_identity {
        None => Ok(()),
        Some((_, Some(id))) if id.admits(tenant) => Ok(()),
        Some((_, Some(id))) => Err(Conflict {
            object: "database",
            name: database.to_string(),
            holder: id.describe(),
        }),
        Some((owner, None)) if owner == role && observed.role.is_some() && role_ok => Ok(()),
        Some((owner, None)) => Err(Conflict {
            object: "database",
            name: database.to_string(),
            holder: format!("role {owner}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Claimant<'static> = Claimant {
        key: "prod/acme",
        uid: "u1",
    };

    fn id(comment: &str) -> Option<Identity> {
        Identity::parse(Some(comment))
    }

    #[test]
    fn comments_parse_exactly() {
        assert_eq!(
            id("silo: tenant prod/acme uid u1"),
            Some(Identity {
                tenant: "prod/acme".into(),
                uid: Some("u1".into()),
                retained: false,
                tombstone: None,
            })
        );
        assert_eq!(
            id("silo: retained prod/acme uid u1 deleted 2026-01-01T00:00:00Z")
                .map(|i| (i.retained, i.uid)),
            Some((true, Some("u1".into())))
        );
        // Written before uids were recorded.
        assert_eq!(id("silo: tenant prod/acme").and_then(|i| i.uid), None);
        assert!(id("silo: retained prod/acme deleted 2026-01-01T00:00:00Z").is_some());
        for foreign in [
            "someone else's",
            "silo: tenantprod/acme",
            "silo: tenant acme",
            "silo: tenant prod/acme owner x",
            "silo: tenant prod/acme deleted now",
        ] {
            assert_eq!(id(foreign), None, "{foreign}");
        }
        assert_eq!(Identity::parse(None), None);
    }

    #[test]
    fn a_tombstone_reads_back_what_was_written() {
        let tombstone = Tombstone {
            deleted: "2026-12-01T10:00:00Z".into(),
            purge_after: "2026-12-08T10:00:00Z".into(),
            backup: "file:///var/lib/silo/my backups/prod/acme/acme-final.dump".into(),
        };
        let comment = ME.tombstone_comment(&tombstone);
        let read = id(&comment).expect("parses");
        assert_eq!(read.tombstone.as_ref(), Some(&tombstone));
        assert!(read.retained && read.admits(&ME));
        assert!(
            read.admits(&Claimant {
                key: "prod/acme",
                uid: "a-new-uid"
            }),
            "the same namespace and name take it back within the grace period"
        );
        assert!(!read.admits(&Claimant {
            key: "prod/other",
            uid: "u1"
        }));
        for incomplete in [
            "silo: tombstone prod/acme uid u1 deleted t purge p",
            "silo: tombstone prod/acme uid u1 deleted t backup b",
            "silo: tombstone prod/acme uid u1 purge p backup b",
            "silo: retained prod/acme uid u1 deleted t purge p backup b",
        ] {
            assert_eq!(id(incomplete), None, "{incomplete}");
        }
    }

    #[test]
    fn an_identity_admits_only_its_own_tenant() {
        let admits = |c: &str| id(c).is_some_and(|i| i.admits(&ME));
        assert!(admits("silo: tenant prod/acme uid u1"));
        assert!(admits("silo: tenant prod/acme"));
        assert!(admits("silo: retained prod/acme uid old deleted t"));
        assert!(!admits("silo: tenant prod/acme2 uid u1"));
        assert!(
            !admits("silo: tenant prod/acme uid u2"),
            "same name, another Tenant"
        );
        assert!(!admits("silo: tenant other/acme uid u1"));
        assert_eq!(
            id(&ME.active_comment()).map(|i| i.admits(&ME)),
            Some(true),
            "what Silo writes, it reads back"
        );
        assert_eq!(
            id(&ME.retained_comment("2026-01-01T00:00:00Z")).map(|i| (i.retained, i.admits(&ME))),
            Some((true, true))
        );
    }

    #[test]
    fn verdicts() {
        let ours = Some(ME.active_comment());
        let theirs = Some("silo: tenant other/victim uid v".to_string());
        let r = "t_prod_acme";
        let db = |owner: &str, comment: Option<String>| Some((owner.to_string(), comment));
        let cases: Vec<(&str, Observed, Result<(), &str>)> = vec![
            ("nothing yet", Observed::default(), Ok(())),
            (
                "both ours",
                Observed {
                    role: Some(ours.clone()),
                    database: db(r, ours.clone()),
                },
                Ok(()),
            ),
            (
                "our role, database not yet commented (crash after CREATE DATABASE)",
                Observed {
                    role: Some(ours.clone()),
                    database: db(r, None),
                },
                Ok(()),
            ),
            (
                "a legacy role owning our database",
                Observed {
                    role: Some(None),
                    database: db(r, Some("silo: tenant prod/acme".into())),
                },
                Ok(()),
            ),
            (
                "another tenant's role",
                Observed {
                    role: Some(theirs.clone()),
                    database: None,
                },
                Err("role"),
            ),
            (
                "a hand-made role of that name",
                Observed {
                    role: Some(None),
                    database: None,
                },
                Err("role"),
            ),
            (
                "a hand-made role and database",
                Observed {
                    role: Some(None),
                    database: db(r, None),
                },
                Err("role"),
            ),
            (
                "a database of another tenant, no role",
                Observed {
                    role: None,
                    database: db("t_other", theirs.clone()),
                },
                Err("database"),
            ),
            (
                "a database without comment and no role",
                Observed {
                    role: None,
                    database: db(r, None),
                },
                Err("database"),
            ),
            (
                "our role but someone else's database",
                Observed {
                    role: Some(ours.clone()),
                    database: db("postgres", None),
                },
                Err("database"),
            ),
            (
                "our database given to another owner by an admin: ours, owner restored",
                Observed {
                    role: Some(ours.clone()),
                    database: db("postgres", ours.clone()),
                },
                Ok(()),
            ),
        ];
        for (what, observed, expected) in cases {
            let got = verdict(&observed, r, r, &ME).map_err(|c| c.object);
            assert_eq!(got, expected, "{what}");
        }
    }
}

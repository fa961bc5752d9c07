//! What a tenant reconcile does to the world: the API server (status, Events, the Secret) and the
//! tenant's database server. The decisions are made in placement.rs and status.rs.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use silo_crds::conditions::{self, BACKED_UP, Desired, READY, ROUTED, SCHEMA_READY};
use silo_crds::contract;
use silo_crds::contract::keys;
use silo_crds::routing;
use silo_crds::{CredentialsStatus, DeletionPolicy, Tenant, TenantStatus};
use tracing::{info, warn};

use super::placement::{Candidate, Unplaceable, place_tenant};
use super::rotation::{self, Step};
use super::secret::{
    Credentials, Endpoint, build_secret, secret_data, secret_name, stored_credentials,
};
use super::status::{self, Report};
use super::{FIELD_MANAGER, Pass};
use crate::backup::settings::parse_duration;
use crate::context::{Context, lock_placements};
use crate::error::{Error, Result};
use crate::sql::ddl::{self, Change, RoleSpec};
use crate::sql::identity::Claimant;
use crate::sql::rotation::{self as rotation_sql, LoginSpec};
use crate::sql::{ServerHandle, catalog, scram};

/// The tenant's `server`, when that server exists but is not one of this controller's
/// (`--server-selector`): the tenant belongs to another install sharing the cluster. A server
/// that does not exist at all is this controller's concern (it reports it). Asked of the API
/// server rather than the cache, which may not be filled yet when a reconcile starts.
pub(super) async fn foreign_server(server: Option<&str>, ctx: &Context) -> Result<Option<String>> {
    let (Some(server), Some(selector)) = (server, &ctx.server_selector) else {
        return Ok(None);
    };
    if ctx.servers.get(&ObjectRef::new(server)).is_some() {
        return Ok(None);
    }
    let api: Api<silo_crds::DatabaseServer> = Api::all(ctx.client.clone());
    let by_name = ListParams::default().fields(&format!("metadata.name={server}"));
    if !api
        .list_metadata(&by_name.clone().labels(selector))
        .await?
        .items
        .is_empty()
    {
        return Ok(None);
    }
    let exists = !api.list_metadata(&by_name).await?.items.is_empty();
    Ok(exists.then(|| server.to_string()))
}

fn login_error(action: &'static str, server: &str, error: rotation_sql::LoginError) -> Error {
    match error {
        rotation_sql::LoginError::Sql(e) => Error::sql(action, server, e),
        not_ours => Error::Rotation {
            message: not_ours.to_string(),
        },
    }
}

/// The tenant's rotation policy: how often (if on a schedule) and how long the overlap lasts.
fn rotation_policy(tenant: &Tenant) -> (Option<std::time::Duration>, std::time::Duration) {
    let policy = tenant.spec.credentials.as_ref();
    let every = policy
        .and_then(|p| p.rotate_every.as_deref())
        .and_then(|every| parse_duration(every).ok());
    let overlap = policy
        .and_then(|p| parse_duration(&p.overlap).ok())
        .unwrap_or(rotation::DEFAULT_OVERLAP);
    (every, overlap)
}

impl Pass<'_> {
    /// Chooses a server and records the choice in status.
    pub(super) async fn place(&self) -> Result<Result<String, Unplaceable>> {
        let Pass { tenant, facts, ctx } = self;
        let key = &facts.key;
        // A Tenant applied again within its grace period goes back to its tombstoned database.
        let tombstoned = self.tombstone_server().await?;
        let chosen = {
            let mut placements = lock_placements(&ctx.placements);
            if let Some(server) = placements.get(key) {
                return Ok(Ok(server.clone()));
            }
            if let Some(server) = tombstoned {
                placements.insert(key.clone(), server.clone());
                server
            } else {
                let counts = ctx.tenants_by_server(&placements);
                let candidates: Vec<Candidate> = ctx
                    .servers
                    .state()
                    .iter()
                    .map(|s| Candidate {
                        name: s.name_any(),
                        labels: s.labels().clone(),
                        dedicated: s.spec.dedicated,
                        cordoned: s.spec.cordoned,
                        ready: s
                            .status
                            .as_ref()
                            .is_some_and(|st| conditions::is_true(&st.conditions, READY)),
                        max_tenants: usize::try_from(s.spec.max_tenants).unwrap_or(0),
                        tenants: counts.get(&s.name_any()).copied().unwrap_or(0),
                    })
                    .collect();
                match place_tenant(
                    tenant.spec.isolation,
                    tenant.spec.server_selector.as_ref(),
                    &candidates,
                ) {
                    Ok(server) => {
                        placements.insert(key.clone(), server.clone());
                        server
                    }
                    Err(unplaceable) => return Ok(Err(unplaceable)),
                }
            }
        };
        // Written only if nobody placed the tenant meanwhile (another install sharing the cluster).
        let report =
            Report::placed(None, &chosen, &facts.names, &facts.name).unless_changed_since(tenant);
        if let Err(e) = self.write(&report).await {
            lock_placements(&ctx.placements).remove(key);
            return Err(e);
        }
        info!(tenant = %key, server = %chosen, "tenant placed");
        let _ = ctx.server_changed.send(chosen.clone());
        // No Event of its own: the one that ends provisioning (Ready, or why not) names the
        // server, and one Event per new tenant is what a fleet's API server should carry.
        Ok(Ok(chosen))
    }

    /// The server of this install holding a tombstone of this tenant (its namespace and name),
    /// if any, asked among the servers whose status shows tombstones. Such a server that cannot
    /// be asked stops the placement: placing the tenant elsewhere would give it an empty database
    /// while its own waits for the purge.
    async fn tombstone_server(&self) -> Result<Option<String>> {
        let Pass { facts, ctx, .. } = self;
        let with_tombstones = ctx.servers.state().into_iter().filter(|s| {
            s.status
                .as_ref()
                .and_then(|st| st.tombstones.as_ref())
                .is_some_and(|t| t.count > 0)
        });
        for server in with_tombstones {
            let name = server.name_any();
            let Some(handle) = ctx.pools.get(&name) else {
                return Err(Error::ServerNotConnected { server: name });
            };
            let found = ddl::has_tombstone_of(&handle.pool, &facts.names.database, &facts.key)
                .await
                .map_err(|e| Error::sql("looking for a tombstone", &name, e))?;
            if found {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    /// Creates the credentials Secret, or brings an existing one back to the declared contents.
    /// Returns the credentials it holds, and its annotations (where rotation keeps its state).
    pub(super) async fn ensure_secret(
        &self,
        endpoint: &Endpoint<'_>,
    ) -> Result<(Credentials, BTreeMap<String, String>)> {
        let Pass { tenant, facts, ctx } = self;
        let names = &facts.names;
        let name = secret_name(&facts.name);
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &facts.namespace);
        let create = || async {
            let credentials = Credentials::first(names, scram::generate_password());
            let secret = build_secret(tenant, secret_data(names, endpoint, &credentials));
            let params = PostParams {
                field_manager: Some(super::FIELD_MANAGER.into()),
                ..Default::default()
            };
            let created = api.create(&params, &secret).await?;
            ctx.secret_writes.wrote(&created);
            Ok::<_, kube::Error>((credentials, BTreeMap::new()))
        };
        let existing = match self.current_secret(&api).await? {
            Some(existing) => existing,
            // Not in the cache: created here, unless it exists but is not labelled as ours.
            None => match create().await {
                Ok(created) => return Ok(created),
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    let Some(existing) = api.get_opt(&name).await? else {
                        return Ok(create().await?);
                    };
                    existing
                }
                Err(e) => return Err(e.into()),
            },
        };

        let owners = existing
            .metadata
            .owner_references
            .clone()
            .unwrap_or_default();
        let owned = owners.iter().any(|o| o.uid == facts.uid);
        let labels = existing.labels();
        let ours_unowned = owners.is_empty()
            && labels.get(contract::MANAGED_BY_LABEL).map(String::as_str)
                == Some(contract::MANAGED_BY)
            && labels.get(contract::TENANT_LABEL) == tenant.metadata.name.as_ref();
        if !owned && !ours_unowned {
            return Err(Error::Secret {
                namespace: facts.namespace.clone(),
                name,
                message: "exists but does not belong to this tenant; delete or rename it".into(),
            });
        }
        let login = tenant
            .status
            .as_ref()
            .and_then(|s| s.credentials.as_ref()?.login.clone());
        let credentials = stored_credentials(&existing, names, login.as_deref())
            .unwrap_or_else(|| Credentials::first(names, scram::generate_password()));
        let wanted = build_secret(tenant, secret_data(names, endpoint, &credentials));
        let retained_label = labels.contains_key(contract::RETAINED_LABEL);
        if !owned || existing.data != wanted.data || retained_label {
            // A merge patch: `data` replaced as a whole (keys it should not have set to null),
            // the retained mark dropped, ownership taken back.
            let mut data = json!(wanted.data);
            for key in existing.data.iter().flat_map(|d| d.keys()) {
                if wanted.data.as_ref().is_none_or(|w| !w.contains_key(key)) {
                    data[key] = serde_json::Value::Null;
                }
            }
            // Only onto the version read (from the cache): a newer one is read again (Conflict).
            let patch = json!({
                "metadata": {
                    "resourceVersion": existing.metadata.resource_version,
                    "ownerReferences": wanted.metadata.owner_references,
                    "labels": { contract::RETAINED_LABEL: null },
                },
                "data": data,
            });
            let patched = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            ctx.secret_writes.wrote(&patched);
            if !owned {
                info!(tenant = %facts.key, secret = %name, "retained credentials Secret adopted");
            }
        }
        Ok((credentials, existing.annotations().clone()))
    }

    /// The tenant's Secret as it is now: from the cache, unless this process wrote it since the
    /// cache last showed it (then from the API server).
    async fn current_secret(&self, api: &Api<Secret>) -> Result<Option<Secret>> {
        let Pass { facts, ctx, .. } = self;
        let name = secret_name(&facts.name);
        let cached = ctx
            .secrets
            .get(&ObjectRef::new(&name).within(&facts.namespace));
        let key = format!("{}/{name}", facts.namespace);
        if !ctx.secret_writes.unseen(&key) {
            return Ok(cached.map(|s| Secret::clone(&s)));
        }
        let current = api.get_opt(&name).await?;
        let version = |s: Option<&Secret>| s.and_then(|s| s.metadata.resource_version.clone());
        if version(current.as_ref()) == version(cached.as_deref()) {
            ctx.secret_writes.settled(&key);
        }
        Ok(current)
    }

    /// Role, database and grants as declared; sessions ended while suspended. Returns what changed.
    pub(super) async fn provision(
        &self,
        handle: &ServerHandle,
        credentials: &Credentials,
        server: &str,
    ) -> Result<Vec<Change>> {
        let Pass { tenant, facts, .. } = self;
        // A restore locks the tenant as a suspension does, sparing the restore's own login.
        let locked = tenant.spec.suspended || facts.restoring.is_some();
        if !locked && self.in_order(handle, credentials, server).await? {
            self.ctx.metrics.drift_checked("catalog");
            return Ok(Vec::new());
        }
        self.ctx.metrics.drift_checked("tenant");
        let changes = self
            .provision_each(handle, credentials, server, locked)
            .await;
        // Whatever happened, the snapshots read before no longer count for this tenant.
        handle.catalog.touched(&facts.names.role);
        changes
    }

    /// [`Self::provision`], asking the catalog about this tenant alone.
    async fn provision_each(
        &self,
        handle: &ServerHandle,
        credentials: &Credentials,
        server: &str,
        locked: bool,
    ) -> Result<Vec<Change>> {
        let Pass { tenant, facts, .. } = self;
        let names = &facts.names;
        let claimant = Claimant {
            key: &facts.key,
            uid: &facts.uid,
        };
        let pool = &handle.pool;
        let _permit = handle.ddl_permit().await;
        // Nothing is created, changed or given a password before the names are known to be ours.
        ddl::claim(pool, &names.role, &names.database, &claimant)
            .await
            .map_err(|e| Error::sql("checking names", server, e))?
            .map_err(|conflict| Error::NameConflict {
                conflict,
                server: server.to_string(),
            })?;
        // Once rotated, the owner role owns and no longer logs in (but in its first overlap);
        // the Secret's login is one of its login roles.
        let owner = &names.role;
        let rotated = credentials.user != *owner;
        let role = RoleSpec {
            role: owner,
            password: (!rotated).then_some(credentials.password.as_str()),
            connection_limit: tenant.spec.connection_limit,
            login: !locked && credentials.owner_logs_in(owner),
        };
        let mut changes = ddl::ensure_role(pool, &role, &claimant, &handle.verified)
            .await
            .map_err(|e| Error::sql("ensuring role", server, e))?;
        if rotated {
            let login = LoginSpec {
                login: &credentials.user,
                owner,
                password: &credentials.password,
                connection_limit: tenant.spec.connection_limit,
                can_login: !locked,
            };
            let more = rotation_sql::ensure_login(pool, &login, &handle.verified)
                .await
                .map_err(|e| login_error("ensuring the login role", server, e))?;
            changes.extend(more.into_iter().filter(|c| *c != Change::RoleCreated));
        }
        // The previous login works through the overlap, a rotation's next one from the moment
        // it is proved (neither while locked); a login role in use by no password has none (one
        // whose retirement a crash interrupted).
        let previous = credentials.previous.as_ref().map(|(user, _)| user);
        let next = credentials.next.as_ref().map(|(user, _)| user);
        for login in rotation_sql::existing_logins(pool, owner)
            .await
            .map_err(|e| Error::sql("listing login roles", server, e))?
        {
            let changed = if login == credentials.user {
                Ok(false)
            } else if Some(&login) == previous || Some(&login) == next {
                rotation_sql::set_can_login(pool, &login, !locked).await
            } else {
                rotation_sql::retire(pool, &login).await
            };
            if changed.map_err(|e| Error::sql("settling a login role", server, e))? {
                changes.push(Change::LoginChanged);
            }
        }
        let more = ddl::ensure_database(pool, &names.database, &names.role, &claimant)
            .await
            .map_err(|e| Error::sql("ensuring database", server, e))?;
        for change in more {
            if !changes.contains(&change) {
                changes.push(change);
            }
        }
        if locked {
            let restore_login = crate::sql::restore::login_name(&names.role);
            let ended =
                ddl::terminate_sessions_but(pool, &names.database, &names.role, &restore_login)
                    .await
                    .map_err(|e| Error::sql("ending sessions", server, e))?;
            if ended > 0 {
                info!(tenant = %facts.key, sessions = ended, "sessions of a locked tenant ended");
            }
        }
        Ok(changes)
    }

    /// Whether the server's recent catalog snapshot shows the tenant exactly as declared (see
    /// `sql::catalog`): a resync of a converged fleet then sends no query per tenant.
    async fn in_order(
        &self,
        handle: &ServerHandle,
        credentials: &Credentials,
        server: &str,
    ) -> Result<bool> {
        let Pass { tenant, facts, ctx } = self;
        let names = &facts.names;
        // Recent enough that a resync pass of the fleet shares a read or two per server.
        let max_age = (ctx.resync / 10).min(std::time::Duration::from_secs(30));
        let Some(snapshot) = handle
            .catalog
            .for_role(&handle.pool, &names.role, max_age)
            .await
            .map_err(|e| Error::sql("reading the catalog", server, e))?
        else {
            return Ok(false);
        };
        let owner = &names.role;
        let rotated = credentials.user != *owner;
        let comment = Claimant {
            key: &facts.key,
            uid: &facts.uid,
        }
        .active_comment();
        let declared = catalog::Declared {
            role: owner,
            database: &names.database,
            comment: &comment,
            connection_limit: tenant.spec.connection_limit,
            owner_logs_in: credentials.owner_logs_in(owner),
            owner_password: (!rotated).then_some(credentials.password.as_str()),
            login: rotated.then_some((credentials.user.as_str(), credentials.password.as_str())),
            also_logging_in: [&credentials.previous, &credentials.next]
                .into_iter()
                .flatten()
                .map(|(user, _)| user.as_str())
                .filter(|user| user != owner)
                .collect(),
        };
        Ok(snapshot.in_order(&declared, &handle.verified))
    }

    /// Password rotation, one step per pass as [`rotation::next_step`] says. Returns where
    /// rotation stands and when to look again. A step that fails changes nothing (the Secret is
    /// written last): it is reported in an Event and tried again in 30 s, and the rest of the
    /// pass (the tenant's status) goes on.
    pub(super) async fn rotation_step(
        &self,
        handle: &ServerHandle,
        server: &str,
        endpoint: &Endpoint<'_>,
        credentials: Credentials,
        annotations: &BTreeMap<String, String>,
    ) -> (CredentialsStatus, Option<jiff::Timestamp>) {
        let (every, overlap) = rotation_policy(self.tenant);
        let now = jiff::Timestamp::now();
        let created = self.tenant.creation_timestamp().map_or(now, |t| t.0);
        let mut unchanged = rotation::state(&credentials, annotations, overlap);
        unchanged.next_rotation = rotation::next_rotation(every, &unchanged, created).map(Time);
        let step = self.try_rotation_step(
            handle,
            server,
            endpoint,
            credentials,
            annotations,
            unchanged.clone(),
        );
        let outcome = step.await;
        if !matches!(&outcome, Ok((stands, _)) if *stands == unchanged) {
            // A step ran (or failed halfway): the snapshots read before no longer count for it.
            handle.catalog.touched(&self.facts.names.role);
        }
        match outcome {
            Ok(stands) => stands,
            Err(error) => {
                warn!(tenant = %self.facts.key, error = %error, "password rotation step failed; the Secret is unchanged");
                let note = format!("{error}; the Secret is unchanged, tried again in 30 s");
                self.publish(EventType::Warning, "RotationFailed", note)
                    .await;
                let retry = now.checked_add(jiff::SignedDuration::from_secs(30)).ok();
                (unchanged, retry)
            }
        }
    }

    /// The step itself, from `state`: where rotation stands before it.
    async fn try_rotation_step(
        &self,
        handle: &ServerHandle,
        server: &str,
        endpoint: &Endpoint<'_>,
        credentials: Credentials,
        annotations: &BTreeMap<String, String>,
        mut state: CredentialsStatus,
    ) -> Result<(CredentialsStatus, Option<jiff::Timestamp>)> {
        let Pass { tenant, facts, .. } = self;
        let owner = &facts.names.role;
        let (every, overlap) = rotation_policy(tenant);
        let requested = tenant.annotations().get(contract::ROTATE_ANNOTATION);
        let now = jiff::Timestamp::now();
        let created = tenant.creation_timestamp().map_or(now, |t| t.0);
        let locked = tenant.spec.suspended || facts.restoring.is_some();
        let next_since = credentials.next.as_ref().map(|_| {
            annotations
                .get(contract::NEXT_SINCE_ANNOTATION)
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        });
        let step = rotation::next_step(
            owner,
            every,
            requested.map(String::as_str),
            &state,
            next_since,
            created,
            now,
        );
        match step {
            Step::Idle { next } => Ok((state, next)),
            // A locked tenant's logins are all refused anyway; it rotates once unlocked.
            Step::Rotate { .. } | Step::Promote if locked => Ok((state, None)),
            Step::Rotate { to } => {
                let password = scram::generate_password();
                {
                    let _permit = handle.ddl_permit().await;
                    let login = LoginSpec {
                        login: &to,
                        owner,
                        password: &password,
                        connection_limit: tenant.spec.connection_limit,
                        can_login: true,
                    };
                    rotation_sql::ensure_login(&handle.pool, &login, &handle.verified)
                        .await
                        .map_err(|e| login_error("preparing the new login", server, e))?;
                }
                // Into the Secret only once proved to work, as the owner; as `next-*` first, which
                // the router accepts, and as the login clients use a moment later.
                self.prove_login(handle, server, &to, &password).await?;
                let next = Credentials {
                    next: Some((to, password)),
                    ..credentials
                };
                // This rotation honours the request: one made from now on gets its own.
                let honoured = requested.or(state.requested.as_ref());
                let annotations = json!({
                    contract::NEXT_SINCE_ANNOTATION: now.to_string(),
                    contract::ROTATE_HONOURED_ANNOTATION: honoured,
                });
                let data = secret_data(&facts.names, endpoint, &next);
                self.patch_secret(
                    json!({ "metadata": { "annotations": annotations }, "data": data }),
                )
                .await?;
                state.requested = honoured.cloned();
                let wait =
                    jiff::SignedDuration::try_from(rotation::PROPAGATION).unwrap_or_default();
                Ok((state, now.checked_add(wait).ok()))
            }
            Step::Promote => {
                let Some((user, password)) = credentials.next.clone() else {
                    return Ok((state, None));
                };
                let promoted = Credentials {
                    user,
                    password,
                    previous: Some((credentials.user.clone(), credentials.password.clone())),
                    next: None,
                };
                let until = now
                    .checked_add(jiff::SignedDuration::try_from(overlap).unwrap_or_default())
                    .unwrap_or(jiff::Timestamp::MAX);
                let annotations = json!({
                    contract::NEXT_SINCE_ANNOTATION: null,
                    contract::PREVIOUS_UNTIL_ANNOTATION: until.to_string(),
                    contract::ROTATED_AT_ANNOTATION: now.to_string(),
                });
                let mut data = json!(secret_data(&facts.names, endpoint, &promoted));
                data[keys::NEXT_USER] = serde_json::Value::Null;
                data[keys::NEXT_PASSWORD] = serde_json::Value::Null;
                self.patch_secret(
                    json!({ "metadata": { "annotations": annotations }, "data": data }),
                )
                .await?;
                info!(tenant = %facts.key, login = %promoted.user, until = %until, "password rotated");
                let note = format!(
                    "Secret {} now holds login {} with a new password; the previous login {} works until {until}",
                    secret_name(&facts.name),
                    promoted.user,
                    credentials.user
                );
                self.publish(EventType::Normal, "CredentialsRotated", note)
                    .await;
                let requested = state.requested.clone();
                let mut state = rotation::state(&promoted, &BTreeMap::new(), overlap);
                state.overlap_until = Some(Time(until));
                state.rotated_at = Some(Time(now));
                state.requested = requested;
                state.next_rotation = rotation::next_rotation(every, &state, created).map(Time);
                Ok((state, Some(until)))
            }
            Step::Retire { login } => {
                // The router and the Secret first: then the server refuses the old password.
                let patch = json!({
                    "metadata": { "annotations": { contract::PREVIOUS_UNTIL_ANNOTATION: null } },
                    "data": { keys::PREVIOUS_USER: null, keys::PREVIOUS_PASSWORD: null },
                });
                self.patch_secret(patch).await?;
                {
                    let _permit = handle.ddl_permit().await;
                    rotation_sql::retire(&handle.pool, &login)
                        .await
                        .map_err(|e| Error::sql("retiring the previous login", server, e))?;
                }
                info!(tenant = %facts.key, login = %login, "previous login retired");
                let note = format!(
                    "the previous password (login {login}) no longer works; sessions it opened keep running"
                );
                self.publish(EventType::Normal, "PreviousLoginRetired", note)
                    .await;
                state.previous_login = None;
                state.overlap_until = None;
                let next = state.next_rotation.as_ref().map(|t| t.0);
                Ok((state, next))
            }
        }
    }

    /// Logs in as the new login with its password, into the tenant's database, and checks the
    /// session runs as the owner role (so what it creates is the tenant's).
    async fn prove_login(
        &self,
        handle: &ServerHandle,
        server: &str,
        login: &str,
        password: &str,
    ) -> Result<()> {
        use sqlx::Connection;
        let names = &self.facts.names;
        let options = handle
            .pool
            .connect_options()
            .as_ref()
            .clone()
            .username(login)
            .password(password)
            .database(&names.database);
        let mut conn = sqlx::PgConnection::connect_with(&options)
            .await
            .map_err(|e| Error::sql("logging in with the new password", server, e))?;
        let user: String = sqlx::query_scalar("SELECT current_user::text")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| Error::sql("logging in with the new password", server, e))?;
        let _ = conn.close().await;
        if user != names.role {
            return Err(Error::Rotation {
                message: format!(
                    "login {login} runs as {user}, not as the tenant role {}; the Secret is unchanged",
                    names.role
                ),
            });
        }
        Ok(())
    }

    /// A merge patch of the tenant's Secret (`data` keys set to null are removed).
    async fn patch_secret(&self, patch: serde_json::Value) -> Result<()> {
        let Pass { facts, ctx, .. } = self;
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &facts.namespace);
        let patched = api
            .patch(
                &secret_name(&facts.name),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        ctx.secret_writes.wrote(&patched);
        Ok(())
    }

    /// The deletion policy on the server: role and database dropped, or locked and retained.
    pub(super) async fn carry_out_policy(
        &self,
        handle: &ServerHandle,
        server: &str,
    ) -> Result<ddl::Cleanup> {
        let facts = &self.facts;
        let names = &facts.names;
        let claimant = Claimant {
            key: &facts.key,
            uid: &facts.uid,
        };
        let _permit = handle.ddl_permit().await;
        Ok(match facts.policy {
            DeletionPolicy::Delete => {
                ddl::drop_tenant(&handle.pool, &names.database, &names.role, &claimant)
                    .await
                    .map_err(|e| Error::sql("dropping tenant", server, e))?
            }
            // Snapshot deletions go through tenant::snapshot; were one to come here, its data
            // would be kept.
            DeletionPolicy::Retain | DeletionPolicy::Snapshot => {
                let at = jiff::Timestamp::now().to_string();
                ddl::lock_and_retain(&handle.pool, &names.database, &names.role, &claimant, &at)
                    .await
                    .map_err(|e| Error::sql("locking retained tenant", server, e))?
            }
        })
    }

    /// Marks the credentials Secret retained and no longer owned by the Tenant (if it exists).
    pub(super) async fn retain_secret(&self) -> Result<()> {
        let secrets: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.facts.namespace);
        let secret = secret_name(&self.facts.name);
        let patch = json!({ "metadata": { "ownerReferences": null, "labels": { contract::RETAINED_LABEL: "true" } } });
        match secrets
            .patch(&secret, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(patched) => {
                self.ctx.secret_writes.wrote(&patched);
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The tenant is off `server`: this process's placement is dropped, and the server's tenant
    /// count refreshed.
    pub(super) fn forget_placement(&self, server: String) {
        lock_placements(&self.ctx.placements).remove(&self.facts.key);
        let _ = self.ctx.server_changed.send(server);
    }

    /// The `Routed` condition: whether the routes of `spec.routing` are this tenant's alone. A
    /// route another Tenant claimed first stays theirs (the router agrees, by the same rule); a
    /// contest is shown on both Tenants, with an Event when it appears.
    pub(super) async fn routes(&self) -> Desired {
        let Pass { tenant, facts, ctx } = self;
        // Most tenants claim no route: they need no look at the others (a copy of the cache).
        let contests = if routing::routes(tenant.spec.routing.as_ref()).is_empty() {
            Vec::new()
        } else {
            let others = ctx.tenants.state();
            routing::contests(tenant, others.iter().map(|t| t.as_ref()))
        };
        let condition = status::routed_condition(&contests);
        let known = tenant
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == ROUTED));
        if !contests.is_empty() && known.is_none_or(|c| c.message != condition.message) {
            self.publish(
                EventType::Warning,
                "RouteConflict",
                condition.message.clone(),
            )
            .await;
            // The other side learns of it now, not at its next resync.
            let mine = &facts.key;
            for contest in &contests {
                let Some((namespace, name)) = contest.other.split_once('/') else {
                    continue;
                };
                let other = ObjectRef::new(name).within(namespace);
                let told = ctx.tenants.get(&other).is_some_and(|t| {
                    t.status.as_ref().is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|c| c.type_ == ROUTED && c.message.contains(mine.as_str()))
                    })
                });
                if !told {
                    let _ = ctx.tenant_changed.send(other);
                }
            }
        }
        condition
    }

    /// On an error, shows it in status (see `status::failed`) before returning it.
    pub(super) async fn reported<T>(&self, placed: &Report, result: Result<T>) -> Result<T> {
        match result {
            Ok(value) => Ok(value),
            Err(err) => {
                self.write(&status::failed(placed, &err)).await?;
                Err(err)
            }
        }
    }

    /// Writes the status if it differs from the stored one, and publishes an Event when the
    /// phase changes.
    pub(super) async fn write(&self, report: &Report) -> Result<()> {
        let Pass { tenant, facts, ctx } = self;
        let current = tenant.status.clone().unwrap_or_default();
        let status = report.status(
            &current,
            tenant.metadata.generation,
            Time(jiff::Timestamp::now()),
        );
        if status == current {
            return Ok(());
        }
        let api: Api<Tenant> = Api::namespaced(ctx.client.clone(), &facts.namespace);
        // `schemaVersion` and `SchemaReady` are the SchemaRollout reconciler's, `lastBackup` and
        // `BackedUp` the TenantBackup reconciler's (each its own field manager): left out of this
        // apply, so that a stale read here never sets them back.
        let status = TenantStatus {
            schema_version: None,
            last_backup: None,
            conditions: status
                .conditions
                .into_iter()
                .filter(|c| c.type_ != SCHEMA_READY && c.type_ != BACKED_UP)
                .collect(),
            ..status
        };
        let mut patch =
            json!({ "apiVersion": "silo.dev/v1alpha1", "kind": "Tenant", "status": status });
        if let Some(version) = &report.precondition {
            patch["metadata"] = json!({ "resourceVersion": version });
        }
        api.patch_status(
            &facts.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        if let Some(event) = report.phase_event(current.phase) {
            self.publish(event.type_, event.reason, event.note).await;
        }
        Ok(())
    }

    /// Publishes an Event; a failure to publish is logged, never fatal.
    pub(super) async fn publish(&self, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        let reference = self.tenant.object_ref(&());
        if let Err(e) = self.ctx.recorder.publish(&event, &reference).await {
            warn!(tenant = %self.facts.key, error = %e, "publishing event failed");
        }
    }
}

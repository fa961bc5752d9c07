//! Backups (work in progress): the fleet's backup settings and the backup Job. The TenantBackup
//! and TenantRestore reconcilers come with the `silo` job runner they start.

pub mod job;
pub mod settings;

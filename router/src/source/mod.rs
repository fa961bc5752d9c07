//! Where tenants come from. This slice has the static YAML file; the Kubernetes watch comes next.

pub mod file;

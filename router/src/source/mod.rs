//! Where tenants come from: Kubernetes, or a static YAML file.

pub mod file;
pub mod kube;

//! Silo's end-to-end harness: a real control plane (started by `e2e/scripts/cluster.sh`, or any
//! cluster given by `KUBECONFIG`), real PostgreSQL servers started here with `initdb`/`pg_ctl`,
//! and the controller as a local process. Each test gets its own namespace, servers and controller.
//! With a node (`e2e/scripts/node.sh`), Jobs and the Helm chart's pods run for real.

pub mod controller;
pub mod kube_env;
pub mod node;
pub mod postgres;
pub mod router;
pub mod wait;

pub use controller::ControllerProcess;
pub use kube_env::{Env, TestNs};
pub use postgres::PgServer;
pub use router::RouterProcess;
pub use wait::wait_for;

//! The SchemaRollout reconciler (work in progress): one migration Job per tenant, canary first,
//! then waves under the caps, halting on failures. The rules are in [`plan`], pure and
//! table-tested; the reconcile that acts on them comes next.

pub mod job;
pub mod onboarding;
pub mod outcome;
pub mod plan;

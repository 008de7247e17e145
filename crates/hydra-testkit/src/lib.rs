//! Test and benchmark infrastructure shared by hydra's integration tests (as a dev-dependency)
//! and `hydra-bench`; never linked into the node. It does not depend on the `hydra` library, so
//! the node's own tests and the benchmarks link one copy of it.

pub mod pgcluster;

pub use pgcluster::{create_database, free_port_base, PgCluster};

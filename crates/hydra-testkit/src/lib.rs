//! Test and benchmark infrastructure shared by hydra's integration tests (as a dev-dependency)
//! and `hydra-bench`; never linked into the node: throwaway PostgreSQL clusters and clients on
//! distinct loopback source addresses, the pinned js packages. It does not depend on the `hydra` library, so
//! the node's own tests and the benchmarks link one copy of it.

pub mod js;
pub mod net;
pub mod pgcluster;

pub use js::{ensure_js_deps, js_dir};
pub use net::{bound_swarm, BoundTcp};
pub use pgcluster::{create_database, create_database_from, free_port_base, PgCluster};

//! hydra: a node for the IPFS Amino DHT that runs many DHT server heads in one process, all
//! sharing one provider manager over a datastore. See `ARCHITECTURE.md` for the request flow and
//! the module map.
//!
//! Modules, from the leaves up; each uses only modules listed before it (`tests/layout.rs`
//! checks it):
//! - [`types`], [`sharded`], [`identity`]: domain types, sharded maps, identity derivation and
//!   the lease plan — pure, depending on nothing else here;
//! - [`config`]: the file type, its defaults and validation; [`keys`]: CIDs, multihashes and
//!   peer IDs as people and HTTP clients write them;
//! - [`metrics`]: every metric, registered by handle;
//! - [`load`]: tiers, what each tier does, the statement budget, per-peer limits, reloads;
//! - [`store`]: SQLite and PostgreSQL behind one timed handle, identity leases; [`profiles`]:
//!   heap and CPU profiles, automatic heap profiles when memory runs high;
//! - [`providers`]: the provider manager (write buffer, cached and batched reads, GC);
//! - [`net`]: heads, inbound streams, request handling, wire format, routing snapshots;
//! - [`http`]: metrics endpoint, health and the operator API;
//! - [`node`]: start-up and shutdown order, the only module that knows every other.
//!
//! Benchmarks live in `crates/hydra-bench` and test infrastructure in `crates/hydra-testkit`;
//! neither is part of this library or the `hydra` binary.

pub mod config;
pub mod http;
pub mod identity;
pub mod keys;
pub mod load;
pub mod metrics;
pub mod net;
pub mod node;
pub mod profiles;
pub mod providers;
pub mod sharded;
pub mod sim;
pub mod store;
pub mod types;

pub use config::{Config, ConfigFile};
pub use node::Node;

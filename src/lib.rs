//! hydra: a node for the IPFS Amino DHT that runs many DHT server heads in one process, all
//! sharing one provider manager over a datastore. See `ARCHITECTURE.md` for the request flow and
//! the module map.

pub mod bench;
pub mod config;
pub mod head;
pub mod http;
pub mod identity;
pub mod kad_server;
pub mod load;
pub mod loadgen;
pub mod metrics;
pub mod node;
pub mod pgcluster;
pub mod providers;
pub mod records;
pub mod routing;
pub mod server;
pub mod sharded;
pub mod store;
pub mod types;
pub mod wire;

pub use config::{Config, ConfigFile};
pub use node::Node;

//! The network side: heads (one libp2p swarm each), the inbound `/ipfs/kad/1.0.0` intake, the
//! stream tasks that serve requests, the wire format and the routing snapshots.
//!
//! Request path, in module order: [`door`] (a head's TCP listeners closed while no new connection
//! is admitted: the kernel refuses dials) → [`admit`] (the muxer resets new inbound streams the
//! admission gate refuses, before negotiation) → [`head`] (a swarm task: listeners, identify → the
//! process-wide [`table`]; [`outbound`] streams for the process's [`discovery`] lookups) → [`intake`] (our `NetworkBehaviour`: negotiated inbound streams into one bounded
//! queue) → [`streams`] (dispatcher and per-stream loop with deadlines) → [`requests`] (one
//! request, by the load tier's policy) → [`routing`] (closer peers from the table's snapshot) or the
//! provider manager. [`wire`] is the only module that sees protobuf structs; [`addrs`] decides
//! which addresses may enter a routing table or a reply.
//!
//! Must not: await the datastore inside a swarm task, let a stream task touch a swarm, or make
//! FIND_NODE and PING depend on the provider manager. Datastore work goes through
//! [`crate::providers::ProviderManager`] only; admission asks [`crate::load`].

pub mod addrs;
pub mod admit;
pub mod discovery;
pub mod door;
pub mod head;
pub mod intake;
pub mod open_streams;
pub mod outbound;
pub mod requests;
pub mod routing;
pub mod streams;
pub mod table;
pub mod wire;

pub use head::HeadShared;
pub use intake::KAD_PROTOCOL;

//! Multi-node plumbing of ferrovol: mutual TLS and role certificates (`tls`, `certs`), the
//! node agents' gRPC service (`server`) and the controller's client for it (`remote`), the
//! controller's registry of live node agents (`registry`) and the agents' side of
//! registration (`heartbeat`), with the conversions between core types and the agent API's
//! messages (`wire`).

pub mod certs;
pub mod heartbeat;
pub mod registry;
pub mod remote;
pub mod server;
pub mod tls;
pub mod wire;

//! Types generated from `proto/*.proto` (protobuf package `cryo`).
#![allow(clippy::all, clippy::pedantic, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/cryo.rs"));

/// CRIU's RPC messages (`proto/rpc.proto`, package `cryo.rpc`), for `cryo
/// swrk`.
pub mod rpc {
    include!(concat!(env!("OUT_DIR"), "/cryo.rpc.rs"));
}

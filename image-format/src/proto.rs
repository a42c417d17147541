//! Types generated from `proto/*.proto` (protobuf package `cryo`).
#![allow(clippy::all, clippy::pedantic, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/cryo.rs"));

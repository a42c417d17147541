//! Descriptor kinds whose dump and restore need more than a path: one
//! module per kind, dump and restore side by side.

pub mod inotify;
pub mod pty;
pub mod unix;

//! cryo image format: framing of image files, the inventory and the page
//! store. No unsafe code.
#![forbid(unsafe_code)]

pub mod descriptor;
pub mod error;
pub mod framing;
pub mod inventory;
pub mod json;
pub mod pages;
pub mod proto;

pub use error::*;
pub use framing::*;
pub use inventory::*;
pub use pages::*;

/// Size of a page, the unit of the page store.
pub const PAGE_SIZE: usize = 4096;

#[cfg(test)]
mod tests;

//! cryo image format: framing of image files, the inventory and the page
//! store. No unsafe code.
#![forbid(unsafe_code)]

pub mod criu;
pub mod descriptor;
pub mod error;
pub mod framing;
pub mod inventory;
pub mod json;
pub mod pages;
pub mod proto;
pub mod stride;

pub use error::*;
pub use framing::*;
pub use inventory::*;
pub use pages::*;

/// Size of a page, the unit of the page store.
pub const PAGE_SIZE: usize = 4096;

/// `PagemapEntry.flags`: the run's pages are not in this process's pages
/// file; they were still shared copy-on-write with the parent process at
/// the dump, and are the parent's pages at the same addresses (which may
/// in turn be its parent's).
pub const PAGE_IN_PARENT: u32 = 1;

/// `PagemapEntry.flags`: the run's pages are not in this image; they are
/// at the same addresses of the same process in the parent image (the
/// directory the image's `parent` link names), or in its parent's: not
/// written since that image was made (an incremental dump).
pub const PAGE_IN_PARENT_IMAGE: u32 = 2;

/// Whether a run with `flags` holds pages stored elsewhere than this
/// process's pages file (its parent process's, or the parent image's).
pub fn stored_elsewhere(flags: u32) -> bool {
    flags & (PAGE_IN_PARENT | PAGE_IN_PARENT_IMAGE) != 0
}

/// The link in an image directory that names its parent image.
pub const PARENT_LINK: &str = "parent";

#[cfg(test)]
mod tests;

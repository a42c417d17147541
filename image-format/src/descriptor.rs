//! The compiled descriptors of `proto/*.proto` (a `FileDescriptorSet`,
//! produced by protox in build.rs from the same files as the generated
//! types), and which message each record of each kind of file holds.

use prost_reflect::{DescriptorError, DescriptorPool, MessageDescriptor};

use crate::framing::Kind;

/// The encoded `google.protobuf.FileDescriptorSet` of every cryo .proto file.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/cryo_descriptor.bin"));

/// Protobuf package of every cryo message.
pub const PACKAGE: &str = "cryo";

/// A descriptor pool holding every cryo message.
pub fn pool() -> Result<DescriptorPool, DescriptorError> {
    DescriptorPool::decode(FILE_DESCRIPTOR_SET)
}

/// Full name (`cryo.Message`) of the message that record `record` (counting
/// from 0) of a file of `kind` holds; `None` when such a file has no such
/// record (pages files hold no records; inventory.img holds two).
pub fn record_message(kind: Kind, record: usize) -> Option<&'static str> {
    Some(match kind {
        Kind::Inventory => match record {
            0 => "cryo.Inventory",
            1 => "cryo.InventorySeal",
            _ => return None,
        },
        Kind::Pstree => "cryo.PstreeEntry",
        Kind::Core => "cryo.CoreEntry",
        Kind::Mm => "cryo.MmEntry",
        Kind::Pagemap => match record {
            0 => "cryo.PagemapHead",
            _ => "cryo.PagemapRecord",
        },
        Kind::Fdinfo => "cryo.FdEntry",
        Kind::Files => "cryo.FileEntry",
        Kind::Namespaces => "cryo.NamespaceEntry",
        Kind::Cgroups => "cryo.CgroupDir",
        Kind::Tmpfs => "cryo.TmpfsRecord",
        Kind::Pages => return None,
    })
}

/// The descriptor of `name` in `pool`.
pub fn message(pool: &DescriptorPool, name: &str) -> Option<MessageDescriptor> {
    pool.get_message_by_name(name)
}

//! proto3 canonical JSON views of image files, through prost-reflect's
//! dynamic messages built from the compiled descriptors
//! ([`crate::descriptor`]).
//!
//! A file is shown as `{"kind": "<kind>", "records": [<message>, ...]}`;
//! each record is its message in canonical proto3 JSON (field names as in
//! the .proto, 64-bit integers as strings, bytes as base64, enums by name,
//! fields at their default value left out). [`Codec::json_to_file`] turns
//! such a document back into the file's bytes: header, then
//! `[u32 LE length][protobuf]` records, as [`crate::ImageWriter`] writes them.

use std::io::Read;
use std::path::{Path, PathBuf};

use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};
pub use serde_json;
use serde_json::Value;

use crate::descriptor;
use crate::error::{ImageError, Magic};
use crate::framing::{open_file, read_full, ImageReader, Kind, FORMAT_MAGIC, MAX_RECORD_LEN};

#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("cannot load the compiled protobuf descriptors: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
    #[error("message {name} is missing from the compiled protobuf descriptors")]
    UnknownMessage { name: &'static str },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{file}: {kind} files hold no protobuf records")]
    NoRecords { file: PathBuf, kind: Kind },
    #[error("{file}: record {record}: a {kind} file holds no such record")]
    UnexpectedRecord {
        file: PathBuf,
        kind: Kind,
        record: usize,
    },
    #[error("{file}: record {record}: cannot decode {message}: {source}")]
    Decode {
        file: PathBuf,
        record: usize,
        message: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{file}: record {record}: cannot show {message} as JSON: {source}")]
    ToJson {
        file: PathBuf,
        record: usize,
        message: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{file}: record {record}: not a valid {message} in proto3 JSON: {source}")]
    FromJson {
        file: PathBuf,
        record: usize,
        message: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{file}: not an image JSON document: {what}")]
    BadDocument { file: PathBuf, what: &'static str },
    #[error("{file}: unknown kind {kind:?} (expected inventory, pstree, core, mm, pagemap, fdinfo or files)")]
    UnknownKind { file: PathBuf, kind: String },
    #[error("{file}: unknown kind magic {found}")]
    UnknownKindMagic { file: PathBuf, found: Magic },
    #[error("{file}: not valid JSON: {source}")]
    Parse {
        file: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{file}: record {record}: encoded length {len} exceeds the limit of {max} bytes")]
    RecordTooLarge {
        file: PathBuf,
        record: usize,
        len: u64,
        max: u64,
    },
}

/// Reads the 8-byte header of an image file and returns its kind.
pub fn read_kind(path: &Path) -> Result<Kind, JsonError> {
    let mut file = open_file(path)?;
    let mut header = [0u8; 8];
    let n = read_full(&mut file, &mut header).map_err(|source| ImageError::Io {
        path: path.to_path_buf(),
        op: "read",
        source,
    })?;
    if n == 0 {
        return Err(ImageError::EmptyFile {
            path: path.to_path_buf(),
        }
        .into());
    }
    if n < header.len() {
        return Err(ImageError::TruncatedHeader {
            path: path.to_path_buf(),
            expected: header.len() as u64,
            found: n as u64,
        }
        .into());
    }
    let fmt_magic = [header[0], header[1], header[2], header[3]];
    if fmt_magic != FORMAT_MAGIC {
        return Err(ImageError::NotCryoImage {
            path: path.to_path_buf(),
            found: Magic(fmt_magic),
        }
        .into());
    }
    let kind_magic = [header[4], header[5], header[6], header[7]];
    Kind::from_magic(kind_magic).ok_or_else(|| JsonError::UnknownKindMagic {
        file: path.to_path_buf(),
        found: Magic(kind_magic),
    })
}

/// Converts records between protobuf and proto3 JSON.
pub struct Codec {
    pool: DescriptorPool,
    ser: SerializeOptions,
    de: DeserializeOptions,
}

impl Codec {
    pub fn new() -> Result<Codec, JsonError> {
        Ok(Codec {
            pool: descriptor::pool()?,
            ser: SerializeOptions::new().use_proto_field_name(true),
            de: DeserializeOptions::new(),
        })
    }

    fn descriptor(
        &self,
        file: &Path,
        kind: Kind,
        record: usize,
    ) -> Result<(prost_reflect::MessageDescriptor, &'static str), JsonError> {
        if kind == Kind::Pages {
            return Err(JsonError::NoRecords {
                file: file.to_path_buf(),
                kind,
            });
        }
        let name = descriptor::record_message(kind, record).ok_or_else(|| {
            JsonError::UnexpectedRecord {
                file: file.to_path_buf(),
                kind,
                record,
            }
        })?;
        let desc =
            descriptor::message(&self.pool, name).ok_or(JsonError::UnknownMessage { name })?;
        let short = name.rsplit('.').next().unwrap_or(name);
        Ok((desc, short))
    }

    /// Record `record` of a `kind` file (its protobuf body) as JSON.
    pub fn record_to_json(
        &self,
        file: &Path,
        kind: Kind,
        record: usize,
        body: &[u8],
    ) -> Result<Value, JsonError> {
        let (desc, message) = self.descriptor(file, kind, record)?;
        let msg = DynamicMessage::decode(desc, body).map_err(|source| JsonError::Decode {
            file: file.to_path_buf(),
            record,
            message,
            source,
        })?;
        msg.serialize_with_options(serde_json::value::Serializer, &self.ser)
            .map_err(|source| JsonError::ToJson {
                file: file.to_path_buf(),
                record,
                message,
                source,
            })
    }

    /// Record `record` of a `kind` file from JSON to its protobuf body.
    pub fn record_from_json(
        &self,
        file: &Path,
        kind: Kind,
        record: usize,
        value: &Value,
    ) -> Result<Vec<u8>, JsonError> {
        let (desc, message) = self.descriptor(file, kind, record)?;
        let msg =
            DynamicMessage::deserialize_with_options(desc, value, &self.de).map_err(|source| {
                JsonError::FromJson {
                    file: file.to_path_buf(),
                    record,
                    message,
                    source,
                }
            })?;
        Ok(msg.encode_to_vec())
    }

    /// A whole image file (not a pages file) as
    /// `{"kind": "...", "records": [...]}`.
    pub fn file_to_json(&self, path: &Path) -> Result<Value, JsonError> {
        let kind = read_kind(path)?;
        if kind == Kind::Pages {
            return Err(JsonError::NoRecords {
                file: path.to_path_buf(),
                kind,
            });
        }
        let dir = path.parent().unwrap_or(Path::new(""));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut reader = ImageReader::open(dir, &name, kind)?;
        let mut records = Vec::new();
        loop {
            let record = reader.record_index();
            match reader.next_raw()? {
                None => break,
                Some(body) => records.push(self.record_to_json(path, kind, record, &body)?),
            }
        }
        Ok(serde_json::json!({ "kind": kind.name(), "records": records }))
    }

    /// The bytes of the image file that `doc` (as made by
    /// [`Codec::file_to_json`]) describes. `source` names the document in errors.
    pub fn json_to_file(&self, source: &Path, doc: &Value) -> Result<Vec<u8>, JsonError> {
        let bad = |what| JsonError::BadDocument {
            file: source.to_path_buf(),
            what,
        };
        let obj = doc.as_object().ok_or_else(|| bad("not a JSON object"))?;
        if obj.keys().any(|k| k != "kind" && k != "records") {
            return Err(bad(
                "unexpected key (only \"kind\" and \"records\" are allowed)",
            ));
        }
        let kind_name = obj
            .get("kind")
            .ok_or_else(|| bad("no \"kind\""))?
            .as_str()
            .ok_or_else(|| bad("\"kind\" is not a string"))?;
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.name() == kind_name && *k != Kind::Pages)
            .ok_or_else(|| JsonError::UnknownKind {
                file: source.to_path_buf(),
                kind: kind_name.to_string(),
            })?;
        let records = obj
            .get("records")
            .ok_or_else(|| bad("no \"records\""))?
            .as_array()
            .ok_or_else(|| bad("\"records\" is not an array"))?;
        let mut out = Vec::with_capacity(4096);
        out.extend_from_slice(&FORMAT_MAGIC);
        out.extend_from_slice(&kind.magic());
        for (i, value) in records.iter().enumerate() {
            let body = self.record_from_json(source, kind, i, value)?;
            let len = u32::try_from(body.len())
                .ok()
                .filter(|&l| l <= MAX_RECORD_LEN)
                .ok_or(JsonError::RecordTooLarge {
                    file: source.to_path_buf(),
                    record: i,
                    len: body.len() as u64,
                    max: u64::from(MAX_RECORD_LEN),
                })?;
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&body);
        }
        Ok(out)
    }

    /// Reads a JSON document from `input` and returns the file's bytes.
    pub fn read_json_to_file(
        &self,
        source: &Path,
        input: &mut impl Read,
    ) -> Result<Vec<u8>, JsonError> {
        let doc: Value = serde_json::from_reader(input).map_err(|source_err| JsonError::Parse {
            file: source.to_path_buf(),
            source: source_err,
        })?;
        self.json_to_file(source, &doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;

    #[test]
    fn every_record_message_is_in_the_descriptors() {
        let codec = Codec::new().expect("descriptors");
        for kind in Kind::ALL {
            for record in 0..3 {
                if let Some(name) = descriptor::record_message(kind, record) {
                    assert!(
                        descriptor::message(&codec.pool, name).is_some(),
                        "{name} missing"
                    );
                }
            }
        }
    }

    #[test]
    fn record_round_trips_through_json() {
        let codec = Codec::new().expect("descriptors");
        let file = Path::new("test.img");
        let entry = proto::PstreeEntry {
            pid: 42,
            ppid: 1,
            pgid: 42,
            sid: 0,
            threads: vec![42, 43],
            cmdline: vec!["a".into(), "b c".into()],
            ..Default::default()
        };
        let body = entry.encode_to_vec();
        let json = codec
            .record_to_json(file, Kind::Pstree, 0, &body)
            .expect("to json");
        // proto field names; default (zero) fields left out.
        assert_eq!(json["pid"], 42);
        assert_eq!(json["threads"], serde_json::json!([42, 43]));
        assert!(json.get("sid").is_none());
        let back = codec
            .record_from_json(file, Kind::Pstree, 0, &json)
            .expect("from json");
        assert_eq!(back, body);

        // 64-bit integers are strings, bytes base64.
        let seal = proto::InventorySeal { xxh3: u64::MAX };
        let json = codec
            .record_to_json(file, Kind::Inventory, 1, &seal.encode_to_vec())
            .expect("to json");
        assert_eq!(json["xxh3"], u64::MAX.to_string());
        let sig = proto::PendingSignal {
            siginfo: vec![1, 2, 3],
        };
        let core = proto::CoreEntry {
            tid: 7,
            pending: vec![sig],
            ..Default::default()
        };
        let body = core.encode_to_vec();
        let json = codec
            .record_to_json(file, Kind::Core, 0, &body)
            .expect("to json");
        assert_eq!(json["pending"][0]["siginfo"], "AQID");
        assert_eq!(
            codec
                .record_from_json(file, Kind::Core, 0, &json)
                .expect("from json"),
            body
        );
    }

    /// Explicitly present fields at their default value (pty 0 as the
    /// controlling terminal, a pty state of index 0 with empty settings)
    /// survive the JSON view: encoding gives back the same bytes.
    #[test]
    fn present_defaults_round_trip_through_json() {
        let codec = Codec::new().expect("descriptors");
        let file = Path::new("test.img");
        let entry = proto::PstreeEntry {
            pid: 42,
            pty_ctty: Some(0),
            ..Default::default()
        };
        let body = entry.encode_to_vec();
        let json = codec
            .record_to_json(file, Kind::Pstree, 0, &body)
            .expect("to json");
        assert_eq!(json["pty_ctty"], 0, "{json}");
        let back = codec
            .record_from_json(file, Kind::Pstree, 0, &json)
            .expect("from json");
        assert_eq!(back, body);
        assert_eq!(
            proto::PstreeEntry::decode(back.as_slice()).expect("decode"),
            entry
        );
        let f = proto::FileEntry {
            id: 3,
            kind: proto::FileKind::FilePtySlave as i32,
            pty: Some(proto::PtyState {
                index: 0,
                termios: Some(proto::Termios::default()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let body = f.encode_to_vec();
        let json = codec
            .record_to_json(file, Kind::Files, 0, &body)
            .expect("to json");
        assert_eq!(json["kind"], "FILE_PTY_SLAVE", "{json}");
        let back = codec
            .record_from_json(file, Kind::Files, 0, &json)
            .expect("from json");
        assert_eq!(back, body);
    }

    #[test]
    fn documents_are_checked() {
        let codec = Codec::new().expect("descriptors");
        let src = Path::new("<test>");
        let bad = [
            serde_json::json!([]),
            serde_json::json!({"kind": "pages", "records": []}),
            serde_json::json!({"kind": "nope", "records": []}),
            serde_json::json!({"kind": "core"}),
            serde_json::json!({"kind": "core", "records": [{"bogus": 1}]}),
            serde_json::json!({"kind": "inventory", "records": [{}, {}, {}]}),
            serde_json::json!({"kind": "core", "records": [], "extra": 1}),
        ];
        for doc in bad {
            assert!(codec.json_to_file(src, &doc).is_err(), "{doc} accepted");
        }
        let bytes = codec
            .json_to_file(src, &serde_json::json!({"kind": "files", "records": [{}]}))
            .expect("empty FileEntry");
        assert_eq!(bytes, b"CRYOFILE\0\0\0\0");
    }
}

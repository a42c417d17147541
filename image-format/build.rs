//! Compiles `proto/*.proto` with protox (pure Rust, no system protoc) and
//! generates Rust types with prost-build into OUT_DIR; also writes the
//! compiled FileDescriptorSet there (`cryo_descriptor.bin`).

use std::path::PathBuf;

fn main() {
    let proto_dir = PathBuf::from("proto");
    println!("cargo:rerun-if-changed={}", proto_dir.display());

    let mut files: Vec<PathBuf> = std::fs::read_dir(&proto_dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", proto_dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    files.sort();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    let fds = protox::compile(&files, [&proto_dir])
        .unwrap_or_else(|e| panic!("protox failed to compile the .proto files: {e:?}"));
    // The descriptor set itself, for `cryo_image::descriptor` (JSON views of
    // records through prost-reflect).
    let out_dir = PathBuf::from(
        std::env::var_os("OUT_DIR").unwrap_or_else(|| panic!("OUT_DIR is not set by cargo")),
    );
    let fds_path = out_dir.join("cryo_descriptor.bin");
    std::fs::write(&fds_path, prost::Message::encode_to_vec(&fds))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", fds_path.display()));

    prost_build::Config::new()
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("prost-build failed: {e}"));
}

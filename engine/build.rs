//! Builds the no_std blobs (parasite and restorer) from parasite/blob with
//! a nested cargo invocation of its own workspace, so its release profile
//! (panic=abort, lto, opt-level=s) and link flags apply, and hands the ELF
//! files to the engine through OUT_DIR.
use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let blob_dir = manifest.join("../parasite/blob");
    let target_dir = out.join("blob-target");
    for p in [
        "../parasite/blob/src",
        "../parasite/blob/Cargo.toml",
        "../parasite/src",
        "../parasite/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={p}");
    }
    let flags = [
        "-C",
        "relocation-model=pie",
        "-C",
        "target-feature=+crt-static",
        "-C",
        "link-arg=-nostartfiles",
        "-C",
        "link-arg=-nostdlib",
        "-C",
        "link-arg=-Wl,-e,_cryo_start",
        "-C",
        "link-arg=-Wl,--build-id=none",
        "-C",
        "link-arg=-Wl,-z,norelro",
        "-C",
        "link-arg=-Wl,-z,noexecstack",
        "-C",
        "link-arg=-Wl,--no-eh-frame-hdr",
    ]
    .join("\x1f");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&blob_dir);
    // The outer build's settings must not leak into the blob build.
    for (k, _) in env::vars() {
        if k.starts_with("CARGO_CFG_")
            || k.starts_with("CARGO_FEATURE_")
            || k.starts_with("CARGO_PROFILE_")
            || k.starts_with("CARGO_BUILD_")
            || k.starts_with("CARGO_ENCODED_")
            || matches!(
                k.as_str(),
                "RUSTFLAGS"
                    | "CARGO_TARGET_DIR"
                    | "RUSTC_WRAPPER"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "CARGO_MAKEFLAGS"
                    | "TARGET"
                    | "HOST"
                    | "PROFILE"
                    | "OPT_LEVEL"
                    | "DEBUG"
            )
        {
            cmd.env_remove(&k);
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", flags);
    let status = cmd
        .status()
        .expect("failed to run cargo for the parasite blobs");
    if !status.success() {
        panic!(
            "building the parasite blobs in {} failed",
            blob_dir.display()
        );
    }
    for name in ["parasite", "restorer"] {
        let src = target_dir.join("release").join(name);
        std::fs::copy(&src, out.join(format!("{name}.elf"))).expect("copy blob");
    }
}

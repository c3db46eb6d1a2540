//! scripts/build-once.sh, the helper that makes every profile share one RocksDB compile, run by
//! bash against a made-up checkout: a Cargo.lock, a Cargo.toml and target directories holding
//! what librocksdb-sys's build script leaves behind.

use std::path::{Path, PathBuf};
use std::process::Command;

const VERSION: &str = "0.17.3+10.4.2";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-once.sh")
}

fn checkout(rocksdb_line: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let lock = format!("[[package]]\nname = \"lz4-sys\"\nversion = \"1.11.1\"\n\n[[package]]\nname = \"librocksdb-sys\"\nversion = \"{VERSION}\"\n");
    std::fs::write(dir.path().join("Cargo.lock"), lock).unwrap();
    std::fs::write(dir.path().join("Cargo.toml"), format!("[workspace.dependencies]\n{rocksdb_line}\n")).unwrap();
    dir
}

/// What librocksdb-sys's build script leaves in `target/PROFILE/build/librocksdb-sys-HASH/`.
fn compiled(root: &Path, profile: &str, hash: &str, version: &str, contents: &str) {
    let run = root.join("target").join(profile).join("build").join(format!("librocksdb-sys-{hash}"));
    std::fs::create_dir_all(run.join("out")).unwrap();
    std::fs::write(run.join("out/librocksdb.a"), contents).unwrap();
    let output =
        format!("cargo:rustc-link-lib=static=rocksdb\ncargo:cargo_manifest_dir=/registry/librocksdb-sys-{version}\n");
    std::fs::write(run.join("output"), output).unwrap();
}

/// Runs `commands` after sourcing the helper in `root`; returns what they print.
fn run(root: &Path, commands: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail; source '{}'; {commands}", script().display()))
        .current_dir(root)
        .env_remove("ROCKSDB_LIB_DIR")
        .env_remove("ROCKSDB_STATIC")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("SLUICE_ROCKSDB_ONCE")
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

const SHOW_ENV: &str = r#"echo "${ROCKSDB_LIB_DIR:-none} ${ROCKSDB_STATIC:-none}""#;

#[test]
fn the_first_profile_keeps_its_rocksdb_and_only_the_others_link_it() {
    let repo = checkout(r#"rocksdb = { version = "0.24", features = ["lz4"] }"#);
    let root = repo.path();
    compiled(root, "ci", "a1", VERSION, "ci's archive");
    // Compiled later (newer) from another version's sources: not the one this checkout uses.
    std::thread::sleep(std::time::Duration::from_millis(20));
    compiled(root, "ci", "b2", "0.16.0+8.10.0", "an older version's archive");

    let kept = run(root, "rocksdb_once_keep ci; rocksdb_once_dir");
    let kept = PathBuf::from(kept.trim());
    assert!(kept.starts_with(root.join("target/rocksdb")), "{}", kept.display());
    assert_eq!(std::fs::read_to_string(kept.join("librocksdb.a")).unwrap(), "ci's archive");
    assert_eq!(std::fs::read_to_string(kept.join("origin")).unwrap().trim(), "ci");

    // Another profile links it; the origin goes on with its own, so plain cargo there never
    // sees the switch flip and recompile.
    let release = run(root, &format!("rocksdb_once_link release; {SHOW_ENV}"));
    assert_eq!(release.trim(), format!("{} 1", kept.display()));
    assert_eq!(run(root, &format!("rocksdb_once_link ci; {SHOW_ENV}")).trim(), "none none");

    // Keeping again changes nothing, even after the origin compiles anew.
    compiled(root, "ci", "a1", VERSION, "ci's second archive");
    run(root, "rocksdb_once_keep ci");
    assert_eq!(std::fs::read_to_string(kept.join("librocksdb.a")).unwrap(), "ci's archive");

    // Turned off, or with a library the caller chose, the helper stays out of the way.
    let off = run(root, &format!("SLUICE_ROCKSDB_ONCE=0; rocksdb_once_link release; {SHOW_ENV}"));
    assert_eq!(off.trim(), "none none");
    let chosen = run(root, &format!("export ROCKSDB_LIB_DIR=/opt/rocksdb; rocksdb_once_link release; {SHOW_ENV}"));
    assert_eq!(chosen.trim(), "/opt/rocksdb none");
}

#[test]
fn nothing_is_linked_before_a_compile_or_after_the_features_change() {
    let repo = checkout(r#"rocksdb = { version = "0.24", features = ["lz4"] }"#);
    let root = repo.path();
    assert_eq!(run(root, &format!("rocksdb_once_link release; {SHOW_ENV}")).trim(), "none none");
    // Only another version was compiled: nothing to keep.
    compiled(root, "release", "c3", "0.16.0+8.10.0", "an older version's archive");
    run(root, "rocksdb_once_keep release");
    assert!(!root.join("target/rocksdb").exists());

    compiled(root, "release", "d4", VERSION, "release's archive");
    run(root, "rocksdb_once_keep release");
    let linked = run(root, &format!("rocksdb_once_link ci; {SHOW_ENV}"));
    let kept = root.join("target/rocksdb").join(format!("librocksdb-sys-{VERSION}-"));
    assert!(linked.starts_with(kept.to_str().unwrap()) && linked.trim().ends_with(" 1"), "{linked}");

    // Other features need another compile: the kept archive no longer applies.
    std::fs::write(root.join("Cargo.toml"), "rocksdb = { version = \"0.24\", features = [\"lz4\", \"zstd\"] }\n")
        .unwrap();
    assert_eq!(run(root, &format!("rocksdb_once_link ci; {SHOW_ENV}")).trim(), "none none");
}

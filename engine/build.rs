//! Links libstdc++ when RocksDB comes prebuilt.
//!
//! librocksdb-sys links libstdc++ only when it compiles RocksDB itself. With `ROCKSDB_LIB_DIR`
//! and `ROCKSDB_STATIC` (scripts/build-once.sh: one RocksDB compile shared by every cargo
//! profile) it links the static archive alone, and the C++ runtime is left unresolved. Declared
//! here, by a crate that depends on it, the library lands after librocksdb-sys's archive on the
//! linker's command line, where `--as-needed` keeps it.

fn main() {
    println!("cargo:rerun-if-env-changed=ROCKSDB_LIB_DIR");
    println!("cargo:rerun-if-env-changed=ROCKSDB_STATIC");
    let prebuilt_static = std::env::var_os("ROCKSDB_LIB_DIR").is_some() && std::env::var_os("ROCKSDB_STATIC").is_some();
    if prebuilt_static {
        println!("cargo:rustc-link-lib=dylib=stdc++");
    }
}

# Sourced by the scripts that build the broker (test.sh, bench.sh, dashboard-snapshot.sh,
# lite-bench.sh): `build_workspace PROFILE` builds so that nothing is compiled twice.
# engine-bench.sh uses only its RocksDB part (`rocksdb_once_link`/`_keep` around `cargo bench`).
#   - One package selection per profile. `ci` (the test command) builds the whole workspace with
#     every test target; other profiles build the whole workspace's libraries and binaries, as a plain
#     `cargo build --release` does. A `-p` selection resolves dependencies' features differently
#     and recompiles half the workspace.
#   - RocksDB's C++ (15 minutes on 2 cores) is compiled once per checkout. librocksdb-sys
#     compiles it into each profile's target directory, so the tests (`ci`) and the main job
#     (`release`) would compile it twice.
#
# How: the first profile to compile it (the "origin") keeps a copy of its librocksdb.a in
# target/rocksdb/<librocksdb-sys version>-<features>/. Every other profile links that copy through
# librocksdb-sys's own switches, ROCKSDB_LIB_DIR and ROCKSDB_STATIC; engine/build.rs then adds the
# libstdc++ that the compiled-in build would have linked. The origin never switches, so plain
# `cargo` in it keeps working without recompiling. The library is the same in every profile
# (librocksdb-sys always builds it with NDEBUG).
# SLUICE_ROCKSDB_ONCE=0 turns this off; a ROCKSDB_LIB_DIR set by the caller is left alone.

rocksdb_once_dir() {
  local root=${CARGO_TARGET_DIR:-$PWD/target} version features
  version=$(awk '/^name = "librocksdb-sys"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
  # The features come from the workspace's `rocksdb = …` line: a change there needs a new build.
  features=$(grep -E '^rocksdb *=' Cargo.toml | cksum | cut -d' ' -f1)
  [[ -n $version ]] || return 1
  echo "$root/rocksdb/librocksdb-sys-$version-$features"
}

# rocksdb_once_link PROFILE: before building PROFILE, link the kept library if this profile is
# not the one that compiled it.
rocksdb_once_link() {
  local profile=$1 dir
  [[ ${SLUICE_ROCKSDB_ONCE:-1} == 0 || -n ${ROCKSDB_LIB_DIR:-} ]] && return 0
  dir=$(rocksdb_once_dir) || return 0
  [[ -f $dir/librocksdb.a && -f $dir/origin ]] || return 0
  [[ $(cat "$dir/origin") == "$profile" ]] && return 0
  export ROCKSDB_LIB_DIR=$dir ROCKSDB_STATIC=1
  echo "rocksdb: the $profile build links the RocksDB compiled once by the $(cat "$dir/origin") build" \
    "($dir); to build this profile with plain cargo without recompiling it, export" \
    "ROCKSDB_LIB_DIR=$dir ROCKSDB_STATIC=1" >&2
}

# rocksdb_once_keep PROFILE: after building PROFILE, keep the library it compiled, if none is
# kept yet.
rocksdb_once_keep() {
  local profile=$1 root=${CARGO_TARGET_DIR:-$PWD/target} dir version built="" lib
  [[ ${SLUICE_ROCKSDB_ONCE:-1} == 0 || -n ${ROCKSDB_LIB_DIR:-} ]] && return 0
  dir=$(rocksdb_once_dir) || return 0
  [[ -f $dir/librocksdb.a ]] && return 0
  version=${dir##*/librocksdb-sys-}
  version=${version%-*}
  # The newest one this profile compiled from this version's sources (its build script's output
  # names them).
  for lib in "$root/$profile"/build/librocksdb-sys-*/out/librocksdb.a; do
    [[ -f $lib ]] || continue
    grep -F "cargo_manifest_dir=" "${lib%/out/librocksdb.a}/output" 2>/dev/null |
      grep -qF "librocksdb-sys-$version" || continue
    if [[ -z $built || $lib -nt $built ]]; then built=$lib; fi
  done
  [[ -n $built ]] || return 0
  mkdir -p "$dir"
  echo "$profile" > "$dir/origin"
  cp "$built" "$dir/librocksdb.a.part" && mv "$dir/librocksdb.a.part" "$dir/librocksdb.a"
  echo "rocksdb: kept the $profile build's RocksDB in $dir; other profiles link it instead of compiling it again" >&2
}

build_workspace() {
  local profile=$1
  rocksdb_once_link "$profile"
  if [[ $profile == ci ]]; then
    # What the tests run (libraries, binaries, every test target), not the criterion benches:
    # nothing in the test command runs them, and clippy (--all-targets) still checks them.
    # --timings: CI has a time budget; the report (target/cargo-timings/) shows where it goes.
    cargo build --profile ci --locked --workspace --lib --bins --tests --timings
  else
    cargo build --profile "$profile" --locked --workspace
  fi
  rocksdb_once_keep "$profile"
}

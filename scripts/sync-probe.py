#!/usr/bin/env python3
"""The cost of one durable 4 KiB append on a disk, in the layouts a log segment can have.

    python3 scripts/sync-probe.py DIR     # DIR on the disk to measure (not tmpfs: O_DIRECT)

Each layout writes 2,000 sequential 4 KiB blocks with O_DIRECT into a fresh 64 MiB file and
makes each durable before the next, then prints p50 and p99 per append. `fallocate` is what a
preallocated segment is (unwritten extents: the first write into each block changes file-system
metadata); `zero-filled` is a segment whose blocks were written before (what the broker's
`log_zero_ahead_bytes` does). Two rounds, interleaved.
"""
import mmap
import os
import sys
import time

APPENDS = 2000
FILE_BYTES = 64 << 20
BLOCK = 4096


def measure(name, path, flags, prepare, sync):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT | flags)
    try:
        prepare(fd)
        block = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
        block.write(b"x" * BLOCK)
        took = []
        for i in range(APPENDS):
            started = time.perf_counter_ns()
            os.pwrite(fd, block, i * BLOCK)
            if sync:
                os.fdatasync(fd)
            took.append((time.perf_counter_ns() - started) / 1000)
    finally:
        os.close(fd)
        os.unlink(path)
    took.sort()
    print(f"{name:28} p50 {took[APPENDS // 2]:7.0f} µs  p99 {took[APPENDS * 99 // 100]:7.0f} µs")


def preallocate(fd):
    os.posix_fallocate(fd, 0, FILE_BYTES)
    os.fdatasync(fd)


def zero_fill(fd):
    zeros = mmap.mmap(-1, 1 << 20)
    for offset in range(0, FILE_BYTES, 1 << 20):
        os.pwrite(fd, zeros, offset)
    os.fdatasync(fd)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    path = os.path.join(sys.argv[1], "sluice-sync-probe")
    for _ in range(2):
        measure("fallocate + fdatasync", path, 0, preallocate, True)
        measure("zero-filled + fdatasync", path, 0, zero_fill, True)
        measure("fallocate, O_DSYNC", path, os.O_DSYNC, preallocate, False)
        measure("zero-filled, O_DSYNC", path, os.O_DSYNC, zero_fill, False)


if __name__ == "__main__":
    main()

//! The raw-disk floor: a plain sequential O_DIRECT write through io_uring (the `io-uring` crate
//! directly, queue depth 1, 1 MiB blocks, like `dd oflag=direct bs=1M`) into preallocated files
//! of the engine's segment size, with one fdatasync at the end of each measured run.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

const BLOCK_BYTES: usize = 1 << 20;
const ALIGNMENT: usize = 4096;

pub struct RawFloor {
    dir: PathBuf,
    ring: IoUring,
    buffer: Vec<u8>,
    buffer_offset: usize,
    file: Option<File>,
    file_number: u64,
    file_pos: u64,
    file_size_bytes: u64,
}

impl RawFloor {
    pub fn new(dir: PathBuf, file_size_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let buffer = vec![0x5a; BLOCK_BYTES + ALIGNMENT];
        // O_DIRECT needs an aligned buffer; take the aligned window of an oversized Vec.
        let buffer_offset = buffer.as_ptr().align_offset(ALIGNMENT);
        Ok(RawFloor {
            dir,
            ring: IoUring::new(8)?,
            buffer,
            buffer_offset,
            file: None,
            file_number: 0,
            file_pos: 0,
            file_size_bytes,
        })
    }

    fn run(&mut self, entry: io_uring::squeue::Entry) -> io::Result<i32> {
        // SAFETY: every buffer an entry points at (`self.buffer`) outlives the operation, because
        // we wait for its completion right here before anything else touches the buffer.
        unsafe { self.ring.submission().push(&entry).map_err(io::Error::other)? };
        self.ring.submit_and_wait(1)?;
        let cqe = self.ring.completion().next().ok_or_else(|| io::Error::other("no completion"))?;
        if cqe.result() < 0 {
            return Err(io::Error::from_raw_os_error(-cqe.result()));
        }
        Ok(cqe.result())
    }

    fn next_file(&mut self) -> io::Result<()> {
        if self.file.take().is_some() {
            std::fs::remove_file(self.dir.join(format!("floor-{}.bin", self.file_number)))?;
            self.file_number += 1;
        }
        let path = self.dir.join(format!("floor-{}.bin", self.file_number));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        let fd = types::Fd(file.as_raw_fd());
        self.run(opcode::Fallocate::new(fd, self.file_size_bytes).build())?;
        self.file = Some(file);
        self.file_pos = 0;
        Ok(())
    }

    /// Writes `bytes` (rounded up to the alignment) sequentially, then fdatasyncs; returns the time.
    pub fn write(&mut self, bytes: u64) -> io::Result<Duration> {
        let started = Instant::now();
        let mut left = bytes.div_ceil(ALIGNMENT as u64) * ALIGNMENT as u64;
        while left > 0 {
            if self.file.is_none() || self.file_pos >= self.file_size_bytes {
                self.next_file()?;
            }
            let len = left.min(BLOCK_BYTES as u64).min(self.file_size_bytes - self.file_pos) as u32;
            let fd = types::Fd(self.file.as_ref().expect("file open").as_raw_fd());
            let ptr = self.buffer[self.buffer_offset..].as_ptr();
            let written = self.run(opcode::Write::new(fd, ptr, len).offset(self.file_pos).build())?;
            if written as u32 != len {
                return Err(io::Error::other(format!("short write {written} of {len}")));
            }
            self.file_pos += u64::from(len);
            left -= u64::from(len);
        }
        let fd = types::Fd(self.file.as_ref().expect("file open").as_raw_fd());
        self.run(opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build())?;
        Ok(started.elapsed())
    }
}

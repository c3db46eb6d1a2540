//! libibverbs through rdma-sys: the only `unsafe` code in the crate.
//!
//! Contract:
//! - Every verbs object has one owner whose `Drop` destroys it. `Endpoint` declares them in
//!   teardown order (queue pair, completion queue, completion channel, memory regions,
//!   protection domain, device context, then the memory), and `Endpoint::create` builds them
//!   as locals in the opposite order, so a connection is freed in the right order on every path,
//!   half-built ones included (there the memory goes right after its regions, before the PD).
//! - Registered memory is allocated and registered once per connection. It outlives its memory
//!   region and the queue pair (the endpoint drops it last); receive and ring memory is shared
//!   (`Arc`) with every frame lent from it, so it also outlives those frames.
//! - The device writes only into receive slots that are posted and into the ring; the CPU writes
//!   only into send slots and staging chunks that are not posted. A receive slot is lent to a
//!   frame only after its completion and posted again only after that frame's lease is dropped
//!   (`RecvSlots` asserts every transition). Ring bytes are lent to one frame; the peer may write
//!   them again only once the head passed them. The ring is remotely writable for the whole
//!   link, so a peer that breaks the protocol could rewrite bytes at any time: ring bytes are
//!   therefore never borrowed, only copied out through raw pointers (`DmaBuffer::copy_out`)
//!   and the private copy is what gets checked and read. Every offset and length the peer
//!   sends is checked, so it cannot make this side read or write outside registered memory.
//! - An `Endpoint` is used by one thread at a time: built by the connecting thread, then moved to
//!   its poller thread. libibverbs objects may be used from any thread.
#![deny(unsafe_op_in_unsafe_fn)]

use std::alloc::Layout;
use std::ffi::CStr;
use std::io;
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::ptr::{null_mut, NonNull};
use std::sync::Arc;

use bytes::Bytes;
use rdma_sys::*;

use super::doorbell::Doorbell;
use super::peer::{choose_gid_index, mtu_bytes, random_psn, GidEntry};
use super::pool::{RecvSlots, RecvState, SlotPool};
use super::wire::{decode_wr_id, wr_id, WrKind, CONTROL_BODY_BYTES};
use super::{LinkLayer, PortState, RdmaDevice, RdmaPort};
use crate::error::TransportError;
use crate::messages::RdmaPeerInfo;

const LINK_LAYER_INFINIBAND: u8 = 1;
const LINK_LAYER_ETHERNET: u8 = 2;
/// Registered buffers start on a page boundary.
const DMA_ALIGN_BYTES: usize = 4096;
/// Control messages in flight from this side (one request and one reply are outstanding at the
/// peer at most; their local completions may lag).
pub(crate) const CONTROL_SEND_SLOTS: u32 = 4;
const CONTROL_SLOT_BYTES: usize = 64;
/// Work completions taken per `ibv_poll_cq` call.
const WC_BATCH: usize = 32;
/// Completion events acknowledged in batches (ibv_ack_cq_events takes a mutex).
const CQ_EVENT_ACK_BATCH: u32 = 64;
/// Local ACK timeout 4.096 µs * 2^14 ≈ 67 ms, 6 retries: a peer whose queue pair is gone
/// surfaces as a RETRY_EXC_ERR completion within about half a second. Not 7: soft-RoCE (rxe)
/// treats a retry count of 7 as "retry forever", as the spec does only for RNR retries.
const QP_ACK_TIMEOUT_EXP: u8 = 14;
const QP_RETRY_COUNT: u8 = 6;
/// 7 would mean "retry forever"; credits mean receivers are always posted, so RNR is a bug.
const QP_RNR_RETRY: u8 = 6;
/// 0.64 ms.
const QP_MIN_RNR_TIMER: u8 = 12;
const GRH_HOP_LIMIT: u8 = 64;
/// GID table entries scanned for the local IP (indices are u8 in the address handle).
const GID_SCAN_MAX: i32 = 256;

fn rdma_err(op: &'static str, detail: impl Into<String>) -> TransportError {
    TransportError::Rdma { op, detail: detail.into() }
}

fn errno_err(op: &'static str) -> TransportError {
    rdma_err(op, io::Error::last_os_error().to_string())
}

/// A return code that is itself an errno (ibv_modify_qp, ibv_post_send, ...).
fn rc_err(op: &'static str, rc: i32) -> TransportError {
    rdma_err(op, io::Error::from_raw_os_error(rc.abs()).to_string())
}

// ---- devices ----------------------------------------------------------------------------------

struct DeviceList {
    list: *mut *mut ibv_device,
    count: usize,
}

impl DeviceList {
    /// The device list; empty where the kernel has no RDMA support at all.
    fn get() -> Result<DeviceList, TransportError> {
        let mut count: i32 = 0;
        // SAFETY: `count` is a valid out-pointer for the duration of the call.
        let list = unsafe { ibv_get_device_list(&mut count) };
        if list.is_null() {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                // No uverbs in the kernel, or no sysfs class: no devices, not a failure.
                Some(libc::ENOSYS) | Some(libc::ENODEV) | Some(libc::ENOENT) => {
                    Ok(DeviceList { list: null_mut(), count: 0 })
                }
                _ => Err(rdma_err("ibv_get_device_list", err.to_string())),
            };
        }
        Ok(DeviceList { list, count: count.max(0) as usize })
    }

    fn device(&self, index: usize) -> *mut ibv_device {
        assert!(index < self.count, "device index {index} of {}", self.count);
        // SAFETY: `list` holds `count` valid device pointers (then a NULL) until it is freed,
        // and `index < count`.
        unsafe { *self.list.add(index) }
    }

    fn name(&self, index: usize) -> String {
        // SAFETY: the device pointer is valid while the list lives; the name is a NUL-terminated
        // string owned by the device.
        let name = unsafe { ibv_get_device_name(self.device(index)) };
        if name.is_null() {
            return format!("device#{index}");
        }
        // SAFETY: non-null, NUL-terminated, valid while the list lives; copied out here.
        unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        if !self.list.is_null() {
            // SAFETY: `list` came from ibv_get_device_list and is freed once. Contexts opened
            // from it stay valid (libibverbs allows freeing the list after ibv_open_device).
            unsafe { ibv_free_device_list(self.list) };
        }
    }
}

/// An open device.
pub(crate) struct Context {
    ctx: NonNull<ibv_context>,
    name: String,
}

impl Context {
    fn open(list: &DeviceList, index: usize) -> Result<Context, TransportError> {
        // SAFETY: the device pointer comes from a live device list.
        let ctx = unsafe { ibv_open_device(list.device(index)) };
        let ctx = NonNull::new(ctx).ok_or_else(|| errno_err("ibv_open_device"))?;
        Ok(Context { ctx, name: list.name(index) })
    }

    fn query_device(&self) -> Result<ibv_device_attr, TransportError> {
        // SAFETY: ibv_device_attr is plain C data; all-zero is a valid value.
        let mut attr: ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open and `attr` is a valid out-pointer.
        let rc = unsafe { ibv_query_device(self.ctx.as_ptr(), &mut attr) };
        if rc != 0 {
            return Err(rc_err("ibv_query_device", rc));
        }
        Ok(attr)
    }

    fn query_port(&self, port: u8) -> Result<ibv_port_attr, TransportError> {
        // SAFETY: ibv_port_attr is plain C data; all-zero is a valid value.
        let mut attr: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open and `attr` is a valid out-pointer of the size passed.
        let rc = unsafe { ___ibv_query_port(self.ctx.as_ptr(), port, &mut attr) };
        if rc != 0 {
            return Err(rc_err("ibv_query_port", rc));
        }
        Ok(attr)
    }

    fn query_gid(&self, port: u8, index: i32) -> Option<[u8; 16]> {
        let mut gid = ibv_gid { raw: [0; 16] };
        // SAFETY: the context is open and `gid` is a valid out-pointer.
        let rc = unsafe { ibv_query_gid(self.ctx.as_ptr(), port, index, &mut gid) };
        // SAFETY: every bit pattern of the union is a valid `raw` array.
        let raw = unsafe { gid.raw };
        (rc == 0 && raw != [0; 16]).then_some(raw)
    }

    /// The port's GID table (non-empty entries) with each entry's RoCE type where sysfs says.
    fn gid_table(&self, port: u8, len: i32) -> Vec<GidEntry> {
        (0..len.min(GID_SCAN_MAX))
            .filter_map(|index| {
                let gid = self.query_gid(port, index)?;
                let path = format!("/sys/class/infiniband/{}/ports/{port}/gid_attrs/types/{index}", self.name);
                let roce_v2 = std::fs::read_to_string(path).ok().map(|t| t.contains("v2"));
                Some(GidEntry { index: index as u8, gid, roce_v2 })
            })
            .collect()
    }

    fn describe(&self) -> Result<RdmaDevice, TransportError> {
        let attr = self.query_device()?;
        let mut ports = Vec::new();
        for port in 1..=attr.phys_port_cnt {
            let p = self.query_port(port)?;
            ports.push(RdmaPort {
                port_num: port,
                state: PortState::from_raw(p.state),
                link_layer: match p.link_layer {
                    LINK_LAYER_INFINIBAND => LinkLayer::InfiniBand,
                    LINK_LAYER_ETHERNET => LinkLayer::Ethernet,
                    other => LinkLayer::Unspecified(other),
                },
                lid: p.lid,
                active_mtu_bytes: mtu_bytes(p.active_mtu as u8),
                gid_table_len: p.gid_tbl_len.max(0) as u32,
            });
        }
        Ok(RdmaDevice { name: self.name.clone(), node_guid: u64::from_be(attr.node_guid), ports, open_error: None })
    }

    fn first_active_port(&self) -> Result<Option<(u8, ibv_port_attr)>, TransportError> {
        let attr = self.query_device()?;
        for port in 1..=attr.phys_port_cnt {
            let p = self.query_port(port)?;
            if p.state == ibv_port_state::IBV_PORT_ACTIVE {
                return Ok(Some((port, p)));
            }
        }
        Ok(None)
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: opened by ibv_open_device, closed once; everything created from it was
        // destroyed first (field order of `Endpoint`, local order in `Endpoint::create`).
        unsafe { ibv_close_device(self.ctx.as_ptr()) };
    }
}

/// Every device with its ports. A device that cannot be opened is listed with `open_error`.
pub(crate) fn list_devices() -> Result<Vec<RdmaDevice>, TransportError> {
    let list = DeviceList::get()?;
    let mut devices = Vec::with_capacity(list.count);
    for index in 0..list.count {
        let described = Context::open(&list, index).and_then(|ctx| ctx.describe());
        devices.push(described.unwrap_or_else(|e| RdmaDevice {
            name: list.name(index),
            node_guid: 0,
            ports: Vec::new(),
            open_error: Some(e.to_string()),
        }));
    }
    Ok(devices)
}

/// Opens the named device, or the first with an ACTIVE port, and picks its first ACTIVE port.
fn open_device(wanted: Option<&str>) -> Result<(Context, u8, ibv_port_attr), TransportError> {
    let list = DeviceList::get()?;
    let names: Vec<String> = (0..list.count).map(|i| list.name(i)).collect();
    if names.is_empty() {
        return Err(TransportError::NoRdmaDevice {
            detail: "ibv_get_device_list found no devices (no RDMA hardware, or the kernel has no \
                     InfiniBand/RoCE support)"
                .into(),
        });
    }
    let candidates: Vec<usize> = match wanted {
        Some(name) => match names.iter().position(|n| n == name) {
            Some(index) => vec![index],
            None => {
                return Err(TransportError::NoRdmaDevice {
                    detail: format!("device {name:?} not found; present: {names:?}"),
                })
            }
        },
        None => (0..names.len()).collect(),
    };
    let mut why = Vec::new();
    for index in candidates {
        match Context::open(&list, index) {
            Ok(ctx) => match ctx.first_active_port() {
                Ok(Some((port, attr))) => return Ok((ctx, port, attr)),
                Ok(None) => why.push(format!("{}: no ACTIVE port", names[index])),
                Err(e) => why.push(format!("{}: {e}", names[index])),
            },
            Err(e) => why.push(format!("{}: {e}", names[index])),
        }
    }
    Err(TransportError::NoRdmaDevice { detail: format!("no usable device ({})", why.join("; ")) })
}

// ---- registered memory ------------------------------------------------------------------------

/// Page-aligned, zeroed memory handed to the device.
pub(crate) struct DmaBuffer {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain bytes with no thread affinity. Concurrent access follows the
// contract at the top of this module: the CPU reads only lent ranges and writes only unposted
// slots, each from one thread at a time.
unsafe impl Send for DmaBuffer {}
// SAFETY: as above; shared references only ever read ranges the device is not writing.
unsafe impl Sync for DmaBuffer {}

impl DmaBuffer {
    fn new(len: usize, what: &str) -> Result<DmaBuffer, TransportError> {
        let layout = Layout::from_size_align(len.max(1), DMA_ALIGN_BYTES)
            .map_err(|e| rdma_err("allocate registered memory", format!("{what}: {len} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr)
            .ok_or_else(|| rdma_err("allocate registered memory", format!("{what}: {len} bytes: out of memory")))?;
        Ok(DmaBuffer { ptr, len })
    }

    fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// # Safety
    /// The device must not be writing `offset..offset + len` while the slice lives.
    unsafe fn slice(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len), "range outside buffer");
        // SAFETY: in bounds (asserted); allocated and initialised (zeroed) for `self.len`; the
        // caller guarantees nothing writes the range meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset), len) }
    }

    /// Copies a range into owned memory through raw pointers, for bytes the peer can still
    /// write (the ring is remotely writable for the whole link). No reference ever points at
    /// them, so a racing remote write can only corrupt the copy, which the CRC and bytecheck
    /// then see; bytes that were checked can never change afterwards.
    fn copy_out(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len), "range outside buffer");
        let mut out = Vec::with_capacity(len);
        // SAFETY: the source range is in bounds (asserted) of an allocation of `self.len`
        // initialised bytes; `out` is a fresh allocation of capacity `len`, so the two do not
        // overlap; all `len` bytes are written before `set_len`.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset), out.as_mut_ptr(), len);
            out.set_len(len);
        }
        out
    }

    /// # Safety
    /// The range must not be posted to the device or borrowed by anyone.
    unsafe fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset.checked_add(data.len()).is_some_and(|end| end <= self.len), "range outside buffer");
        // SAFETY: in bounds (asserted); `data` is ordinary memory, so the two do not overlap;
        // the caller guarantees exclusive access to the range.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len()) };
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len.max(1), DMA_ALIGN_BYTES).expect("checked at allocation");
        // SAFETY: allocated in `new` with this layout; freed once, after the MR and QP that
        // referenced it are gone (the endpoint drops its buffers last; shared buffers go when
        // the last lease goes).
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

struct Pd(NonNull<ibv_pd>);

impl Pd {
    fn alloc(ctx: &Context) -> Result<Pd, TransportError> {
        // SAFETY: the context is open.
        let pd = unsafe { ibv_alloc_pd(ctx.ctx.as_ptr()) };
        NonNull::new(pd).map(Pd).ok_or_else(|| errno_err("ibv_alloc_pd"))
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: allocated once; its QP and MRs are gone first (declaration order).
        unsafe { ibv_dealloc_pd(self.0.as_ptr()) };
    }
}

struct Mr(NonNull<ibv_mr>);

impl Mr {
    fn register(pd: &Pd, buf: &DmaBuffer, access: ibv_access_flags, what: &str) -> Result<Mr, TransportError> {
        // SAFETY: `buf` is valid for `len` bytes and outlives the MR (dropped after it).
        let mr = unsafe { ibv_reg_mr(pd.0.as_ptr(), buf.ptr.as_ptr().cast(), buf.len, access.0 as i32) };
        NonNull::new(mr).map(Mr).ok_or_else(|| {
            let err = io::Error::last_os_error();
            rdma_err(
                "ibv_reg_mr",
                format!("{what} ({} bytes): {err}; check `ulimit -l` (locked memory) on this host", buf.len),
            )
        })
    }

    fn lkey(&self) -> u32 {
        // SAFETY: the MR is registered and not deregistered while `self` lives.
        unsafe { self.0.as_ref().lkey }
    }

    fn rkey(&self) -> u32 {
        // SAFETY: as for `lkey`.
        unsafe { self.0.as_ref().rkey }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered once, deregistered once, after the QP that used it was destroyed.
        unsafe { ibv_dereg_mr(self.0.as_ptr()) };
    }
}

struct CompChannel(NonNull<ibv_comp_channel>);

impl CompChannel {
    fn create(ctx: &Context) -> Result<CompChannel, TransportError> {
        // SAFETY: the context is open.
        let ch = unsafe { ibv_create_comp_channel(ctx.ctx.as_ptr()) };
        let ch = NonNull::new(ch).map(CompChannel).ok_or_else(|| errno_err("ibv_create_comp_channel"))?;
        let fd = ch.fd();
        // SAFETY: fcntl on a valid fd owned by the channel; flags are read then written back.
        let rc = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
        };
        if rc < 0 {
            return Err(errno_err("fcntl(O_NONBLOCK) on the completion channel"));
        }
        Ok(ch)
    }

    fn fd(&self) -> RawFd {
        // SAFETY: the channel is live while `self` is.
        unsafe { self.0.as_ref().fd }
    }
}

impl Drop for CompChannel {
    fn drop(&mut self) {
        // SAFETY: created once; its CQ was destroyed first (declaration order).
        unsafe { ibv_destroy_comp_channel(self.0.as_ptr()) };
    }
}

struct Cq {
    cq: NonNull<ibv_cq>,
    unacked_events: u32,
}

impl Cq {
    fn create(ctx: &Context, channel: &CompChannel, entries: i32) -> Result<Cq, TransportError> {
        // SAFETY: context and channel are live; no CQ context pointer is used.
        let cq = unsafe { ibv_create_cq(ctx.ctx.as_ptr(), entries, null_mut(), channel.0.as_ptr(), 0) };
        let cq = NonNull::new(cq).ok_or_else(|| errno_err("ibv_create_cq"))?;
        Ok(Cq { cq, unacked_events: 0 })
    }

    fn ack_events(&mut self) {
        if self.unacked_events > 0 {
            // SAFETY: acknowledges exactly the events taken with ibv_get_cq_event on this CQ.
            unsafe { ibv_ack_cq_events(self.cq.as_ptr(), self.unacked_events) };
            self.unacked_events = 0;
        }
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // ibv_destroy_cq waits for every event taken to be acknowledged.
        self.ack_events();
        // SAFETY: created once; its QP was destroyed first (declaration order).
        unsafe { ibv_destroy_cq(self.cq.as_ptr()) };
    }
}

struct Qp(NonNull<ibv_qp>);

impl Qp {
    fn num(&self) -> u32 {
        // SAFETY: the QP is live while `self` is.
        unsafe { self.0.as_ref().qp_num }
    }

    fn modify(&self, attr: &mut ibv_qp_attr, mask: ibv_qp_attr_mask, op: &'static str) -> Result<(), TransportError> {
        // SAFETY: the QP is live and `attr` is a valid, initialised attribute block.
        let rc = unsafe { ibv_modify_qp(self.0.as_ptr(), attr, mask.0 as i32) };
        if rc != 0 {
            return Err(rc_err(op, rc));
        }
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed first of all the endpoint's objects; outstanding work
        // requests die with it, so no DMA touches the buffers afterwards.
        unsafe { ibv_destroy_qp(self.0.as_ptr()) };
    }
}

// ---- leases: received SEND frames pointing into registered memory ------------------------------------

/// Proof that a lent receive slot is free again. Only a dropped frame makes one, so a slot is
/// never reposted while a frame still reads it.
#[derive(Debug)]
pub(crate) struct Release {
    slot: u32,
}

/// Sends its `Release` to the driver (and wakes it) when the frame holding it is dropped.
struct ReleaseOnDrop {
    release: Option<Release>,
    tx: flume::Sender<Release>,
    doorbell: Arc<Doorbell>,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            // The driver may be gone (link closed); then nothing is reposted, which is right.
            if self.tx.send(release).is_ok() {
                self.doorbell.ring();
            }
        }
    }
}

struct Lease {
    buf: Arc<DmaBuffer>,
    offset: usize,
    len: usize,
    _release: ReleaseOnDrop,
}

impl AsRef<[u8]> for Lease {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the range (a receive slot; ring bytes are never lent) belongs to this lease
        // alone until it is dropped: the slot is not reposted before the `Release` it holds reaches the
        // driver (module contract). The buffer is kept alive by the `Arc`.
        unsafe { self.buf.slice(self.offset, self.len) }
    }
}

/// A ring frame copied into private memory; dropping it returns the receive slot (and so the
/// credit) the frame used.
struct CopiedFrame {
    data: Vec<u8>,
    _release: ReleaseOnDrop,
}

impl AsRef<[u8]> for CopiedFrame {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

// ---- the endpoint: one connection's verbs objects and buffers --------------------------------------

/// Sizes of one endpoint's buffers (from `RdmaConfig`).
#[derive(Debug, Clone)]
pub(crate) struct EndpointSpec {
    pub device: Option<String>,
    pub gid_index: Option<u8>,
    pub slot_bytes: u32,
    pub recv_slots: u32,
    pub send_slots: u32,
    pub ring_bytes: u64,
    pub chunk_bytes: u32,
    pub chunks: u32,
}

/// A completion the driver acts on (send-side completions are handled here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completion {
    Recv { slot: u32, byte_len: u32, imm: Option<u32>, via_write: bool },
}

struct RemoteRing {
    addr: u64,
    rkey: u32,
    bytes: u64,
}

pub(crate) struct Endpoint {
    // Teardown order: Rust drops fields top to bottom.
    qp: Qp,
    cq: Cq,
    channel: CompChannel,
    send_mr: Mr,
    stage_mr: Mr,
    recv_mr: Mr,
    ring_mr: Mr,
    #[allow(dead_code)] // held only so it is deallocated after the QP and MRs, before the context
    pd: Pd,
    ctx: Context,
    send_buf: DmaBuffer,
    stage_buf: DmaBuffer,
    recv_buf: Arc<DmaBuffer>,
    ring_buf: Arc<DmaBuffer>,
    // Bookkeeping only.
    spec: EndpointSpec,
    port: u8,
    port_attr: ibv_port_attr,
    gid_index: u8,
    gid: [u8; 16],
    psn: u32,
    send_pool: SlotPool,
    control_pool: SlotPool,
    chunk_pool: SlotPool,
    recv_states: RecvSlots,
    probe_outstanding: bool,
    remote: Option<RemoteRing>,
    release_tx: flume::Sender<Release>,
    doorbell: Arc<Doorbell>,
    wc: Vec<ibv_wc>,
}

// SAFETY: see the module contract: the endpoint's verbs objects are thread-safe in libibverbs
// and the endpoint is used by one thread at a time (it is moved, never shared).
unsafe impl Send for Endpoint {}

fn checked_bytes(count: u32, each: u64, what: &str) -> Result<usize, TransportError> {
    u64::from(count)
        .checked_mul(each)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| rdma_err("size registered memory", format!("{what}: {count} x {each} bytes overflows")))
}

impl Endpoint {
    /// Opens the device, creates the queue pair (in INIT), registers every buffer and posts
    /// every receive. `local_ip` is the bootstrap socket's local address (for the GID).
    pub(crate) fn create(
        spec: &EndpointSpec,
        local_ip: IpAddr,
        release_tx: flume::Sender<Release>,
        doorbell: Arc<Doorbell>,
    ) -> Result<Endpoint, TransportError> {
        let wanted = spec.device.clone().or_else(|| std::env::var("SLUICE_RDMA_DEVICE").ok().filter(|d| !d.is_empty()));
        let (ctx, port, port_attr) = open_device(wanted.as_deref())?;
        let device_attr = ctx.query_device()?;
        let gids = ctx.gid_table(port, port_attr.gid_tbl_len);
        let gid_index = choose_gid_index(&gids, local_ip, spec.gid_index);
        let gid = ctx.query_gid(port, i32::from(gid_index)).unwrap_or([0; 16]);
        if port_attr.link_layer == LINK_LAYER_ETHERNET && gid == [0; 16] {
            return Err(rdma_err(
                "choose GID",
                format!("{} port {port} (RoCE) has no GID at index {gid_index}; set rdma.gid_index", ctx.name),
            ));
        }

        // One more for the liveness probe.
        let send_wrs = spec.send_slots + CONTROL_SEND_SLOTS + spec.chunks + 1;
        let cq_entries = send_wrs + spec.recv_slots;
        if cq_entries > device_attr.max_cqe.max(0) as u32
            || send_wrs.max(spec.recv_slots) > device_attr.max_qp_wr.max(0) as u32
        {
            return Err(rdma_err(
                "size queues",
                format!(
                    "{} allows {} CQ entries and {} WRs per queue; this link needs {cq_entries} and {}: \
                     lower rdma.recv_slots or rdma.send_slots",
                    ctx.name,
                    device_attr.max_cqe,
                    device_attr.max_qp_wr,
                    send_wrs.max(spec.recv_slots)
                ),
            ));
        }

        // Locals drop in reverse: a half-built endpoint goes QP, CQ, channel, MRs, memory, PD,
        // context, the same order as a whole one.
        let pd = Pd::alloc(&ctx)?;
        let slot = u64::from(spec.slot_bytes);
        let send_buf = DmaBuffer::new(
            checked_bytes(spec.send_slots, slot, "send slots")? + CONTROL_SEND_SLOTS as usize * CONTROL_SLOT_BYTES,
            "send slots",
        )?;
        let stage_buf =
            DmaBuffer::new(checked_bytes(spec.chunks, u64::from(spec.chunk_bytes), "write chunks")?, "write chunks")?;
        let recv_buf =
            Arc::new(DmaBuffer::new(checked_bytes(spec.recv_slots, slot, "receive slots")?, "receive slots")?);
        let ring_len = usize::try_from(spec.ring_bytes).map_err(|_| rdma_err("size registered memory", "ring"))?;
        let ring_buf = Arc::new(DmaBuffer::new(ring_len, "ring")?);
        let local = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
        let send_mr = Mr::register(&pd, &send_buf, local, "send slots")?;
        let stage_mr = Mr::register(&pd, &stage_buf, local, "write chunks")?;
        let recv_mr = Mr::register(&pd, &recv_buf, local, "receive slots")?;
        let ring_mr =
            Mr::register(&pd, &ring_buf, local | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE, "ring (remote write)")?;
        let channel = CompChannel::create(&ctx)?;
        let cq = Cq::create(&ctx, &channel, cq_entries as i32)?;

        // SAFETY: ibv_qp_init_attr is plain C data; all-zero (null pointers) is valid.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.cq.as_ptr();
        init.recv_cq = cq.cq.as_ptr();
        init.cap = ibv_qp_cap {
            max_send_wr: send_wrs,
            max_recv_wr: spec.recv_slots,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 0,
        };
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        // SAFETY: the PD and CQ are live; `init` is initialised.
        let qp = unsafe { ibv_create_qp(pd.0.as_ptr(), &mut init) };
        let qp = NonNull::new(qp).map(Qp).ok_or_else(|| errno_err("ibv_create_qp"))?;

        // SAFETY: ibv_qp_attr is plain C data; all-zero is valid.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = port;
        attr.qp_access_flags = (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE).0;
        qp.modify(
            &mut attr,
            ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
                | ibv_qp_attr_mask::IBV_QP_PORT
                | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS,
            "ibv_modify_qp(INIT)",
        )?;

        let mut endpoint = Endpoint {
            qp,
            cq,
            channel,
            send_mr,
            stage_mr,
            recv_mr,
            ring_mr,
            pd,
            ctx,
            send_buf,
            stage_buf,
            recv_buf,
            ring_buf,
            spec: spec.clone(),
            port,
            port_attr,
            gid_index,
            gid,
            psn: random_psn(),
            send_pool: SlotPool::new(spec.send_slots),
            control_pool: SlotPool::new(CONTROL_SEND_SLOTS),
            chunk_pool: SlotPool::new(spec.chunks),
            recv_states: RecvSlots::new(spec.recv_slots),
            probe_outstanding: false,
            remote: None,
            release_tx,
            doorbell,
            // SAFETY: ibv_wc is plain C data; all-zero is valid.
            wc: (0..WC_BATCH).map(|_| unsafe { std::mem::zeroed() }).collect(),
        };
        let all: Vec<u32> = (0..spec.recv_slots).collect();
        endpoint.post_recvs(&all)?;
        Ok(endpoint)
    }

    /// What this side tells the peer.
    pub(crate) fn local_info(&self, credits: u32, max_frame_bytes: u64) -> RdmaPeerInfo {
        RdmaPeerInfo {
            lid: self.port_attr.lid,
            qp_num: self.qp.num(),
            psn: self.psn,
            gid: self.gid,
            mtu: self.port_attr.active_mtu as u8,
            ring_addr: self.ring_buf.addr(),
            ring_rkey: self.ring_mr.rkey(),
            ring_bytes: self.spec.ring_bytes,
            recv_slots: self.spec.recv_slots,
            credits,
            slot_bytes: self.spec.slot_bytes,
            max_frame_bytes,
        }
    }

    /// "rxe0 port 1 (Ethernet, GID index 1, MTU 1024, QP 17)", for logs.
    pub(crate) fn describe(&self) -> String {
        let layer = match self.port_attr.link_layer {
            LINK_LAYER_ETHERNET => "RoCE",
            LINK_LAYER_INFINIBAND => "InfiniBand",
            _ => "unknown link layer",
        };
        format!(
            "{} port {} ({layer}, GID index {}, MTU {}, QP {})",
            self.ctx.name,
            self.port,
            self.gid_index,
            mtu_bytes(self.port_attr.active_mtu as u8),
            self.qp.num()
        )
    }

    pub(crate) fn device_name(&self) -> &str {
        &self.ctx.name
    }

    /// INIT -> RTR -> RTS against the peer's (checked) details.
    pub(crate) fn connect(&mut self, peer: &RdmaPeerInfo) -> Result<(), TransportError> {
        // SAFETY: ibv_qp_attr is plain C data; all-zero is valid.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = (self.port_attr.active_mtu).min(u32::from(peer.mtu));
        attr.dest_qp_num = peer.qp_num;
        attr.rq_psn = peer.psn;
        attr.max_dest_rd_atomic = 1;
        attr.min_rnr_timer = QP_MIN_RNR_TIMER;
        attr.ah_attr.dlid = peer.lid;
        attr.ah_attr.sl = 0;
        attr.ah_attr.src_path_bits = 0;
        attr.ah_attr.port_num = self.port;
        // RoCE has no LIDs: address by GID. InfiniBand uses the LID (a GRH only across subnets).
        if self.port_attr.link_layer == LINK_LAYER_ETHERNET || peer.lid == 0 {
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid = ibv_gid { raw: peer.gid };
            attr.ah_attr.grh.sgid_index = self.gid_index;
            attr.ah_attr.grh.hop_limit = GRH_HOP_LIMIT;
            attr.ah_attr.grh.traffic_class = 0;
            attr.ah_attr.grh.flow_label = 0;
        }
        self.qp.modify(
            &mut attr,
            ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_AV
                | ibv_qp_attr_mask::IBV_QP_PATH_MTU
                | ibv_qp_attr_mask::IBV_QP_DEST_QPN
                | ibv_qp_attr_mask::IBV_QP_RQ_PSN
                | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
                | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER,
            "ibv_modify_qp(RTR)",
        )?;

        // SAFETY: as above.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTS;
        attr.timeout = QP_ACK_TIMEOUT_EXP;
        attr.retry_cnt = QP_RETRY_COUNT;
        attr.rnr_retry = QP_RNR_RETRY;
        attr.sq_psn = self.psn;
        attr.max_rd_atomic = 1;
        self.qp.modify(
            &mut attr,
            ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_TIMEOUT
                | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
                | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
                | ibv_qp_attr_mask::IBV_QP_SQ_PSN
                | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC,
            "ibv_modify_qp(RTS)",
        )?;
        self.remote = Some(RemoteRing { addr: peer.ring_addr, rkey: peer.ring_rkey, bytes: peer.ring_bytes });
        Ok(())
    }

    pub(crate) fn slot_bytes(&self) -> u32 {
        self.spec.slot_bytes
    }

    pub(crate) fn ring_bytes(&self) -> u64 {
        self.spec.ring_bytes
    }

    pub(crate) fn chunk_bytes(&self) -> u32 {
        self.spec.chunk_bytes
    }

    // ---- receives ----

    /// Posts receives into `slots`, whose bytes nobody borrows (asserted by state).
    fn post_recvs(&mut self, slots: &[u32]) -> Result<(), TransportError> {
        if slots.is_empty() {
            return Ok(());
        }
        let slot_bytes = self.spec.slot_bytes;
        let mut sges: Vec<ibv_sge> = slots
            .iter()
            .map(|&slot| {
                assert!(slot < self.spec.recv_slots, "receive slot {slot} out of range");
                ibv_sge {
                    addr: self.recv_buf.addr() + u64::from(slot) * u64::from(slot_bytes),
                    length: slot_bytes,
                    lkey: self.recv_mr.lkey(),
                }
            })
            .collect();
        let mut wrs: Vec<ibv_recv_wr> = slots
            .iter()
            .map(|&slot| ibv_recv_wr {
                wr_id: wr_id(WrKind::Recv, slot),
                next: null_mut(),
                sg_list: null_mut(),
                num_sge: 1,
            })
            .collect();
        // Link after both vectors are final, so the pointers stay valid.
        // Raw pointers from one base each: indexing per element would reborrow the whole
        // vector and invalidate the links already made.
        let count = wrs.len();
        let (wr_base, sge_base) = (wrs.as_mut_ptr(), sges.as_mut_ptr());
        for i in 0..count {
            // SAFETY: i < count == wrs.len() == sges.len(), so both pointers are in bounds;
            // neither vector is touched through a reference while these pointers are in use.
            unsafe {
                (*wr_base.add(i)).sg_list = sge_base.add(i);
                if i + 1 < count {
                    (*wr_base.add(i)).next = wr_base.add(i + 1);
                }
            }
        }
        let mut bad: *mut ibv_recv_wr = null_mut();
        // SAFETY: the chain and its SGEs live until the call returns; each SGE covers one whole
        // slot inside the registered receive buffer, which outlives the QP; no slot is
        // borrowed (callers pass only fresh, completed or released slots).
        let rc = unsafe { ibv_post_recv(self.qp.0.as_ptr(), wrs.as_mut_ptr(), &mut bad) };
        if rc != 0 {
            return Err(rc_err("ibv_post_recv", rc));
        }
        Ok(())
    }

    /// Reposts a slot whose completion was read and not lent (a control message).
    pub(crate) fn repost_completed(&mut self, slot: u32) -> Result<(), TransportError> {
        self.recv_states.transition(slot, RecvState::Posted);
        self.post_recvs(&[slot])
    }

    /// Reposts the slots of dropped frames, in one chain.
    pub(crate) fn repost_released(&mut self, released: &[Release]) -> Result<(), TransportError> {
        let slots: Vec<u32> = released.iter().map(|r| r.slot).collect();
        for &slot in &slots {
            self.recv_states.transition(slot, RecvState::Posted);
        }
        self.post_recvs(&slots)
    }

    /// The bytes of a completed, not yet lent receive slot.
    pub(crate) fn read_slot(&self, slot: u32, len: u32) -> &[u8] {
        assert_eq!(self.recv_states.state(slot), RecvState::Completed, "slot {slot} is not completed");
        assert!(len <= self.spec.slot_bytes, "read of {len} bytes from a {}-byte slot", self.spec.slot_bytes);
        let offset = slot as usize * self.spec.slot_bytes as usize;
        // SAFETY: a completed slot is not posted, so the device is not writing it.
        unsafe { self.recv_buf.slice(offset, len as usize) }
    }

    /// Ring bytes at a checked offset, for the header of a frame that just arrived there.
    /// A copy of ring bytes (see `DmaBuffer::copy_out` for why ring bytes are never borrowed).
    pub(crate) fn copy_ring(&self, offset: u64, len: u64) -> Vec<u8> {
        self.ring_buf.copy_out(offset as usize, len as usize)
    }

    /// Lends a completed slot's first `len` bytes to a frame; the slot is reposted when the
    /// returned bytes (and all their clones) are dropped.
    pub(crate) fn lend_slot(&mut self, slot: u32, len: u32) -> Bytes {
        assert!(len <= self.spec.slot_bytes, "lend of {len} bytes from a {}-byte slot", self.spec.slot_bytes);
        self.recv_states.transition(slot, RecvState::Lent);
        Bytes::from_owner(Lease {
            buf: self.recv_buf.clone(),
            offset: slot as usize * self.spec.slot_bytes as usize,
            len: len as usize,
            _release: self.release_on_drop(slot),
        })
    }

    fn release_on_drop(&self, slot: u32) -> ReleaseOnDrop {
        ReleaseOnDrop { release: Some(Release { slot }), tx: self.release_tx.clone(), doorbell: self.doorbell.clone() }
    }

    /// Copies a ring frame (`len` bytes at `offset`) out into private memory. The caller
    /// releases the ring range at once; the receive slot the WRITE WITH IMMEDIATE consumed
    /// stays lent until the returned bytes are dropped, so the frame still holds its credit.
    /// The copy is deliberate: the ring stays remotely writable, so a peer could rewrite a
    /// frame after it was validated; a private copy is what gets validated and read.
    pub(crate) fn take_ring_frame(&mut self, slot: u32, offset: u64, len: u64) -> Bytes {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.spec.ring_bytes), "ring range out of bounds");
        self.recv_states.transition(slot, RecvState::Lent);
        // Copy the frame out of the peer-writable ring: the one copy on the RDMA WRITE path.
        let data = self.ring_buf.copy_out(offset as usize, len as usize);
        Bytes::from_owner(CopiedFrame { data, _release: self.release_on_drop(slot) })
    }

    // ---- sends ----

    pub(crate) fn can_send_frame(&self) -> bool {
        self.send_pool.available() > 0
    }

    pub(crate) fn can_send_control(&self) -> bool {
        self.control_pool.available() > 0
    }

    pub(crate) fn can_write_chunk(&self) -> bool {
        self.chunk_pool.available() > 0
    }

    /// Work requests posted and not completed.
    pub(crate) fn sends_outstanding(&self) -> u32 {
        self.send_pool.in_use()
            + self.control_pool.in_use()
            + self.chunk_pool.in_use()
            + u32::from(self.probe_outstanding)
    }

    /// Posts one signaled work request; `sge: None` is a zero-length request.
    fn post_send(
        &mut self,
        id: u64,
        sge: Option<ibv_sge>,
        opcode: ibv_wr_opcode::Type,
        imm: Option<u32>,
        remote_offset: Option<u64>,
    ) -> Result<(), TransportError> {
        let mut sge = sge;
        let length = sge.map_or(0, |s| s.length);
        // SAFETY: ibv_send_wr is plain C data; all-zero (null pointers, empty unions) is valid.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = id;
        if let Some(sge) = sge.as_mut() {
            wr.sg_list = sge;
            wr.num_sge = 1;
        }
        wr.opcode = opcode;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        if let Some(imm) = imm {
            wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
        }
        if let Some(offset) = remote_offset {
            let remote = self.remote.as_ref().expect("writes happen only on a connected endpoint");
            assert!(offset + u64::from(length) <= remote.bytes, "write past the peer's ring");
            wr.wr.rdma = rdma_t { remote_addr: remote.addr + offset, rkey: remote.rkey };
        }
        let mut bad: *mut ibv_send_wr = null_mut();
        // SAFETY: `wr` and `sge` live until the call returns (the provider copies them); the
        // SGE, if any, lies inside a registered buffer the CPU no longer touches until completion.
        let rc = unsafe { ibv_post_send(self.qp.0.as_ptr(), &mut wr, &mut bad) };
        if rc != 0 {
            return Err(rc_err("ibv_post_send", rc));
        }
        Ok(())
    }

    /// Copies a whole frame into a free send slot and SENDs it. False when no slot is free.
    pub(crate) fn send_frame(&mut self, frame: &[u8], imm: u32) -> Result<bool, TransportError> {
        assert!(frame.len() <= self.spec.slot_bytes as usize, "frame of {} bytes in a SEND slot", frame.len());
        let Some(slot) = self.send_pool.take() else { return Ok(false) };
        let offset = slot as usize * self.spec.slot_bytes as usize;
        self.copy_and_send(wr_id(WrKind::SendFrame, slot), offset, frame, imm)?;
        Ok(true)
    }

    /// SENDs a control message. False when no control slot is free.
    pub(crate) fn send_control(&mut self, body: &[u8; CONTROL_BODY_BYTES], imm: u32) -> Result<bool, TransportError> {
        let Some(slot) = self.control_pool.take() else { return Ok(false) };
        let offset = self.spec.send_slots as usize * self.spec.slot_bytes as usize + slot as usize * CONTROL_SLOT_BYTES;
        self.copy_and_send(wr_id(WrKind::SendControl, slot), offset, body, imm)?;
        Ok(true)
    }

    /// Copies `bytes` into the send buffer at `offset` and SENDs them WITH IMMEDIATE. Callers
    /// pass the offset of a slot they have just taken from its free pool.
    fn copy_and_send(&mut self, id: u64, offset: usize, bytes: &[u8], imm: u32) -> Result<(), TransportError> {
        // SAFETY: the slot was just taken from its free pool: not posted, not borrowed.
        unsafe { self.send_buf.write(offset, bytes) };
        let sge = ibv_sge {
            addr: self.send_buf.addr() + offset as u64,
            length: bytes.len() as u32,
            lkey: self.send_mr.lkey(),
        };
        self.post_send(id, Some(sge), ibv_wr_opcode::IBV_WR_SEND_WITH_IMM, Some(imm), None)
    }

    /// Copies `data` into a free staging chunk and RDMA WRITEs it to the peer's ring at
    /// `remote_offset`, WITH IMMEDIATE when `imm` is given. False when no chunk is free.
    pub(crate) fn write_chunk(
        &mut self,
        data: &[u8],
        remote_offset: u64,
        imm: Option<u32>,
    ) -> Result<bool, TransportError> {
        assert!(data.len() <= self.spec.chunk_bytes as usize, "chunk of {} bytes", data.len());
        let Some(chunk) = self.chunk_pool.take() else { return Ok(false) };
        let offset = chunk as usize * self.spec.chunk_bytes as usize;
        // SAFETY: the chunk was free in its pool: not posted, not borrowed.
        unsafe { self.stage_buf.write(offset, data) };
        let sge = ibv_sge {
            addr: self.stage_buf.addr() + offset as u64,
            length: data.len() as u32,
            lkey: self.stage_mr.lkey(),
        };
        let opcode =
            if imm.is_some() { ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM } else { ibv_wr_opcode::IBV_WR_RDMA_WRITE };
        self.post_send(wr_id(WrKind::Write, chunk), Some(sge), opcode, imm, Some(remote_offset))?;
        Ok(true)
    }

    /// Posts a zero-length RDMA WRITE to the peer's ring: it touches no memory and consumes no
    /// receive, but needs the peer's queue pair to answer. False if one is already in flight.
    pub(crate) fn post_probe(&mut self) -> Result<bool, TransportError> {
        if self.probe_outstanding {
            return Ok(false);
        }
        self.post_send(wr_id(WrKind::Probe, 0), None, ibv_wr_opcode::IBV_WR_RDMA_WRITE, None, Some(0))?;
        self.probe_outstanding = true;
        Ok(true)
    }

    // ---- completions ----

    /// Polls up to one batch of completions. Send-side ones free their slot here; receives are
    /// pushed to `out`. A failed completion is the link's end.
    pub(crate) fn poll(&mut self, out: &mut Vec<Completion>) -> Result<usize, TransportError> {
        // SAFETY: the CQ is live; `wc` has room for WC_BATCH entries.
        let n = unsafe { ibv_poll_cq(self.cq.cq.as_ptr(), WC_BATCH as i32, self.wc.as_mut_ptr()) };
        if n < 0 {
            return Err(rc_err("ibv_poll_cq", n));
        }
        for i in 0..n as usize {
            let wc = &self.wc[i];
            let Some((kind, index)) = decode_wr_id(wc.wr_id) else {
                return Err(rdma_err("ibv_poll_cq", format!("completion with unknown wr_id {:#x}", wc.wr_id)));
            };
            if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                // SAFETY: ibv_wc_status_str returns a static string for any status value.
                let what = unsafe { CStr::from_ptr(ibv_wc_status_str(wc.status)) }.to_string_lossy().into_owned();
                return Err(rdma_err(
                    "work completion",
                    format!(
                        "{kind:?} #{index} failed: {what} (status {}, vendor error {:#x}); the peer is gone \
                         or the link broke",
                        wc.status, wc.vendor_err
                    ),
                ));
            }
            match kind {
                WrKind::SendFrame => self.send_pool.give(index),
                WrKind::SendControl => self.control_pool.give(index),
                WrKind::Write => self.chunk_pool.give(index),
                WrKind::Probe => self.probe_outstanding = false,
                WrKind::Recv => {
                    if index >= self.spec.recv_slots {
                        return Err(rdma_err("ibv_poll_cq", format!("receive completion for slot {index}")));
                    }
                    self.recv_states.transition(index, RecvState::Completed);
                    let with_imm = wc.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
                    // SAFETY: with IBV_WC_WITH_IMM set the union holds the immediate data.
                    let imm = with_imm.then(|| u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data }));
                    out.push(Completion::Recv {
                        slot: index,
                        byte_len: wc.byte_len,
                        imm,
                        via_write: wc.opcode == ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM,
                    });
                }
            }
        }
        Ok(n as usize)
    }

    /// Asks for a completion event on the next completion.
    pub(crate) fn arm(&mut self) -> Result<(), TransportError> {
        // SAFETY: the CQ is live.
        let rc = unsafe { ibv_req_notify_cq(self.cq.cq.as_ptr(), 0) };
        if rc != 0 {
            return Err(rc_err("ibv_req_notify_cq", rc));
        }
        Ok(())
    }

    /// Takes every pending completion event (the channel fd is non-blocking) and acknowledges
    /// them in batches.
    pub(crate) fn take_events(&mut self) {
        loop {
            let mut cq: *mut ibv_cq = null_mut();
            let mut context: *mut libc::c_void = null_mut();
            // SAFETY: the channel is live and non-blocking; the out-pointers are valid.
            let rc = unsafe { ibv_get_cq_event(self.channel.0.as_ptr(), &mut cq, &mut context) };
            if rc != 0 {
                break;
            }
            self.cq.unacked_events += 1;
        }
        if self.cq.unacked_events >= CQ_EVENT_ACK_BATCH {
            self.cq.ack_events();
        }
    }

    pub(crate) fn event_fd(&self) -> RawFd {
        self.channel.fd()
    }
}

/// Registers a duplicate of `fd` (open, and kept open by its owner for this call) with the
/// current tokio runtime's reactor, for readability. The registration owns the duplicate.
pub(crate) fn register_with_tokio(fd: RawFd) -> io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: the caller passes an fd its owner keeps open for the duration of this call; the
    // borrow ends with the duplication.
    let owned = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
    // SAFETY: the AsyncFd owns `owned`, so the fd stays open and names the same file
    // description for the AsyncFd's whole lifetime, and nothing else can close or replace it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into())
}

/// poll(2) on a few fds. Returns, per fd, whether it is readable or hung up.
pub(crate) fn wait_fds<const N: usize>(fds: [RawFd; N], timeout_ms: i32) -> io::Result<[bool; N]> {
    let mut pollfds = fds.map(|fd| libc::pollfd { fd, events: libc::POLLIN | libc::POLLRDHUP, revents: 0 });
    // SAFETY: `pollfds` is a valid array of N pollfd structs for the duration of the call.
    let rc = unsafe { libc::poll(pollfds.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok([false; N]);
        }
        return Err(err);
    }
    Ok(pollfds.map(|p| p.revents != 0))
}

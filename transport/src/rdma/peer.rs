//! What the bootstrap exchange decides: the peer's queue-pair details checked before use, the
//! limits both sides then keep to, and the local GID to address.
#![forbid(unsafe_code)]

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;

use crate::config::{
    rdma_ring_need_bytes, MAX_CREDITS, MIN_FRAME_BYTES, RDMA_CONTROL_RECV_SLOTS, RDMA_MAX_RECV_SLOTS,
    RDMA_RING_ALIGN_BYTES, RDMA_RING_MAX_BYTES,
};
use crate::frame::{FRAME_BODY_CEILING_BYTES, FRAME_HEADER_BYTES};
use crate::messages::RdmaPeerInfo;

/// Queue-pair numbers and PSNs are 24-bit.
pub const QP_NUM_MAX: u32 = 0x00ff_ffff;
/// `enum ibv_mtu`: 1 = 256 bytes … 5 = 4096 bytes.
pub const MTU_ENUM_MAX: u8 = 5;

/// Checks every field the peer sent before anything is sized or addressed from it.
pub fn check_peer_info(info: &RdmaPeerInfo) -> Result<(), String> {
    let fail = |what: String| Err(format!("peer's RDMA details rejected: {what}"));
    if info.qp_num == 0 || info.qp_num > QP_NUM_MAX || info.psn > QP_NUM_MAX {
        return fail(format!("qp_num {} / psn {} not 24-bit", info.qp_num, info.psn));
    }
    if info.mtu == 0 || info.mtu > MTU_ENUM_MAX {
        return fail(format!("mtu enum {} not within 1..={MTU_ENUM_MAX}", info.mtu));
    }
    if info.credits == 0 || info.credits > MAX_CREDITS {
        return fail(format!("credits {} not within 1..={MAX_CREDITS}", info.credits));
    }
    let min_recv = info.credits + RDMA_CONTROL_RECV_SLOTS;
    if info.recv_slots < min_recv || info.recv_slots > RDMA_MAX_RECV_SLOTS {
        return fail(format!("recv_slots {} not within {min_recv}..={RDMA_MAX_RECV_SLOTS}", info.recv_slots));
    }
    if !(1024..=(1 << 20)).contains(&info.slot_bytes) {
        return fail(format!("slot_bytes {} not within 1024..=1048576", info.slot_bytes));
    }
    if !(MIN_FRAME_BYTES..=FRAME_BODY_CEILING_BYTES).contains(&info.max_frame_bytes) {
        return fail(format!(
            "max_frame_bytes {} not within {MIN_FRAME_BYTES}..={FRAME_BODY_CEILING_BYTES}",
            info.max_frame_bytes
        ));
    }
    let need = rdma_ring_need_bytes(info.max_frame_bytes);
    if info.ring_bytes < need
        || !info.ring_bytes.is_multiple_of(RDMA_RING_ALIGN_BYTES)
        || info.ring_bytes > RDMA_RING_MAX_BYTES
    {
        return fail(format!(
            "ring_bytes {} must be a multiple of {RDMA_RING_ALIGN_BYTES} within {need}..={RDMA_RING_MAX_BYTES}",
            info.ring_bytes
        ));
    }
    if info.ring_addr == 0 || info.ring_addr.checked_add(info.ring_bytes).is_none() {
        return fail(format!("ring at {:#x} + {} bytes is not addressable", info.ring_addr, info.ring_bytes));
    }
    Ok(())
}

/// The limits one link keeps to, from both sides' details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkLimits {
    /// Largest frame body this side accepts (its own configuration).
    pub recv_max_frame_bytes: u64,
    /// Largest frame body the peer accepts; a larger outbound frame fails the link.
    pub send_max_frame_bytes: u64,
    /// Frames (header included) up to this size go by SEND: both sides' slots hold them.
    pub send_small_frame_bytes: u32,
    /// Data frames the peer takes before credits must come back.
    pub send_window: u32,
    /// The peer's ring, which large frames are written into.
    pub peer_ring_bytes: u64,
}

impl LinkLimits {
    pub fn new(own: &RdmaPeerInfo, peer: &RdmaPeerInfo) -> LinkLimits {
        LinkLimits {
            recv_max_frame_bytes: own.max_frame_bytes,
            send_max_frame_bytes: peer.max_frame_bytes,
            send_small_frame_bytes: own.slot_bytes.min(peer.slot_bytes),
            send_window: peer.credits,
            peer_ring_bytes: peer.ring_bytes,
        }
    }

    /// Whether an outbound frame of `frame_len` bytes (header included) may be sent at all.
    pub fn check_outbound(&self, frame_len: usize) -> Result<(), String> {
        let body = (frame_len as u64).saturating_sub(FRAME_HEADER_BYTES as u64);
        if frame_len < FRAME_HEADER_BYTES || body > self.send_max_frame_bytes {
            return Err(format!(
                "outbound frame of {frame_len} bytes: the peer accepts bodies up to {} bytes (its max_frame_bytes)",
                self.send_max_frame_bytes
            ));
        }
        Ok(())
    }
}

/// The GID an RoCE v4 address is known by: `::ffff:a.b.c.d`.
pub fn gid_for_ip(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// One entry of a port's GID table, as the verbs layer read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidEntry {
    pub index: u8,
    pub gid: [u8; 16],
    /// From sysfs `gid_attrs/types`: Some(true) for "RoCE v2", None where unknown.
    pub roce_v2: Option<bool>,
}

/// The GID index to use: the entry holding the bootstrap socket's local IP (RoCE v2 preferred,
/// since v2 is routable and what soft-RoCE peers use), else the configured index, else 0.
pub fn choose_gid_index(table: &[GidEntry], local_ip: IpAddr, configured: Option<u8>) -> u8 {
    let want = gid_for_ip(local_ip);
    let mut matching = table.iter().filter(|e| e.gid == want);
    let matching_v2 = matching.clone().find(|e| e.roce_v2 == Some(true));
    match (matching_v2, matching.next(), configured) {
        (Some(entry), _, _) | (None, Some(entry), _) => entry.index,
        (None, None, Some(index)) => index,
        (None, None, None) => 0,
    }
}

/// A 24-bit initial packet sequence number that differs per connection.
pub fn random_psn() -> u32 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher
        .write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    (hasher.finish() as u32) & QP_NUM_MAX
}

/// `enum ibv_mtu` to bytes.
pub fn mtu_bytes(mtu: u8) -> u32 {
    match mtu {
        1..=5 => 128 << mtu,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn sample_info() -> RdmaPeerInfo {
        RdmaPeerInfo {
            lid: 0,
            qp_num: 17,
            psn: 0x123456,
            gid: [0; 16],
            mtu: 3,
            ring_addr: 0x7f00_0000_0000,
            ring_rkey: 5,
            ring_bytes: (64 << 20) + (1 << 20),
            recv_slots: 1088,
            credits: 1024,
            slot_bytes: 8192,
            max_frame_bytes: 64 << 20,
        }
    }

    #[test]
    fn sane_details_pass_and_each_bad_field_is_named() {
        check_peer_info(&sample_info()).unwrap();
        type Mutation = fn(&mut RdmaPeerInfo);
        let cases: [(&str, Mutation); 9] = [
            ("qp_num", |i| i.qp_num = 1 << 24),
            ("mtu", |i| i.mtu = 6),
            ("credits", |i| i.credits = 0),
            ("recv_slots", |i| i.recv_slots = i.credits + 1),
            ("slot_bytes", |i| i.slot_bytes = 100),
            ("max_frame_bytes", |i| i.max_frame_bytes = u64::MAX),
            ("ring_bytes", |i| i.ring_bytes = i.max_frame_bytes),
            ("ring_bytes", |i| i.ring_bytes += 1),
            ("ring at", |i| i.ring_addr = u64::MAX - 10),
        ];
        for (field, case) in cases {
            let mut info = sample_info();
            case(&mut info);
            let err = check_peer_info(&info).unwrap_err();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn limits_take_the_smaller_slot_and_the_peers_frame_limit() {
        let own = sample_info();
        let mut peer = sample_info();
        peer.slot_bytes = 4096;
        peer.max_frame_bytes = 1 << 20;
        peer.credits = 10;
        let limits = LinkLimits::new(&own, &peer);
        assert_eq!(limits.send_small_frame_bytes, 4096);
        assert_eq!(limits.send_window, 10);
        limits.check_outbound(FRAME_HEADER_BYTES + (1 << 20)).unwrap();
        assert!(limits.check_outbound(FRAME_HEADER_BYTES + (1 << 20) + 1).is_err());
        assert!(limits.check_outbound(3).is_err());
    }

    #[test]
    fn gid_choice_prefers_the_local_ip_then_roce_v2_then_configuration() {
        let ip = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1));
        let mapped = gid_for_ip(ip);
        assert_eq!(&mapped[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        let link_local = Ipv6Addr::new(0xfe80, 0, 0, 0, 1, 2, 3, 4).octets();
        let table = vec![
            GidEntry { index: 0, gid: link_local, roce_v2: Some(false) },
            GidEntry { index: 1, gid: link_local, roce_v2: Some(true) },
            GidEntry { index: 2, gid: mapped, roce_v2: Some(false) },
            GidEntry { index: 3, gid: mapped, roce_v2: Some(true) },
        ];
        assert_eq!(choose_gid_index(&table, ip, Some(1)), 3);
        assert_eq!(choose_gid_index(&table[..3], ip, None), 2);
        let other = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert_eq!(choose_gid_index(&table, other, Some(1)), 1);
        assert_eq!(choose_gid_index(&table, other, None), 0);
    }

    #[test]
    fn psn_is_24_bit_and_mtu_enum_maps_to_bytes() {
        assert!(random_psn() <= QP_NUM_MAX);
        assert_eq!(mtu_bytes(1), 256);
        assert_eq!(mtu_bytes(5), 4096);
        assert_eq!(mtu_bytes(0), 0);
    }
}

//! Connection set-up over the bootstrap TCP socket:
//!
//! ```text
//! client                                   server
//!   create endpoint (QP in INIT, receives posted)
//!   RdmaConnect{info, proof} ────────────────▶  check the proof (transport secret) and info;
//!                                               create endpoint; QP -> RTR -> RTS
//!                      ◀───────────────────────  RdmaAccept{info, answer}   (or Error{code, message})
//!   check the answer and info; QP -> RTR -> RTS
//!   Heartbeat ("ready") ─────────────────────▶  accept() returns
//! ```
//! The last message keeps the server from sending before the client's QP can receive. After
//! it, the socket carries nothing: the poller watches it only for EOF (peer gone).
#![forbid(unsafe_code)]

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::doorbell::Doorbell;
use super::peer::{check_peer_info, LinkLimits};
use super::spin::SpinBudget;
use super::verbs::{Endpoint, EndpointSpec};
use super::PendingRdma;
use crate::blocking::{read_frame, write_frame};
use crate::config::TransportConfig;
use crate::error::{remote_code, TransportError};
use crate::frame::{Frame, OutFrame};
use crate::messages::{ErrorReply, FrameKind, Heartbeat, RdmaAccept, RdmaConnect, RdmaPeerInfo};
use crate::peer_auth::{Purpose, MAC_BYTES};

/// Handshake frames are small; nothing bigger is read from a socket nobody vouched for yet.
const HANDSHAKE_MAX_FRAME_BYTES: u64 = 64 << 10;
const HANDSHAKE_REQUEST_ID: u64 = 1;

fn spec(config: &TransportConfig) -> EndpointSpec {
    let rdma = &config.rdma;
    EndpointSpec {
        device: rdma.device.clone(),
        gid_index: rdma.gid_index,
        slot_bytes: rdma.slot_bytes,
        recv_slots: rdma.recv_slots,
        send_slots: rdma.send_slots,
        ring_bytes: rdma.ring_bytes,
        chunk_bytes: rdma.write_chunk_bytes,
        chunks: rdma.write_chunks,
    }
}

struct Deadline {
    at: Instant,
    timeout_ms: u64,
}

impl Deadline {
    fn new(timeout_ms: u64) -> Deadline {
        Deadline { at: Instant::now() + Duration::from_millis(timeout_ms), timeout_ms }
    }

    /// Bounds the next socket operation by the time left.
    fn arm(&self, stream: &TcpStream) -> Result<(), TransportError> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.expired());
        }
        let io = |e| TransportError::io("setting bootstrap socket timeouts", e);
        stream.set_read_timeout(Some(left)).map_err(io)?;
        stream.set_write_timeout(Some(left)).map_err(io)
    }

    fn expired(&self) -> TransportError {
        TransportError::Handshake {
            reason: format!("RDMA handshake not finished within connect_timeout_ms = {}", self.timeout_ms),
        }
    }

    /// A timed-out read surfaces as WouldBlock/TimedOut: say which limit was hit.
    fn explain(&self, error: TransportError) -> TransportError {
        match &error {
            TransportError::Io { source, .. }
                if matches!(source.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                self.expired()
            }
            _ => error,
        }
    }
}

fn send<M: crate::frame::Message>(
    stream: &mut TcpStream,
    deadline: &Deadline,
    message: &M,
) -> Result<(), TransportError> {
    deadline.arm(stream)?;
    let frame = OutFrame::encode(HANDSHAKE_REQUEST_ID, message, HANDSHAKE_MAX_FRAME_BYTES)?;
    write_frame(stream, &frame).map_err(|e| deadline.explain(e))
}

fn receive(stream: &mut TcpStream, deadline: &Deadline, expected: FrameKind) -> Result<Frame, TransportError> {
    deadline.arm(stream)?;
    let frame = read_frame(stream, HANDSHAKE_MAX_FRAME_BYTES).map_err(|e| deadline.explain(e))?;
    if frame.header().kind == FrameKind::Error as u16 {
        let reply = frame.access::<ErrorReply>()?;
        return Err(TransportError::Handshake {
            reason: format!("the peer refused the RDMA link: error {}: {}", reply.code.to_native(), reply.message),
        });
    }
    if frame.header().kind != expected as u16 {
        return Err(TransportError::Handshake {
            reason: format!("expected a {expected:?} frame, got kind {}", frame.header().kind),
        });
    }
    Ok(frame)
}

fn peer_info(archived: &<RdmaPeerInfo as rkyv::Archive>::Archived) -> Result<RdmaPeerInfo, TransportError> {
    let info = RdmaPeerInfo {
        lid: archived.lid.to_native(),
        qp_num: archived.qp_num.to_native(),
        psn: archived.psn.to_native(),
        gid: archived.gid,
        mtu: archived.mtu,
        ring_addr: archived.ring_addr.to_native(),
        ring_rkey: archived.ring_rkey.to_native(),
        ring_bytes: archived.ring_bytes.to_native(),
        recv_slots: archived.recv_slots.to_native(),
        credits: archived.credits.to_native(),
        slot_bytes: archived.slot_bytes.to_native(),
        max_frame_bytes: archived.max_frame_bytes.to_native(),
    };
    check_peer_info(&info).map_err(|reason| TransportError::Handshake { reason })?;
    Ok(info)
}

fn new_endpoint(
    stream: &TcpStream,
    config: &TransportConfig,
) -> Result<(Endpoint, flume::Receiver<super::verbs::Release>, Arc<Doorbell>), TransportError> {
    let local_ip = stream.local_addr().map_err(|e| TransportError::io("bootstrap socket address", e))?.ip();
    let doorbell = Doorbell::new().map_err(|e| TransportError::io("creating the poller's doorbell", e))?;
    let (release_tx, releases) = flume::unbounded();
    let endpoint = Endpoint::create(&spec(config), local_ip, release_tx, doorbell.clone())?;
    Ok((endpoint, releases, doorbell))
}

fn pending(
    endpoint: Endpoint,
    stream: TcpStream,
    own: &RdmaPeerInfo,
    peer: &RdmaPeerInfo,
    releases: flume::Receiver<super::verbs::Release>,
    doorbell: Arc<Doorbell>,
    config: &TransportConfig,
) -> Result<PendingRdma, TransportError> {
    stream.set_read_timeout(None).map_err(|e| TransportError::io("bootstrap socket", e))?;
    stream.set_write_timeout(None).map_err(|e| TransportError::io("bootstrap socket", e))?;
    let peer_addr = stream.peer_addr().map_err(|e| TransportError::io("bootstrap socket", e))?;
    tracing::info!(device = %endpoint.describe(), %peer_addr, "RDMA link established");
    Ok(PendingRdma {
        endpoint,
        tcp: stream,
        limits: LinkLimits::new(own, peer),
        own_credits: own.credits,
        spin: SpinBudget::new(
            Duration::from_micros(config.rdma.busy_poll_us.into()),
            Duration::from_micros(config.rdma.busy_poll_max_us.into()),
        ),
        liveness_probe: Duration::from_millis(config.rdma.liveness_probe_ms),
        releases,
        doorbell,
        peer_addr,
    })
}

pub(crate) fn connect(addr: SocketAddr, config: &TransportConfig) -> Result<PendingRdma, TransportError> {
    config.validate()?;
    let deadline = Deadline::new(config.connect_timeout_ms);
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(config.connect_timeout_ms))
        .map_err(|e| TransportError::io(format!("connecting to {addr} (RDMA bootstrap)"), e))?;
    stream.set_nodelay(true).map_err(|e| TransportError::io("bootstrap socket", e))?;
    let (mut endpoint, releases, doorbell) = new_endpoint(&stream, config)?;
    let own = endpoint.local_info(config.credits, config.max_frame_bytes);
    let proof = config.secret.as_ref().map(|s| s.prove(Purpose::RdmaConnect, "")).unwrap_or_default();
    send(&mut stream, &deadline, &RdmaConnect { info: own.clone(), proof: proof.clone() })?;
    let frame = receive(&mut stream, &deadline, FrameKind::RdmaAccept)?;
    let accept = frame.access::<RdmaAccept>()?;
    if let Some(secret) = &config.secret {
        secret
            .check_answer(&proof, &accept.server_proof)
            .map_err(|e| TransportError::Handshake { reason: e.to_string() })?;
    }
    let peer = peer_info(&accept.info)?;
    endpoint.connect(&peer)?;
    send(&mut stream, &deadline, &Heartbeat { sent_at_us: 0 })?;
    pending(endpoint, stream, &own, &peer, releases, doorbell, config)
}

pub(crate) fn accept(mut stream: TcpStream, config: &TransportConfig) -> Result<PendingRdma, TransportError> {
    let deadline = Deadline::new(config.connect_timeout_ms);
    stream.set_nodelay(true).map_err(|e| TransportError::io("bootstrap socket", e))?;
    let frame = receive(&mut stream, &deadline, FrameKind::RdmaConnect)?;
    let connect = frame.access::<RdmaConnect>()?;
    // Before anything is created or registered for the peer.
    let server_proof = match &config.secret {
        Some(secret) => match secret.check(Purpose::RdmaConnect, "", &connect.proof.to_native()) {
            Ok(answer) => answer,
            Err(why) => {
                let refusal = ErrorReply { code: remote_code::UNAUTHENTICATED, message: why.to_string() };
                let _ = send(&mut stream, &deadline, &refusal);
                return Err(TransportError::Handshake {
                    reason: format!("refused an RDMA link that did not prove the transport secret: {why}"),
                });
            }
        },
        None => [0; MAC_BYTES],
    };
    let peer = peer_info(&connect.info)?;
    let built = new_endpoint(&stream, config).and_then(|(mut endpoint, releases, doorbell)| {
        endpoint.connect(&peer)?;
        Ok((endpoint, releases, doorbell))
    });
    let (endpoint, releases, doorbell) = match built {
        Ok(built) => built,
        Err(error) => {
            // Tell the client why, so it does not just see a closed socket.
            let refusal = ErrorReply { code: error.code(), message: error.to_string() };
            let _ = send(&mut stream, &deadline, &refusal);
            return Err(error);
        }
    };
    let own = endpoint.local_info(config.credits, config.max_frame_bytes);
    send(&mut stream, &deadline, &RdmaAccept { info: own.clone(), server_proof })?;
    receive(&mut stream, &deadline, FrameKind::Heartbeat)?;
    pending(endpoint, stream, &own, &peer, releases, doorbell, config)
}

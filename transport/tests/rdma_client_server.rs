//! The request–response layer over the RDMA driver: a glommio `ServerThread` listening for RDMA
//! and tokio `Client`s connecting with `rdma://` and `auto://`. Skips without a device (fails
//! under SLUICE_IN_RDMA_VM=1), like the driver tests.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sluice_transport::frame::{Frame, OutFrame};
use sluice_transport::messages::{Echo, EchoReply, ErrorReply};
use sluice_transport::rdma::test_support::{device_or_skip, server_addr};
use sluice_transport::server::ListenOn;
use sluice_transport::{Client, Handler, RdmaPollMode, ServerInfo, ServerThread, TransportConfig, TransportKind};

/// The server answers Echo itself; every other kind is refused.
struct EchoOnly;

impl Handler for EchoOnly {
    async fn handle(&self, _request: Frame) -> Result<OutFrame, ErrorReply> {
        Err(ErrorReply { code: 2201, message: "echo only".into() })
    }
}

fn server(listen: ListenOn) -> ServerThread {
    server_with(listen, TransportConfig::default())
}

fn server_with(listen: ListenOn, config: TransportConfig) -> ServerThread {
    let info = ServerInfo { name: "rdma-test".into(), ..Default::default() };
    ServerThread::spawn(listen, config, info, || EchoOnly, None).expect("server thread")
}

fn config_polling(mode: RdmaPollMode) -> TransportConfig {
    let mut config = TransportConfig::default();
    config.rdma.poll_mode = mode;
    config
}

async fn echo(client: &Client, payload: &[u8]) {
    let reply = client.call(&Echo { payload }).await.expect("echo call");
    let reply = reply.access::<EchoReply>().expect("an EchoReply");
    assert!(reply.payload[..] == *payload, "{} bytes came back intact", payload.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rdma_client_calls_an_rdma_server_with_small_and_large_bodies_pipelined() {
    if !device_or_skip("rdma_client_calls_an_rdma_server_with_small_and_large_bodies_pipelined") {
        return;
    }
    // Both places a poller can run: tasks on the runtimes (the default), and a thread per link.
    for mode in [RdmaPollMode::Runtime, RdmaPollMode::Thread] {
        small_and_large_bodies_pipelined(config_polling(mode)).await;
    }
}

async fn small_and_large_bodies_pipelined(config: TransportConfig) {
    let server = server_with(ListenOn { tcp: None, rdma: Some(server_addr()) }, config.clone());
    let addr: SocketAddr = server.rdma_addr.expect("RDMA address");
    let client = Client::connect(&format!("rdma://{addr}"), config, "t").await.expect("connect");
    assert_eq!(client.transport(), TransportKind::Rdma);
    for len in [0usize, 64, 8000, 100_000, 1 << 20, 16 << 20, 32 << 20] {
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        echo(&client, &payload).await;
    }
    // More calls in flight than fit one credit window's worth of receives at once.
    let calls = (0..3000u32).map(|i| {
        let client = client.clone();
        async move {
            let payload = i.to_le_bytes().repeat(1 + (i as usize % 100));
            echo(&client, &payload).await;
        }
    });
    futures::future::join_all(calls).await;
}

/// Pollers running as tasks park when idle (the client's on its tokio reactor, the server's
/// through its waiter thread) and must wake for the next call; and a client that goes away
/// must end the server's link, not leave its task polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_pollers_wake_from_parking_and_a_dropped_client_ends_the_servers_link() {
    if !device_or_skip("runtime_pollers_wake_from_parking_and_a_dropped_client_ends_the_servers_link") {
        return;
    }
    let mut config = config_polling(RdmaPollMode::Runtime);
    // Park after a few idle microseconds, so the pauses below are spent parked.
    config.rdma.busy_poll_us = 10;
    config.rdma.busy_poll_max_us = 10;
    let server = server_with(ListenOn { tcp: None, rdma: Some(server_addr()) }, config.clone());
    let addr: SocketAddr = server.rdma_addr.expect("RDMA address");
    let client = Client::connect(&format!("rdma://{addr}"), config, "t").await.expect("connect");
    for round in 0..5u8 {
        echo(&client, &[round; 100]).await;
        echo(&client, &vec![round; 20_000]).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(server.stats.connections_open.load(Ordering::Relaxed), 1);
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.stats.connections_open.load(Ordering::Relaxed) != 0 {
        assert!(Instant::now() < deadline, "the server still holds the link 20 s after its client dropped it");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_picks_rdma_when_the_server_offers_it_and_a_device_exists() {
    if !device_or_skip("auto_picks_rdma_when_the_server_offers_it_and_a_device_exists") {
        return;
    }
    let server = server(ListenOn { tcp: Some(server_addr()), rdma: Some(server_addr()) });
    let client =
        Client::connect(&format!("auto://{}", server.addr), TransportConfig::default(), "t").await.expect("connect");
    assert_eq!(client.transport(), TransportKind::Rdma);
    echo(&client, b"auto over rdma").await;
}

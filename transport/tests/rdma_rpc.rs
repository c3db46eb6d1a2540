//! The request–response layer over RDMA: a tokio `Client` and a glommio `ServerThread`, as
//! the proxy and the broker use them. Needs an RDMA device (soft-RoCE counts): without one
//! each test prints `skipped: no RDMA device` and passes, except under SLUICE_IN_RDMA_VM=1
//! (the CI guest), where a missing device fails.

use std::net::SocketAddr;

use sluice_transport::messages::{Echo, EchoReply, StatsRequest};
use sluice_transport::{BuiltinsOnly, Client, ListenOn, ServerInfo, ServerThread, TransportConfig, TransportKind};

fn rdma_ready() -> bool {
    if sluice_transport::rdma::device_present() {
        return true;
    }
    assert!(
        std::env::var("SLUICE_IN_RDMA_VM").as_deref() != Ok("1"),
        "SLUICE_IN_RDMA_VM=1 but no RDMA device is present"
    );
    println!("skipped: no RDMA device");
    false
}

fn server_ip() -> String {
    std::env::var("SLUICE_RDMA_SERVER_ADDR").unwrap_or_else(|_| "127.0.0.1".into())
}

fn spawn(listen: ListenOn) -> ServerThread {
    ServerThread::spawn(
        listen,
        TransportConfig::default(),
        ServerInfo { name: "rdma-test".into(), ..Default::default() },
        || BuiltinsOnly,
        None,
    )
    .expect("server")
}

fn rdma_server() -> ServerThread {
    let addr: SocketAddr = format!("{}:0", server_ip()).parse().unwrap();
    spawn(ListenOn { tcp: None, rdma: Some(addr) })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_small_frames_over_rdma() {
    if !rdma_ready() {
        return;
    }
    let server = rdma_server();
    let client = Client::connect(&format!("rdma://{}", server.addr), TransportConfig::default(), "t").await.unwrap();
    assert_eq!(client.transport(), TransportKind::Rdma);
    let calls: Vec<_> = (0..1000u32)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let payload = i.to_le_bytes().repeat(1 + (i % 50) as usize);
                let reply = client.call(&Echo { payload: &payload }).await.unwrap();
                assert_eq!(&reply.access::<EchoReply>().unwrap().payload[..], &payload[..]);
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
    let err = client.call(&StatsRequest {}).await.unwrap_err();
    assert_eq!(err.code(), sluice_transport::error::remote_code::NOT_SUPPORTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_and_thirty_two_mib_bodies_over_rdma() {
    if !rdma_ready() {
        return;
    }
    let server = rdma_server();
    let client = Client::connect(&format!("rdma://{}", server.addr), TransportConfig::default(), "t").await.unwrap();
    for size in [1usize << 20, 32 << 20] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        let reply = client.call(&Echo { payload: &payload }).await.unwrap();
        assert!(reply.access::<EchoReply>().unwrap().payload[..] == payload[..], "{size} bytes intact");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_moves_to_rdma_when_the_server_offers_it() {
    if !rdma_ready() {
        return;
    }
    let ip = server_ip();
    let server = spawn(ListenOn {
        tcp: Some(format!("{ip}:0").parse().unwrap()),
        rdma: Some(format!("{ip}:0").parse().unwrap()),
    });
    let client = Client::connect(&format!("auto://{}", server.addr), TransportConfig::default(), "t").await.unwrap();
    assert_eq!(client.transport(), TransportKind::Rdma);
    client.call(&Echo { payload: b"auto" }).await.unwrap();
    let tcp = Client::connect(&format!("tcp://{}", server.addr), TransportConfig::default(), "t").await.unwrap();
    assert_eq!(tcp.transport(), TransportKind::Tcp);
}

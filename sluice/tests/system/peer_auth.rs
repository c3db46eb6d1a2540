//! The broker's transport port serves only peers that prove the cluster's secret
//! (`[transport] secret_file`): a proxy with the secret works end to end; a proxy without it or
//! with another one fails to start with the reason; a raw peer whose first frame is not a Hello
//! gets error 2204 and a closed connection; and a broker reachable from other hosts will not
//! start without a secret.

use std::io::Write;
use std::path::Path;

use sluice_transport::blocking::{read_frame, write_frame};
use sluice_transport::error::remote_code::UNAUTHENTICATED;
use sluice_transport::messages::{ErrorReply, FrameKind, Heartbeat};
use sluice_transport::OutFrame;

use crate::common::{cli, free_port, proxy_config, Broker, BrokerSetup, Proxy};

fn secret_file(dir: &Path, name: &str, secret: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).expect("write the secret file");
    format!("[transport]\nsecret_file = {:?}\n", path.to_str().expect("a UTF-8 path"))
}

/// Runs `sluice proxy` with this config; it must fail to start. Returns its error output.
async fn proxy_refused(dir: &Path, name: &str, brokers: &[String], extra: &str) -> String {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, proxy_config(name, brokers, extra)).expect("write the proxy config");
    let (ok, stdout, stderr) = cli(&["proxy", "--config", path.to_str().expect("a UTF-8 path")]).await;
    assert!(!ok, "proxy {name} started against a broker that should refuse it\n{stdout}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_with_a_secret_serves_only_proxies_that_prove_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let right = secret_file(dir.path(), "right.secret", "the-cluster-secret-0123456789");
    let wrong = secret_file(dir.path(), "wrong.secret", "another-secret-9876543210");
    let setup = BrokerSetup { extra_config: &right, ..BrokerSetup::default() };
    let mut broker = Broker::start_with("secret-broker", 2, setup).await;
    let brokers = [broker.address()];

    let proxy = Proxy::start_with("proven-proxy", &brokers, &right).await;
    let endpoint = proxy.endpoint();
    let (ok, out, err) = cli(&["topic", "create", "sealed", "--type", "normal", "--endpoint", &endpoint]).await;
    assert!(ok, "topic create through the proven proxy\n{out}\n{err}");
    let (ok, out, err) = cli(&["send", "--topic", "sealed", "--endpoint", &endpoint, "inside"]).await;
    assert!(ok, "send through the proven proxy\n{out}\n{err}");

    let e = proxy_refused(dir.path(), "no-secret-proxy", &brokers, "").await;
    assert!(e.contains("2204") && e.contains("requires the transport secret"), "{e}");
    let e = proxy_refused(dir.path(), "wrong-secret-proxy", &brokers, &wrong).await;
    assert!(e.contains("2204") && e.contains("does not match"), "{e}");

    // A raw peer that skips Hello: refused with 2204, then the connection closes.
    let mut stream = std::net::TcpStream::connect(broker.address()).expect("connect to the broker");
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("read timeout");
    let frame = OutFrame::encode(1, &Heartbeat { sent_at_us: 1 }, 1 << 20).expect("encode");
    write_frame(&mut stream, &frame).expect("send a heartbeat first");
    let reply = read_frame(&mut stream, 1 << 20).expect("an answer before the close");
    assert_eq!(reply.header().kind, FrameKind::Error as u16);
    let error = reply.access::<ErrorReply>().expect("an error reply");
    assert_eq!(error.code.to_native(), UNAUTHENTICATED, "{}", error.message);
    assert!(error.message.contains("must be Hello"), "{}", error.message);
    let _ = stream.write_all(&[0; 64]);
    assert!(read_frame(&mut stream, 1 << 20).is_err(), "the connection stayed open after the refusal");

    let logs = broker.process.logs();
    assert!(logs.contains("refused a connection that did not prove the transport secret"), "{logs}");
    // The proven proxy is still served.
    let (ok, out, err) =
        cli(&["consume", "--topic", "sealed", "--group", "g", "--count", "1", "--json", "--endpoint", &endpoint]).await;
    assert!(ok && out.contains("inside"), "consume through the proven proxy after the refusals\n{out}\n{err}");
    assert!(broker.process.is_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_reachable_from_other_hosts_needs_a_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("open.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &config,
        format!("[broker]\nlisten = \"0.0.0.0:{}\"\ndata_dir = {:?}\nshards = 1\nmetrics = false\n", free_port(), data),
    )
    .expect("write the broker config");
    let (ok, _, err) = cli(&["broker", "--config", config.to_str().expect("a UTF-8 path")]).await;
    assert!(!ok, "a broker on 0.0.0.0 started without a transport secret");
    assert!(err.contains("can be reached from other hosts") && err.contains("secret_file"), "{err}");
}

/// `[transport] rdma_poll` takes "runtime" or "thread"; anything else stops the process at
/// start with the choices named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_rdma_poll_mode_is_refused_at_start_with_the_choices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let brokers = [format!("127.0.0.1:{}", free_port())];
    let e = proxy_refused(dir.path(), "busy-poll-proxy", &brokers, "[transport]\nrdma_poll = \"busy\"\n").await;
    assert!(e.contains("rdma_poll") && e.contains("\"runtime\" or \"thread\""), "{e}");
}

/// The RDMA busy-poll budget is checked at start: its base may not exceed its ceiling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_poll_budget_above_its_ceiling_is_refused_at_start_with_the_rule() {
    let dir = tempfile::tempdir().expect("tempdir");
    let brokers = [format!("127.0.0.1:{}", free_port())];
    let settings = "[transport]\nrdma_busy_poll_us = 500\nrdma_busy_poll_max_us = 100\n";
    let e = proxy_refused(dir.path(), "spin-proxy", &brokers, settings).await;
    assert!(e.contains("busy_poll_us <= busy_poll_max_us"), "{e}");
}

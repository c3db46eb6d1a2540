//! scripts/ports.sh, the helper the benchmark scripts use to pick ports for the processes they
//! start, run by bash.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ports.sh")
}

fn run(commands: &str) -> std::process::Output {
    Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail; source '{}'; {commands}", script().display()))
        .output()
        .expect("bash runs")
}

fn ephemeral_low() -> u16 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    range.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn a_port_span_is_free_end_to_end_and_below_the_ephemeral_range() {
    const SPAN: u16 = 4;
    for _ in 0..20 {
        let out = run(&format!("free_port_span {SPAN}"));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let base: u16 = String::from_utf8(out.stdout).unwrap().trim().parse().unwrap();
        assert!(
            base >= 10_000 && base + SPAN <= ephemeral_low(),
            "span {base}..{} overlaps the ephemeral range",
            base + SPAN
        );
        // Every port of the span binds (a broker's shard i listens on base + i).
        let held: Vec<TcpListener> = (base..base + SPAN)
            .map(|port| TcpListener::bind(("127.0.0.1", port)).expect("port in the span is free"))
            .collect();
        assert_eq!(held.len(), usize::from(SPAN));
    }
}

#[test]
fn a_span_that_cannot_fit_below_the_ephemeral_range_is_refused_with_a_reason() {
    let out = run("free_port_span 70000");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no room for 70000 ports"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

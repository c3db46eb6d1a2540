//! `sluice stats --watch` in a real terminal (tmux): the backlog and lag columns rise while a
//! consumer is paused and fall back after it resumes, redrawn in place.

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// A tmux server of the test's own (`-L`), so a user's sessions are never touched.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run tmux (install it: scripts/setup.sh): {e}"));
        assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "watch"])
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-L", &self.socket, "kill-server"]).output();
    }
}

/// The group's row on the screen: (ready, inflight, backlog, lag seconds), if drawn.
fn row(screen: &str, group: &str) -> Option<(u64, u64, u64, f64)> {
    let line = screen.lines().find(|l| l.split_whitespace().next() == Some(group))?;
    let cells: Vec<&str> = line.split_whitespace().collect();
    let number = |i: usize| cells.get(i)?.parse::<u64>().ok();
    Some((number(2)?, number(3)?, number(4)?, cells.get(5)?.parse().ok()?))
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_watch_shows_the_lag_rising_while_a_consumer_pauses_and_falling_after_it_resumes() {
    let local = Local::start().await;
    create_topic(local.grpc, "tasks", 2).await;
    create_group(local.grpc, "gpu", 16, false).await;
    let mut consumer = messaging(local.grpc).await;
    // The group's position starts here, before anything is sent.
    receive(&mut consumer, "tasks", "gpu", 32, SECS(30), SECS(1)).await;

    let tmux = Tmux { socket: format!("sluice-test-{}", std::process::id()) };
    let command =
        format!("{} stats --watch --group gpu --interval-secs 0.5 --endpoint {}", sluice_bin(), local.endpoint());
    tmux.run(&["new-session", "-d", "-s", "watch", "-x", "160", "-y", "30", &command]);

    // The consumer is paused while the producer sends 5 messages every 200 ms.
    let mut producer = messaging(local.grpc).await;
    let mut backlog = Vec::new();
    let mut sent = 0;
    let started = Instant::now();
    while started.elapsed() < SECS(4) {
        send_ok(&mut producer, (0..5).map(|i| message("tasks", format!("task {i}").into_bytes())).collect()).await;
        sent += 5;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some((_, _, b, _)) = row(&tmux.screen(), "gpu") {
            backlog.push(b);
        }
    }
    // The screen catches up with everything sent, and the oldest message keeps ageing.
    let deadline = Instant::now() + SECS(15);
    let mut shown = None;
    while Instant::now() < deadline {
        shown = row(&tmux.screen(), "gpu");
        if shown.is_some_and(|(_, _, b, l)| b == sent && l >= 2.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let screen = tmux.screen();
    let (ready, inflight, shown_backlog, _) = shown.unwrap_or_else(|| panic!("no row for the group: {screen}"));
    assert_eq!((ready, inflight, shown_backlog), (sent, 0, sent), "all {sent} sent are the lag: {screen}");
    assert!(backlog.windows(2).all(|w| w[0] <= w[1]), "the backlog only grows while paused: {backlog:?}");
    assert!(backlog.len() >= 2 && backlog.first() < backlog.last(), "it rose while sending: {backlog:?}");
    assert_eq!(screen.matches("GROUP").count(), 1, "redrawn in place, not scrolled: {screen}");

    // The consumer resumes and drains: the screen comes down to nothing left.
    let deadline = Instant::now() + SECS(30);
    let mut drained = None;
    while Instant::now() < deadline {
        let r = receive(&mut consumer, "tasks", "gpu", 32, SECS(30), SECS(1)).await;
        ack_all(&mut consumer, "tasks", "gpu", &r.messages).await;
        if r.messages.is_empty() {
            if let Some((ready, inflight, b, l)) = row(&tmux.screen(), "gpu") {
                if b == 0 {
                    drained = Some((ready, inflight, l));
                    break;
                }
            }
        }
    }
    let (ready, inflight, lag) = drained.unwrap_or_else(|| panic!("the backlog never fell to 0: {}", tmux.screen()));
    assert_eq!((ready, inflight), (0, 0));
    assert_eq!(lag, 0.0, "nothing unacked has no age");
}

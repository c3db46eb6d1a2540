//! The sluice-bench binary end to end, against the raw-TCP floor it hosts itself and against
//! endpoints where nothing listens. No timing is asserted: only what the files and exit
//! codes must hold.

use std::path::Path;
use std::process::{Command, Output};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice-bench")).args(args).output().expect("sluice-bench runs")
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("results written")).expect("valid JSON")
}

#[test]
fn a_raw_tcp_run_writes_complete_results_a_summary_and_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("raw.json");
    let suite = dir.path().join("suite.toml");
    std::fs::write(
        &suite,
        "name = \"t\"\n[[workload]]\nname = \"floor\"\nsize_bytes = 64\nrate_per_sec = 400\nconsumers = 0\n\
         duration_secs = 1\nwarmup_secs = 1\n",
    )
    .unwrap();
    let run = bench(&["suite", suite.to_str().unwrap(), "--target", "raw-tcp", "--out", out.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let results = json(&out);
    assert_eq!(results["schema"], "sluice-bench/1");
    let r = &results["results"][0];
    assert_eq!(r["target"], "raw-tcp");
    // 400 msg/s for 1 s of warm-up and 1 s measured: 800 sent and echoed, 400 recorded.
    assert_eq!(r["counts"]["scheduled"], 800);
    assert_eq!(r["counts"]["acked"], 800);
    assert_eq!(r["send_ack"]["count"], 400);
    assert!(r["send_receive"].is_null(), "a ping-pong has no consumer side");
    assert_eq!(r["durability"]["level"], serde_json::Value::Null);
    let table = String::from_utf8_lossy(&run.stdout);
    assert!(table.contains("floor") && table.contains("raw-tcp"), "{table}");

    let check = bench(&["check", out.to_str().unwrap(), "--suite", suite.to_str().unwrap(), "--kinds", "raw-tcp"]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    // The same file checked for a target that never ran is incomplete.
    let incomplete =
        bench(&["check", out.to_str().unwrap(), "--suite", suite.to_str().unwrap(), "--kinds", "raw-tcp,redis"]);
    assert!(!incomplete.status.success());
    assert!(String::from_utf8_lossy(&incomplete.stderr).contains("floor on redis: no result"));

    let html = dir.path().join("report.html");
    let report = bench(&["report", out.to_str().unwrap(), out.to_str().unwrap(), "--out", html.to_str().unwrap()]);
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let html = std::fs::read_to_string(html).unwrap();
    assert!(html.contains("<svg") && html.contains("raw-tcp"));
}

#[test]
fn unreachable_targets_are_recorded_as_failures_with_their_code() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("down.json");
    // Port 1 on loopback: nothing listens there.
    let run = bench(&[
        "run",
        "--duration-secs",
        "1",
        "--warmup-secs",
        "0",
        "--target",
        "redis=127.0.0.1:1",
        "--target",
        "sluice-grpc=127.0.0.1:1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!run.status.success());
    let results = json(&out);
    let failures = results["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 2);
    assert!(failures.iter().all(|f| f["code"] == 6004), "{failures:?}");
    assert!(failures[0]["error"].as_str().unwrap().contains("is it running?"));
}

#[test]
fn bad_workloads_and_files_are_refused_before_anything_runs() {
    let uneven = bench(&["run", "--consumers", "3", "--topics", "2", "--target", "raw-tcp"]);
    assert!(!uneven.status.success());
    let stderr = String::from_utf8_lossy(&uneven.stderr);
    assert!(stderr.contains("6001") && stderr.contains("multiple of the topic count"), "{stderr}");

    let sessionless = bench(&["run", "--topic-kind", "lite", "--target", "raw-tcp"]);
    assert!(!sessionless.status.success());
    let stderr = String::from_utf8_lossy(&sessionless.stderr);
    assert!(stderr.contains("6001") && stderr.contains("needs sessions"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    // A lite workload on a target without lite topics fails with the targets that have them.
    let out = dir.path().join("lite.json");
    let lite = ["run", "--topic-kind", "lite", "--sessions", "4", "--duration-secs", "1", "--target", "raw-tcp"];
    let run = bench(&[&lite[..], &["--out", out.to_str().unwrap()]].concat());
    assert!(!run.status.success());
    let failures = json(&out)["failures"].as_array().unwrap().clone();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0]["code"], 6003);
    assert!(failures[0]["error"].as_str().unwrap().contains("sluice-broker, sluice-grpc and redis"), "{failures:?}");

    let not_results = dir.path().join("x.json");
    std::fs::write(&not_results, "{\"hello\": 1}").unwrap();
    let summary = bench(&["summary", not_results.to_str().unwrap()]);
    assert!(!summary.status.success());
    assert!(String::from_utf8_lossy(&summary.stderr).contains("not a sluice-bench/1 results file"));
}

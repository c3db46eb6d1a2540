//! The Grafana dashboard in dashboards/ is built on the metrics Sluice publishes: every
//! metric its queries name is one a crate registers, and every histogram it takes quantiles
//! of has buckets.

use std::collections::BTreeSet;

const DASHBOARD: &str = include_str!("../../../dashboards/sluice-grafana.json");

/// Every `rocketmq_…` or `sluice_…` name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (start, _) in expr.match_indices(['r', 's']) {
        let rest = &expr[start..];
        let preceded_by_word = expr[..start].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_');
        if preceded_by_word || !(rest.starts_with("rocketmq_") || rest.starts_with("sluice_")) {
            continue;
        }
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
        names.push(rest[..end].to_string());
    }
    names
}

#[test]
fn every_dashboard_query_names_a_published_metric() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let published: BTreeSet<&str> = sluice_engine::metrics::NAMES
        .iter()
        .chain(sluice_proxy::metrics::NAMES)
        .chain(sluice_transport::metrics::NAMES)
        .copied()
        .collect();
    let histograms: BTreeSet<&str> = sluice_engine::metrics::BUCKETS
        .iter()
        .chain(sluice_proxy::metrics::BUCKETS)
        .chain(sluice_transport::metrics::BUCKETS)
        .map(|(name, _)| *name)
        .collect();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "an overview worth opening");
    let mut used = BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} queries something", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            assert!(expr.contains("cluster=\"$cluster\""), "every query follows the cluster picker: {expr}");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "no metric in {expr}");
            for name in names {
                // A histogram's series: NAME_bucket, NAME_sum and NAME_count.
                let histogram = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s));
                match histogram {
                    Some(histogram) => {
                        assert!(histograms.contains(histogram), "{histogram} has no buckets, so no {name}: {expr}")
                    }
                    None => assert!(published.contains(name.as_str()), "{name} is not published: {expr}"),
                }
                used.insert(histogram.unwrap_or(&name).to_string());
            }
        }
    }
    let unused: Vec<&&str> = published.iter().filter(|n| !used.contains(**n)).collect();
    assert!(unused.is_empty(), "published but on no panel: {unused:?}");
}

#[test]
fn metric_names_are_found_in_expressions() {
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(rocketmq_rpc_latency_bucket{a=\"x\"}[1m]))) / sluice_x",
    );
    assert_eq!(names, vec!["rocketmq_rpc_latency_bucket", "sluice_x"]);
}

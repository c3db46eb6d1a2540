//! The HTML report: percentile plots (SVG, drawn with plotters) of every run in one or more
//! results files, so runs can be compared, and the summary table beneath.

use plotters::prelude::*;

use crate::results::{summary_table, ResultsFile};
use crate::saturation::P99_LIMIT_US;
use crate::stats::SPECTRUM_QUANTILES;

const CHART_WIDTH_PX: u32 = 960;
const CHART_HEIGHT_PX: u32 = 460;

fn quantile_label(quantile: f64) -> String {
    if quantile >= 1.0 {
        "max".to_string()
    } else {
        let percent = quantile * 100.0;
        let text = format!("{percent:.3}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// One line of a chart: a name and its (quantile, µs) points.
struct Line {
    name: String,
    points: Vec<(f64, f64)>,
}

fn chart_svg(title: &str, lines: &[Line]) -> Result<String, String> {
    let mut svg = String::new();
    let values = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)).filter(|v| *v > 0.0);
    let (min, max) = values.fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (min, max) = if max <= 0.0 { (1.0, 10.0) } else { (min / 1.5, max * 1.5) };
    {
        let root = SVGBackend::with_string(&mut svg, (CHART_WIDTH_PX, CHART_HEIGHT_PX)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let last = (SPECTRUM_QUANTILES.len() - 1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.2f64..last + 0.2, (min..max).log_scale())
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_labels(SPECTRUM_QUANTILES.len())
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() > 0.01 || i < 0.0 || i > last {
                    return String::new();
                }
                quantile_label(SPECTRUM_QUANTILES[i as usize])
            })
            .x_desc("percentile")
            .y_desc("latency µs (log)")
            .draw()
            .map_err(|e| e.to_string())?;
        let placed = lines.iter().map(|line| {
            let points = line.points.iter().enumerate().map(|(x, p)| (x as f64, p.1.max(min))).collect();
            (line.name.clone(), points)
        });
        draw_lines(&mut chart, placed.collect())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// Draws each named line (its points already in the chart's coordinates) in its own colour,
/// with a marker per point, then the legend.
fn draw_lines<'a, DB: DrawingBackend + 'a, X: Ranged<ValueType = f64>, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    lines: Vec<(String, Vec<(f64, f64)>)>,
) -> Result<(), String> {
    for (i, (name, points)) in lines.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled()))).map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

/// p99 against offered rate, one line per target and run, with the limit a step must stay
/// within to count as kept up. `lines` hold (offered msgs/s, p99 µs) points.
fn rate_chart_svg(title: &str, lines: &[Line]) -> Result<String, String> {
    let mut svg = String::new();
    let points = || lines.iter().flat_map(|l| l.points.iter());
    let (rate_min, rate_max) = points().fold((f64::MAX, 0f64), |(lo, hi), p| (lo.min(p.0), hi.max(p.0)));
    let (p99_min, p99_max) = points()
        .map(|p| p.1)
        .filter(|v| *v > 0.0)
        .fold((P99_LIMIT_US, P99_LIMIT_US), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (rate_min, rate_max) = if rate_max <= 0.0 { (1.0, 10.0) } else { (rate_min / 1.3, rate_max * 1.3) };
    let (p99_min, p99_max) = (p99_min / 1.5, p99_max * 1.5);
    {
        let root = SVGBackend::with_string(&mut svg, (CHART_WIDTH_PX, CHART_HEIGHT_PX)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((rate_min..rate_max).log_scale(), (p99_min..p99_max).log_scale())
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("offered msgs/s (log)")
            .y_desc("p99 µs (log)")
            .draw()
            .map_err(|e| e.to_string())?;
        let limit = [(rate_min, P99_LIMIT_US), (rate_max, P99_LIMIT_US)];
        chart
            .draw_series(LineSeries::new(limit, RED.stroke_width(1)))
            .map_err(|e| e.to_string())?
            .label(format!("limit: p99 {} ms", P99_LIMIT_US / 1000.0))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.stroke_width(1)));
        let placed =
            lines.iter().map(|line| (line.name.clone(), line.points.iter().map(|p| (p.0, p.1.max(p99_min))).collect()));
        draw_lines(&mut chart, placed.collect())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// The name a run goes by in chart legends.
fn run_name(file: &ResultsFile) -> String {
    if file.label.is_empty() {
        file.durability.to_string()
    } else {
        format!("{} {}", file.label, file.durability)
    }
}

/// One p99-against-rate chart per saturation workload in `files`.
fn saturation_charts(files: &[ResultsFile]) -> Result<String, String> {
    let mut names: Vec<&str> = Vec::new();
    for s in files.iter().flat_map(|f| &f.saturation) {
        if !names.contains(&s.workload.name.as_str()) {
            names.push(&s.workload.name);
        }
    }
    let mut body = String::new();
    for name in names {
        let mut lines = Vec::new();
        for file in files {
            for s in file.saturation.iter().filter(|s| s.workload.name == name) {
                let points = s
                    .steps
                    .iter()
                    .map(|step| {
                        let latency = step.send_receive.as_ref().unwrap_or(&step.send_ack);
                        (step.workload.rate_per_sec as f64, latency.p99_us)
                    })
                    .collect();
                lines.push(Line { name: format!("{} · {}", s.target, run_name(file)), points });
            }
        }
        let what =
            if files.iter().flat_map(|f| &f.saturation).any(|s| s.workload.name == name && s.workload.consumers == 0) {
                "send → ack"
            } else {
                "send → receive"
            };
        body.push_str(&rate_chart_svg(&format!("{name}: {what} p99 by offered rate (saturation)"), &lines)?);
        body.push('\n');
    }
    Ok(body)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Builds the report for `files` (each a run; several are overlaid for comparison).
pub fn html(files: &[ResultsFile]) -> Result<String, String> {
    let mut workloads: Vec<String> = Vec::new();
    for r in files.iter().flat_map(|f| &f.results) {
        if !workloads.contains(&r.workload.name) {
            workloads.push(r.workload.name.clone());
        }
    }
    let mut body = String::new();
    for workload in &workloads {
        for what in ["send → ack", "send → receive"] {
            let mut lines = Vec::new();
            for file in files {
                let run = run_name(file);
                for r in file.results.iter().filter(|r| &r.workload.name == workload) {
                    let summary = if what == "send → ack" { Some(&r.send_ack) } else { r.send_receive.as_ref() };
                    if let Some(summary) = summary {
                        lines
                            .push(Line { name: format!("{} · {run}", r.target), points: summary.spectrum_us.clone() });
                    }
                }
            }
            if lines.is_empty() {
                continue;
            }
            body.push_str(&chart_svg(&format!("{workload}: {what}, latency by percentile"), &lines)?);
            body.push('\n');
        }
    }
    body.push_str(&saturation_charts(files)?);
    let hosts: Vec<String> = files
        .iter()
        .map(|f| {
            format!(
                "{} · suite {} · durability {} · {} · host {} ({} CPUs, Linux {}){}",
                escape(&f.label),
                escape(&f.suite),
                f.durability,
                f.started_unix_ms,
                escape(&f.host.hostname),
                f.host.cpus,
                escape(&f.host.kernel),
                if f.short { " · short mode" } else { "" }
            )
        })
        .collect();
    Ok(format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>sluice-bench report</title>\n\
         <style>body{{font-family:sans-serif;margin:24px}} pre{{font-size:12px;background:#f6f6f6;padding:12px}}</style>\n\
         </head><body>\n<h1>sluice-bench report</h1>\n<ul>{}</ul>\n\
         <p>Latency is measured from each message's due time in an open-loop schedule (coordinated omission corrected). \
         Lines: one per target and run.</p>\n{}\n<h2>Summary</h2>\n<pre>{}</pre>\n</body></html>\n",
        hosts.iter().map(|h| format!("<li>{h}</li>")).collect::<String>(),
        body,
        escape(&summary_table(files)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_labels_read_as_percentiles() {
        let labels: Vec<String> = SPECTRUM_QUANTILES.iter().map(|q| quantile_label(*q)).collect();
        assert_eq!(labels, ["50", "75", "90", "95", "99", "99.5", "99.9", "99.95", "99.99", "99.999", "max"]);
    }

    #[test]
    fn charts_render_as_svg_with_one_line_per_series() {
        let points: Vec<(f64, f64)> =
            SPECTRUM_QUANTILES.iter().enumerate().map(|(i, q)| (*q, 100.0 * (i + 1) as f64)).collect();
        let svg = chart_svg(
            "w: send → ack",
            &[Line { name: "redis".into(), points: points.clone() }, Line { name: "nats".into(), points }],
        )
        .unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("redis") && svg.contains("nats"));
        assert!(svg.matches("<polyline").count() >= 2, "one polyline per series");
    }

    #[test]
    fn saturation_charts_plot_p99_against_the_offered_rate() {
        use crate::results::testing::{file, result, summary};
        use crate::saturation::Saturation;
        use crate::targets::TargetKind;
        let suite = crate::workload::Suite::parse(
            "name = \"s\"\n[[workload]]\nname = \"sat\"\nstep_rates_per_sec = [1000, 2000]\n",
            "s",
        )
        .unwrap();
        let w = &suite.workloads[0];
        let mut results = file(vec![]);
        for kind in [TargetKind::Redis, TargetKind::SluiceGrpc] {
            let steps =
                w.step_rates_per_sec.iter().map(|r| result(&w.at_rate(*r), kind, Some(summary(&[900])))).collect();
            let (target, sustained_per_sec) = (kind.name().to_string(), Some(2000));
            results.saturation.push(Saturation {
                workload: w.clone(),
                target,
                kind,
                steps,
                sustained_per_sec,
                stopped: None,
                error: None,
            });
        }
        let html = html(&[results]).unwrap();
        assert!(html.contains("sat: send → receive p99 by offered rate"));
        assert!(
            html.contains("redis · sync") && html.contains("sluice-grpc · sync") && html.contains("limit: p99 10 ms")
        );
        assert!(html.contains("sat (saturation)"), "the summary beneath holds the saturation table");
    }
}

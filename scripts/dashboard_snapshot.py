#!/usr/bin/env python3
"""The Grafana dashboard's own queries, run against a Prometheus that scraped a real Sluice.

Every panel of dashboards/sluice-grafana.json is queried over the run (`$cluster` filled in)
through Prometheus's HTTP API. Each panel must show data, except those named with
--may-be-empty; the table of panels and series is printed, and the exit status is 1 when a
panel is empty. With --png, the panels are also drawn where the dashboard places them.

Standard library only, except matplotlib for --png. Run by scripts/dashboard-snapshot.sh.
"""

import argparse
import json
import math
import re
import sys
import urllib.parse
import urllib.request

# Grafana's grid: 24 columns; a row unit is 30 px.
GRID_COLUMNS = 24
ROW_PX = 30
# Most series drawn per panel (the rest are counted, not drawn).
SERIES_MAX = 8


def query_range(prometheus, expr, start, end, step):
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as reply:
        body = json.load(reply)
    if body.get("status") != "success":
        raise RuntimeError(f"query failed: {expr}: {body}")
    return body["data"]["result"]


def legend(fmt, labels):
    if not fmt:
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def points(series):
    out = []
    for t, v in series["values"]:
        value = float(v)
        if math.isfinite(value):
            out.append((float(t), value))
    return out


def panel_series(args, panel):
    """(legend, [(t, v)]) of every series of every target of the panel."""
    drawn = []
    for target in panel.get("targets", []):
        expr = target["expr"].replace("$cluster", args.cluster)
        for series in query_range(args.prometheus, expr, args.start, args.end, args.step):
            values = points(series)
            if values:
                drawn.append((legend(target.get("legendFormat", ""), series["metric"]), values))
    return drawn


UNITS = {"ms": "ms", "s": "s", "bytes": "B", "Bps": "B/s", "short": ""}


def scaled(value, unit):
    if unit in ("bytes", "Bps"):
        for suffix, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if abs(value) >= size:
                return f"{value / size:.3g} {suffix}{'/s' if unit == 'Bps' else ''}"
        return f"{value:.3g} {UNITS[unit]}"
    if unit == "s" and 0 < abs(value) < 1:
        return f"{value * 1000:.3g} ms"
    if abs(value) >= 1000:
        return f"{value / 1000:.3g}k {UNITS.get(unit, '')}".rstrip()
    return f"{value:.3g} {UNITS.get(unit, '')}".rstrip()


def draw(args, dashboard, data):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    width_px = 1600
    height_px = rows * ROW_PX + 60
    fig = plt.figure(figsize=(width_px / 100, height_px / 100), dpi=100, facecolor="#111217")
    fig.suptitle(
        f"{dashboard.get('title', 'Sluice')} · cluster {args.cluster} · {args.caption}",
        color="#d8d9da", fontsize=13, x=0.01, ha="left", y=0.998,
    )
    top = 40 / height_px
    for panel in panels:
        g = panel["gridPos"]
        left = g["x"] / GRID_COLUMNS
        width = g["w"] / GRID_COLUMNS
        bottom = 1 - top - (g["y"] + g["h"]) * ROW_PX / height_px
        height = g["h"] * ROW_PX / height_px
        # Room inside the panel's cell for tick labels (left, bottom) and the title (top), in px.
        margin_left, margin_right, margin_top, margin_bottom = 70 / width_px, 12 / width_px, 28 / height_px, 36 / height_px
        ax = fig.add_axes([
            left + margin_left,
            bottom + margin_bottom,
            width - margin_left - margin_right,
            height - margin_top - margin_bottom,
        ])
        ax.set_facecolor("#181b1f")
        for side in ax.spines.values():
            side.set_color("#2c3235")
        ax.tick_params(colors="#9fa7b3", labelsize=7)
        ax.set_title(panel["title"], color="#d8d9da", fontsize=9, loc="left")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _, unit=unit: scaled(v, unit)))
        series = data[panel["title"]]
        if not series:
            ax.text(0.5, 0.5, "No data", color="#9fa7b3", ha="center", va="center", transform=ax.transAxes)
        for name, values in series[:SERIES_MAX]:
            t0 = float(args.start)
            ax.plot([(t - t0) for t, _ in values], [v for _, v in values], linewidth=1.2, label=name)
        if series:
            ax.legend(fontsize=6, loc="upper left", facecolor="#181b1f", edgecolor="#2c3235", labelcolor="#c7d0d9")
        ax.set_xlabel("seconds into the run", color="#9fa7b3", fontsize=7)
        ax.grid(color="#2c3235", linewidth=0.5)
    fig.savefig(args.png, facecolor=fig.get_facecolor())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--dashboard", default="dashboards/sluice-grafana.json")
    parser.add_argument("--cluster", default="DefaultCluster")
    parser.add_argument("--start", required=True, help="unix seconds")
    parser.add_argument("--end", required=True, help="unix seconds")
    parser.add_argument("--step", default="2")
    parser.add_argument("--may-be-empty", action="append", default=[], help="a panel title that may show no data")
    parser.add_argument("--png", help="also draw the panels into this PNG file")
    parser.add_argument("--caption", default="", help="what ran, for the PNG's title")
    args = parser.parse_args()

    with open(args.dashboard) as f:
        dashboard = json.load(f)
    data = {}
    empty = []
    print(f"{'panel':<70} {'series':>6}  data")
    for panel in dashboard["panels"]:
        series = panel_series(args, panel)
        data[panel["title"]] = series
        allowed = panel["title"] in args.may_be_empty
        if not series and not allowed:
            empty.append(panel["title"])
        state = "yes" if series else ("none (allowed)" if allowed else "NONE")
        print(f"{panel['title']:<70} {len(series):>6}  {state}")
    if args.png:
        draw(args, dashboard, data)
        print(f"drew {len(dashboard['panels'])} panels into {args.png}")
    if empty:
        print(f"dashboard: {len(empty)} panel(s) showed no data: {empty}", file=sys.stderr)
        return 1
    print(f"dashboard: every panel showed data ({len(dashboard['panels'])} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

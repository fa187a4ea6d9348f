#!/usr/bin/env python3
"""Plots of the proxy benchmark (tests/benches/proxy.rs), from the CSVs it writes.

    python3 tests/benches/plot_proxy.py CSV_DIR OUT_DIR

Writes OUT_DIR/relay-latency.png and OUT_DIR/switch-propagation.png, and prints one line per
PNG written: "FILE<TAB>caption". Exits with 3 when matplotlib is missing, so that the benchmark
can say so and go on without plots.
"""

import csv
import os
import sys
from collections import OrderedDict, defaultdict

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    sys.exit(3)


def read(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def relay_latency(csv_dir, out_dir):
    rows = read(os.path.join(csv_dir, "relay_latency.csv"))
    if not rows:
        return None
    series = OrderedDict()
    for r in rows:
        series.setdefault(r["method"], []).append(
            (float(r["lo_us"]), float(r["hi_us"]), int(r["count"]))
        )
    fig, (hist, ccdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    used = [(lo, hi) for bins in series.values() for lo, hi, c in bins if c > 0]
    if used:
        hist.set_xlim(min(lo for lo, _ in used) / 1e3 / 1.5, max(hi for _, hi in used) / 1e3 * 1.5)
    for method, bins in series.items():
        total = sum(c for _, _, c in bins) or 1
        xs, ys = [], []
        for lo, hi, c in bins:
            xs += [lo / 1e3, hi / 1e3]
            ys += [c / total, c / total]
        hist.plot(xs, ys, label=method)
        # Complementary CDF: the share of submits slower than x.
        left = total
        cx, cy = [], []
        for lo, hi, c in bins:
            left -= c
            if left <= 0:
                break
            cx.append(hi / 1e3)
            cy.append(left / total)
        ccdf.plot(cx, cy, label=method)
    hist.set_xscale("log")
    hist.set_xlabel("submit round trip (ms, log)")
    hist.set_ylabel("share of submits per bin")
    hist.set_title("Relay round trip distribution")
    hist.grid(True, which="both", alpha=0.3)
    hist.legend()
    ccdf.set_xscale("log")
    ccdf.set_yscale("log")
    ccdf.set_xlabel("submit round trip (ms, log)")
    ccdf.set_ylabel("share of submits slower (log)")
    ccdf.set_title("Tail (complementary CDF)")
    ccdf.grid(True, which="both", alpha=0.3)
    ccdf.legend()
    fig.tight_layout()
    name = "relay-latency.png"
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name, "Relay: submit round trip through the proxy, straight, and through a plain TCP relay"


def switch_propagation(csv_dir, out_dir):
    rows = read(os.path.join(csv_dir, "switch_propagation.csv"))
    if not rows:
        return None
    by_size = defaultdict(OrderedDict)
    calls = {}
    for r in rows:
        size, series = int(r["sessions"]), r["series"]
        by_size[size].setdefault(series, []).append((float(r["ms"]), int(r["switched"])))
        calls[(size, series)] = float(r["call_ms"])
    sizes = sorted(by_size)
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 4.8), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for series, points in by_size[size].items():
            xs = [0.0] + [ms for ms, _ in points]
            ys = [0] + [n for _, n in points]
            (line,) = ax.step(xs, ys, where="post", label=series)
            call = calls[(size, series)]
            ax.axvline(call, color=line.get_color(), linestyle=":", linewidth=1)
        ax.axhline(size, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("ms since the switch call started (dotted: the call returned)")
        ax.set_ylabel("sessions on the new coin")
        ax.set_title(f"{size:,} users switched at once")
        ax.set_xlim(left=0)
        ax.set_ylim(0, size * 1.05)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    name = "switch-propagation.png"
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name, "Switch propagation: sessions on the new coin over time, mass switches"


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    csv_dir, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    for plot in (relay_latency, switch_propagation):
        written = plot(csv_dir, out_dir)
        if written:
            print(f"{written[0]}\t{written[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Turn pytest-benchmark JSON into benchmarks/results/<device>.csv, a markdown table, a PNG of
speed-ups, and the README results section (never edited by hand)."""

import argparse
import csv
import json
import re
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# The kxops of this checkout (its version and the git rev go into every row), whichever kxops
# the interpreter would otherwise import.
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
# peer_p50: for time rows, the p50 of the peer's calls made alternately with this provider's
# (the speed-ups use it: both sides saw the same machine load).
# cpu: the CPU model; cpu_gemm: the engine of the fused ops' CPU GEMMs (csrc/gemm.h).
COLUMNS = ["op", "provider", "mode", "shape", "dtype", "metric", "unit", "p50", "p20", "p80",
           "peer_p50", "peer", "device", "cpu", "cpu_gemm", "torch", "kxops", "git_rev",
           "timestamp"]
NUMBERS = ("p50", "p20", "p80", "peer_p50")


def git_rev():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device):
    import torch

    if device == "cuda":
        return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
    return "cpu"


def rows_from(raw):
    import torch

    import kxops
    from benchmarks.harness import machine

    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    common = dict(torch=torch.__version__, kxops=kxops.__version__, git_rev=git_rev(),
                  timestamp=stamp)
    here = machine()  # for JSON written before the rows carried it
    for bench in raw["benchmarks"]:
        info = bench["extra_info"]
        # Per call: a CUDA round makes calls_per_round calls (benchmarks/harness.py).
        calls = info.get("calls_per_round", 1)
        times = np.asarray(bench["stats"].get("data") or [bench["stats"]["median"]]) * 1e3 / calls
        p20, p50, p80 = np.percentile(times, [20, 50, 80])
        base = dict(op=info["op"], provider=info["provider"], mode=info["mode"],
                    shape=info["shape"], dtype=info["dtype"], peer=info["peer"],
                    device=info["device"], cpu=info.get("cpu", here["cpu"]),
                    cpu_gemm=info.get("cpu_gemm", here["cpu_gemm"]), **common)
        peer_p50 = float(np.median(info["peer_ms"])) / calls if info.get("peer_ms") else None
        yield dict(base, metric="time", unit="ms", p50=p50, p20=p20, p80=p80,
                   peer_p50=peer_p50)
        if info.get("bytes"):
            # GB/s from the op's minimum bytes; p20 of time is p80 of bandwidth.
            gbps = [info["bytes"] / (t * 1e-3) / 1e9 for t in (p50, p80, p20)]
            yield dict(base, metric="bandwidth", unit="GB/s", p50=gbps[0], p20=gbps[1],
                       p80=gbps[2])
        if info.get("saved_bytes") is not None:
            mib = info["saved_bytes"] / 2**20
            yield dict(base, metric="saved_for_backward", unit="MiB", p50=mib, p20=mib,
                       p80=mib)
        if info.get("peak_bytes") is not None:
            mib = info["peak_bytes"] / 2**20
            yield dict(base, metric="peak_memory", unit="MiB", p50=mib, p20=mib, p80=mib)


# The tables in the README, per metric: how values are shown and compared with the op's peer.
TABLES = {
    "time": ("p50 ms; ×: speed-up over", lambda value, peer: f"{peer / value:.2f}×"),
    "saved_for_backward": ("MiB the forward keeps alive for backward, parameters excluded; %: of",
                           lambda value, peer: f"{100 * value / peer:.0f}%"),
    "peak_memory": ("peak MiB allocated by a full step; %: of",
                    lambda value, peer: f"{100 * value / peer:.0f}%"),
}


def peer_value(cell, provider, peer):
    """The peer's value to compare cell[provider] with: the one measured alternately with it
    where there is one, else the peer's own row (None if neither)."""
    row = cell.get(provider)
    if row is not None and row.get("peer_p50"):
        return row["peer_p50"]
    return cell[peer]["p50"] if peer in cell else None


def markdown(rows, peers):
    """One table per op and metric: the p50 per provider and its comparison with the peer."""
    lines = []
    for metric, (legend, compare) in TABLES.items():
        by_op = defaultdict(list)
        for r in rows:
            if r["metric"] == metric:
                by_op[(r["device"], r["op"])].append(r)
        for (device, op), op_rows in by_op.items():
            providers = list(dict.fromkeys(r["provider"] for r in op_rows))
            cases = list(dict.fromkeys((r["mode"], r["shape"], r["dtype"]) for r in op_rows))
            peer = peers[op]
            title = "" if metric == "time" else f" {metric}"
            lines += [f"**{op}**{title} on {device} ({legend} `{peer}`)", "",
                      "| mode | shape | dtype | " + " | ".join(providers) + " |",
                      "|---|---|---|" + "---|" * len(providers)]
            for case in cases:
                cell = {r["provider"]: r for r in op_rows
                        if (r["mode"], r["shape"], r["dtype"]) == case}
                entries = []
                for p in providers:
                    ref = peer_value(cell, p, peer)
                    entries.append("–" if p not in cell else f"{cell[p]['p50']:.3g}" if not ref
                                   else f"{cell[p]['p50']:.3g} ({compare(cell[p]['p50'], ref)})")
                lines.append(f"| {case[0]} | {case[1]} | {case[2]} | " + " | ".join(entries)
                             + " |")
            lines.append("")
    return "\n".join(lines)


def plot(rows, peers, device_label, path_for):
    """One PNG per op: speed-up over the op's peer per problem size (the mode that times a whole
    step: full, or the optimizer step). Returns {op: path}."""
    try:
        import matplotlib
    except ImportError:  # CSV and tables still get written
        print("render: matplotlib is not installed; no PNG plots")
        return {}
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [r for r in rows if r["metric"] == "time"]
    paths = {}
    for op in dict.fromkeys(r["op"] for r in times):
        fig = _speedup_figure(plt, [r for r in times if r["op"] == op], op, peers[op],
                              device_label)
        paths[op] = path_for(op)
        fig.savefig(paths[op], dpi=100)
        plt.close(fig)
    return paths


def _speedup_figure(plt, op_rows, op, peer, device_label):
    """One op's bars: each provider's speed-up over ``peer`` per shape, in the op's main mode."""
    modes = {r["mode"] for r in op_rows}
    mode = "full" if "full" in modes else sorted(modes)[0]
    op_rows = [r for r in op_rows if r["mode"] == mode]
    cases = list(dict.fromkeys(r["shape"] for r in op_rows))
    providers = [p for p in dict.fromkeys(r["provider"] for r in op_rows) if p != peer]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(providers), 1)
    for i, provider in enumerate(providers):
        speedups = []
        for case in cases:
            cell = {r["provider"]: r for r in op_rows if r["shape"] == case}
            ref = peer_value(cell, provider, peer)
            speedups.append(ref / cell[provider]["p50"] if provider in cell and ref else 0.0)
        ax.bar(np.arange(len(cases)) + i * width, speedups, width, label=provider)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(cases)) + width * (len(providers) - 1) / 2)
    ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel(f"speed-up over {peer} ({mode})")
    ax.set_title(f"{op} on {device_label}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# The README shows a few headline rows per device; the full tables stay in results/<device>.md.
# A headline row: each kxops provider of each op in the op's main mode, at the last shape of the
# op's table that was measured against its peer.
HEADLINE_MODES = ("full", "step")


def headline_rows(rows):
    """(op, provider, mode, shape, p50, peer, peer_p50) per op and kxops provider."""
    chosen = {}
    for r in rows:
        if (r["metric"] == "time" and r["mode"] in HEADLINE_MODES
                and r["provider"].startswith("kxops") and r["peer_p50"]):
            chosen[(r["op"], r["provider"])] = r
    return list(chosen.values())


def headline(md_path):
    """The device's heading, its CPU line and its headline table (markdown)."""
    text = md_path.read_text().splitlines()
    # The heading and the line naming the CPU model and its GEMM engine.
    lines = [text[0]] + [f"\n{line}" for line in text[1:3] if line.startswith("CPU:")]
    lines += ["", "| op | provider | mode | shape | ms | peer | peer ms | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in headline_rows(read_csv(md_path.with_suffix(".csv"))):
        lines.append(f"| {r['op']} | {r['provider']} | {r['mode']} | {r['shape']} | "
                     f"{r['p50']:.3g} | {r['peer']} | {r['peer_p50']:.3g} | "
                     f"{r['peer_p50'] / r['p50']:.2f}× |")
    link = f"benchmarks/results/{md_path.name}"
    return "\n".join(lines) + f"\n\nEvery table and plot: [`{link}`]({link}).\n"


def update_readme():
    """The README section: every device's headline rows, CPU first (a GPU run replaces only its
    own device's rows)."""
    text = README.read_text()
    if START not in text or END not in text:
        return
    sections = sorted(RESULTS.glob("*.md"), key=lambda path: (path.stem != "cpu", path.stem))
    body = "\n".join(headline(path) for path in sections)
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(f"{head}{START}\n{body}\n{END}{tail}")


def read_csv(path):
    """The rows of a results CSV, numbers as floats (None where empty)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: (float(v) if v else None) if k in NUMBERS else v for k, v in row.items()}
                for row in csv.DictReader(f)]


def merged(old_rows, new_rows):
    """The new rows, plus the old rows of every op the new run did not measure (so one op can
    be re-measured alone), ops in their first order."""
    new_ops = {r["op"] for r in new_rows}
    kept = [r for r in old_rows if r["op"] not in new_ops]
    rows = kept + new_rows
    order = list(dict.fromkeys(r["op"] for r in old_rows + new_rows))
    return sorted(rows, key=lambda r: order.index(r["op"]))


def png_name(device, op):
    """The plot's file name: an op's table name may hold spaces ("... trained-like")."""
    return f"{device}_{re.sub(r'[^A-Za-z0-9_-]+', '_', op)}.png"


def write_device_results(raw, results):
    """<results>/<device>.csv, .md (the device's README section) and one PNG per op; the ops
    this run did not measure keep their earlier rows."""
    rows = list(rows_from(raw))
    for device in sorted({r["device"] for r in rows}):
        name = device_name(device)
        device_rows = merged(read_csv(results / f"{name}.csv"),
                             [r for r in rows if r["device"] == device])
        peers = {r["op"]: r["peer"] for r in device_rows}
        with open(results / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            for r in device_rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                                 for k, v in r.items()})
        table = markdown(device_rows, peers)
        print(table)
        pngs = plot(device_rows, peers, name, lambda op, name=name: results / png_name(name, op))
        images = "".join(f"![{op} on {name}](benchmarks/results/{path.name}) "
                         for op, path in pngs.items())
        first = device_rows[0]
        revs = ", ".join(dict.fromkeys(r["git_rev"] for r in device_rows))
        cpus = "; ".join(dict.fromkeys(f"{r.get('cpu') or 'unrecorded'}, CPU GEMM engine "
                                       f"{r.get('cpu_gemm') or 'unrecorded'}"
                                       for r in device_rows))
        (results / f"{name}.md").write_text(
            f"#### {name} (kxops {first['kxops']}, torch {first['torch']}, git {revs})\n\n"
            f"CPU: {cpus}\n\n{table}\n{images}\n")


def main():
    parser = argparse.ArgumentParser(
        description="The device results of a run (results/<device>.csv, .md, PNGs), then the "
                    "README section rebuilt from every results/<device>.md.")
    parser.add_argument("raw", nargs="?", type=Path, help="pytest-benchmark JSON "
                        "(default: results/raw.json)")
    parser.add_argument("--readme", action="store_true",
                        help="only rebuild the README from the results/*.md already there")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the results to this folder instead and leave the README alone")
    args = parser.parse_args()
    results = args.out or RESULTS
    if not args.readme:
        write_device_results(json.loads((args.raw or results / "raw.json").read_text()), results)
    if args.out is None:
        update_readme()


if __name__ == "__main__":
    main()

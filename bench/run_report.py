"""bench/run.py's report: the medians (and worst) of its runs per point, its
sections of bench/RESULTS.md and its plots. A point whose receivers did not
keep up, or that failed, is shown as such and never turned into a ratio."""
from __future__ import annotations

import statistics
from pathlib import Path

IMPLS = ("limit", "relay", "gst", "python")
OWNED = ("# Benchmark results", "## Throughput", "## Relay figures",
         "## User-space instructions per delivered listener-packet", "## Join storm")


def medians(result: dict, impls: list[str], listeners: int) -> dict:
    """Per implementation at this listener count: the medians of its runs,
    the worst run's per core-second, the receivers' worst, what bounded it,
    and the errors of runs that failed (and, for the relay, its last run's
    latency buckets)."""
    med: dict = {}
    for impl in impls:
        every = [x for x in result["runs"] if x["impl"] == impl and x["listeners"] == listeners]
        rs = [x for x in every if "error" not in x]
        errors = [x["error"] for x in every if "error" in x]
        if not rs:
            med[impl] = {"errors": errors}
            continue
        m = {k: statistics.median(x[k] for x in rs) for k in ("delivered_per_s", "cpu_cores",
                                                               "delivered_per_core_s", "offered_per_s")}
        m.update(worst_per_core_s=min(x["delivered_per_core_s"] for x in rs), runs=len(rs), errors=errors,
                 receivers_cpu_cores=max(x["receivers_cpu_cores"] for x in rs),
                 receivers_drop_ratio=max(x["receivers_drop_ratio"] for x in rs),
                 receivers_kept_up=all(x["receivers_kept_up"] for x in rs),
                 bound_by=sorted({x["bound_by"] for x in rs}))
        if impl == "relay":
            for k in ("latency_p50_s", "latency_p99_s", "rss_per_listener_bytes"):
                vals = [x[k] for x in rs if x.get(k) is not None]
                m[k] = statistics.median(vals) if vals else None
            result["latency_buckets"][str(listeners)] = rs[-1]["latency_buckets"]
        med[impl] = m
    return med


def _ratio(x: dict, base: dict | None) -> str:
    """x per core over base per core, where both points mean something."""
    if not base or "delivered_per_core_s" not in base:
        return "-"
    if not (x["receivers_kept_up"] and base["receivers_kept_up"]):
        return "n/a (receivers behind)"
    return f"{x['delivered_per_core_s'] / base['delivered_per_core_s']:.2f}x"


def throughput_table(result: dict) -> list[str]:
    lines = ["| listeners | impl | delivered/s | sender CPU cores | per core-second, median (worst) "
             "| bound by | receivers: CPU cores, drops | vs limit | vs python | vs gst |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for L, v in sorted(result["medians"].items(), key=lambda x: int(x[0])):
        for impl in IMPLS:
            x = v.get(impl)
            if x is None:
                continue
            if "delivered_per_core_s" not in x:
                lines.append(f"| {L} | {impl} | **failed**: {'; '.join(x['errors'])} | | | | | | | |")
                continue
            bound = "/".join(x["bound_by"])
            if not x["receivers_kept_up"]:
                bound = "**receivers (not kept up)**"
            ratios = " | ".join(_ratio(x, v.get(b)) for b in ("limit", "python", "gst"))
            failed = f" ({len(x['errors'])} run(s) failed)" if x["errors"] else ""
            lines.append(f"| {L} | {impl} | {x['delivered_per_s']:,.0f} | {x['cpu_cores']:.2f} | "
                         f"{x['delivered_per_core_s']:,.0f} ({x['worst_per_core_s']:,.0f}){failed} | {bound} | "
                         f"{x['receivers_cpu_cores']:.2f}, {100 * x['receivers_drop_ratio']:.2f} % | {ratios} |")
    return lines


def markdown(result: dict) -> str:
    cores = result.get("cores") or {}
    lines = [f"# Benchmark results: {result['name']}", "",
             f"Machine: {result['machine']}. Command: `{result['command']}`. "
             f"Runs interleaved, {result['repeats']} per point; medians, the worst run in brackets.", "",
             "## Throughput (delivered listener-packets)", "",
             f"Sender pinned to core(s) {cores.get('sender', '?')}, the bench and its receivers (bench/recv.c, "
             f"recvmmsg every 20 ms) to {cores.get('crowd', '?')}; sender CPU from /proc for the sender alone. "
             "*Bound by*: `sender` = a full core or less delivered than offered, `offered` = the sender had "
             "room (the rate the publisher offered set the pace). Receivers' CPU and drops: the worst run. "
             "A point where the receivers dropped over 0.1 % or used over 90 % of their core is marked and "
             "gets no ratio. A sender that is saturated falls behind (the relay's fan-out latency below grows) "
             "and may then send each listener more than one packet in a row; limit.c sends each packet to "
             "every listener before the next, so where the relay passes it, limit.c bounds a fan-out that "
             "keeps up, not one that queues (our reading; not measured apart).", ""]
    lines += throughput_table(result)
    lines += ["", "## Relay figures", "", "| listeners | fan-out p50 | p99 | RSS per listener |", "|---|---|---|---|"]
    for L, v in sorted(result["medians"].items(), key=lambda x: int(x[0])):
        r = v.get("relay")
        if r and "delivered_per_core_s" in r:
            fmt = lambda s: f"{s * 1e3:.2f} ms" if s is not None else "-"  # noqa: E731
            lines.append(f"| {L} | {fmt(r.get('latency_p50_s'))} | {fmt(r.get('latency_p99_s'))} | "
                         f"{(r.get('rss_per_listener_bytes') or 0) / 1024:.1f} KiB |")
    cg = result.get("callgrind") or {}
    if cg:
        lines += ["", f"## User-space instructions per delivered listener-packet (callgrind, "
                      f"{cg.get('listeners')} listeners x {cg.get('packets')} packets)", "",
                  "| impl | instructions |", "|---|---|"]
        for impl in ("limit", "relay", "python"):
            lines.append(f"| {impl} | {cg[impl]:.0f} |" if cg.get(impl) is not None
                         else f"| {impl} | not measured (valgrind missing or timed out) |")
    st = result.get("storm")
    if st and "error" in st:
        lines += ["", "## Join storm", "", f"**Failed**: {st['error']}"]
    elif st:
        lines += ["", "## Join storm", "",
                  f"{st['storm']} joins sent within {st['join_seconds']:.2f} s while {st['existing']} "
                  f"listeners streamed: {st['accepted']} accepted, rejected {st['rejected']}, "
                  f"{st['unanswered']} unanswered. Existing listeners lost **{st['existing_lost']}** packets "
                  f"(received {st['existing_received_during']}). Time to first audio for newcomers: "
                  f"p50 {st['first_audio_p50_s'] or 0:.3f} s, p99 {st['first_audio_p99_s'] or 0:.3f} s."]
    if result.get("skipped_listener_counts"):
        lines += ["", f"Not measured: {result['skipped_listener_counts']} listeners (more sockets than one "
                      "process may open here)."]
    if result.get("interrupted"):
        lines += ["", f"**Interrupted** by {result['interrupted']}: the figures above are what was measured "
                      "before it."]
    lines += ["", "Plots: " + ", ".join(f"[{p}](results/{p})" for p in result.get("plots", [])), ""]
    return "\n".join(lines)


def plots(result: dict, out_dir: Path) -> list[str]:
    """throughput.png, latency_cdf.png and storm.png; none without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    med = {L: {i: x for i, x in v.items() if "delivered_per_core_s" in x} for L, v in result["medians"].items()}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in ("limit", "relay", "gst", "python"):
        pts = sorted((int(L), v[impl]["delivered_per_core_s"]) for L, v in med.items() if impl in v)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xscale("log")
    ax.set_xlabel("listeners")
    ax.set_ylabel("delivered packets per CPU-second")
    ax.set_title("Fan-out throughput per core (loopback)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png", dpi=110)
    made.append("throughput.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for L, runs in sorted(result["latency_buckets"].items(), key=lambda x: int(x[0])):
        pts = sorted((float(k), v) for k, v in runs.items() if k != "+Inf")
        total = runs.get("+Inf") or (pts[-1][1] if pts else 0)
        if total:
            ax.step([p[0] * 1e3 for p in pts], [p[1] / total for p in pts], where="post", label=f"{L} listeners")
    ax.set_xscale("log")
    ax.set_xlabel("fan-out latency, ingest to last send (ms)")
    ax.set_ylabel("fraction of packets")
    ax.set_title("Fan-out latency CDF (relay, 1 core)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "latency_cdf.png", dpi=110)
    made.append("latency_cdf.png")
    plt.close(fig)

    if result.get("storm") and "timeline" in result["storm"]:
        tl = result["storm"]["timeline"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        t = [p["t"] for p in tl]
        rate = [0.0] + [(tl[i]["existing_received"] - tl[i - 1]["existing_received"]) / max(1e-3, t[i] - t[i - 1])
                        for i in range(1, len(tl))]
        ax.plot(t, rate, label="packets/s received by existing listeners")
        ax2 = ax.twinx()
        ax2.plot(t, [p["new_accepted"] for p in tl], color="tab:red", label="newcomers accepted")
        ax.set_xlabel("seconds")
        ax.set_ylabel("packets/s (existing listeners)")
        ax2.set_ylabel("newcomers accepted")
        ax.set_title("Join storm")
        # the bench's one thread answers the newcomers' handshakes during the
        # storm, so the existing crowd is read late, not served late
        ax.text(0.02, 0.04, f"existing listeners lost {result['storm']['existing_lost']} packets; the dip and "
                "spike are the bench reading them late", transform=ax.transAxes, fontsize=8)
        fig.legend(loc="center right")
        fig.tight_layout()
        fig.savefig(out_dir / "storm.png", dpi=110)
        made.append("storm.png")
        plt.close(fig)
    return made


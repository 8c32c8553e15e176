"""bench/quic.py's report: the medians (and worst) of its runs per point and
its section of bench/RESULTS.md. A point whose crowd did not keep up, or
that failed, is shown as such and never turned into a ratio."""
from __future__ import annotations

import statistics

TRANSPORTS = ("udp", "quic", "quic-library")
OWNED = ("## QUIC listeners beside UDP",)
MAX_LOSS = 0.001    # a point whose listeners lost this share or more gets no ratio


def medians(runs: list[dict], n: int) -> dict:
    """Per transport at n listeners: medians, the worst per core-second and
    loss, the crowd's worst, what bounded it, and failed runs' errors."""
    med: dict = {}
    for t in TRANSPORTS:
        every = [x for x in runs if x["transport"] == t and x["listeners"] == n]
        rs = [x for x in every if "error" not in x]
        errors = [x["error"] for x in every if "error" in x]
        if not every:
            continue
        if not rs:
            med[t] = {"errors": errors}
            continue
        m = {k: statistics.median(x[k] for x in rs)
             for k in ("delivered_per_s", "cpu_cores", "per_core_s", "listeners_per_core")}
        m.update(worst_per_core_s=min(x["per_core_s"] for x in rs), runs=len(rs), errors=errors,
                 crowd_kept_up=all(x["crowd_kept_up"] for x in rs), bound_by=sorted({x["bound_by"] for x in rs}))
        if t == "udp":
            m.update(crowd_cpu_cores=max(x["receivers_cpu_cores"] for x in rs),
                     crowd_drop_ratio=max(x["receivers_drop_ratio"] for x in rs))
        else:
            m.update(loss_ratio=statistics.median(x["loss_ratio"] for x in rs),
                     worst_loss_ratio=max(x["loss_ratio"] for x in rs),
                     crowd_cpu_cores=max(x["crowd_cpu_cores"] for x in rs),
                     crowd_socket_drops=max(x["crowd_socket_drops"] for x in rs),
                     joined=min(x["joined_at_window"] for x in rs),
                     crowd_timed_out=sum(x["crowd_timed_out"] for x in rs),
                     # the relay's own counts in the run that lost most
                     relay_counted=max(rs, key=lambda x: x["loss_ratio"]).get("relay_counted", {}))
        med[t] = m
    return med


def _row(n: str, t: str, x: dict, udp: dict | None) -> str:
    if "per_core_s" not in x:
        return f"| {n} | {t} | **failed**: {'; '.join(x['errors'])} | | | | | | | |"
    if not x["crowd_kept_up"]:
        ratio = "n/a (crowd behind)"
    elif t != "udp" and x["worst_loss_ratio"] >= MAX_LOSS:
        ratio = "n/a (loss)"
    elif udp and udp.get("crowd_kept_up"):
        ratio = f"{x['per_core_s'] / udp['per_core_s']:.3f}x"
    else:
        ratio = "-"
    if t == "udp":
        crowd = f"{x['crowd_cpu_cores']:.2f}, {100 * x['crowd_drop_ratio']:.2f} % dropped"
        loss = "-"
    else:
        crowd = f"{x['crowd_cpu_cores']:.2f}, {x['crowd_socket_drops']} dropped"
        if x["joined"] < int(n):
            crowd += f"; {x['joined']:.0f} joined"
        if x["crowd_timed_out"]:
            crowd += f"; **{x['crowd_timed_out']} crowd process(es) timed out**"
        loss = f"{100 * x['loss_ratio']:.3f} % ({100 * x['worst_loss_ratio']:.3f} %)"
    bound = "/".join(x["bound_by"]) + ("" if x["crowd_kept_up"] else "; **crowd did not keep up**")
    seen = x.get("relay_counted") or {}
    if t != "udp" and x["worst_loss_ratio"] > 0 and seen:
        overflow = seen.get('relay_drops_total{reason="overflow"}', 0)
        bound += (f" (worst run, the relay's counts: windows shut {seen['relay_quic_window_shut_total']:,.0f}, "
                  f"ring overflow {overflow:,.0f}, "
                  f"datagrams dropped at its sockets {seen.get('relay_socket_drops', 0):,.0f})")
    failed = f" ({len(x['errors'])} run(s) failed)" if x["errors"] else ""
    return (f"| {n} | {t} | {x['delivered_per_s']:,.0f} | {x['cpu_cores']:.2f} | "
            f"{x['per_core_s']:,.0f} ({x['worst_per_core_s']:,.0f}){failed} | {x['listeners_per_core']:,.0f} | "
            f"{bound} | {crowd} | {loss} | {ratio} |")


def markdown(q: dict, rate: int) -> str:
    """The QUIC section of bench/RESULTS.md."""
    cores = q.get("cores") or {}
    lines = ["## QUIC listeners beside UDP (`bench/quic.py`)", "",
             f"Machine: {q.get('machine', '?')}. Command: `{q.get('command', 'quic.py')}`. "
             f"One relay, `--workers 1`, pinned to core(s) {cores.get('relay', '?')}; the bench, the publisher "
             f"and every listener on {cores.get('crowd', '?')}. {rate} packets/s in; {q['repeats']} runs per "
             "point; medians, the worst run in brackets. Per core-second = packets the relay sent per "
             "CPU-second it used (its kernel time included; for QUIC also the listeners' ACKs it reads). "
             "UDP listeners: this process's sockets read by bench/recv.c; QUIC listeners: aioquic joins, then "
             "bench/quic_crowd.c reads, opens and ACKs every packet. *Bound by*: `relay` = a full core or "
             "less sent than offered, `offered` = the relay had room. Crowd: its CPU cores and the datagrams "
             "dropped at its sockets (worst run). Client-side loss: holes in the audio's sequence numbers "
             "from the moment the C side took the socket. A point whose crowd did not keep up (a join "
             "missing, its core over 90 % busy, drops at its sockets, or loss of 0.1 % or more while the "
             "relay had room) gets no ratio, nor does one whose listeners lost 0.1 % or more, whichever side "
             "caused it; where the relay lost audio, its own counts (windows shut for want of ACKs, ring "
             "overflow, datagrams dropped at its sockets) are given.", "",
             "| listeners | transport | sent/s | relay CPU cores | per core-second, median (worst) "
             "| listeners per core | bound by | crowd: CPU cores, drops | client-side loss, median (worst) "
             "| vs UDP |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n, v in sorted(q["medians"].items(), key=lambda x: int(x[0])):
        for t in TRANSPORTS:
            if t in v:
                lines.append(_row(n, t, v[t], v.get("udp")))
    st = q.get("storm")
    if st and "error" in st:
        lines += ["", f"QUIC join storm: **failed**: {st['error']}"]
    elif st:
        lines += ["", f"QUIC join storm: {st['storm_quic']} QUIC joins within about a second while "
                      f"{st['existing_udp']} UDP listeners streamed, `max_load = {st['max_load']}`: "
                      f"{st['admitted']:.0f} admitted, {st['refused_node_full']:.0f} refused `node_full`, "
                      f"{st['refused_for_load']:.0f} of them for load (loop duty then {st['loop_duty_after']:.2f}, "
                      f"machine CPU busy {st['machine_busy_after']:.2f}; this crowd is the Python one, "
                      f"bench/peers/quic_light_crowd.py, at nice 19 on either core); the admitted lost "
                      f"{st['admitted_lost']} of {st['admitted_received'] + st['admitted_lost']}, the UDP "
                      f"listeners lost {st['existing_lost']} of {st['existing_received'] + st['existing_lost']}."]
    cg = q.get("callgrind") or {}
    if cg.get("quic") and cg.get("udp"):
        lines += ["", f"User-space instructions per delivered datagram, node side only (callgrind, "
                      f"{cg['listeners']} listeners x {cg['packets']} packets): QUIC {cg['quic']:,.0f}, "
                      f"UDP {cg['udp']:,.0f} ({cg['quic'] / cg['udp']:.0f}x)."]
    if q.get("interrupted"):
        lines += ["", f"**Interrupted** by {q['interrupted']}: the figures above are what was measured before it."]
    return "\n".join(lines) + "\n"

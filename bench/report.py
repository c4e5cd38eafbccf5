"""Turns benchmark results into the tables printed to the terminal and pasted into README."""

from __future__ import annotations

from typing import Any

TL = "threadline chat-messages sqlite"
LITE = "litellm proxy"
TL2 = "threadline chat-messages sqlite, 2 processes"
TL_RESP = "threadline responses sqlite (previous_response_id)"
LITE_RESP = "litellm proxy /v1/responses"
LITE2 = "litellm proxy, 2 workers"


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile; 0 for no samples (an arm that failed everything shows as 0 with 0% success)."""
    if not values:
        return 0.0
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def throughput(r: dict[str, Any]) -> str:
    out = []
    for label, arms in r["throughput"].items():
        stream = label.startswith("streaming")
        rows = []
        for name, a in arms.items():
            rows.append([
                name, f"{a['rps']:.0f}", f"{a['success'] * 100:.1f}%",
                fmt_ms(a["ttft_p50_ms"] if stream else a["p50_ms"]), fmt_ms(a["ttft_p99_ms"] if stream else a["p99_ms"]),
                fmt_ms(a.get("overhead_p50_ms")), fmt_ms(a.get("overhead_p99_ms")),
                fmt_ms(a.get("server_overhead_p50_ms")),
            ])
        what = "time to first token" if stream else "latency"
        out.append(f"\n### {label}\n" + table(
            ["arm", "req/s", "success", f"{what} p50 ms", f"{what} p99 ms", "overhead p50 ms", "overhead p99 ms",
             "self-reported p50 ms"], rows))
    rss = r.get("peak_rss_mb", {})
    if rss:
        out.append("\nPeak RSS over the throughput runs: " + ", ".join(f"{k} {v:.0f} MB" for k, v in rss.items()))
    return "\n".join(out)


def history(r: dict[str, Any]) -> str:
    rows = []
    for size, a in r["history"].items():
        if size == "direct":
            rows.append(["direct (upstream)", fmt_ms(a["p50_ms"]), fmt_ms(a["p99_ms"]), "-", "-", "-"])
        else:
            rows.append([f"{int(size):,} stored messages", fmt_ms(a["p50_ms"]), fmt_ms(a["p99_ms"]),
                         fmt_ms(a["overhead_p50_ms"]), fmt_ms(a["overhead_p99_ms"]), fmt_ms(a.get("server_overhead_p50_ms"))])
    return ("\n### history scaling (stateful turn, SQLite, concurrency 1, 4k-token window; 4 turns per conversation: "
            "the first reads history from the store, the rest from the process cache)\n") + table(
        ["conversation", "latency p50 ms", "latency p99 ms", "overhead p50 ms", "overhead p99 ms", "self-reported p50 ms"],
        rows)


def streams(r: dict[str, Any]) -> str:
    rows = [[name, f"{s['ok']}/{s['streams']}", f"{s['rss_before_mb']:.0f}", f"{s['rss_peak_mb']:.0f}", f"{s['seconds']:.1f}"]
            for name, s in r["streams"].items()]
    return "\n### 1,000 concurrent open streams (each ~5 s)\n" + table(
        ["server", "completed", "RSS before MB", "RSS peak MB", "wall s"], rows)


def store(r: dict[str, Any]) -> str:
    s = r["store"]
    rows = []
    for label, dbs in s.items():
        if not isinstance(dbs, dict):
            continue
        for db, v in dbs.items():
            rows.append([label, db, fmt_ms(v["p50_ms"]), fmt_ms(v["p99_ms"]), f"{v['ok']}/{v['requests']}"])
    return (f"\n### store scaling ({s['conversations']:,} conversations / {s['messages']:,} messages)\n"
            + table(["page", "store", "p50 ms", "p99 ms", "ok"], rows))


def targets(r: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for each target of issue 5."""
    thr = r["throughput"]
    out: list[tuple[str, str, bool]] = []
    b1 = thr["blocking c=1"][TL]
    out.append(("stateful turn overhead p50 ≤ 2 ms (SQLite, c=1)", f"{b1['overhead_p50_ms']:.2f} ms",
                b1["overhead_p50_ms"] <= 2))
    b16 = thr["blocking c=16"]
    for tl, lite, label in ((TL, LITE, "1 process each"), (TL2, LITE2, "2 processes each")):
        if tl not in b16:
            continue
        if lite in b16:
            ratio = b16[tl]["rps"] / max(1e-9, b16[lite]["rps"])
            out.append((f"c=16 requests/s ≥ 10× LiteLLM ({label})",
                        f"{b16[tl]['rps']:.0f} vs {b16[lite]['rps']:.0f} = {ratio:.1f}×", ratio >= 10))
        out.append((f"c=16 overhead p99 ≤ 20 ms ({label.replace(' each', '')})",
                    f"{b16[tl]['overhead_p99_ms']:.2f} ms", b16[tl]["overhead_p99_ms"] <= 20))
        out.append((f"c=16 success 100% ({label.replace(' each', '')})", f"{b16[tl]['success'] * 100:.2f}%",
                    b16[tl]["success"] == 1.0))
    for label in ("blocking c=1", "blocking c=16", "streaming c=1", "streaming c=16"):
        arms = thr.get(label, {})
        if TL_RESP not in arms:
            continue
        resp, chat = arms[TL_RESP]["overhead_p50_ms"], arms[TL]["overhead_p50_ms"]
        out.append((f"/v1/responses overhead p50 ≤ 1.2× chat-messages ({label})",
                    f"{resp:.2f} vs {chat:.2f} ms = {resp / max(1e-9, chat):.2f}×", resp <= 1.2 * chat))
        if LITE_RESP in arms:
            ratio = arms[TL_RESP]["rps"] / max(1e-9, arms[LITE_RESP]["rps"])
            out.append((f"/v1/responses requests/s ≥ 10× LiteLLM's ({label})",
                        f"{arms[TL_RESP]['rps']:.0f} vs {arms[LITE_RESP]['rps']:.0f} = {ratio:.1f}×", ratio >= 10))
    s1 = thr["streaming c=1"][TL]
    out.append(("streaming TTFT overhead p50 ≤ 2 ms", f"{s1['overhead_p50_ms']:.2f} ms", s1["overhead_p50_ms"] <= 2))
    h = r["history"]
    o10, o10k = h["10"]["overhead_p50_ms"], h["10000"]["overhead_p50_ms"]
    out.append(("overhead at 10,000 msgs ≤ 1.3× at 10", f"{o10k:.2f} vs {o10:.2f} ms = {o10k / max(1e-9, o10):.2f}×",
                o10k <= 1.3 * o10))
    worst = max(v["p50_ms"] for dbs in r["store"].values() if isinstance(dbs, dict) for v in dbs.values())
    out.append(("conversation/message pages p50 ≤ 5 ms at 100k/1M", f"worst {worst:.2f} ms", worst <= 5))
    st = r["streams"]["threadline"]
    out.append(("1,000 concurrent streams: RSS ≤ 300 MB", f"{st['rss_peak_mb']:.0f} MB ({st['ok']}/{st['streams']} ok)",
                st["rss_peak_mb"] <= 300 and st["ok"] == st["streams"]))
    return out


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    parts = [f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}"
             + (" (quick run)" if r.get("quick") else "")]
    parts.append(throughput(r))
    parts.append(history(r))
    parts.append(streams(r))
    parts.append(store(r))
    parts.append("\n### targets\n" + table(["target", "measured", "met"],
                                          [[t, v, "yes" if ok else "NO"] for t, v, ok in targets(r)]))
    return "\n".join(parts)

"""Plots and the headline table from the newest ``perf-*.json`` results (measures nothing).

Writes ``benchmarks/results/perf-<part>-<date>.png`` per part and ``perf-summary-<date>.md``: each
figure beside its peer from the same run, as a ratio; before/after rows come from the interleaved
parts (``ab``, ``threads``, ``threads-load``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.perf.common import RESULTS, newest, today


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _latest(part: str) -> dict[str, Any] | None:
    files = sorted(p for p in RESULTS.glob(f"perf-{part}-????-??-??.json"))  # untagged runs only
    return json.loads(files[-1].read_text()) if files else None


def plot_recommend(rec: dict[str, Any], before: dict[str, Any] | None) -> Path:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    series = [(name, cfg) for name, cfg in rec["load"].items()]
    if before:
        series += [(f"{name} (before)", cfg) for name, cfg in before["load"].items() if name == "full chain"]
    for name, cfg in series:
        users = [r["users"] for r in cfg["levels"]]
        style = "--" if "before" in name else "-"
        ax1.plot(users, [r["requests_per_s"] for r in cfg["levels"]], style, marker="o", label=name)
        ax2.plot(users, [r["p99_ms"] for r in cfg["levels"]], style, marker="o", label=name)
    ax2.axhline(100, color="grey", lw=0.8)
    ax2.axhline(50, color="grey", lw=0.8, ls=":")
    for ax, label in ((ax1, "requests/s"), (ax2, "p99 ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent users (locust, closed loop)")
        ax.set_ylabel(label)
    ax2.set_yscale("log")
    ax1.legend(fontsize=7)
    fig.suptitle("POST /recommend over loopback, 1 uvicorn worker, 2 shared cores")
    fig.tight_layout()
    out = RESULTS / f"perf-recommend-{today()}.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def plot_breakdown(rec: dict[str, Any], before: dict[str, Any] | None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    parts = rec["breakdown"]["parts"]
    labels = [k for k in parts if "total" not in k or k == "request total"]
    y = range(len(labels))
    ax.barh([i + 0.2 for i in y], [parts[k]["mean_ms"] for k in labels], height=0.4, label="after")
    if before:
        bparts = before["breakdown"]["parts"]
        ax.barh([i - 0.2 for i in y], [bparts.get(k, {}).get("mean_ms", 0) for k in labels], height=0.4,
                label="before")
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.set_xlabel("mean ms per request (in process, 1 thread)")
    ax.legend()
    fig.tight_layout()
    out = RESULTS / f"perf-recommend-breakdown-{today()}.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def plot_store(store: dict[str, Any]) -> Path:
    plt = _plt()
    rows = store["summary"]
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [f"{r['data']}\n{r['n']:,}" for r in rows]
    x = range(len(rows))
    for off, key, label in ((-0.25, "pg_p50_ms", "pgvector HNSW"), (0, "faiss_p50_ms", "FAISS HNSW"),
                            (0.25, "numpy_p50_ms", "numpy exact")):
        ax.bar([i + off for i in x], [r[key] for r in rows], width=0.25, label=label)
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("p50 ms per top-100 query (1 client)")
    ax.legend()
    fig.tight_layout()
    out = RESULTS / f"perf-store-{today()}.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def plot_item_tower(tower: dict[str, Any]) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = sorted(tower["sizes"].values(), key=lambda r: r["n"])
    ns = [r["n"] for r in sizes]
    ax.plot(ns, [r["train"]["epoch_s_extrapolated"] for r in sizes], marker="o",
            label="CPU SimCSE epoch (extrapolated)")
    ax.plot(ns, [r["encode"]["catalogue_s_extrapolated"] for r in sizes], marker="s", label="CPU encode catalogue")
    for name, g in tower.get("gpu_reference", {}).items():
        if g.get("items"):
            ax.scatter([g["items"]], [g["epoch_s_steady"]], marker="*", s=90,
                       label=f"{g['device']} x{g['world_size']} epoch (from {name.split(':')[0][:22]}...)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("catalogue items")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=6)
    fig.tight_layout()
    out = RESULTS / f"perf-item_tower-{today()}.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def summary(parts: dict[str, dict[str, Any] | None], before: dict[str, dict[str, Any] | None]) -> str:
    lines = ["| part | figure | value | peer (same run unless said) | peer value | ratio |",
             "|---|---|---|---|---|---|"]

    def row(part: str, fig: str, val: Any, peer: str, pval: Any, ratio: Any) -> None:
        lines.append(f"| {part} | {fig} | {val} | {peer} | {pval} | {ratio} |")

    e = parts.get("enrich")
    if e and "embedded" in e["backends"]:
        b = e["backends"]
        row("enrichment", "embedded generation, items/s (CPU, 1 thread)", b["embedded"]["items_per_s"],
            "fake backend (rules, no model)", b["fake"]["items_per_s"], f"{e['embedded_over_fake_s_per_item']}x slower")
        tok = b["embedded"].get("tokens", {})
        row("enrichment", "tokens per item (prompt / completion)",
            f"{tok.get('prompt_per_item')} / {tok.get('completion_per_item')}", "", "", "")
        row("enrichment", "warm-cache re-run, s", b["embedded (warm cache)"]["wall_s"], "cold run, s",
            b["embedded"]["wall_s"], f"{e['warm_over_cold_wall']}")
        gpu = (e.get("gpu_reference") or {}).get("best", {}).get("hm")
        if "embedded-ll" in b and gpu:
            row("enrichment", "embedded-ll scoring, items/s (CPU)", b["embedded-ll"]["items_per_s"],
                "one H100, batched (from loglik-gpu-h100 JSON)", gpu["items_per_s"],
                f"GPU {gpu['items_per_s'] / b['embedded-ll']['items_per_s']:.0f}x")
    t = parts.get("item_tower")
    if t:
        gpu = next(iter(t.get("gpu_reference", {}).values()), None)
        for r in sorted(t["sizes"].values(), key=lambda r: r["n"]):
            tr, en = r["train"], r["encode"]
            peer = f"{gpu['device']} epoch at 105k (JSON)" if gpu else ""
            row("item tower",
                f"{r['n']:,} items ({r['data']}): CPU epoch s (extrapolated), {tr['items_per_s']} items/s",
                tr["epoch_s_extrapolated"], peer, gpu["epoch_s_steady"] if gpu else "",
                f"{tr['epoch_s_extrapolated'] / gpu['epoch_s_steady'] * 105_542 / r['n']:.0f}x per item" if gpu else "")
            row("item tower", f"{r['n']:,} items: encode items/s", en["items_per_s"], "MiniLM text encoder items/s",
                t["minilm_peer"]["items_per_s"], f"{en['items_per_s'] / t['minilm_peer']['items_per_s']:.0f}x faster")
    s = parts.get("store")
    if s:
        for r in s["summary"]:
            row("store", f"{r['data']} {r['n']:,}x{r['dim']}: pgvector p50 ms (recall {r['pg_recall']})",
                r["pg_p50_ms"],
                f"FAISS HNSW (recall {r['faiss_recall']}) / numpy exact", f"{r['faiss_p50_ms']} / {r['numpy_p50_ms']}",
                f"{r['pg_over_faiss_p50']}x / {r['pg_over_numpy_p50']}x")
    rec = parts.get("recommend")
    if rec:
        for name, cfg in rec["load"].items():
            one = cfg["single_user"]
            row("recommend", f"{name}: 1 user p50/p95/p99 ms", f"{one['p50_ms']}/{one['p95_ms']}/{one['p99_ms']}",
                "", "", "")
            row("recommend", f"{name}: max req/s with p99 <= 100 ms", cfg["max_req_s_p99_le_100ms"], "", "", "")
    ab = parts.get("ab")
    if ab:
        r = ab["recommend"]
        row("optimised", f"store code {ab['before_commit']} -> now: /recommend p50 ms (interleaved)",
            r["after"]["p50_ms"], "before", r["before"]["p50_ms"], f"{r['p50_before_over_after']}x faster")
        for name, c in ab["search"].items():
            row("optimised", f"store search, {name}: p50 ms", c["after"]["p50_ms"], "before", c["before"]["p50_ms"],
                f"{c['p50_before_over_after']}x faster")
    th = parts.get("threads")
    if th:
        row("optimised", "/recommend p50 ms, torch 1 thread (interleaved)", th["one_thread"]["p50_ms"], "2 threads",
            th["two_threads"]["p50_ms"], f"{th['p50_two_over_one']}x faster")
    tl = parts.get("threads-load")
    if tl:
        for name, lad in tl["ladders"].items():
            one = lad["levels"][0] if lad["levels"] else {}
            row("optimised", f"{name}: 1 user p50/p99 ms, req/s per level (interleaved ladders)",
                f"{one.get('p50_ms')}/{one.get('p99_ms')}",
                "levels", ", ".join(f"{r['users']}u {r['requests_per_s']}" for r in lad["levels"]), "")
    lv = parts.get("live")
    if lv:
        cfgs = lv["configs"]
        base = cfgs.get("columns (default)", {}).get("median_live_s")
        for name, c in cfgs.items():
            row("ingest to live", f"{name}: median s", c["median_live_s"], "columns (default)", base,
                f"{c['median_live_s'] / base:.1f}x" if base and c["median_live_s"] else "")
    return "\n".join(lines) + "\n"


def run(args: Any = None) -> Path | None:
    parts = {p: _latest(p) for p in ("enrich", "item_tower", "store", "recommend", "live", "ab", "threads",
                                     "threads-load")}
    # Ladders of separate runs are not comparable on a shared machine (the HTTP floor itself moved 2.5x
    # between two runs): before/after comes from the interleaved parts (ab, threads, threads-load).
    before: dict[str, dict[str, Any] | None] = {"recommend": None, "store": None}
    made = []
    if parts["recommend"]:
        made += [plot_recommend(parts["recommend"], before["recommend"]),
                 plot_breakdown(parts["recommend"], before["recommend"])]
    if parts["store"]:
        made.append(plot_store(parts["store"]))
    if parts["item_tower"]:
        made.append(plot_item_tower(parts["item_tower"]))
    text = summary(parts, before)
    out = RESULTS / f"perf-summary-{today()}.md"
    out.write_text(text)
    print(text)
    for m in made:
        print(f"[report] {m.name}")
    return out


__all__ = ["newest", "run"]

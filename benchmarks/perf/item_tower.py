"""Part 2, the item tower: SimCSE training items/s and time per epoch, encoding items/s, and how both
grow with catalogue size (10k, the real 105,542, 1M).

CPU runs are bounded: at each size the catalogue's inputs are built in memory at full size (10k: a
random subset of the real H&M inputs; 1M: real rows resampled with replacement, i.e. synthetic
beyond the real 105k), then ``--steps`` SimCSE steps (batch 512, the production recipe: views,
one forward over both, InfoNCE, AdamW) are timed after one warm-up step, and ``--encode-items``
rows are encoded with ``encode_items``. Per-step cost does not depend on the catalogue size (a step
gathers its 512 rows by index), so an epoch is extrapolated as ``steps_per_epoch x s/step`` plus the
per-epoch permutation, timed at full size; encoding is extrapolated linearly. Both say so in the JSON.

Peers: the H100 / H200 epochs already measured (``item_tower-h100-1gpu-2026-11-27.json``; no GPU
here, so GPU figures are read, not re-run), and in the same run on the same CPU the MiniLM text
encoder over the same items' texts (the part of encoding a new item that the tower does not do).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.perf.common import BENCH_RUN_DIR, MAIN_RUNS, RESULTS, Result, link_tree

GPU_FILES = ["item_tower-h100-1gpu-2026-11-27.json", "item_tower-h200x2-ddp2-2026-11-27.json"]


def real_inputs() -> tuple[Any, Any, Any]:
    """The H&M catalogue's tower inputs (cached MiniLM vectors), its vocabulary and the item texts."""
    from atelier.config import Settings
    from atelier.ingest import load_tables
    from atelier.recommend.encoder import catalogue_inputs, tower_config
    from atelier.text import item_texts
    from atelier.vocab import Vocab

    settings = Settings.model_validate({"run_dir": MAIN_RUNS})
    vocab = Vocab.load(settings.paths.vocab)
    items = load_tables(settings.paths.dataset("hm"))[0]
    # the text vectors cached by `atelier run`, read through symlinks: a cache miss writes under
    # the benchmark folder, never into runs/features
    features = BENCH_RUN_DIR / "features"
    link_tree(MAIN_RUNS / "features", features)
    inputs = catalogue_inputs(items, "hm", vocab, features)
    texts = item_texts(items["title"].fillna("").astype(str).tolist(),
                       items["description"].fillna("").astype(str).tolist())
    return inputs, tower_config(vocab), texts


def time_steps(inputs: Any, model_cfg: Any, steps: int, batch: int = 512) -> dict[str, Any]:
    """Seconds per SimCSE step (the loop body of ``train_item_tower``), after one warm-up step."""
    import torch

    from atelier.models.item_tower import ItemTower, slice_inputs, stack_inputs
    from atelier.models.losses import info_nce
    from atelier.models.views import make_views
    from atelier.train.item import TrainItemConfig, optimizer_step

    cfg = TrainItemConfig(batch_size=batch)
    torch.manual_seed(0)
    model = ItemTower(model_cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator().manual_seed(0)
    n = len(inputs.tokens)
    t = time.perf_counter()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    perm_s = time.perf_counter() - t
    times = []
    for b in range(steps + 1):
        t = time.perf_counter()
        idx = perm[(b * batch) % max(1, n - batch):][:batch]
        view_a, view_b = make_views(slice_inputs(inputs, idx), cfg.views, gen)
        za, zb = model(stack_inputs(view_a, view_b)).chunk(2)
        loss = info_nce(za.float(), zb.float(), cfg.temperature)
        optimizer_step(loss, model, opt, sched)
        loss.item()
        times.append(time.perf_counter() - t)
    per_step = float(np.median(times[1:]))
    steps_per_epoch = max(1, n // batch)
    return {"steps_timed": steps, "s_per_step_median": round(per_step, 4),
            "s_per_step_all": [round(x, 4) for x in times],
            "items_per_s": round(batch / per_step, 1), "steps_per_epoch": steps_per_epoch,
            "permutation_s": round(perm_s, 4),
            "epoch_s_extrapolated": round(steps_per_epoch * per_step + perm_s, 1)}


def time_encode(model: Any, inputs: Any, n: int) -> dict[str, Any]:
    import torch

    from atelier.models.item_tower import encode_items, slice_inputs

    sub = slice_inputs(inputs, torch.arange(min(n, len(inputs.tokens))))
    encode_items(model, slice_inputs(sub, torch.arange(min(512, len(sub.tokens)))))  # warm-up
    t = time.perf_counter()
    encode_items(model, sub)
    s = time.perf_counter() - t
    ips = len(sub.tokens) / s
    return {"items_timed": len(sub.tokens), "seconds": round(s, 3), "items_per_s": round(ips, 1),
            "catalogue_s_extrapolated": round(len(inputs.tokens) / ips, 1)}


def resample(inputs: Any, n: int, seed: int) -> Any:
    import torch

    from atelier.models.item_tower import slice_inputs

    gen = torch.Generator().manual_seed(seed)
    total = len(inputs.tokens)
    idx = torch.randperm(total, generator=gen)[:n] if n <= total else torch.randint(0, total, (n,), generator=gen)
    return slice_inputs(inputs, idx)


def gpu_reference() -> dict[str, Any]:
    out = {}
    for name in GPU_FILES:
        path = RESULTS / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        for variant, v in data.get("variants", {"": data}).items():
            epochs = v.get("epochs") or []
            if epochs:
                steady = epochs[1:] or epochs
                out[f"{name}:{variant}"] = {
                    "device": data.get("device"), "world_size": v.get("world_size", data.get("world_size")),
                    "items": v.get("items"), "epoch_s_first": epochs[0]["seconds"],
                    "epoch_s_steady": round(float(np.median([e["seconds"] for e in steady])), 2),
                    "items_per_s_steady": round(float(np.median([e["items_per_s"] for e in steady])), 1)}
    return out


def run(args: Any) -> Path:
    import torch

    from atelier.config import Settings
    from atelier.models.item_tower import load_checkpoint
    from atelier.text import encode_texts

    res = Result("item_tower")
    torch.set_num_threads(args.threads)
    inputs, model_cfg, texts = real_inputs()
    model, _ = load_checkpoint(Settings.model_validate({"run_dir": MAIN_RUNS}).paths.item_tower("hm"))
    sizes: dict[str, Any] = {}
    for n in args.tower_sizes:
        x = inputs if n == len(inputs.tokens) else resample(inputs, n, seed=n)
        print(f"[item-tower] {n:,} items: {args.steps} steps ...", flush=True)
        train = time_steps(x, model_cfg, args.steps)
        enc = time_encode(model, x, args.encode_items)
        kind = "real H&M" if n == len(inputs.tokens) else ("real subset" if n < len(inputs.tokens)
                                                           else "synthetic: real rows resampled")
        sizes[str(n)] = {"n": n, "data": kind, "train": train, "encode": enc}
        print(f"  {train['items_per_s']} items/s training, epoch ~{train['epoch_s_extrapolated']} s; "
              f"encode {enc['items_per_s']} items/s", flush=True)
        del x
    # peer in the same run: MiniLM over the same number of distinct real texts (no cache)
    sample = list(dict.fromkeys(texts))[: args.minilm_items]
    encode_texts(sample[:32])
    t = time.perf_counter()
    encode_texts(sample)
    minilm_s = time.perf_counter() - t
    res["minilm_peer"] = {"texts": len(sample), "seconds": round(minilm_s, 2),
                          "items_per_s": round(len(sample) / minilm_s, 1)}
    res["threads"] = args.threads
    res["sizes"] = sizes
    res["gpu_reference"] = gpu_reference()
    res["method"] = ("fixed number of timed steps per size, epoch extrapolated (steps_per_epoch x median s/step + "
                     "permutation); encoding timed on encode_items rows and extrapolated linearly")
    return res.write()

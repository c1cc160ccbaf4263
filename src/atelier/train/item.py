"""Training the item tower: SimCSE on the catalogue, then a behavioural fine-tune on the training window.

``train_item_tower``: SimCSE on the catalogue (two complementary views per item, InfoNCE with
in-batch negatives, AdamW with warm-up and cosine decay, bf16 autocast on a GPU and on a CPU with native
bf16, ``atelier.hardware``). It runs on CPU by default, on one GPU with ``device="cuda"``, and across GPUs
when launched by ``torchrun`` (DDP: each rank trains on its shard of every epoch; in-batch negatives stay
per rank).
``behaviour_finetune``: a second contrastive stage whose positives are ``behaviour_pairs`` (items one
shopper bought together or in the window, colourways of one product), popularity-corrected in-batch
negatives, the SimCSE loss kept alongside; the inputs stay content only, so an unsold item is encoded
into the same tuned space from its attributes (UniSRec: Hou et al., KDD 2022).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from atelier.hardware import autocast_bf16
from atelier.models.item_tower import (
    ItemInputs,
    ItemTower,
    ItemTowerConfig,
    mask_parts,
    slice_inputs,
    stack_inputs,
)
from atelier.models.losses import info_nce
from atelier.models.views import ViewConfig, make_views
from atelier.recommender import TrainData

ProgressFn = Callable[[int, int, float], None]  # (step, total steps, loss)


@dataclass
class TrainItemConfig:
    """SimCSE recipe; defaults are what ran on the full H&M catalogue."""

    epochs: int = 3
    batch_size: int = 512  # in-batch negatives: larger is harder, 512 fits CPU memory easily
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.05
    temperature: float = 0.05  # SimCSE's value
    seed: int = 0
    device: str = "cpu"
    use_std: bool = True  # ablations switch token types off entirely
    use_re: bool = True
    use_text: bool = True
    views: ViewConfig = field(default_factory=ViewConfig)


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Backward, clip the gradient norm to 1 (a bad batch cannot blow the weights up), step, schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero, as a multiplier of the base rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def distributed() -> tuple[int, int]:
    """(rank, world size), initialising the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_item_tower(
    inputs: ItemInputs, model_cfg: ItemTowerConfig, cfg: TrainItemConfig, progress: ProgressFn | None = None,
) -> tuple[ItemTower, dict[str, Any]]:
    """Train an item tower on a catalogue's inputs (CPU tensors); returns the model and a history."""
    # ---- setup
    rank, world = distributed()
    device = torch.device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.manual_seed(cfg.seed)
    model = ItemTower(model_cfg).to(device)
    # The only buffer (text field ids) is constant: broadcasting it every forward would bump its
    # version under autograd and break backward.
    net: torch.nn.Module = DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    inputs = mask_parts(inputs, cfg.use_std, cfg.use_re, cfg.use_text)
    n = len(inputs.tokens)
    per_rank = n // world
    steps_per_epoch = max(1, per_rank // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    no_decay = [p for name, p in model.named_parameters() if p.dim() < 2 or "emb_" in name]
    decay = [p for name, p in model.named_parameters() if p.dim() >= 2 and "emb_" not in name]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total, max(1, int(cfg.warmup_frac * total))))
    gen = torch.Generator().manual_seed(cfg.seed + rank)
    amp = autocast_bf16(cfg.device)  # bf16 on a GPU, and on a CPU where it is native (1.5x a step there)
    history: dict[str, Any] = {"config": asdict(cfg), "epochs": [], "world_size": world, "items": n, "bf16": amp}

    # ---- loop
    step = 0
    for epoch in range(cfg.epochs):
        net.train()
        t0 = time.perf_counter()
        # Same permutation on every rank (seeded by epoch), each rank takes its own shard.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        shard = perm[rank * per_rank : (rank + 1) * per_rank]
        losses = []
        for b in range(steps_per_epoch):
            idx = shard[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            view_a, view_b = make_views(slice_inputs(inputs, idx), cfg.views, gen)
            both = stack_inputs(view_a, view_b).to(device)  # one forward for both views: (2 * batch, ...)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                za, zb = net(both).chunk(2)
            loss = info_nce(za.float(), zb.float(), cfg.temperature)
            optimizer_step(loss, model, opt, sched)
            step += 1
            losses.append(loss.item())
            if progress is not None and rank == 0:
                progress(step, total, losses[-1])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        # ---- evaluate: mean training loss and throughput per epoch
        history["epochs"].append({"epoch": epoch + 1, "loss": sum(losses) / len(losses), "seconds": round(seconds, 2),
                                  "items_per_s": round(steps_per_epoch * cfg.batch_size * world / seconds, 1)})
    return model.eval(), history


def view_alignment(model: ItemTower, inputs: ItemInputs, cfg: ViewConfig, n: int = 2048, seed: int = 1) -> float:
    """Top-1 accuracy of matching each item's view A to its own view B among ``n`` items (higher = better)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(inputs.tokens), generator=gen)[:n]
    device = next(model.parameters()).device
    view_a, view_b = make_views(slice_inputs(inputs, idx), cfg, gen)
    with torch.inference_mode():
        za, zb = model(view_a.to(device)), model(view_b.to(device))
    return float((za @ zb.T).argmax(dim=1).eq(torch.arange(len(idx), device=device)).float().mean())


# --------------------------------------------------------------------------- behaviour fine-tuning


@dataclass
class BehaviourConfig:
    """The second, behavioural stage after SimCSE (DESIGN.md section 4; UniSRec's idea)."""

    epochs: int = 1  # one pass over the sampled pairs: the tower only has to tilt towards what sells together
    batch_size: int = 512
    max_pairs: int = 60_000  # sampled behaviour pairs per epoch (CPU time is the budget)
    lr: float = 3e-4  # a fine-tune: a third of SimCSE's rate
    weight_decay: float = 0.01
    warmup_frac: float = 0.05
    temperature: float = 0.05
    simcse_weight: float = 0.5  # the SimCSE views loss kept alongside, so items with no pairs keep their structure
    seed: int = 0
    device: str = "cpu"
    views: ViewConfig = field(default_factory=ViewConfig)


def behaviour_loss(za: torch.Tensor, zb: torch.Tensor, a: torch.Tensor, b: torch.Tensor, log_q: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """InfoNCE of pair (a_i, b_i) against the batch's other b_j, popularity-corrected (logQ: a popular item is a
    negative in many batches, so its logit loses log of how often it is drawn, Yi et al. 2019), with the
    b_j that are the same item as b_i, or as a_i, masked out (not negatives, the same item)."""
    logits = za @ zb.T / temperature - log_q[None, :]  # (batch, batch)
    same = (b[None, :] == b[:, None]) | (b[None, :] == a[:, None])
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(a), device=za.device))


def behaviour_finetune(
    model: ItemTower, inputs: ItemInputs, pairs: torch.Tensor, cfg: BehaviourConfig, progress: ProgressFn | None = None,
) -> tuple[ItemTower, dict[str, Any]]:
    """Fine-tune a trained tower so items bought together (and colourways) sit close; inputs stay content only,
    so an item with no sales still gets a vector in the tuned space from its attributes. ``pairs`` is
    (n, 2) catalogue rows; sampled with replacement up to ``max_pairs`` per epoch."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = model.to(device).train()
    gen = torch.Generator().manual_seed(cfg.seed)
    # sampling frequency of each item as the positive b: the logQ correction of in-batch negatives
    counts = torch.bincount(pairs[:, 1], minlength=len(inputs.tokens)).float()
    log_q = torch.log(counts / counts.sum()).clamp_min(-30.0).to(device)
    n = min(cfg.max_pairs, len(pairs))
    steps_per_epoch = max(1, n // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total, max(1, int(cfg.warmup_frac * total))))
    amp = autocast_bf16(cfg.device)
    history: dict[str, Any] = {"config": asdict(cfg), "pairs": len(pairs), "epochs": [], "bf16": amp}
    step = 0
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        losses = []
        picked = pairs[torch.randint(len(pairs), (n,), generator=gen)]
        for s in range(steps_per_epoch):
            batch = picked[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            a, b = batch[:, 0], batch[:, 1]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                za = model(slice_inputs(inputs, a).to(device)).float()
                zb = model(slice_inputs(inputs, b).to(device)).float()
            loss = behaviour_loss(za, zb, a.to(device), b.to(device), log_q[b.to(device)], cfg.temperature)
            if cfg.simcse_weight > 0:  # keep content alignment for the items of the batch
                view_a, view_b = make_views(slice_inputs(inputs, a), cfg.views, gen)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    va, vb = model(stack_inputs(view_a, view_b).to(device)).float().chunk(2)
                loss = loss + cfg.simcse_weight * info_nce(va, vb, cfg.temperature)
            optimizer_step(loss, model, opt, sched)
            step += 1
            losses.append(loss.item())
            if progress is not None:
                progress(step, total, losses[-1])
        history["epochs"].append({"epoch": epoch + 1, "loss": sum(losses) / len(losses),
                                  "seconds": round(time.perf_counter() - t0, 2)})
    return model.eval(), history


def behaviour_pairs(data: TrainData, max_basket: int = 12, seed: int = 0) -> tuple[torch.Tensor, dict[str, int]]:
    """(n, 2) catalogue-row pairs the tower should bring together, from the training window only: items one
    shopper bought on the same day, items one shopper bought on different days of the window, and other
    colourways of a product (same ``group_id``, sold or not: the catalogue says so, no sale needed). Both
    directions of every pair; a shopper's day beyond ``max_basket`` items is sampled down (bulk orders
    would swamp the rest). Colourway pairs are capped at the number of behaviour pairs."""
    rng = np.random.default_rng(seed)
    ids = data.items["item_id"].astype(str)
    index = pd.Series(np.arange(len(ids)), index=ids.to_numpy())
    log = data.interactions.assign(row=data.interactions["item_id"].astype(str).map(index)).dropna(subset=["row"])
    log = log.assign(row=log["row"].astype(np.int64), day=log["ts"].dt.normalize())
    log = log.drop_duplicates(["user_id", "row", "day"])

    def within(groups: pd.core.groupby.DataFrameGroupBy) -> np.ndarray:
        out = []
        for _, group in groups["row"]:
            rows = np.unique(group.to_numpy())
            if len(rows) < 2:
                continue
            if len(rows) > max_basket:
                rows = rng.choice(rows, max_basket, replace=False)
            a, b = np.meshgrid(rows, rows)
            keep = a != b
            out.append(np.stack([a[keep], b[keep]], axis=1))
        return np.concatenate(out) if out else np.zeros((0, 2), np.int64)

    same_day = within(log.groupby(["user_id", "day"]))
    by_user = log.drop_duplicates(["user_id", "row"]).groupby("user_id")
    across = within(by_user)
    groups = data.items["group_id"].astype(str) if "group_id" in data.items else ids
    colour = within(pd.DataFrame({"row": np.arange(len(ids)), "g": groups.to_numpy()}).groupby("g"))
    cap = len(same_day) + len(across)
    if len(colour) > cap:
        colour = colour[rng.choice(len(colour), cap, replace=False)]
    pairs = np.concatenate([same_day, across, colour]) if cap or len(colour) else np.zeros((0, 2), np.int64)
    counts = {"same_day": len(same_day), "same_shopper": len(across), "colourways": len(colour)}
    return torch.from_numpy(pairs.astype(np.int64)), counts

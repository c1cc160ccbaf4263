"""Training recipes, one function per model: setup -> loop -> evaluate -> save.

``train_item_tower``: SimCSE on the catalogue (two complementary views per item, InfoNCE with
in-batch negatives, AdamW with warm-up and cosine decay, bf16 autocast on GPU). It runs on CPU
by default, on one GPU with ``device="cuda"``, and across GPUs when launched by ``torchrun``
(DDP: each rank trains on its shard of every epoch; in-batch negatives stay per rank).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from atelier.models.item_tower import ItemInputs, ItemTower, ItemTowerConfig, mask_parts, slice_inputs, stack_inputs
from atelier.models.losses import info_nce
from atelier.models.views import ViewConfig, make_views

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
    amp = device.type == "cuda"
    history: dict[str, Any] = {"config": asdict(cfg), "epochs": [], "world_size": world, "items": n}

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

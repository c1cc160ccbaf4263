"""Item tower training speed and ablation checkpoints on a GPU (or the CPU), from packed inputs.

Two steps, because the GPU machine has no benchmark data and no text encoder weights:

    # here: pack the H&M catalogue's tower inputs (tokens + MiniLM vectors, deduplicated, fp16)
    python -m benchmarks.item_tower_gpu pack --dataset hm --out .devcarry/hm_inputs.pt
    # there (one GPU, or several with torchrun): train each variant, time every epoch
    python -m benchmarks.item_tower_gpu train --inputs .devcarry/hm_inputs.pt --device cuda --out $OUT

``train`` writes one checkpoint per variant (weights in bf16 to stay small; ``atelier`` loads
them like its own) and ``timings.json`` with seconds and items/s per epoch, the device and date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from atelier.models.item_tower import ItemInputs, ItemTower, ItemTowerConfig, save_checkpoint
from atelier.train.item import TrainItemConfig, train_item_tower
from atelier.vocab import ItemTokens, Vocab

VARIANTS = {  # name: (use_std, use_re, use_text)
    "std+re+text": (True, True, True),
    "std+re": (True, True, False),
    "text": (False, False, True),
}
TOKEN_FIELDS = ("std_ids", "std_field_ids", "std_mask", "re_ids", "re_parent_ids", "re_field_ids", "re_mask")


def pack(dataset: str, out: Path, run_dir: Path) -> None:
    """Save tokens, deduplicated fp16 text vectors and the vocabulary of a catalogue in one file."""
    import numpy as np

    from atelier.config import Settings
    from atelier.ingest import load_tables
    from atelier.recommend.encoder import catalogue_inputs

    settings = Settings(run_dir=run_dir)
    vocab = Vocab.load(settings.paths.vocab)
    items = load_tables(settings.paths.dataset(dataset))[0]
    x = catalogue_inputs(items, dataset, vocab, settings.paths.features)
    text = x.text[:, 0].numpy()
    unique, inverse = np.unique(text, axis=0, return_inverse=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "dataset": dataset, "vocab": vocab.to_dict(),
        # int32 on the wire: the file must fit the 64 MiB a device call carries.
        "tokens": {f: (getattr(x.tokens, f).int() if f.endswith("ids") else getattr(x.tokens, f))
                   for f in TOKEN_FIELDS},
        "text_unique": torch.from_numpy(unique).half(), "text_index": torch.from_numpy(inverse.reshape(-1)).int(),
        "item_ids": items["item_id"].astype(str).tolist(),
    }, out)
    size = out.stat().st_size / 2**20
    print(f"packed {len(items):,} items ({len(unique):,} distinct texts) into {out} ({size:.1f} MiB)")


def unpack(path: Path) -> tuple[ItemInputs, Vocab, dict[str, object]]:
    """Inputs, vocabulary and metadata from a packed file."""
    blob = torch.load(path, weights_only=False)
    tokens = ItemTokens(*(blob["tokens"][f].long() if f.endswith("ids") else blob["tokens"][f] for f in TOKEN_FIELDS))
    text = blob["text_unique"].float()[blob["text_index"].long()][:, None, :]  # (n, 1, 384)
    return ItemInputs(tokens, text, text.abs().sum(-1) > 0), Vocab.from_dict(blob["vocab"]), blob


def train(inputs_path: Path, device: str, out: Path, epochs: int, variants: list[str], batch_size: int) -> None:
    """Train each variant; record per-epoch time and throughput; save bf16 checkpoints."""
    x, vocab, blob = unpack(inputs_path)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    results: dict[str, object] = {
        "command": "python -m benchmarks.item_tower_gpu train " + " ".join(os.sys.argv[2:]),  # type: ignore[attr-defined]
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "world_size": world,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "items": len(x.tokens), "variants": {},
    }
    for name in variants:
        use_std, use_re, use_text = VARIANTS[name]
        cfg = TrainItemConfig(epochs=epochs, batch_size=batch_size, device=device, use_std=use_std, use_re=use_re,
                              use_text=use_text)
        model_cfg = ItemTowerConfig(vocab.std_size, vocab.re_size, vocab.field_size, n_text=1,
                                    title_field_id=vocab.field_id("title"),
                                    description_field_id=vocab.field_id("description"))
        t0 = time.perf_counter()
        model, history = train_item_tower(x, model_cfg, cfg)
        history["total_seconds"] = round(time.perf_counter() - t0, 2)
        results["variants"][name] = history  # type: ignore[index]
        if rank == 0:
            small = ItemTower(model.config)
            small.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
            small = small.to(torch.bfloat16)
            save_checkpoint(small, out / f"item_tower-{blob['dataset']}-{name.replace('+', '_')}.pt", vocab.to_dict(),
                            {"dataset": blob["dataset"], "history": history, "variant": name})
        print(name, [(e["epoch"], round(e["loss"], 4), e["seconds"], e["items_per_s"]) for e in history["epochs"]],
              flush=True)
    if rank == 0:
        (out / f"timings-{world}x.json").write_text(json.dumps(results, indent=2, default=str))


def main() -> None:
    """Command line: pack | train."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--dataset", default="hm")
    p.add_argument("--out", type=Path, default=Path(".devcarry/hm_inputs.pt"))
    p.add_argument("--run-dir", type=Path, default=Path("runs"))
    t = sub.add_parser("train")
    t.add_argument("--inputs", type=Path, required=True)
    t.add_argument("--device", default="cuda")
    t.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/models")))
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=512)
    t.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    if args.cmd == "pack":
        pack(args.dataset, args.out, args.run_dir)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        train(args.inputs, args.device, args.out, args.epochs, args.variants, args.batch_size)


if __name__ == "__main__":
    main()

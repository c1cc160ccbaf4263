"""GPU throughput of the log-likelihood scorer (``embedded-ll``) with transformers, on one GPU.

Two steps, because the GPU machine has torch and transformers but not atelier's other needs:

1. here: ``python -m benchmarks.bench_loglik_gpu export --out DIR [--n-extra 2000]`` writes
   ``DIR/spec.json``: the scorer's prompt template, questions and candidate labels (from
   ``atelier.enrich.loglik``), the benchmark sample (same seed, with gold values) and extra random
   products for throughput. Product text is copied there: keep DIR out of git.
2. there: ``python bench_loglik_gpu.py run --spec DIR/spec.json --gguf-dir D --out OUT`` loads the
   GGUF with transformers (dequantised to bf16), scores every allowed value of every field of every
   product exactly as the CPU scorer does (mean log-probability of the label's tokens after the
   field's question), and writes items/s and the sample's accuracy per field.

Batching: one row per (product, field) for each label's first token (all one-token labels at once)
plus one row per multi-token label; rows sorted by length and packed up to a token budget; the LM
head runs only at the positions whose next token is scored.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def export(out: Path, n: int, seed: int, n_extra: int) -> None:
    """Write the scorer spec, the benchmark sample with gold values and extra products."""
    import pandas as pd

    from atelier.config import Settings
    from atelier.enrich.fieldwise import product_text
    from atelier.enrich.loglik import _TURN, QUESTIONS, SPOKEN
    from atelier.enrich.prompt import label_maps
    from atelier.ingest import load_tables
    from atelier.schema import load_schema
    from benchmarks.bench_extraction import FIELDS, sample

    settings, schema = Settings(), load_schema()
    labels = label_maps(schema)
    fields = sorted({f for fs in FIELDS.values() for f in fs})
    spec: dict[str, Any] = {
        "template": _TURN, "questions": {f: QUESTIONS[f] for f in fields},
        "candidates": {f: [[v, SPOKEN.get(lab, lab)] for lab, v in labels[f].items()] for f in fields},
        "datasets": {},
    }
    for ds, ds_fields in FIELDS.items():
        products, gold, _ = sample(settings, ds, n, seed)
        items = load_tables(settings.dataset_dir(ds))[0]
        extra = items.sample(n=n_extra, random_state=seed + 1)
        spec["datasets"][ds] = {
            "fields": ds_fields,
            "sample": [{"text": product_text(p.title, p.description), "gold": g}
                       for p, g in zip(products, gold, strict=True)],
            "extra": [product_text(str(r.title or ""), "" if pd.isna(r.description) else str(r.description))
                      for r in extra[["title", "description"]].itertuples(index=False)],
        }
    # Token ids from llama.cpp's own tokenizer, so the GPU scores exactly the CPU scorer's tokens
    # (transformers' GGUF tokenizer splits some texts differently).
    from llama_cpp import Llama


    vocab = Llama(model_path=str(settings.gguf_path()), vocab_only=True, verbose=False)

    def ids(text: str, bos: bool = False) -> list[int]:
        return list(vocab.tokenize(text.encode("utf-8"), add_bos=bos, special=True))

    head, tail = _TURN.split("{product}")
    spec["tokens"] = {
        "questions": {f: ids(tail.replace("{question}", q)) for f, q in spec["questions"].items()},
        "candidates": {f: [ids(text) for _, text in c] for f, c in spec["candidates"].items()},
        "prefix": {ds: {"sample": [ids(head + "Product: " + d["text"], bos=True) for d in data["sample"]],
                        "extra": [ids(head + "Product: " + t, bos=True) for t in data["extra"]]}
                   for ds, data in spec["datasets"].items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    print(f"written: {out / 'spec.json'}")


def run(spec_path: Path, gguf_dir: Path, gguf_file: str, out: Path, token_budget: int) -> None:
    """Load the model on the GPU, score the sample and the extra products, write the report."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = json.loads(spec_path.read_text())
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.bfloat16).cuda().eval()
    load_s = time.perf_counter() - t0
    softcap = getattr(model.config, "final_logit_softcapping", None)
    head, tail = spec["template"].split("{product}")

    def ids(text: str, bos: bool = False) -> list[int]:
        return ([tok.bos_token_id] if bos else []) + tok(text, add_special_tokens=False)["input_ids"]

    pre = spec.get("tokens")
    questions = pre["questions"] if pre else {f: ids(tail.replace("{question}", q))
                                              for f, q in spec["questions"].items()}
    cands = pre["candidates"] if pre else {f: [ids(text) for _, text in c] for f, c in spec["candidates"].items()}
    values = {f: [v for v, _ in c] for f, c in spec["candidates"].items()}

    @torch.inference_mode()
    def score(texts: list[str] | list[list[int]], fields: list[str]) -> list[dict[str, str]]:
        # rows: (tokens, [(position, target token, product, field, candidate)])
        rows: list[tuple[list[int], list[tuple[int, int, int, str, int]]]] = []
        for pi, text in enumerate(texts):
            prefix = text if isinstance(text, list) else ids(head + "Product: " + text, bos=True)
            for f in fields:
                base = prefix + questions[f]
                rows.append((base, [(len(base) - 1, c[0], pi, f, ci) for ci, c in enumerate(cands[f])]))
                for ci, c in enumerate(cands[f]):
                    if len(c) > 1:
                        seq = base + c[:-1]
                        rows.append((seq, [(len(base) - 1 + k, c[k], pi, f, ci) for k in range(1, len(c))]))
        sums = {(pi, f): torch.zeros(len(cands[f])) for pi in range(len(texts)) for f in fields}
        rows.sort(key=lambda r: len(r[0]))
        start = 0
        while start < len(rows):
            width = len(rows[start][0])
            end = start
            while end < len(rows) and (end - start + 1) * len(rows[end][0]) <= token_budget:
                end += 1
            end = max(end, start + 1)
            chunk = rows[start:end]
            width = len(chunk[-1][0])
            inp = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (seq, _) in enumerate(chunk):
                inp[i, :len(seq)] = torch.tensor(seq)
                mask[i, :len(seq)] = 1
            hidden = model.model(input_ids=inp.cuda(), attention_mask=mask.cuda()).last_hidden_state  # (B, L, d)
            reads = [(i, pos, tgt, pi, f, ci) for i, (_, rs) in enumerate(chunk) for pos, tgt, pi, f, ci in rs]
            # One LM-head row per scored position that is distinct (a first-token row serves all labels).
            keys = sorted({(i, pos) for i, pos, *_ in reads})
            where = {k: j for j, k in enumerate(keys)}
            sel = hidden[torch.tensor([k[0] for k in keys]), torch.tensor([k[1] for k in keys])]  # (K, d)
            logits = model.lm_head(sel).float()  # (K, vocab)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            logp = torch.log_softmax(logits, dim=-1)
            idx = torch.tensor([where[(i, pos)] for i, pos, *_ in reads], device=logp.device)
            tgt = torch.tensor([r[2] for r in reads], device=logp.device)
            got = logp[idx, tgt].cpu()
            for (_, _, _, pi, f, ci), lp in zip(reads, got.tolist(), strict=True):
                sums[(pi, f)][ci] += lp
            start = end
        torch.cuda.synchronize()
        out: list[dict[str, str]] = []
        for pi in range(len(texts)):
            picks = {}
            for f in fields:
                mean = sums[(pi, f)] / torch.tensor([len(c) for c in cands[f]], dtype=torch.float32)
                picks[f] = values[f][int(mean.argmax())]
            out.append(picks)
        return out

    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                              "transformers": __import__("transformers").__version__, "load_seconds": round(load_s, 1),
                              "token_budget": token_budget, "llama_cpp_tokens": bool(pre), "datasets": {}}
    for ds, data in spec["datasets"].items():
        fields = data["fields"]
        texts: Any = pre["prefix"][ds]["sample"] if pre else [d["text"] for d in data["sample"]]
        extra: Any = pre["prefix"][ds]["extra"] if pre else data["extra"]
        score(texts[:8], fields)  # warm-up
        t = time.perf_counter()
        picks = score(texts, fields)
        sample_s = time.perf_counter() - t
        acc = {}
        for f in fields:
            pairs = [(p[f], d["gold"][f]) for p, d in zip(picks, data["sample"], strict=True) if f in d["gold"]]
            acc[f] = round(sum(a == b for a, b in pairs) / len(pairs), 3)
        t = time.perf_counter()
        score(extra, fields)
        extra_s = time.perf_counter() - t
        report["datasets"][ds] = {
            "fields": fields, "sample_n": len(picks), "sample_accuracy_all": acc, "sample_seconds": round(sample_s, 2),
            "extra_n": len(data["extra"]), "extra_seconds": round(extra_s, 2),
            "items_per_s": round(len(data["extra"]) / extra_s, 1),
            "sample_picks": picks,
        }
        print(ds, {k: v for k, v in report["datasets"][ds].items() if k != "sample_picks"}, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loglik-gpu.json").write_text(json.dumps(report, indent=1))


def main() -> None:
    """``export`` here, ``run`` on the GPU machine."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export")
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--n", type=int, default=100)
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--n-extra", type=int, default=2000)
    rn = sub.add_parser("run")
    rn.add_argument("--spec", type=Path, required=True)
    rn.add_argument("--gguf-dir", type=Path, required=True)
    rn.add_argument("--gguf-file", default="gemma3-270m-q4_k_m.gguf")
    rn.add_argument("--out", type=Path, required=True)
    rn.add_argument("--token-budget", type=int, default=65536)
    args = ap.parse_args()
    if args.cmd == "export":
        export(args.out, args.n, args.seed, args.n_extra)
    else:
        run(args.spec, args.gguf_dir, args.gguf_file, args.out, args.token_budget)


if __name__ == "__main__":
    main()

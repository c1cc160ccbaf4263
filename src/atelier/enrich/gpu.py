"""Log-likelihood scoring on a GPU: many products per forward, each product's prompt computed once.

The same method as the CPU scorer (``loglik.LogLikExtractor.score_questions``): after a product prefix,
each *ask* (a question plus its candidate answers, e.g. a field's question and every allowed label, or
"what does <phrase> describe?" and the RE field names) scores each candidate by the mean log-probability
of its tokens. On the CPU one llama.cpp decode holds a product's prefix once, shared by every candidate
through sequence ids; here the same tree is packed into one row of a batch:

    [prefix][question 1][cand 1.1 tokens but the last][cand 1.2 ...]...[question 2][cand 2.1 ...]...

with positions that restart after the prefix for every question (as if each question followed the
prefix alone) and a 4-D attention mask in which a token sees the prefix, its own question (for a
candidate token) and the earlier tokens of its own segment: ``mask[i, j] = j <= i and seg[j] in
{seg[i], parent(seg[i]), 0}`` (segment 0 is the prefix). The prefix is computed once per product, a
question once for all its candidates, and every label of every field of a batch of products goes
through one forward; the LM head runs only on the rows whose next token is read. Rows are sorted by
length and cut into batches under a token budget.

This module runs on a machine with torch and transformers but without atelier's other needs (the GPU
machines have no pydantic): it imports nothing from atelier, and ``python src/atelier/enrich/gpu.py``
is the entry point there (``benchmarks/bench_enrich_gpu.py`` builds the spec here and reads the results).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Ask", "Tree", "TreeScorer", "attach_lora", "load_model", "pack_tree"]

GGUF_FILE = "gemma3-270m-q4_k_m.gguf"


@dataclass(frozen=True)
class Ask:
    """One question after the product prefix and the token lists of its candidate answers."""

    question: Sequence[int]
    candidates: Sequence[Sequence[int]]


@dataclass
class Tree:
    """One product: its prefix tokens (BOS included) and its asks."""

    prefix: Sequence[int]
    asks: list[Ask] = field(default_factory=list)


@dataclass
class Packed:
    """One product's tree as flat arrays (see the module docstring)."""

    tokens: np.ndarray  # (n,) int64
    pos: np.ndarray  # (n,) logical positions
    seg: np.ndarray  # (n,) segment of each token (0 = prefix)
    par: np.ndarray  # (n,) parent segment (-1 for the prefix)
    read_row: np.ndarray  # (r,) packed index whose logits predict the read token
    read_tok: np.ndarray  # (r,) the token whose log-probability is read
    read_key: np.ndarray  # (r,) flat candidate index within the tree
    cand_len: np.ndarray  # (c,) tokens per candidate (the divisor of the mean)
    cand_ask: np.ndarray  # (c,) ask of each candidate


def pack_tree(tree: Tree) -> Packed:
    """Flatten one tree: tokens, positions, segments and where each candidate token is read."""
    toks: list[int] = list(tree.prefix)
    n_p = len(toks)
    pos = list(range(n_p))
    seg = [0] * n_p
    par = [-1] * n_p
    rrow: list[int] = []
    rtok: list[int] = []
    rkey: list[int] = []
    clen: list[int] = []
    cask: list[int] = []
    s = 0
    for ai, ask in enumerate(tree.asks):
        s += 1
        q_seg = s
        q = list(ask.question)
        if not q:
            raise ValueError("an ask needs a non-empty question")
        start = len(toks)
        toks += q
        pos += range(n_p, n_p + len(q))
        seg += [q_seg] * len(q)
        par += [0] * len(q)
        q_last = start + len(q) - 1
        after = n_p + len(q)
        for cand in ask.candidates:
            c = list(cand)
            key = len(clen)
            clen.append(len(c))
            cask.append(ai)
            s += 1
            prev = q_last
            for k, t in enumerate(c):
                rrow.append(prev)
                rtok.append(t)
                rkey.append(key)
                if k < len(c) - 1:  # the last token is only predicted, never fed
                    toks.append(t)
                    pos.append(after + k)
                    seg.append(s)
                    par.append(q_seg)
                    prev = len(toks) - 1
    i64 = np.int64
    return Packed(np.asarray(toks, i64), np.asarray(pos, i64), np.asarray(seg, i64), np.asarray(par, i64),
                  np.asarray(rrow, i64), np.asarray(rtok, i64), np.asarray(rkey, i64), np.asarray(clen, i64),
                  np.asarray(cask, i64))


def tree_mask(seg: Any, par: Any, valid: Any, pos: Any = None, window: int | None = None) -> Any:
    """(B, 1, L, L) boolean attention mask of packed trees: causal, and only the own/parent/prefix segments;
    with ``window``, also only keys less than ``window`` logical positions back (Gemma's sliding layers)."""
    import torch

    length = seg.shape[1]
    causal = torch.ones((length, length), dtype=torch.bool, device=seg.device).tril()
    sj = seg[:, None, :]  # keys
    ok = (sj == seg[:, :, None]) | (sj == par[:, :, None]) | (sj == 0)
    ok &= causal[None] & valid[:, None, :]
    if window is not None and pos is not None:
        ok &= (pos[:, :, None] - pos[:, None, :]) < window
    ok |= torch.eye(length, dtype=torch.bool, device=seg.device)[None]  # padding rows see themselves (no NaN)
    return ok[:, None]


# ------------------------------------------------------------------ model loading


def _parallel_dequantize(workers: int) -> Callable[[], None]:
    """Make ``gguf.dequantize`` split big tensors by rows over threads (numpy releases the GIL); returns undo."""
    from concurrent.futures import ThreadPoolExecutor

    import gguf

    original = gguf.dequantize

    def dequantize(data: Any, qtype: Any) -> Any:
        if getattr(data, "ndim", 0) < 2 or data.shape[0] < 4 * workers:
            return original(data, qtype)
        parts = np.array_split(data, workers)
        with ThreadPoolExecutor(workers) as pool:
            return np.concatenate(list(pool.map(lambda p: original(p, qtype), parts)))

    gguf.dequantize = dequantize

    def undo() -> None:
        gguf.dequantize = original

    return undo


def load_model(gguf_dir: Path, gguf_file: str = GGUF_FILE, device: str = "cuda", dtype_name: str = "bfloat16",
               workers: int = 16) -> tuple[Any, float]:
    """The GGUF through transformers (dequantised on ``workers`` threads), on ``device``; (model, seconds)."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    undo = _parallel_dequantize(workers)
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_file, dtype=getattr(torch, dtype_name), attn_implementation="sdpa")
    finally:
        undo()
    return model.to(device).eval(), time.perf_counter() - t0


def attach_lora(model: Any, adapter_dir: Path, merge: bool = True) -> Any:
    """The model with a PEFT LoRA adapter, merged into the weights by default (then as fast as the base)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    return peft_model.merge_and_unload() if merge else peft_model


# ------------------------------------------------------------------ scoring


class TreeScorer:
    """Mean log-probability of every candidate of every ask of many trees, batched on one device."""

    def __init__(self, model: Any, device: str = "cuda", token_budget: int = 262_144, head_rows: int = 8192,
                 max_rows: int = 1024) -> None:
        self.model = model
        self.device = device
        self.token_budget = token_budget  # padded tokens per forward (batch x longest row)
        self.head_rows = head_rows  # LM-head rows per chunk: (rows, vocab) float32 logits live at once
        self.max_rows = max_rows  # trees per forward (the mask is rows x L x L)
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.body, self.head = core.model, core.lm_head
        self.config = core.config
        self.softcap = getattr(core.config, "final_logit_softcapping", None)
        self.stats: dict[str, Any] = {"forwards": 0, "tokens": 0, "padded_tokens": 0, "reads": 0}

    def batches(self, packed: list[Packed]) -> Iterator[list[int]]:
        """Tree indices in length order, cut so that rows x longest row stays under the token budget."""
        order = sorted(range(len(packed)), key=lambda i: len(packed[i].tokens))
        batch: list[int] = []
        for i in order:
            longest = len(packed[i].tokens)
            if batch and ((len(batch) + 1) * longest > self.token_budget or len(batch) >= self.max_rows):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def forward(self, packed: list[Packed]) -> list[np.ndarray]:
        """Per tree, the mean log-probability of each candidate (flat, ``Packed.cand_ask`` order)."""
        import torch

        dev = self.device
        b = len(packed)
        length = max(len(p.tokens) for p in packed)
        tokens = np.zeros((b, length), np.int64)
        pos = np.zeros((b, length), np.int64)
        seg = np.full((b, length), -2, np.int64)
        par = np.full((b, length), -3, np.int64)
        valid = np.zeros((b, length), bool)
        for i, p in enumerate(packed):
            n = len(p.tokens)
            tokens[i, :n], pos[i, :n], seg[i, :n], par[i, :n], valid[i, :n] = p.tokens, p.pos, p.seg, p.par, True
        seg_t, par_t, valid_t, pos_t = (torch.from_numpy(x).to(dev, non_blocking=True) for x in (seg, par, valid, pos))
        masks = {"full_attention": tree_mask(seg_t, par_t, valid_t)}
        window = getattr(self.config, "sliding_window", None)
        masks["sliding_attention"] = tree_mask(seg_t, par_t, valid_t, pos_t, window) if window else masks[
            "full_attention"]
        with torch.inference_mode():
            hidden = self.body(input_ids=torch.from_numpy(tokens).to(dev, non_blocking=True), position_ids=pos_t,
                               attention_mask=masks, use_cache=False).last_hidden_state  # (b, L, d)
            rows_b = np.concatenate([np.full(len(p.read_row), i) for i, p in enumerate(packed)])
            rows_l = np.concatenate([p.read_row for p in packed])
            targets = torch.from_numpy(np.concatenate([p.read_tok for p in packed])).to(dev)
            # One LM-head row per distinct read position (a question's last token serves all its labels).
            flat = rows_b * length + rows_l
            uniq, inverse = np.unique(flat, return_inverse=True)
            sel = hidden.reshape(b * length, -1)[torch.from_numpy(uniq).to(dev)]  # (u, d)
            logp_rows = []
            inv_t = torch.from_numpy(inverse.reshape(-1)).to(dev)
            lse = torch.empty(len(uniq), device=dev, dtype=torch.float32)
            for s in range(0, len(uniq), self.head_rows):
                logits = self.head(sel[s:s + self.head_rows]).float()  # (chunk, vocab)
                if self.softcap:
                    logits = torch.tanh(logits / self.softcap) * self.softcap
                lse[s:s + self.head_rows] = torch.logsumexp(logits, dim=-1)
                # targets read from this chunk
                in_chunk = (inv_t >= s) & (inv_t < s + self.head_rows)
                idx = in_chunk.nonzero().squeeze(1)
                logp_rows.append((idx, logits[inv_t[idx] - s, targets[idx]]))
            got_t = torch.empty(len(targets), device=dev, dtype=torch.float32)
            for idx, vals in logp_rows:
                got_t[idx] = vals
            got = (got_t - lse[inv_t]).cpu().numpy()
        self.stats["forwards"] += 1
        self.stats["tokens"] += int(valid.sum())
        self.stats["padded_tokens"] += b * length
        self.stats["reads"] += len(targets)
        out = []
        k = 0
        for p in packed:
            n = len(p.read_tok)
            sums = np.bincount(p.read_key, weights=got[k:k + n], minlength=len(p.cand_len))
            out.append(sums / p.cand_len)
            k += n
        return out

    def score(self, trees: Sequence[Tree | Packed], on_batch: Callable[[int], None] | None = None) -> list[np.ndarray]:
        """Per tree, the mean log-probability of each candidate, flat in ask order (``Packed.cand_ask``)."""
        packed = [t if isinstance(t, Packed) else pack_tree(t) for t in trees]
        out: list[np.ndarray] = [np.zeros(0)] * len(packed)
        for idx in self.batches(packed):
            for i, s in zip(idx, self.forward([packed[i] for i in idx]), strict=True):
                out[i] = s
            if on_batch is not None:
                on_batch(len(idx))
        return out


def segment_argmax(scores: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Within each run of equal ``group`` values (non-decreasing), the index of the best score, relative to
    the run's start; one entry per run."""
    if len(scores) == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((-scores, group))  # by group, best first
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    first = order[np.searchsorted(group[order], group[starts])]
    return first - starts


# ------------------------------------------------------------------ the spec (benchmarks/bench_enrich_gpu.py export)


def read_spec(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, arrays) of a ``spec.npz``."""
    z = np.load(path)
    arrays = {k: z[k] for k in z.files}
    return json.loads(bytes(arrays.pop("meta")).decode()), arrays


def spec_trees(meta: dict[str, Any], arrays: dict[str, np.ndarray], name: str, lo: int = 0,
               hi: int | None = None) -> list[Tree]:
    """Trees ``lo:hi`` of one exported set: STD asks (field question + labels) first, then RE part asks."""
    cand_sets = meta["cand_sets"]
    std_q, std_c = meta["std_questions"], meta["std_cands"]
    re_c = cand_sets[meta["re_cands"]]
    head, tail = meta["re_head"], meta["re_tail"]
    p, po = arrays[f"{name}.prefix"], arrays[f"{name}.prefix_off"]
    st, so = arrays[f"{name}.std"], arrays[f"{name}.std_off"]
    rt, rto, rf, ro = (arrays[f"{name}.{k}"] for k in ("re_tok", "re_tok_off", "re_full", "re_off"))
    hi = len(po) - 1 if hi is None else hi
    out = []
    for i in range(lo, hi):
        asks = [Ask(std_q[f], cand_sets[std_c[f]]) for f in st[so[i]:so[i + 1]].tolist()]
        for k in range(int(ro[i]), int(ro[i + 1])):
            toks = rt[rto[k]:rto[k + 1]].tolist()
            asks.append(Ask(toks if rf[k] else head + toks + tail, re_c))
        out.append(Tree(p[po[i]:po[i + 1]].tolist(), asks))
    return out


_SPEC: tuple[dict[str, Any], dict[str, np.ndarray]] | None = None  # read before the pool forks


def _pack_range(job: tuple[str, int, int]) -> list[Packed]:
    assert _SPEC is not None
    name, lo, hi = job
    out = []
    for t in spec_trees(*_SPEC, name, lo, hi):
        p = pack_tree(t)
        # int32 halves what crosses the process pipe
        out.append(Packed(*(getattr(p, f).astype(np.int32) for f in Packed.__dataclass_fields__)))
    return out


def pack_sets(spec_path: Path, workers: int) -> tuple[dict[str, Any], dict[str, list[Packed]], list[Packed]]:
    """Every set's trees packed on ``workers`` processes (forked before CUDA starts), and the prior trees."""
    import multiprocessing as mp

    global _SPEC
    _SPEC = read_spec(spec_path)
    meta = _SPEC[0]
    jobs = [(name, lo, min(lo + 500, n)) for name, n in meta["sets"].items() for lo in range(0, n, 500)]
    with mp.get_context("fork").Pool(workers) as pool:
        done = pool.map(_pack_range, jobs, chunksize=1)
    sets: dict[str, list[Packed]] = {name: [] for name in meta["sets"]}
    for (name, _, _), packed in zip(jobs, done, strict=True):
        sets[name].extend(packed)
    prior = [pack_tree(Tree(meta["prior_prefix"], [Ask(q, meta["cand_sets"][c])]))
             for q, c in zip(meta["std_questions"], meta["std_cands"], strict=True)]
    return meta, sets, prior


# ------------------------------------------------------------------ the spec's run on the GPU machine


def run_spec(spec_path: Path, gguf_dir: Path, out: Path, adapters: dict[str, Path | None], token_budget: int,
             dtype_name: str = "bfloat16", workers: int = 12, sets_only: list[str] | None = None,
             head_rows: int = 8192) -> dict[str, Any]:
    """Score every set of a spec under each variant; write the picks and the timings.

    ``adapters``: variant name -> LoRA adapter folder (None = the base model), in order; an adapter is
    merged into the weights, so at most one comes after the base. Per set and variant, the best candidate
    of each ask (``best``) and, for STD asks, the best after subtracting that field's score under the
    content-free product "N/A" (``best_cal``) go to ``out/picks-<variant>.npz``; timings to ``out/report.json``.
    """
    import torch

    if sum(a is not None for a in adapters.values()) > 1:
        raise SystemExit("at most one LoRA variant per run (it is merged into the base weights)")
    t_all = time.perf_counter()
    t = time.perf_counter()
    meta, sets, prior_trees = pack_sets(spec_path, workers)  # before CUDA: the pool forks
    if sets_only:
        sets = {k: v for k, v in sets.items() if k in sets_only}
    pack_s = time.perf_counter() - t
    print(f"packed {sum(len(v) for v in sets.values())} trees in {pack_s:.1f}s", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, load_s = load_model(gguf_dir, device=device, dtype_name=dtype_name)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "dtype": dtype_name, "load_seconds": round(load_s, 1),
        "pack_seconds": round(pack_s, 1), "token_budget": token_budget, "variants": {},
    }
    print(f"model loaded in {load_s:.1f}s on {device}", flush=True)
    n_fields = len(meta["std_questions"])
    width = max(len(meta["cand_sets"][c]) for c in meta["std_cands"])
    out.mkdir(parents=True, exist_ok=True)
    model = base
    for variant, adapter in adapters.items():
        if adapter is not None:
            t = time.perf_counter()
            model = attach_lora(base, adapter)
            report.setdefault("adapter_seconds", {})[variant] = round(time.perf_counter() - t, 1)
        scorer = TreeScorer(model, device, token_budget=token_budget, head_rows=head_rows)
        scorer.score(prior_trees[:2])  # warm-up (kernels, allocator)
        prior = np.zeros((n_fields, width))
        for f, s in enumerate(scorer.score(prior_trees)):
            prior[f, :len(s)] = s
        arrays: dict[str, Any] = {}  # Any: savez_compressed types its **kwds as allow_pickle too
        vrep: dict[str, Any] = {}
        for name, packed in sets.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            scores = scorer.score(packed)
            if device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            # Flat over the set: each candidate's score, its global ask and its index within the ask.
            n_std = np.diff(_SPEC_ARR(name, "std_off"))
            flat = np.concatenate(scores)
            ask_local = np.concatenate([p.cand_ask for p in packed]).astype(np.int64)
            n_asks = np.array([int(p.cand_ask.max()) + 1 if len(p.cand_ask) else 0 for p in packed])
            ask_off = np.cumsum(np.r_[0, n_asks])
            item = np.repeat(np.arange(len(packed)), [len(p.cand_ask) for p in packed])
            ask = ask_off[item] + ask_local
            starts = np.flatnonzero(np.r_[True, ask[1:] != ask[:-1]])
            within = np.arange(len(ask)) - np.repeat(starts, np.diff(np.r_[starts, len(ask)]))
            field = np.full(len(ask), -1)
            is_std = ask_local < n_std[item]
            std_all = _SPEC_ARR(name, "std").astype(np.int64)
            std_off = _SPEC_ARR(name, "std_off")
            field[is_std] = std_all[std_off[item[is_std]] + ask_local[is_std]]
            cal = flat - np.where(is_std, prior[np.maximum(field, 0), np.minimum(within, width - 1)], 0.0)
            arrays[f"{name}.best"] = segment_argmax(flat, ask).astype(np.int16)
            arrays[f"{name}.best_cal"] = segment_argmax(cal, ask).astype(np.int16)
            arrays[f"{name}.offsets"] = ask_off.astype(np.int64)
            vrep[name] = {"items": len(packed), "seconds": round(dt, 2),
                          "items_per_s": round(len(packed) / dt, 1) if dt else None,
                          "asks": int(ask_off[-1]), "candidates": len(flat),
                          "tokens": int(sum(len(p.tokens) for p in packed))}
            print(variant, name, vrep[name], flush=True)
        vrep["scorer"] = dict(scorer.stats)
        if device == "cuda":
            vrep["max_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        report["variants"][variant] = vrep
        np.savez_compressed(out / f"picks-{variant}.npz", **arrays)
        (out / "report.json").write_text(json.dumps(report, indent=1))  # after each variant: what is done stays
    report["wall_seconds"] = round(time.perf_counter() - t_all, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def _SPEC_ARR(name: str, key: str) -> np.ndarray:
    assert _SPEC is not None
    return _SPEC[1][f"{name}.{key}"]


def main(argv: list[str] | None = None) -> None:
    """``python gpu.py run --spec SPEC --gguf-dir D --out OUT [--lora NAME=DIR ...]`` on the GPU machine."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rn = sub.add_parser("run")
    rn.add_argument("--spec", type=Path, required=True)
    rn.add_argument("--gguf-dir", type=Path, required=True)
    rn.add_argument("--out", type=Path, required=True)
    rn.add_argument("--lora", nargs="*", default=[], help="NAME=ADAPTER_DIR variants besides the base model")
    rn.add_argument("--token-budget", type=int, default=262_144)
    rn.add_argument("--dtype", default="bfloat16")
    rn.add_argument("--workers", type=int, default=12, help="processes packing the trees")
    rn.add_argument("--sets", nargs="*", help="only these sets of the spec")
    rn.add_argument("--no-base", action="store_true", help="skip the base model variant")
    rn.add_argument("--head-rows", type=int, default=8192, help="LM-head rows at once ((rows, vocab) fp32 logits)")
    args = ap.parse_args(argv)
    adapters: dict[str, Path | None] = {} if args.no_base else {"base": None}
    adapters.update({k: Path(v) for k, v in (x.split("=", 1) for x in args.lora)})
    report = run_spec(args.spec, args.gguf_dir, args.out, adapters, args.token_budget, args.dtype, args.workers,
                      args.sets, args.head_rows)
    print(json.dumps({k: v for k, v in report.items() if k != "variants"}), flush=True)


if __name__ == "__main__":
    main()

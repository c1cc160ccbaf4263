"""Full-catalogue RE enrichment on one GPU: the embedded backend's prompt, batched greedy generation.

Three steps, because the GPU machine has torch and transformers but not atelier's other needs:

1. here: ``python benchmarks/bench_enrich_gpu.py export --dataset hm --out .devcarry/enrich``
   builds every product's request exactly as ``atelier enrich`` does for the RE phrases
   (``prepare()`` with ``EnrichOptions(fields=(), show_known=False)``: RE fields only, from title +
   description), formats it as llama-cpp-python does for this GGUF (the GGUF has no chat template,
   so llama-cpp-python falls back to its ``llama-2`` format; ``--chat gemma`` uses Gemma's turns
   instead), tokenises it with llama.cpp's own tokenizer, deduplicates products by the content
   hash of the request (``input_hash``: title, description, asked fields), and writes ``spec.npz``:
   the shared prompt head once, each distinct input's tail, and the token tables of the answer
   constraint (below). Product text is inside as token ids: keep the folder out of git.
2. there: ``python bench_enrich_gpu.py run --spec DIR/spec.npz --gguf-dir D --out OUT`` loads the
   GGUF with transformers (dequantised to bf16; a bf16 copy is saved beside it for the next call),
   generates every distinct input's answer greedily in length-sorted batches, and appends the raw
   answers to ``OUT/raw.jsonl.gz`` batch by batch (resumable: ``--skip`` a list of done hashes).
3. here: ``python benchmarks/bench_enrich_gpu.py collect --raw ... --out data/enriched`` parses and
   validates every answer through ``atelier.enrich.core`` (the same parse / repair / ``ItemJSON``
   path as every backend), fans each distinct answer out to the articles that share the input,
   and writes the enriched catalogue (item JSON per article without the listing text, plus error
   records) and its manifest.

The answer constraint is the llama.cpp grammar that ``response_format={"type": "json_object",
"schema": ...}`` builds from the answer schema (``{"re": {<10 keys in order>: [<= 2 strings of <= 32
chars>]}}``, optional single spaces), applied as a token mask on the GPU: a token is allowed when
all of its characters fit the grammar from the current state, greedy takes the best allowed token
(as llama.cpp's grammar sampler does). The key names between arrays are deterministic and are fed
as forced tokens (jump-forward), so the model picks the phrases, the array ends and the spacing.
Differences from the CPU backend: bf16 arithmetic instead of Q4_K_M kernels, no backslash escapes
inside phrases, the forced keys' tokenisation is llama.cpp's for the canonical text, and no
sampled retries (a truncated answer becomes an error record).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import sys
import time
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- answer grammar as token tables
# Per RE field the grammar is: [space] "[" space ( item ( "," space item )? )? "]" space,
# item = "\"" char{0,32} "\"" space, space = " "?, char = anything but '"' and '\\'.
MAXLEN = 32
# live states of one field (ids 0..N_LIVE-1)
PRE0, PRE1, A0, A0S, AFT0, AFT0S, AFT1, AFT1S, COM, COMS = range(10)
IN_BASE = 10  # IN(p, r) = IN_BASE + p * (MAXLEN + 1) + r
N_LIVE = IN_BASE + 2 * (MAXLEN + 1)
# terminal states (a field's array is closed); the forced text that follows depends on which
END, ENDS, ENDC, ENDCS, ENDQ, ENDB1, ENDB1S, ENDB2 = range(8)
END_CODE = 1000  # table value = END_CODE + terminal state


def _in(p: int, r: int) -> int:
    return IN_BASE + p * (MAXLEN + 1) + r


def step_char(state: int, ch: str, last: bool) -> int | None:
    """One character through one field's grammar; None = not allowed. END states are >= END_CODE."""
    if state >= END_CODE:
        t = state - END_CODE
        if not last:  # "]" space "," space "\"" (the key's letters are forced, not chosen)
            if t == END and ch == " ":
                return END_CODE + ENDS
            if t in (END, ENDS) and ch == ",":
                return END_CODE + ENDC
            if t == ENDC and ch == " ":
                return END_CODE + ENDCS
            if t in (ENDC, ENDCS) and ch == '"':
                return END_CODE + ENDQ
            return None
        # last field: "]" space "}" space "}" (then the answer is complete)
        if t == END and ch == " ":
            return END_CODE + ENDS
        if t in (END, ENDS) and ch == "}":
            return END_CODE + ENDB1
        if t == ENDB1 and ch == " ":
            return END_CODE + ENDB1S
        if t in (ENDB1, ENDB1S) and ch == "}":
            return END_CODE + ENDB2
        return None
    if state == PRE0:
        return PRE1 if ch == " " else A0 if ch == "[" else None
    if state == PRE1:
        return A0 if ch == "[" else None
    if state in (A0, A0S):
        if ch == " " and state == A0:
            return A0S
        return _in(0, MAXLEN) if ch == '"' else END_CODE + END if ch == "]" else None
    if state in (AFT0, AFT0S, AFT1, AFT1S):
        p = 0 if state in (AFT0, AFT0S) else 1
        if ch == " " and state in (AFT0, AFT1):
            return AFT0S if p == 0 else AFT1S
        if ch == "," and p == 0:
            return COM
        return END_CODE + END if ch == "]" else None
    if state in (COM, COMS):
        if ch == " " and state == COM:
            return COMS
        return _in(1, MAXLEN) if ch == '"' else None
    # IN(p, r)
    p, r = divmod(state - IN_BASE, MAXLEN + 1)
    if ch == '"':
        return AFT0 if p == 0 else AFT1
    if ch == "\\" or r == 0:
        return None
    return _in(p, r - 1)


def run_text(state: int, text: str, last: bool) -> int | None:
    """A token's text through the grammar from ``state`` (None when any character does not fit)."""
    for ch in text:
        nxt = step_char(state, ch, last)
        if nxt is None:
            return None
        state = nxt
    return state


def grammar_tables(pieces: list[bytes]) -> dict[str, Any]:
    """Sparse transition table for the tokens whose effect is not plain phrase text, plus masks.

    Plain tokens (no '"' or '\\') inside a phrase are handled on the GPU by length (``clen``);
    every other (state, token) pair that the grammar allows is listed here.
    """
    import numpy as np

    texts = [p.decode("utf-8", errors="replace") if p else "" for p in pieces]
    V = len(pieces)
    plain = np.zeros(V, dtype=bool)
    clen = np.zeros(V, dtype=np.int16)
    for i, (p, _t) in enumerate(zip(pieces, texts, strict=True)):
        if not p:
            continue
        # code points (continuation bytes do not count); byte tokens count as one
        clen[i] = sum(1 for b in p if not 0x80 <= b <= 0xBF) or 1
        plain[i] = b'"' not in p and b"\\" not in p
    rows_s, rows_t, rows_n = [], [], []
    structural = [i for i, t in enumerate(texts) if t and t[0] in ' ",[]}']
    quoted = [i for i, t in enumerate(texts) if t and not plain[i]]
    for last in (False, True):
        off = N_LIVE if last else 0
        for s in range(N_LIVE):
            cands = quoted if s >= IN_BASE else structural
            for i in cands:
                if s >= IN_BASE and plain[i]:
                    continue
                n = run_text(s, texts[i], last)
                if n is not None:
                    rows_s.append(off + s)
                    rows_t.append(i)
                    rows_n.append(n)
    return {"plain": plain, "clen": clen, "tbl_s": np.array(rows_s, dtype=np.int16),
            "tbl_t": np.array(rows_t, dtype=np.int32), "tbl_n": np.array(rows_n, dtype=np.int16)}


def forced_texts(re_fields: list[str]) -> list[list[str]]:
    """Forced text after field i's array closes, per terminal state (index: terminal state)."""
    out = []
    for i in range(len(re_fields)):
        if i + 1 < len(re_fields):
            key = re_fields[i + 1]
            out.append([f', "{key}":', f', "{key}":', f' "{key}":', f'"{key}":', f'{key}":', "", "", ""])
        else:
            out.append(["}}", "}}", "", "", "", "}", "}", ""])
    return out


# ---------------------------------------------------------------- export (here)
def export(dataset: str, out: Path, chat: str, limit: int | None) -> None:
    """Requests of every distinct product input, tokenised, plus the grammar tables."""
    import hashlib

    import numpy as np
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import format_llama2

    from atelier.config import Settings
    from atelier.enrich.batch import load_products
    from atelier.enrich.core import EnrichOptions, prepare
    from atelier.schema import load_schema

    settings, schema = Settings(), load_schema()
    options = EnrichOptions(fields=(), show_known=False)
    t0 = time.perf_counter()
    products = load_products(settings, dataset, limit, schema)
    print(f"{len(products)} products ({time.perf_counter() - t0:.0f}s)", flush=True)
    vocab = Llama(model_path=str(settings.gguf_path()), vocab_only=True, verbose=False)

    def fmt(content: str) -> str:
        if chat == "llama-2":  # what create_chat_completion does for a GGUF without a chat template
            return format_llama2(messages=[{"role": "user", "content": content}]).prompt
        return f"<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"

    def tok(text: str, bos: bool) -> list[int]:
        return list(vocab.tokenize(text.encode("utf-8"), add_bos=bos, special=True))

    hashes: list[str] = []
    order: dict[str, int] = {}
    first: list[int] = []
    re_fields: list[str] = []
    for n, p in enumerate(products):
        prep = prepare(p, schema, options)
        re_fields = prep.re_fields
        hashes.append(prep.input_hash)
        if prep.input_hash not in order:
            order[prep.input_hash] = len(first)
            first.append(n)
    print(f"{len(first)} distinct inputs", flush=True)
    # Split every prompt at "\n\nProduct listing:" into the shared head and the product's tail.
    split = "\n\nProduct listing:"
    head_text = None
    tails: list[list[int]] = []
    checked = 0
    for k, n in enumerate(first):
        content = prepare(products[n], schema, options).request.messages[0]["content"]
        prompt = fmt(content)
        cut = prompt.index(split)
        if head_text is None:
            head_text = prompt[:cut]
            head = tok(head_text, True)
        assert prompt[:cut] == head_text
        tail = tok(prompt[cut:], False)
        if k % 500 == 0:  # the split must not change the tokens
            assert tok(prompt, True) == head + tail, "prompt does not tokenise at the split"
            checked += 1
        tails.append(tail)
        if k % 10000 == 0:
            print(k, len(head), len(tail), flush=True)
    pieces = [vocab.detokenize([i]) for i in range(vocab.n_vocab())]
    tables = grammar_tables(pieces)
    forced = forced_texts(re_fields)
    forced_ids = [[tok(t, False) if t else [] for t in row] for row in forced]
    # the fixed start of every answer, up to the first key's colon
    start_ids = tok('{"re": {"' + re_fields[0] + '":', False)
    offsets = np.cumsum([0] + [len(t) for t in tails]).astype(np.int64)
    item_ids = [p.item_id for p in products]
    out.mkdir(parents=True, exist_ok=True)
    meta = {"dataset": dataset, "chat": chat, "re_fields": re_fields, "forced": forced, "forced_ids": forced_ids,
            "start_ids": start_ids, "n_live": N_LIVE, "in_base": IN_BASE, "maxlen": MAXLEN, "end_code": END_CODE,
            "hashes": [hashes[n] for n in first], "max_new_tokens": 32 + (4 + 2 * 12) * len(re_fields),
            "split_checked": checked, "head_tokens": len(head)}
    np.savez_compressed(out / "spec.npz", head=np.array(head, dtype=np.int32),
                        tails=np.concatenate([np.array(t, dtype=np.int32) for t in tails]), offsets=offsets,
                        piece_bytes=np.frombuffer(b"".join(pieces), dtype=np.uint8),
                        piece_off=np.cumsum([0] + [len(p) for p in pieces]).astype(np.int64),
                        meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **tables)
    # which distinct input each article uses (kept here: only collect needs it)
    (out / "articles.json").write_text(json.dumps({"item_ids": item_ids, "hashes": hashes}))
    digest = hashlib.sha256((out / "spec.npz").read_bytes()).hexdigest()[:16]
    print(f"written {out / 'spec.npz'} ({(out / 'spec.npz').stat().st_size / 1e6:.1f} MB, sha {digest}); "
          f"head {len(head)} tokens, tails mean {np.mean([len(t) for t in tails]):.0f}", flush=True)


# ---------------------------------------------------------------- run (GPU machine)
def load_model(gguf_dir: Path, gguf_file: str, device: str, dtype_name: str) -> tuple[Any, float]:
    """The model from a saved bf16 copy if there is one, else from the GGUF (then saved)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    # transformers will not save a GGUF-loaded model: keep class, config and weights ourselves
    saved = gguf_dir / f"converted-{dtype_name}.pt"
    if saved.is_file():
        blob = torch.load(saved, weights_only=False)
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = blob["cls"](blob["config"])
        torch.set_default_dtype(torch.float32)
        model.load_state_dict(blob["state"])
        model.tie_weights()
        return model.to(device=device, dtype=dtype).eval(), time.perf_counter() - t0
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=dtype)
    try:
        torch.save({"cls": type(model), "config": model.config, "state": model.state_dict()}, saved)
    except Exception as exc:
        print("could not save the converted model:", exc, flush=True)
    return model.to(device).eval(), time.perf_counter() - t0


class Decoder:
    """Batched greedy decoding under the answer grammar (token masks built from the spec's tables)."""

    def __init__(self, model: Any, spec: dict[str, Any], device: str) -> None:
        import torch

        self.model, self.device = model, device
        meta = spec["meta"]
        self.meta = meta
        V = int(model.config.vocab_size if hasattr(model.config, "vocab_size") else
                 model.config.get_text_config().vocab_size)
        n = len(spec["plain"])
        assert n <= V, (V, n)
        self.V = V
        n_live = meta["n_live"]
        self.n_live, self.in_base = n_live, meta["in_base"]
        self.maxlen, self.end_code = meta["maxlen"], meta["end_code"]
        tbl = torch.full((2 * n_live, V), -1, dtype=torch.int16)
        tbl[torch.from_numpy(spec["tbl_s"].astype("int64")), torch.from_numpy(spec["tbl_t"].astype("int64"))] = \
            torch.from_numpy(spec["tbl_n"])
        self.tbl = tbl.to(device)
        plain = torch.zeros(V, dtype=torch.bool)
        plain[:n] = torch.from_numpy(spec["plain"])
        clen = torch.full((V,), 10_000, dtype=torch.int32)
        clen[:n] = torch.from_numpy(spec["clen"].astype("int32"))
        self.plain, self.clen = plain.to(device), clen.to(device)
        # forced token lists: index = field * 8 + terminal state
        rows = [ids for field in meta["forced_ids"] for ids in field]
        width = max(1, max(len(r) for r in rows))
        forced = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                forced[i, : len(r)] = torch.tensor(r)
        self.forced = forced.to(device)
        self.forced_len = torch.tensor([len(r) for r in rows], device=device)
        self.n_fields = len(meta["re_fields"])
        self.start = torch.tensor(meta["start_ids"], dtype=torch.long, device=device)

    def generate(self, prompts: list[list[int]], max_new: int,
                 compact_at: float = 0.7) -> tuple[list[list[int]], dict[str, int]]:
        """Greedy answers (token ids, forced ones included) for one batch of prompt token lists."""
        import torch
        from transformers import DynamicCache

        dev = self.device
        B = len(prompts)
        L = max(len(p) for p in prompts)
        ids = torch.zeros((B, L), dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1
        # the fixed answer start ('{"re": {"category_specification":') is part of the prefill
        S = len(self.start)
        ids = torch.cat([ids, self.start.cpu().expand(B, S)], 1).to(dev)
        mask = torch.cat([mask, torch.ones((B, S), dtype=torch.long)], 1).to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out_tok = torch.full((B, max_new + S), -1, dtype=torch.long, device=dev)
        out_tok[:, :S] = self.start
        rows = torch.arange(B, device=dev)  # original row of each active row
        state = torch.full((B,), PRE0, dtype=torch.long, device=dev)
        field = torch.zeros(B, dtype=torch.long, device=dev)
        fid = torch.zeros(B, dtype=torch.long, device=dev)  # forced row being fed
        fpos = torch.full((B,), -1, dtype=torch.long, device=dev)  # -1: not forcing
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        stats = {"steps": 0, "compactions": 0, "truncated": 0}
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                use_cache=True, logits_to_keep=1).logits[:, -1]
            last_pos = pos[:, -1]
            for t in range(max_new):
                last_flag = (field == self.n_fields - 1).long()
                srow = last_flag * self.n_live + state.clamp(max=self.n_live - 1)
                allowed = self.tbl[srow] >= 0
                is_in = state >= self.in_base
                r = torch.where(is_in, (state - self.in_base) % (self.maxlen + 1), torch.zeros_like(state))
                allowed |= is_in[:, None] & self.plain[None, :] & (self.clen[None, :] <= r[:, None])
                lg = logits.float().masked_fill(~allowed, float("-inf"))
                choice = lg.argmax(-1)
                forcing = fpos >= 0
                ftok = self.forced[fid, fpos.clamp(min=0)]
                tok = torch.where(forcing, ftok, choice)
                tok = torch.where(done, torch.zeros_like(tok), tok)
                # grammar step for chosen tokens
                nxt = self.tbl[srow, choice].long()
                p_in = (state - self.in_base) // (self.maxlen + 1)
                plain_next = self.in_base + p_in * (self.maxlen + 1) + r - self.clen[choice].long()
                nxt = torch.where(nxt >= 0, nxt, plain_next)
                chosen = ~forcing & ~done
                # no allowed token at all (should not happen): the row ends here, truncated
                dead = chosen & torch.isinf(lg.max(-1).values)
                ended = chosen & ~dead & (nxt >= self.end_code)
                state = torch.where(chosen & ~ended & ~dead, nxt, state)
                # a closed array: start feeding the forced text that follows it
                term = (nxt - self.end_code).clamp(min=0)
                new_fid = field * 8 + term
                fid = torch.where(ended, new_fid, fid)
                fpos = torch.where(ended, torch.zeros_like(fpos), torch.where(forcing, fpos + 1, fpos))
                # forced text finished (or empty): next field, or the answer is complete
                flen = self.forced_len[fid]
                fin_forced = (fpos >= 0) & (fpos >= flen)
                last_field = field == self.n_fields - 1
                done = done | dead | (fin_forced & last_field)
                adv = fin_forced & ~last_field
                field = torch.where(adv, field + 1, field)
                state = torch.where(adv, torch.full_like(state, PRE0), state)
                fpos = torch.where(fin_forced, torch.full_like(fpos, -1), fpos)
                # record the token fed this step (forced ones too); a row that just finished feeds nothing
                out_tok[rows, S + t] = torch.where(done & ~(forcing | chosen), torch.full_like(tok, -1), tok)
                stats["steps"] = t + 1
                # done rows are -1 from here on; check for compaction / the end every 8 steps
                if t % 8 == 7:
                    n_done = int(done.sum())
                    if n_done == len(rows):
                        break
                    if n_done >= (1 - compact_at) * len(rows):
                        keep = (~done).nonzero().squeeze(1)
                        cache.batch_select_indices(keep)
                        rows, state, field, fid, fpos, done = (x[keep] for x in (rows, state, field, fid, fpos, done))
                        mask, last_pos, tok = mask[keep], last_pos[keep], tok[keep]
                        stats["compactions"] += 1
                feed = tok.clone()
                last_pos = last_pos + 1
                mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=dev)], 1)
                logits = self.model(input_ids=feed[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                                    past_key_values=cache, use_cache=True).logits[:, -1]
            stats["truncated"] = int((~done).sum())
        res = out_tok.cpu().tolist()
        return [[x for x in r if x >= 0] for r in res], stats


def run(spec_path: Path, gguf_dir: Path, gguf_file: str, out: Path, batch: int, limit: int | None,
        skip: list[Path] | None, time_budget: float, dtype_name: str) -> None:
    """Generate every distinct input's answer; append raw answers per batch; write a timing report."""
    import numpy as np
    import torch

    t_all = time.perf_counter()
    z = np.load(spec_path)
    spec = {k: z[k] for k in z.files}
    meta = json.loads(bytes(spec["meta"]).decode())
    spec["meta"] = meta
    head = spec["head"].tolist()
    tails, offs = spec["tails"], spec["offsets"]
    pb, po = spec["piece_bytes"].tobytes(), spec["piece_off"]
    pieces = [pb[po[i]:po[i + 1]] for i in range(len(po) - 1)]
    hashes = meta["hashes"]
    done_hashes: set[str] = set()
    for path in skip or []:  # earlier answers: a JSON list of hashes, or raw.jsonl.gz files
        if not path.is_file():
            continue
        if path.suffix == ".json":
            done_hashes |= set(json.loads(path.read_text()))
            continue
        try:
            with gzip.open(path, "rt") as fh:
                for line in fh:
                    with contextlib.suppress(json.JSONDecodeError, KeyError):
                        done_hashes.add(json.loads(line)["h"])
        except (EOFError, OSError):
            pass  # a torn end of an interrupted call
    todo = [i for i in range(len(hashes)) if hashes[i] not in done_hashes]
    if limit is not None:
        todo = todo[:limit]
    todo.sort(key=lambda i: offs[i + 1] - offs[i])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, load_s = load_model(gguf_dir, gguf_file, device, dtype_name)
    dec = Decoder(model, spec, device)
    print(f"model loaded in {load_s:.1f}s on {device}; {len(todo)} inputs to do "
          f"({len(done_hashes)} skipped); head {len(head)} tokens", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "dtype": dtype_name, "load_seconds": round(load_s, 1),
        "batch": batch, "chat": meta["chat"], "head_tokens": len(head), "batches": [],
    }
    gen_s, n_done, n_tokens, t_gen0 = 0.0, 0, 0, time.perf_counter()
    with gzip.open(out / "raw.jsonl.gz", "at") as fh:
        for b0 in range(0, len(todo), batch):
            if time.perf_counter() - t_all > time_budget:
                print("time budget reached: stopping (resume with --skip)", flush=True)
                report["stopped_early"] = True
                break
            idx = todo[b0:b0 + batch]
            prompts = [head + tails[offs[i]:offs[i + 1]].tolist() for i in idx]
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            answers, stats = dec.generate(prompts, meta["max_new_tokens"])
            if device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            gen_s += dt
            n_done += len(idx)
            toks = sum(len(a) for a in answers)
            n_tokens += toks
            for i, a in zip(idx, answers, strict=True):
                raw = b"".join(pieces[x] for x in a if x < len(pieces)).decode("utf-8", errors="replace")
                fh.write(json.dumps({"h": hashes[i], "raw": raw, "n": len(a)}) + "\n")
            fh.flush()
            row = {"n": len(idx), "seconds": round(dt, 2), "items_per_s": round(len(idx) / dt, 1),
                   "prompt_len_max": max(len(p) for p in prompts), "answer_tokens": toks, **stats}
            report["batches"].append(row)
            print(f"batch {b0 // batch}: {row}  total {n_done}/{len(todo)} "
                  f"{n_done / gen_s:.1f} inputs/s", flush=True)
    report.update(inputs=n_done, generation_seconds=round(gen_s, 1),
                  inputs_per_s=round(n_done / gen_s, 1) if gen_s else 0,
                  answer_tokens=n_tokens, new_tokens_per_s=round(n_tokens / gen_s) if gen_s else 0,
                  wall_seconds=round(time.perf_counter() - t_all, 1),
                  wall_generation_seconds=round(time.perf_counter() - t_gen0, 1),
                  max_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "batches"}), flush=True)


# ---------------------------------------------------------------- collect (here)
def collect(raws: list[Path], articles: Path, out: Path, report_paths: list[Path], name: str,
            manifest_extra: dict[str, Any]) -> None:
    """Validate every answer through atelier's parse/repair path; write the enriched catalogue + manifest."""
    import hashlib
    from datetime import UTC, datetime

    from pydantic import ValidationError

    from atelier.config import Settings
    from atelier.enrich.batch import load_products
    from atelier.enrich.core import AnswerError, EnrichOptions, _item, parse_answer, prepare
    from atelier.enrich.prompt import PROMPT_VERSION
    from atelier.schema import load_schema

    schema = load_schema()
    arts = json.loads(articles.read_text())
    answers: dict[str, dict[str, Any]] = {}
    for raw_path in raws:
        with gzip.open(raw_path, "rt") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line of an interrupted call
                answers[rec["h"]] = rec
    settings = Settings()
    products = load_products(settings, manifest_extra["dataset"], None, schema)
    assert [p.item_id for p in products] == arts["item_ids"], "catalogue changed since export"
    options = EnrichOptions(fields=(), show_known=False)
    parsed: dict[str, tuple[str, dict[str, list[str]], list[str], str | None]] = {}
    counts = {"ok": 0, "repaired": 0, "error": 0, "missing": 0}
    dcounts = {"ok": 0, "repaired": 0, "error": 0, "missing": 0}
    out.mkdir(parents=True, exist_ok=True)
    items_path = out / f"{name}.jsonl.gz"
    errors_path = out / f"{name}.errors.jsonl.gz"
    re_fields = list(schema.re)
    backend = manifest_extra["backend"]
    with gzip.open(items_path, "wt", compresslevel=9) as fi, gzip.open(errors_path, "wt", compresslevel=9) as fe:
        for prod, h in zip(products, arts["hashes"], strict=True):
            if h not in parsed:
                rec = answers.get(h)
                if rec is None:
                    parsed[h] = ("missing", {}, [], "not generated")
                else:
                    try:
                        _, rfv, notes = parse_answer(rec["raw"], schema, [], re_fields)
                        parsed[h] = ("repaired" if notes else "ok", rfv, notes, None)
                    except AnswerError as exc:
                        parsed[h] = ("error", {}, [], str(exc))
                dcounts[parsed[h][0]] += 1
            status, rfv, notes, err = parsed[h]
            assert prepare(prod, schema, options).input_hash == h
            if status in ("ok", "repaired"):
                try:
                    item, issues = _item(prod, {}, rfv, schema)
                except ValidationError as exc:
                    status, err = "error", f"validation: {str(exc).splitlines()[0]}"
                else:
                    if issues and status == "ok":
                        status = "repaired"
                    row = {"item_id": item.item_id, "status": status, "input_hash": h,
                           "clothes": item.clothes, "reinforced_feature_value": item.reinforced_feature_value}
                    if notes or issues:
                        row["issues"] = [*notes, *issues]
                    fi.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
            if status in ("error", "missing"):
                rec = answers.get(h) or {}
                fe.write(json.dumps({"item_id": prod.item_id, "backend": backend, "prompt_version": PROMPT_VERSION,
                                     "input_hash": h, "error": err, "raw": rec.get("raw"), "attempts": 1},
                                    ensure_ascii=False) + "\n")
            counts[status] += 1
    reports = [json.loads(p.read_text()) for p in report_paths if p.is_file()]
    manifest = {
        "file": items_path.name, "errors_file": errors_path.name,
        "sha256": hashlib.sha256(items_path.read_bytes()).hexdigest(),
        "bytes": items_path.stat().st_size, "errors_bytes": errors_path.stat().st_size,
        "prompt_version": PROMPT_VERSION, "schema_version": schema.version, "backend": backend,
        "articles": len(products), "distinct_inputs": len(parsed),
        "counts_articles": counts, "counts_distinct_inputs": dcounts,
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "gpu_runs": reports, **manifest_extra,
    }
    (out / f"{name}.manifest.json").write_text(json.dumps(manifest, indent=1))
    print(json.dumps({k: v for k, v in manifest.items() if k != "gpu_runs"}, indent=1))


def pack_tower(dataset: str, out: Path, run_dir: Path) -> None:
    """``benchmarks/item_tower_gpu.py pack`` with the shipped RE values merged into the item JSON.

    The packed file trains on the GPU like the columns-only one (``item_tower_gpu.py train``);
    ``tower-eval`` then scores each checkpoint through the harness with the same RE inputs.
    """
    import numpy as np
    import torch

    from atelier.catalogue import column_items
    from atelier.config import Settings
    from atelier.enrich.shipped import with_shipped_re
    from atelier.ingest import load_tables
    from atelier.models.item_tower import item_inputs
    from atelier.text import encode_texts, item_texts
    from atelier.vocab import Vocab

    settings = Settings(run_dir=run_dir)
    vocab = Vocab.load(settings.paths.vocab)
    items = load_tables(settings.paths.dataset(dataset))[0]
    jsons = with_shipped_re(column_items(items, dataset), dataset)
    titles = items["title"].fillna("").astype(str).tolist()
    texts = item_texts(titles, items["description"].fillna("").astype(str).tolist())
    x = item_inputs(jsons, vocab, encode_texts(texts, settings.paths.features))
    text = x.text[:, 0].numpy()
    unique, inverse = np.unique(text, axis=0, return_inverse=True)
    fields = ("std_ids", "std_field_ids", "std_mask", "re_ids", "re_parent_ids", "re_field_ids", "re_mask")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dataset": dataset, "vocab": vocab.to_dict(),
                "tokens": {
                    f: (getattr(x.tokens, f).int() if f.endswith("ids") else getattr(x.tokens, f)) for f in fields},
                "text_unique": torch.from_numpy(unique).half(),
                "text_index": torch.from_numpy(inverse.reshape(-1)).int(),
                "item_ids": items["item_id"].astype(str).tolist()}, out)
    n_re = int(x.tokens.re_mask.any(1).sum())
    print(f"packed {len(items)} items, RE tokens on {n_re} ({out.stat().st_size / 2**20:.1f} MiB)")


def tower_eval(dataset: str, checkpoints: Path, run_dir: Path, out: Path) -> None:
    """Harness scores of item-tower checkpoints trained with and without the shipped RE values."""
    from atelier.catalogue import column_items
    from atelier.config import Settings
    from atelier.enrich.shipped import with_shipped_re
    from atelier.evaluate import evaluate, write_report
    from atelier.models.item_tower import item_inputs, mask_parts
    from atelier.recommend.baselines import TextKNNRecommender
    from atelier.recommend.content import ItemTowerRecommender
    from atelier.recommender import Recommender, TrainData
    from atelier.text import encode_texts, item_texts
    from atelier.vocab import Vocab

    class WithRE(ItemTowerRecommender):
        """The tower over item JSON that carries the shipped RE values."""

        def item_vectors(self, data: TrainData) -> Any:
            from atelier.models.item_tower import encode_items, load_checkpoint

            model, payload = load_checkpoint(self.checkpoint)
            vocab = Vocab.from_dict(payload["vocab"])
            jsons = with_shipped_re(column_items(data.items, data.dataset), data.dataset)
            texts = item_texts(data.items["title"].fillna("").astype(str).tolist(),
                               data.items["description"].fillna("").astype(str).tolist())
            x = item_inputs(jsons, vocab, encode_texts(texts, data.cache_dir))
            return encode_items(model, mask_parts(x, **self.parts))

    settings = Settings(run_dir=run_dir)
    recs: list[Recommender] = [TextKNNRecommender(3.0)]
    for path in sorted(checkpoints.glob(f"item_tower-{dataset}-*.pt")):
        key = path.stem.split(f"{dataset}-", 1)[1]
        with_re = key.startswith("re_")
        parts = key.removeprefix("re_")
        flags = {"std_re_text": (True, True, True), "std_re": (True, True, False), "text": (False, False, True),
                 "std_text": (True, False, True)}[parts]
        cls = WithRE if with_re else ItemTowerRecommender
        recs.append(cls(path, window_days=3.0, name=f"tower:{key}", use_std=flags[0], use_re=flags[1],
                        use_text=flags[2]))
    report = evaluate(dataset, settings.paths.dataset(dataset), recs, settings.paths.features,
                      on_model=lambda n: print("evaluating", n, flush=True))
    report["command"] = f"python benchmarks/bench_enrich_gpu.py tower-eval --checkpoints {checkpoints}"
    path = write_report({**report, "dataset": f"{dataset}-item-tower-re"}, out)
    for name, m in report["models"].items():  # type: ignore[attr-defined]
        a, h = m["cohorts"]["all"], m["cohorts"]["with_history"]
        print(f"{name:24s} MAP@12 {a['map@12']:.4f}  R@100 {a['recall@100']:.4f}  hist MAP@12 {h['map@12']:.4f}  "
              f"cold R@100 {m['cold_items']['recall@100']:.4f}")
    print("report:", path)


def main() -> None:
    """``export`` and ``collect`` here, ``run`` on the GPU machine."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export")
    ex.add_argument("--dataset", default="hm")
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--chat", choices=["llama-2", "gemma"], default="llama-2")
    ex.add_argument("--limit", type=int)
    rn = sub.add_parser("run")
    rn.add_argument("--spec", type=Path, required=True)
    rn.add_argument("--gguf-dir", type=Path, required=True)
    rn.add_argument("--gguf-file", default="gemma3-270m-q4_k_m.gguf")
    rn.add_argument("--out", type=Path, required=True)
    rn.add_argument("--batch", type=int, default=1024)
    rn.add_argument("--limit", type=int)
    rn.add_argument("--skip", type=Path, nargs="*")
    rn.add_argument("--time-budget", type=float, default=1e9, help="stop starting batches after this many seconds")
    rn.add_argument("--dtype", default="bfloat16")
    co = sub.add_parser("collect")
    co.add_argument("--raw", type=Path, nargs="+", required=True)
    co.add_argument("--articles", type=Path, required=True)
    co.add_argument("--reports", type=Path, nargs="*", default=[])
    co.add_argument("--out", type=Path, default=Path("data/enriched"))
    co.add_argument("--name", default="hm-re")
    co.add_argument("--extra", type=json.loads, default={}, help="JSON merged into the manifest")
    pk = sub.add_parser("pack-tower")
    pk.add_argument("--dataset", default="hm")
    pk.add_argument("--out", type=Path, required=True)
    pk.add_argument("--run-dir", type=Path, default=Path("runs"))
    te = sub.add_parser("tower-eval")
    te.add_argument("--dataset", default="hm")
    te.add_argument("--checkpoints", type=Path, required=True)
    te.add_argument("--run-dir", type=Path, default=Path("runs"))
    te.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    if args.cmd == "pack-tower":
        pack_tower(args.dataset, args.out, args.run_dir)
    elif args.cmd == "tower-eval":
        tower_eval(args.dataset, args.checkpoints, args.run_dir, args.out)
    elif args.cmd == "export":
        export(args.dataset, args.out, args.chat, args.limit)
    elif args.cmd == "run":
        run(args.spec, args.gguf_dir, args.gguf_file, args.out, args.batch, args.limit, args.skip, args.time_budget,
            args.dtype)
    else:
        collect(args.raw, args.articles, args.out, args.reports, args.name, {"dataset": "hm", **args.extra})


if __name__ == "__main__":
    sys.exit(main())

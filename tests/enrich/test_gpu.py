"""The batched tree scorer (``atelier.enrich.gpu``): packed trees score exactly as one sequence per candidate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from atelier.enrich.gpu import Ask, Tree, TreeScorer, pack_tree, segment_argmax, spec_trees


def tiny_gemma(window: int) -> torch.nn.Module:
    """A random two-layer Gemma 3 (one sliding, one global layer) small enough for a unit test."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=window,
                           max_position_embeddings=256, layer_types=["sliding_attention", "full_attention"],
                           attn_implementation="sdpa")
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).eval()


def random_tree(rng: np.random.Generator, prefix: int) -> Tree:
    """A prefix and three asks, candidates of one to three tokens."""
    def toks(n: int) -> list[int]:
        return rng.integers(1, 97, n).tolist()

    asks = [Ask(toks(int(rng.integers(2, 6))), [toks(int(rng.integers(1, 4))) for _ in range(int(rng.integers(1, 5)))])
            for _ in range(3)]
    return Tree(toks(prefix), asks)


def one_by_one(model: torch.nn.Module, tree: Tree) -> np.ndarray:
    """Reference: each candidate as its own sequence prefix + question + candidate, the model's own masks."""
    out = []
    for ask in tree.asks:
        for cand in ask.candidates:
            seq = [*tree.prefix, *ask.question, *cand]
            with torch.inference_mode():
                logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].float(), -1)
            start = len(tree.prefix) + len(ask.question)
            out.append(float(sum(logp[start - 1 + k, t] for k, t in enumerate(cand))) / len(cand))
    return np.array(out)


@pytest.mark.parametrize("window", [6, 128])  # the sliding layer binds (6) or not (128)
def test_packed_trees_score_as_separate_sequences(window: int) -> None:
    model = tiny_gemma(window)
    rng = np.random.default_rng(1)
    trees = [random_tree(rng, int(n)) for n in (3, 9, 5, 12)]
    # a small budget and few LM-head rows force several batches (padding) and several head chunks
    scorer = TreeScorer(model, "cpu", token_budget=64, head_rows=5)
    got = scorer.score(trees)
    assert scorer.stats["forwards"] > 1
    for tree, scores in zip(trees, got, strict=True):
        np.testing.assert_allclose(scores, one_by_one(model, tree), atol=2e-4)


def test_pack_tree_layout() -> None:
    p = pack_tree(Tree([1, 2], [Ask([3, 4], [[5], [6, 7]]), Ask([8], [[9, 10, 11]])]))
    # prefix, question 1, cand 1.2's first token (1.1 has one token: nothing fed), question 2, cand 2.1 x2
    assert p.tokens.tolist() == [1, 2, 3, 4, 6, 8, 9, 10]
    assert p.pos.tolist() == [0, 1, 2, 3, 4, 2, 3, 4]  # every question restarts after the prefix
    assert p.seg.tolist() == [0, 0, 1, 1, 3, 4, 5, 5]
    assert p.par.tolist() == [-1, -1, 0, 0, 1, 0, 4, 4]
    assert p.cand_len.tolist() == [1, 2, 3] and p.cand_ask.tolist() == [0, 0, 1]
    # reads: (row predicting it, token, candidate)
    assert list(zip(p.read_row.tolist(), p.read_tok.tolist(), p.read_key.tolist(), strict=True)) == [
        (3, 5, 0), (3, 6, 1), (4, 7, 1), (5, 9, 2), (6, 10, 2), (7, 11, 2)]


def test_segment_argmax_is_per_run_and_relative() -> None:
    scores = np.array([0.1, 0.5, 0.2, -1.0, -0.5, 3.0, 3.0])
    group = np.array([0, 0, 0, 1, 1, 2, 2])
    assert segment_argmax(scores, group).tolist() == [1, 1, 0]  # ties: the first, as np.argmax


def test_spec_trees_rebuild_the_asks() -> None:
    meta = {"std_questions": [[7, 8]], "std_cands": [0], "cand_sets": [[[1], [2, 3]], [[4], [5]]], "re_cands": 1,
            "re_head": [20], "re_tail": [21, 22]}
    arrays = {"s.prefix": np.array([1, 2, 3], np.int32), "s.prefix_off": np.array([0, 1, 3]),
              "s.std": np.array([0, 0], np.int16), "s.std_off": np.array([0, 1, 2]),
              "s.re_tok": np.array([30, 31, 32], np.int32), "s.re_tok_off": np.array([0, 2, 3]),
              "s.re_full": np.array([0, 1], np.uint8), "s.re_off": np.array([0, 0, 2])}
    trees = spec_trees(meta, arrays, "s")
    assert [list(t.prefix) for t in trees] == [[1], [2, 3]]
    assert [list(a.question) for a in trees[1].asks] == [[7, 8], [20, 30, 31, 21, 22], [32]]
    assert [list(c) for c in trees[1].asks[1].candidates] == [[4], [5]]


def test_run_spec_writes_the_best_candidates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU job end to end on a synthetic spec (a tiny random model stands in for the GGUF)."""
    import json

    from atelier.enrich import gpu

    model = tiny_gemma(128)
    monkeypatch.setattr(gpu, "load_model", lambda *a, **k: (model, 0.0))
    meta = {"fields": ["a", "b"], "std_questions": [[7, 8], [9]], "std_cands": [0, 1],
            "cand_sets": [[[1], [2, 3]], [[4], [5], [6]], [[10], [11]]], "re_cands": 2, "re_head": [20],
            "re_tail": [21, 22], "prior_prefix": [2, 3], "sets": {"s": 3}}
    arrays = {"s.prefix": np.array([1, 2, 3, 4, 5, 6], np.int32), "s.prefix_off": np.array([0, 1, 3, 6]),
              "s.std": np.array([0, 1, 1], np.int16), "s.std_off": np.array([0, 2, 3, 3]),
              "s.re_tok": np.array([30, 31, 32], np.int32), "s.re_tok_off": np.array([0, 2, 3]),
              "s.re_full": np.array([0, 0], np.uint8), "s.re_off": np.array([0, 1, 1, 2])}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    spec = tmp_path / "spec.npz"
    np.savez_compressed(spec, **arrays)
    report = gpu.run_spec(spec, tmp_path, tmp_path / "out", {"base": None}, token_budget=64, workers=2)
    assert report["variants"]["base"]["s"]["items"] == 3
    z = np.load(tmp_path / "out" / "picks-base.npz")
    assert z["s.offsets"].tolist() == [0, 3, 4, 5]  # asks per tree: 2 STD + 1 RE, 1 STD, 1 RE
    scorer = TreeScorer(model, "cpu")
    trees = gpu.spec_trees(meta, {k: v for k, v in arrays.items() if k != "meta"}, "s")
    expect = [int(np.argmax(s[p.cand_ask == a])) for t, s in zip(trees, scorer.score(trees), strict=True)
              for p in [pack_tree(t)] for a in range(len(t.asks))]
    assert z["s.best"].tolist() == expect
    # calibrated: each STD ask minus that field's score after the content-free prefix
    prior = [scorer.score([Tree([2, 3], [Ask(q, meta["cand_sets"][c])])])[0]
             for q, c in zip(meta["std_questions"], meta["std_cands"], strict=True)]
    raw = scorer.score(trees)[1]  # tree 1: one ask, field b
    assert z["s.best_cal"][3] == int(np.argmax(raw - prior[1]))

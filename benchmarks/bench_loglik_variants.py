"""Tuning-half comparison of ``embedded-ll`` prompt variants (same sample and split as bench_extraction.py).

``python -m benchmarks.bench_loglik_variants`` scores the tuning half only (the test half stays
unseen) with capitalised labels (``capitalise``) and with the options listed in the question
(``list_options``), raw and calibrated, and writes ``benchmarks/results/extraction-<date>-variants.json``.
A variant that beat every baseline on a field here would then be run on the test half.
"""
import datetime as dt
import json
import os
import time

import numpy as np

from atelier.config import Settings
from atelier.enrich.fieldwise import product_text
from atelier.enrich.loglik import LogLikExtractor
from benchmarks.bench_extraction import FIELDS, ROOT, git_commit, machine, sample, split_halves

commit = git_commit()
settings = Settings()
p = settings.run_dir / "models" / "gemma3-270m-q4_k_m.gguf"
variants = {"cap": dict(capitalise=True), "cap_opts": dict(capitalise=True, list_options=True)}
res = {}
for ds, fields in FIELDS.items():
    products, gold, _ = sample(settings, ds, 100, 0)
    tune = split_halves(len(products), 1)["tune"]
    for vname, kw in variants.items():
        ex = LogLikExtractor(p, n_threads=1, **kw)
        prior = ex.score("Product: N/A", fields)
        correct = {f"{k}": {f: [0, 0] for f in fields} for k in ("raw", "cal")}
        t = time.time()
        for i in tune:
            s = ex.score("Product: " + product_text(products[i].title, products[i].description), fields)
            for f in fields:
                if f not in gold[i]:
                    continue
                for k, sc in (("raw", s[f]), ("cal", s[f] - prior[f])):
                    correct[k][f][0] += ex.values(f)[int(np.argmax(sc))] == gold[i][f]
                    correct[k][f][1] += 1
        secs = time.time() - t
        ex.close()
        res[f"{ds}/{vname}"] = {"acc": {k: {f: round(c / n, 3) for f, (c, n) in v.items()} for k, v in correct.items()},
                                "s_per_item": round(secs / len(tune), 2), "counts": correct}
        print(ds, vname, json.dumps(res[f"{ds}/{vname}"]["acc"]), res[f"{ds}/{vname}"]["s_per_item"], flush=True)
out = ROOT / "benchmarks" / "results" / f"extraction-{dt.date.today()}-variants.json"
out.write_text(json.dumps({"command": "bench_loglik_variants.py", "git_commit": commit, "machine": machine(),
                           "load_average": os.getloadavg(),
                           "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                           "split": "tuning half (seed 0 sample of 100, split seed 1)", "threads": 1,
                           "results": res}, indent=1))
print(f"written: {out}")

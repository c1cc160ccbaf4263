"""Performance suite (issue #11): every stage measured against a named peer in the same run.

``python -m benchmarks.perf all`` runs every part; ``python -m benchmarks.perf PART`` runs one
(``enrich``, ``item-tower``, ``store``, ``recommend``, ``live``, ``profile``, ``ab``: the store code before
vs after, ``threads``: torch on 1 vs 2 threads per request), and ``report`` turns
the newest ``benchmarks/results/perf-*.json`` into PNG plots and the README's Performance table.
Each part writes ``benchmarks/results/perf-<part>-<date>.json`` with the command, git commit,
machine (load average at start and end) and date beside its figures. See ``benchmarks/README.md``.
"""

"""Inference: everything a served recommendation runs, and nothing that trains.

``sources`` (named candidate sources and the rule set), ``candidates`` (their union per shopper),
``features`` (the ranker's features as of a log's end), ``ranker`` (the DeepFM scorer and its peers),
``ranking`` (the ranking chain: pipeline + scorer, and how the service loads it), ``chain`` (the stages
the service runs), ``encoder`` (item-tower inputs and vectors, new products), ``content`` (item-tower kNN),
``user_tower`` (two-tower retrieval), ``baselines`` (popularity and friends). Training lives in
``atelier.train``; import contracts in ``pyproject.toml`` keep this package from importing it.
"""

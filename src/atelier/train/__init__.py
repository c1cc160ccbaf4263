"""Training loops and their rows: ``item`` (SimCSE item tower), ``user`` (the user tower and the harness's
two-tower recommender), ``ranker`` (the DeepFM's rows from the end of a window and its loop)."""

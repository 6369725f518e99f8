"""`optiserve tune`: the cheapest serving configuration that meets an SLO.

- :mod:`.space`: the candidates (variant × runtime × streams, batch size, batching deadline, threads)
  and the checks that refuse an empty or contradictory search space;
- :mod:`.trial`: one candidate served and measured with the SLO search, through the same bench
  pipeline, targets and integrity checks as `optiserve bench`, pruned on its first level when hopeless;
- :mod:`.study`: the Optuna study (grid, random or TPE; SQLite, so it resumes) and its live progress;
- :mod:`.outcome`: the Pareto front, the recommendation, and what is written (tune.json, tune.md,
  tune.html, recommended.yaml, recommended-values.yaml).
"""

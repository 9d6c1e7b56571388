"""Floor 2, training: one step (engine.py), the loop of a run (train.py), fused groups of runs (fused/),
several processes (distributed.py), diagnostics, and one job's failure policy (job.py). Imports schema, core and
record."""

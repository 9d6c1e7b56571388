"""Fused training, all of it: the stacked layout and layers (stacking.py), the stacked optimizers (optim.py) and
the engine that trains N runs as one model (engine.py). The core registries declare per entry what this needs."""

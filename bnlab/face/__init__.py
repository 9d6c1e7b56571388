"""Floor 3, the Hydra face: the `bnlab` command, the Hydra app, its callbacks, launcher and plugin, the override
checks. The only floor that imports Hydra; torch only where a run is started."""

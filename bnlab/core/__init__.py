"""Floor 1, the building blocks: a registry each of data sets, norms, models, baselines and optimizers, and a
config's check against them (validate.py). Imports only bnlab.schema."""

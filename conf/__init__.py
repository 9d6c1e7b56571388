"""Hydra config tree of bnlab, shipped inside the package as `bnlab.conf`."""

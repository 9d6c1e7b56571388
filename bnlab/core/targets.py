"""The user's own code that bnlab builds by name: `norm.target`, `model.target` and `data.target`, each a
dotted import path (`my_pkg.layers.MyNorm`) to a class or function. Hydra's `_target_` idea, kept to a
plain import so that bnlab can name the target and the error when it cannot be used (bnlab.core.validate's
`check_targets`)."""

from __future__ import annotations

import importlib
from typing import Any


def locate(path: str) -> Any:
    """The object that `path` names: the longest importable module prefix, then attributes below it
    (`pkg.module.Class`, `pkg.module.Class.method`). An error raised while importing that module (its own
    missing dependency, say) is raised as it is."""
    if not path or any(not part.isidentifier() for part in path.split(".")):
        raise ImportError(f"{path!r} is not a dotted import path such as my_pkg.layers.MyNorm")
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and (name == e.name or name.startswith(f"{e.name}.")):
                continue  # no module of that name: try a shorter prefix
            raise
        for j, attr in enumerate(parts[i:], i):
            if not hasattr(obj, attr):
                raise ImportError(f"module {'.'.join(parts[:j])!r} has no attribute {attr!r}")
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module named {parts[0]!r}")

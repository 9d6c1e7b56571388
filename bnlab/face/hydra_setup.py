"""What Hydra must know before it composes a config of bnlab's: the structured config (`train_schema` in
conf/train.yaml's defaults) and every resolver that conf/ uses, `${bnlab.NAME:...}`. Registered here, once,
when this module is imported: by the Hydra app, the callbacks, the launcher and whoever composes conf/
(tests/helpers.py).

The resolvers: a run folder is named by its overrides (`norm=batch,optim.lr=0.1`, or `default`), the
bookkeeping keys left out (${bnlab.bookkeeping:}), in a folder no other invocation has (${bnlab.unique:...});
presets scale with the batch size: ${bnlab.div:60000,${data.batch_size}} steps is one MNIST epoch,
${bnlab.scale:0.05,${data.batch_size},32} is lr 0.05 at batch 32, linearly scaled (Goyal et al. 2017),
${bnlab.part:N,10} a tenth of N steps, at least 1 (presets made small: scripts/bench_suite.py),
${bnlab.if_none:${norm.name},A,B} is A without a norm and B with one (a preset's per-norm training changes), and
${bnlab.gpus:${trainer.device},${trainer.devices}} the GPUs a SLURM job asks for: trainer.devices with
trainer.device=cuda, else none.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from bnlab.face.overrides import help_groups
from bnlab.schema.config import BOOKKEEPING_KEYS, NO_NORM, TrainConfig, run_name


def claim_folder(path: str) -> str:
    """`path`, or else `path_2`, `path_3`, ...: the first that does not exist yet, made now so that no other
    invocation can take it (two sweeps started in the same second get two folders)."""
    base, n = Path(path), 1
    while True:
        candidate = base if n == 1 else base.with_name(f"{base.name}_{n}")
        try:
            candidate.mkdir(parents=True)
            return str(candidate)
        except FileExistsError:
            n += 1


RESOLVERS = {
    "bnlab.run_name": run_name,
    "bnlab.unique": claim_folder,
    "bnlab.bookkeeping": lambda: list(BOOKKEEPING_KEYS),
    "bnlab.help_groups": help_groups,
    "bnlab.div": lambda a, b: int(a) // int(b),
    "bnlab.scale": lambda x, b, ref: float(x) * float(b) / float(ref),
    "bnlab.part": lambda n, d: max(1, int(n) // int(d)),
    "bnlab.if_none": lambda norm, plain, normed: plain if norm == NO_NORM else normed,
    "bnlab.gpus": lambda device, devices: int(devices) if device == "cuda" else 0,
}
CACHED = {"bnlab.unique"}  # resolved once per config: every read of hydra.run.dir gives the same folder

ConfigStore.instance().store(name="train_schema", node=TrainConfig)
for name, resolver in RESOLVERS.items():
    OmegaConf.register_new_resolver(name, resolver, use_cache=name in CACHED, replace=True)

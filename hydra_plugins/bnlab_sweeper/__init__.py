"""bnlab's tuning sweeper as Hydra sees it: `hydra/sweeper=tune` for `bnlab train -m`, its config in Hydra's
ConfigStore; the work is in bnlab/face/tuning.py. No `from __future__ import annotations`: Hydra executes this
module before it is in sys.modules, where dataclasses cannot resolve string annotations."""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class TuneSweeperConf:
    """hydra/sweeper=tune: each arm (each combination of the choices given, e.g. norm=none,batch,layer) gets the
    same number of trials over the intervals given (optim.lr=tag(log,interval(0.001,10))), each trial a setting on
    `seeds` seeds, the poor ones pruned; then each arm's best setting trains on `final_seeds` fresh seeds and the
    sweep's verdict compares those runs.
        bnlab train -m hydra/sweeper=tune norm=none,batch 'optim.lr=tag(log,interval(0.001,10))'
        bnlab train -m +experiment=tune_mnist
    """

    _target_: str = "hydra_plugins.bnlab_sweeper.TuneSweeper"
    trials: int = 12  # settings tried per arm, the same for every arm
    seeds: int = 3  # seeds of each trial (0 .. seeds-1): its objective is over them all, never one seed
    final_seeds: int = 5  # seeds of each arm's chosen setting (seeds .. seeds+final_seeds-1): unseen by the search
    sampler: str = "qmc"  # qmc (scrambled Halton points: AlgoPerf's quasi-random search) | tpe | random
    sampler_seed: int = 0  # the sampler's seed: the same trials each time
    pruner: str = "halving"  # halving (successive halving) | hyperband | none (every trial to the last step)
    reduction_factor: int = 3  # the pruner keeps about 1 in this many trials at each rung
    min_steps: int = 0  # the first rung, in steps (0: trainer.max_steps / reduction_factor^2)
    batch: int = 0  # trials of each arm that train at once, fused where they can (0: all; fewer lets tpe learn)
    # the objective's threshold of threshold.metric (None: the hardest of threshold.values)
    target: float | None = None
    params: dict[str, str] | None = None  # search space and arms in a preset, as hydra.sweeper.params


ConfigStore.instance().store(group="hydra/sweeper", name="tune", node=TuneSweeperConf, provider="bnlab")


class TuneSweeper(Sweeper):
    """`hydra/sweeper=tune` (TuneSweeperConf)."""

    def __init__(self, **settings: Any) -> None:
        params = settings.pop("params", None) or {}
        self.params = [f"{k}={v}" for k, v in params.items()]
        for name, value in settings.items():
            setattr(self, name, value)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from bnlab.face.tuning import Tuner  # torch: Hydra imports every plugin at start-up, --help included

        return Tuner(self, self.config, self.launcher, self.hydra_context).sweep([*self.params, *arguments])

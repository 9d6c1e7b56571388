"""Each piece of Hydra's private API that bnlab/face/hydra_private.py uses, held to what bnlab relies on: a
Hydra upgrade that moves or changes one fails here, by name, rather than somewhere in a sweep."""

from __future__ import annotations

import inspect

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import bnlab.face.hydra_setup  # noqa: F401  the resolvers and the structured config
from bnlab.face import hydra_private
from bnlab.face.hydra_private import BASIC_SWEEPER, ComposeOnce, expand_sweep, hydra_state, restore_hydra_state


def test_the_basic_sweeper_expands_a_sweep_as_a_cartesian_product_the_last_value_of_a_key_winning():
    jobs = expand_sweep(["norm=none,batch", "seed=0", "optim.lr=0.1,1", "seed=1,2"])
    assert jobs == [
        ["norm=none", "seed=1", "optim.lr=0.1"],
        ["norm=none", "seed=1", "optim.lr=1"],
        ["norm=none", "seed=2", "optim.lr=0.1"],
        ["norm=none", "seed=2", "optim.lr=1"],
        ["norm=batch", "seed=1", "optim.lr=0.1"],
        ["norm=batch", "seed=1", "optim.lr=1"],
        ["norm=batch", "seed=2", "optim.lr=0.1"],
        ["norm=batch", "seed=2", "optim.lr=1"],
    ]


def test_the_basic_sweeper_is_the_default_sweeper_of_bnlabs_config():
    with initialize_config_module("bnlab.conf", version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert cfg.hydra.sweeper._target_ == BASIC_SWEEPER


def test_the_config_loader_still_loads_sweep_jobs_through_the_method_compose_once_replaces():
    with initialize_config_module("bnlab.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        assert list(inspect.signature(loader.load_sweep_config).parameters) == ["master_config", "sweep_overrides"]
        master = compose("train", overrides=["hydra/sweeper=basic"], return_hydra_config=True)
        once = ComposeOnce(loader, master)
        assert loader.load_sweep_config is once
        first = loader.load_sweep_config(master, ["seed=1"])
        assert loader.load_sweep_config(master, ["seed=1"]) is first  # composed once, handed out again
        copied = loader.load_sweep_config(master, ["seed=2"])  # copied from the first, not composed
        assert copied.seed == 2 and copied.hydra.job.override_dirname == "seed=2"


def test_hydras_override_dirname_sorts_the_overrides_and_leaves_out_the_excluded_keys():
    parsed = OverridesParser.create().parse_overrides(["seed=1", "norm=batch", "trainer.threads=1"])
    name = hydra_private.get_overrides_dirname(parsed, exclude_keys=["trainer.threads"], item_sep=",", kv_sep="=")
    assert name == "norm=batch,seed=1"


def test_hydras_state_carries_the_config_store_and_the_resolvers_to_a_worker():
    state = hydra_state()
    OmegaConf.clear_resolver("bnlab.div")
    restore_hydra_state(state)
    assert OmegaConf.has_resolver("bnlab.div")
    assert OmegaConf.create({"a": "${bnlab.div:60000,60}"}).a == 1000

"""hydra/launcher=bnlab as one of Hydra's own plugins: Hydra finds it (in this editable install too), its config is
in Hydra's ConfigStore, and it passes the conformance suites that Hydra's launchers (joblib, submitit, ray, rq)
run, in any Hydra app, one job at a time and n_jobs at once."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite
from hydra.version import VersionBase

from bnlab.face.app import train_job
from bnlab.face.launcher import launch_jobs
from hydra_plugins.bnlab_launcher import BnlabLauncher, BnlabLauncherConf
from hydra_plugins.bnlab_sweeper import TuneSweeper, TuneSweeperConf

NAME = "bnlab"
pytestmark = pytest.mark.filterwarnings("ignore:Future Hydra versions will no longer change working directory")


@pytest.fixture(autouse=True)
def a_fresh_process_s_version_base():
    """Hydra's suites expect the version base of a fresh process (unspecified: Hydra 1.1's defaults, chdir and
    all); the tests before them in this process set 1.3, and the version base is process-wide."""
    before = VersionBase.instance()
    fresh = object.__new__(VersionBase)
    fresh.__init__()
    VersionBase.set_instance(fresh)
    yield
    VersionBase.set_instance(before)


def qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def test_hydra_discovers_the_launcher_and_finds_its_config_in_the_config_store():
    # by name: Hydra's scan executes each plugin module again, which makes new class objects
    assert qualified(BnlabLauncher) in map(qualified, Plugins.instance().discover(Launcher))
    assert ConfigStore.instance().load(f"hydra/launcher/{NAME}.yaml").node._target_ == BnlabLauncherConf._target_


def test_hydra_discovers_the_tuning_sweeper_and_finds_its_config_in_the_config_store():
    # Hydra's BatchedSweeperTestSuite does not apply: the sweeper scores bnlab's runs by their summaries
    # (tests/test_tuning.py), so it tunes `bnlab train` only
    assert qualified(TuneSweeper) in map(qualified, Plugins.instance().discover(Sweeper))
    assert ConfigStore.instance().load("hydra/sweeper/tune.yaml").node._target_ == TuneSweeperConf._target_


def test_a_fresh_interpreter_discovers_the_launcher_without_bnlab_imported():
    code = (
        "import sys; from hydra.core.plugins import Plugins; from hydra.plugins.launcher import Launcher; "
        "print([p.__name__ for p in Plugins.instance().discover(Launcher)]); print('torch' in sys.modules)"
    )
    found, torch_imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split(
        "\n"
    )[:2]
    assert BnlabLauncher.__name__ in found and torch_imported == "False"  # --help and plain runs stay fast


def test_the_launcher_recognises_bnlab_s_own_jobs_by_their_task():
    assert launch_jobs.__globals__["train_job"] is train_job  # the one task that fuses; any other runs as given


@pytest.mark.parametrize(
    "launcher_name, overrides", [(NAME, []), (NAME, ["hydra.launcher.n_jobs=2"])], ids=["one_at_a_time", "n_jobs=2"]
)
class TestBnlabLauncher(LauncherTestSuite):
    pass


@pytest.mark.slow
@pytest.mark.parametrize(
    "task_launcher_cfg, extra_flags",
    [({}, ["-m", "hydra/job_logging=hydra_debug", "hydra/job_logging=disabled", f"hydra/launcher={NAME}"])],
)
class TestBnlabLauncherIntegration(IntegrationTestSuite):
    pass


# Three lines; the guard, as for any launcher that starts worker processes (hydra/launcher=joblib too), since each
# worker imports the script again
APP = """import hydra
main = hydra.main(version_base=None, config_path=None)(lambda cfg: print(f"x={cfg.x}"))
if __name__ == "__main__": main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("n_jobs", ["auto", "2"])
def test_an_app_outside_bnlab_gets_hydra_s_usual_multirun_folders(tmp_path, n_jobs):
    (tmp_path / "app.py").write_text(APP)
    cmd = [sys.executable, "app.py", "-m", f"hydra/launcher={NAME}", f"hydra.launcher.n_jobs={n_jobs}", "+x=1,2,3"]
    cmd += ["hydra.sweep.dir=multirun"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(line for line in proc.stdout.split("\n") if line.startswith("x=")) == ["x=1", "x=2", "x=3"]
    assert "#2 : +x=3" in proc.stdout  # the basic launcher's line for each job
    sweep = tmp_path / "multirun"
    assert (sweep / "multirun.yaml").is_file()
    for num, x in enumerate([1, 2, 3]):
        assert (sweep / str(num) / ".hydra" / "overrides.yaml").read_text() == f"- +x={x}\n"
        assert (sweep / str(num) / "app.log").is_file()


def test_a_bad_n_jobs_is_refused_naming_the_option_and_the_accepted_values():
    with pytest.raises(ValueError, match=r"hydra.launcher.n_jobs=0 is not accepted; accepted values: auto"):
        BnlabLauncher(n_jobs=0)

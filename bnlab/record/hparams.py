"""TensorBoard's HParams view of runs: which config keys are its columns (the keys that vary across a
sweep, the seed and the run's status), its metrics (finite numbers that every view can sort and draw:
the final test accuracy and loss, the last points of their curves, and the iterations to each threshold
where it was reached; a run that never reached it has no value there, since it is censored, not done at
its budget), each run's session (its config and status) and the experiment config that opens the
dashboard on exactly those columns.

Each run writes its session, and for each threshold it reached a short line under "when_reached/" (sorted
after the curves test/ and train/) from the step it first reached it to its last step, at the height of
that step: HParams reads its last value. A sweep's root gets the experiment config
(bnlab/results/dashboard.py writes it).
"""

from __future__ import annotations

from typing import Any

from tensorboard.compat.proto.summary_pb2 import Summary as SummaryProto
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

from bnlab.record.summary import Status, Summary
from bnlab.schema import tags
from bnlab.schema.metrics import higher_is_better

# Config keys' column names and descriptions.
NAMES = {
    "model.name": ("model", "the model (model=)"),
    "norm.name": ("norm", "the normalization (norm=)"),
    "norm.placement": ("placement", "where the norm sits: before_act (layer-norm-act) or after_act"),
    "model.activation": ("activation", "the nonlinearity (model.activation)"),
    "optim.lr": ("lr", "the learning rate (optim.lr)"),
    "data.batch_size": ("batch size", "examples per step (data.batch_size)"),
    "seed": ("seed", "the seed of the weights and the batch order"),
}
STATUS = "status"  # an hparam column: completed, stalled, diverged, failed
MAX_COLUMNS = 12  # hparams in an experiment config: the first varying keys, the seed and the status
PREFIX = "when_reached/"  # the iterations' scalar group: sorts after test/ and train/, so the curves open first
SESSION_STATUS = {
    Status.COMPLETED: api_pb2.STATUS_SUCCESS,
    Status.STALLED: api_pb2.STATUS_FAILURE,
    Status.DIVERGED: api_pb2.STATUS_FAILURE,
    Status.FAILED: api_pb2.STATUS_FAILURE,
}


def value_at(config: dict[str, Any], key: str) -> Any:
    """config["optim"]["lr"] for key "optim.lr" (None if absent)."""
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


def hparam_value(value: Any) -> int | float | str | bool:
    """A config value as HParams takes it: numbers and booleans as they are, anything else as a string."""
    return value if isinstance(value, (bool, int, float)) else str(value)


def iterations_tag(metric: str, threshold: float) -> str:
    return f"{PREFIX}{metric}_{threshold:g}"


def metric_names(
    metric: str, thresholds: list[float], notes: dict[float, str] | None = None
) -> dict[str, tuple[str, str]]:
    """The metrics' scalar tags -> (column name, description); `notes`: a sentence to add to a threshold's."""
    sign = "≥" if higher_is_better(metric) else "≤"
    names = {tags.TEST_ACC: ("final test acc", "test accuracy at the last evaluation (eval mode)")}
    for t in thresholds:
        names[iterations_tag(metric, t)] = (
            f"iters to {metric} {sign} {t:g}",
            f"iterations until {metric} first reached {t:g}; no value where it never did (censored, not done at "
            "the budget)" + (f". {notes[t]}" if notes and t in notes else ""),
        )
    names[tags.TEST_LOSS] = ("final test loss", "test cross-entropy at the last evaluation, nats")
    return names  # in this order: TensorBoard shows the first five


def iterations(summary: Summary) -> dict[str, int]:
    """The iterations to each threshold the run reached, by tag."""
    metric = summary.threshold_metric
    return {iterations_tag(metric, t): at for t, at in summary.iterations_to_threshold.items() if at is not None}


def _proto(tag: str, data: plugin_data_pb2.HParamsPluginData) -> SummaryProto:
    return SummaryProto(value=[SummaryProto.Value(tag=tag, metadata=metadata.create_summary_metadata(data))])


def session(summary: Summary, flat_config: dict[str, Any]) -> list[SummaryProto]:
    """The run's session as HParams reads it: its whole config and status as hparams, then how it ended
    (diverged and failed runs are not a success)."""
    start = plugin_data_pb2.SessionStartInfo()
    for key, value in {**flat_config, STATUS: summary.status.value}.items():
        if value is None:
            continue
        v = hparam_value(value)
        if isinstance(v, bool):
            start.hparams[key].bool_value = v
        elif isinstance(v, (int, float)):
            start.hparams[key].number_value = v
        else:
            start.hparams[key].string_value = v
    end = plugin_data_pb2.SessionEndInfo(status=SESSION_STATUS.get(summary.status, api_pb2.STATUS_UNKNOWN))
    return [
        _proto(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
        _proto(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end)),
    ]


def columns(varying: list[str]) -> list[str]:
    """The experiment's hparams, MAX_COLUMNS at most: the keys that vary (norm and lr first), the seed and the
    status: a constant key tells a reader nothing (its value is in every run's config)."""
    first = [k for k in ("norm.name", "optim.lr") if k in varying]
    rest = [k for k in varying if k not in first and k != "seed"]
    return [*first, *rest][: MAX_COLUMNS - 2] + ["seed", STATUS]


def experiment(keys: list[str], values: dict[str, list[Any]], metrics: dict[str, tuple[str, str]]) -> SummaryProto:
    """The experiment config: hparams `keys` (with the values each takes in `values`; those that take more
    than one, the seed aside, marked as differing, which TensorBoard shows first) and the `metrics`."""
    infos = []
    for key in keys:
        shown = sorted({hparam_value(v) for v in values.get(key, []) if v is not None}, key=lambda v: (str(type(v)), v))
        name, description = NAMES.get(key, (key, f"config key {key}"))
        if key == STATUS:
            name, description = (
                STATUS,
                "how the run ended: completed, stalled (no better than chance), diverged, failed",
            )
        differs = len(shown) > 1 and key != "seed"
        info = api_pb2.HParamInfo(name=key, display_name=name, description=description, differs=differs)
        if shown and all(isinstance(v, str) for v in shown):
            info.type = api_pb2.DATA_TYPE_STRING
            info.domain_discrete.extend(shown)
        elif shown and all(isinstance(v, bool) for v in shown):
            info.type = api_pb2.DATA_TYPE_BOOL
        else:
            info.type = api_pb2.DATA_TYPE_FLOAT64
        infos.append(info)
    metric_infos = [
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=name, description=description)
        for tag, (name, description) in metrics.items()
    ]
    data = plugin_data_pb2.HParamsPluginData(
        experiment=api_pb2.Experiment(hparam_infos=infos, metric_infos=metric_infos)
    )
    return _proto(metadata.EXPERIMENT_TAG, data)

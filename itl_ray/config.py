"""The typed config tree: sweep spec YAML -> validated frozen dataclasses, with dotted overrides.

A sweep spec is a YAML mapping with the trial config's sections (``data``, ``model``,
``pretrain``, ``transfer``, ...) plus the sweep's own keys (``grid``, ``extra_trials``,
``resources``, ...). Every key is declared once, here or in the stage module that reads it, as a
field of a frozen dataclass, with its type, its bounds or choices, and its default::

    lr: Annotated[float, Gt(0)] = 0.01              # bounds: itl_ray.bounds Gt/Ge/Lt/Le/Interval
    shortfall: Literal["take_all", "error"] = "take_all"        # choices
    num_classes: Annotated[int, Ge(1)] | None = None            # null allowed
    window_sizes: Annotated[tuple[Annotated[float, Interval(gt=0, le=1)], ...], MinLen(1)] = (...)

A rule that ties two fields together is a small ``check(self)`` method on the section that raises
ValueError naming the fields (``max_size (100) must be at least image_size (128)``).

One validator, ``from_dict``, reads a mapping into a section: it refuses unknown keys, converts
each value to its field's declared type, checks the declared bounds and choices, then calls the
section's ``check``. Every error is a UserError naming the key path, the value and what is
allowed (``pretrain.lr=-0.01 is out of range; allowed: > 0``). ``validate`` runs it on a config
built in Python.

Reading YAML (``SpecLoader``): a key given twice in one mapping is an error naming both lines;
plain scalars stay text (only ``null``/``~``/empty is null), and the field's declared type converts
them: ``1e-3`` is a float where a float is declared, ``off`` stays the string "off", ``no`` given
to a text field is "no". YAML 1.1's guesses (``on``/``off``/``yes``/``no`` as booleans, ``1e-3`` as
a string) never apply. ``--set KEY=VALUE`` values are read the same way.

A trial's identity (``trial_id``: its MLflow run, its working folder) is everything but the
``runtime`` section, which holds what changes speed, not results (each member says why), with
each prepared dataset named by its content hash instead of its path.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from itl_ray.bounds import Ge, Gt, Interval, Le, Len, Lt, MaxLen, MinLen

from itl_ray.errors import UserError
from itl_ray.models import MIN_RESOLUTION, Init, Variant
from itl_ray.pretrain import PretrainConfig, PretrainRuntime
from itl_ray.shards import PREPARE_KINDS, Prepared, prepared_paths, read_info
from itl_ray.study import EXPERIMENT_NAME, as_experiment_name
from itl_ray.transfer.action import ActionConfig, ActionRuntime
from itl_ray.transfer.detection import DetectionConfig, DetectionRuntime
from itl_ray.transfer.induction import InductionConfig, InductionRuntime
from itl_ray.transfer.scene import SceneConfig, SceneRuntime

MINI_PATHS = prepared_paths("data/mini-shards")  # where `make demo` prepares the mini-benchmark


@dataclass(frozen=True)
class DataConfig:
    """Prepared datasets (folders written by `itl-ray prepare KIND ROOT OUT`). Defaults: the
    generated mini-benchmark that `make demo` writes and prepares."""

    imagenet: Annotated[str, MinLen(1)] = MINI_PATHS["imagenet"]  # prepared imagenet
    voc2007: Annotated[str, MinLen(1)] = MINI_PATHS["voc2007"]  # prepared voc2007
    voc2012: Annotated[str, MinLen(1)] = MINI_PATHS["voc2012"]  # prepared voc2012-action
    sun397: Annotated[str, MinLen(1)] = MINI_PATHS["sun397"]  # prepared sun397 (which partitions: transfer.scene.partitions)


@dataclass(frozen=True)
class ModelConfig:
    """AlexNet (``itl_ray.models.AlexNet``). The study: Caffe's network at width 1.0 and 227 px
    (``variant``: bvlc_reference_caffenet by default, or bvlc_alexnet; ``init``: caffe, the
    prototxt's Gaussians, or kaiming); the mini-benchmark runs a narrow, small one (0.25 at 64 px)."""

    # Channel multiplier of every layer (1.0: the study's AlexNet). Upper bound (an assumption, not
    # the study's): 8x is 64x the parameters, about 3.9 billion; wider cannot be meant.
    width: Annotated[float, Interval(gt=0, le=8)] = 1.0
    # Square input side for pretraining and classification transfer, px; below MIN_RESOLUTION (39)
    # pool5 has no cell. Upper bound 1024 (an assumption): 20x the study's pixels per image.
    resolution: Annotated[int, Interval(ge=MIN_RESOLUTION, le=1024)] = 227
    # Which Caffe prototxt: bvlc_reference_caffenet (LRN after pooling) or bvlc_alexnet (before).
    variant: Variant = "bvlc_reference_caffenet"
    init: Init = "caffe"  # caffe: the prototxt's Gaussian fillers; kaiming: He initialisation (small nets)


@dataclass(frozen=True)
class TransferConfig:
    """The three transfer evaluations, each fine-tuning the whole pretrained network, and induction
    accuracy (nearest neighbours on fc7 features, off unless ``induction.enabled``)."""

    detection: DetectionConfig = field(default_factory=DetectionConfig)
    action: ActionConfig = field(default_factory=ActionConfig)
    scene: SceneConfig = field(default_factory=SceneConfig)
    induction: InductionConfig = field(default_factory=InductionConfig)


@dataclass(frozen=True)
class RuntimeConfig:
    """How a trial runs, not what it computes: where, on how many threads, how fast images arrive.
    Not part of ``trial_id``, so a sweep resumed with other values continues its trials and their
    MLflow runs. Each stage's part is declared beside the stage (``PretrainRuntime``,
    ``DetectionRuntime``, ``ActionRuntime``); a setting belongs here only if the same seed trains on the same data
    with any value of it."""

    # auto: cuda when torch sees a GPU, else cpu. The same seed draws the same subset, order,
    # crops and initial weights on either; the arithmetic differs only in rounding (CPU and GPU
    # kernels sum in other orders). With pretrain.precision auto, CUDA also means bf16: set
    # pretrain.precision to bf16 or fp32 to pin that (precision is part of the trial).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch CPU threads for this trial; 0: resources.cpus_per_trial in a sweep, torch's default in
    # `itl-ray trial`. Threads split the same sums differently: rounding, not results.
    threads: Annotated[int, Ge(0)] = 0
    pretrain: PretrainRuntime = field(default_factory=PretrainRuntime)
    detection: DetectionRuntime = field(default_factory=DetectionRuntime)
    action: ActionRuntime = field(default_factory=ActionRuntime)
    scene: SceneRuntime = field(default_factory=SceneRuntime)
    induction: InductionRuntime = field(default_factory=InductionRuntime)


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial depends on: a trial is a pure function of this (``runtime`` aside,
    which says how fast, not what)."""

    name: Annotated[str, MinLen(1)] = "itl_ray"  # the sweep's name: the MLflow experiment
    seed: Annotated[int, Ge(0)] = 0  # seeds the subset, the initialisation and every fine-tuning
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


@dataclass(frozen=True)
class Resources:
    """What Ray Tune reserves for each trial (``tune.with_resources``); the trial also sets torch's
    CPU threads to ``cpus_per_trial`` when ``threads`` is 0. A request larger than the largest
    node is refused when the sweep starts (``sweep.check_fits``)."""

    cpus_per_trial: Annotated[float, Gt(0)] = 1.0
    gpus_per_trial: Annotated[float, Ge(0)] = 0.0  # fractions let small trials share a GPU


@dataclass(frozen=True)
class ExperimentSpec:
    """One experiment of the study inside a sweep spec (``experiments.NAME``): its trials as a grid
    over dotted keys and/or a list of trials, and settings every one of its trials gets."""

    grid: dict[str, Annotated[list, MinLen(1)]] = field(default_factory=dict)  # dotted key -> values; every combination
    trials: list[dict] = field(default_factory=list)  # each a mapping of dotted keys, after the grid
    settings: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, for all its trials


@dataclass(frozen=True)
class PlannedTrial:
    """A trial of a sweep and the experiments it belongs to (a shared trial, such as the
    full-ImageNet baseline, runs once and belongs to every experiment that lists it)."""

    config: TrialConfig
    experiments: tuple[str, ...]


@dataclass(frozen=True)
class SweepSpec:
    """A sweep: a base trial config and its trials, once per seed.

    Two forms. One experiment: ``grid`` (dotted keys and values, every combination) and
    ``extra_trials`` (e.g. the control), tagged with the experiment ``experiment`` (default: the
    sweep's ``name``); with neither, the base config is the one trial. Several: ``experiments`` maps each name to its own grid, trials and
    settings; top-level ``extra_trials`` then belong to every experiment (the random-init control).
    A trial that several experiments list with the same config runs once and counts for each.
    ``seeds`` repeats every trial once per seed (the trial's ``seed`` setting); empty: the base
    config's ``seed`` only.
    """

    trial: TrialConfig
    # Dotted trial keys and the values each takes; the trials are every combination.
    grid: dict[str, Annotated[list, MinLen(1)]] = field(default_factory=dict)
    extra_trials: list[dict] = field(default_factory=list)  # dotted keys set apart from the grid
    experiment: str = ""  # the one experiment's name without `experiments` (default: `name`); a-z, 0-9, _
    experiments: dict[str, ExperimentSpec] = field(default_factory=dict)
    seeds: list[Annotated[int, Ge(0)]] = field(default_factory=list)  # every trial once per seed
    resources: Resources = field(default_factory=Resources)
    max_concurrent_trials: Annotated[int, Ge(0)] = 0  # 0: as many as the resources allow
    max_failures: Annotated[int, Ge(0)] = 1  # retries of a failed trial
    storage: Annotated[str, MinLen(1)] = "itl_runs/ray"  # Ray Tune's results and checkpoints
    description: str = ""  # what the sweep is (its MLflow run's description); default: the spec's header comment

    def check(self) -> None:
        """The rules between fields (bounds are declared on the fields): ValueError naming them."""
        if self.experiments and self.grid:
            raise ValueError(f"grid: a spec has either a top-level grid or experiments, not both; this one has the "
                             f"grid over {', '.join(self.grid)} and the experiments {', '.join(self.experiments)}: "
                             "move the grid under an experiment (experiments.NAME.grid) or remove one of them")
        if self.experiments and self.experiment:
            raise ValueError("experiment: a spec with experiments names them under experiments")
        for name, experiment in self.experiments.items():
            if not EXPERIMENT_NAME.fullmatch(name):
                raise ValueError(f"experiments.{name}: an experiment name uses a-z, 0-9 and _ only")
            if not experiment.grid and not experiment.trials:
                raise ValueError(f"experiments.{name}: no trials; give it a grid or trials")
        if self.experiment and not EXPERIMENT_NAME.fullmatch(self.experiment):
            raise ValueError(f"experiment: {self.experiment!r} uses characters other than a-z, 0-9 and _")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: {self.seeds} lists a seed twice")
        grids = {"grid": self.grid, **{f"experiments.{name}.grid": e.grid for name, e in self.experiments.items()}}
        for where, grid in grids.items():
            for dotted in grid:
                if dotted.split(".")[0] == "runtime":
                    raise ValueError(f"{where}.{dotted}: runtime settings change how fast a trial runs, not what it "
                                     "computes; set them once under runtime:, not in a grid")

    def experiment_names(self) -> list[str]:
        return list(self.experiments) or [self.experiment or as_experiment_name(self.trial.name)]

    def planned(self) -> list[PlannedTrial]:
        """Every trial once (grid order, then listed trials, then shared extra trials; each once
        per seed), tagged with the experiments that list it. Raises UserError naming the bad point."""
        base = to_dict(self.trial)
        seeds = [{"seed": seed} for seed in self.seeds] or [{}]
        if self.experiments:
            groups = {name: (e.grid, e.trials, e.settings, f"experiments.{name}.") for name, e in self.experiments.items()}
            shared = self.extra_trials
        else:
            groups = {self.experiment_names()[0]: (self.grid, self.extra_trials, {}, "")}
            shared = []
        found: dict[str, tuple[TrialConfig, list[str]]] = {}

        def add(overrides: dict, where: str, names: list[str]) -> None:
            if self.seeds and "seed" in overrides:
                raise UserError(f"{where}: sets seed, which `seeds: {self.seeds}` already varies; remove one")
            for seed in seeds:
                config = _apply(base, {**overrides, **seed}, where)
                key = _same_trial_key(config)  # a trial listed twice (a shared baseline) runs once
                if key not in found:
                    found[key] = (config, [])
                found[key][1].extend(name for name in names if name not in found[key][1])

        for name, (grid, listed, settings, prefix) in groups.items():
            keys = list(grid)
            # No grid: only the listed trials; a spec with neither runs its base config alone.
            points = itertools.product(*(grid[key] for key in keys)) if grid or not (prefix or listed) else []
            for values in points:
                add({**settings, **dict(zip(keys, values))}, f"{prefix}grid", [name])
            for index, extra in enumerate(listed):
                where = f"{prefix}trials[{index}]" if prefix else f"extra_trials[{index}]"
                add({**settings, **extra}, where, [name])
        for index, extra in enumerate(shared):
            add(extra, f"extra_trials[{index}]", list(groups))
        return [PlannedTrial(config, tuple(names)) for config, names in found.values()]

    def trials(self) -> list[TrialConfig]:
        """The sweep's distinct trials, in the order of ``planned``."""
        return [planned.config for planned in self.planned()]

    def varying_keys(self) -> list[str]:
        """The dotted keys the sweep's trials differ in (for readable trial names), seed last."""
        keys: list[str] = []
        sources = [self.grid, *self.extra_trials]
        for experiment in self.experiments.values():
            sources += [experiment.grid, *experiment.trials, experiment.settings]
        for source in sources:
            keys += [key for key in source if key not in keys]
        if self.seeds and "seed" not in keys:
            keys.append("seed")
        return keys


SWEEP_KEYS = {f.name for f in dataclasses.fields(SweepSpec)} - {"trial"}


def _same_trial_key(config: TrialConfig) -> str:
    """Equal for two configs that are the same trial (all but runtime equal, data by path): what
    the planner merges, without reading the data (``trial_id`` names data by content)."""
    identity = to_dict(config)
    del identity["runtime"]
    return json.dumps(identity, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Reading YAML: a key given twice is an error; plain scalars stay text for the declared types
# ---------------------------------------------------------------------------------------------

class SpecLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with two changes: a key given twice in one mapping is a UserError naming
    the key path and both lines, and plain scalars are text (only ``null``, ``~`` and an empty value
    are null; ``<<`` still merges), so each value gets its type from the field it lands in."""

    def construct_document(self, node):
        _refuse_duplicate_keys(node, "", set())
        return super().construct_document(node)


SpecLoader.yaml_implicit_resolvers = {}  # no YAML 1.1 guessing: booleans, numbers, dates stay text
SpecLoader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])
SpecLoader.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"])


def _refuse_duplicate_keys(node, path: str, seen_nodes: set) -> None:
    """UserError for a mapping that gives a key twice (PyYAML keeps the last silently)."""
    if id(node) in seen_nodes:  # an alias: its node was checked where it was defined
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                _refuse_duplicate_keys(value_node, path, seen_nodes)
                continue
            if isinstance(key_node, yaml.ScalarNode):
                key = f"{path}.{key_node.value}" if path else key_node.value
                line = key_node.start_mark.line + 1
                if key_node.value in lines:
                    raise UserError(f"key {key!r} is given twice (lines {lines[key_node.value]} and {line}); "
                                    "keep one")
                lines[key_node.value] = line
            else:
                key = path
            _refuse_duplicate_keys(value_node, key, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{path}[{index}]", seen_nodes)


def read_yaml(text: str, source: str) -> Any:
    """Parse ``text`` with ``SpecLoader``. UserError starting with ``source`` (e.g. ``spec file
    'x.yaml'``) for invalid YAML (with its line) or a key given twice."""
    try:
        return yaml.load(text, Loader=SpecLoader)
    except UserError as error:
        raise UserError(f"{source}: {error}") from None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or "not valid YAML"
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{source} is not valid YAML: {problem}{where}") from None


# ---------------------------------------------------------------------------------------------
# The one validator: mapping -> dataclass, each value converted to its declared type and checked
# ---------------------------------------------------------------------------------------------

_INT = re.compile(r"[-+]?[0-9]+")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")  # YAML 1.2's core schema
_TRUE, _FALSE = ("true", "True", "TRUE"), ("false", "False", "FALSE")
# Keys that moved: an old spec gets told where they are now.
MOVED: dict[str, str] = {
    "device": "runtime.device", "threads": "runtime.threads",
    **{f"pretrain.{key}": f"runtime.pretrain.{key}" for key in
       ("workers", "prefetch", "cache_gib", "cpu_decode_share", "channels_last", "compile")},
    "transfer.detection.test_batch_size": "runtime.detection.test_batch_size",
    "transfer.detection.batch_size": "transfer.detection.images_per_batch",
    "transfer.detection.rois_per_image": "transfer.detection.rois_per_batch",
    "transfer.detection.lr_drop_at": "transfer.detection.lr_step",
    **{f"transfer.action.{key}": f"transfer.action.crops.{key}" for key in ("context", "batch_size", "lr_drop_every")},
    "transfer.scene.cache_gib": "runtime.scene.cache_gib",
    "transfer.induction.batch_size": "runtime.induction.batch_size",
    "transfer.induction.classes_per_chunk": "runtime.induction.classes_per_chunk",
    "data.sun397_partition": "transfer.scene.partitions",
}


def _show(value: Any) -> str:
    """A value as a message shows it: text quoted, null as null, tuples as lists."""
    if value is None:
        return "null"
    if isinstance(value, tuple):
        return repr(list(value))
    return repr(value)


def _type_name(kind: Any) -> str:
    base, _ = _annotated(kind)
    return getattr(base, "__name__", str(base).replace("typing.", ""))


def _annotated(kind: Any) -> tuple[Any, list]:
    """(the type, its constraints) of ``Annotated[type, *constraints]``; an Interval is split into
    its bounds."""
    if typing.get_origin(kind) is not Annotated:
        return kind, []
    constraints = []
    for item in kind.__metadata__:
        constraints.extend(item if isinstance(item, Interval) else [item])
    return kind.__origin__, constraints


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _rules(constraints: list) -> list[tuple[str, typing.Callable[[Any], bool]]]:
    """Each constraint as (what it allows, a test of a value)."""
    rules = []
    for rule in constraints:
        if isinstance(rule, Gt):
            rules.append((f"> {_number(rule.gt)}", lambda v, b=rule.gt: v > b))
        elif isinstance(rule, Ge):
            rules.append((f">= {_number(rule.ge)}", lambda v, b=rule.ge: v >= b))
        elif isinstance(rule, Lt):
            rules.append((f"< {_number(rule.lt)}", lambda v, b=rule.lt: v < b))
        elif isinstance(rule, Le):
            rules.append((f"<= {_number(rule.le)}", lambda v, b=rule.le: v <= b))
        elif isinstance(rule, MinLen):
            rules.append(("not empty" if rule.min_length == 1 else f"at least {rule.min_length} items",
                          lambda v, n=rule.min_length: len(v) >= n))
        elif isinstance(rule, MaxLen):
            rules.append((f"at most {rule.max_length} items", lambda v, n=rule.max_length: len(v) <= n))
        elif isinstance(rule, Len):
            rules += _rules([MinLen(rule.min_length)] + ([MaxLen(rule.max_length)] if rule.max_length else []))
        else:
            raise TypeError(f"the config validator does not know the constraint {rule!r}")
    return rules


def _convert(value: Any, kind: Any, path: str) -> Any:
    """``value`` (text from YAML, or a Python value) as the declared type ``kind``, checked against
    its declared bounds or choices; UserError naming ``path`` otherwise."""
    base, constraints = _annotated(kind)
    result = _convert_type(value, base, path)
    rules = _rules(constraints)
    if not all(test(result) for _, test in rules):
        allowed = " and ".join(text for text, _ in rules)
        raise UserError(f"{path}={_show(result)} is out of range; allowed: {allowed}")
    return result


def _convert_type(value: Any, kind: Any, path: str) -> Any:
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise UserError(f"{path}: expected a mapping of {_type_name(kind)} keys, got {_show(value)}")
        return from_dict(kind, value, path)
    if origin is Literal:
        choices = typing.get_args(kind)
        for choice in choices:
            text = {True: "true", False: "false"}.get(choice, str(choice)) if isinstance(choice, bool) else str(choice)
            if (type(value) is type(choice) and value == choice) or (isinstance(value, str) and value == text):
                return choice
        raise UserError(f"{path}={_show(value)} is not one of the choices: {', '.join(map(str, choices))}")
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(kind) if option is not type(None)]
        if value is None and len(options) < len(typing.get_args(kind)):
            return None
        if len(options) == 1:
            return _convert(value, options[0], path)
        for option in options:
            try:
                return _convert(value, option, path)
            except UserError:
                continue
        raise UserError(f"{path}: expected {' or '.join(_type_name(o) for o in options)}, got {_show(value)}")
    if origin is list or kind is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{path}: expected a list, got {_show(value)}")
        (item,) = typing.get_args(kind) or (Any,)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{path}: expected a list, got {_show(value)}")
        items = typing.get_args(kind)
        if len(items) == 2 and items[1] is Ellipsis:
            items = (items[0],) * len(value)
        elif len(value) != len(items):
            raise UserError(f"{path}: expected a list of {len(items)} values, got {_show(value)}")
        return tuple(_convert(v, item, f"{path}[{i}]") for i, (v, item) in enumerate(zip(value, items)))
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise UserError(f"{path}: expected a mapping, got {_show(value)}")
        _, item = typing.get_args(kind) or (str, Any)
        return {str(k): _convert(v, item, f"{path}.{k}") for k, v in value.items()}
    if kind is Any:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value in _TRUE + _FALSE:
            return value in _TRUE
        raise UserError(f"{path}: expected true or false, got {_show(value)}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INT.fullmatch(value):
            return int(value)
        raise UserError(f"{path}: expected int (a whole number), got {_show(value)}")
    if kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and _FLOAT.fullmatch(value):
            number = float(value)
        if number is None or not math.isfinite(number):
            raise UserError(f"{path}: expected float (a number such as 0.01 or 1e-3), got {_show(value)}")
        return number
    if kind is str:
        if not isinstance(value, str):
            raise UserError(f"{path}: expected str (text), got {_show(value)}")
        return value
    if isinstance(kind, type) and not isinstance(value, kind):
        raise UserError(f"{path}: expected {_type_name(kind)}, got {_show(value)}")
    return value


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass ``cls`` from a mapping (missing keys keep their defaults): the one validator.

    Each value is converted to its field's declared type (text from YAML: ``"1e-3"`` -> 0.001 for a
    float), checked against the field's declared bounds (``Annotated[float, Gt(0)]``) or choices
    (``Literal[...]``), sections recursively; then the section's ``check()`` (cross-field rules)
    runs. Raises UserError naming the key path (``pretrain.epochs``), the value and what is allowed,
    for an unknown key, a wrong type, a value out of range or a failed check."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            moved = f" (it is {MOVED[where]} now)" if where in MOVED else ""
            raise UserError(f"unknown key {where!r}{moved}; known keys here: {', '.join(sorted(names))}")
    values = {name: _convert(data[name], hints[name], f"{path}.{name}" if path else name)
              for name in names if name in data}
    instance = cls(**values)
    check = getattr(instance, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as error:
            raise UserError(f"{path}: {error}" if path else str(error)) from None
    return instance


def validate(instance, path: str = ""):
    """``instance`` (a config dataclass built in Python) put through ``from_dict``: returns an equal
    instance, or raises the UserError a spec with these values would get (key paths start with
    ``path``)."""
    return from_dict(type(instance), to_dict(instance), path)


def setting_type(cls, dotted: str, where: str = "") -> Any:
    """The declared type of the dotted key ``dotted`` in dataclass ``cls`` (``pretrain.lr`` ->
    ``Annotated[float, Gt(0)]``). UserError, prefixed ``where: ``, for an unknown key."""
    prefix = f"{where}: " if where else ""
    kind, walked = cls, []
    for part in dotted.split("."):
        base, _ = _annotated(kind)
        if not dataclasses.is_dataclass(base):
            raise UserError(f"{prefix}{'.'.join(walked)!r} is a value, not a section (in {dotted!r})")
        names = [f.name for f in dataclasses.fields(base) if f.init]
        walked.append(part)
        if part not in names:
            moved = f" (it is {MOVED['.'.join(walked)]} now)" if ".".join(walked) in MOVED else ""
            raise UserError(f"{prefix}unknown key {'.'.join(walked)!r}{moved}; known keys here: "
                            f"{', '.join(sorted(names))}")
        kind = _hints(base)[part]
    return kind


def to_dict(instance) -> dict:
    """A plain, JSON-ready mapping of a config dataclass (nested sections as dicts, tuples as
    lists): what ``from_dict`` reads back and what a trial saves beside its results."""
    return json.loads(json.dumps(dataclasses.asdict(instance)))


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow params)."""
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def set_dotted(mapping: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping, creating sections as needed; a mapping given for a
    section is merged into it key by key, an empty mapping replaces it (``grid={}`` clears the grid).
    UserError when a part of the path is a value, not a section."""
    *parents, last = dotted.split(".")
    node = mapping
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"{dotted}: {part!r} is a value, not a section")
        node = child
    if isinstance(value, dict) and value and isinstance(node.get(last), dict):
        for key, item in value.items():
            set_dotted(node[last], str(key), item)
    else:
        node[last] = value


def _apply(base: dict, overrides: dict, where: str) -> TrialConfig:
    merged = json.loads(json.dumps(base))
    for dotted, value in overrides.items():
        set_dotted(merged, dotted, value)
    try:
        return from_dict(TrialConfig, merged)
    except UserError as error:
        raise UserError(f"{where}: {error}") from None


def override(config: TrialConfig, overrides: dict[str, Any]) -> TrialConfig:
    """A trial config with ``--set`` overrides applied (relative data paths made absolute);
    UserError, prefixed ``--set:``, naming a bad key or value."""
    updated = _apply(to_dict(config), overrides, "--set")
    return dataclasses.replace(updated, data=_absolute_paths(updated.data))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["a.b=3", "c=x"]`` -> ``{"a.b": "3", "c": "x"}``: values are read as YAML by ``SpecLoader``
    (``[1, 2]`` is a list, ``null`` None, scalars text that the key's declared type converts).
    UserError for a pair without ``=`` or without a key."""
    overrides = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set pretrain.epochs=10")
        overrides[key.strip()] = read_yaml(raw, f"--set {pair!r}") if raw.strip() else ""
    return overrides


def _typed(dotted: str, value: Any, where: str, path: str) -> Any:
    """A grid or extra-trial value as its key's declared type, in plain form (a whole section is
    checked when the trials are built)."""
    kind = setting_type(TrialConfig, dotted, where)
    if dataclasses.is_dataclass(_annotated(kind)[0]):
        return value
    converted = _convert(value, kind, path)
    return list(converted) if isinstance(converted, tuple) else converted


def _typed_grid(grid: dict[str, list], where: str) -> dict[str, list]:
    """Each axis's values converted to the setting's type; UserError for a value an axis lists
    twice (it would be one trial, silently)."""
    typed = {dotted: [_typed(dotted, value, where, f"{where}.{dotted}[{index}]") for index, value in enumerate(values)]
             for dotted, values in grid.items()}
    for dotted, values in typed.items():
        seen = [json.dumps(value, sort_keys=True) for value in values]
        twice = next((index for index, value in enumerate(seen) if value in seen[:index]), None)
        if twice is not None:
            raise UserError(f"{where}.{dotted} lists {values[twice]!r} twice ({values}); list each value once")
    return typed


def _typed_points(points: list[dict], where: str) -> list[dict]:
    return [_typed_settings(point, f"{where}[{index}]") for index, point in enumerate(points)]


def _typed_settings(settings: dict, where: str) -> dict:
    return {dotted: _typed(dotted, value, where, f"{where}.{dotted}") for dotted, value in settings.items()}


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read and validate a sweep spec file, with ``overrides`` (from ``parse_overrides``) applied
    first; ``grid.<dotted key>`` overrides set a grid axis. Relative data paths become absolute
    (trials run in other working directories). Every grid point and extra trial is built and
    validated here, so a bad one fails before Ray starts: UserError naming the file, the line of
    a YAML error or of a key given twice, or the key path (``grid.pretrain.lr[1]=...``,
    ``extra_trials[0]: ...``)."""
    spec_path = Path(path)
    if spec_path.is_dir():
        raise UserError(f"spec file {str(path)!r} is a folder; give the path of a spec's .yaml file (sweeps/ holds some)")
    if not spec_path.is_file():
        raise UserError(f"spec file {str(path)!r} does not exist")
    try:
        text = spec_path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"spec file {str(path)!r} cannot be read: {error}") from None
    raw = read_yaml(text, f"spec file {str(path)!r}")
    if raw is None or raw == {}:
        raise UserError(f"spec file {str(path)!r} holds no settings; a spec names the sweep (name:), its prepared "
                        "data (data:), and what it varies (grid:, extra_trials:); see sweeps/smoke.yaml")
    if not isinstance(raw, dict):
        raise UserError(f"spec file {str(path)!r} must hold a YAML mapping of settings")
    for dotted, value in (overrides or {}).items():
        if dotted.startswith("grid."):  # grid keys are themselves dotted: grid.pretrain.epochs=[1, 2]
            grid = raw.setdefault("grid", {})
            if grid is None:
                grid = raw["grid"] = {}
            if not isinstance(grid, dict):
                raise UserError(f"--set {dotted}: the spec's grid is not a mapping")
            grid[dotted[len("grid."):]] = value
        else:
            set_dotted(raw, dotted, value)
    known = sorted({f.name for f in dataclasses.fields(TrialConfig) if f.init} | set(SWEEP_KEYS) - {"trial"})
    for key in raw:
        if key not in known:
            moved = f" (it is {MOVED[key]} now)" if key in MOVED else ""
            raise UserError(f"spec file {str(path)!r}: unknown key {key!r}{moved}; known keys here: {', '.join(known)}")
    sweep_part = {key: raw.pop(key) for key in list(raw) if key in SWEEP_KEYS}
    sweep_part.setdefault("description", header_comment(spec_path.read_text()))
    trial = from_dict(TrialConfig, raw)
    trial = dataclasses.replace(trial, data=_absolute_paths(trial.data))
    spec = from_dict(SweepSpec, {**sweep_part, "trial": to_dict(trial)})
    spec = dataclasses.replace(
        spec, grid=_typed_grid(spec.grid, "grid"), extra_trials=_typed_points(spec.extra_trials, "extra_trials"),
        experiments={name: ExperimentSpec(grid=_typed_grid(e.grid, f"experiments.{name}.grid"),
                                          trials=_typed_points(e.trials, f"experiments.{name}.trials"),
                                          settings=_typed_settings(e.settings, f"experiments.{name}.settings"))
                     for name, e in spec.experiments.items()},
    )
    spec.trials()  # validates every grid point and extra trial now, naming the bad one
    return spec


def header_comment(text: str) -> str:
    """The comment lines that open a YAML file, without their ``#``, joined by newlines."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return "\n".join(lines).strip()


def _absolute_paths(data: DataConfig) -> DataConfig:
    def absolute(value: str) -> str:
        return value if "://" in value else str(Path(value).expanduser().resolve())

    return dataclasses.replace(
        data,
        imagenet=absolute(data.imagenet),
        voc2007=absolute(data.voc2007),
        voc2012=absolute(data.voc2012),
        sun397=absolute(data.sun397),
    )


def trial_identity(config: TrialConfig) -> dict:
    """What a trial's result depends on: its config without ``runtime``, each prepared dataset
    named by its content hash (``shards.manifest_hash``, recorded in its PREPARED.json) instead of
    its path. Reads each folder's PREPARED.json (and, for a folder prepared before content hashes
    were recorded, its manifest); UserError naming the setting when a folder is not prepared."""
    identity = to_dict(config)
    del identity["runtime"]
    for setting, kind in PREPARE_KINDS.items():
        identity["data"][setting] = data_hash(identity["data"][setting], kind, f"data.{setting}")
    return identity


def data_hash(folder: str, kind: str, setting: str) -> str:
    """The content hash of the prepared folder ``folder`` (16 hex digits): PREPARED.json's
    ``content_hash``, or computed from the manifest for an older folder (nothing is written to it).
    Cached per process while the folder's PREPARED.json is unchanged."""
    info = Path(folder).expanduser().resolve() / "PREPARED.json"
    stamp = (info.stat().st_mtime_ns, info.stat().st_size) if info.is_file() else None
    return _data_hash(folder, kind, setting, stamp)


@functools.lru_cache(maxsize=64)
def _data_hash(folder: str, kind: str, setting: str, stamp) -> str:
    info = read_info(folder, kind, setting)
    return info.get("content_hash") or Prepared(folder, kind, setting).content_hash


def trial_id(config: TrialConfig) -> str:
    """A stable id of a trial, 12 hex digits of the sha256 of its key-sorted ``trial_identity``:
    the identity of its MLflow run (tag ``itl.trial_id``) and of its working folder. Every setting
    counts except ``runtime`` (workers, threads, device, ...); data counts by content, not path, so
    moving a prepared folder keeps the id and preparing other data changes it."""
    text = json.dumps(trial_identity(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def trial_name(config: TrialConfig, varying: list[str]) -> str:
    """A readable name from the dotted keys a sweep varies (their last part and value), e.g.
    ``num_classes=10,images_per_class=40``; ``trial`` when nothing varies."""
    flat = flatten(to_dict(config))
    parts = [f"{key.rsplit('.', 1)[-1]}={flat[key]}" for key in varying if key in flat]
    return ",".join(parts) or "trial"

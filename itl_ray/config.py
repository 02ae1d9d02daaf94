"""The typed config tree: sweep spec YAML -> validated frozen dataclasses, with dotted overrides.

A sweep spec is a YAML mapping with the trial config's sections (``data``, ``model``,
``pretrain``, ``transfer``, ...) plus the sweep's own keys (``grid``, ``extra_trials``,
``resources``, ...). Every key is declared once, here or in the stage module that reads it, with
its type and default; unknown keys and wrong types are errors that name the key path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itl_ray.errors import UserError
from itl_ray.study import EXPERIMENT_NAME, as_experiment_name
from itl_ray.models import INITS, MIN_RESOLUTION, VARIANTS
from itl_ray.pretrain import PretrainConfig
from itl_ray.shards import prepared_paths
from itl_ray.transfer.action import ActionConfig
from itl_ray.transfer.detection import DetectionConfig
from itl_ray.transfer.induction import InductionConfig
from itl_ray.transfer.scene import SceneConfig

MINI_PATHS = prepared_paths("data/mini-shards")  # where `make demo` prepares the mini-benchmark


@dataclass(frozen=True)
class DataConfig:
    """Prepared datasets (folders written by `itl-ray prepare KIND ROOT OUT`). Defaults: the
    generated mini-benchmark that `make demo` writes and prepares."""

    imagenet: str = MINI_PATHS["imagenet"]  # prepared imagenet
    voc2007: str = MINI_PATHS["voc2007"]  # prepared voc2007
    voc2012: str = MINI_PATHS["voc2012"]  # prepared voc2012-action
    sun397: str = MINI_PATHS["sun397"]  # prepared sun397 (which partitions: transfer.scene.partitions)


@dataclass(frozen=True)
class ModelConfig:
    """AlexNet (``itl_ray.models.AlexNet``). The study: Caffe's network at width 1.0 and 227 px
    (``variant``: bvlc_reference_caffenet by default, or bvlc_alexnet; ``init``: caffe, the
    prototxt's Gaussians, or kaiming); the mini-benchmark runs a narrow, small one (0.25 at 64 px)."""

    width: float = 1.0  # channel multiplier of every layer
    resolution: int = 227  # square input side for pretraining and classification transfer (px)
    variant: str = "bvlc_reference_caffenet"  # which Caffe prototxt: LRN after (caffenet) or before pooling
    init: str = "caffe"  # caffe: the prototxt's Gaussian fillers; kaiming: He initialisation (small nets)

    def validate(self, path: str) -> None:
        """UserError naming the key for a width <= 0, a resolution AlexNet cannot take, or a
        variant or init it does not know."""
        prefix = f"{path}." if path else ""
        if not self.width > 0:
            raise UserError(f"{prefix}width must be > 0 (1.0 is the study's AlexNet), got {self.width}")
        if self.resolution < MIN_RESOLUTION:
            raise UserError(f"{prefix}resolution must be >= {MIN_RESOLUTION} px (AlexNet's pool5 needs a cell), "
                            f"got {self.resolution}")
        for key, allowed in (("variant", VARIANTS), ("init", INITS)):
            if getattr(self, key) not in allowed:
                raise UserError(f"{prefix}{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")


@dataclass(frozen=True)
class TransferConfig:
    """The three transfer evaluations, each fine-tuning the whole pretrained network, and induction
    accuracy (nearest neighbours on fc7 features, off unless ``induction.enabled``)."""

    detection: DetectionConfig = field(default_factory=DetectionConfig)
    action: ActionConfig = field(default_factory=ActionConfig)
    scene: SceneConfig = field(default_factory=SceneConfig)
    induction: InductionConfig = field(default_factory=InductionConfig)


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial depends on: a trial is a pure function of this."""

    name: str = "itl_ray"  # the sweep's name: the MLflow experiment
    seed: int = 0  # seeds the subset, the initialisation and every fine-tuning
    device: str = "auto"  # auto (cuda when there is one), cpu or cuda
    threads: int = 0  # torch CPU threads for this trial; 0: torch's default
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)


@dataclass(frozen=True)
class Resources:
    """What Ray Tune reserves for each trial (``tune.with_resources``); the trial also sets torch's
    CPU threads to ``cpus_per_trial`` when ``threads`` is 0."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # fractions let small trials share a GPU


@dataclass(frozen=True)
class ExperimentSpec:
    """One experiment of the study inside a sweep spec (``experiments.NAME``): its trials as a grid
    over dotted keys and/or a list of trials, and settings every one of its trials gets."""

    grid: dict[str, list] = field(default_factory=dict)  # dotted key -> values; every combination
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
    grid: dict[str, list] = field(default_factory=dict)
    extra_trials: list[dict] = field(default_factory=list)
    experiment: str = ""  # the one experiment's name without `experiments` (default: `name`)
    experiments: dict[str, ExperimentSpec] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)  # every trial once per seed
    resources: Resources = field(default_factory=Resources)
    max_concurrent_trials: int = 0  # 0: as many as the resources allow
    max_failures: int = 1  # retries of a failed trial
    storage: str = "itl_runs/ray"  # Ray Tune's results and checkpoints

    def validate(self, path: str) -> None:
        if self.experiments and self.grid:
            raise UserError("grid: a spec with experiments keeps each grid under its experiment "
                            "(experiments.NAME.grid)")
        if self.experiments and self.experiment:
            raise UserError("experiment: a spec with experiments names them under experiments")
        for name, experiment in self.experiments.items():
            if not EXPERIMENT_NAME.fullmatch(name):
                raise UserError(f"experiments.{name}: an experiment name uses a-z, 0-9 and _ only")
            if not experiment.grid and not experiment.trials:
                raise UserError(f"experiments.{name}: no trials; give it a grid or trials")
            for dotted, values in experiment.grid.items():
                if not values:
                    raise UserError(f"experiments.{name}.grid.{dotted}: the list of values is empty")
        if self.experiment and not EXPERIMENT_NAME.fullmatch(self.experiment):
            raise UserError(f"experiment: {self.experiment!r} uses characters other than a-z, 0-9 and _")
        if len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds: {self.seeds} lists a seed twice")

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
                tid = trial_id(config)
                if tid not in found:
                    found[tid] = (config, [])
                found[tid][1].extend(name for name in names if name not in found[tid][1])

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


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with validation
# ---------------------------------------------------------------------------------------------

def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind).replace("typing.", ""))


def _convert(value: Any, kind: Any, path: str) -> Any:
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise UserError(f"{path}: expected a mapping of {_type_name(kind)} keys, got {value!r}")
        return from_dict(kind, value, path)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except UserError:
                continue
        raise UserError(f"{path}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(kind) or (Any,)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{path}: expected a list, got {value!r}")
        item = typing.get_args(kind)[0]
        return tuple(_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{path}: expected a mapping, got {value!r}")
        _, item = typing.get_args(kind)
        return {str(k): _convert(v, item, f"{path}.{k}") for k, v in value.items()}
    if kind is Any:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float) and isinstance(value, bool):
        raise UserError(f"{path}: expected {_type_name(kind)}, got {value!r}")
    if kind in (int, float, str, bool) and not isinstance(value, kind):
        raise UserError(f"{path}: expected {_type_name(kind)}, got {value!r}")
    return value


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass ``cls`` from a mapping (missing keys keep their defaults) and run its
    ``validate(path)`` when it has one. Raises UserError naming the key path (``pretrain.epochs``)
    for an unknown key, a wrong type or a value ``validate`` refuses."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            raise UserError(f"unknown key {where!r}; known keys here: {', '.join(sorted(names))}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            values[f.name] = _convert(data[f.name], hints[f.name], f"{path}.{f.name}" if path else f.name)
    instance = cls(**values)
    check = getattr(instance, "validate", None)
    if check:
        check(path)
    return instance


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
    """Set ``a.b.c`` in a nested mapping, creating sections as needed; UserError when a part of
    the path is a value, not a section."""
    *parents, last = dotted.split(".")
    node = mapping
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{dotted}: {part!r} is a value, not a section")
        node = child
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
    """``["a.b=3", "c=x"]`` -> ``{"a.b": 3, "c": "x"}``; values are read as YAML (``[1, 2]`` is a
    list, ``null`` None). UserError for a pair without ``=`` or without a key."""
    import yaml

    overrides = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set pretrain.epochs=10")
        overrides[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return overrides


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read and validate a sweep spec file, with ``overrides`` (from ``parse_overrides``) applied
    first; ``grid.<dotted key>`` overrides set a grid axis. Relative data paths become absolute
    (trials run in other working directories). Every grid point and extra trial is built and
    validated here, so a bad one fails before Ray starts: UserError naming the file, the line of
    a YAML error, or the key path (``grid: ...``, ``extra_trials[0]: ...``)."""
    import yaml

    spec_path = Path(path)
    if not spec_path.is_file():
        raise UserError(f"spec file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(spec_path.read_text())
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or "not valid YAML"
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"spec file {str(path)!r} is not valid YAML: {problem}{where}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"spec file {str(path)!r} must hold a YAML mapping of settings")
    for dotted, value in (overrides or {}).items():
        if dotted.startswith("grid."):  # grid keys are themselves dotted: grid.pretrain.epochs=[1, 2]
            grid = raw.setdefault("grid", {})
            if not isinstance(grid, dict):
                raise UserError(f"--set {dotted}: the spec's grid is not a mapping")
            grid[dotted[len("grid."):]] = value
        else:
            set_dotted(raw, dotted, value)
    sweep_part = {key: raw.pop(key) for key in list(raw) if key in SWEEP_KEYS}
    trial = from_dict(TrialConfig, raw)
    trial = dataclasses.replace(trial, data=_absolute_paths(trial.data))
    spec = from_dict(SweepSpec, {**sweep_part, "trial": to_dict(trial)})
    for dotted in spec.grid:
        if not spec.grid[dotted]:
            raise UserError(f"grid.{dotted}: the list of values is empty")
    spec.trials()  # validates every grid point and extra trial now, naming the bad one
    return spec


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


def trial_id(config: TrialConfig) -> str:
    """A stable id of a trial config, 12 hex digits of the sha256 of its key-sorted JSON: the
    identity of its MLflow run (tag ``itl.trial_id``) and of its working folder. Every setting
    counts, data paths included."""
    text = json.dumps(to_dict(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def trial_name(config: TrialConfig, varying: list[str]) -> str:
    """A readable name from the dotted keys a sweep varies (their last part and value), e.g.
    ``num_classes=10,images_per_class=40``; ``trial`` when nothing varies."""
    flat = flatten(to_dict(config))
    parts = [f"{key.rsplit('.', 1)[-1]}={flat[key]}" for key in varying if key in flat]
    return ",".join(parts) or "trial"

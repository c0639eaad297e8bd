"""What a sweep varies: ``--param`` specs, search spaces and presets.

A spec is ``NAME=FORM``; the forms are

- ``NAME=V1,V2,...``   a list of values (one value fixes the parameter); the grid sampler needs these
- ``NAME=log:LO:HI``   log-uniform between LO and HI (LO > 0), of the parameter's own type
- ``NAME=uniform:LO:HI`` uniform between LO and HI, of the parameter's own type
- ``NAME=int:LO:HI``   integers from LO to HI (integer parameters)
- ``NAME=float:LO:HI`` real numbers from LO to HI (real-valued parameters)

Every value and bound is checked against the [training] section's own limits
(``controller.config``), so a sweep never starts a trial that ``cluster train``
would refuse.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Union

from controller.config import ConfigError, TrainingConfig, field_kinds, parse_value
from controller.errors import UsageError

# the sweepable RunSpec fields, in the order they are shown
SWEEPABLE: tuple[str, ...] = ("lr", "l1", "momentum", "batch_size", "optimizer", "conv1", "conv2", "hidden", "epochs")

ACCEPTED_FORMS = (
    "NAME=V1,V2,... (a list of values; the grid sampler needs lists) | NAME=log:LO:HI | "
    "NAME=uniform:LO:HI | NAME=int:LO:HI | NAME=float:LO:HI"
)

_FIELDS = {f.name: f for f in dataclasses.fields(TrainingConfig)}
_KINDS = field_kinds(TrainingConfig)


@dataclass(frozen=True)
class ParamSpec:
    """One swept parameter: a list of values, or a range (``low``..``high``, maybe log-scaled)."""

    name: str
    values: tuple = ()  # a list of values; empty for a range
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    integer: bool = False  # for a range: sample integers

    @property
    def is_range(self) -> bool:
        return not self.values

    def suggest(self, trial) -> Any:
        """Optuna's suggestion for this parameter (idempotent: a trial keeps its first value)."""
        if not self.is_range:
            return trial.suggest_categorical(self.name, list(self.values))
        assert self.low is not None and self.high is not None  # a range has both ends
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def describe(self) -> str:
        if not self.is_range:
            return f"{self.name}=" + ",".join(_fmt(v) for v in self.values)
        kind = "log" if self.log else ("int" if self.integer else "float")
        return f"{self.name}={kind}:{_fmt(self.low)}:{_fmt(self.high)}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"values": list(self.values)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ParamSpec":
        return cls(**{**data, "values": tuple(data.get("values", ()))})


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[ParamSpec, ...] = field(default_factory=tuple)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def is_grid(self) -> bool:
        return bool(self.params) and not any(p.is_range for p in self.params)

    def grid(self) -> dict[str, list]:
        """The search space for Optuna's GridSampler (every parameter must be a list)."""
        ranges = [p.describe() for p in self.params if p.is_range]
        if ranges:
            raise UsageError(
                f"--sampler grid needs a list of values for every parameter, but {', '.join(ranges)} "
                f"{'is a range' if len(ranges) == 1 else 'are ranges'}; give values (e.g. lr=0.001,0.01,0.1) "
                f"or use --sampler random or tpe"
            )
        return {p.name: list(p.values) for p in self.params}

    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.params)

    def suggest(self, trial) -> dict[str, Any]:
        return {p.name: p.suggest(trial) for p in self.params}

    def describe(self) -> str:
        return " ".join(p.describe() for p in self.params)

    def merged(self, other: "SearchSpace") -> "SearchSpace":
        """This space with ``other``'s parameters added; ``other`` wins where both name one."""
        mine = {p.name: p for p in self.params}
        mine.update({p.name: p for p in other.params})
        return SearchSpace(tuple(mine.values()))

    def to_list(self) -> list[dict]:
        return [p.to_dict() for p in self.params]

    @classmethod
    def from_list(cls, data: Iterable[Mapping[str, Any]]) -> "SearchSpace":
        return cls(tuple(ParamSpec.from_dict(d) for d in data))


@dataclass(frozen=True)
class Preset:
    space: SearchSpace
    sampler: str
    description: str


# The paper's experiment: the L1 penalty's lambda over nine orders of magnitude, default CNN.
PAPER_L1 = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
PRESETS: dict[str, Preset] = {
    "paper": Preset(
        SearchSpace((ParamSpec("l1", values=PAPER_L1),)),
        "grid",
        "the paper's lambda grid (L1 penalty 0, 1e-5 ... 100) on the default CNN",
    ),
}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UsageError(
            f"--preset {name!r}: no such preset; the presets are: "
            + "; ".join(f"{k} ({v.description})" for k, v in PRESETS.items())
        )
    return PRESETS[name]


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _bad(spec: str, reason: str) -> UsageError:
    return UsageError(
        f"--param {spec!r}: {reason}. Accepted forms: {ACCEPTED_FORMS}; NAME is one of {', '.join(SWEEPABLE)}"
    )


def _value(spec: str, name: str, raw: str) -> Any:
    """One value or bound, typed and range-checked like the [training] key of the same name."""
    try:
        return parse_value(raw, _FIELDS[name], _KINDS[name], f"{name}")
    except ConfigError as error:
        raise _bad(spec, str(error)) from None


def parse_param(spec: str) -> ParamSpec:
    """``lr=log:1e-3:1e-1`` -> ParamSpec; a clear UsageError naming the spec otherwise."""
    name, sep, form = spec.partition("=")
    name, form = name.strip().replace("-", "_"), form.strip()
    if not sep or not name or not form:
        raise _bad(spec, "expected NAME=FORM")
    if name not in SWEEPABLE:
        raise _bad(spec, f"{name!r} cannot be swept")
    kind = _KINDS[name]
    head, _, rest = form.partition(":")
    if head in ("log", "uniform", "int", "float"):
        bounds = rest.split(":")
        if len(bounds) != 2 or not all(b.strip() for b in bounds):
            raise _bad(spec, f"a {head} range needs two bounds, {head}:LO:HI")
        if kind is str:
            raise _bad(
                spec,
                f"{name} takes one of {', '.join(_FIELDS[name].metadata['choices'])}, "
                f"so give a list of values, not a range",
            )
        if head == "int" and kind is not int:
            raise _bad(
                spec,
                f"{name} is a real-valued parameter; int:LO:HI is for the integer parameters "
                f"({', '.join(n for n in SWEEPABLE if _KINDS[n] is int)})",
            )
        if head == "float" and kind is not float:
            raise _bad(spec, f"{name} is an integer parameter; use int:LO:HI or log:LO:HI")
        low, high = (_value(spec, name, b) for b in bounds)
        if not low < high:
            raise _bad(spec, f"LO must be below HI (got {_fmt(low)} and {_fmt(high)})")
        if head == "log" and low <= 0:
            raise _bad(spec, f"a log range needs LO > 0 (got {_fmt(low)}); give 0 as a value in a list instead")
        return ParamSpec(name, low=low, high=high, log=head == "log", integer=kind is int)
    raw_values = [v.strip() for v in form.split(",")]
    if any(not v for v in raw_values):
        raise _bad(spec, "an empty value in the list")
    values = tuple(_value(spec, name, v) for v in raw_values)
    if len(set(values)) != len(values):
        raise _bad(spec, "a value is listed twice")
    return ParamSpec(name, values=values)


ParamsLike = Union[None, SearchSpace, Mapping[str, Any], Iterable[str]]


def build_space(params: ParamsLike) -> SearchSpace:
    """A SearchSpace from specs (``["lr=0.01,0.1"]``), a mapping (``{"lr": [0.01, 0.1]}`` or
    ``{"lr": "log:1e-3:1e-1"}``) or a SearchSpace; every parameter checked."""
    if params is None:
        return SearchSpace()
    if isinstance(params, SearchSpace):
        return params
    if isinstance(params, str):
        params = [params]
    if isinstance(params, Mapping):
        specs = []
        for name, value in params.items():
            if isinstance(value, (list, tuple)):
                value = ",".join(repr(v) if isinstance(v, float) else str(v) for v in value)
            specs.append(f"{name}={value}")
    else:
        specs = list(params)
    parsed = [parse_param(s) for s in specs]
    seen: set[str] = set()
    for spec, param in zip(specs, parsed):
        if param.name in seen:
            raise _bad(spec, f"{param.name} is given twice; merge the values into one --param")
        seen.add(param.name)
    return SearchSpace(tuple(parsed))

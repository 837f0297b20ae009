"""Search spaces: which config keys a search varies and over what, read from YAML and checked
against the config before any trial runs.

A space file maps dotted config keys (or nested sections, as in recipes) to a list of choices or
a range:

    optimizer.lr: loguniform(1e-4, 1e-1)     # float, sampled on a log scale
    optimizer.momentum: uniform(0.8, 0.99)   # float
    epochs: int(4, 12)                       # whole numbers; int(4, 12, 2) steps by 2
    model.width: [0.25, 0.5, 1.0]            # choices, any type the key takes
    model.name: [small_cnn, resnet, mobilenet_v2]
    data: {augment: [off, light, strong]}

Every key must exist, every choice must convert to the key's type and pass the config's own
checks, and each range's ends must too (`prune.sparsity: uniform(0, 1.2)` is refused for its
high end). Errors name the space file, the line and the key. The file is read as YAML 1.2
booleans: `off`, `on`, `yes` and `no` stay words, so `data.augment: [off, light]` means what
it says.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import yaml

from tfkarpa import config as config_lib
from tfkarpa.errors import TfkarpaError

# Keys that name the run or its place, not what it learns: each trial sets them itself.
RESERVED = ("task", "name", "run_dir", "runs_root", "export", "export_dir", "stages")
_RANGE = re.compile(r"^\s*(uniform|loguniform|int|logint)\s*\((.*)\)\s*$")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans (true/false only): YAML 1.1 would read `off` as False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _read(text: str):
    """The YAML document, through `_Loader` (a SafeLoader: plain data, never Python objects)."""
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched key: a float or int range, or a list of choices."""

    key: str
    kind: str  # "float" | "int" | "choice"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: int | None = None
    choices: tuple = ()
    where: str = ""  # "space.yaml line 3", for messages

    def suggest(self, trial) -> Any:
        """Draw this key's value for an Optuna trial."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=self.step or 1,
                                     log=self.log)
        return trial.suggest_categorical(self.key, list(self.choices))

    def describe(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(map(str, self.choices))
        scale = "log " if self.log else ""
        step = f" step {self.step}" if self.step and self.step > 1 else ""
        return f"{scale}{self.kind} in [{self.low:g}, {self.high:g}]{step}"

    def ends(self) -> list:
        """The values every trial's config must accept: each choice, or both ends."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


def load(path: str | Path, base: config_lib.Config, check_model=None) -> list[Param]:
    """The space in `path`, checked against `base` (the recipe with overrides applied).

    `check_model(cfg)` (the task's) is run on every value of `model.*` keys, so an unknown
    architecture is named before the first trial rather than in the middle of the study.
    """
    path = Path(path)
    if not path.is_file():
        raise TfkarpaError(f"space file not found: {path}")
    text = path.read_text()
    try:
        tree = _read(text)
        lines = _key_lines(yaml.compose(text, Loader=_Loader))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", err)
        raise TfkarpaError(f"{path}{line}: not valid YAML ({problem})") from None
    if not isinstance(tree, dict) or not tree:
        raise TfkarpaError(f"{path}: expected a mapping of config keys to choices or ranges, "
                           "e.g. 'optimizer.lr: loguniform(1e-4, 1e-1)'")
    params, seen = [], {}
    for key, value in _flatten(tree):
        where = f"{path} line {lines.get(key, '?')}"
        param = _param(key, value, where)
        if param.key in seen:
            raise TfkarpaError(f"{where}: '{param.key}' is already searched ({seen[param.key]})")
        seen[param.key] = where
        _check_ends(param, base, check_model)
        params.append(param)
    return params


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, f"{full}.")
        else:
            yield full, value


def _key_lines(node, prefix: str = "") -> dict[str, int]:
    """Dotted key -> 1-based line, from the composed YAML tree."""
    out = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            full = f"{prefix}{key_node.value}"
            out[full] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, f"{full}."))
    return out


def _param(key: str, value, where: str) -> Param:
    try:
        full, typ, _ = config_lib.field_of(str(key))
    except TfkarpaError as err:
        raise TfkarpaError(f"{where}: {err}") from None
    if full in RESERVED or full.split(".")[0] in RESERVED:
        raise TfkarpaError(f"{where}: '{full}' cannot be searched: each trial sets it itself "
                           f"(reserved: {', '.join(RESERVED)})")
    if isinstance(value, list):
        if not value:
            raise TfkarpaError(f"{where}: '{full}' has an empty list of choices")
        if len({repr(v) for v in value}) != len(value):
            raise TfkarpaError(f"{where}: '{full}' lists a choice twice: {value}")
        if any(isinstance(v, (list, dict)) for v in value):
            raise TfkarpaError(f"{where}: '{full}' choices must be single values, got {value}")
        return Param(full, "choice", choices=tuple(value), where=where)
    match = _RANGE.match(value) if isinstance(value, str) else None
    if not match:
        raise TfkarpaError(
            f"{where}: '{full}': {value!r} is neither a list of choices nor a range "
            "(uniform(a, b), loguniform(a, b), int(a, b[, step]), logint(a, b)); a fixed "
            f"setting goes on the command line ({full}={value})")
    return _range(full, typ, match.group(1), match.group(2), where)


def _range(key: str, typ, kind: str, args: str, where: str) -> Param:
    try:
        numbers = [float(a) for a in args.split(",")]
    except ValueError:
        raise TfkarpaError(f"{where}: '{key}': {kind}({args}) needs numbers") from None
    if len(numbers) != (3 if kind == "int" and len(numbers) == 3 else 2):
        raise TfkarpaError(f"{where}: '{key}': {kind}() takes a low and a high end"
                           + (" and an optional step" if kind == "int" else "")
                           + f", got {kind}({args})")
    low, high = numbers[:2]
    if typ not in (int, float):
        raise TfkarpaError(f"{where}: '{key}' takes a {getattr(typ, '__name__', typ)}, not a "
                           "number range: list its choices instead")
    integer = kind in ("int", "logint")
    if typ is int and not integer:
        raise TfkarpaError(f"{where}: '{key}' takes whole numbers: use int({args}) or "
                           f"logint({args})")
    if integer and not (low.is_integer() and high.is_integer()):
        raise TfkarpaError(f"{where}: '{key}': {kind}() ends must be whole numbers, got {args}")
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise TfkarpaError(f"{where}: '{key}': the low end must be below the high end, got "
                           f"{kind}({args})")
    log = kind in ("loguniform", "logint")
    if log and low <= 0:
        raise TfkarpaError(f"{where}: '{key}': a log range needs a low end above 0, got {low:g}")
    step = None
    if len(numbers) == 3:
        if not numbers[2].is_integer() or numbers[2] < 1:
            raise TfkarpaError(f"{where}: '{key}': int() step must be a positive whole number")
        step = int(numbers[2])
    return Param(key, "int" if integer else "float", low, high, log, step, where=where)


def _check_ends(param: Param, base: config_lib.Config, check_model) -> None:
    for value in param.ends():
        cfg = copy.deepcopy(base)
        try:
            config_lib.set_key(cfg, param.key, value)
            config_lib.validate(cfg)
            if check_model and param.key.startswith("model."):
                check_model(cfg)
        except TfkarpaError as err:
            raise TfkarpaError(f"{param.where}: '{param.key}' value {value!r} is not accepted: "
                               f"{err}") from None


def apply(base: config_lib.Config, values: dict) -> config_lib.Config:
    """`base` with the drawn values set and the whole config checked again (the ends were
    checked one key at a time; a combination can still break a rule across keys)."""
    cfg = copy.deepcopy(base)
    for key, value in values.items():
        config_lib.set_key(cfg, key, value)
    return config_lib.validate(cfg)

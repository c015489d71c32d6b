"""One settings grammar for every training command: `--set KEY=VALUE` and config files into typed dataclasses.

    apply_overrides(cfg, ["optim.lr=3e-4", "data.tasks=[add2,sort]"])     # in place, each value coerced
    root, sections = split_sections(["seed=3", "grpo.max_steps=20"], ("sft", "grpo"))
    # root == ["seed=3"], sections == {"sft": [], "grpo": ["max_steps=20"]}
    in_section(["grpo.max_steps=20", "beta=0.1"], "grpo") == ["max_steps=20", "beta=0.1"]
    apply_mapping(cfg, read_config_file(Path("run.yaml")), where="run.yaml")

The grammar: KEY is a dotted path into nested dataclasses (`optim.lr`, `grpo.optim.lr`); VALUE is read for the
field it lands in: numbers (`3e-4`, `1_000`), booleans (`true/false/yes/no/on/off/1/0`), `none`/`null`/empty
for an optional field, lists and mappings in YAML flow syntax (`[add2,sort]`, `{type: yarn, factor: 4}`),
anything else as a string. Unknown keys raise ValueError naming the key with a "did you mean"; a value that
does not fit its field's type raises ValueError naming the field. Config files are TOML or YAML; YAML numbers
follow YAML 1.2 (`1e-08` is a float, where PyYAML alone reads a string).

A dataclass may take keys beyond its fields with a method `_apply_key(key, value, dotted, where) -> bool`
(True: handled), as train.config.ModelSpec does for DeepseekV3Config's fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class RawString(str):
    """A command-line value: parsed according to the type of the field it lands in."""


def parse_override(item: str, example: str = "optim.lr=3e-4") -> tuple[str, str]:
    """`KEY=VALUE` -> (KEY, VALUE), both stripped; ValueError unless it has that shape."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} must look like key=value (e.g. {example})")
    return key.strip(), raw.strip()


def split_sections(overrides: Sequence[str], sections: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Route `SECTION.KEY=V` (SECTION one of `sections`) to that section as `KEY=V`; every other item stays at
    the root. Order is kept within each list."""
    root: list[str] = []
    by_section: dict[str, list[str]] = {name: [] for name in sections}
    for item in overrides:
        head, dot, rest = item.partition(".")
        if dot and head in by_section:
            if not rest.partition("=")[0].strip():
                raise ValueError(f"override {item!r} must look like {head}.KEY=VALUE (e.g. {head}.max_steps=20)")
            by_section[head].append(rest)
        else:
            root.append(item)
    return root, by_section


def in_section(overrides: Sequence[str], name: str) -> list[str]:
    """A command's own settings: `NAME.KEY=V` read as `KEY=V` (`nanoseek grpo --set grpo.max_steps=20` is
    `--set max_steps=20`, as the speedrun takes it), every other item as it is; order is kept."""
    out: list[str] = []
    for item in overrides:
        out.extend(split_sections([item], (name,))[1][name] or [item])
    return out


def apply_overrides(cfg: Any, overrides: Sequence[str], example: str = "optim.lr=3e-4") -> None:
    """Apply `key=value` strings (dotted keys reach nested sections) to the dataclass `cfg`, in place, each
    value checked and coerced to its field's type."""
    for item in overrides:
        key, raw = parse_override(item, example)
        nested: dict[str, Any] = {}
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = RawString(raw)
        apply_mapping(cfg, nested, where=f"override {item!r}")


def apply_mapping(obj: Any, data: dict[str, Any], where: str, prefix: str = "") -> None:
    """Merge `data` into the dataclass `obj` in place, checking keys and coercing values."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    extra = getattr(obj, "_apply_key", None)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if extra is not None and extra(key, value, dotted, where):
            continue
        if key not in names:
            raise ValueError(f"{where}: unknown config key {dotted!r}{suggest(key, names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {dotted!r} is a section; give it a mapping, got {value!r}")
            apply_mapping(current, value, where, prefix=f"{dotted}.")
        else:
            setattr(obj, key, coerce(value, hints[key], dotted, where))


def suggest(name: str, choices) -> str:
    """' (did you mean 'X'?)' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---- values -----------------------------------------------------------------------------------------------
def coerce(value: Any, tp: Any, name: str, where: str) -> Any:
    """Convert `value` to type `tp` (int, float, bool, str, X | None, list[X], dict) or raise ValueError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        is_null = value is None or (isinstance(value, RawString) and value.lower() in ("none", "null", ""))
        if is_null and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, name, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{where}: {name} cannot be {value!r}")
    if isinstance(value, RawString) and tp not in (str, Any):
        value = parse_cli_value(value, tp)
    bad = ValueError(f"{where}: {name} must be {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise bad
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise bad
        return [coerce(v, item_tp, f"{name}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    raise bad


def parse_cli_value(raw: str, tp: Any) -> Any:
    """A command-line string read for a field of type `tp` (left as it is when it does not parse)."""
    if tp is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        return raw
    if tp is int:
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            try:
                return float(raw)  # "1e3" is fine for an int field if it is whole
            except ValueError:
                return raw
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            return raw
    # lists and dicts: YAML flow syntax, e.g. data.tasks=[add2,sort],
    # model.rope_scaling={type: yarn, factor: 4}
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _type_name(tp: Any) -> str:
    if tp in (int, float, bool, str):
        return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]
    return str(tp).replace("typing.", "")


# ---- files ------------------------------------------------------------------------------------------------
# YAML 1.1 (PyYAML's) reads `1e-08` and `3e-4` as strings (its floats need a dot); YAML 1.2, TOML and every
# user read them as numbers. This resolver, YAML 1.2's float pattern, makes them floats.
_YAML12_FLOAT = re.compile(
    r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?(?:[eE][-+]?\d+)?|\.\d[\d_]*(?:[eE][-+]?\d+)?)$"
    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
)


def yaml_load(text: str) -> Any:
    """yaml.safe_load with YAML 1.2's numbers (`1e-08` is a float)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))
    return yaml.load(text, Loader=Loader)


def read_config_file(path: Path) -> dict[str, Any]:
    """A TOML (.toml) or YAML (.yaml, .yml) file's top-level mapping; clear errors for anything else."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml_load(text) or {}
        else:
            raise ValueError(f"{path}: config files must end in .toml, .yaml or .yml")
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from exc
    except Exception as exc:  # yaml.YAMLError without importing yaml at module import
        if type(exc).__module__.startswith("yaml"):
            raise ValueError(f"{path}: not valid YAML ({exc})") from exc
        raise
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of keys to values")
    return data

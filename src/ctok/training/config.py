"""Run configuration: YAML files checked against a schema of dataclasses, with command-line overrides.

A schema is a dataclass whose fields are scalars or further dataclasses (the config's sections).
Every key in the file must be a field of the schema: a misspelt key is an error that names it and
lists the valid keys, never a silently ignored setting. Overrides use dotted keys, and their values
are read as YAML scalars::

    ctok train-sit --config tiny-sit optim.lr=3e-4 run.max_steps=500 model.preset=SiT-B/1

``--config`` takes a path to a YAML file or the name of a config packaged in ``ctok/configs``.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from ctok.atomic_files import atomic_write
from ctok.config_types import check_value

PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

T = TypeVar("T")


def packaged_config_names() -> list[str]:
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def resolve_config_path(source: str | Path) -> Path:
    """A path to an existing file, or the name of a packaged config (``tiny-sit``, ``sit-xl``)."""
    path = Path(source)
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    raise FileNotFoundError(
        f"config {str(source)!r} is neither a file nor a packaged config; packaged configs: {packaged_config_names()}"
    )


def apply_overrides(tree: dict, overrides: Sequence[str]) -> dict:
    """Set ``a.b.c=value`` entries in a nested dict; values are parsed as YAML scalars (``1e-4`` is a number)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value (dotted keys for nested sections)")
        *parents, leaf = key.split(".")
        node = tree
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parents[: i + 1])!r} is a value, not a section")
            node = child
        node[leaf] = yaml.safe_load(text) if text else None
    return tree


def load_config(schema: type[T], source: str | Path, overrides: Sequence[str] = ()) -> T:
    """Read a YAML config, apply ``key=value`` overrides and check the result against ``schema``."""
    path = resolve_config_path(source)
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"config {path} must hold a mapping of sections, got {type(tree).__name__}")
    return build_config(schema, apply_overrides(tree, overrides))


def build_config(schema: type[T], tree: dict, where: str = "") -> T:
    """Turn a nested dict into ``schema``; unknown keys, missing keys and wrong types raise ValueError."""
    if not isinstance(tree, dict):
        raise ValueError(f"config section {where or '<top>'!r} must be a mapping, got {tree!r}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for old, new in getattr(schema, "renamed_keys", {}).items():  # a schema's ClassVar: {old key: new key}
        if old in tree:
            raise ValueError(f"config key {_join(where, old)!r} is now called {_join(where, new)!r}: rename it")
    for old, now in getattr(schema, "replaced_keys", {}).items():  # {old key: what says it now, in words}
        if old in tree:
            raise ValueError(f"config key {_join(where, old)!r} is now {now}")
    unknown = sorted(set(tree) - set(fields))
    if unknown:
        names = ", ".join(repr(_join(where, k)) for k in unknown)
        raise ValueError(f"unknown config key {names}; "
                         f"valid keys{' of ' + repr(where) if where else ''}: {sorted(fields)}")
    hints = typing.get_type_hints(schema)
    values = {}
    for name, field in fields.items():
        key = _join(where, name)
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = build_config(kind, tree.get(name) or {}, key)
        elif name in tree:
            values[name] = check_value(key, tree[name], kind, text_numbers=True)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ValueError(f"config key {key!r} is required")
    return schema(**values)


def config_to_dict(config: Any) -> dict:
    """The resolved config as plain data (tuples become lists), ready for YAML, JSON and checkpoints."""
    return _plain(dataclasses.asdict(config))


def save_yaml(tree: dict, path: str | Path) -> None:
    """Write a resolved config (see :func:`config_to_dict`) as YAML, atomically."""
    with atomic_write(path, "w") as f:
        yaml.safe_dump(tree, f, sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def add_config_arguments(parser) -> None:
    """``--config``, ``--resume`` and ``key=value`` overrides: the arguments every training command takes."""
    parser.add_argument("--config", required=True,
                        help=f"a YAML file, or a packaged config name ({', '.join(packaged_config_names()) or 'none'})")
    parser.add_argument("--resume", metavar="CHECKPOINT",
                        help="continue from this checkpoint file, or 'latest': the run folder's newest one (what "
                             "run.resume=true, the default, does anyway; run.resume=false starts fresh)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides with dotted keys, e.g. optim.lr=3e-4 run.max_steps=1000")


def config_from_args(schema: type[T], args) -> T:
    """The config a training command was asked for: file, then overrides, then ``--resume``."""
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"run.resume={'true' if args.resume == 'latest' else args.resume}")
    return load_config(schema, args.config, overrides)

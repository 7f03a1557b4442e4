"""Typed stage configs: defaults < YAML file < command line, unknown keys rejected.

Every stage (shard, pretrain, finetune, ...) describes its options as one pydantic model that
subclasses `StageConfig`. Sections are nested models (`cfg.optim.lr`), addressed on the command
line with dots (`--optim.lr 3e-4`). The same model drives `--help`, file loading and validation,
so there is exactly one place where an option is declared and documented.

Precedence, highest first: command-line overrides, the YAML file, the field defaults.
"""

from __future__ import annotations

import argparse
import re
import types
from pathlib import Path
from typing import Any, Annotated, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError


from vitpipe.errors import UserError


class ConfigError(UserError):
    """A config value a user supplied is wrong; the message names the key and the fix."""


class StageConfig(BaseModel):
    """Base of every config: unknown keys are errors; defaults and assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True,
                              protected_namespaces=())


# ---------------------------------------------------------------------------------------------
# Byte sizes with units ("512MB", "1GiB", "4096")

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(value: Any) -> int:
    """'512MB' -> 512_000_000, '1GiB' -> 2**30, 4096 -> 4096. Raises ValueError naming the value."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size; use bytes with a unit, e.g. 512MB or 1GiB")
    if isinstance(value, (int, float)):
        size = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if not m or unit not in _SIZE_UNITS:
            raise ValueError(
                f"{value!r} is not a size; use bytes with a unit, e.g. 512MB, 1GB or 256MiB"
            )
        size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"{value!r}: a size must be > 0, e.g. 1GB")
    return size


ByteSize = Annotated[int, BeforeValidator(parse_size)]
"""A positive number of bytes; accepts '512MB', '1GiB', '1.5GB' or a plain integer."""


# ---------------------------------------------------------------------------------------------
# Loading and merging


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """Read a config file; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder, not a YAML file (a stage's data goes in an "
                          f"option, e.g. --data.shards {str(path)!r})")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def format_validation_error(cls: type[BaseModel], err: ValidationError) -> str:
    lines = [f"invalid {cls.__name__}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(_allowed_keys(cls, [str(p) for p in e["loc"][:-1]])))
            lines.append(f"  unknown key '{key}'; allowed here: {allowed}")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required; pass --{key.replace('_', '-')} VALUE or set '{key}' in the config file")
        elif not key:  # a check across fields: its message names them
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = e["msg"].removeprefix("Value error, ")
            if msg.startswith(f"{key}="):  # the validator's message names the key and value itself
                lines.append(f"  {msg}")
            else:
                lines.append(f"  {key}: {msg}{got_s}")
    return "\n".join(lines)


def _allowed_keys(cls: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        field = cls.model_fields.get(part)
        sub = _model_type(field.annotation) if field else None
        if sub is None:
            return []
        cls = sub
    return list(cls.model_fields)


def build_config(cls: type[StageConfig], file: str | Path | None = None,
                 overrides: dict[str, Any] | None = None) -> StageConfig:
    """Resolve a config: field defaults, then the YAML `file`, then dotted `overrides`."""
    data: dict = read_yaml(file) if file else {}
    top: dict = {}
    for key, value in (overrides or {}).items():
        _set_dotted(top, key, value)
    data = _deep_merge(data, top)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(cls, e)) from None


def save_config(cfg: BaseModel, path: str | Path) -> Path:
    """Write the resolved config as YAML (the record of what a run actually used)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# Command line: one option per leaf field, named by its dotted path


def _model_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            sub = _model_type(arg)
            if sub is not None:
                return sub
    return None


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _is_text(annotation: Any) -> bool:
    """Fields whose CLI value must stay the raw string (paths, names: '007' is not 7)."""
    if annotation in (str, Path):
        return True
    origin = get_origin(annotation)
    if origin is Annotated:
        return _is_text(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return bool(args) and all(_is_text(a) for a in args)
    return False


def _is_number_sequence(annotation: Any) -> bool:
    """tuple/list-of-numbers fields: several values on the command line (`--data.mean 0.485 0.456 0.406`).
    Lists of text stay one value (YAML or commas): `--slurm.extra-args` is followed by the command."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _is_number_sequence(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return any(_is_number_sequence(a) for a in get_args(annotation) if a is not type(None))
    if origin not in (tuple, list):
        return False
    items = [a for a in get_args(annotation) if a is not Ellipsis]
    unwrap = lambda a: get_args(a)[0] if get_origin(a) is Annotated else a  # noqa: E731
    return bool(items) and all(unwrap(a) in (int, float) for a in items)


class _Values(argparse.Action):
    """Collect one or more values: `0.5 0.5`, `0.5,0.5` or a YAML list `[0.5, 0.5]`."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) == 1 and isinstance(values[0], list):
            items = values[0]
        else:
            items = [part for v in values  # each value is YAML-parsed already; '0.5,0.5' stays text
                     for part in ([_yaml_value(x) for x in v.split(",")] if isinstance(v, str) else [v])]
        setattr(namespace, self.dest, items)


def _choices(annotation: Any) -> list | None:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return None


def _leaves(cls: type[BaseModel], prefix: str = ""):
    for name, field in cls.model_fields.items():
        sub = _model_type(field.annotation)
        if sub is not None:
            yield from _leaves(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


UNSET = _Unset()


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[BaseModel],
                         positional: tuple[str, ...] = (), unused: tuple[str, ...] = (),
                         from_model: tuple[str, ...] = ()) -> None:
    """Add `--config FILE` and one `--dotted.key VALUE` option per field of `cls`. Options starting
    with a prefix in `unused` are accepted (a config file shared by stages may set them) but left
    out of --help: this stage ignores them. Fields in `from_model` default to the model's value
    (the stage reads it from the model it loads), and their help says so."""
    for name in positional:
        field = cls.model_fields[name]
        parser.add_argument(name, nargs="?", default=UNSET, metavar=name.upper(),
                            help=f"{field.description or ''} (or set '{name}' in --config)")
    parser.add_argument("--config", "-c", metavar="FILE", default=None,
                        help="YAML file with any of the options below; the command line wins over the file")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for dotted, field in _leaves(cls):
        if dotted in positional:
            continue
        section = dotted.rsplit(".", 1)[0] if "." in dotted else ""
        group = groups.get(section)
        if group is None:
            group = groups[section] = parser.add_argument_group(
                f"{section} options" if section else "options")
        default = field.get_default(call_default_factory=True)
        default_s = (" [required]" if field.is_required() else "" if default is None else
                     f" [default: {' '.join(map(str, default))}]" if isinstance(default, (tuple, list)) and default
                     else f" [default: {default}]")
        if dotted in from_model:
            default_s = " [default: the model's]"
        help_s = (field.description or "").replace("%", "%%") + default_s.replace("%", "%%")
        if dotted.startswith(unused):
            help_s = argparse.SUPPRESS
        flag = "--" + dotted.replace("_", "-")
        flags = [flag] if "_" not in dotted else [flag, "--" + dotted]
        if _is_bool(field.annotation):
            group.add_argument(*flags, dest=dotted, default=UNSET,
                               action=argparse.BooleanOptionalAction, help=help_s)
        elif _is_number_sequence(field.annotation):
            group.add_argument(*flags, dest=dotted, default=UNSET, metavar="V", nargs="+", action=_Values,
                               help=help_s, type=_yaml_value)
        else:
            choices = _choices(field.annotation)
            metavar = "{" + ",".join(map(str, choices)) + "}" if choices else "VALUE"
            group.add_argument(*flags, dest=dotted, default=UNSET, metavar=metavar, help=help_s,
                               type=str if _is_text(field.annotation) else _yaml_value)


def _yaml_value(text: str) -> Any:
    """Parse a CLI value the way YAML would ('3' -> 3, '[1,2]' -> list); pydantic validates it."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def config_from_args(cls: type[StageConfig], args: argparse.Namespace) -> StageConfig:
    """Build the config from parsed arguments: defaults < --config file < explicit options."""
    known = {dotted for dotted, _ in _leaves(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in known and v is not UNSET}
    return build_config(cls, getattr(args, "config", None), overrides)

"""What every job's config shares: options declared once on the dataclass field, the command line
derived from them, JSON with secrets redacted, storage options, and the checks every job makes.

Each job's config lives with its job (``scan.config``, ``train.config``, ``report.config``,
``bench.config``, ``serve_config``). A field says everything about its option once, through
:func:`option`: default, help, flag, choices and how the flag's text becomes the field's value.
:func:`add_arguments` builds an ``argparse`` parser from a config class, :func:`from_args` builds
the config from the parsed namespace; nothing is copied by hand. Configs are validated in
``__post_init__``, before ``ray.init()``, so bad arguments fail in a second.

This module is base: it imports nothing of the package but :mod:`aidetect_batch.errors`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from aidetect_batch.errors import ConfigError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own bomb threshold: ~89 MP, about 9500x9500.
# Files above this are too_large rows, never read. 256 MiB is DEFAULT_MAX_PIXELS as uncompressed
# 8-bit RGB, the largest image the pixel guard admits in the plainest encoding; a decode task
# holds at most --decode-batch-size such files at once.
DEFAULT_MAX_FILE_MB = 256

_SECRET_KEY = re.compile(r"secret|token|password|key", re.IGNORECASE)
_OPTION = "aidetect_option"


@dataclasses.dataclass(frozen=True)
class Flag:
    """One of several flags that each set a field to a constant (``--gpu``/``--cpu``)."""

    flag: str
    value: Any
    help: str | None = None


@dataclasses.dataclass(frozen=True)
class Option:
    """How a config field appears on the command line.

    Attributes:
        help: The flag's help text (``%(default)s`` shows the default).
        flag: The flag; ``None``: ``--`` and the field name with dashes (``--no-NAME`` for a
            bool that defaults to True).
        aliases: Older flag names that still work (deprecated).
        positional: The field is a positional argument.
        nargs: ``argparse`` nargs (``"*"`` for a list of words).
        choices: The allowed values, or a function that returns them (loaded when first asked).
        parse: Turns the flag's text (or list of texts) into the field's value; a ``ValueError``
            becomes a :class:`ConfigError` naming the flag.
        show: Turns the field's default into the flag's default text; needed with ``parse``.
        const: Flags that each set the field to a constant, in one mutually exclusive group.
        append: The flag repeats (``--storage-option``); the field gets the list.
        metavar: The value's name in the help.
        missing: For a field without default: the error when the flag is absent (the flag is not
            required by argparse, so the message can say how to get one).
        env: An environment variable that gives the default.
        secret: The value is never written out (``to_json`` writes ``***``).
        internal: Why the field has no flag (set by another job, or fault injection for tests).
    """

    help: str | None = None
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    positional: bool = False
    nargs: str | None = None
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
    parse: Callable[[Any], Any] | None = None
    show: Callable[[Any], Any] | None = None
    const: tuple[Flag, ...] = ()
    append: bool = False
    metavar: str | None = None
    missing: str | None = None
    env: str | None = None
    secret: bool = False
    internal: str | None = None


def option(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **spec: Any) -> Any:
    """A dataclass field whose metadata carries its :class:`Option` (``spec``)."""
    return dataclasses.field(
        default=default, default_factory=factory, metadata={_OPTION: Option(**spec)}, repr=not spec.get("secret")
    )


def internal(default: Any, why: str) -> Any:
    """A field with no flag, and why."""
    return option(default, internal=why)


def options_of(field: dataclasses.Field) -> Option:
    """The field's :class:`Option` (an empty one when it declares none)."""
    return field.metadata.get(_OPTION, Option())


def flag_of(field: dataclasses.Field) -> str:
    """The field's main flag (``--batch-size``, ``--no-c2pa``) or, for a positional, its name."""
    spec = options_of(field)
    if spec.positional:
        return field.name
    if spec.flag:
        return spec.flag
    if spec.const:
        return spec.const[0].flag
    negated = field.default is True
    return ("--no-" if negated else "--") + field.name.replace("_", "-")


def storage_options_field() -> Any:
    """The repeatable ``--storage-option key=value`` every job that touches remote storage takes."""
    return option(
        factory=dict,
        flag="--storage-option",
        append=True,
        metavar="KEY=VALUE",
        parse=parse_storage_options,
        show=lambda options: [],
        help="fsspec/s3fs option, repeatable (e.g. endpoint_url=http://minio:9000, anon=true)",
    )


class JsonConfig:
    """``to_json`` for every config: a JSON-ready dict, secrets and secret-looking storage options redacted."""

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            if options_of(field).secret:
                data[field.name] = "***" if data[field.name] else None
            elif field.name == "storage_options":
                data[field.name] = redact(data[field.name])
        return {**data, **self.json_extra()}

    def json_extra(self) -> dict[str, Any]:
        """Resolved values written next to the fields; none by default."""
        return {}


# ---- the command line, derived from the fields ------------------------------------------------------------


class _LazyChoices(Sequence):
    """Choices loaded when argparse first looks at them, so a heavy table loads only for its command."""

    def __init__(self, load: Callable[[], Sequence[Any]]) -> None:
        self._load = load

    def __getitem__(self, index: Any) -> Any:
        return tuple(self._load())[index]

    def __len__(self) -> int:
        return len(tuple(self._load()))

    def __iter__(self) -> Iterator[Any]:
        return iter(tuple(self._load()))

    def __contains__(self, value: object) -> bool:
        return value in tuple(self._load())


def _value_type(cls: type, field: dataclasses.Field) -> Any:
    """The field's scalar type from its annotation: ``int | None`` → ``int``."""
    hint = typing.get_type_hints(cls)[field.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint if hint in (int, float, str) else None


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def cli_default(field: dataclasses.Field) -> Any:
    """The flag's default: the field's default as the flag would spell it (``None`` when it has none)."""
    spec = options_of(field)
    default = _default(field)
    if default is dataclasses.MISSING:
        return None
    if spec.env and os.environ.get(spec.env):
        return os.environ[spec.env]
    return spec.show(default) if spec.show and default is not None else default


def _add_field(parser: argparse.ArgumentParser, cls: type, field: dataclasses.Field) -> None:
    spec = options_of(field)
    default = cli_default(field)
    common: dict[str, Any] = {"help": spec.help, "default": default}
    if spec.const:
        group = parser.add_mutually_exclusive_group()
        for flag in spec.const:
            group.add_argument(
                flag.flag, dest=field.name, action="store_const", const=flag.value, default=default, help=flag.help
            )
        return
    if spec.positional:
        parser.add_argument(field.name, nargs=spec.nargs, help=spec.help)
        return
    flags = (flag_of(field), *spec.aliases)
    if isinstance(_default(field), bool) and not spec.parse:
        action = "store_false" if field.default else "store_true"
        parser.add_argument(*flags, dest=field.name, action=action, help=spec.help)
        return
    choices = _LazyChoices(spec.choices) if callable(spec.choices) else spec.choices
    kind = None if spec.parse else _value_type(cls, field)
    required = _default(field) is dataclasses.MISSING and not spec.missing
    extra = {"action": "append"} if spec.append else {"nargs": spec.nargs} if spec.nargs else {}
    # A metavar keeps argparse from listing lazy choices when it builds the parser: they load at --help or parse.
    named = choices is None or isinstance(choices, _LazyChoices)
    metavar = spec.metavar or (flags[0].lstrip("-").replace("-", "_").upper() if named else None)
    parser.add_argument(
        *flags, dest=field.name, type=kind, choices=choices, metavar=metavar, required=required, **common, **extra
    )


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that have a flag, nested option records (:func:`nested`) expanded."""
    found = []
    for field in dataclasses.fields(cls):
        record = _nested_type(cls, field)
        if record is not None:
            found += cli_fields(record)
        elif not options_of(field).internal:
            found.append(field)
    return found


def _nested_type(cls: type, field: dataclasses.Field) -> type | None:
    hint = typing.get_type_hints(cls)[field.name]
    return hint if dataclasses.is_dataclass(hint) else None


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add one argument per field of ``cls`` (and of its nested option records); returns ``parser``."""
    for field in dataclasses.fields(cls):
        record = _nested_type(cls, field)
        if record is not None:
            add_arguments(parser, record)
        elif not options_of(field).internal:
            _add_field(parser, cls, field)
    return parser


def _value(field: dataclasses.Field, namespace: argparse.Namespace) -> Any:
    spec = options_of(field)
    raw = getattr(namespace, field.name)
    if raw is None and spec.missing:
        raise ConfigError(spec.missing)
    if spec.parse is None or raw is None:
        return tuple(raw) if isinstance(raw, list) else raw
    try:
        return spec.parse(raw)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{flag_of(field)}: {exc}") from None


def from_args(cls: type, namespace: argparse.Namespace) -> Any:
    """Build and validate a ``cls`` from parsed arguments; raises :class:`ConfigError`."""
    values = {}
    for field in dataclasses.fields(cls):
        record = _nested_type(cls, field)
        if record is not None:
            values[field.name] = from_args(record, namespace)
        elif not options_of(field).internal:
            values[field.name] = _value(field, namespace)
    return cls(**values)


def comma_list(kind: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    """A ``parse`` for ``a,b,c`` flags: each item through ``kind``, empty items dropped."""

    def parse(text: str) -> tuple[Any, ...]:
        return tuple(kind(item.strip()) for item in text.split(",") if item.strip())

    return parse


def show_comma_list(values: Sequence[Any]) -> str:
    """The ``show`` that goes with :func:`comma_list`."""
    return ",".join(str(v) for v in values)


# ---- shared parsing and checks ----------------------------------------------------------------------------


def redact(options: dict[str, Any]) -> dict[str, Any]:
    """Replace values whose key looks like a credential, recursively."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            out[key] = redact(value)
        elif _SECRET_KEY.search(key):
            out[key] = "***"
        else:
            out[key] = value
    return out


def parse_actors(text: str) -> tuple[int, int]:
    """Parse ``--actors``: ``N`` or ``MIN,MAX``."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError as exc:
        raise ConfigError(f"--actors takes N or MIN,MAX, not {text!r}") from exc
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise ConfigError(f"--actors takes N or MIN,MAX, not {text!r}")


def parse_storage_options(pairs: list[str]) -> dict[str, Any]:
    """Parse repeated ``--storage-option key=value`` into fsspec options.

    ``endpoint_url`` and ``region_name`` go where s3fs expects them
    (``client_kwargs``), ``connect_timeout`` and ``read_timeout`` (seconds) into botocore's
    ``config_kwargs``; ``true``/``false`` and numbers are converted.
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--storage-option takes key=value, not {pair!r}")
        key, raw = pair.split("=", 1)
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            try:
                value = float(raw) if key.endswith("_timeout") else int(raw)
            except ValueError:
                pass
        if key in ("endpoint_url", "region_name"):
            options.setdefault("client_kwargs", {})[key] = value
        elif key in ("connect_timeout", "read_timeout"):
            options.setdefault("config_kwargs", {})[key] = value
        else:
            options[key] = value
    return options


def check_at_least(config: Any, names: Sequence[str], low: float = 1) -> None:
    """Each named field (``None`` passes) is at least ``low``; raises :class:`ConfigError` naming its flag."""
    by_name = {f.name: f for f in dataclasses.fields(config)}
    for name in names:
        value = getattr(config, name)
        if value is not None and value < low:
            flag = flag_of(by_name[name]) if name in by_name else "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} must be at least {low}")


def check_max_file_mb(value: float) -> None:
    """``--max-file-mb`` must be a positive size; raises :class:`ConfigError`."""
    if not value > 0:
        raise ConfigError(f"--max-file-mb must be above 0, not {value}")


def check_fraction(name: str, value: float | None, *, closed: bool = True) -> None:
    """``value`` lies in [0, 1] (or [0, 1) when not ``closed``); raises :class:`ConfigError` naming ``name``."""
    if value is None:
        return
    inside = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    if not inside:
        raise ConfigError(f"{name} must be in [0, 1{']' if closed else ')'}, not {value}")

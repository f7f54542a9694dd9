"""Reading and writing a run folder's files safely.

A run folder may come from anyone: :func:`read_json_object`, :func:`read_yaml_mapping`,
:func:`read_metrics` and :func:`read_safetensors` read its files within bounds
(size, nesting, number of values, no links, no special files) and turn every
problem into a one-line :class:`RunFileError`. :func:`parse_yaml_mapping` is the
one YAML reader of the project: a run's ``config.yaml`` and, with ``flat=True``,
a training config file. :func:`write_atomic` writes a file so that a crash never
leaves a half-written one behind a valid name.

PyYAML and safetensors are imported inside the functions that need them: they
come with the pipeline (``pip install .[pipeline]``), and ``import repro``
needs only torch and NumPy.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, BinaryIO

from repro.report import CommandError, short

# Bounds on a run folder's files, which may come from anyone. What train.py writes stays far
# below them; past them, reading or comparing a file would exhaust memory, time or the stack.
MAX_TEXT_BYTES = 16 * 1024 * 1024  # manifest.json, metrics.jsonl
MAX_YAML_BYTES = 1024 * 1024  # config.yaml, a few dozen keys
MAX_NESTING = 32  # levels of objects and lists in one document
MAX_VALUES = 100_000  # values in one document, a YAML alias counted each time it is used
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # safetensors' own limit on its JSON header

# The only spellings of a number in a flat YAML file (and on train.py's command line). YAML 1.1
# reads 010 as 8, 0x10 as 16 and 1:30 as 90: a user who typed them meant none of these.
DECIMAL_INT = re.compile(r"[-+]?[0-9]+")
DECIMAL_FLOAT = re.compile(r"[-+]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|inf|infinity|nan)", re.IGNORECASE)


class RunFileError(CommandError):
    """A file that cannot be read as asked (missing, a link, not UTF-8, malformed, past a bound): one line."""


FIRST_LINE_CHARACTERS = 200  # an error message quoted from a file's parser: its reader's line stays short


def first_line(error: BaseException) -> str:
    """An error's message cut to its first line and 200 characters, or its type's name:
    reports of a bad file stay one line long, whatever the file holds."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    line = lines[0]
    return line if len(line) <= FIRST_LINE_CHARACTERS else line[: FIRST_LINE_CHARACTERS - 3] + "..."


def open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading, refusing anything but a regular file.

    Links are not followed: train.py writes none, and one can point anywhere,
    ``/dev/zero`` included, which would never end. Opening does not block,
    which a FIFO would until something wrote to it.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        raise RunFileError(f"{path} not found (is the run finished?)") from None
    except OSError as error:
        if path.is_symlink():
            raise RunFileError(f"{path} is a symbolic link; a run folder's files are regular files") from None
        raise RunFileError(f"cannot read {path}: {error.strerror}") from None
    file = os.fdopen(descriptor, "rb")
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        file.close()
        raise RunFileError(f"{path} is not a regular file")
    return file


def read_text(path: Path, limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of ``path``, a regular file of at most ``limit`` bytes."""
    with open_regular(path) as file:
        size = os.fstat(file.fileno()).st_size
        if size > limit:
            raise RunFileError(f"{path} is {size} bytes, more than the {limit} a run folder's file may have")
        data = file.read(limit + 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RunFileError(f"{path} is not UTF-8 text (byte {error.start} is not)") from None


def check_shape(data: Any, where: str) -> None:
    """Refuse ``data`` nested more than ``MAX_NESTING`` deep or holding more than
    ``MAX_VALUES`` values: comparing or printing it would recurse past Python's
    limit, or, for a YAML alias bomb, run out of memory."""
    pending, values = [(data, 0)], 0
    while pending:
        value, depth = pending.pop()
        values += 1
        if depth > MAX_NESTING:
            raise RunFileError(f"{where} is nested more than {MAX_NESTING} levels deep")
        if values > MAX_VALUES:
            raise RunFileError(f"{where} holds more than {MAX_VALUES} values (YAML aliases counted at each use)")
        if isinstance(value, dict):
            pending += [(item, depth + 1) for item in value.values()]
        elif isinstance(value, list | tuple | set):
            pending += [(item, depth + 1) for item in value]


def parse_json(text: str, where: str) -> Any:
    """The JSON value of ``text``, within the ``MAX_*`` bounds; ``where`` names it in errors."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise RunFileError(f"{where} is nested too deeply to read") from None
    except ValueError as error:  # JSONDecodeError, or an integer of more digits than Python converts
        raise RunFileError(f"{where} is not valid JSON: {first_line(error)}") from None
    check_shape(data, where)
    return data


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, read within the bounds above."""
    data = parse_json(read_text(path), str(path))
    if not isinstance(data, dict):
        raise RunFileError(f"{path} must hold a JSON object")
    return data


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON Lines file, one per non-empty line."""
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            record = parse_json(line, f"{path} line {number}")
            if not isinstance(record, dict):
                raise RunFileError(f"{path} line {number} is not a JSON object")
            records.append(record)
    return records


class _RefusedError(Exception):
    """What the flat loader refuses, with the line: :func:`parse_yaml_mapping` adds the file's name."""


@functools.cache
def _flat_loader() -> type:
    """PyYAML's safe loader, narrowed to what a config is: one flat mapping of plain values.

    Anchors and aliases are refused (a few hundred bytes of them expand to
    gigabytes), and so are nested lists and mappings, duplicate keys, and
    numbers that are not plain decimals. Built on first use: PyYAML is imported then.
    """
    import yaml

    def line(mark: yaml.Mark) -> str:
        return f"line {mark.line + 1}"

    class FlatLoader(yaml.SafeLoader):
        def compose_node(self, parent: yaml.Node | None, index: yaml.Node | None) -> yaml.Node:
            event = self.peek_event()
            if event.anchor is not None:
                raise _RefusedError(f"{line(event.start_mark)}: anchors and aliases (&name, *name) are not allowed")
            # Refused here, before the composer recurses into them: nesting is never a config value.
            if parent is not None and isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                what = (
                    f"the value of {short(index.value)}" if isinstance(index, yaml.ScalarNode) else "each key and value"
                )
                raise _RefusedError(f"{line(event.start_mark)}: {what} must be one plain value, not a list or mapping")
            return super().compose_node(parent, index)

        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node)  # a scalar: compose_node refused all else
                if key in seen:
                    raise _RefusedError(f"{line(key_node.start_mark)}: duplicate key {short(key)}")
                seen.add(key)
            return super().construct_mapping(node, deep)

        def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
            text = self.construct_scalar(node)
            if not DECIMAL_INT.fullmatch(text):
                raise _RefusedError(f"{line(node.start_mark)}: {short(text)} is not a plain decimal integer")
            try:
                return int(text)
            except ValueError:  # Python converts at most 4300 digits
                raise _RefusedError(f"{line(node.start_mark)}: {short(text)} has too many digits") from None

        def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
            text = self.construct_scalar(node)
            if text.lstrip("+-").lower() in (".inf", ".nan"):
                return super().construct_yaml_float(node)
            if not DECIMAL_FLOAT.fullmatch(text):
                raise _RefusedError(f"{line(node.start_mark)}: {short(text)} is not a plain decimal number")
            return float(text)

    FlatLoader.add_constructor("tag:yaml.org,2002:int", FlatLoader.construct_yaml_int)
    FlatLoader.add_constructor("tag:yaml.org,2002:float", FlatLoader.construct_yaml_float)
    return FlatLoader


def parse_yaml_mapping(text: str, where: str, *, flat: bool = False) -> dict[str, Any]:
    """The mapping of the YAML document ``text`` (empty for an empty document); ``where`` names it in errors.

    PyYAML's safe loader, which builds no Python objects, within the ``MAX_*``
    bounds above. With ``flat=True`` (a training config: one flat mapping of
    plain values) anchors, aliases, nesting, duplicate keys and numbers that are
    not plain decimals are refused too, each with the line it is on.

    Raises:
        RunFileError: one line naming ``where`` and what is wrong.
    """
    import yaml

    try:
        data = yaml.load(
            text, Loader=_flat_loader() if flat else yaml.SafeLoader
        )  # both are safe loaders: they build no Python objects
    except _RefusedError as refusal:
        raise RunFileError(f"{where}, {refusal}") from None
    except RecursionError:
        raise RunFileError(f"{where} is nested too deeply to read") from None
    except (yaml.YAMLError, ValueError) as error:  # ValueError: an integer of more digits than Python converts
        raise RunFileError(f"{where} is not valid YAML: {first_line(error)}") from None
    if data is None:
        return {}
    check_shape(data, where)
    if not isinstance(data, dict):
        raise RunFileError(f"{where} must hold a mapping of keys to values")
    return data


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The mapping in the YAML file ``path``, a regular file of at most ``MAX_YAML_BYTES``."""
    return parse_yaml_mapping(read_text(path, MAX_YAML_BYTES), str(path))


def read_safetensors(path: Path) -> dict[str, Any]:
    """The tensors of a safetensors file, refusing a file that is not one.

    The file starts with the length of its JSON header, 8 bytes little-endian:
    a length past the end of the file, or past safetensors' own limit, is
    refused before anything more is read.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    with open_regular(path) as file:
        size = os.fstat(file.fileno()).st_size
        prefix = file.read(8)
        header_length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or header_length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise RunFileError(
                f"{path} is not a safetensors file: its header length ({header_length} bytes) "
                f"does not fit in its {size} bytes"
            )
        data = prefix + file.read()
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError, KeyError) as error:  # KeyError: a dtype torch lacks
        raise RunFileError(f"{path} is not a valid safetensors file: {first_line(error)}") from None


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    When: for every file of a run folder, so that a crash never leaves a
    half-written file behind a valid name. The file gets the permissions
    ``open`` would give it (0666 less the umask).
    """
    descriptor, temporary = _create_temporary(path)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _create_temporary(path: Path) -> tuple[int, Path]:
    """Create a new empty file ``.<name>.<random>`` next to ``path``; return its descriptor and path.

    Not ``tempfile.mkstemp``: it makes every file 0600, whatever the umask.
    """
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), temporary
        except FileExistsError:
            continue

"""The config reference (docs/config.md), generated from the pydantic models in tessera.config.

    python -m tessera.config_reference > docs/config.md      (`make docs`)

Each field's text is the comment on its line or the comment lines right above it in config.py,
so the reference says what the code says; a test checks docs/config.md is current.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tessera import config as C

_FIELD = re.compile(r"^\s{4}(\w+):")


def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line, else the comment block just above it."""
    out: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").rstrip())
            continue
        m = _FIELD.match(line)
        if m and not stripped.startswith(("def ", "@")):
            trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            out[m.group(1)] = " ".join(t for t in (" ".join(above), trailing) if t)
        above = []
    return out


def _type(annotation) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = re.sub(r"typing\.|tessera\.config\.|<class '|'>", "", text)
    text = re.sub(r"Annotated\[str, AfterValidator\(func=<function absolute at 0x[0-9a-f]+>\)\]", "URI", text)
    text = re.sub(r"^Optional\[(.*)\]$", r"\1 | None", text)
    return text.replace("NoneType", "None")


def _default(field) -> str:
    if field.default is PydanticUndefined:
        return "(section)" if field.default_factory else "required"
    try:
        return json.dumps(field.default)
    except TypeError:
        return str(field.default)


def _sections(model: type[BaseModel], prefix: str = "") -> typing.Iterator[tuple[str, type[BaseModel]]]:
    yield prefix, model
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _sections(ann, f"{prefix}{name}.")


def reference_markdown() -> str:
    lines = ["# Config reference", "",
             "Generated from `platform/tessera/config.py` by `make docs`; do not edit by hand. "
             "Every job takes",
             "`--config <preset or path>` and `--set dotted.path=value` (the value is read as YAML). Unknown",
             "fields and bad values are refused before any work starts, naming the field path.", ""]
    for prefix, model in _sections(C.TesseraConfig):
        if not prefix:
            continue
        doc = inspect.getdoc(model)
        lines += [f"## `{prefix.rstrip('.')}`", ""]
        if doc and model.__doc__ is not None and "__doc__" in vars(model):
            lines += [" ".join(doc.split()), ""]
        lines += ["| field | type | default | notes |", "|---|---|---|---|"]
        for path, kind, default, note in section_fields(model, prefix):
            note = note.replace("|", "\\|")
            lines.append(f"| `{path}` | `{kind}` | `{default}` | {note} |")
        lines.append("")
    return "\n".join(lines)


def section_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(path, type, default, note) of each field of a section, nested sections left out; also what
    `tessera <verb> --help` lists."""
    notes = {}
    for cls in reversed(model.__mro__):  # fields a base section declares keep their comments
        if isinstance(cls, type) and issubclass(cls, BaseModel) and cls not in (BaseModel, C.Section):
            notes.update(_comments(cls))
    return [(f"{prefix}{name}", _type(field.annotation), _default(field), notes.get(name, ""))
            for name, field in model.model_fields.items()
            if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))]


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())

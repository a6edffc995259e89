"""Docstring sections written from one definition.

:func:`with_entries` adds the entries of an ``Args:`` or ``Attributes:`` section to a
Google-style docstring, so that the settings every entry point takes
(:mod:`polca_lightning.settings`) and the fields of :class:`~polca_lightning.POLCAConfig`
are documented where they are defined and shown by ``help()`` wherever they are taken.
"""

from __future__ import annotations

import inspect
import re
import textwrap
from typing import Mapping

__all__ = ["documented", "with_entries"]

_INDENT = " " * 4
_WIDTH = 96
_ENTRY = re.compile(r"^([\w*][\w*, ]*):(\s|$)")  # "name: ..." or "a, b, c: ..." at the entry indent


def _section(lines: list[str], section: str) -> tuple[int, int] | None:
    """The line numbers of ``section``'s header and of the first line after its entries
    (the next line at the header's indent, or the end), in a cleaned docstring."""
    header = f"{section}:"
    for start, line in enumerate(lines):
        if line.rstrip() == header:
            end = start + 1
            while end < len(lines) and (not lines[end].strip() or lines[end].startswith(" ")):
                end += 1
            while end > start + 1 and not lines[end - 1].strip():  # the blank lines after the entries
                end -= 1
            return start, end
    return None


def documented(doc: str | None, section: str = "Args") -> set[str]:
    """The names the entries of a docstring's ``section`` document (``name: ...``, or
    ``a, b: ...`` for several), without leading asterisks."""
    lines = inspect.cleandoc(doc or "").splitlines()
    where = _section(lines, section)
    if where is None:
        return set()
    names = set()
    for line in lines[where[0] + 1 : where[1]]:
        if line.startswith(_INDENT) and not line.startswith(_INDENT + " "):
            match = _ENTRY.match(line[len(_INDENT):])
            if match:
                names.update(name.strip().lstrip("*") for name in match.group(1).split(","))
    return names


def _entry(name: str, text: str) -> list[str]:
    body = " ".join(text.split())
    # a ``literal`` is not broken across lines: its spaces are held apart while wrapping
    body = re.sub(r"``.+?``", lambda m: m.group(0).replace(" ", "\0"), body)
    lines = textwrap.wrap(f"{name}: {body}", _WIDTH, initial_indent=_INDENT, subsequent_indent=_INDENT * 2,
                          break_on_hyphens=False, break_long_words=False)
    return [line.replace("\0", " ") for line in lines]


def with_entries(doc: str | None, section: str, entries: Mapping[str, str]) -> str:
    """``doc``, cleaned, with ``entries`` (name to text) added at the end of its ``section``.

    A missing section is made before the first other section (a line such as
    ``Raises:``), or at the end.

    Args:
        doc: a Google-style docstring (``None``: an empty one).
        section: ``"Args"``, ``"Attributes"``, ...
        entries: the texts to add, in order; each is wrapped, its name first.

    Returns:
        The docstring.
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    added = [line for name, text in entries.items() for line in _entry(name, text)]
    where = _section(lines, section)
    if where is None:
        headers = [i for i, line in enumerate(lines) if re.fullmatch(r"[A-Z][A-Za-z ]*:", line.rstrip())]
        at = headers[0] if headers else len(lines)
        block = [f"{section}:", *added, ""]
        if at and lines[at - 1].strip():
            block.insert(0, "")
        return "\n".join(lines[:at] + block + lines[at:]).rstrip() + "\n"
    end = where[1]
    tail = lines[end:]
    if tail and tail[0].strip():
        tail = ["", *tail]
    return "\n".join(lines[:end] + added + tail).rstrip() + "\n"

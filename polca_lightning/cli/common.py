"""What the ``polca`` command's subcommands share: argument types, the store's location and
opening, and the one-line error (``CLIError``) that ends the command with exit code 2."""

from __future__ import annotations

import argparse
import json

from polca_lightning.store.schema import SNAPSHOT

__all__ = ["CLIError", "where_values", "steps_or", "restriction_argument", "storage_option", "storage_options_from",
           "resolve_location", "open_store_or_fail", "require_complete"]


class CLIError(Exception):
    """An error to report on one line with exit code 2."""


def where_values(text: str) -> tuple[str, tuple[int | float | str, ...]]:
    """argparse type: ``COORD=V,V`` -> ``(coord, (v, v))``; values as ints where they are."""
    coord, sep, values = text.partition("=")
    if not sep or not coord or not values or "" in values.split(","):
        raise argparse.ArgumentTypeError(f"expected COORD=V,V (e.g. place=1,2), got {text!r}")

    def value(v: str):
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                continue
        return v

    return coord, tuple(value(v) for v in values.split(","))


def steps_or(*rules: str):
    """argparse type: a number of steps, or one of the named ``rules``."""
    def parse(text: str):
        if text in rules:
            return text
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of steps or one of {', '.join(rules)}, "
                                             f"got {text!r}") from None
    parse.__name__ = "steps"
    return parse


def restriction_argument(text: str) -> tuple[str, tuple[str, tuple[int, ...]]]:
    """argparse type: ``LABEL:COORD=V,V`` -> ``(label, (coord, (v, v)))``."""
    try:
        label, rest = text.split(":", 1)
        coord, values = rest.split("=", 1)
        parsed = tuple(int(v) for v in values.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LABEL:COORD=V,V (e.g. carry:place=1,2), got {text!r}") from None
    if not label or not coord:
        raise argparse.ArgumentTypeError(f"expected LABEL:COORD=V,V (e.g. carry:place=1,2), got {text!r}")
    return label, (coord, parsed)


def storage_option(text: str) -> tuple[list[str], object]:
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. endpoint_url=http://localhost:9000), got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.split("."), parsed


def storage_options_from(pairs: list[tuple[list[str], object]] | None) -> dict | None:
    """``--storage-option`` pairs as a (nested) dict: ``client_kwargs.endpoint_url=URL`` ->
    ``{"client_kwargs": {"endpoint_url": URL}}``; None without any."""
    if not pairs:
        return None
    options: dict = {}
    for keys, value in pairs:
        node = options
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise CLIError(f"--storage-option: {'.'.join(keys)} nests under a key that has a value")
        node[keys[-1]] = value
    return options


def resolve_location(store: str, storage_options: dict | None):
    """STORE as a StoreLocation (a local path, or a URL with its storage options)."""
    from polca_lightning.store.location import resolve_store

    try:
        return resolve_store(store, storage_options, argument="STORE")
    except (TypeError, ValueError, ImportError) as error:
        raise CLIError(str(error)) from None


def open_store_or_fail(path: str):
    from polca_lightning.report.pipeline import open_analysed_store
    from polca_lightning.store import StoreError

    try:
        return open_analysed_store(path)
    except (OSError, StoreError) as error:  # FileNotFoundError, PermissionError (a URL's credentials)
        raise CLIError(str(error)) from None


def require_complete(ds, path: str, force: bool) -> None:
    if not ds.attrs.get("complete", False) and not force:
        raise CLIError(f"the store {str(path)!r} is not complete (still being written, or its run stopped early) "
                       f"with {ds.sizes.get(SNAPSHOT, 0)} committed snapshots; pass --force to use that part")

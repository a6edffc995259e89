"""Where a POLCA store lives: a local directory, or a URL that fsspec opens for zarr 3.

A store is a local path (``runs/polca.zarr``, a :class:`pathlib.Path`, or ``file://`` URL,
all written as a directory exactly as before URLs were accepted) or a URL of another
fsspec filesystem: ``s3://bucket/run.zarr`` (the ``s3fs`` package), ``gs://`` (``gcsfs``),
``az://``/``abfs://`` (``adlfs``), ``memory://`` (in this process only), ... Remote
stores take ``storage_options``, handed to the filesystem as
``xarray.open_zarr(url, storage_options=...)`` does: for S3, ``key``, ``secret``,
``endpoint_url`` (or ``client_kwargs={"endpoint_url": ...}``), ``anon``, ...; without
them the filesystem reads the environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``,
``~/.aws``...).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

# scheme -> the package that implements it, for the message when it is missing
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "abfss": "adlfs", "adl": "adlfs", "hf": "huggingface_hub", "sftp": "paramiko", "ssh": "paramiko",
             "http": "aiohttp", "https": "aiohttp"}
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")


@dataclass(frozen=True)
class StoreLocation:
    """A resolved store: ``target`` is a :class:`~pathlib.Path` (local) or a URL string."""

    target: Path | str
    storage_options: dict = field(default_factory=dict)

    @property
    def remote(self) -> bool:
        return isinstance(self.target, str)

    @property
    def name(self) -> str:
        """The last component: ``s3://bucket/runs/a.zarr`` -> ``a.zarr``."""
        return self.target.name if isinstance(self.target, Path) else self.target.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return str(self.target)

    def zarr_store(self, read_only: bool = False) -> Any:
        """What ``zarr.open_group`` takes: the path itself, or an ``FsspecStore`` with fresh listings."""
        if not self.remote:
            return self.target
        from zarr.storage import FsspecStore

        store = FsspecStore.from_url(self.target, storage_options=dict(self.storage_options), read_only=read_only)
        # fsspec reuses filesystem instances, listings cached included: another process
        # (the run being resumed, a writer still going) may have changed the store since
        _invalidate(store.fs, store.path)
        return store

    def filesystem(self) -> tuple[Any, str]:
        """``(filesystem, path inside it)`` of a remote store, with fresh listings."""
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.target, **self.storage_options)
        _invalidate(fs, path)
        return fs, path.rstrip("/")


def _invalidate(fs: Any, path: str) -> None:
    invalidate = getattr(fs, "invalidate_cache", None)
    if invalidate is not None:
        invalidate(path)
    inner = getattr(fs, "sync_fs", None)  # zarr wraps synchronous filesystems (memory://)
    if inner is not None and inner is not fs:
        _invalidate(inner, path)


def resolve_store(path: Any, storage_options: dict | None = None, *, argument: str = "store") -> StoreLocation:
    """Check `path` (and `storage_options`) and say where the store is.

    Args:
        path: a local path (``str``, :class:`os.PathLike`), a URL string, or a
            :class:`StoreLocation` (returned as it is).
        storage_options: options of the URL's filesystem (remote URLs only).
        argument: the argument name used in error messages.

    Raises:
        TypeError: `path` is not a path or URL, `storage_options` not a dict.
        ValueError: a URL scheme fsspec does not know, storage options for a local path,
            or a URL that ``pathlib.Path`` collapsed (``Path("s3://b/x")`` is ``s3:/b/x``).
        ImportError: the package that implements the URL's scheme is not installed
            (the message says which to install).
    """
    if isinstance(path, StoreLocation):
        if storage_options is not None and dict(storage_options) != path.storage_options:
            raise ValueError(f"storage_options: {path} was resolved with other storage options")
        return path
    if storage_options is not None and not isinstance(storage_options, dict):
        raise TypeError(f"storage_options: expected a dict of options for the store's filesystem, "
                        f"got {type(storage_options).__name__}")
    if not isinstance(path, (str, os.PathLike)) or isinstance(os.fspath(path), bytes):
        raise TypeError(f"{argument}: expected a path or a URL string, got {type(path).__name__}")
    text = os.fspath(path)
    if isinstance(path, str) and "://" in text:
        scheme = text.split("://", 1)[0]
        if not _SCHEME.fullmatch(scheme):
            raise ValueError(f"{argument}: {text!r} is not a URL of the form scheme://location "
                             "(chained fsspec URLs such as 'simplecache::s3://...' are not supported)")
        scheme = scheme.lower()
        if scheme in ("file", "local"):
            if storage_options:
                raise ValueError(f"storage_options: {text!r} is a local path; storage options are for remote "
                                 "URLs such as s3://")
            parts = urlsplit(text)
            if parts.netloc not in ("", "localhost"):
                raise ValueError(f"{argument}: {text!r} names the host {parts.netloc!r}; file:// URLs are local")
            return StoreLocation(Path(unquote(parts.path)))
        _check_scheme(scheme, text, argument)
        url = text.rstrip("/")
        if url.endswith("://"):
            raise ValueError(f"{argument}: {text!r} names no location inside the {scheme}:// filesystem")
        return StoreLocation(url, dict(storage_options or {}))
    if storage_options:
        raise ValueError(f"storage_options: {text!r} is a local path; storage options are for remote URLs "
                         "such as s3://bucket/run.zarr")
    first = Path(text).parts[0] if Path(text).parts else ""
    if first.endswith(":") and len(first) > 2 and _known_scheme(first[:-1].lower()):
        raise ValueError(f"{argument}: {text!r} looks like a URL that pathlib.Path collapsed "
                         f"('{first}//' became '{first}/'); pass the URL as a string")
    return StoreLocation(Path(path))


def _known_scheme(scheme: str) -> bool:
    from fsspec.registry import known_implementations, registry

    return scheme in known_implementations or scheme in registry


def _check_scheme(scheme: str, url: str, argument: str) -> None:
    import fsspec

    if not _known_scheme(scheme):
        raise ValueError(f"{argument}: {url!r} has the URL scheme {scheme!r}, which fsspec does not know; "
                         "use a local path or a URL such as s3://bucket/run.zarr, gs://..., az://..., memory://...")
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as error:
        package = _PACKAGES.get(scheme)
        hint = (f"pip install {package}" + (" (or pip install 'polca-lightning[s3]')" if package == "s3fs" else "")
                if package else str(error))
        raise ImportError(f"{argument}: {url!r} needs the filesystem package for {scheme}://, which is not "
                          f"installed: {hint}") from error

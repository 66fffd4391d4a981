"""Inbox file paths in the forms Spark names them: ``_metadata.file_path`` and a checkpoint's file
list hold URIs (``file:///a/b%20c``), the inbox watch and the checks plain paths."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse


def local_path(uri: str) -> str:
    """``file:///a/b%20c`` as ``/a/b c``; a plain path as it is."""
    return unquote(urlparse(uri).path) if "://" in uri or uri.startswith("file:") else uri


def file_name(path: str) -> str:
    """An inbox file's name from Spark's ``_metadata.file_path`` (a URI) or a plain path."""
    return Path(local_path(path)).name

"""Real English sentences for evaluating and calibrating text models, with nothing downloaded.

They come from the docstrings of a fixed list of Python standard-library modules (prose written by
people, present wherever Python is), split into sentences, filtered to plain prose, de-duplicated
and kept in a fixed order. Even-numbered sentences form the eval split, odd-numbered ones the
calibration split, so the two never share a sentence. The exact set can differ slightly between
Python versions; it is identical for a given interpreter.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re

MODULES = (
    "collections", "json", "argparse", "logging", "pathlib", "textwrap", "statistics", "decimal",
    "fractions", "datetime", "calendar", "difflib", "heapq", "bisect", "itertools", "functools",
    "contextlib", "subprocess", "socket", "sqlite3", "zipfile", "tarfile", "csv", "configparser",
    "unittest", "doctest", "inspect", "typing", "enum", "dataclasses", "threading", "queue",
    "shutil", "tempfile", "glob", "fnmatch", "re", "string", "struct", "codecs", "io", "os",
    "random", "email.message", "http.client", "urllib.parse", "asyncio", "pickle", "copy", "pprint",
)  # fmt: skip

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORDS = re.compile(r"[A-Za-z]+")


def _docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    docs = [inspect.getdoc(module) or ""]
    for name in sorted(vars(module)):
        obj = getattr(module, name)
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        docs.append(inspect.getdoc(obj) or "")
    return docs


def _is_prose(sentence: str) -> bool:
    letters = sum(len(w) for w in _WORDS.findall(sentence))
    tokens = sentence.split()
    return (
        6 <= len(tokens) <= 40
        and letters >= 0.7 * len(sentence.replace(" ", ""))
        and not any(mark in sentence for mark in (">>>", "<", "http", "::"))
    )


@functools.cache
def sentences() -> tuple[str, ...]:
    seen: set[str] = set()
    out: list[str] = []
    for module_name in MODULES:
        for doc in _docstrings(module_name):
            for paragraph in doc.split("\n\n"):
                for sentence in _SPLIT.split(" ".join(paragraph.split())):
                    sentence = sentence.strip()
                    if sentence not in seen and _is_prose(sentence):
                        seen.add(sentence)
                        out.append(sentence)
    return tuple(out)


def split(name: str, n: int) -> list[str]:
    """``n`` sentences of the ``eval`` or ``calibration`` split (cycled if more are asked for)."""
    offset = 0 if name == "eval" else 1
    pool = sentences()[offset::2]
    if not pool:
        raise RuntimeError("no sentences found in the standard library's docstrings")
    return [pool[i % len(pool)] for i in range(n)]

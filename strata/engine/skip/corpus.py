"""Default long-text corpus that exists offline: Python's own module documentation.

Each module's doc is rendered with pydoc's plain-text renderer, cleaned of what varies between
machines (file paths, object addresses), tokenized and concatenated in a fixed module order;
the stream is cut into texts of exactly `min_tokens` tokens. The calibration and held-out parts
use disjoint module lists, so held-out evaluation never sees calibration text. The rendering
depends on the Python version, which the corpus description records.
"""

from __future__ import annotations

import importlib
import pydoc
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

Part = Literal["calibration", "heldout"]

# Pure documentation modules whose rendering does not include the environment (no os/sys/time:
# their DATA sections print environ, paths or time zones).
CALIBRATION_MODULES = (
    "collections", "functools", "itertools", "argparse", "json", "re", "string", "textwrap",
    "datetime", "decimal", "fractions", "statistics", "random", "heapq", "bisect", "enum",
    "dataclasses", "pathlib", "shutil", "subprocess", "threading", "queue", "logging", "csv",
    "configparser", "difflib", "pprint", "copy", "abc", "contextlib", "typing", "inspect", "ast",
    "tokenize", "unittest", "doctest", "http.client", "urllib.parse", "email.message", "zipfile",
    "tarfile", "gzip", "hashlib", "hmac", "base64", "struct", "array", "sqlite3", "selectors",
)
HELDOUT_MODULES = (
    "calendar", "email.utils", "html.parser", "xml.dom.minidom", "xml.etree.ElementTree",
    "smtplib", "imaplib", "ftplib", "poplib", "mailbox", "plistlib", "pickle", "pickletools",
    "shelve", "codecs", "optparse", "getopt", "cmd", "shlex", "glob", "fnmatch", "filecmp",
    "fileinput", "linecache", "traceback", "warnings", "weakref", "types", "operator", "numbers",
    "math", "cmath", "colorsys", "wave", "zlib", "bz2", "lzma", "sched", "uuid", "ipaddress",
    "secrets", "graphlib", "reprlib", "keyword", "quopri", "binascii", "netrc", "zipapp",
)

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# Sections that name this machine's files or the docs URL of this exact Python build.
_SECTIONS = re.compile(r"^(FILE|MODULE REFERENCE)\n(?:    .*\n|\n(?=    ))*", re.MULTILINE)


def module_doc(name: str) -> str:
    """The cleaned plain-text pydoc page of one module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules warn on import
        module = importlib.import_module(name)
        text = pydoc.render_doc(module, renderer=pydoc.plaintext)
    return _SECTIONS.sub("", _ADDRESS.sub("", text))


def _module_docs(names: Iterable[str]) -> Iterator[str]:
    for name in names:
        try:
            yield module_doc(name)
        except ImportError:  # a build without e.g. sqlite3 or lzma: the texts shift, still valid
            continue


def _cut(docs: Iterable[str], encode: Callable[[str], list[int]], count: int, min_tokens: int,
         source: str) -> list[list[int]]:
    stream: list[int] = []
    texts: list[list[int]] = []
    for doc in docs:
        stream.extend(encode(doc + "\n\n"))
        while len(stream) >= min_tokens and len(texts) < count:
            texts.append(stream[:min_tokens])
            stream = stream[min_tokens:]
        if len(texts) == count:
            return texts
    raise ValueError(f"{source} holds only {len(texts)} texts of {min_tokens} tokens, {count} asked")


def python_docs_texts(part: Part, encode: Callable[[str], list[int]], count: int,
                      min_tokens: int) -> list[list[int]]:
    """`count` token lists of exactly `min_tokens` tokens from the calibration or held-out part."""
    names = CALIBRATION_MODULES if part == "calibration" else HELDOUT_MODULES
    return _cut(_module_docs(names), encode, count, min_tokens, f"the {part} part of the Python docs")


def file_texts(path: Path, encode: Callable[[str], list[int]], count: int, min_tokens: int) -> list[list[int]]:
    """`count` token lists of `min_tokens` tokens cut from a user-supplied UTF-8 text file."""
    return _cut([Path(path).read_text(encoding="utf-8")], encode, count, min_tokens, str(path))


def describe(part: Part) -> str:
    v = sys.version_info
    names = CALIBRATION_MODULES if part == "calibration" else HELDOUT_MODULES
    return f"pydoc plain text of {len(names)} stdlib modules ({part} list), Python {v.major}.{v.minor}"

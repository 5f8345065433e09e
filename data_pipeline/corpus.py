"""A real text corpus present on every machine: the running interpreter's standard library.

The embedded demo must train on real text without downloading anything. The standard
library ships English prose (`pydoc_data/topics.py`, the language reference's topics) and a
few MB of well-written Python, so the demo corpus is that prose first, then the library's
modules in sorted path order, cut at a byte budget. Tests, generated codec tables, caches and
installed third-party packages are left out; so is any file that is not valid UTF-8.
"""

from __future__ import annotations

import ast
import os
import pathlib
import sysconfig

PROSE_FILE = pathlib.PurePosixPath("pydoc_data/topics.py")
PROSE_TEXT = "pydoc_topics.txt"
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "encodings"})


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def read_text_document(path: str | os.PathLike) -> str:
    """The file's text, decoded as strict UTF-8 (line endings kept as they are)."""
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"corpus file not found: {path}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not valid UTF-8 at byte offset {err.start} ({err.reason}); "
            "corpus documents must be UTF-8 text"
        ) from None


def stdlib_corpus(out_dir: str | os.PathLike, max_bytes: int | None = None) -> list[pathlib.Path]:
    """The demo corpus as plain text files: the language reference's prose, written to
    `out_dir/pydoc_topics.txt`, then the modules of `stdlib_corpus_files(max_bytes)`."""
    files = stdlib_corpus_files(max_bytes)
    prose = pathlib.Path(out_dir) / PROSE_TEXT
    prose.parent.mkdir(parents=True, exist_ok=True)
    prose.write_text(_topics_prose(read_text_document(files[0]), files[0]), encoding="utf-8")
    return [prose] + files[1:]


def _topics_prose(source: str, path: pathlib.Path) -> str:
    """topics.py is one `topics = {name: text}` literal: the texts, in order, are the prose."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            return "\n\n".join(ast.literal_eval(node.value).values())
    raise ValueError(f"{path}: no `topics = {{...}}` mapping found; expected pydoc_data's topics file")


def stdlib_corpus_files(max_bytes: int | None = None) -> list[pathlib.Path]:
    """topics.py, then the stdlib's `.py` modules in sorted order, while the total stays <= max_bytes.

    The list stops at the first file that would exceed `max_bytes` (None: no limit), so the
    same budget always gives the same files on the same interpreter.
    """
    root = stdlib_root()
    candidates = [root / PROSE_FILE] + [root / rel for rel in _sorted_module_paths(root)]
    selected: list[pathlib.Path] = []
    total = 0
    for path in candidates:
        size = path.stat().st_size
        if max_bytes is not None and total + size > max_bytes:
            break
        if _is_utf8(path):
            selected.append(path)
            total += size
    if not selected:
        raise ValueError(
            f"max_bytes={max_bytes} is smaller than the first corpus file "
            f"({candidates[0]}, {candidates[0].stat().st_size} bytes)"
        )
    return selected


def _sorted_module_paths(root: pathlib.Path) -> list[pathlib.PurePosixPath]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        rel_dir = pathlib.PurePosixPath(pathlib.Path(dirpath).relative_to(root).as_posix())
        found.extend(rel_dir / name for name in filenames if name.endswith(".py"))
    return sorted(rel for rel in found if rel != PROSE_FILE)


def _is_utf8(path: pathlib.Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def split_heldout(files: list[pathlib.Path], fraction: float) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    """(training files, held-out files): every k-th file is held out, k = round(1 / fraction),
    so the held-out documents are spread over the corpus and never trained on."""
    k = max(2, round(1 / fraction))
    heldout = [f for i, f in enumerate(files) if i % k == k - 1]
    if not heldout:
        raise ValueError(f"{len(files)} corpus files are too few to hold out every {k}th; add "
                         f"files or raise data.heldout_fraction")
    return [f for i, f in enumerate(files) if i % k != k - 1], heldout

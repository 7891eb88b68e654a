"""A deterministic text corpus that every Python install carries: its own standard library.

Two domains, both read from the `.py` files under `sysconfig.get_paths()["stdlib"]`:
- `pycode`: the source files themselves, one document per file;
- `pydoc`: documentation text: the module/class/function docstrings of each file (extracted with `ast`, each under
  a `name(signature)` header), plus the rendered reference topics of `pydoc_data/topics.py` (the text of the
  Python docs that `help()` shows), one document per topic. `topics.py` is documentation, not code, so it is not
  a `pycode` document.

Skipped: test directories (`test`, `tests`, `idle_test`), `site-packages`, `__pycache__`, and `encodings/` (codec
tables, mostly escaped byte maps). The file listing is sorted; documents are then taken in the order of a hash of
their id, so that a `max_chars` prefix is a spread sample of the library rather than its first modules.

Splits: a document id is hashed into 100 buckets; buckets below `EVAL_PERCENT` are the held-out `eval` split, the
rest is `train`. The docstrings of a file share the file's id, so code and docs of one module land in one split.
`calib` is a capped sample of `train` (what the built-in model was trained on), `eval` is never trained on.
The corpus depends on the Python version (each release ships its own stdlib) and is deterministic for one.
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import sysconfig
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

DOMAINS = ("pycode", "pydoc")
EVAL_PERCENT = 10
SPLITS = ("train", "calib", "eval")
# Characters per domain written by `write_corpus_jsonl` (calib is drawn from train; eval is held out).
SPLIT_MAX_CHARS = {"calib": 300_000, "eval": 300_000}

_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"})
_TOPICS_FILE = "pydoc_data/topics.py"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Sorted paths (relative to the stdlib root, '/'-separated) of the library's `.py` files."""
    root = root or stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        found.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(".py"))
    return sorted(found)


def _hash_key(doc_id: str) -> str:
    return hashlib.sha256(doc_id.encode("utf-8")).hexdigest()


def split_of(doc_id: str) -> str:
    """`eval` or `train`, fixed by the document id alone."""
    return "eval" if int(_hash_key(doc_id)[:8], 16) % 100 < EVAL_PERCENT else "train"


def _read(root: Path, rel: str) -> str | None:
    try:
        return (root / rel).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _docstrings(source: str) -> str:
    """The docstrings of one module, each under a `name(signature)` header, in source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    parts = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        parts.append(module_doc)

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    parts.append(f"{name}({ast.unparse(child.args)})\n{doc}")
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    parts.append(f"class {name}\n{doc}")
                visit(child, f"{name}.")

    visit(tree, "")
    return "\n\n".join(parts)


def _topics(source: str) -> list[tuple[str, str]]:
    """(topic, text) pairs of `pydoc_data/topics.py`: one dict literal of rendered documentation."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            pairs = []
            for k, v in zip(node.value.keys, node.value.values):
                if isinstance(k, ast.Constant) and isinstance(v, ast.Constant) and isinstance(v.value, str):
                    pairs.append((str(k.value), v.value))
            return pairs
    return []


def _iter_documents(root: Path, domains: tuple[str, ...]) -> Iterator[tuple[str, str, Callable[[], str | None]]]:
    """(domain, doc_id, load) in hash order of doc_id; `load()` reads and parses the text only when called."""
    entries: list[tuple[str, str, str, Callable[[], str | None]]] = []  # (hash key, domain, doc_id, load)
    for rel in stdlib_files(root):
        if rel == _TOPICS_FILE:
            continue
        if "pycode" in domains:
            entries.append((_hash_key(rel), "pycode", rel, partial(_read, root, rel)))
        if "pydoc" in domains:
            entries.append((_hash_key(rel), "pydoc", rel, partial(_docstrings_of, root, rel)))
    if "pydoc" in domains:
        for topic, text in _topics(_read(root, _TOPICS_FILE) or ""):
            doc_id = f"{_TOPICS_FILE}#{topic}"
            entries.append((_hash_key(doc_id), "pydoc", doc_id, partial(str, text)))
    entries.sort(key=lambda e: e[:3])
    for _, domain, doc_id, load in entries:
        yield domain, doc_id, load


def _docstrings_of(root: Path, rel: str) -> str | None:
    source = _read(root, rel)
    return None if source is None else _docstrings(source)


def stdlib_documents(
    max_chars: int | None = None,
    split: str | None = None,
    domains: tuple[str, ...] = DOMAINS,
) -> list[dict]:
    """Documents `{"domain", "doc", "text"}` of the running Python's standard library.

    max_chars: at most this many characters per domain (the last document is cut to fit); None for all.
    split: None for every document, or "train" / "calib" (both: the training files) / "eval" (held-out files).
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    unknown = set(domains) - set(DOMAINS)
    if unknown:
        raise ValueError(f"unknown domains {sorted(unknown)}; allowed: {DOMAINS}")
    want = {"calib": "train"}.get(split, split)
    used = dict.fromkeys(domains, 0)
    docs = []
    for domain, doc_id, load in _iter_documents(stdlib_root(), domains):
        if want is not None and split_of(doc_id) != want:
            continue
        room = None if max_chars is None else max_chars - used[domain]
        if room is not None and room <= 0:
            if all(used[d] >= max_chars for d in domains):
                break
            continue
        text = load()
        if not text or not text.strip():
            continue
        text = text if room is None else text[:room]
        used[domain] += len(text)
        docs.append({"domain": domain, "doc": doc_id, "text": text})
    return docs


def corpus_digest(docs: list[dict]) -> str:
    """A sha256 over the documents, in order: equal digests mean equal corpora."""
    h = hashlib.sha256()
    for d in docs:
        for field in (d["domain"], d["doc"], d["text"]):
            h.update(field.encode("utf-8"))
            h.update(b"\0")
    return h.hexdigest()


def write_corpus_jsonl(path: str | os.PathLike, split: str = "calib", max_chars: int | None = None) -> Path:
    """Write the `calib` or `eval` split as gzip JSON lines `{"domain", "doc", "text"}`; returns the path.

    max_chars per domain defaults to `SPLIT_MAX_CHARS[split]`. The gzip header carries no time stamp, so the
    file's bytes are a function of the Python version alone.
    """
    if split not in SPLIT_MAX_CHARS:
        raise ValueError(f"split must be one of {tuple(SPLIT_MAX_CHARS)}, got {split!r}")
    docs = stdlib_documents(max_chars=max_chars or SPLIT_MAX_CHARS[split], split=split)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        for d in docs:
            gz.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


def read_corpus_jsonl(path: str | os.PathLike) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

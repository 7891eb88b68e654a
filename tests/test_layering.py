"""The runtime never imports the compression side; stages never import each other (checked with `ast`)."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "moecompress"
COMPRESSION = {"calibrate", "sensitivity", "allocate", "quantize", "export", "shard", "pipeline", "builtin",
               "evaluate", "recipe", "cli"}
STAGES = {"calibrate", "sensitivity", "allocate", "quantize", "export", "shard"}
# Algorithms other stages may use: the quantizers (sensitivity must measure the quantizer actually used).
SHARED_ALGORITHMS = {"moecompress.quantize.rtn", "moecompress.quantize.gptq"}


def _imports(path: Path) -> set[str]:
    """Top-level moecompress subpackages a file imports (at any depth in the file), shared algorithms excepted."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if any(name == m or name.startswith(m + ".") for m in SHARED_ALGORITHMS):
                continue
            parts = name.split(".")
            if parts[0] == "moecompress" and len(parts) > 1:
                out.add(parts[1])
    return out


def _files(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py")) if (PKG / sub).is_dir() else [PKG / f"{sub}.py"]


def test_runtime_imports_only_format_and_data_types():
    for f in _files("runtime") + _files("format"):
        bad = _imports(f) & COMPRESSION
        assert not bad, f"{f.relative_to(PKG)} imports {sorted(bad)}"


def test_package_import_pulls_no_compression_code():
    bad = _imports(PKG / "__init__.py") & COMPRESSION
    assert not bad


def test_stages_share_only_data_types():
    for stage in STAGES:
        for f in _files(stage):
            bad = _imports(f) & (STAGES - {stage})
            assert not bad, f"{f.relative_to(PKG)} imports stage(s) {sorted(bad)}"


def test_data_types_import_no_stage():
    for sub in ("artifacts", "arch"):
        for f in _files(sub):
            bad = _imports(f) & COMPRESSION
            assert not bad, f"{f.relative_to(PKG)} imports {sorted(bad)}"

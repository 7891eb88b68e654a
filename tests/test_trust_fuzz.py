"""Property-based corruption of everything we read (issue 15): config.json, the manifest, safetensors headers,
placement.json and recipes. Every case either loads a model equal to the original or raises MoecompressError --
no other exception, no hang (hypothesis deadline), no large allocation (peak RSS bound).

Mutations are single edits (replace, delete or add one JSON value; flip header bytes), written either as they are
(the manifest's sha256 must catch them) or with the manifest (and placement hashes) rewritten to match, so the
structural checks alone must catch every edit that changes the model.
"""
from __future__ import annotations

import json
import resource
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import _build
from helpers import quantize_tiny
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import moecompress
from moecompress.errors import MoecompressError
from moecompress.export.checkpoint import export_checkpoint
from moecompress.format.files import MANIFEST, sha256_file, write_manifest
from moecompress.recipe import recipe_from_dict

IDS = torch.tensor([[5, 17, 99, 3, 64, 23, 11, 7]])
FUZZ = settings(max_examples=10, deadline=20_000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
RSS_BOUND_KB = 2 << 20  # peak resident memory may grow by at most 2 GiB over the whole module

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2, 3, 4, 5, 7, 8,
                   16, 32, 63, 64, 10**8, -1]), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=12), st.sampled_from(["../../etc/passwd", "/etc/passwd", "/dev/zero", "2", "16"]),
                   st.lists(st.integers(-2, 12), max_size=5), st.dictionaries(st.text(max_size=4), st.integers(),
                                                                              max_size=2))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    model = _build("qwen3_moe")
    layout, plan, quantized = quantize_tiny(model)
    root = tmp_path_factory.mktemp("fuzz")
    export_checkpoint(model, layout, plan, quantized, root / "ck", dtype=torch.float32, max_shard_size=200_000)
    ref = _logits(moecompress.from_pretrained(root / "ck", dtype=torch.float32))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield root / "ck", ref
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < RSS_BOUND_KB


def _paths(node, prefix=()):
    """Every (path to a value) of a JSON document, containers included."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@st.composite
def json_edit(draw, doc, under=()):
    """One edit of `doc` below path `under`: replace a value, delete a key / element, or add a key."""
    paths = [p for p in _paths(doc) if p[:len(under)] == under and len(p) > len(under)]
    path = draw(st.sampled_from(paths))
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    key = draw(st.sampled_from(["shiny", "2", "16", "num_experts", "gate_up", "down", "linears"]))
    return path, action, key, draw(VALUES)


def _apply(doc, edit):
    path, action, key, value = edit
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    if action == "replace":
        parent[path[-1]] = value
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent[path[-1]], dict):
        parent[path[-1]][key] = value
    else:
        parent[path[-1]] = [parent[path[-1]], value]
    return doc


def _copy(src: Path) -> Path:
    dst = Path(tempfile.mkdtemp(prefix="fuzz-")) / src.name
    shutil.copytree(src, dst)
    return dst


def _equal_or_error(load, ref) -> str:
    """Load; a model that loads must compute exactly the original logits."""
    try:
        model = load()
    except MoecompressError as exc:
        event(f"refused: {str(exc).split(': ')[-1][:40]}")
        return "refused"
    assert torch.equal(_logits(model), ref), "a corrupted input loaded as a different model"
    event("loaded, equal")
    return "equal"


def _reseal(ck: Path) -> None:
    extra = {k: v for k, v in json.loads((ck / MANIFEST).read_text()).items() if k != "files"}
    write_manifest(ck, extra)


@FUZZ
@given(data=st.data(), reseal=st.booleans(), loader=st.sampled_from(["moecompress", "transformers"]))
def test_fuzz_config_json(original, data, reseal, loader):
    from transformers import AutoModelForCausalLM

    ck_src, ref = original
    doc = json.loads((ck_src / "config.json").read_text())
    # resealed edits stay inside quantization_config: an edit of the model's own config is a different model
    edit = data.draw(json_edit(doc, ("quantization_config",) if reseal else ()))
    ck = _copy(ck_src)
    try:
        (ck / "config.json").write_text(json.dumps(_apply(doc, edit)))
        if reseal:
            _reseal(ck)
        load = (lambda: moecompress.from_pretrained(ck, dtype=torch.float32)) if loader == "moecompress" else \
            (lambda: AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32))
        _equal_or_error(load, ref)
    finally:
        shutil.rmtree(ck.parent)


@FUZZ
@given(data=st.data(), raw=st.binary(max_size=64), garbage=st.booleans())
def test_fuzz_manifest(original, data, raw, garbage):
    ck_src, ref = original
    ck = _copy(ck_src)
    try:
        if garbage:
            (ck / MANIFEST).write_bytes(raw)
        else:
            doc = json.loads((ck / MANIFEST).read_text())
            (ck / MANIFEST).write_text(json.dumps(_apply(doc, data.draw(json_edit(doc)))))
        _equal_or_error(lambda: moecompress.from_pretrained(ck, dtype=torch.float32), ref)
    finally:
        shutil.rmtree(ck.parent)


@FUZZ
@given(data=st.data(), reseal=st.booleans(), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
                                                           max_size=3))
def test_fuzz_safetensors_header(original, data, reseal, flips):
    ck_src, ref = original
    ck = _copy(ck_src)
    try:
        shard = data.draw(st.sampled_from(sorted(ck.glob("model-*.safetensors"))))
        raw = shard.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
        if flips:  # raw byte flips anywhere in the header (its length field included)
            head = bytearray(raw[:8 + n])
            for pos, bit in flips:
                head[pos % len(head)] ^= bit
            shard.write_bytes(bytes(head) + body)
        else:
            text = json.dumps(_apply(header, data.draw(json_edit(header)))).encode()
            shard.write_bytes(len(text).to_bytes(8, "little") + text + body)
        if reseal:
            _reseal(ck)
        _equal_or_error(lambda: moecompress.from_pretrained(ck, dtype=torch.float32), ref)
    finally:
        shutil.rmtree(ck.parent)


@pytest.fixture(scope="module")
def bundles(original):
    from moecompress.artifacts.placement import Placement
    from moecompress.runtime.loading.bundles import load_bundles
    from moecompress.shard.bundles import write_bundles

    ck, _ = original
    spec = json.loads((ck / "config.json").read_text())["quantization_config"]["experts"]
    layers, experts = len(spec), next(iter(spec.values()))["num_experts"]
    placement = Placement(memory_bytes=(10**9, 10**9), assignment=tuple(tuple((e % 2,) for e in range(experts))
                                                                         for _ in range(layers)),
                          expert_bytes=tuple((0,) * experts for _ in range(layers)), dense_bytes=0, dense_servers=(0, 1))
    out = ck.parent / "bundles"
    write_bundles(ck, placement, out)
    return out, _logits(load_bundles(out, dtype=torch.float32))


@settings(FUZZ, max_examples=6)
@given(data=st.data(), reseal=st.booleans())
def test_fuzz_placement(bundles, data, reseal):
    from moecompress.runtime.loading.bundles import load_bundles

    src, ref = bundles
    out = _copy(src)
    try:
        doc = json.loads((out / "placement.json").read_text())
        (out / "placement.json").write_text(json.dumps(_apply(doc, data.draw(json_edit(doc)))))
        if reseal:  # bundle.json pins placement.json: rewrite the pin and the bundles' manifests to match
            digest = sha256_file(out / "placement.json")
            for bundle in out.glob("server-*"):
                desc = json.loads((bundle / "bundle.json").read_text())
                (bundle / "bundle.json").write_text(json.dumps({**desc, "placement_sha256": digest}))
                _reseal(bundle)
        _equal_or_error(lambda: load_bundles(out, dtype=torch.float32), ref)
    finally:
        shutil.rmtree(out.parent)


RECIPE = {"model": "m", "output": "o", "calibration": {"samples": 8, "seq_len": 32},
          "allocation": {"budget": {"avg_bits": 3.0}, "candidates": [2, 4, 8]}, "quantize": {"group_size": 32}}


@settings(FUZZ, max_examples=200, deadline=2_000)
@given(data=st.data(), whole=st.one_of(st.none(), VALUES, st.recursive(VALUES, lambda c: st.lists(c, max_size=3) |
                                                                        st.dictionaries(st.text(max_size=8), c,
                                                                                        max_size=3), max_leaves=8)))
def test_fuzz_recipe(data, whole):
    import copy
    import warnings

    doc = whole if data.draw(st.booleans()) else _apply(copy.deepcopy(RECIPE), data.draw(json_edit(RECIPE)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            recipe_from_dict(doc)
        except MoecompressError:
            pass

"""expert_stats.safetensors: written by export from the calibration, exact round trip, normalised rows, in the
manifest, copied into every server bundle, absent (None) in old checkpoints, malformed files refused."""
from __future__ import annotations

import pytest
import torch
from helpers import quantize_tiny

import moecompress
from moecompress.calibrate.dataset import CalibrationData
from moecompress.calibrate.options import CalibrationOptions
from moecompress.calibrate.run import calibrate
from moecompress.errors import MoecompressError
from moecompress.export.checkpoint import export_checkpoint
from moecompress.export.stats import expert_stats_from_calibration
from moecompress.format.expert_stats import (
    EXPERT_STATS_FILE,
    ExpertStats,
    read_expert_stats,
    write_expert_stats,
)
from moecompress.format.files import read_manifest, sha256_file, verify_files


@pytest.fixture(scope="module")
def calibrated():
    from conftest import _build

    model = _build("qwen3_moe")
    ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    data = CalibrationData(input_ids=ids, attention_mask=torch.ones_like(ids),
                           domain_ids=torch.tensor([0, 1] * 4), domains=("code", "prose"))
    stats = calibrate(model, None, data, CalibrationOptions(samples=8, seq_len=16, hessians=False, progress=False))
    return model, stats, quantize_tiny(model)


def test_stats_from_calibration_are_normalised_and_keep_counts(calibrated):
    _, cal, _ = calibrated
    s = expert_stats_from_calibration(cal)
    L, E = cal.tokens.shape
    assert s.mass.shape == (L, E) and s.mass.dtype == torch.float32
    assert torch.equal(s.tokens, cal.tokens)
    assert torch.allclose(s.mass.double().sum(-1), torch.ones(L, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(s.mass.double(), cal.mass / cal.mass.sum(-1, keepdim=True), atol=1e-7)
    assert s.paths.shape == (L - 1, E, E)
    assert torch.allclose(s.paths.double().sum(-1), torch.ones(L - 1, E, dtype=torch.float64), atol=1e-6)
    used = cal.paths.sum(-1) > 0  # rows with data are the counts normalised
    want = cal.paths.double() / cal.paths.sum(-1, keepdim=True).clamp(min=1)
    assert torch.allclose(s.paths.double()[used], want[used], atol=1e-7)
    assert s.domains == ("code", "prose") and s.domain_mass.shape == (2, L, E)
    assert torch.allclose(s.domain_mass.double().sum(-1), torch.ones(2, L, dtype=torch.float64), atol=1e-6)
    assert s.experts_paths == cal.experts_paths


def test_rows_without_data_are_uniform():
    paths = torch.zeros(1, 4, 4, dtype=torch.int64)
    paths[0, 0, 1], paths[0, 0, 2] = 3, 1  # expert 0 seen; experts 1..3 never used at layer 0
    s = ExpertStats.from_counts(mass=torch.tensor([[0.0, 0, 0, 0], [1.0, 1, 2, 0]]),
                                tokens=torch.zeros(2, 4, dtype=torch.int64), paths=paths)
    assert s.paths[0, 0].tolist() == [0.0, 0.75, 0.25, 0.0]
    assert torch.equal(s.paths[0, 1:], torch.full((3, 4), 0.25))
    assert s.mass[0].tolist() == [0.25] * 4 and s.mass[1].tolist() == [0.25, 0.25, 0.5, 0.0]
    assert s.domain_mass.shape == (0, 2, 4) and s.domains == ()


def test_round_trip_is_exact(calibrated, tmp_path):
    s = expert_stats_from_calibration(calibrated[1])
    write_expert_stats(tmp_path, s)
    r = read_expert_stats(tmp_path)
    for name in ("mass", "tokens", "paths", "domain_mass"):
        a, b = getattr(s, name), getattr(r, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert r.domains == s.domains and r.experts_paths == s.experts_paths


def test_export_writes_it_into_the_manifest_and_loading_still_works(calibrated, tmp_path):
    model, cal, (layout, plan, quantized) = calibrated
    stats = expert_stats_from_calibration(cal)
    ck = export_checkpoint(model, layout, plan, quantized, tmp_path / "ck", dtype=torch.float32, expert_stats=stats)
    manifest = read_manifest(ck)
    assert manifest[EXPERT_STATS_FILE]["sha256"] == sha256_file(ck / EXPERT_STATS_FILE)
    verify_files(ck)
    assert torch.equal(read_expert_stats(ck).paths, stats.paths)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(moecompress.from_pretrained(ck).eval()(ids).logits).all()
    # altered after export: the manifest check names it
    data = bytearray((ck / EXPERT_STATS_FILE).read_bytes())
    data[-1] ^= 1
    (ck / EXPERT_STATS_FILE).write_bytes(bytes(data))
    with pytest.raises(MoecompressError, match=EXPERT_STATS_FILE):
        verify_files(ck)


def test_old_checkpoint_without_the_file_reads_none(calibrated, tmp_path):
    model, _, (layout, plan, quantized) = calibrated
    ck = export_checkpoint(model, layout, plan, quantized, tmp_path / "ck", dtype=torch.float32)
    assert not (ck / EXPERT_STATS_FILE).exists() and read_expert_stats(ck) is None
    moecompress.from_pretrained(ck)


def test_stats_of_another_model_are_refused(calibrated, tmp_path):
    model, cal, (layout, plan, quantized) = calibrated
    s = expert_stats_from_calibration(cal)
    wrong = ExpertStats(mass=s.mass[:1], tokens=s.tokens[:1], paths=s.paths[:0])
    with pytest.raises(MoecompressError, match="do not describe this checkpoint"):
        export_checkpoint(model, layout, plan, quantized, tmp_path / "ck", expert_stats=wrong)


@pytest.mark.parametrize("break_it, message", [
    (lambda t: t.update(paths=t["paths"] * 2), "paths rows must sum to 1"),
    (lambda t: t.update(mass=t["mass"][:, :-1].contiguous()), "tokens has shape"),
    (lambda t: t.update(tokens=t["tokens"].float()), "tokens must be"),
    (lambda t: t.update(extra=torch.zeros(1)), "expected exactly"),
])
def test_malformed_files_are_refused(calibrated, tmp_path, break_it, message):
    from safetensors.torch import load_file, save_file

    write_expert_stats(tmp_path, expert_stats_from_calibration(calibrated[1]))
    path = tmp_path / EXPERT_STATS_FILE
    tensors = load_file(path)
    break_it(tensors)
    save_file(tensors, path, metadata={"moecompress": '{"format_version": "1", "domains": ["code", "prose"]}'})
    with pytest.raises(MoecompressError, match=message):
        read_expert_stats(tmp_path)


def test_shard_copies_it_into_every_bundle(calibrated, tmp_path):
    from moecompress.format.bundle_set import verify_bundles
    from moecompress.shard.command import checkpoint_sizes, run_shard_command

    model, cal, (layout, plan, quantized) = calibrated
    ck = export_checkpoint(model, layout, plan, quantized, tmp_path / "ck", dtype=torch.float32,
                           expert_stats=expert_stats_from_calibration(cal))
    cal.save(tmp_path / "cal")
    expert_bytes, dense_bytes = checkpoint_sizes(ck)
    memory = int(dense_bytes + expert_bytes.sum() * 0.7)
    run_shard_command(str(ck), str(tmp_path / "cal"), f"2x{memory}B", str(tmp_path / "out"), mode="expert")
    verify_bundles(tmp_path / "out")
    for server in (0, 1):
        bundle = tmp_path / "out" / f"server-{server}"
        assert sha256_file(bundle / EXPERT_STATS_FILE) == sha256_file(ck / EXPERT_STATS_FILE)
        assert EXPERT_STATS_FILE in read_manifest(bundle)

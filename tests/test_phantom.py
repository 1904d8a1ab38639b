"""The synthetic phantom: deterministic, well-formed, refuses to overwrite, and its signal follows T."""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr

from training import phantom
from osteoscreen.errors import DataError


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _manifest(folder: Path) -> list[dict[str, str]]:
    with (folder / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "set"
    manifest = phantom.generate_dataset(out, n=24, seed=0)
    assert manifest == out / "manifest.csv"
    return out


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _digest(phantom.generate_dataset(tmp_path / "a", n=5, seed=7).parent)
    b = _digest(phantom.generate_dataset(tmp_path / "b", n=5, seed=7).parent)
    c = _digest(phantom.generate_dataset(tmp_path / "c", n=5, seed=8).parent)
    assert a == b
    assert len(a) == 7  # five images, the manifest and phantom.json (the provenance a model card records)
    assert phantom.is_phantom_set(tmp_path / "a") and not phantom.is_phantom_set(tmp_path)
    pngs = lambda d: {h for name, h in d.items() if name.endswith(".png")}  # noqa: E731
    assert not pngs(a) & pngs(c)


def test_manifest_matches_files_and_labels(small_set):
    header = (small_set / "manifest.csv").read_text().splitlines()[0]
    assert header == "path,label,patient_id,t_score,site,sex,age,bits"
    rows = _manifest(small_set)
    assert len(rows) == 24
    on_disk = {str(p.relative_to(small_set)).replace("\\", "/") for p in small_set.rglob("*.png")}
    assert on_disk == {r["path"] for r in rows}
    assert not (small_set / ".synth-staging").exists()
    for r in rows:
        t = float(r["t_score"])
        assert -5.0 <= t <= 2.0
        assert r["label"] == ("osteoporosis" if t <= -2.5 else "normal")
        assert r["path"].startswith(r["label"] + "/")
        assert r["path"].split("/")[1].startswith(r["patient_id"] + "_v")
        assert r["site"] == "A" and r["sex"] in ("F", "M") and 40 <= int(r["age"]) <= 95
        with Image.open(small_set / r["path"]) as im:
            assert r["bits"] == ("16" if im.mode == "I;16" else "8")


def test_views_of_a_patient_share_t_and_label(small_set):
    views = defaultdict(list)
    for r in _manifest(small_set):
        views[r["patient_id"]].append((r["t_score"], r["label"]))
    assert len(views) < 24, "expected several views for some patients"
    assert max(len(v) for v in views.values()) <= 3
    for pid, vs in views.items():
        assert len(set(vs)) == 1, pid


def test_both_classes_and_bit_depths_and_sizes(small_set):
    rows = _manifest(small_set)
    assert {r["label"] for r in rows} == {"normal", "osteoporosis"}
    modes, sizes = set(), set()
    for r in rows:
        with Image.open(small_set / r["path"]) as im:
            modes.add(im.mode)
            sizes.add(im.size)
            w, h = im.size
            assert 448 <= h <= 640 and 0.75 * h <= w <= 1.06 * h
            arr = np.asarray(im)
            assert arr.max() > arr.min()
    assert modes == {"L", "I;16"}
    assert len(sizes) > 5


def test_refuses_existing_manifest_and_keeps_it(tmp_path):
    (tmp_path / "manifest.csv").write_text("path,label,patient_id,t_score\nmine.png,normal,x,0\n")
    with pytest.raises(DataError, match="empty folder"):
        phantom.generate_dataset(tmp_path, n=4)
    assert (tmp_path / "manifest.csv").read_text().startswith("path,label,patient_id,t_score\nmine.png")
    assert not (tmp_path / "normal").exists()


def test_refuses_class_folder_with_files(tmp_path):
    (tmp_path / "osteoporosis").mkdir()
    (tmp_path / "osteoporosis" / "x.png").write_bytes(b"not ours")
    with pytest.raises(DataError, match="empty folder"):
        phantom.generate_dataset(tmp_path, n=4)
    assert (tmp_path / "osteoporosis" / "x.png").read_bytes() == b"not ours"


@pytest.mark.parametrize("n", [-1, 0, 1])
def test_refuses_fewer_than_two_images(tmp_path, n):
    with pytest.raises(DataError, match="at least 2"):
        phantom.generate_dataset(tmp_path / "x", n=n)
    assert not (tmp_path / "x").exists()


def _trabecular_stats(sample: phantom.Sample) -> tuple[float, float]:
    """Brightness of L1-L5 trabecular bone relative to the image, and horizontal/vertical strand energy."""
    img, mask = sample.image.astype(np.float64), sample.trabecular_mask
    lo, hi = np.percentile(img, [1, 99])
    brightness = (img[mask].mean() - np.median(img)) / (hi - lo)
    d_row = np.abs(np.diff(img, axis=0))[mask[1:] & mask[:-1]].mean()  # horizontal strands: rows change
    d_col = np.abs(np.diff(img, axis=1))[mask[:, 1:] & mask[:, :-1]].mean()  # vertical strands
    return brightness, d_row / d_col


def test_density_signal_trends_with_t_despite_nuisance():
    """Over many patients (all nuisance random), the bone in the vertebral bodies gets brighter relative
    to the image, and more horizontally structured, as T rises."""
    ts = np.linspace(-4.8, 1.8, 28)
    stats = np.array([_trabecular_stats(phantom.render_sample(float(t), seed=100 + i)) for i, t in enumerate(ts)])
    assert spearmanr(ts, stats[:, 0])[0] > 0.5
    assert spearmanr(ts, stats[:, 1])[0] > 0.5


def test_signal_is_graded_not_a_step_at_the_threshold():
    """Holding anatomy and acquisition fixed (same seed), only the bone changes with T: brightness rises
    monotonically, on both sides of -2.5, and the step across -2.5 is no bigger than elsewhere."""
    cfg = phantom.PhantomConfig(visible_sd=0.0)
    ts = (-4.5, -3.5, -2.6, -2.4, -1.0, 0.5)
    for seed in range(3):
        b = np.array([_trabecular_stats(phantom.render_sample(t, seed=seed, config=cfg))[0] for t in ts])
        assert np.all(np.diff(b) > 0), (seed, b)
        slope_overall = (b[-1] - b[0]) / (ts[-1] - ts[0])
        slope_at_threshold = (b[3] - b[2]) / (ts[3] - ts[2])
        assert slope_at_threshold < 3 * slope_overall, (seed, b)


def _model_input_outside_and_inside(sample: phantom.Sample) -> tuple[float, float]:
    """What the model sees (after `to_model_input`'s percentile stretch): the median outside the vertebral
    bodies and the mean inside them, in grey levels of 255."""
    from osteoscreen.imaging.decode import to_model_input

    x = to_model_input(sample.image)[..., 0]
    bodies = np.asarray(Image.fromarray(sample.body_mask.astype(np.uint8) * 255).resize(x.shape[::-1],
                                                                                      Image.BILINEAR)) > 127
    return float(np.median(x[~bodies])), float(x[bodies].mean())


def test_bone_density_shows_in_the_bone_not_around_it():
    """The shortcut the explanation maps found (issue 12): when the densest bone was every image's white
    point, the same patient at T = -4.5 had soft tissue ~50 grey levels brighter than at T = +1.0 after
    `to_model_input`, and bodies no darker. With collimated margins as the white point, only the bodies
    change (measured: outside within 1.6 levels, inside +20..31)."""
    for seed in range(4):
        (out_low, in_low), (out_high, in_high) = (_model_input_outside_and_inside(phantom.render_sample(t, seed=seed))
                                                  for t in (-4.5, 1.0))
        assert abs(out_high - out_low) <= 4.0, (seed, out_low, out_high)
        assert in_high - in_low >= 10.0, (seed, in_low, in_high)


def test_signal_zero_makes_classes_identical():
    cfg = phantom.PhantomConfig(signal=0.0)
    low, high = phantom.render_sample(-4.5, seed=3, config=cfg), phantom.render_sample(1.5, seed=3, config=cfg)
    assert (low.label, high.label) == ("osteoporosis", "normal")
    np.testing.assert_array_equal(low.image, high.image)


def test_fractures_more_common_at_low_t():
    def fractured(t_mean: float) -> int:
        cfg = phantom.PhantomConfig(t_mean=t_mean, t_sd=0.3)
        return sum(phantom._sample_patient(np.random.SeedSequence([9, i]), "p", cfg).fractures > 0 for i in range(60))

    low, high = fractured(-4.0), fractured(0.0)
    assert low >= 8 and high <= 2 and low > 4 * high


def test_class_balance_of_default_population():
    rng = np.random.default_rng(0)
    cfg = phantom.DEFAULT_CONFIG
    t = np.clip(rng.normal(cfg.t_mean, cfg.t_sd, 20000), cfg.t_min, cfg.t_max)
    assert 0.30 <= np.mean(t <= phantom.THRESHOLD) <= 0.45


def test_contact_sheet_is_small_png(tmp_path):
    out = phantom.contact_sheet(tmp_path / "sheet.png", n_per_class=2, seed=1)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 200
    assert out.stat().st_size < 400_000


def test_cli_synth_writes_a_set(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "osteoscreen.cli", "synth", "--out", str(out), "--n", "3",
                             "--seed", "5"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote 3 synthetic radiographs" in result.stdout
    assert len(_manifest(out)) == 3
    again = subprocess.run([sys.executable, "-m", "osteoscreen.cli", "synth", "--out", str(out), "--n", "3"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode != 0
    assert "empty folder" in again.stderr + again.stdout


def test_module_imports_without_tensorflow():
    code = ("import sys, training.phantom; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"

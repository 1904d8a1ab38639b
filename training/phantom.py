"""Synthetic lateral lumbar-spine radiographs: the embedded demo data set.

No real spine X-rays ship with OsteoScreen, so `osteoscreen synth` draws a labelled phantom set that
exercises the whole pipeline (decode, 8/16-bit handling, features, grouped splits, calibration) on a task
that is learnable but, like the real one, not trivial.

The model
---------
*Label.* Each patient gets a DXA-like T-score ``T ~ N(t_mean, t_sd)`` clipped to ``[t_min, t_max]``
(rounded to 0.01) and is labelled ``osteoporosis`` when ``T <= -2.5`` (WHO), else ``normal``.

*What the radiograph sees.* A radiograph does not measure T. It shows a *visible bone quality* that
agrees with DXA only imperfectly, so each patient gets ``T_vis = T + e`` with ``e ~ N(0, visible_sd)``,
then a relative bone mineral density ``r = 1 + bmd_per_sd * signal * T_vis`` (one T unit is roughly 11 % of
young-adult BMD) and a quality ``q = (r - 0.4) / 0.6`` (1 = young adult, about 0.55 at T = -2.5). Every
density sign is a *smooth* function of q, never a step at -2.5, so images near the threshold are
genuinely ambiguous:

- radiolucency: trabecular bone volume (mean attenuation inside the vertebral bodies) falls with q;
- trabecular pattern: strands thin and horizontal trabeculae fade faster than vertical ones
  (``q**1.8`` against ``0.5 + 0.5 q``), so the mesh loses its cross-links and leaves the vertical
  striation of osteoporosis (strands are zero crossings of anisotropic noise, ~1 mm x 5 mm);
- cortex and endplates: both shells thin and lose density, more slowly than the trabecular bone, which
  gives the "picture frame" look of an osteoporotic body;
- fractures: the chance of 1-2 wedge, biconcave or crush fractures rises logistically as T_vis falls.

*What varies regardless of the label* (what a screening model must ignore): anatomy (vertebra size,
depth, disc heights and degeneration with osteophytes and endplate sclerosis, lordosis, sacral slope),
pose (in-plane rotation, shift, field of view, occasional left-right flip), overlay (soft tissue
thickness and back skin line, bowel gas with stool mottle, lower ribs, iliac wings), acquisition
(beam hardness i.e. bone contrast, scatter rising with body habitus, collimation: unexposed margins
behind the blades, focal/detector blur, quantum noise), processing (unsharp-mask edge enhancement, window/level, gamma), image size and aspect, and
bit depth (8- and 16-bit PNGs in one set). Each patient has 1-3 views with the same anatomy and bone
but a new pose and exposure, so splits must be grouped by ``patient_id``.

Display convention: pixel value grows with attenuation (bone bright), so the collimated margins are the
brightest thing on the film, as on a real one. That matters: before the phantom had them, the densest bone
was every image's white point, so a less dense spine brightened everything around it after windowing, and
the explanation maps (issue 12) showed a model reading the soft tissue instead of the bone. 16-bit files use
the full 0..65535 range.

Difficulty knobs
----------------
All live in `PhantomConfig` (defaults in `DEFAULT_CONFIG`): ``visible_sd`` (DXA-vs-image mismatch; the
main ceiling on AUC), ``signal`` (scales every density sign; 0 makes the classes indistinguishable),
``fracture_rate`` (fractures are an almost certain giveaway), ``noise`` and ``nuisance`` (spread of
acquisition and processing). ``t_mean``/``t_sd`` set the class balance (about 35 % osteoporosis).

Sites
-----
A model moves between hospitals, so the phantom has sites (`SITES`, `osteoscreen synth --site`): each is
another scanner and population. ``exposure`` (dose: quantum noise grows as ``1/sqrt(exposure)``),
``contrast`` (bone contrast, lower with a harder beam), ``blur`` (focal spot and detector unsharpness),
``gamma`` (the vendor's display curve) and the density distribution (``t_mean``/``t_sd``) shift the images and
the prevalence while the link between bone and label stays the same: what site validation and
recalibration are for. Site "A" is the default set; its images are unchanged by the site knobs. The manifest
also records each patient's sex and age (drawn from their own stream, age falling with T as in a real
referred population; the images do not depend on them) and each file's bit depth, for subgroup tables.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from scipy import ndimage

from osteoscreen.errors import DataError

THRESHOLD = -2.5  # WHO: osteoporosis when T <= -2.5
LABELS = ("normal", "osteoporosis")
MANIFEST = "manifest.csv"
MANIFEST_HEADER = ("path", "label", "patient_id", "t_score", "site", "sex", "age", "bits")
# Written beside the manifest: a model trained on this folder is a demo, and its DICOM results say so.
PROVENANCE = "phantom.json"
# Bumped when the images a seed draws change: 2 added the collimated margins (results measured on version 1
# are not comparable).
VERSION = 2


@dataclass(frozen=True)
class PhantomConfig:
    """Population and difficulty settings.

    With the defaults (phantom version 2), `make train` on 400 images (seed 0: VGG16 block3-5 features,
    calibrated Random Forest) gave patient-grouped 5-fold CV AUC 0.88, validation 0.91 and test 0.84:
    learnable, not trivial. Version 1 (no collimated margins) scored higher, partly through the soft-tissue
    shortcut the margins removed. Raise `signal` or lower `visible_sd`/`noise`/`nuisance`
    to make it easier; the reverse to make it harder."""

    t_mean: float = -2.0  # population mean T-score (a referred, older population)
    t_sd: float = 1.25  # population spread of T
    t_min: float = -5.0
    t_max: float = 2.0
    visible_sd: float = 0.35  # per-patient mismatch (T units) between DXA and what the image shows
    bmd_per_sd: float = 0.11  # relative BMD change per T unit (young-adult SD / mean)
    signal: float = 1.0  # multiplies every density-driven sign; 0 removes them
    fracture_rate: float = 0.4  # fracture probability at very low T (logistic in T_vis, centre -3)
    noise: float = 1.0  # scales quantum noise
    nuisance: float = 1.0  # scales the spread of beam hardness, gamma, edge enhancement, window
    views: tuple[int, int] = (1, 3)  # views per patient, inclusive range
    size: tuple[int, int] = (448, 640)  # image height range in pixels
    aspect: tuple[float, float] = (0.78, 1.05)  # width / height range
    frac_16bit: float = 0.5  # share of 16-bit PNGs
    site: str = "A"  # written to the manifest's `site` column
    exposure: float = 1.0  # dose relative to site A: quantum noise scales with 1/sqrt(exposure)
    contrast: float = 1.0  # multiplies bone contrast (beam hardness)
    blur: float = 1.0  # multiplies focal spot / detector blur
    gamma: float = 1.0  # multiplies the display gamma (processing curve)

    def __post_init__(self) -> None:
        problems = [name for name, ok in (
            ("t_min < t_max", self.t_min < self.t_max),
            ("non-negative t_sd, visible_sd, signal, noise, nuisance, fracture_rate",
             min(self.t_sd, self.visible_sd, self.signal, self.noise, self.nuisance, self.fracture_rate) >= 0),
            ("positive exposure, contrast, blur, gamma", min(self.exposure, self.contrast, self.blur, self.gamma) > 0),
            ("1 <= views[0] <= views[1]", 1 <= self.views[0] <= self.views[1]),
            ("64 <= size[0] <= size[1]", 64 <= self.size[0] <= self.size[1]),
            ("0 < aspect[0] <= aspect[1]", 0 < self.aspect[0] <= self.aspect[1]),
            ("0 <= frac_16bit <= 1", 0.0 <= self.frac_16bit <= 1.0),
        ) if not ok]
        if problems:
            raise ValueError(f"invalid PhantomConfig: need {'; '.join(problems)}")


DEFAULT_CONFIG = PhantomConfig()

# Site A is the demo training set. Site B: another hospital's scanner (half the dose, a harder beam, a
# blurrier detector, a brighter display curve) and an older population (about half osteoporosis vs a third).
SITES: dict[str, PhantomConfig] = {
    "A": DEFAULT_CONFIG,
    "B": replace(DEFAULT_CONFIG, site="B", exposure=0.5, contrast=0.8, blur=1.6, gamma=0.85, t_mean=-2.7, t_sd=1.1),
}


def label_for(t_score: float) -> str:
    """The class a T-score belongs to (WHO definition)."""
    return LABELS[1] if t_score <= THRESHOLD else LABELS[0]


# ----------------------------------------------------------------------------------------------------
# Anatomy: one patient, shared by all of their views
# ----------------------------------------------------------------------------------------------------

_LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5", "S1")
_HEIGHT_MM = (24.0, 26.0, 27.0, 28.0, 28.0, 27.0, 46.0)  # S1 stands in for the whole upper sacrum
_DEPTH_MM = (32.0, 34.0, 36.0, 38.0, 40.0, 41.0, 44.0)
_DISC_MM = (7.0, 8.0, 9.0, 10.0, 11.0, 10.0)  # below each level
_LORDOSIS_SHARE = (-0.34, -0.26, -0.14, 0.0, 0.15, 0.34, 0.9)  # body tilt as a share of the lordosis
_LORDOTIC_WEDGE = (0.0, 0.0, 0.0, 0.0, -0.04, -0.14, -0.25)  # negative: anterior wall taller
_FRACTURE_LEVEL_P = (0.15, 0.3, 0.2, 0.15, 0.12, 0.08, 0.0)
_TEX_MM = 0.4  # grid spacing of the trabecular texture maps


@dataclass(frozen=True)
class _Body:
    """One vertebral body in the canonical frame (mm, y down, +x posterior) with its bone texture."""

    level: str
    cx: float
    cy: float
    angle: float  # tilt of the body's cranio-caudal axis, radians, + = running posteriorly downwards
    a: float  # half depth (antero-posterior)
    b: float  # half height
    wedge: float  # fractional anterior height loss (negative: anterior taller)
    concavity: float  # endplate bowing as a fraction of the half height
    cortex: float  # side-wall thickness, mm
    endplate: float  # endplate thickness, mm
    shell_density: float
    osteophyte: float  # size of anterior corner spurs, mm (0: none)
    posterior: bool  # draw pedicle, articular pillar and spinous process
    trabecular: np.ndarray = field(repr=False)  # bone density map on a _TEX_MM grid over the body


@dataclass(frozen=True)
class _Patient:
    patient_id: str
    t_score: float
    quality: float
    bodies: tuple[_Body, ...]
    habitus: float  # soft tissue thickness factor
    skin_mm: float  # back skin line, mm posterior to the spine axis
    flip: bool  # patient faces right instead of left
    fractures: int
    overlay_seed: int  # ribs and iliac wings: anatomy, so the same in every view


def _quality(t_visible: float, cfg: PhantomConfig) -> float:
    """Radiographic bone quality: 1 for a young adult, 0 at 40 % of young-adult BMD (floored at 0.05)."""
    r = 1.0 + cfg.bmd_per_sd * cfg.signal * t_visible
    return float(np.clip((r - 0.4) / 0.6, 0.05, 1.5))


def _strands(rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float], width: float) -> np.ndarray:
    """Line network along the long axis of `sigma`: the zero crossings of anisotropic smooth noise.

    Zero crossings of such noise meander like trabeculae; `width` (in noise standard deviations) sets the
    strand thickness, so thinning bone is a smaller width."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return np.exp(-np.square(f / (width * f.std() + 1e-12)))


def _trabecular_map(rng: np.random.Generator, a: float, b: float, q: float) -> np.ndarray:
    """Bone density inside one body on a _TEX_MM grid (rows: cranio-caudal, columns: antero-posterior).

    Horizontal strands fade as q**1.8 while vertical ones keep 0.5 + 0.5 q: load-bearing vertical
    trabeculae survive longest, so osteoporotic bone looks vertically striated before it looks empty.
    Strands also thin with q, and the bone volume under them (the mean) falls."""
    shape = (int(2 * (b + 2) / _TEX_MM) + 2, int(2 * (a + 2) / _TEX_MM) + 2)
    long_px, short_px = 5.0 / _TEX_MM, 1.1 / _TEX_MM
    qc = min(q, 1.2)
    vertical = _strands(rng, shape, (long_px, short_px), 0.25 + 0.2 * qc)
    horizontal = _strands(rng, shape, (short_px, long_px), 0.2 + 0.25 * qc)
    grain = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 0.5 / _TEX_MM, mode="wrap")
    grain /= grain.std() + 1e-12
    dens = 0.25 + 0.7 * qc + (0.25 + 0.25 * qc) * vertical + 0.8 * qc**1.8 * horizontal + 0.08 * grain
    return ndimage.gaussian_filter(dens, 0.5 / _TEX_MM, mode="wrap").astype(np.float32)


def _sample_patient(seq: np.random.SeedSequence, patient_id: str, cfg: PhantomConfig) -> _Patient:
    """Draw T, bone quality, anatomy and fractures for one patient.

    Bone, anatomy, fractures and textures use separate random streams, so a patient rendered at another
    T-score (`render_sample`) keeps the same anatomy and nuisance and only the bone changes."""
    bone_rng, anat_rng, fx_rng, tex_rng = (np.random.default_rng(s) for s in seq.spawn(4))
    t = round(float(np.clip(bone_rng.normal(cfg.t_mean, cfg.t_sd), cfg.t_min, cfg.t_max)), 2)
    t_vis = t + bone_rng.normal(0.0, cfg.visible_sd)
    q = _quality(t_vis, cfg)
    qc = min(q, 1.2)

    size = anat_rng.normal(1.0, 0.07)
    lordosis = math.radians(float(np.clip(anat_rng.normal(42.0, 9.0), 20.0, 65.0)))
    trunk_tilt = math.radians(anat_rng.normal(0.0, 3.0))
    degeneration = float(anat_rng.beta(2.0, 3.0))
    angles = [trunk_tilt + lordosis * s for s in _LORDOSIS_SHARE]
    heights = [h * size * anat_rng.normal(1.0, 0.03) for h in _HEIGHT_MM]
    depths = [d * size * anat_rng.normal(1.0, 0.03) for d in _DEPTH_MM]
    discs = [d * size * anat_rng.normal(1.0, 0.12) * (1.0 - 0.35 * degeneration) for d in _DISC_MM]
    wedges = [w + anat_rng.normal(0.0, 0.02) for w in _LORDOTIC_WEDGE]
    concavities = anat_rng.uniform(0.02, 0.05, size=len(_LEVELS))
    sclerosis = 0.25 * degeneration * anat_rng.uniform(0.5, 1.0, size=len(_LEVELS))
    spurs = [float(anat_rng.uniform(1.0, 4.5) * degeneration) if anat_rng.random() < degeneration else 0.0
             for _ in _LEVELS]
    jitter = anat_rng.normal(1.0, 0.08, size=(len(_LEVELS), 2))

    # Fractures: logistic in the visible T (bone strength); the same draw at a lower T can only add one.
    p_fracture = cfg.fracture_rate * cfg.signal / (1.0 + math.exp((t_vis + 3.0) / 0.5))
    fractured: dict[int, tuple[str, float]] = {}
    draw, count_draw = fx_rng.random(), fx_rng.random()
    levels = fx_rng.choice(len(_LEVELS), size=2, replace=False, p=np.array(_FRACTURE_LEVEL_P))
    kinds = fx_rng.choice(["wedge", "biconcave", "crush"], size=2, p=[0.5, 0.35, 0.15])
    severities = fx_rng.uniform(0.2, 0.45, size=2)
    if draw < p_fracture:
        for k in range(1 if count_draw < 0.7 else 2):
            fractured[int(levels[k])] = (str(kinds[k]), float(severities[k]))

    cx, cy = 0.0, 0.0
    centres = [(cx, cy)]
    for i in range(1, len(_LEVELS)):  # stack: half a body, the disc (at the mean tilt), half the next body
        steps = ((angles[i - 1], heights[i - 1] / 2), (0.5 * (angles[i - 1] + angles[i]), discs[i - 1]),
                 (angles[i], heights[i] / 2))
        cx += sum(math.sin(angle) * length for angle, length in steps)
        cy += sum(math.cos(angle) * length for angle, length in steps)
        centres.append((cx, cy))
    ox, oy = centres[3]  # L3 at the origin
    bodies: list[_Body] = []
    for i, level in enumerate(_LEVELS):
        a, b = depths[i] / 2, heights[i] / 2
        wedge, concavity = wedges[i], float(concavities[i])
        if i in fractured:
            kind, severity = fractured[i]
            if kind == "wedge":
                wedge += severity
            elif kind == "biconcave":
                concavity += severity / 2
            else:
                b *= 1.0 - 0.7 * severity
        bodies.append(_Body(
            level=level, cx=centres[i][0] - ox, cy=centres[i][1] - oy, angle=angles[i], a=a, b=b,
            wedge=wedge, concavity=concavity,
            cortex=(0.5 + 0.7 * qc) * jitter[i, 0],
            endplate=(0.6 + 0.9 * qc) * jitter[i, 1] * (1.0 + sclerosis[i]),
            shell_density=(0.55 + 0.45 * qc) * (1.0 + sclerosis[i]),
            osteophyte=spurs[i],
            posterior=level != "S1",
            trabecular=_trabecular_map(tex_rng, a, heights[i] / 2, q),
        ))
    return _Patient(
        patient_id=patient_id, t_score=t, quality=q, bodies=tuple(bodies),
        habitus=float(np.clip(anat_rng.normal(1.0, 0.15), 0.7, 1.45)),
        skin_mm=float(anat_rng.uniform(78.0, 110.0)) * size,
        flip=bool(anat_rng.random() < 0.15), fractures=len(fractured),
        overlay_seed=int(anat_rng.integers(2**31)),
    )


# ----------------------------------------------------------------------------------------------------
# One view: pose, overlay, acquisition and processing
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _View:
    height: int
    width: int
    to_px: np.ndarray  # 2x2: canonical mm (x, y) -> pixel (col, row)
    offset: np.ndarray  # pixel position of the canonical origin
    bone_gain: float
    scatter: float
    blur_px: float
    noise: float
    equalize: float
    sharpen: float
    sharpen_px: float
    window: tuple[float, float]  # black point (percentile), white-point headroom above the 99.9th
    gamma: float
    sixteen_bit: bool
    blades: tuple[int, int, int, int]  # collimated margins in pixels: top, bottom, left, right


def _sample_view(rng: np.random.Generator, patient: _Patient, cfg: PhantomConfig) -> _View:
    """Draw pose and exposure for one radiograph of `patient`."""
    j = cfg.nuisance
    height = int(rng.integers(cfg.size[0], cfg.size[1] + 1))
    width = int(round(height * rng.uniform(*cfg.aspect)))
    mm_per_px = rng.uniform(175.0, 220.0) / height
    rot = math.radians(rng.normal(0.0, 4.0))
    c, s = math.cos(rot), math.sin(rot)
    flip = -1.0 if patient.flip else 1.0
    to_px = np.array([[c * flip, -s], [s * flip, c]]) / mm_per_px
    centre_mm = np.array([rng.uniform(8.0, 32.0), rng.uniform(-12.0, 12.0)])  # what the field is aimed at
    offset = np.array([width / 2, height / 2]) - to_px @ centre_mm
    return _View(
        height=height, width=width, to_px=to_px, offset=offset,
        bone_gain=float(np.exp(rng.normal(0.0, 0.15 * j))) * cfg.contrast,
        scatter=float(np.clip(0.12 + 0.35 * (patient.habitus - 0.8) + rng.normal(0.0, 0.04), 0.03, 0.45)),
        blur_px=float(rng.uniform(0.5, 1.3)) * cfg.blur,
        noise=float(rng.uniform(0.006, 0.02) * cfg.noise) / math.sqrt(cfg.exposure),
        equalize=float(np.clip(rng.normal(0.5, 0.12 * j), 0.1, 0.8)),
        sharpen=float(rng.uniform(0.0, 0.8 * j)),
        sharpen_px=float(rng.uniform(2.0, 6.0)),
        window=(float(rng.uniform(0.1, 0.1 + 2.5 * j)), float(rng.uniform(0.0, 0.2 * j))),
        gamma=float(np.exp(rng.normal(0.0, 0.15 * j))) * cfg.gamma,
        sixteen_bit=bool(rng.random() < cfg.frac_16bit),
        blades=(int(height * rng.uniform(0.0, 0.08)), int(height * rng.uniform(0.0, 0.08)),
                int(width * rng.uniform(0.03, 0.12)), int(width * rng.uniform(0.03, 0.12))),
    )


def _box(view: _View, corners_mm: np.ndarray, pad: int = 2) -> tuple[slice, slice] | None:
    """Pixel rows/cols that cover a canonical-frame polygon, or None when it is off the image."""
    px = corners_mm @ view.to_px.T + view.offset
    c0, r0 = np.floor(px.min(axis=0)).astype(int) - pad
    c1, r1 = np.ceil(px.max(axis=0)).astype(int) + pad
    r0, c0, r1, c1 = max(r0, 0), max(c0, 0), min(r1, view.height), min(c1, view.width)
    if r0 >= r1 or c0 >= c1:
        return None
    return slice(r0, r1), slice(c0, c1)


def _canonical(view: _View, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
    """Canonical mm coordinates (x, y) of the pixel centres in a window."""
    inv = np.linalg.inv(view.to_px)
    r = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] + np.float32(0.5 - view.offset[1])
    c = np.arange(cols.start, cols.stop, dtype=np.float32)[None, :] + np.float32(0.5 - view.offset[0])
    (i00, i01), (i10, i11) = inv.tolist()
    return i00 * c + i01 * r, i10 * c + i11 * r


def _fill(sdf: np.ndarray, soft: float) -> np.ndarray:
    """Anti-aliased inside indicator from a signed distance (negative inside), `soft` mm wide."""
    return np.clip(0.5 - sdf / soft, 0.0, 1.0)


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float, tilt: float = 0.0) -> np.ndarray:
    """Projected thickness of an elliptic rod: sqrt(1 - rho^2), bright in the middle, 0 outside."""
    c, s = math.cos(tilt), math.sin(tilt)
    du, dv = u - cu, v - cv
    x, y = (c * du + s * dv) / ru, (-s * du + c * dv) / rv
    return np.sqrt(np.clip(1.0 - x * x - y * y, 0.0, 1.0))


def _rounded_box(u: np.ndarray, v: np.ndarray, hu: float | np.ndarray, hv: float | np.ndarray, r: float) -> np.ndarray:
    """Signed distance (mm, negative inside) to a box of half sizes hu x hv with corner radius r."""
    qx = np.abs(u) - (hu - r)
    qy = np.abs(v) - (hv - r)
    outside = np.sqrt(np.square(np.maximum(qx, 0.0)) + np.square(np.maximum(qy, 0.0)))
    return outside + np.minimum(np.maximum(qx, qy), 0.0) - r


def _plate(u: np.ndarray, v: np.ndarray, cu: float, cv: float, hu: float, hv: float, tilt: float, soft: float
           ) -> np.ndarray:
    """A flat bony plate (pedicle, articular column, spinous process) with fuzzy edges: these are thin,
    paired and superimposed in a lateral view, so they show as soft-edged, moderately dense shadows."""
    c, s = math.cos(tilt), math.sin(tilt)
    du, dv = u - cu, v - cv
    sdf = _rounded_box(c * du + s * dv, -s * du + c * dv, hu, hv, min(hu, hv) * 0.9)
    return _fill(sdf, soft)


def _local(view: _View, body: _Body, u0: float, u1: float, v0: float, v1: float
           ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
    """Pixel window covering the body-frame rectangle [u0, u1] x [v0, v1] and the body coordinates
    (u: posterior, v: caudal, mm) of its pixels. Each part of a vertebra gets its own small window,
    which keeps rendering cheap."""
    ca, sa = math.cos(body.angle), math.sin(body.angle)
    corners = np.array([[body.cx + u * ca + v * sa, body.cy - u * sa + v * ca] for u in (u0, u1) for v in (v0, v1)])
    box = _box(view, corners)
    if box is None:
        return None
    x, y = _canonical(view, *box)
    dx, dy = x - np.float32(body.cx), y - np.float32(body.cy)
    return box, dx * ca - dy * sa, dx * sa + dy * ca


def _render_body(body: _Body, view: _View, bone: np.ndarray, trab_mask: np.ndarray | None,
                 body_mask: np.ndarray | None = None) -> None:
    """Add one vertebra (body, shells, spurs, posterior elements) to the `bone` attenuation map; mark its
    trabecular bone (L1-L5) and its whole body, shells included (every level), in the masks given."""
    a, b = body.a, body.b
    soft = 0.9 * float(np.linalg.norm(np.linalg.inv(view.to_px), axis=0).mean())  # about one pixel, in mm
    part = _local(view, body, -a - 4.0, a + 2.0, -b - 5.0, b + 5.0)
    if part is not None:
        box, u, v = part
        # A rounded box whose height shrinks anteriorly (wedge) or centrally (biconcave), with a slightly
        # concave anterior wall; the shells are the band between it and a shrunken copy.
        un = np.clip(u / a, -1.0, 1.0)
        vn = np.clip(v / b, -1.0, 1.0)
        half_h = b * (1.0 - body.wedge * (1.0 - un) / 2) - body.concavity * b * (1.0 - un * un)
        waist = 1.2 * (1.0 - vn * vn) * (u < 0)
        whole = _fill(_rounded_box(u, v, a - waist, half_h, 2.0), soft)
        inner = _fill(_rounded_box(u, v, a - waist - body.cortex, half_h - body.endplate, 2.0), soft)
        walls = whole - _fill(_rounded_box(u, v, a - waist - body.cortex, half_h, 2.0), soft)
        plates = whole - _fill(_rounded_box(u, v, a - waist, half_h - body.endplate, 2.0), soft)
        path = 0.7 + 0.3 * np.sqrt(np.clip(1.0 - un * un, 0.0, 1.0))  # beam path through a rounded body

        inside = inner > 0
        trab = np.zeros_like(u)
        rows, cols = (v[inside] + b + 2) / _TEX_MM, (u[inside] + a + 2) / _TEX_MM
        trab[inside] = ndimage.map_coordinates(body.trabecular, [rows, cols], order=1, mode="nearest")
        # Endplates are seen edge-on and look denser than the side walls.
        shell = np.maximum(0.3 * walls, 0.45 * plates)
        out = 0.3 * path * inner * trab + body.shell_density * shell
        if body.osteophyte > 0:  # anterior corner spurs of disc degeneration, pointing into the disc
            o = body.osteophyte
            for sign in (-1.0, 1.0):
                out += 0.3 * body.shell_density * _ellipse(u, v, -a - 0.2 * o, sign * (b - 0.2 * o), 0.45 * o, o,
                                                          sign * 0.7)
        bone[box] += out
        if trab_mask is not None and body.level not in ("T12", "S1"):
            trab_mask[box] |= inner > 0.99
        if body_mask is not None:
            body_mask[box] |= whole > 0.5
    if not body.posterior:
        return
    # Pedicle, articular column, lamina and spinous process: (centre u, centre v, half u, half v, tilt, weight).
    h = 2 * b
    soft = max(soft, 3.0)
    for cu, cv, hu, hv, tilt, weight in ((a + 6.0, -0.2 * h, 8.0, 0.2 * h, 0.0, 0.1),
                                         (a + 19.0, 0.08 * h, 5.5, 0.58 * h, 0.12, 0.13),
                                         (a + 31.0, 0.24 * h, 10.0, 0.14 * h, 0.3, 0.09),
                                         (a + 41.0, 0.38 * h, 7.0, 0.2 * h, 0.3, 0.07)):
        reach = max(hu, hv) + soft
        part = _local(view, body, cu - reach, cu + reach, cv - reach, cv + reach)
        if part is not None:
            box, u, v = part
            bone[box] += weight * body.shell_density * _plate(u, v, cu, cv, hu, hv, tilt, soft)


def _low_freq(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Smooth unit-variance random field: white noise on a coarse grid, blurred, then upsampled."""
    small = rng.standard_normal((shape[0] // cell + 3, shape[1] // cell + 3)).astype(np.float32)
    small = ndimage.gaussian_filter(small, 1.0, mode="wrap")
    small /= small.std() + 1e-12
    big = np.asarray(Image.fromarray(small, mode="F").resize(((small.shape[1]) * cell, small.shape[0] * cell),
                                                              Image.BICUBIC))
    return big[cell: cell + shape[0], cell: cell + shape[1]]


def _blur_large(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur for large sigma, computed on a downsampled copy (cheap and smooth enough)."""
    f = max(1, int(sigma // 2))
    h, w = img.shape
    small = img[: h - h % f, : w - w % f].reshape(h // f, f, w // f, f).mean(axis=(1, 3))
    small = ndimage.gaussian_filter(small, sigma / f, mode="nearest")
    return np.asarray(Image.fromarray(small.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))


def _soft_tissue(rng: np.random.Generator, patient: _Patient, view: _View) -> np.ndarray:
    """Soft tissue path length, back skin line, and bowel gas, in attenuation units."""
    full = (slice(0, view.height), slice(0, view.width))
    x, y = _canonical(view, *full)
    spine_y = np.array([bd.cy for bd in patient.bodies])
    spine_x = np.array([bd.cx for bd in patient.bodies])
    skin = np.interp(y, spine_y, spine_x).astype(np.float32) + patient.skin_mm
    front = skin - 360.0 * patient.habitus
    depth = np.clip((x - front) * (skin - x), 0.0, None) / ((skin - front) / 2) ** 2
    soft = patient.habitus * np.sqrt(depth) * (1.0 + 0.05 * _low_freq(rng, depth.shape, 48))

    # Bowel gas: dark pockets in front of the spine, mottled by stool.
    gas_amount = rng.uniform(0.0, 0.5)
    pockets = _low_freq(rng, depth.shape, 24)
    mottle = _low_freq(rng, depth.shape, 4)
    gas = np.clip((pockets - 0.6) / 0.5, 0.0, 1.0) * (0.7 + 0.3 * mottle)
    anterior = np.clip((-x - 5.0) / 25.0, 0.0, 1.0)
    return soft - gas_amount * patient.habitus * gas * anterior


def _overlay_bones(patient: _Patient, view: _View, bone: np.ndarray) -> None:
    """Lower ribs over the upper lumbar spine and both iliac wings over the lower one.

    Their shapes are anatomy (drawn from the patient's overlay seed, all before any visibility check, so
    every view shows the same ones); their density follows the patient's bone quality like the spine's."""
    rng = np.random.default_rng(patient.overlay_seed)
    density = 0.55 + 0.45 * min(patient.quality, 1.2)
    t12, l5 = patient.bodies[0], patient.bodies[5]
    ribs = [(t12.cy + rng.uniform(-25.0, 25.0), rng.uniform(3.5, 5.0)) for _ in range(int(rng.integers(1, 4)))]
    shift = rng.normal(0.0, 4.0, size=2)
    wings = [(l5.cx + 35.0 + side * shift[0], l5.cy + 45.0 + side * shift[1], rng.uniform(60.0, 80.0),
              rng.uniform(55.0, 70.0)) for side in (0.0, 1.0)]

    for y0, half_width in ribs:  # a rib is a hollow tube: bright edges, a little less in the middle
        box = _box(view, np.array([[-60.0, y0 - 55], [110.0, y0 - 55], [-60.0, y0 + 50], [110.0, y0 + 50]]))
        if box is None:
            continue
        x, y = _canonical(view, *box)
        centre_y = y0 + 0.45 * (t12.cx + 60.0 - x) - 0.0022 * np.square(x - 20.0)
        d = np.abs(y - centre_y) / half_width
        tube = np.sqrt(np.clip(1 - d * d, 0, 1)) - 0.7 * np.sqrt(np.clip(1 - np.square(d / 0.75), 0, 1))
        fade = np.clip((x + 60.0) / 30.0, 0, 1) * np.clip((110.0 - x) / 30.0, 0, 1)
        bone[box] += 0.22 * density * tube * fade
    for cx, cy, rx, ry in wings:  # a thin plate with a denser crest along its upper rim
        box = _box(view, np.array([[cx - rx, cy - ry], [cx + rx, cy - ry], [cx - rx, cy + ry], [cx + rx, cy + ry]]))
        if box is None:
            continue
        x, y = _canonical(view, *box)
        rho = np.sqrt(np.square((x - cx) / rx) + np.square((y - cy) / ry))
        wing = np.clip((1.0 - rho) / 0.05, 0, 1)
        crest = np.exp(-np.square((rho - 0.97) / 0.035)) * np.clip((cy - y) / (0.6 * ry), 0.0, 1.0)
        bone[box] += density * (0.03 * wing + 0.06 * crest)


# Attenuation-like level of detector area behind the collimator blades: above any anatomy (the densest
# bone of the heaviest patient reaches about 2.0), and the same for every patient.
_UNEXPOSED = 2.4


def _collimated(view: _View) -> np.ndarray:
    """1 inside the collimated field, 0 behind the blades, with a two-pixel penumbra.

    Why the phantom has it: a lateral lumbar film is collimated to the spine, and the unexposed margins
    are the brightest thing on it. Without them the densest bone was the white point of every window
    (ours and `to_model_input`'s percentile stretch), so a less dense spine brightened the soft tissue
    around it, and the explanation maps showed the model reading that instead of the bone. With them the
    white point is the same for every patient and bone density shows where the bone is."""
    top, bottom, left, right = view.blades
    field = np.zeros((view.height, view.width), np.float32)
    field[top: view.height - bottom, left: view.width - right] = 1.0
    return ndimage.gaussian_filter(field, 2.0, mode="nearest")


def _render(patient: _Patient, view: _View, rng: np.random.Generator, with_mask: bool = False
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Image in [0, 1] (bone bright) and, optionally, the masks of L1-L5 trabecular bone and of every
    vertebral body (T12-S1, shells included: where an explanation should point)."""
    shape = (view.height, view.width)
    bone = np.zeros(shape, np.float32)
    mask = np.zeros(shape, bool) if with_mask else None
    bodies = np.zeros(shape, bool) if with_mask else None
    for body in patient.bodies:
        _render_body(body, view, bone, mask, bodies)
    _overlay_bones(patient, view, bone)
    img = _soft_tissue(rng, patient, view) + view.bone_gain * bone

    # Acquisition: scatter flattens contrast, the blades stop the beam outside the field, the focal spot and
    # detector blur, photons are counted.
    img = (1.0 - view.scatter) * img + view.scatter * _blur_large(img, 40.0)
    field = _collimated(view)
    img = field * img + (1.0 - field) * _UNEXPOSED
    if with_mask:  # anatomy behind the blades is not on the film
        mask &= field > 0.5
        bodies &= field > 0.5
    quantum = view.noise * (0.6 + 0.5 * np.clip(img, 0.0, 2.0))
    img = img + quantum * rng.standard_normal(shape, dtype=np.float32)
    img = ndimage.gaussian_filter(img, view.blur_px, mode="nearest")

    # Processing: dynamic range compression (subtract a share of the large-scale signal, as multi-scale
    # processing in digital radiography does), edge enhancement, window/level from the histogram, gamma.
    img = img - view.equalize * _blur_large(img, 30.0)
    if view.sharpen > 0:
        img = img + view.sharpen * (img - ndimage.gaussian_filter(img, view.sharpen_px, mode="nearest"))
    lo, hi = np.percentile(img[::3, ::3], (view.window[0], 99.9))
    hi += view.window[1] * (hi - lo)
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0.0, 1.0) ** view.gamma
    return img.astype(np.float32), mask, bodies


def _encode_png(img: np.ndarray, sixteen_bit: bool) -> bytes:
    """PNG bytes at 8 or 16 bits, full range."""
    if sixteen_bit:
        pil = Image.fromarray(np.round(img * 65535.0).astype(np.uint16))  # mode I;16
    else:
        pil = Image.fromarray(np.round(img * 255.0).astype(np.uint8))  # mode L
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=3)  # level 6 is slower and barely smaller on noisy images
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One rendered view, for previews and tests."""

    image: np.ndarray  # float32 in [0, 1], bone bright
    trabecular_mask: np.ndarray | None  # L1-L5 trabecular bone (inside the shells), when asked for
    patient_id: str
    view: int
    t_score: float
    label: str
    quality: float  # visible bone quality q the image was drawn from
    fractures: int
    sixteen_bit: bool
    site: str = "A"
    sex: str = "F"
    age: int = 0
    body_mask: np.ndarray | None = None  # every vertebral body, shells included (T12-S1), when asked for


def _demographics(seed: int, index: int, t_score: float) -> tuple[str, int]:
    """Sex and age of patient `index`, from a stream of their own (so the images never change with them).

    Age falls with T (about 4 years per T unit) as bone density does with age; most referred patients
    are women. Only the manifest carries them: the subgroup tables of site validation read them."""
    rng = np.random.default_rng([seed, index, 0, 1])
    sex = "F" if rng.random() < 0.8 else "M"
    age = int(np.clip(round(rng.normal(66.0 - 4.0 * (t_score + 2.0), 7.0)), 40, 95))
    return sex, age


def _patient(seed: int, index: int, cfg: PhantomConfig) -> _Patient:
    """Patient `index` of the set drawn with `seed`: its own random stream, so adding patients never
    changes earlier ones."""
    return _sample_patient(np.random.SeedSequence([seed, index]), f"p{index:04d}", cfg)


def _view_sample(patient: _Patient, seed: int, index: int, k: int, cfg: PhantomConfig, with_mask: bool) -> Sample:
    """Render view `k` (1-based) of a patient."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, k]))
    view = _sample_view(rng, patient, cfg)
    img, mask, bodies = _render(patient, view, rng, with_mask)
    sex, age = _demographics(seed, index, patient.t_score)
    return Sample(image=img, trabecular_mask=mask, patient_id=patient.patient_id, view=k, t_score=patient.t_score,
                  label=label_for(patient.t_score), quality=patient.quality, fractures=patient.fractures,
                  sixteen_bit=view.sixteen_bit, site=cfg.site, sex=sex, age=age, body_mask=bodies)


def iter_samples(n: int, seed: int = 0, config: PhantomConfig = DEFAULT_CONFIG, with_mask: bool = False
                 ) -> Iterator[Sample]:
    """Yield `n` rendered views, patient by patient (1-3 views each), deterministically per seed.
    This is exactly what `generate_dataset` writes, without touching the disk."""
    produced, index = 0, 0
    while produced < n:
        index += 1
        patient = _patient(seed, index, config)
        views = int(np.random.default_rng([seed, index, 0]).integers(config.views[0], config.views[1] + 1))
        for k in range(1, min(views, n - produced) + 1):
            produced += 1
            yield _view_sample(patient, seed, index, k, config, with_mask)


NORMAL_T = 0.0  # the young-adult mean a T-score is measured from: bone that is neither thin nor dense


def render_view(patient_id: str, view: int, seed: int, config: PhantomConfig = DEFAULT_CONFIG,
                t_score: float | None = None) -> Sample:
    """View `view` of patient `patient_id` ("p0007") of the set written with `seed`, with its masks: the
    same pixels `generate_dataset` wrote, plus where the vertebral bodies are (what explanations are
    checked against). `t_score`: the same patient, pose and exposure with bone of that density instead (and
    the fractures that density would have had): the neutral fill of the explanations' deletion test."""
    index = int(patient_id.lstrip("p"))
    if t_score is not None:
        config = replace(config, t_mean=t_score, t_sd=0.0, t_min=min(config.t_min, t_score),
                         t_max=max(config.t_max, t_score))
    return _view_sample(_patient(seed, index, config), seed, index, view, config, with_mask=True)


def render_sample(t_score: float, seed: int = 0, config: PhantomConfig = DEFAULT_CONFIG) -> Sample:
    """Render one view of a patient with a given T-score (everything else random from `seed`).

    Anatomy, pose and acquisition depend on `seed` only, so calls that differ only in `t_score` show the
    same patient with different bone: that is how the tests check the signal is graded with T."""
    cfg = replace(config, t_mean=t_score, t_sd=0.0, t_min=min(config.t_min, t_score), t_max=max(config.t_max, t_score))
    return _view_sample(_patient(seed, 0, cfg), seed, 0, 1, cfg, with_mask=True)


def provenance(folder: Path) -> dict:
    """What `osteoscreen synth` recorded about this data folder ({} when it did not write it)."""
    try:
        found = json.loads((Path(folder) / PROVENANCE).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def is_phantom_set(folder: Path) -> bool:
    """Whether `osteoscreen synth` wrote this data folder (its provenance file says so)."""
    return bool(provenance(folder).get("synthetic"))


def _check_target(out: Path) -> None:
    """Refuse any folder where writing could overwrite or mix with existing data."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder; choose an empty folder for a new synthetic set")
    if (out / MANIFEST).exists():
        raise DataError(f"{out / MANIFEST} already exists; choose an empty folder for a new synthetic set "
                        "(nothing was written)")
    for label in LABELS:
        folder = out / label
        if folder.is_dir() and any(folder.iterdir()):
            raise DataError(f"{folder} already contains files; choose an empty folder for a new synthetic set "
                            "(nothing was written)")
        if folder.exists() and not folder.is_dir():
            raise DataError(f"{folder} exists and is not a folder; choose an empty folder")


def generate_dataset(out: Path, n: int, seed: int = 0, config: PhantomConfig = DEFAULT_CONFIG) -> Path:
    """Write `n` labelled phantom radiographs under `out` and return the path of `out/manifest.csv`.

    Images go to `out/normal/` and `out/osteoporosis/`; the manifest lists
    `path,label,patient_id,t_score,site,sex,age,bits` with paths relative to `out`. Files are first written
    to a staging folder inside `out` and moved into place at the end, and the manifest is written last, so
    an interrupted run leaves no half set behind that looks complete. Same seed and config give
    byte-identical files.
    """
    from tqdm import tqdm

    out = Path(out)
    if n < 2:
        raise DataError(f"a synthetic set needs at least 2 images (--n), got {n}")
    _check_target(out)
    staging = out / ".synth-staging"
    if staging.exists():
        shutil.rmtree(staging)  # our own leftover from an interrupted run
    for label in LABELS:
        (staging / label).mkdir(parents=True)

    rows: list[tuple[str, ...]] = []
    for sample in tqdm(iter_samples(n, seed, config), total=n, desc="synth", unit="img"):
        rel = f"{sample.label}/{sample.patient_id}_v{sample.view}.png"
        (staging / rel).write_bytes(_encode_png(sample.image, sample.sixteen_bit))
        rows.append((rel, sample.label, sample.patient_id, f"{sample.t_score:.2f}", sample.site, sample.sex,
                     str(sample.age), "16" if sample.sixteen_bit else "8"))

    for label in LABELS:
        (out / label).mkdir(exist_ok=True)
        for f in sorted((staging / label).iterdir()):
            os.replace(f, out / label / f.name)
    shutil.rmtree(staging)

    (out / PROVENANCE).write_text(json.dumps({"generator": "osteoscreen synth", "synthetic": True, "version": VERSION,
                                                "n": n, "seed": seed}))
    manifest = out / MANIFEST
    tmp = out / (MANIFEST + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(MANIFEST_HEADER)
        writer.writerows(rows)
    os.replace(tmp, manifest)
    return manifest


def contact_sheet(out_png: Path, n_per_class: int = 4, seed: int = 0, config: PhantomConfig = DEFAULT_CONFIG) -> Path:
    """Save a grid of phantom views, one row per class, spread over each class's T range.

    Meant for the docs and for eyeballing the phantom after changing a knob."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Drawing patients is cheap; rendering is not. Pick first, render only the picks.
    pool: dict[str, list[tuple[float, int]]] = {label: [] for label in LABELS}
    index = 0
    while min(len(v) for v in pool.values()) < 4 * n_per_class and index < 400 * n_per_class:
        index += 1
        patient = _patient(seed, index, config)
        pool[label_for(patient.t_score)].append((patient.t_score, index))
    fig = Figure(figsize=(2.4 * n_per_class, 5.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, n_per_class, squeeze=False)
    for row, label in enumerate(LABELS):
        chosen = sorted(pool[label])
        if not chosen:  # a config whose population never reaches this class
            for ax in axes[row]:
                ax.set_axis_off()
            continue
        picks = [chosen[round(i * (len(chosen) - 1) / max(n_per_class - 1, 1))][1] for i in range(n_per_class)]
        for ax, index in zip(axes[row], picks):
            s = _view_sample(_patient(seed, index, config), seed, index, 1, config, with_mask=False)
            ax.imshow(s.image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="lanczos")
            extra = f", {s.fractures} fx" if s.fractures else ""
            ax.set_title(f"{label}\nT = {s.t_score:+.2f}{extra}", fontsize=9)
            ax.set_axis_off()
    fig.suptitle("OsteoScreen synthetic lateral lumbar spine phantom (osteoporosis: T <= -2.5)", fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    return out_png

"""Evaluate a folder of results against a folder of references: CSV of metrics plus a grid image.

Files are matched by stem (``face01.png`` in results pairs with ``face01.jpg`` in references).
A pair that cannot be compared (size mismatch, unreadable file, missing partner) gets its error in
the CSV's ``error`` column and the others go on. PSNR/SSIM honour ``crop_border``; LPIPS and the
identity distance use the whole image. LPIPS is left blank when its weights are not installed,
the identity distance when dlib is not; a warning says why.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..model_files import ModelLocator, headless_locator
from ..progress import progress_bar

# The CLI half is torch-free (so `priorface --help` stays instant) and re-exported from here.
from .evaluate_cli import METRICS, add_evaluate_parser, run_evaluate_cli
from .grid import fit_within, make_grid, to_pil
from .psnr_ssim import format_psnr, psnr, ssim

log = logging.getLogger(__name__)

VALUE_COLUMNS = ("psnr", "ssim", "psnr_y", "ssim_y", "lpips", "identity_distance")
COLUMNS = ("file", *VALUE_COLUMNS, "error")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MEAN_ROW = "mean"

__all__ = ["METRICS", "add_evaluate_parser", "evaluate_folders", "pair_metrics", "run_evaluate_cli"]


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file as RGB float ``[1,3,H,W]`` in [0, 1]."""
    with Image.open(path) as im:
        arr = np.array(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).float() / 255.0


def _images_by_stem(folder: Path) -> tuple[dict[str, Path], dict[str, str]]:
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    found: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            found.setdefault(p.stem, []).append(p)
    unique = {stem: paths[0] for stem, paths in found.items() if len(paths) == 1}
    clashes = {
        stem: f"several files share this stem in {folder}: {', '.join(p.name for p in paths)}"
        for stem, paths in found.items()
        if len(paths) > 1
    }
    return unique, clashes


def match_by_stem(
    results_dir: str | Path, references_dir: str | Path
) -> list[tuple[str, Path | None, Path | None, str]]:
    """(stem, result, reference, error) for every stem in either folder, sorted by stem."""
    results, res_clash = _images_by_stem(Path(results_dir))
    refs, ref_clash = _images_by_stem(Path(references_dir))
    out = []
    for stem in sorted(set(results) | set(refs) | set(res_clash) | set(ref_clash)):
        res, ref = results.get(stem), refs.get(stem)
        error = res_clash.get(stem) or ref_clash.get(stem) or ""
        if not error and ref is None:
            error = f"no reference image with stem '{stem}' in {references_dir}"
        elif not error and res is None:
            error = f"no result image with stem '{stem}' in {results_dir}"
        out.append((stem, res, ref, error))
    return out


def check_same_size(result: torch.Tensor, reference: torch.Tensor, name: str = "") -> None:
    """Raise ValueError naming both sizes when two BCHW images differ in height or width."""
    if result.shape[-2:] != reference.shape[-2:]:
        rh, rw = result.shape[-2:]
        fh, fw = reference.shape[-2:]
        where = f"{name}: " if name else ""
        raise ValueError(
            f"{where}result is {rw}x{rh} (WxH) but reference is {fw}x{fh}; "
            "metrics need the same size (resize or crop the result first)"
        )


def pair_metrics(
    result: torch.Tensor,
    reference: torch.Tensor,
    metrics: Iterable[str] = METRICS,
    crop_border: int = 0,
    lpips_model: torch.nn.Module | None = None,
    num_jitters: int = 0,
) -> dict[str, float]:
    """Metrics of one ``[1,3,H,W]`` result against its reference; only the requested ones."""
    check_same_size(result, reference)
    wanted = set(metrics)
    values: dict[str, float] = {}
    for name, fn, y in (
        ("psnr", psnr, False),
        ("ssim", ssim, False),
        ("psnr_y", psnr, True),
        ("ssim_y", ssim, True),
    ):
        if name in wanted:
            values[name] = float(fn(result, reference, crop_border, y_channel=y)[0])
    if "lpips" in wanted and lpips_model is not None:
        from .lpips import lpips_distance

        values["lpips"] = lpips_distance(lpips_model, result, reference)[0]
    if "identity" in wanted:
        from .identity import identity_distance

        values["identity_distance"], _ = identity_distance(result, reference, num_jitters)
    return values


def _check_metrics(metrics: Sequence[str]) -> list[str]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metric(s) {unknown or metrics!r}; expected some of {', '.join(METRICS)}")
    return list(metrics)


def _optional_models(
    metrics: Sequence[str], locator: ModelLocator | None
) -> tuple[torch.nn.Module | None, list[str]]:
    """Load LPIPS if asked and possible; drop metrics whose files or libraries are missing."""
    metrics = list(metrics)
    lpips_model = None
    if "lpips" in metrics:
        from .lpips import LPIPSWeightsMissing, load_lpips

        try:
            lpips_model = load_lpips(locator if locator is not None else headless_locator())
        except LPIPSWeightsMissing as e:
            log.warning("LPIPS column left blank: %s", e)
            metrics.remove("lpips")
    if "identity" in metrics:
        from .identity import identity_available

        if not identity_available():
            log.warning("identity_distance column left blank: dlib / face_recognition_models not installed")
            metrics.remove("identity")
    return lpips_model, metrics


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return "inf" if math.isinf(value) else f"{value:.6f}"


def mean_row(rows: Sequence[dict]) -> dict:
    """Mean of each value column over the rows that have it; the error column counts failures."""
    out: dict = {"file": MEAN_ROW}
    for col in VALUE_COLUMNS:
        vals = [r[col] for r in rows if r.get(col) is not None]
        out[col] = float(np.mean(vals)) if vals else None
    failed = sum(1 for r in rows if r.get("error"))
    out["error"] = f"{failed} of {len(rows)} file(s) failed" if failed else ""
    return out


def write_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Write metric rows (dicts keyed by COLUMNS) to CSV; missing values are blank."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in rows:
            writer.writerow(
                [r.get("file", "")] + [_fmt(r.get(c)) for c in VALUE_COLUMNS] + [r.get("error", "")]
            )
    return path


def describe_values(row: dict) -> str:
    """One line such as 'PSNR 24.77  SSIM 0.6827  LPIPS 0.2100  ID 0.412' for the present values."""
    parts = []
    for col, label, fmt in (
        ("psnr", "PSNR", format_psnr),
        ("ssim", "SSIM", "{:.4f}".format),
        ("psnr_y", "PSNR-Y", format_psnr),
        ("ssim_y", "SSIM-Y", "{:.4f}".format),
        ("lpips", "LPIPS", "{:.4f}".format),
        ("identity_distance", "ID", "{:.3f}".format),
    ):
        if row.get(col) is not None:
            parts.append(f"{label} {fmt(row[col])}")
    return "  ".join(parts)


def evaluate_folders(
    results_dir: str | Path,
    references_dir: str | Path,
    out_csv: str | Path,
    grid_path: str | Path | None = None,
    metrics: Sequence[str] = METRICS,
    crop_border: int = 0,
    locator: ModelLocator | None = None,
    num_jitters: int = 0,
    grid_cell: int | None = 256,
) -> list[dict]:
    """Compare results with references by file stem; write the CSV (and grid); return the rows."""
    wanted = _check_metrics(metrics)
    pairs = match_by_stem(results_dir, references_dir)
    if not pairs:
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {results_dir} or {references_dir}"
        )
    lpips_model, wanted = _optional_models(wanted, locator)
    rows, grid_rows, grid_labels = [], [], []
    with progress_bar(len(pairs), "PriorFace evaluate") as bar:
        for stem, res_path, ref_path, error in pairs:
            row: dict = {"file": res_path.name if res_path else (ref_path.name if ref_path else stem)}
            if not error:
                try:
                    result, reference = load_image(res_path), load_image(ref_path)
                    if grid_path is not None:
                        grid_rows.append(
                            [fit_within(to_pil(reference), grid_cell), fit_within(to_pil(result), grid_cell)]
                        )
                    row.update(pair_metrics(result, reference, wanted, crop_border, lpips_model, num_jitters))
                except (ValueError, OSError) as e:
                    error = str(e)
                if grid_path is not None and len(grid_rows) > len(grid_labels):
                    grid_labels.append(
                        f"{row['file']}  (reference | result)\n{describe_values(row) or error}"
                    )
            if error:
                log.warning("%s: %s", row["file"], error)
            row["error"] = error
            rows.append(row)
            bar.update(1)
    rows.append(mean_row(rows))
    write_csv(rows, out_csv)
    if grid_path is not None:
        if grid_rows:
            make_grid(grid_rows, grid_labels).save(grid_path)
        else:
            log.warning("no image pair could be read; grid %s not written", grid_path)
    return rows

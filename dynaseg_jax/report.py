"""``dynaseg report OUT``: one self-contained HTML page for an output folder.

The page shows the run's config, a summary, and one row per image: the image, its
overlay and its label map in colour (thumbnails inlined as ``data:`` URIs, so the file
can be mailed or opened offline; no network, no external script), then its status,
iterations, clusters, k_min, seconds and, when a dataset with ground truth is named, its
scores (``evaluate.evaluate_predictions``' per-image values). Every column sorts on a click
(a few lines of inline JavaScript).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from . import images as imio
from .outputs import CONFIG, one_record_per_image, read_all_records

REPORT = "report.html"
THUMB_WIDTH = 160  # thumbnails fit a box of this width and 3/4 of it in height


def _data_uri(rgb: np.ndarray, width: int, fmt: str) -> str:
    """A thumbnail that fits ``width`` x ``3/4 width`` as a data URI (JPEG for photos,
    PNG for labels, whose flat colours JPEG would smear); never enlarged."""
    img = Image.fromarray(rgb)
    factor = min(width / img.width, 0.75 * width / img.height)
    if factor < 1:
        size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
        resample = Image.NEAREST if fmt == "PNG" else Image.BILINEAR
        img = img.resize(size, resample)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def _source_image(record: dict, dataset, dataset_ids: set) -> np.ndarray | None:
    """The input image of a record: its file, or the dataset's image of that id."""
    source = str(record.get("source") or "")
    try:
        if dataset is not None and record.get("stem") in dataset_ids:
            return imio.as_float_image(dataset.load_image(record["stem"]))
        if source and os.path.isfile(source):
            return imio.load_image(source)
    except (ValueError, OSError):
        return None
    return None


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def build_report(out_dir: str | os.PathLike, dataset: str | None = None, root: str | None = None,
                 split: str | None = None, html_path: str | os.PathLike | None = None,
                 thumb_width: int = THUMB_WIDTH) -> Path:
    """Writes the report page of a ``dynaseg segment`` output folder.

    Args:
      out_dir: the output folder (results files, label maps, overlays, config.toml).
      dataset, root, split: optionally the dataset the images came from (as given to
        ``dynaseg segment --dataset``): adds per-image scores and the input images of
        dataset ids.
      html_path: where to write (default ``OUT/report.html``); written atomically.
      thumb_width: thumbnail width in pixels.

    Returns:
      The path of the page.

    Raises:
      ValueError: ``out_dir`` has no results file.
    """
    out = Path(out_dir)
    if (out / "sweep.json").is_file():
        return _sweep_report(out, dataset, root, split, html_path, thumb_width)
    records = one_record_per_image(read_all_records(out))
    if not records:
        raise ValueError(f"{out}: no results (results.jsonl) to report")
    ds, ds_ids, scores = None, set(), {}
    if dataset:
        from .datasets import open_dataset
        from .evaluate import evaluate_predictions
        ds = open_dataset(dataset, root, split)
        ds_ids = set(ds.ids())
        result = evaluate_predictions(dataset, root, split, out, on_failure="record")  # the page still comes
        scores = result.get("per_image", {})
    score_cols = [("best_overlap", "best-overlap mIoU"), ("hungarian", "Hungarian mIoU")] if scores else []

    rows = []
    for r in sorted(records, key=lambda r: str(r.get("stem") or r.get("file"))):
        stem = r.get("stem")
        cells = {}
        image = _source_image(r, ds, ds_ids)
        cells["image"] = (f'<img src="{_data_uri(_to_uint8(image), thumb_width, "JPEG")}" alt="image">'
                          if image is not None else "—")
        overlay_path, labels_path = out / f"{stem}_overlay.png", out / f"{stem}.png"
        cells["overlay"] = cells["labels"] = "—"
        error = r.get("error")
        if r.get("status") == "ok" and overlay_path.is_file() and labels_path.is_file():
            try:
                with imio.open_image(overlay_path) as img:
                    imio.decode_now(img, overlay_path)
                    overlay = np.asarray(img.convert("RGB"))
                labels = imio.read_labels(labels_path)
            except imio.ImageError as e:  # a damaged file: its row says so, the page is written
                error = str(e)
            else:
                colors = imio.label_colors(int(labels.max()) + 1)[labels]
                cells["overlay"] = f'<img src="{_data_uri(overlay, thumb_width, "JPEG")}" alt="overlay">'
                cells["labels"] = f'<img src="{_data_uri(colors, thumb_width, "PNG")}" alt="labels">'
        values = {"name": str(stem or r.get("file")), "status": r.get("status"),
                  "iterations": r.get("iterations"), "clusters": r.get("clusters"), "k_min": r.get("k_min"),
                  "seconds": r.get("seconds")}
        for key, _ in score_cols:
            values[key] = scores.get(str(stem), {}).get(key)
        rows.append((cells, values, error))

    columns = [("name", "name"), ("status", "status"), ("iterations", "iterations"), ("clusters", "clusters"),
               ("k_min", "k_min"), ("seconds", "seconds")] + score_cols
    ok = [v for _, v, _ in rows if v["status"] == "ok"]

    def mean(key):
        vals = [v[key] for v in ok if isinstance(v.get(key), (int, float)) and not math.isnan(v[key])]
        return sum(vals) / len(vals) if vals else None

    summary = [("images", len(rows)), ("ok", len(ok)), ("errors", len(rows) - len(ok)),
               ("mean iterations", _fmt(mean("iterations"), 1)), ("mean clusters", _fmt(mean("clusters"), 1)),
               ("total seconds", _fmt(sum(v["seconds"] or 0 for v in ok), 1))]
    for key, title in score_cols:
        summary.append((f"mean {title} (per image)", _fmt(mean(key))))
    if dataset:
        summary.append(("dataset", f"{dataset} {split or ''}".strip()))
    config_text = (out / CONFIG).read_text() if (out / CONFIG).is_file() else "(no config.toml)"

    head = "".join(f'<th data-col="{i + 3}">{html.escape(title)}</th>' for i, (_, title) in enumerate(columns))
    body = []
    for cells, values, error in rows:
        tds = [f'<td>{cells["image"]}</td>', f'<td>{cells["overlay"]}</td>', f'<td>{cells["labels"]}</td>']
        for key, _ in columns:
            v = values.get(key)
            sort = "" if v is None or (isinstance(v, float) and math.isnan(v)) else html.escape(str(v), quote=True)
            text = html.escape(_fmt(v, 1 if key == "seconds" else 3))
            if key == "status" and error:
                text = f'<span title="{html.escape(str(error), quote=True)}">{text}</span>'
            tds.append(f'<td data-sort="{sort}">{text}</td>')
        body.append(f'<tr class="{html.escape(str(values["status"]))}">{"".join(tds)}</tr>')
    page = _PAGE.format(
        title=html.escape(f"dynaseg report: {out.resolve().name}"),
        folder=html.escape(str(out.resolve())),
        summary="".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary),
        head=head, body="\n".join(body), config=html.escape(config_text),
        images_head="<th>image</th><th>overlay</th><th>labels</th>", section="Images", plot="",
        config_title="Config")
    path = Path(html_path) if html_path else out / REPORT
    imio.write_text_atomic(path, page)
    return path


def _sweep_report(out: Path, dataset, root, split, html_path, thumb_width) -> Path:
    """The page of a ``dynaseg sweep`` folder: its table (one sortable row per setting,
    linking to that setting's own report, written too), its plot, the base config."""
    report = json.loads((out / "sweep.json").read_text())
    rows = report["settings"]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f'<th data-col="{i}">{html.escape(c)}</th>' for i, c in enumerate(columns))
    body = []
    for row in rows:
        if (out / row["setting"]).is_dir() and row.get("images"):
            build_report(out / row["setting"], dataset, root, split, thumb_width=thumb_width)
        tds = []
        for c in columns:
            v = row.get(c)
            text = json.dumps(v) if isinstance(v, (list, tuple)) else _fmt(v)
            sort = "" if v is None or (isinstance(v, float) and math.isnan(v)) else html.escape(
                json.dumps(v) if isinstance(v, (list, tuple)) else str(v), quote=True)
            cell = html.escape(text)
            if c == "setting" and (out / v / REPORT).is_file():
                cell = f'<a href="{html.escape(v, quote=True)}/{REPORT}">{cell}</a>'
            tds.append(f'<td data-sort="{sort}">{cell}</td>')
        body.append(f'<tr class="ok">{"".join(tds)}</tr>')
    plot = ""
    if (out / "sweep.png").is_file():
        data = base64.b64encode((out / "sweep.png").read_bytes()).decode("ascii")
        plot = f'<h2>Plot</h2><img src="data:image/png;base64,{data}" alt="sweep plot">'
    grid = "; ".join(f"{k} = {', '.join(json.dumps(v) for v in vals)}" for k, vals in report["grid"].items())
    summary = [("settings", len(rows)), ("grid", grid), ("scale", report.get("scale")),
               ("pairs segmented (last run)", report.get("segmented")), ("failed", report.get("failed"))]
    first = out / rows[0]["setting"] / CONFIG if rows else None
    config_text = first.read_text() if first is not None and first.is_file() else "(no config.toml)"
    page = _PAGE.format(
        title=html.escape(f"dynaseg sweep report: {out.resolve().name}"), folder=html.escape(str(out.resolve())),
        summary="".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary),
        head=head, body="\n".join(body), config=html.escape(config_text), images_head="",
        section="Settings (a setting's name opens its images)", plot=plot,
        config_title=f"Config of the first setting ({html.escape(rows[0]['setting']) if rows else ''})")
    path = Path(html_path) if html_path else out / REPORT
    imio.write_text_atomic(path, page)
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table.grid {{ border-collapse: collapse; }}
table.grid th, table.grid td {{ border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right; vertical-align: middle; }}
table.grid th[data-col] {{ cursor: pointer; background: #f3f3f3; position: sticky; top: 0; }}
table.grid th[data-col]:hover {{ background: #e4e4e4; }}
table.grid img {{ display: block; margin: auto; }}
table.grid td:has(img), table.grid th:not([data-col]) {{ text-align: center; }}
tr.error td {{ background: #fff0f0; }}
table.summary th {{ text-align: left; padding-right: 1em; font-weight: normal; color: #555; }}
pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; }}
</style></head>
<body>
<h1>{title}</h1>
<p>Output folder: <code>{folder}</code>. Click a column title to sort by it.</p>
<table class="summary">{summary}</table>
<h2>{section}</h2>
<table class="grid" id="images">
<thead><tr>{images_head}{head}</tr></thead>
<tbody>
{body}
</tbody></table>
{plot}
<h2>{config_title}</h2>
<pre>{config}</pre>
<script>
document.querySelectorAll("#images th[data-col]").forEach(function (th) {{
  th.addEventListener("click", function () {{
    var col = Number(th.dataset.col), body = document.querySelector("#images tbody");
    var asc = th.dataset.dir !== "asc"; th.dataset.dir = asc ? "asc" : "desc";
    var rows = Array.from(body.rows);
    rows.sort(function (a, b) {{
      var x = a.cells[col].dataset.sort, y = b.cells[col].dataset.sort;
      if (x === "" || y === "") return (x === "") - (y === "");
      var nx = Number(x), ny = Number(y), c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
      return asc ? c : -c;
    }});
    rows.forEach(function (r) {{ body.appendChild(r); }});
  }});
}});
</script>
</body></html>
"""

"""``dynaseg report``: the page parsed as HTML, its numbers checked against the folder and
against scores computed here from the ground truth."""
from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import numpy as np
from PIL import Image

from dynaseg_jax import images as imio
from dynaseg_jax import metrics
from dynaseg_jax.cli import main
from dynaseg_jax.config import Config, config_digest, to_toml
from tests.test_datasets import make_bsds


class Page(HTMLParser):
    """Rows of the images table: each a list of (data-sort, text, [decoded images])."""

    def __init__(self):
        super().__init__()
        self.rows, self.headers, self.row_classes, self.pre = [], [], [], ""
        self._in_table = self._in_pre = False
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "images":
            self._in_table = True
        elif self._in_table and tag == "tr" and a.get("class") is not None:
            self.rows.append([])
            self.row_classes.append(a["class"])
        elif self._in_table and tag == "th" and "data-col" in a:
            self.headers.append(int(a["data-col"]))
        elif self._in_table and tag == "td" and self.rows:
            self._cell = [a.get("data-sort"), "", []]
            self.rows[-1].append(self._cell)
        elif tag == "img" and self._cell is not None:
            head, data = a["src"].split(",", 1)
            assert head in ("data:image/png;base64", "data:image/jpeg;base64")
            self._cell[2].append(Image.open(io.BytesIO(base64.b64decode(data))))
        elif tag == "pre":
            self._in_pre = True

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        elif tag == "td":
            self._cell = None
        elif tag == "pre":
            self._in_pre = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data
        if self._in_pre:
            self.pre += data


def fake_run(tmp_path):
    """A fake BSDS500 val split of 3 images and an output folder with predictions for
    two of them (ok) and one error record, as ``dynaseg segment --dataset`` writes it."""
    root = tmp_path / "bsds"
    made = make_bsds(root, "val", ids=("11", "22", "33"), n_ann=(2, 3, 2))
    out = tmp_path / "out"
    out.mkdir()
    config = Config()
    digest = config_digest(config)
    imio.write_text_atomic(out / "config.toml", to_toml(config, "test\n"))
    rng = np.random.default_rng(0)
    preds = {}
    for id_ in ("11", "22"):
        rgb, _ = made[id_]
        pred = rng.integers(0, 4, rgb.shape[:2]).astype(np.int32)
        preds[id_] = imio.renumber(pred)
        imio.save_labels(out / f"{id_}.png", preds[id_])
        imio.save_overlay(out / f"{id_}_overlay.png", rgb / 255.0, preds[id_])
        imio.append_jsonl(out / "results.jsonl", {
            "file": id_, "source": f"bsds500:{root}:val:{id_}", "stem": id_, "status": "ok", "error": None,
            "height": rgb.shape[0], "width": rgb.shape[1], "iterations": 10 + int(id_), "clusters": 4,
            "k_min": 3, "seconds": 1.5, "config": digest})
    imio.append_jsonl(out / "results.jsonl", {
        "file": "33", "source": f"bsds500:{root}:val:33", "stem": "33", "status": "error",
        "error": "33: diverged", "iterations": 2, "config": digest})
    return root, made, out, preds


def test_report_page(tmp_path, capsys):
    root, made, out, preds = fake_run(tmp_path)
    assert main(["report", str(out), "--dataset", "bsds500", "--root", str(root), "--split", "val"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out / 'report.html'}"
    page = Page()
    page.feed((out / "report.html").read_text())
    assert len(page.rows) == 3 and page.row_classes == ["ok", "ok", "error"]
    assert page.headers == list(range(3, 3 + 8))  # name..seconds + 2 scores, all sortable
    assert "[model]" in page.pre and 'name = "cnn"' in page.pre  # the run's config
    for row, id_ in zip(page.rows[:2], ("11", "22")):
        image, overlay, labels = (cell[2] for cell in row[:3])
        h, w = made[id_][0].shape[:2]
        for thumb in (image[0], overlay[0], labels[0]):
            assert thumb.size == (w, h)  # small images are not enlarged
        # The label colours: one colour per label of the prediction.
        colors = np.asarray(labels[0].convert("RGB")).reshape(-1, 3)
        assert len(np.unique(colors, axis=0)) == len(np.unique(preds[id_]))
        name, status, iterations = row[3][1], row[4][1], row[5][0]
        assert (name, status, iterations) == (id_, "ok", str(10 + int(id_)))
        # Scores against the ground truth, computed here.
        anns = made[id_][1]
        ious = np.concatenate([metrics.overlap_scores(preds[id_], a)[0] for a in anns])
        hung = np.mean([metrics.overlap_scores(preds[id_], a)[1] for a in anns])
        assert abs(float(row[9][0]) - ious.mean()) < 1e-12 and abs(float(row[10][0]) - hung) < 1e-12
    error_row = page.rows[2]
    # A failed image: its input shows, no overlay or labels; the error is the status's title.
    assert [len(c[2]) for c in error_row[:3]] == [1, 0, 0] and error_row[4][1] == "error"


def test_damaged_overlay_marks_its_row(tmp_path, capsys):
    # One unreadable overlay: the page is still written, that row has no thumbnails and
    # its status carries the file's one-line error; the other rows keep theirs.
    root, made, out, preds = fake_run(tmp_path)
    (out / "22_overlay.png").write_bytes(b"junk")
    assert main(["report", str(out), "--dataset", "bsds500", "--root", str(root), "--split", "val"]) == 0
    text = (out / "report.html").read_text()
    page = Page()
    page.feed(text)
    assert [[len(c[2]) for c in row[:3]] for row in page.rows] == [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert "22_overlay.png: not an image file" in text and capsys.readouterr().err == ""


def test_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"dynaseg: error: {tmp_path}: no results (results.jsonl) to report"

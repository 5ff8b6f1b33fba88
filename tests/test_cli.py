"""End to end: `dynaseg segment` on a folder of good and bad files, then a resume."""
import json
import sys

import numpy as np
import pytest
from PIL import Image

from dynaseg_jax.cli import main
from tests.conftest import smooth_image

TINY = ["channels=16", "n_clusters=16", "max_iters=8", "bucket_multiple=8", "max_pixels=5000"]
REQUIRED = {"file", "height", "width", "iterations", "clusters", "k_min", "seconds", "status", "error"}


def u8(img):
    return (img * 255).astype(np.uint8)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(u8(smooth_image(20, 30, 0))).save(d / "good.png")
    Image.fromarray(u8(smooth_image(30, 20, 1))).save(d / "sub" / "portrait.jpg", quality=95)
    Image.fromarray(u8(smooth_image(20, 30, 2))[..., 0]).save(d / "gray.png")
    rgba = np.dstack([u8(smooth_image(20, 30, 3)), np.full((20, 30), 128, np.uint8)])
    Image.fromarray(rgba).save(d / "rgba.png")
    Image.fromarray(u8(smooth_image(20, 30, 4))).convert("P").save(d / "palette.png")
    Image.fromarray((smooth_image(20, 30, 5)[..., 0] * 65535).astype(np.uint16)).save(d / "deep16.png")
    (d / "notes.jpg").write_text("this is not a jpeg")
    full = d / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(full)
    (d / "truncated.jpg").write_bytes(full.read_bytes()[:300])
    full.unlink()
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(d / "dot.png")
    Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(d / "huge.png")  # > max_pixels
    return d


GOOD = {"good", "portrait", "gray", "rgba", "palette", "deep16"}
BAD = {"notes": "not an image", "truncated": "truncated or corrupt", "dot": "1x1", "huge": "max_pixels"}


def test_segment_folder_end_to_end(folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["segment", str(folder), "--out", str(out), "--batch", "2", "--no-progress",
                 "--set", *TINY])
    assert code == 1  # some images failed
    err = capsys.readouterr().err
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == len(GOOD) + len(BAD)
    by_stem = {r["stem"]: r for r in records}
    for r in records:
        assert REQUIRED <= set(r)
    for stem in GOOD:
        r = by_stem[stem]
        assert r["status"] == "ok" and r["error"] is None
        labels = np.asarray(Image.open(out / f"{stem}.png"))
        assert labels.dtype == np.uint16
        assert labels.shape == (r["height"], r["width"])
        assert (r["height"], r["width"]) == ((30, 20) if stem == "portrait" else (20, 30))
        np.testing.assert_array_equal(np.unique(labels), np.arange(r["clusters"]))
        assert 1 <= r["iterations"] <= 8 and r["k_min"] == 3
        assert Image.open(out / f"{stem}_overlay.png").size == (r["width"], r["height"])
    for stem, words in BAD.items():
        r = by_stem[stem]
        assert r["status"] == "error" and words in r["error"] and stem in r["error"]
        assert stem in err
        assert not (out / f"{stem}.png").exists()

    # Rerun: nothing finished is redone; a lost output is redone.
    (out / "good.png").unlink()
    code = main(["segment", str(folder), "--out", str(out), "--batch", "2", "--no-progress",
                 "--set", *TINY])
    assert code == 1
    summary = capsys.readouterr().out
    assert f"1 segmented, {len(GOOD) - 1} already done, {len(BAD)} failed" in summary
    assert (out / "good.png").exists()


def test_segment_silhouette_and_clean_exit(tmp_path, capsys):
    img = tmp_path / "one.png"
    Image.fromarray(u8(smooth_image(20, 30, 6))).save(img)
    out = tmp_path / "out"
    code = main(["segment", str(img), "--out", str(out), "--no-progress", "--config", "dynaseg_fsf_silhouette",
                 "--set", *TINY, "silhouette_k_range=[2, 5]"])
    assert code == 0
    (r,) = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert r["status"] == "ok" and 2 <= r["k_min"] <= 5


def test_config_errors_exit_cleanly(tmp_path, capsys):
    code = main(["segment", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "bogus=1"])
    assert code == 2
    assert "unknown field(s) bogus" in capsys.readouterr().err


def test_hugepages_reexec_is_conditional(monkeypatch):
    from dynaseg_jax import runtime
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("DYNASEG_REEXECED", raising=False)
    monkeypatch.setenv("DYNASEG_HUGEPAGES", "1")
    assert runtime.hugepages_wanted() == sys.platform.startswith("linux")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")  # the user's choice wins
    assert not runtime.hugepages_wanted()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("DYNASEG_HUGEPAGES", "0")
    assert not runtime.hugepages_wanted()

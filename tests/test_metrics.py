"""Tests of dynaseg_jax.metrics: hand-worked examples and brute-force references.

The references below loop over labels and pixels in plain Python, sharing no code with the
vectorised implementation (no contingency matrix, no scipy assignment).
"""
import itertools
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dynaseg_jax import metrics as m

# ---------------------------------------------------------------- brute-force references


def ref_contingency(pred, gt, ignore=()):
    g_labels = sorted({int(v) for v in gt.ravel() if int(v) not in ignore})
    keep = [(int(g), int(p)) for g, p in zip(gt.ravel(), pred.ravel()) if int(g) not in ignore]
    p_labels = sorted({p for _, p in keep})
    counts = np.zeros((len(g_labels), len(p_labels)), np.int64)
    for g, p in keep:
        counts[g_labels.index(g), p_labels.index(p)] += 1
    return counts, g_labels, p_labels


def ref_iou(pred, gt, g, p, ignore=()):
    inter = union = 0
    for gv, pv in zip(gt.ravel(), pred.ravel()):
        if int(gv) in ignore:
            continue
        a, b = gv == g, pv == p
        inter += a and b
        union += a or b
    return inter / union if union else 0.0


def ref_best_overlap(pred, gt, ignore=()):
    _, g_labels, p_labels = ref_contingency(pred, gt, ignore)
    return np.array([max(ref_iou(pred, gt, g, p, ignore) for p in p_labels) for g in g_labels])


def ref_hungarian(pred, gt, ignore=()):
    """Exhaustive search over all one-to-one matchings (fine for <= 5 labels a side)."""
    _, g_labels, p_labels = ref_contingency(pred, gt, ignore)
    if not g_labels:
        return float("nan")
    iou = [[ref_iou(pred, gt, g, p, ignore) for p in p_labels] for g in g_labels]
    best = 0.0
    k = min(len(g_labels), len(p_labels))
    for gs in itertools.combinations(range(len(g_labels)), k):
        for ps in itertools.permutations(range(len(p_labels)), k):
            best = max(best, sum(iou[a][b] for a, b in zip(gs, ps)))
    return best / len(g_labels)


def ref_bsds(per_image):
    all_, fine, coarse = [], [], []
    for anns in per_image:
        for a in anns:
            all_.extend(a)
        sizes = [len(a) for a in anns]
        fine.extend(anns[sizes.index(max(sizes))])
        coarse.extend(anns[sizes.index(min(sizes))])
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"all": mean(all_), "fine": mean(fine), "coarse": mean(coarse),
            "mean": (mean(all_) + mean(fine) + mean(coarse)) / 3}


def ref_components(pred, connectivity):
    h, w = pred.shape
    comp = -np.ones((h, w), int)
    steps = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    if connectivity == 8:
        steps += [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    n = 0
    for i in range(h):
        for j in range(w):
            if comp[i, j] >= 0:
                continue
            comp[i, j] = n
            queue = deque([(i, j)])
            while queue:
                a, b = queue.popleft()
                for da, db in steps:
                    y, x = a + da, b + db
                    if 0 <= y < h and 0 <= x < w and comp[y, x] < 0 and pred[y, x] == pred[a, b]:
                        comp[y, x] = n
                        queue.append((y, x))
            n += 1
    return comp


def canonical(labels):
    """Renumbers labels by first appearance in raster order (partition identity)."""
    mapping = {}
    return np.array([mapping.setdefault(int(v), len(mapping)) for v in labels.ravel()]).reshape(labels.shape)


def ref_coco_matching(pred, gt, ignore=255):
    """The cluster -> class map of maximal matched pixel count, and whether it is unique."""
    counts, g_labels, p_labels = ref_contingency(pred, gt, (ignore,))
    k = min(len(g_labels), len(p_labels))
    scored = []
    for gs in itertools.combinations(range(len(g_labels)), k):
        for ps in itertools.permutations(range(len(p_labels)), k):
            scored.append((sum(counts[a, b] for a, b in zip(gs, ps)),
                           {p_labels[b]: g_labels[a] for a, b in zip(gs, ps)}))
    best = max(score for score, _ in scored)
    maps = [mp for score, mp in scored if score == best]
    return maps[0], all(mp == maps[0] for mp in maps)


def ref_coco(pairs, num_classes=27, ignore=255):
    conf = np.zeros((num_classes, num_classes + 1), np.int64)
    for pred, gt in pairs:
        best_map, _ = ref_coco_matching(pred, gt, ignore)
        for g, p in zip(gt.ravel(), pred.ravel()):
            if g == ignore:
                continue
            conf[g, best_map.get(int(p), num_classes)] += 1
    ious = []
    for c in range(num_classes):
        tp = conf[c, c]
        union = conf[c].sum() + conf[:, c].sum() - tp
        ious.append(tp / union if union else np.nan)
    ious = np.array(ious)
    return {"miou": np.nanmean(ious), "things": np.nanmean(ious[:12]) if np.isfinite(ious[:12]).any() else np.nan,
            "stuff": np.nanmean(ious[12:]) if np.isfinite(ious[12:]).any() else np.nan,
            "pixel_accuracy": sum(conf[c, c] for c in range(num_classes)) / conf.sum()}


# ---------------------------------------------------------------- contingency


def test_contingency_hand_worked():
    gt = np.array([[1, 1, 2], [2, 2, 9]])
    pred = np.array([[5, 7, 7], [5, 5, 5]])
    counts, g_labels, p_labels = m.contingency(pred, gt, return_labels=True)
    assert g_labels.tolist() == [1, 2, 9] and p_labels.tolist() == [5, 7]
    np.testing.assert_array_equal(counts, [[1, 1], [2, 1], [1, 0]])
    counts = m.contingency(pred, gt, ignore=9)
    np.testing.assert_array_equal(counts, [[1, 1], [2, 1]])


def test_contingency_rejects_shape_mismatch_and_float_labels():
    with pytest.raises(ValueError, match="resize_prediction"):
        m.contingency(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="integer"):
        m.contingency(np.full((2, 2), 0.5), np.zeros((2, 2), int))


@pytest.mark.parametrize("seed", range(5))
def test_contingency_matches_reference(seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 5, (7, 9))
    gt[rng.random(gt.shape) < 0.2] = 255
    pred = rng.integers(-3, 40, (7, 9))
    counts, g_labels, p_labels = m.contingency(pred, gt, ignore=255, return_labels=True)
    ref, ref_g, ref_p = ref_contingency(pred, gt, (255,))
    np.testing.assert_array_equal(counts, ref)
    assert g_labels.tolist() == ref_g and p_labels.tolist() == ref_p


# ---------------------------------------------------------------- best overlap and BSDS modes


def test_best_overlap_hand_worked():
    gt = np.array([[1, 1], [2, 2]])
    pred = np.array([[0, 0], [0, 1]])
    # segment 1: IoU with label 0 = 2/3; segment 2: IoU with 0 = 1/4, with 1 = 1/2
    np.testing.assert_allclose(m.best_overlap_ious(pred, gt), [2 / 3, 1 / 2])


def test_best_overlap_ignore_removes_pixels_from_predicted_areas():
    gt = np.array([[0, 0, 255, 1]])
    pred = np.array([[3, 3, 1, 1]])
    # Without 255: label 1 covers 2 pixels, one of them void -> IoU 1/2 for segment 1.
    np.testing.assert_allclose(m.best_overlap_ious(pred, gt, ignore_labels=(255,)), [1.0, 1.0])
    np.testing.assert_allclose(m.best_overlap_ious(pred, gt), [1.0, 0.5, 0.5])
    assert m.best_overlap_ious(pred, np.full((1, 4), 255), ignore_labels=(255,)).size == 0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.data())
def test_best_overlap_and_hungarian_match_reference(h, w, data):
    gt = data.draw(arrays(np.int64, (h, w), elements=st.integers(0, 3)))
    pred = data.draw(arrays(np.int64, (h, w), elements=st.integers(0, 4)))
    np.testing.assert_allclose(m.best_overlap_ious(pred, gt), ref_best_overlap(pred, gt))
    assert m.hungarian_miou(pred, gt) == pytest.approx(ref_hungarian(pred, gt))


@pytest.mark.parametrize("seed", range(4))
def test_best_overlap_with_ignore_matches_reference(seed):
    rng = np.random.default_rng(100 + seed)
    gt = rng.integers(0, 6, (8, 11))
    gt[rng.random(gt.shape) < 0.3] = 255
    pred = rng.integers(0, 9, (8, 11))
    np.testing.assert_allclose(m.best_overlap_ious(pred, gt, ignore_labels=(255,)),
                               ref_best_overlap(pred, gt, (255,)))


def test_bsds_scores_hand_worked():
    per_image = [
        [np.array([1.0, 0.5]), np.array([0.2]), np.array([0.4, 0.4, 0.4])],
        [np.array([0.9]), np.array([0.3, 0.1])],
    ]
    s = m.bsds_scores(per_image)
    assert s["all"] == pytest.approx(4.2 / 9)  # mean over the 9 segments, not over images
    assert s["fine"] == pytest.approx((0.4 * 3 + 0.3 + 0.1) / 5)
    assert s["coarse"] == pytest.approx((0.2 + 0.9) / 2)
    assert s["mean"] == pytest.approx((4.2 / 9 + 0.32 + 0.55) / 3)
    assert (s["segments_all"], s["segments_fine"], s["segments_coarse"]) == (9, 5, 2)


def test_bsds_scores_ties_take_first_annotation():
    s = m.bsds_scores([[np.array([0.1, 0.1]), np.array([0.9, 0.9])]])
    assert s["fine"] == pytest.approx(0.1) and s["coarse"] == pytest.approx(0.1)


def test_bsds_scores_empty_is_nan():
    s = m.bsds_scores([])
    assert np.isnan(s["all"]) and np.isnan(s["mean"])


@pytest.mark.parametrize("seed", range(3))
def test_bsds_pipeline_matches_reference(seed):
    rng = np.random.default_rng(seed)
    per_image, ref_per_image = [], []
    for _ in range(3):
        pred = rng.integers(0, 6, (6, 7))
        anns = [rng.integers(1, 1 + rng.integers(1, 6), (6, 7)) for _ in range(rng.integers(2, 5))]
        per_image.append(m.bsds_image_ious(pred, anns))
        ref_per_image.append([list(ref_best_overlap(pred, a)) for a in anns])
    got, ref = m.bsds_scores(per_image), ref_bsds(ref_per_image)
    for key in ("all", "fine", "coarse", "mean"):
        assert got[key] == pytest.approx(ref[key])


# ---------------------------------------------------------------- Hungarian


def test_hungarian_hand_worked():
    gt = np.array([[0, 0, 1, 1]])
    assert m.hungarian_miou(np.array([[5, 5, 5, 7]]), gt) == pytest.approx((2 / 3 + 1 / 2) / 2)
    # more clusters than classes: the surplus clusters stay unmatched
    assert m.hungarian_miou(np.array([[1, 2, 3, 4]]), gt) == pytest.approx(0.5)
    # fewer clusters than classes: the unmatched class scores 0
    assert m.hungarian_miou(np.array([[0, 0, 0, 0]]), gt) == pytest.approx(0.25)
    assert m.hungarian_miou(gt, gt) == pytest.approx(1.0)


def test_hungarian_ignore():
    gt = np.array([[0, 0, 255, 1]])
    assert m.hungarian_miou(np.array([[3, 3, 1, 1]]), gt, ignore=255) == pytest.approx(1.0)
    assert np.isnan(m.hungarian_miou(np.zeros((1, 4), int), np.full((1, 4), 255), ignore=255))


@pytest.mark.parametrize("n_pred", [2, 3, 5])
def test_hungarian_rectangular_matches_reference(n_pred):
    rng = np.random.default_rng(n_pred)
    for _ in range(5):
        gt = rng.integers(0, 3, (5, 6))
        gt[0, 0] = 255
        pred = rng.integers(0, n_pred, (5, 6))
        assert m.hungarian_miou(pred, gt, ignore=255) == pytest.approx(ref_hungarian(pred, gt, (255,)))


# ---------------------------------------------------------------- connected components


def test_relabel_connected_hand_worked():
    pred = np.array([[0, 1, 0],
                     [0, 1, 0],
                     [1, 1, 1]])
    out = m.relabel_connected(pred)
    assert out.dtype == np.int32 and np.unique(out).size == 3  # left 0s, right 0s, the 1s
    assert out[0, 0] == out[1, 0] != out[0, 2]
    diag = np.array([[2, 3], [3, 2]])
    assert np.unique(m.relabel_connected(diag, connectivity=4)).size == 4
    assert np.unique(m.relabel_connected(diag, connectivity=8)).size == 2
    with pytest.raises(ValueError):
        m.relabel_connected(diag, connectivity=6)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_relabel_connected_matches_flood_fill(connectivity):
    rng = np.random.default_rng(connectivity)
    for _ in range(5):
        pred = rng.integers(0, 3, (9, 12)) * 7 - 5
        out = m.relabel_connected(pred, connectivity)
        np.testing.assert_array_equal(canonical(out), canonical(ref_components(pred, connectivity)))
        assert sorted(np.unique(out).tolist()) == list(range(np.unique(out).size))


# ---------------------------------------------------------------- resizing


def test_resize_prediction_nearest():
    pred = np.array([[1, 2], [3, 4]])
    np.testing.assert_array_equal(m.resize_prediction(pred, (4, 4)),
                                  np.kron(pred, np.ones((2, 2), int)))
    big = np.arange(16).reshape(4, 4)
    np.testing.assert_array_equal(m.resize_prediction(big, (2, 2)), [[5, 7], [13, 15]])
    assert m.resize_prediction(pred, (2, 2)) is pred  # already the right size: untouched
    np.testing.assert_array_equal(m.resize_prediction(np.array([[0, 1, 2]]), (1, 5)), [[0, 0, 1, 2, 2]])


def test_resize_prediction_transposed_raises():
    with pytest.raises(ValueError, match="transposed"):
        m.resize_prediction(np.zeros((3, 5), int), (5, 3))
    with pytest.raises(ValueError, match="transposed"):  # a rescaled transpose, e.g. 321x481 at half size
        m.resize_prediction(np.zeros((160, 240), int), (481, 321))
    assert m.resize_prediction(np.zeros((4, 4), int), (4, 4)).shape == (4, 4)  # square: nothing to detect
    assert m.resize_prediction(np.zeros((240, 160), int), (481, 321)).shape == (481, 321)


# ---------------------------------------------------------------- COCO-Stuff-27


def test_coco_hand_worked_things_stuff():
    acc = m.CocoStuffAccumulator()
    acc.add(np.array([[7, 7, 7, 9]]), np.array([[0, 0, 12, 12]]))
    r = acc.result()
    # cluster 7 -> class 0 (2 px), cluster 9 -> class 12 (1 px); IoU_0 = 2/3, IoU_12 = 1/2
    assert r["things"] == pytest.approx(2 / 3)
    assert r["stuff"] == pytest.approx(1 / 2)
    assert r["miou"] == pytest.approx(7 / 12)
    assert r["pixel_accuracy"] == pytest.approx(3 / 4)
    assert np.isnan(r["per_class_iou"][5]) and r["images"] == 1


def test_coco_unmatched_cluster_counts_as_error_and_ignore():
    acc = m.CocoStuffAccumulator()
    acc.add(np.array([[1, 2, 2, 2, 4]]), np.array([[12, 12, 12, 12, 255]]))
    r = acc.result()
    # cluster 2 -> class 12; cluster 1 is unmatched: its pixel is a miss, not a false positive
    assert r["miou"] == pytest.approx(3 / 4) and r["stuff"] == pytest.approx(3 / 4)
    assert np.isnan(r["things"])
    assert r["pixel_accuracy"] == pytest.approx(3 / 4) and r["pixels"] == 4


def test_coco_rejects_bad_classes():
    with pytest.raises(ValueError, match="outside"):
        m.CocoStuffAccumulator().add(np.zeros((2, 2), int), np.full((2, 2), 30))


def test_coco_matches_reference():
    rng = np.random.default_rng(7)
    acc = m.CocoStuffAccumulator()
    pairs = []
    while len(pairs) < 6:
        classes = rng.choice(27, size=3, replace=False)
        gt = classes[rng.integers(0, 3, (6, 8))]
        gt[rng.random(gt.shape) < 0.1] = 255
        # fewer, as many and more clusters than classes
        pred = rng.integers(0, [2, 3, 5][len(pairs) % 3], (6, 8)) + 100
        if not ref_coco_matching(pred, gt)[1]:
            continue  # tied optimal matchings: either is right, so the scores may differ
        pairs.append((pred, gt))
        acc.add(pred, gt)
    got, ref = acc.result(), ref_coco(pairs)
    for key in ("miou", "things", "stuff", "pixel_accuracy"):
        assert got[key] == pytest.approx(ref[key], nan_ok=True)


def test_overlap_scores_equals_separate_functions():
    rng = np.random.default_rng(3)
    for _ in range(5):
        gt = rng.integers(0, 4, (7, 9))
        gt[0] = 255
        pred = rng.integers(0, 6, (7, 9))
        ious, h = m.overlap_scores(pred, gt, ignore=255)
        np.testing.assert_allclose(ious, m.best_overlap_ious(pred, gt, ignore_labels=(255,)))
        assert h == pytest.approx(m.hungarian_miou(pred, gt, ignore=255))
    ious, h = m.overlap_scores(np.zeros((2, 2), int), np.full((2, 2), 255), ignore=255)
    assert ious.size == 0 and np.isnan(h)


def test_bootstrap_interval_two_images_is_exact():
    # Two images: a resample is (0, 0), (0, 1), (1, 0) or (1, 1), each with probability
    # 1/4, so the 2.5% and 97.5% quantiles of 2000 resamples are the all-one-image scores.
    from dynaseg_jax.metrics import bootstrap_interval, bsds_scores
    low_img = [np.array([0.1, 0.2]), np.array([0.3])]
    high_img = [np.array([0.8]), np.array([0.6, 0.9, 0.7])]
    lo, hi = bootstrap_interval([low_img, high_img])
    assert lo == pytest.approx(bsds_scores([low_img, low_img])["all"])
    assert hi == pytest.approx(bsds_scores([high_img, high_img])["all"])
    assert bootstrap_interval([low_img, high_img], seed=3) == bootstrap_interval([low_img, high_img], seed=3)
    # Paired: a method against itself differs by exactly 0 in every resample.
    assert bootstrap_interval([low_img, high_img], [low_img, high_img]) == (0.0, 0.0)
    # Shifted by +0.1 on every segment: the paired difference is +0.1 whatever the resample.
    shifted = [[a + 0.1 for a in anns] for anns in (low_img, high_img)]
    lo, hi = bootstrap_interval(shifted, [low_img, high_img])
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    with pytest.raises(ValueError, match="the same images"):
        bootstrap_interval([low_img], [low_img, high_img])

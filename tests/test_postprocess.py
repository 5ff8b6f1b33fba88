"""Post-processing of label maps: connected regions, small-region merging."""
import numpy as np
import pytest

from dynaseg_jax.config import Config, ConfigError
from dynaseg_jax.metrics import relabel_connected
from dynaseg_jax.postprocess import merge_small_regions, postprocess, region_adjacency


def merge_brute_force(regions, image, min_pixels):
    """The same rule, recomputed from the label map after every merge: sizes, means and
    neighbours by scanning every pixel."""
    current = np.array(regions)
    while True:
        ids = np.unique(current)
        if ids.size == 1:
            break
        sizes = {int(i): int(np.sum(current == i)) for i in ids}
        small = [i for i in sorted(sizes) if sizes[i] < min_pixels]
        if not small:
            break
        i = min(small, key=lambda k: (sizes[k], k))
        touching = set()
        for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
            for y, x in zip(*np.nonzero(current == i)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < current.shape[0] and 0 <= xx < current.shape[1] and current[yy, xx] != i:
                    touching.add(int(current[yy, xx]))
        mean = image[current == i].mean(0)
        j = min(sorted(touching), key=lambda k: float(np.sum((image[current == k].mean(0) - mean) ** 2)))
        current[current == i] = j
    return np.unique(current, return_inverse=True)[1].reshape(current.shape)


def test_small_region_joins_the_closest_colour():
    image = np.zeros((4, 6, 3))
    image[:, 3:] = 1.0
    image[1, 2:4] = 0.3  # a 2-pixel region, closer in colour to the left half
    regions = np.zeros((4, 6), int)
    regions[:, 3:] = 1
    regions[1, 2:4] = 2
    got = merge_small_regions(regions, image, min_pixels=3)
    want = np.zeros((4, 6), int)
    want[:, 3:] = 1
    want[1, 3] = 0
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(merge_small_regions(regions, image, min_pixels=2), regions)


@pytest.mark.parametrize("seed, min_pixels", [(0, 4), (1, 9), (2, 30), (3, 1000)])
def test_merging_matches_brute_force(seed, min_pixels):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, (12, 15))
    labels[rng.random((12, 15)) < 0.5] = 0  # some large regions beside many small ones
    image = rng.random((12, 15, 3))
    regions = relabel_connected(labels)
    got = merge_small_regions(regions, image, min_pixels)
    np.testing.assert_array_equal(got, merge_brute_force(regions, image, min_pixels))
    sizes = np.bincount(got.ravel())
    assert sizes.min() >= min(min_pixels, got.size)
    # Every region stays connected and is a union of the regions it started from.
    np.testing.assert_array_equal(relabel_connected(got), got)
    for r in np.unique(regions):
        assert np.unique(got[regions == r]).size == 1


def test_adjacency_is_four_neighbour():
    regions = np.array([[0, 1], [2, 0]])  # 0's two pixels touch only diagonally
    assert region_adjacency(regions) == [{1, 2}, {0}, {0}]


def test_postprocess_follows_the_config():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, (10, 10))
    image = rng.random((10, 10, 3))
    np.testing.assert_array_equal(postprocess(labels, image, Config()), labels)
    connected = Config().replace({"postprocess.connected": True})
    np.testing.assert_array_equal(postprocess(labels, image, connected), relabel_connected(labels))
    merged = postprocess(labels, image, connected.replace({"postprocess.min_region": 0.05}))
    assert np.bincount(merged.ravel()).min() >= 5  # ceil(0.05 * 100)
    with pytest.raises(ConfigError, match="postprocess.min_region = 0.05: merges connected regions; set "
                                          "postprocess.connected = true"):
        Config().replace({"postprocess.min_region": 0.05})
    with pytest.raises(ConfigError, match=r"postprocess.min_region = 1.0: a fraction of the image, in \[0, 1\)"):
        connected.replace({"postprocess.min_region": 1.0})

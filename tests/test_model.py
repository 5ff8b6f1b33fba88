"""The network: PyTorch init, masked BatchNorm, conv formulations, exact padding."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynaseg_jax.models.cnn import DynaSegCNN
from dynaseg_jax.models.conv3x3 import CONV3X3, conv3x3_im2col, conv3x3_winograd, pad_about_edge
from dynaseg_jax.models.layers import Conv, MaskedBatchNorm
from tests.conftest import smooth_image


def cnn_conv(impl, precision=None):
    """The conv layer the CNN is given for a formulation, as ``models.cnn.build`` makes it."""
    return functools.partial(Conv, conv3x3=CONV3X3[impl], precision=precision)


def test_torch_default_init_bounds():
    model = DynaSegCNN(channels=20, max_clusters=10, n_conv=2)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((8, 8, 3)), jnp.ones((8, 8)))["params"]
    for name, fan_in in [("conv0", 27), ("conv1", 180), ("classifier", 20)]:
        bound = 1 / np.sqrt(fan_in)
        for leaf in (params[name]["kernel"], params[name]["bias"]):
            leaf = np.asarray(leaf)
            assert np.abs(leaf).max() <= bound
            # Uniform on [-b, b]: the extremes are reached (lecun_normal would exceed b;
            # zeros would not reach it).
            assert np.abs(leaf).max() > 0.8 * bound
    np.testing.assert_array_equal(params["bn0"]["scale"], 1.0)
    np.testing.assert_array_equal(params["bn0"]["bias"], 0.0)


def test_masked_batch_norm_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(5, 6, 4)).astype(np.float32)
    mask = (rng.random((5, 6)) < 0.7).astype(np.float32)
    bn = MaskedBatchNorm()
    variables = bn.init(jax.random.PRNGKey(0), jnp.asarray(x), jnp.asarray(mask))
    y = np.asarray(bn.apply(variables, jnp.asarray(x), jnp.asarray(mask)))
    sel = x[mask > 0]
    want = (x - sel.mean(0)) / np.sqrt(sel.var(0) + 1e-5)  # biased variance, as torch
    np.testing.assert_allclose(y[mask > 0], want[mask > 0], atol=1e-4)


def direct_conv_float64(x, k):
    """Brute-force zero-padded 3x3 correlation in float64 (the reference)."""
    x, k = np.asarray(x, np.float64), np.asarray(k, np.float64)
    h, w, _ = x.shape
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    return sum(xp[dy:dy + h, dx:dx + w] @ k[dy, dx] for dy in range(3) for dx in range(3))


@pytest.mark.parametrize("conv", [conv3x3_im2col, conv3x3_winograd])
@pytest.mark.parametrize("shape", [(7, 9), (8, 8), (5, 13), (1, 2)])
def test_conv_formulations_match_direct(conv, shape):
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape + (5,)).astype(np.float32)
    k = rng.normal(size=(3, 3, 5, 4)).astype(np.float32)
    want = direct_conv_float64(x, k)
    got = np.asarray(jax.jit(conv)(jnp.asarray(x), jnp.asarray(k)))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    lax_out = jax.lax.conv_general_dilated(jnp.asarray(x)[None], jnp.asarray(k), (1, 1), ((1, 1), (1, 1)),
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]
    np.testing.assert_allclose(lax_out, want, atol=1e-4)


def test_winograd_gradients_match_direct():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(10, 11, 6)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 6, 5)), jnp.float32)
    lax_conv = lambda x, k: jax.lax.conv_general_dilated(
        x[None], k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]
    loss = lambda f: jax.grad(lambda x, k: jnp.sum(jnp.sin(f(x, k))), argnums=(0, 1))(x, k)
    for got, want in zip(loss(conv3x3_winograd), loss(lax_conv)):
        got, want = np.asarray(got), np.asarray(want)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_winograd_gradients_under_vmap_match_direct():
    # The engine's vmap strategy batches the custom VJP over per-image inputs and kernels.
    rng = np.random.default_rng(3)
    xs = jnp.asarray(rng.normal(size=(3, 9, 6, 4)), jnp.float32)
    ks = jnp.asarray(rng.normal(size=(3, 3, 3, 4, 5)) / 6, jnp.float32)  # ~1/sqrt(fan_in)
    lax_conv = lambda x, k: jax.lax.conv_general_dilated(
        x[None], k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST)[0]
    grad = lambda f: jax.grad(lambda x, k: jnp.sum(jnp.cos(f(x, k))), argnums=(0, 1))
    got = jax.jit(jax.vmap(grad(conv3x3_winograd)))(xs, ks)
    for i in range(xs.shape[0]):
        alone = grad(conv3x3_winograd)(xs[i], ks[i])
        want = grad(lax_conv)(xs[i], ks[i])
        for g, a, w in zip(got, alone, want):
            g, a, w = np.asarray(g[i]), np.asarray(a), np.asarray(w)
            np.testing.assert_allclose(g, a, rtol=1e-5, atol=1e-6)
            assert np.linalg.norm(g - w) / np.linalg.norm(w) < 1e-5


@pytest.mark.parametrize("mode, numpy_mode", [("reflect", "reflect"), ("replicate", "edge")])
@pytest.mark.parametrize("real", [(5, 7), (8, 9), (2, 3)])
def test_pad_about_edge_is_numpy_pad_of_the_real_image(mode, numpy_mode, real):
    # A (5, 7) image in an (8, 9) bucket: the ring just past its real edge holds the
    # reflected/replicated pixels (a copy, so exact), whatever the bucket held.
    rng = np.random.default_rng(4)
    h, w = real
    x = np.zeros((8, 9, 2), np.float32)
    x[:h, :w] = rng.normal(size=(h, w, 2))
    mask = np.zeros((8, 9), bool)
    mask[:h, :w] = True
    got = np.asarray(jax.jit(pad_about_edge, static_argnums=2)(jnp.asarray(x), jnp.asarray(mask), mode))
    assert got.shape == (10, 11, 2)
    want = np.pad(x[:h, :w], ((1, 1), (1, 1), (0, 0)), mode=numpy_mode)
    np.testing.assert_array_equal(got[:h + 2, :w + 2], want)


@pytest.mark.parametrize("impl, padding", [("lax", "zeros"), ("im2col", "zeros"), ("winograd", "zeros"),
                                           ("lax", "reflect"), ("winograd", "replicate"),
                                           ("pallas", "zeros"), ("pallas", "reflect")])
def test_padding_does_not_change_response(impl, padding):
    model = DynaSegCNN(channels=8, max_clusters=6, n_conv=2, conv=cnn_conv(impl), padding=padding)
    img = smooth_image(10, 13, 0)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((8, 8, 3)), jnp.ones((8, 8)))
    want = model.apply(params, jnp.asarray(img), jnp.ones((10, 13)))
    padded = np.full((16, 16, 3), 0.7, np.float32)  # padding content must not matter
    padded[:10, :13] = img
    mask = np.zeros((16, 16), np.float32)
    mask[:10, :13] = 1
    got = model.apply(params, jnp.asarray(padded), jnp.asarray(mask))
    np.testing.assert_allclose(got[:10, :13], want, atol=1e-4)


def _product_precisions(model, params):
    """Precision names of every dot_general/convolution in the lowered gradient."""
    import re
    grad = jax.grad(lambda p: jnp.sum(model.apply(p, jnp.ones((8, 12, 3)), jnp.ones((8, 12)))))
    text = jax.jit(grad).lower(params).as_text()
    lines = [l for l in text.splitlines() if re.search(r"stablehlo\.(dot_general|convolution)", l)]
    assert lines
    return [re.findall(r"(DEFAULT|HIGHEST|HIGH)\b", l) for l in lines]


def test_pallas_bfloat16_products_take_bfloat16_operands():
    # The Pallas conv multiplies bfloat16 operands (summed in float32) under 'bfloat16',
    # and float32 ones exactly under 'float32', whatever jax_default_matmul_precision says.
    import re
    for precision, operand in (("float32", "f32"), ("bfloat16", "bf16")):
        model = DynaSegCNN(channels=16, max_clusters=8, conv=cnn_conv("pallas", precision))
        params = model.init(jax.random.PRNGKey(0), jnp.zeros((8, 8, 3)), jnp.ones((8, 8)))
        grad = jax.grad(lambda p: jnp.sum(model.apply(p, jnp.ones((8, 12, 3)), jnp.ones((8, 12)))))
        with jax.default_matmul_precision("bfloat16"):
            text = jax.jit(grad).lower(params).as_text()
        dots = [l for l in text.splitlines() if "stablehlo.dot_general" in l]
        # 3x3 kernels: forward, input and weight gradient of two convs, each a dot of
        # (rows, channels) tiles with the given operand type and exact products.
        kernel_dots = [l for l in dots if re.search(rf"tensor<\d+x\d+x{operand}>, tensor<\d+x\d+x{operand}>", l)]
        assert len(kernel_dots) >= 6 and all("HIGHEST" in l for l in kernel_dots), precision


@pytest.mark.parametrize("impl", ["lax", "im2col", "winograd"])
def test_matmul_precision_reaches_every_product(impl):
    # float32: every product (forward and backward) is exact; bfloat16: the products with
    # learned weights use the fast default, only the Winograd transforms stay exact.
    kinds = {}
    for precision in ("float32", "bfloat16"):
        model = DynaSegCNN(channels=16, max_clusters=8, conv=cnn_conv(impl, precision))
        params = model.init(jax.random.PRNGKey(0), jnp.zeros((8, 8, 3)), jnp.ones((8, 8)))
        kinds[precision] = _product_precisions(model, params)
    assert all(p == ["HIGHEST", "HIGHEST"] for p in kinds["float32"])
    fast = [p for p in kinds["bfloat16"] if p == ["DEFAULT", "DEFAULT"]]
    assert fast and all(p in (["DEFAULT", "DEFAULT"], ["HIGHEST", "HIGHEST"]) for p in kinds["bfloat16"])
    if impl != "winograd":
        assert len(fast) == len(kinds["bfloat16"])


def test_lab_input_matches_scikit_image():
    from tests.conftest import require
    skimage_color = require("skimage.color")
    from dynaseg_jax.models.inputs import rgb_to_lab
    rng = np.random.default_rng(6)
    rgb = rng.random((16, 20, 3)).astype(np.float32)
    rgb[0, :3] = [[0, 0, 0], [1, 1, 1], [0.01, 0.02, 0.005]]  # black, white, the linear segments
    ours = np.asarray(rgb_to_lab(jnp.asarray(rgb))) * np.array([100.0, 128.0, 128.0])
    want = skimage_color.rgb2lab(rgb.astype(np.float64))
    # a* = 500 (f(X) - f(Y)) with f ~ 1 after a handful of float32 operations (each
    # rounding <= u = 6e-8): |error| <~ 500 * 2 * 8u = 5e-4 in Lab units.
    np.testing.assert_allclose(ours, want, atol=5e-4)


def test_position_channels_follow_the_real_image():
    from dynaseg_jax.models.inputs import position_channels
    mask = np.zeros((8, 10), np.float32)
    mask[:5, :7] = 1
    pos = np.asarray(position_channels(jnp.asarray(mask), 2.0))
    np.testing.assert_allclose(pos[:5, 0, 0], np.linspace(0, 2, 5), rtol=1e-6)
    np.testing.assert_allclose(pos[0, :7, 1], np.linspace(0, 2, 7), rtol=1e-6)


def test_round_to_precision_by_hand():
    from dynaseg_jax.models.conv3x3 import round_to_precision
    e = 2.0 ** -23  # float32's last bit at 1
    x = np.array([1 + 2 ** -11, 1 + 2 ** -11 - e, -(1 + 2 ** -11), 2 - e, 1 + 3 * 2 ** -11,
                  np.inf, -np.inf, 3.0], np.float32)
    # TF32 keeps 10 bits (unit 2^-10 at 1); a tie (half a unit) rounds away from zero, and
    # 2 - e rounds up into the next binade.
    want_tf32 = np.array([1 + 2 ** -10, 1, -(1 + 2 ** -10), 2, 1 + 2 * 2 ** -10, np.inf, -np.inf, 3.0], np.float32)
    rounded = jax.jit(round_to_precision, static_argnums=1)  # compiled, as in a step
    np.testing.assert_array_equal(np.asarray(rounded(jnp.asarray(x), "tensorfloat32")), want_tf32)
    # bfloat16 keeps 7 bits (unit 2^-7); ties go to the even neighbour; the largest float32
    # rounds to infinity, as a conversion to bfloat16 does.
    y = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + e, -(1 + 3 * 2 ** -8), np.finfo(np.float32).max],
                 np.float32)
    want_bf16 = np.array([1, 1 + 2 ** -6, 1 + 2 ** -7, -(1 + 2 ** -6), np.inf], np.float32)
    np.testing.assert_array_equal(np.asarray(rounded(jnp.asarray(y), "bfloat16")), want_bf16)
    np.testing.assert_array_equal(np.asarray(jnp.asarray(y[:4]).astype(jnp.bfloat16).astype(jnp.float32)),
                                  want_bf16[:4])  # as JAX's own conversion
    np.testing.assert_array_equal(np.asarray(rounded(jnp.asarray(x), "float32")), x)
    # NaNs whose payload would carry into the sign bit stay NaN (not -0.0 or 0.0).
    nans = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000], np.uint32).view(np.float32)
    for precision in ("tensorfloat32", "bfloat16"):
        assert np.isnan(np.asarray(rounded(jnp.asarray(nans), precision))).all()


def _emulated_case(product, precision, seed, h, w, cin, cout):
    """A random conv case through ``emulated_products(product, precision)``: x, the
    kernel, dy, and the output and both gradients."""
    from dynaseg_jax.models.conv3x3 import emulated_products
    from tests.conv_reference import random_case
    rng = np.random.default_rng(seed)
    x, k = random_case(rng, h, w, cin, cout)
    g = rng.normal(size=(h, w, cout)).astype(np.float32)
    conv = emulated_products(product, precision)
    y, vjp = jax.vjp(lambda x, k: conv(x, k), jnp.asarray(x), jnp.asarray(k))
    return x, k, g, y, *vjp(jnp.asarray(g))


@pytest.mark.parametrize("precision", ["tensorfloat32", "bfloat16"])
def test_emulated_products_round_every_operand(precision):
    # Forward and both gradients equal float64 sums of the rounded operands (dy rounded
    # too), within float32's summation bound, and measurably differ from float32 products.
    from dynaseg_jax.models.conv3x3 import round_to_precision
    from tests.conv_reference import conv_float64, sum_bound, vjp_float64
    x, k, g, y, dx, dk = _emulated_case(conv3x3_im2col, precision, 7, 9, 8, 12, 6)
    r = lambda a: np.asarray(round_to_precision(jnp.asarray(a), precision), np.float64)
    want, squares = conv_float64(r(x), r(k))
    assert np.linalg.norm(np.asarray(y) - want) <= sum_bound(9 * 12, want, squares)
    dx_want, dx_sq, dk_want, dk_sq = vjp_float64(r(x), r(k), r(g))
    assert np.linalg.norm(np.asarray(dx) - dx_want) <= sum_bound(9 * 6, dx_want, dx_sq)
    assert np.linalg.norm(np.asarray(dk) - dk_want) <= sum_bound(9 * 8, dk_want, dk_sq)
    exact, exact_sq = conv_float64(x.astype(np.float64), k.astype(np.float64))
    assert np.linalg.norm(np.asarray(y) - exact) > 10 * sum_bound(9 * 12, exact, exact_sq)


def _winograd_tiles_rounded64(x, k, precision):
    """Winograd's forward in float64 from its float32 transformed tiles U and kernel V,
    rounded to ``precision``'s format (where a reduced-precision dot rounds them), and a
    worst-case bound on float32's error in what follows: the Cin-term tile products and
    the 36-term output transform (gamma_n <= 1.01 n U32 for these n)."""
    from dynaseg_jax.models import conv3x3 as c3
    from tests.conv_reference import U32
    h, w, cin = x.shape
    ht, wt = -(-h // 4), -(-w // 4)
    r = lambda a: np.asarray(c3.round_to_precision(jnp.asarray(a), precision), np.float64)
    u = r(c3._winograd_tiles(jnp.asarray(x), ht, wt))                          # (36, T, Cin)
    v = r(np.asarray(c3._WINO_KG) @ np.asarray(k, np.float32).reshape(9, -1)).reshape(36, cin, -1)
    m, m_abs = np.einsum("ptc,pcd->ptd", u, v), np.einsum("ptc,pcd->ptd", np.abs(u), np.abs(v))
    ka = np.asarray(c3._WINO_KA, np.float64)
    untile = lambda a: a.reshape(4, 4, ht, wt, -1).transpose(2, 0, 3, 1, 4).reshape(4 * ht, 4 * wt, -1)[:h, :w]
    y = untile(ka @ m.reshape(36, -1))
    bound = 1.01 * U32 * untile(np.abs(ka) @ (36 * np.abs(m) + cin * m_abs).reshape(36, -1))
    return y, bound


@pytest.mark.parametrize("precision", ["tensorfloat32", "bfloat16"])
def test_emulated_winograd_rounds_the_transformed_tiles(precision):
    # A Winograd conv's dots multiply the transformed tiles U = B^T d B and V = G g G^T, so
    # reduced-precision products round those, not x and the kernel. The emulation must do
    # the same: its output and input gradient (a Winograd conv of dy with the rotated
    # kernel) are float64 computations from the rounded tiles, within the worst-case
    # float32 bound; rounding x and the kernel instead is far outside it.
    from dynaseg_jax.models.conv3x3 import conv3x3_winograd, round_to_precision
    x, k, g, y, dx, dk = _emulated_case(conv3x3_winograd, precision, 11, 10, 9, 16, 8)
    want, bound = _winograd_tiles_rounded64(x, k, precision)
    assert np.all(np.abs(np.asarray(y) - want) <= bound)
    dx_want, dx_bound = _winograd_tiles_rounded64(g, k[::-1, ::-1].transpose(0, 1, 3, 2), precision)
    assert np.all(np.abs(np.asarray(dx) - dx_want) <= dx_bound)
    # The weight gradient: G^T [sum over tiles of U * (A dy A^T)] G, both factors rounded;
    # float32 errors in its tile sums (T terms) and the 36-term kernel transform.
    from dynaseg_jax.models import conv3x3 as c3
    from tests.conv_reference import U32
    ht, wt = 3, 3
    rnd = lambda a: round_to_precision(jnp.asarray(a), precision)
    u = np.asarray(rnd(c3._winograd_tiles(jnp.asarray(x), ht, wt)), np.float64)
    dm = np.asarray(rnd(c3._winograd_untile_transpose(jnp.asarray(g), ht, wt)), np.float64)
    dv, dv_abs = np.einsum("ptc,ptd->pcd", u, dm), np.einsum("ptc,ptd->pcd", np.abs(u), np.abs(dm))
    kg_t = np.abs(np.asarray(c3._WINO_KG, np.float64)).T
    dk_want = (np.asarray(c3._WINO_KG, np.float64).T @ dv.reshape(36, -1)).reshape(k.shape)
    dk_bound = 1.01 * U32 * (kg_t @ (36 * np.abs(dv) + ht * wt * dv_abs).reshape(36, -1)).reshape(k.shape)
    assert np.all(np.abs(np.asarray(dk) - dk_want) <= dk_bound)
    inputs_rounded = np.asarray(conv3x3_winograd(rnd(x), rnd(k), "float32"))
    assert np.max(np.abs(inputs_rounded - want) / bound) > 10


def test_emulated_precision_reaches_the_network():
    # The config switch reaches every conv of the CNN: emulated bfloat16 products change r'
    # (by about bfloat16's relative unit, 2^-8, far above float32 rounding); emulating
    # float32 changes nothing.
    from dynaseg_jax.config import Config
    from dynaseg_jax.models import build_model
    base = Config().replace({"model.channels": 8, "model.max_clusters": 6, "model.conv_impl": "im2col"})
    img, mask = jnp.asarray(smooth_image(10, 12, 1)), jnp.ones((10, 12))
    plain = build_model(base)
    params = plain.init(jax.random.PRNGKey(0), img, mask)
    out = lambda changes: np.asarray(build_model(base.replace(changes)).apply(params, img, mask))
    want = np.asarray(plain.apply(params, img, mask))
    np.testing.assert_array_equal(out({"model.emulate_precision": True}), want)
    rel = np.linalg.norm(out({"model.emulate_precision": True, "model.matmul_precision": "bfloat16"}) - want) \
        / np.linalg.norm(want)
    assert 2 ** -12 < rel < 2 ** -3


def test_padded_channels_compute_the_same_function():
    # Zero channels add exact zeros, so the padded product differs from the plain one only
    # by the order of float32 sums: within the sum bound of 9 * Cin terms. Its gradient is
    # the plain one's, and the parameters keep their shapes.
    from dynaseg_jax.models.layers import padded_channels
    from tests.conv_reference import conv_float64, random_case, sum_bound
    x, k = random_case(np.random.default_rng(8), 7, 9, 13, 11)
    padded = padded_channels(conv3x3_im2col, 8)
    y = np.asarray(padded(jnp.asarray(x), jnp.asarray(k), "float32"))
    want, squares = conv_float64(x.astype(np.float64), k.astype(np.float64))
    assert y.shape == want.shape and np.linalg.norm(y - want) <= sum_bound(9 * 13, want, squares)
    loss = lambda f: jax.grad(lambda k: jnp.sum(jnp.sin(f(jnp.asarray(x), k, "float32"))))(jnp.asarray(k))
    assert loss(padded).shape == k.shape
    # Both gradients are float32 sums over the 63 pixels of x cos(y), y within ~3e-6
    # relative of each other (above): 1e-4 leaves 30x for the sums' own rounding.
    np.testing.assert_allclose(loss(padded), loss(conv3x3_im2col), rtol=1e-4, atol=1e-5)
    # In the network, through the config: the same response.
    from dynaseg_jax.config import Config, ConfigError
    from dynaseg_jax.models import build_model
    base = Config().replace({"model.channels": 10, "model.max_clusters": 6, "model.conv_impl": "winograd"})
    img, mask = jnp.asarray(smooth_image(9, 12, 2)), jnp.ones((9, 12))
    params = build_model(base).init(jax.random.PRNGKey(0), img, mask)
    plain = np.asarray(build_model(base).apply(params, img, mask))
    eight = np.asarray(build_model(base.replace({"model.channel_multiple": 8})).apply(params, img, mask))
    # r' is BatchNorm-ed (unit variance): three layers of ~3e-6 relative differences, each
    # divided by a standard deviation of order 1, stay far below 1e-4.
    np.testing.assert_allclose(eight, plain, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="channel_multiple"):
        base.replace({"model.channel_multiple": 0})

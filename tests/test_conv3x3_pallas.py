"""The Pallas implicit-GEMM 3x3 conv: forward, custom VJP, vmap, precisions.

On CPU the kernels run in Pallas's interpreter; on a GPU the same tests run the
Triton-compiled kernels (``pytest tests/test_conv3x3_pallas.py`` on the GPU host).
Every reference is a float64 NumPy computation (tests/conv_reference.py).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynaseg_jax.models.conv3x3 import conv3x3_pallas
from tests.conv_reference import conv_float64, random_case, sum_bound, vjp_float64


# Shapes: one row block and several (block_rows 16 < (H+2)(W+2)); channel counts below,
# at and above the padding to a power of two, and above one channel block (64, or 16).
CASES = [((7, 9), 5, 4, 16, 64), ((5, 13), 3, 20, 128, 64), ((1, 2), 2, 3, 16, 64),
         ((12, 10), 20, 70, 32, 64), ((8, 5), 20, 33, 16, 16), ((6, 6), 16, 16, 16, 64)]


@pytest.mark.parametrize("shape, cin, cout, block_rows, block_channels", CASES)
def test_forward_matches_float64(shape, cin, cout, block_rows, block_channels):
    x, k = random_case(np.random.default_rng(0), *shape, cin, cout)
    conv = jax.jit(conv3x3_pallas, static_argnums=(2, 3, 4))
    got = np.asarray(conv(x, k, "float32", block_rows, block_channels))
    want, squares = conv_float64(x.astype(np.float64), k.astype(np.float64))
    assert got.shape == want.shape
    # Each output is a float32 sum of 9 * cin products (rounding each product adds one
    # U32 per term, inside the same bound's slack).
    assert np.linalg.norm(got - want) <= sum_bound(9 * cin, want, squares)


@pytest.mark.parametrize("shape, cin, cout, block_rows, block_channels", CASES[:5])
def test_vjp_under_vmap_matches_float64(shape, cin, cout, block_rows, block_channels):
    # The engine batches the custom VJP over per-image inputs and kernels: the image index
    # becomes a grid axis of each kernel. Each image is checked against its own float64 VJP.
    rng = np.random.default_rng(1)
    cases = [random_case(rng, *shape, cin, cout) for _ in range(3)]
    xs, ks = (np.stack(c) for c in zip(*cases))
    gs = rng.normal(size=xs.shape[:3] + (cout,)).astype(np.float32)

    def vjp(x, k, g):
        return jax.vjp(lambda x, k: conv3x3_pallas(x, k, "float32", block_rows, block_channels), x, k)[1](g)

    dxs, dks = jax.jit(jax.vmap(vjp))(xs, ks, gs)
    h, w = shape
    for i in range(3):
        dx, dx_sq, dk, dk_sq = vjp_float64(*(a[i].astype(np.float64) for a in (xs, ks, gs)))
        assert np.linalg.norm(np.asarray(dxs[i]) - dx) <= sum_bound(9 * cout, dx, dx_sq)
        assert np.linalg.norm(np.asarray(dks[i]) - dk) <= sum_bound(h * w, dk, dk_sq)


def test_tiles_must_be_powers_of_two():
    x, k = random_case(np.random.default_rng(4), 4, 4, 3, 3)
    with pytest.raises(ValueError, match="block_channels must be a power of two"):
        conv3x3_pallas(x, k, "float32", 16, 48)


def test_grad_of_a_loss_matches_lax():
    # Through jax.grad (custom_vjp with the precision and block size as static arguments),
    # against lax.conv's autodiff at strict float32.
    x, k = random_case(np.random.default_rng(2), 9, 11, 6, 5)
    lax_conv = lambda x, k: jax.lax.conv_general_dilated(
        x[None], k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision="float32")[0]
    pallas_conv = lambda x, k: conv3x3_pallas(x, k, "float32", 16)
    grad = lambda f: jax.grad(lambda x, k: jnp.sum(jnp.sin(f(x, k))), argnums=(0, 1))(x, k)
    for got, want in zip(grad(pallas_conv), grad(lax_conv)):
        # Both are float32 evaluations of the same sums (<= 9 * 6 terms for dx, 99 for dk):
        # relative error ~ LAMBDA U32 sqrt(99) ~ 2.4e-6 each, so 1e-5 for the difference.
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


def test_bfloat16_products_round_the_operands():
    # 'bfloat16': x and the kernel are rounded to bfloat16, products accumulate in float32.
    x, k = random_case(np.random.default_rng(3), 8, 10, 24, 8)
    got = np.asarray(conv3x3_pallas(x, k, "bfloat16", 16))
    round_bf16 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    want, squares = conv_float64(round_bf16(x), round_bf16(k))
    assert np.linalg.norm(got - want) <= sum_bound(9 * 24, want, squares)
    # ...and that is measurably not the float32 conv: rounding to bfloat16 (unit roundoff
    # 2^-9) moves each product by ~2^-9 relative, far above the float32 bound.
    exact, exact_squares = conv_float64(x.astype(np.float64), k.astype(np.float64))
    assert np.linalg.norm(got - exact) > 100 * sum_bound(9 * 24, exact, exact_squares)


@pytest.mark.parametrize("precision", ["float32", "tensorfloat32", "bfloat16"])
def test_kernels_lower_to_triton_for_a_gpu(monkeypatch, precision):
    # No GPU is needed to run Pallas's Triton lowering: exporting for CUDA runs it, and it
    # rejects what Triton cannot take (loads whose size is not a power of two, unsupported
    # ops). The engine's shape: per-image weights under vmap, 100 channels, 240x160.
    import re

    from dynaseg_jax.models import conv3x3

    monkeypatch.setattr(conv3x3, "_pallas_interpret", lambda: False)

    def grads(x, k):
        loss = lambda x, k: jnp.sum(jnp.sin(conv3x3.conv3x3_pallas(x, k, precision)))
        return jax.vmap(jax.grad(loss, argnums=(0, 1)))(x, k)

    x = jax.ShapeDtypeStruct((2, 160, 240, 100), jnp.float32)
    k = jax.ShapeDtypeStruct((2, 3, 3, 100, 100), jnp.float32)
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    text = jax.export.export(jax.jit(grads), platforms=["cuda"], disabled_checks=[triton])(x, k).mlir_module()
    names = re.findall(r'name = "(conv3x3_implicit_gemm\w*)"', text)
    # forward, input gradient (the forward kernel again) and weight gradient
    assert sorted(names) == ["conv3x3_implicit_gemm", "conv3x3_implicit_gemm", "conv3x3_implicit_gemm_weight_grad"]

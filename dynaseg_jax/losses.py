"""DynaSeg losses and the cluster count, on one image with a validity mask.

r' is (H, W, q), labels (H, W) int, mask (H, W) with 1 on real pixels.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def labels_from_response(response: jax.Array) -> jax.Array:
    """c = argmax over the q channels, per pixel."""
    return jnp.argmax(response, axis=-1).astype(jnp.int32)


def count_clusters(labels: jax.Array, mask: jax.Array, n_clusters: int) -> jax.Array:
    """q': how many distinct labels occur among the real pixels (int32 scalar)."""
    present = jnp.zeros((n_clusters,), jnp.int32).at[labels.reshape(-1)].max(
        mask.reshape(-1).astype(jnp.int32))
    return jnp.sum(present)


def similarity_loss(response: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """L_sim: cross-entropy of r' against the (fixed) labels, mean over real pixels."""
    logp = jax.nn.log_softmax(response, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    m = mask.astype(response.dtype)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


def continuity_loss(response: jax.Array, mask: jax.Array) -> jax.Array:
    """L_con: mean |r'[i+1,j]-r'[i,j]| + mean |r'[i,j+1]-r'[i,j]|.

    Means, as the reference code (the paper writes sums). Each mean runs over the
    pairs whose two pixels are both real, times the q channels, as torch's
    ``L1Loss`` over a (H-1, W, q) difference does.
    """
    m = mask.astype(response.dtype)
    q = response.shape[-1]
    dv = jnp.abs(response[1:] - response[:-1])
    mv = (m[1:] * m[:-1])[..., None]
    dh = jnp.abs(response[:, 1:] - response[:, :-1])
    mh = (m[:, 1:] * m[:, :-1])[..., None]
    lv = jnp.sum(dv * mv) / jnp.maximum(jnp.sum(mv) * q, 1.0)
    lh = jnp.sum(dh * mh) / jnp.maximum(jnp.sum(mh) * q, 1.0)
    return lv + lh

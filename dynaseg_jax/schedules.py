"""mu schedules: pure functions of (q', step) -> mu, the weight of L_con.

A schedule is any callable ``schedule(n_clusters, step) -> mu``; all here are
jit- and vmap-friendly (``n_clusters`` may be a traced scalar).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def fixed(mu: float = 5.0):
    """Kim et al. (TIP 2020): a constant mu (the paper's baseline row uses 5)."""

    def schedule(n_clusters, step):
        del step
        return jnp.full(jnp.shape(n_clusters), mu, jnp.float32)

    return schedule


def fsf(alpha: float = 15.0):
    """DynaSeg feature-similarity focus: mu = q' / alpha (grows with the cluster count)."""

    def schedule(n_clusters, step):
        del step
        return jnp.asarray(n_clusters, jnp.float32) / alpha

    return schedule


def scf(alpha: float = 50.0):
    """DynaSeg spatial-continuity focus: mu = alpha / q' (grows as clusters merge)."""

    def schedule(n_clusters, step):
        del step
        return alpha / jnp.maximum(jnp.asarray(n_clusters, jnp.float32), 1.0)

    return schedule


SCHEDULES = {"fixed": fixed, "fsf": fsf, "scf": scf}
SCHEDULE_KINDS = tuple(SCHEDULES)  # a kind's index is its per-slot code


def per_slot(kind: jax.Array, alpha: jax.Array, mu: jax.Array):
    """The schedule whose kind (index into ``SCHEDULE_KINDS``), alpha and mu are traced
    values, so one compiled step serves every setting (each slot carries its own)."""

    def schedule(n_clusters, step):
        del step
        q = jnp.asarray(n_clusters, jnp.float32)
        return jnp.select([kind == 0, kind == 1], [jnp.broadcast_to(mu, q.shape), q / alpha],
                          alpha / jnp.maximum(q, 1.0))

    return schedule


def make_schedule(config):
    """The schedule a config names (``schedule`` = fixed | fsf | scf)."""
    if config.schedule.kind == "fixed":
        return fixed(config.schedule.mu)
    if config.schedule.kind in ("fsf", "scf"):
        return SCHEDULES[config.schedule.kind](config.schedule.alpha)
    raise ValueError(f"unknown schedule {config.schedule.kind!r}; use one of {sorted(SCHEDULES)}")

"""The PyTorch a skilled GPU user would write for DynaSeg: many images at once.

``torch_reference.py`` follows the authors' script: one image at a time, ``torch.unique``
(a host sync) every update. This module runs the same algorithm (docs/algorithm.md
section 1) on a batch of same-sized images, each with its own network, the way one
writes it for a GPU:

* the B networks' weights are stacked, and each 3x3 conv is either ``F.unfold`` + one
  batched matmul (``torch.bmm``) over the images (``conv="bmm"``: per-image weights
  without a grouped conv, the batched-matmul form that the JAX engine's vmap strategy
  compiles to) or one cuDNN/oneDNN convolution with the images as groups
  (``conv="grouped"``: the B images' channels side by side, ``groups=B``); the benchmark
  times both and reports the faster;
* q' is counted on the device (a scatter into a (B, q) presence table, no ``unique``,
  whose data-dependent output size forces a sync and breaks graph capture); mu is a
  (B,) tensor;
* SGD with momentum is written out on the stacked tensors, and a finished image is
  frozen exactly (``torch.where`` on its parameters and momentum), so the stop flags
  can be read every ``check_every`` updates instead of every update without changing
  any result;
* on CUDA: TF32 off unless asked (``tf32``), and optionally the whole update captured
  once with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs).

Its results equal the reference's up to float rounding (``tests/test_torch_batched.py``).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

try:
    from dynaseg_jax.config import Config
except ModuleNotFoundError:  # run from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dynaseg_jax.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_reference as ref  # noqa: E402

BN_EPS = ref.BN_EPS


def stack_state_dicts(state_dicts: Sequence[dict], n_conv: int) -> dict[str, torch.Tensor]:
    """B ``TorchDynaSeg`` state dicts -> stacked parameters of the batched network.

    Conv weights (Cout, Cin, 3, 3) become (B, Cout, Cin * 9), unfold's patch order
    (channel-major, then the 3 x 3 positions); 1x1 weights (B, q, p); biases and BN
    scale/shift (B, C, 1).
    """
    def stack(key, shape=None):
        ts = [sd[key].detach().float() for sd in state_dicts]
        out = torch.stack([t.reshape(shape) if shape else t for t in ts])
        return out.contiguous()

    params = {}
    for i in range(n_conv):
        w = state_dicts[0][f"convs.{i}.weight"]
        params[f"conv{i}.w"] = stack(f"convs.{i}.weight", (w.shape[0], -1))
        params[f"conv{i}.b"] = stack(f"convs.{i}.bias", (-1, 1))
        params[f"bn{i}.g"] = stack(f"bns.{i}.weight", (-1, 1))
        params[f"bn{i}.b"] = stack(f"bns.{i}.bias", (-1, 1))
    w = state_dicts[0]["classifier.weight"]
    params["classifier.w"] = stack("classifier.weight", (w.shape[0], -1))
    params["classifier.b"] = stack("classifier.bias", (-1, 1))
    if "bn_out.weight" in state_dicts[0]:
        params["bn_out.g"] = stack("bn_out.weight", (-1, 1))
        params["bn_out.b"] = stack("bn_out.bias", (-1, 1))
    return params


def _batch_norm(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per image: (y - mean) / sqrt(biased var + eps) over its pixels, then affine."""
    mean = y.mean(dim=2, keepdim=True)
    var = (y - mean).square().mean(dim=2, keepdim=True)
    return (y - mean) * torch.rsqrt(var + BN_EPS) * scale + shift


CONV_FORMS = ("bmm", "grouped")


def _conv3x3(x: torch.Tensor, weight: torch.Tensor, padding: str, conv: str) -> torch.Tensor:
    """Each image's 3x3 conv with its own kernel: x (B, Cin, H, W), weight (B, Cout,
    Cin * 9) -> (B, Cout, H * W), without the bias."""
    b, cin, h, w = x.shape
    if padding != "zeros":
        x = F.pad(x, (1, 1, 1, 1), mode=padding)
    pad = 1 if padding == "zeros" else 0
    if conv == "bmm":
        return torch.bmm(weight, F.unfold(x, 3, padding=pad))  # unfold: (B, Cin * 9, H * W)
    if conv == "grouped":
        cout = weight.shape[1]
        y = F.conv2d(x.reshape(1, b * cin, *x.shape[2:]), weight.reshape(b * cout, cin, 3, 3),
                     padding=pad, groups=b)
        return y.view(b, cout, h * w)
    raise ValueError(f"conv = {conv!r}: one of {CONV_FORMS}")


def forward(params: dict, x: torch.Tensor, n_conv: int, padding: str = "zeros", input_space: str = "rgb",
            position: float = 0.0, conv: str = "bmm") -> torch.Tensor:
    """r' of B images through their own networks: x (B, 3, H, W) -> (B, q, H * W)."""
    x = ref.encode_input(x, input_space, position)
    b, _, h, w = x.shape
    for i in range(n_conv):
        y = torch.relu(_conv3x3(x, params[f"conv{i}.w"], padding, conv) + params[f"conv{i}.b"])
        y = _batch_norm(y, params[f"bn{i}.g"], params[f"bn{i}.b"])
        x = y.view(b, -1, h, w)
    r = torch.bmm(params["classifier.w"], x.view(b, x.shape[1], -1)) + params["classifier.b"]
    if "bn_out.g" in params:
        r = _batch_norm(r, params["bn_out.g"], params["bn_out.b"])
    return r


def batch_loss(r: torch.Tensor, h: int, w: int, config: Config):
    """Per image L_sim + mu(q') L_con, summed (the images' gradients stay separate).

    Returns (loss, q' (B,) int64): q' from a presence table on the device."""
    b, q, _ = r.shape
    labels = r.argmax(dim=1)  # (B, HW)
    present = torch.zeros(b, q, device=r.device, dtype=r.dtype).scatter_(1, labels, 1.0)
    n_clusters = present.sum(dim=1)
    l_sim = F.cross_entropy(r, labels, reduction="none").mean(dim=1)
    img = r.view(b, q, h, w)
    l_con = ((img[:, :, 1:] - img[:, :, :-1]).abs().mean(dim=(1, 2, 3))
             + (img[:, :, :, 1:] - img[:, :, :, :-1]).abs().mean(dim=(1, 2, 3)))
    kind, alpha = config.schedule.kind, float(config.schedule.alpha)
    if kind == "fixed":
        mu = torch.full_like(n_clusters, float(config.schedule.mu))
    elif kind == "fsf":
        mu = n_clusters / alpha
    elif kind == "scf":
        mu = alpha / n_clusters.clamp(min=1)
    else:
        raise ValueError(f"schedule.kind = {kind!r}: not a schedule of the reference")
    return (l_sim + mu * l_con).sum(), n_clusters.long()


def make_update(config: Config, h: int, w: int, padding: str, conv: str = "bmm"):
    """``update(params, momenta, x, active) -> n_clusters``: one SGD-momentum
    update of every active image in place; inactive images keep their parameters and
    momentum exactly. ``conv``: the 3x3 conv's form (``CONV_FORMS``)."""
    lr, m, wd = float(config.optim.lr), float(config.optim.momentum), float(config.optim.weight_decay)
    n_conv = config.model.n_conv

    def update(params, momenta, x, active):
        for p in params.values():
            p.grad = None
        loss, n_clusters = batch_loss(forward(params, x, n_conv, padding, config.model.input_space,
                                              config.model.position, conv), h, w, config)
        loss.backward()
        with torch.no_grad():
            for name, p in params.items():
                keep = active.view((-1,) + (1,) * (p.dim() - 1))
                d = p.grad + wd * p if wd else p.grad
                buf = momenta[name]
                new_buf = m * buf + d  # torch SGD: the first buffer is the first d (buf starts at 0)
                buf.copy_(torch.where(keep, new_buf, buf))
                p.copy_(torch.where(keep, p - lr * buf, p))
        return n_clusters

    return update


def segment_batch(images: Sequence[np.ndarray], config: Config, init_state_dicts: Sequence[dict],
                  device: str | torch.device = "cpu", k_mins: Sequence[int] | None = None,
                  check_every: int = 10, tf32: bool = False, compile_step: bool = False,
                  conv: str = "bmm") -> list[dict]:
    """Segments same-sized images at once, each with its own network and stop.

    Args:
      images: B float RGB (H, W, 3) arrays of one size.
      config: a Config (schedule, optimiser, k_min, max_iters, model size, padding).
      init_state_dicts: each image's initial ``TorchDynaSeg`` state dict.
      device: torch device.
      k_mins: each image's stop threshold (default: the config's k_min).
      check_every: updates between reads of the stop flags (the results do not depend
        on it: a finished image is frozen).
      tf32: let CUDA use TF32 (off: strict float32).
      compile_step: capture the update with ``torch.compile(mode="reduce-overhead")``.
      conv: the 3x3 conv's form, ``"bmm"`` or ``"grouped"`` (``CONV_FORMS``).

    Returns:
      One dict per image: ``labels`` (H, W), ``iterations``, ``clusters``.
    """
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"segment_batch needs images of one size, got {sorted(shapes)}")
    h, w = images[0].shape[:2]
    b = len(images)
    if k_mins is None:
        k_mins = [int(config.stop.k_min)] * b
    with ref.tf32_mode(tf32):
        x = torch.cat([ref.image_to_tensor(im, device) for im in images])
        params = {k: v.to(device).requires_grad_(True)
                  for k, v in stack_state_dicts(init_state_dicts, config.model.n_conv).items()}
        momenta = {k: torch.zeros_like(v) for k, v in params.items()}
        update = make_update(config, h, w, config.model.padding, conv)
        if compile_step:
            update = torch.compile(update, mode="reduce-overhead")
        k_min = torch.as_tensor(k_mins, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        iterations = torch.zeros(b, dtype=torch.long, device=device)
        max_iters = int(config.stop.max_iters)
        for t in range(max_iters):
            active = ~done
            n_clusters = update(params, momenta, x, active)
            iterations += active.long()
            done = done | (n_clusters <= k_min) | (t + 1 >= max_iters)
            if (t + 1) % check_every == 0 and bool(done.all()):  # the only host sync
                break
        with torch.no_grad():
            labels = forward(params, x, config.model.n_conv, config.model.padding, config.model.input_space,
                             config.model.position, conv).argmax(dim=1)
        labels = labels.view(b, h, w).cpu().numpy()
        its = iterations.cpu().numpy()
    return [{"labels": labels[i], "iterations": int(its[i]), "clusters": int(np.unique(labels[i]).size)}
            for i in range(b)]


def initial_state_dicts(config: Config, seeds: Sequence[int]) -> list[dict]:
    """Each image's initial ``TorchDynaSeg`` weights: torch's default init from its seed."""
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append({k: v.clone() for k, v in ref.build_model(config).state_dict().items()})
    return out


__all__ = ["CONV_FORMS", "forward", "batch_loss", "make_update", "segment_batch", "stack_state_dicts", "initial_state_dicts"]

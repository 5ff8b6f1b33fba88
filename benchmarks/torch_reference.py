"""A PyTorch implementation of DynaSeg's per-image optimisation (docs/algorithm.md section 1).

This is our own PyTorch version of the algorithm that the authors' BSD500 script
(RyersonMultimediaLab/DynaSeg, ``tools/DynaSeg_SCF_BSD_VOC.py``) runs, written to
serve as an independent reference for ``dynaseg_jax``: the parity tests
(``tests/test_torch_parity.py``) load identical weights into both and compare
responses, losses, labels and iteration counts, and the benchmarks time it against
the JAX engine.

It reads the same ``dynaseg_jax.config.Config`` fields as the JAX code (schedule, mu,
alpha, k_min, max_iters, n_conv, channels, n_clusters, lr, momentum, weight_decay,
seed), and runs on CPU or CUDA.

Command line (one image)::

    python benchmarks/torch_reference.py IMAGE [--config dynaseg_scf] [--set k=v ...]
        [--device cpu|cuda] [--tf32] [--out labels.png]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from dynaseg_jax.config import Config, load_config
except ModuleNotFoundError:  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dynaseg_jax.config import Config, load_config

BN_EPS = 1e-5


def encode_input(x: torch.Tensor, space: str = "rgb", position: float = 0.0) -> torch.Tensor:
    """The CNN's input from RGB (N, 3, H, W) in [0, 1]: ``space`` 'rgb' or 'lab' (CIE
    L*a*b*, D65, scaled to L/100, a/128, b/128), plus (row, column) channels from 0 to
    ``position`` when it is > 0 (docs/algorithm.md section 6.6)."""
    if space == "lab":
        linear = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
        m = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]], dtype=x.dtype, device=x.device)
        white = torch.tensor([0.95047, 1.0, 1.08883], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        xyz = torch.einsum("ij,njhw->nihw", m, linear) / white
        f = torch.where(xyz > 0.008856, xyz.clamp(min=0.008856) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
        fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
        x = torch.stack([(116.0 * fy - 16.0) / 100.0, 500.0 * (fx - fy) / 128.0, 200.0 * (fy - fz) / 128.0], 1)
    if position > 0:
        n, _, h, w = x.shape
        rows = torch.arange(h, dtype=x.dtype, device=x.device) / max(h - 1, 1)
        cols = torch.arange(w, dtype=x.dtype, device=x.device) / max(w - 1, 1)
        yy, xx = torch.meshgrid(rows, cols, indexing="ij")
        x = torch.cat([x, (torch.stack([yy, xx]) * position).expand(n, 2, h, w)], 1)
    return x


class TorchDynaSeg(nn.Module):
    """``n_conv`` x (conv3x3 pad 1 -> ReLU -> BN), then conv1x1 -> BN: the response r'.

    Convolutions keep PyTorch's default initialisation, which is what the reference
    uses (and what ``dynaseg_jax.models.layers.torch_uniform_init`` reproduces). BatchNorm is
    built without running statistics, so it normalises with the batch (= this image's)
    statistics in train and eval mode alike: the reference never leaves train mode, and
    its running statistics are never read (docs/algorithm.md section 1).

    Args:
      in_channels: channels of the input image (3).
      channels: p, the width of the feature extractor.
      n_clusters: q, the number of output channels (the most labels an image can get).
      n_conv: number of conv3x3 blocks (reference BSD script: 2).
      padding_mode: the convs' ``padding_mode`` ('zeros' in the authors' script).
      output_norm: BatchNorm on r' (the authors' script); False: the classifier's output.
      input_space, position: the first layer's input (``encode_input``); ``in_channels``
        counts the image's 3 only: position channels add 2.
    """

    def __init__(self, in_channels: int = 3, channels: int = 100, n_clusters: int = 100,
                 n_conv: int = 2, padding_mode: str = "zeros", output_norm: bool = True,
                 input_space: str = "rgb", position: float = 0.0):
        super().__init__()
        self.input_space, self.position = input_space, position
        in_channels += 2 if position > 0 else 0
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        for i in range(n_conv):
            self.convs.append(nn.Conv2d(in_channels if i == 0 else channels, channels,
                                        kernel_size=3, stride=1, padding=1,
                                        padding_mode=padding_mode))
            self.bns.append(nn.BatchNorm2d(channels, eps=BN_EPS, track_running_stats=False))
        self.classifier = nn.Conv2d(channels, n_clusters, kernel_size=1)
        self.bn_out = (nn.BatchNorm2d(n_clusters, eps=BN_EPS, track_running_stats=False) if output_norm
                       else nn.Identity())

    def forward(self, x: torch.Tensor, relu_masks=None) -> torch.Tensor:
        """Args: x (N, 3, H, W). Returns: r' (N, q, H, W).

        ``relu_masks`` (optional, one 0/1 tensor shaped like each conv output) replaces
        ReLU's own choice of which pre-activations pass: ``y * mask`` instead of
        ``relu(y)``. ReLU's derivative jumps at 0, so a float64 "truth" of a float32 step
        must take the float32 run's choice where rounding put a pre-activation on the
        other side of 0; where the choices agree the value is relu(y) exactly.
        """
        x = encode_input(x, self.input_space, self.position)
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            y = conv(x)
            x = bn(F.relu(y) if relu_masks is None else y * relu_masks[i])
        return self.bn_out(self.classifier(x))


def import_torchvision():
    """torchvision, imported so that its ``resnet18`` works beside the CPU build of torch.

    The registry's torchvision 0.28.0 fails to import beside torch 2.13.0+cpu
    (``operator torchvision::nms does not exist``, raised while registering the meta
    kernels of its compiled ops); the models need none of them, so that module is stubbed.
    """
    import importlib
    import types
    try:
        return importlib.import_module("torchvision")
    except RuntimeError:
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        return importlib.import_module("torchvision")


class TorchResNet18FPN(nn.Module):
    """``resnet18_fpn`` in PyTorch (docs/algorithm.md section 3), for parity tests.

    torchvision's ResNet-18 trunk in train mode (per-image BatchNorm statistics), lateral
    1x1 convs to p channels, top-down nearest x2 upsampling cropped to each lateral's size
    and added, a 3x3 smoothing conv on the stride-4 map, bilinear x4 upsampling
    (align_corners=False) cropped to the image, then classifier 1x1 + BatchNorm.
    """

    def __init__(self, channels: int = 100, max_clusters: int = 100):
        super().__init__()
        tv = import_torchvision()
        self.trunk = tv.models.resnet18(weights=None)
        self.laterals = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in (64, 128, 256, 512))
        self.smooth = nn.Conv2d(channels, channels, 3, padding=1)
        self.classifier = nn.Conv2d(channels, max_clusters, 1)
        self.bn_out = nn.BatchNorm2d(max_clusters, eps=BN_EPS, track_running_stats=False)

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """C2..C5 of an ImageNet-normalised (N, 3, H, W) input."""
        t = self.trunk
        x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
        out = []
        for layer in (t.layer1, t.layer2, t.layer3, t.layer4):
            x = layer(x)
            out.append(x)
        return out

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        """The trunk's input from RGB in [0, 1]: ImageNet mean/std."""
        mean = torch.tensor((0.485, 0.456, 0.406), dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor((0.229, 0.224, 0.225), dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (N, 3, H, W) RGB in [0, 1]. Returns: r' (N, q, H, W)."""
        h, w = x.shape[-2:]
        c = self.stages(self.normalise(x))
        p = self.laterals[3](c[3])
        for level in (2, 1, 0):
            lateral = self.laterals[level](c[level])
            up = F.interpolate(p, scale_factor=2, mode="nearest")[..., :lateral.shape[-2], :lateral.shape[-1]]
            p = lateral + up
        p = self.smooth(p)
        p = F.interpolate(p, scale_factor=4, mode="bilinear", align_corners=False)[..., :h, :w]
        return self.bn_out(self.classifier(p))


def _conv_params(sd, name: str, dtype=np.float32) -> dict:
    """A biased torch conv's weights as our layout: kernel OIHW -> HWIO, bias."""
    return {"kernel": _to_numpy(sd[f"{name}.weight"]).transpose(2, 3, 1, 0).astype(dtype),
            "bias": _to_numpy(sd[f"{name}.bias"]).astype(dtype)}


def _trunk_variables(sd, dtype, stages: int, running_stats: bool):
    from dynaseg_jax.models.resnet import torchvision_trunk_variables

    trunk = {k[len("trunk."):]: v for k, v in sd.items() if k.startswith("trunk.")}
    trunk = torchvision_trunk_variables(trunk, dtype=dtype, stages=stages)
    extra = {"batch_stats": {"trunk": trunk["batch_stats"]}} if running_stats else {}
    return {"trunk": trunk["params"]}, extra


def torch_fpn_to_jax_params(model: TorchResNet18FPN, dtype=np.float32, running_stats: bool = False) -> dict:
    """A ``TorchResNet18FPN``'s weights in the layout of ``dynaseg_jax.models.resnet.ResNet18FPN``
    (with the trunk's running statistics as ``batch_stats`` if ``running_stats``)."""
    sd = model.state_dict()
    params, extra = _trunk_variables(sd, dtype, 4, running_stats)
    return {"params": {**params, **_fpn_head_params(sd, dtype)}, **extra}


def _fpn_head_params(sd, dtype) -> dict:
    """The FPN, classifier and output BatchNorm of a ``TorchResNet18FPN`` (or subclass)."""
    conv = functools.partial(_conv_params, sd, dtype=dtype)
    params = {f"lateral{i + 2}": conv(f"laterals.{i}") for i in range(4)}
    params["smooth2"] = conv("smooth")
    params["classifier"] = conv("classifier")
    params["bn_out"] = {"scale": _to_numpy(sd["bn_out.weight"]).astype(dtype),
                        "bias": _to_numpy(sd["bn_out.bias"]).astype(dtype)}
    return params


class TorchEfficientNetLite0FPN(TorchResNet18FPN):
    """``efficientnet_lite0_fpn`` in PyTorch (docs/algorithm.md section 3.4), for parity tests.

    The trunk is the ``efficientnet-lite-pytorch`` package's EfficientNet-Lite0 built with
    ``image_size=None``: its dynamic "SAME" padding, TF's rule on each input's own size
    (the default build fixes every padding for 224 x 224 inputs); C2..C5 are the outputs
    of its blocks 2, 4, 10 and 15; input ``(255 x - 127) / 128``. The FPN and classifier
    are ``TorchResNet18FPN``'s.
    """

    FEATURE_BLOCKS = (2, 4, 10, 15)

    def __init__(self, channels: int = 100, max_clusters: int = 100, weights_path: str | None = None):
        nn.Module.__init__(self)
        from efficientnet_lite_pytorch import EfficientNet
        if weights_path:
            self.trunk = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights_path,
                                                      image_size=None)
        else:
            self.trunk = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        self.laterals = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in (24, 40, 112, 320))
        self.smooth = nn.Conv2d(channels, channels, 3, padding=1)
        self.classifier = nn.Conv2d(channels, max_clusters, 1)
        self.bn_out = nn.BatchNorm2d(max_clusters, eps=BN_EPS, track_running_stats=False)

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        return (x * 255.0 - 127.0) / 128.0

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """C2..C5 of a normalised (N, 3, H, W) input (the package's ``extract_features``
        loop, stopped after block 15; drop-connect is off outside training mode, and
        in training mode we pass rate 0: DynaSeg has no stochastic depth)."""
        t = self.trunk
        x = t._swish(t._bn0(t._conv_stem(x)))  # the package names its ReLU6 ``_swish``
        out = []
        for i, block in enumerate(t._blocks):
            x = block(x, drop_connect_rate=0.0)
            if i in self.FEATURE_BLOCKS:
                out.append(x)
        return out


def torch_effnet_to_jax_params(model: TorchEfficientNetLite0FPN, dtype=np.float32,
                               running_stats: bool = False) -> dict:
    """A ``TorchEfficientNetLite0FPN``'s weights in the layout of
    ``dynaseg_jax.models.efficientnet.EfficientNetLite0FPN``."""
    from dynaseg_jax.models.efficientnet import lukemelas_trunk_variables

    sd = model.state_dict()
    trunk = lukemelas_trunk_variables({k[len("trunk."):]: v for k, v in sd.items() if k.startswith("trunk.")},
                                      dtype=dtype)
    extra = {"batch_stats": {"trunk": trunk["batch_stats"]}} if running_stats else {}
    return {"params": {"trunk": trunk["params"], **_fpn_head_params(sd, dtype)}, **extra}


class TorchResNet18Layer1(nn.Module):
    """``resnet18_layer1`` in PyTorch (docs/algorithm.md section 3.2), for parity tests.

    The authors' ``MyCustomArchitectureOptimalClustersResNet18.forward``: torchvision's
    ResNet-18 ``conv1``, ``bn1``, ReLU, ``layer1`` (no max-pool) in train mode, bilinear
    x2 (``scale_factor=2``, align_corners=False), a 3x3 conv (padding 1, bias) 64 -> q,
    then the same 1x1 conv (bias) + BatchNorm twice, and the crop to the image (their
    ``adjust_output_size`` removes the single extra row/column of an odd size at the
    end, which is ``[..., :h, :w]``). The authors have q = 64.
    """

    def __init__(self, max_clusters: int = 64):
        super().__init__()
        tv = import_torchvision()
        self.trunk = tv.models.resnet18(weights=None)  # only conv1, bn1, layer1 are used
        self.conv6 = nn.Conv2d(64, max_clusters, 3, padding=1)
        self.conv3 = nn.Conv2d(max_clusters, max_clusters, 1)
        self.bn3 = nn.BatchNorm2d(max_clusters, eps=BN_EPS, track_running_stats=False)

    def upsampled_features(self, x: torch.Tensor) -> torch.Tensor:
        """The 3x3 conv's output on the x2 map (N, q, 2 ceil(H/2), 2 ceil(W/2)), uncropped."""
        mean = torch.tensor((0.485, 0.456, 0.406), dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor((0.229, 0.224, 0.225), dtype=x.dtype).view(1, 3, 1, 1)
        t = self.trunk
        y = t.layer1(t.relu(t.bn1(t.conv1((x - mean) / std))))
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        return self.conv6(y)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The map before the shared 1x1 + BN stage, cropped to the image (N, q, H, W)."""
        h, w = x.shape[-2:]
        return self.upsampled_features(x)[..., :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (N, 3, H, W) RGB in [0, 1]. Returns: r' (N, q, H, W)."""
        h, w = x.shape[-2:]
        y = self.upsampled_features(x)
        y = self.bn3(self.conv3(y))
        y = self.bn3(self.conv3(y))  # the same modules again
        return y[..., :h, :w]


def torch_layer1_to_jax_params(model: TorchResNet18Layer1, dtype=np.float32,
                               running_stats: bool = False) -> dict:
    """A ``TorchResNet18Layer1``'s weights in the layout of
    ``dynaseg_jax.models.resnet.ResNet18Layer1`` (with the trunk's running statistics as
    ``batch_stats`` if ``running_stats``)."""
    sd = model.state_dict()
    params, extra = _trunk_variables(sd, dtype, 1, running_stats)

    conv = functools.partial(_conv_params, sd, dtype=dtype)

    params["conv6"] = conv("conv6")
    params["classifier"] = conv("conv3")
    params["bn_out"] = {"scale": _to_numpy(sd["bn3.weight"]).astype(dtype),
                        "bias": _to_numpy(sd["bn3.bias"]).astype(dtype)}
    return {"params": params, **extra}


def build_model(config: Config) -> nn.Module:
    """The network a config describes (initialised from the current torch RNG state)."""
    if config.model.name == "resnet18_fpn":
        return TorchResNet18FPN(config.model.channels, config.model.max_clusters)
    if config.model.name == "resnet18_layer1":
        return TorchResNet18Layer1(config.model.max_clusters)
    if config.model.name == "efficientnet_lite0_fpn":
        return TorchEfficientNetLite0FPN(config.model.channels, config.model.max_clusters)
    return TorchDynaSeg(3, config.model.channels, config.model.max_clusters, config.model.n_conv,
                        config.model.padding, config.model.output_norm, config.model.input_space,
                        config.model.position)


def make_optimizer(model: nn.Module, config: Config) -> torch.optim.SGD:
    """SGD with the config's lr, momentum and (L2, added to the gradient) weight decay."""
    return torch.optim.SGD(model.parameters(), lr=config.optim.lr, momentum=config.optim.momentum,
                           weight_decay=config.optim.weight_decay)


def make_schedule(config: Config) -> Callable[[int, int], float]:
    """mu as a function of (q', step), the same three schedules as ``dynaseg_jax.schedules``.

    Note the names: we follow docs/algorithm.md section 1.7 (fsf: q'/alpha, scf: alpha/q'); the
    authors' script labels its ``nLabels/15`` line "SCF", the opposite way round.
    """
    if config.schedule.kind == "fixed":
        return lambda q, step: float(config.schedule.mu)
    if config.schedule.kind == "fsf":
        return lambda q, step: q / float(config.schedule.alpha)
    if config.schedule.kind == "scf":
        return lambda q, step: float(config.schedule.alpha) / max(q, 1)
    raise ValueError(f"unknown schedule {config.schedule.kind!r}; use fixed, fsf or scf")


def loss_terms(response: torch.Tensor, schedule: Callable[[int, int], float], step: int,
               labels: torch.Tensor | None = None, con_signs=None):
    """The DynaSeg loss of one forward pass (in the response's dtype: float32 or float64).

    Args:
      response: r' of one image, (1, q, H, W).
      schedule: mu as a function of (q', step).
      step: the iteration index t (0-based).
      labels: optional (H*W,) labels to use instead of argmax r' (and to count q' from).
        The argmax is discontinuous: a float64 "truth" of a float32 step must take the
        float32 run's labels, or a near-tie decided the other way changes the loss.
      con_signs: optional (vertical (H-1, W, q), horizontal (H, W-1, q)) signs s of the
        differences d in L_con, which then uses s * d in place of |d|: |d|'s derivative
        jumps at d = 0, so a float64 truth takes a float32 run's signs where rounding
        decided them the other way (torch's L1Loss takes the subgradient 0 at d = 0).

    Returns:
      (loss tensor, dict with l_sim, l_con tensors, mu float, n_clusters int, labels (H*W,)).
    """
    r = response[0].permute(1, 2, 0)  # (H, W, q): pixels first, as the reference flattens
    flat = r.reshape(-1, r.shape[-1])
    if labels is None:
        labels = flat.argmax(dim=1)  # c; integer, so no gradient flows through it
    else:
        labels = torch.as_tensor(labels, device=flat.device).reshape(-1).long()
    # q' from this forward pass, before the update (a host sync, as in the reference).
    n_clusters = int(torch.unique(labels).numel())
    l_sim = F.cross_entropy(flat, labels)
    # L1 towards a zero target of the vertical / horizontal differences, each a mean.
    if con_signs is None:
        l_con = F.l1_loss(r[1:], r[:-1]) + F.l1_loss(r[:, 1:], r[:, :-1])
    else:
        sv, sh = (torch.as_tensor(s, dtype=r.dtype, device=r.device) for s in con_signs)
        l_con = (sv * (r[1:] - r[:-1])).mean() + (sh * (r[:, 1:] - r[:, :-1])).mean()
    mu = schedule(n_clusters, step)
    loss = l_sim + mu * l_con
    return loss, {"l_sim": l_sim, "l_con": l_con, "mu": mu, "n_clusters": n_clusters,
                  "labels": labels}


def image_to_tensor(image: np.ndarray, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float RGB (H, W, 3) in [0, 1] -> tensor (1, 3, H, W) on ``device``.

    The pixels are rounded to float32 first, also for ``dtype=torch.float64``: a float64
    run then sees exactly the float32 image that a float32 run sees.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)[None]))
    return x.to(device=device, dtype=dtype)


@contextlib.contextmanager
def tf32_mode(enabled: bool):
    """Sets whether CUDA convolutions/matmuls may use TF32, restoring the old settings after.

    cuDNN allows TF32 by default, which on Ampere and later GPUs changes float32 results:
    on an H100 the second step's loss already moved by 6e-3 relative, and a whole run
    ended with another cluster count. With TF32 off, CUDA matched the CPU.
    """
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def segment_image(image: np.ndarray, config: Config, device: str | torch.device = "cpu",
                  seed: int | None = None, init_state_dict: Mapping | None = None,
                  record_losses: bool = False, k_min: int | None = None,
                  tf32: bool = False) -> dict:
    """Segments one image with its own fresh network (docs/algorithm.md section 1).

    Per iteration t: forward pass, labels c = argmax r', q' = distinct labels, loss
    CE(r', c) + mu(q', t) * L_con, one SGD step; then stop if q' <= k_min or
    t + 1 == max_iters. The labels come from one more forward pass after the last update.

    Args:
      image: float RGB (H, W, 3) in [0, 1].
      config: a Config; its k_min must be an integer unless ``k_min`` is given.
      device: torch device to run on ("cpu", "cuda", ...).
      seed: torch seed of the initial network (default: ``config.seed``). Ignored for
        the weights when ``init_state_dict`` is given.
      init_state_dict: optional initial weights (e.g. from ``jax_params_to_torch_state_dict``).
      record_losses: also return the per-iteration loss terms.
      k_min: stopping threshold overriding ``config.stop.k_min`` (e.g. a silhouette k*).
      tf32: let CUDA use TF32 (torch's cuDNN default, what the authors' script ran with);
        off by default so that the result is plain float32, as on the CPU.

    Returns:
      dict with ``labels`` (H, W) int64 numpy, ``iterations`` (updates done),
      ``clusters`` (distinct labels in the final map), ``last_n_clusters`` (q' of the last
      iteration), ``losses`` (per-iteration total loss, or None) and ``history`` (dict of
      per-iteration lists loss / l_sim / l_con / mu / n_clusters, or None).
    """
    with tf32_mode(tf32):
        return _segment(image, config, device, seed, init_state_dict, record_losses, k_min)


def _segment(image, config, device, seed, init_state_dict, record_losses, k_min) -> dict:
    """``segment_image``'s body, run under its TF32 setting."""
    if k_min is None:
        if not isinstance(config.stop.k_min, int):
            raise ValueError(f"k_min = {config.stop.k_min!r}: the torch reference needs an integer "
                             "(pass k_min= for a per-image k*)")
        k_min = config.stop.k_min
    h, w = image.shape[:2]
    x = image_to_tensor(image, device)
    torch.manual_seed(config.seed if seed is None else seed)
    model = build_model(config)
    if init_state_dict is not None:
        model.load_state_dict(init_state_dict)
    model.to(device).train()
    optimizer = make_optimizer(model, config)
    schedule = make_schedule(config)
    history = {"loss": [], "l_sim": [], "l_con": [], "mu": [], "n_clusters": []} \
        if record_losses else None

    iterations, q = 0, None
    for t in range(int(config.stop.max_iters)):
        optimizer.zero_grad(set_to_none=True)
        loss, aux = loss_terms(model(x), schedule, t)
        loss.backward()
        optimizer.step()
        iterations, q = t + 1, aux["n_clusters"]
        if history is not None:
            history["loss"].append(loss.item())
            history["l_sim"].append(aux["l_sim"].item())
            history["l_con"].append(aux["l_con"].item())
            history["mu"].append(float(aux["mu"]))
            history["n_clusters"].append(q)
        if q <= k_min:
            break

    with torch.no_grad():
        labels = model(x)[0].argmax(dim=0).cpu().numpy().reshape(h, w)
    return {
        "labels": labels,
        "iterations": iterations,
        "clusters": int(len(np.unique(labels))),
        "last_n_clusters": q,
        "losses": history["loss"] if history is not None else None,
        "history": history,
    }


def _to_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def jax_params_to_torch_state_dict(params: Mapping) -> dict[str, torch.Tensor]:
    """Our flax parameters -> a ``TorchDynaSeg`` state dict (float32 CPU tensors).

    Args:
      params: ``{'params': {...}}`` or the inner dict, with ``conv{i}`` (kernel HWIO
        (3, 3, cin, cout), bias), ``bn{i}`` (scale, bias), ``classifier`` (kernel
        (1, 1, p, q), bias) and ``bn_out`` (scale, bias).

    Returns:
      A state dict that ``TorchDynaSeg.load_state_dict`` accepts (strictly).
    """
    p = params.get("params", params)
    n_conv = sum(1 for k in p if k.startswith("conv"))
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # copies: torch owns it
    sd = {}
    for i in range(n_conv):
        # HWIO -> OIHW (torch's Conv2d weight layout).
        sd[f"convs.{i}.weight"] = t(np.transpose(np.asarray(p[f"conv{i}"]["kernel"]), (3, 2, 0, 1)))
        sd[f"convs.{i}.bias"] = t(p[f"conv{i}"]["bias"])
        sd[f"bns.{i}.weight"] = t(p[f"bn{i}"]["scale"])
        sd[f"bns.{i}.bias"] = t(p[f"bn{i}"]["bias"])
    sd["classifier.weight"] = t(np.transpose(np.asarray(p["classifier"]["kernel"]), (3, 2, 0, 1)))
    sd["classifier.bias"] = t(p["classifier"]["bias"])
    if "bn_out" in p:  # absent with model.output_norm = false
        sd["bn_out.weight"] = t(p["bn_out"]["scale"])
        sd["bn_out.bias"] = t(p["bn_out"]["bias"])
    return sd


def torch_state_dict_to_jax_params(state_dict: Mapping, dtype=np.float32) -> dict:
    """A ``TorchDynaSeg`` state dict -> our flax parameters ``{'params': {...}}``.

    Conv weights go from OIHW to HWIO; BN weight/bias become scale/bias. Buffers
    (running statistics, if a model has them) are ignored: they never affect the output.
    Leaves are numpy arrays of ``dtype`` (float32; float64 keeps a float64 model's values
    exact); ``jax.tree.map(jnp.asarray, ...)`` moves float32 ones to JAX.
    """
    sd = {k: _to_numpy(v).astype(dtype) for k, v in state_dict.items()}
    n_conv = len({k.split(".")[1] for k in sd if k.startswith("convs.")})
    p = {}
    for i in range(n_conv):
        p[f"conv{i}"] = {"kernel": np.transpose(sd[f"convs.{i}.weight"], (2, 3, 1, 0)),
                         "bias": sd[f"convs.{i}.bias"]}
        p[f"bn{i}"] = {"scale": sd[f"bns.{i}.weight"], "bias": sd[f"bns.{i}.bias"]}
    p["classifier"] = {"kernel": np.transpose(sd["classifier.weight"], (2, 3, 1, 0)),
                       "bias": sd["classifier.bias"]}
    if "bn_out.weight" in sd:  # absent with model.output_norm = false
        p["bn_out"] = {"scale": sd["bn_out.weight"], "bias": sd["bn_out.bias"]}
    return {"params": p}


def _load_rgb(path: str) -> np.ndarray:
    """An image file as float32 RGB in [0, 1], read the way the JAX package reads it."""
    try:
        from dynaseg_jax.images import load_image
        return load_image(path)
    except ImportError:  # the reference only needs PIL
        from PIL import Image
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), np.float32) / 255.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="DynaSeg, PyTorch reference: segment one image.")
    parser.add_argument("image", help="input image file")
    parser.add_argument("--config", default=None, help="preset name or TOML file (default: defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 on CUDA (cuDNN's default)")
    parser.add_argument("--out", default=None, help="write the label map as a 16-bit PNG here")
    args = parser.parse_args(argv)

    try:
        config = load_config(args.config, args.overrides)
        image = _load_rgb(args.image)
    except (ValueError, OSError) as e:  # ConfigError and ImageError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    result = segment_image(image, config, device=args.device, tf32=args.tf32)
    elapsed = time.perf_counter() - start
    h, w = image.shape[:2]
    print(f"{args.image}: {h}x{w} on {args.device}: iterations {result['iterations']}, "
          f"clusters {result['clusters']}, time {elapsed:.2f} s "
          f"({elapsed / max(result['iterations'], 1) * 1e3:.1f} ms/iteration)")
    if args.out:
        from PIL import Image
        Image.fromarray(result["labels"].astype(np.uint16)).save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

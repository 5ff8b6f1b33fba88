"""Speed: the JAX engine against the PyTorch reference, interleaved in one run.

For each image size, batch size (slots) and engine strategy, times milliseconds per
image-iteration over a fixed number of iterations (no early stop), after warm-up,
``--repeats`` times with JAX and PyTorch interleaved, and reports the median. Also
reports compile time, achieved GFLOP/s (algorithmic FLOPs of the network's forward and
backward pass), the fraction of this machine's float32 matmul roofline (a 2048^3
matmul measured in the same run), and peak memory. ``--full-run N`` adds whole runs with
early stopping on N real BSDS500 val images (images per second); ``--kstar-run N`` times
the silhouette phase (k* per second) against the device on N of them, and how long the
engine waited for k* (``kstar_run``).

The PyTorch reference processes images one at a time (as the authors' script does), so
its time per image-iteration does not depend on the batch size.

Examples::

    python benchmarks/bench_speed.py --size 240x160 --batch 1 --iters 20 --json out.json
    python benchmarks/bench_speed.py --size 64x64 128x128 240x160 481x321 --batch 1 2 4 8 \
        --strategy per_image vmap --json speed.json --plot speed.png
    python benchmarks/bench_speed.py --device gpu ...
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dynaseg_jax.config import load_config  # noqa: E402
from dynaseg_jax.images import write_text_atomic  # noqa: E402
from dynaseg_jax.engine import Engine, WorkItem, _SlotGroup, bucket_shape  # noqa: E402

BSDS_VAL = Path(os.environ.get("BSDS500_VAL", Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds500" / "images" / "val"))


def xla_step_flops(engine, h: int, w: int) -> float:
    """FLOPs of one training step as XLA counts them (``cost_analysis``) on the padded
    bucket of an h x w image: for models without a closed form here (resnet18_fpn)."""
    from dynaseg_jax import train
    bh, bw, _ = bucket_shape(h, w, engine.config, engine.model)
    state = engine.new_state(0)
    step = jax.jit(train.make_train_step(engine.config, model=engine.model))
    cost = step.lower(state, jnp.zeros((bh, bw, 3)), jnp.ones((bh, bw)), engine.shared).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def model_flops(h: int, w: int, config) -> float:
    """Algorithmic FLOPs of one training step on an h x w image (multiply-add = 2).

    Forward: conv3x3 3->p, (n_conv - 1) x conv3x3 p->p, conv1x1 p->q. Backward: the
    weight gradient of every conv plus the input gradient of every conv but the first
    (the image needs none): about 3x forward minus the first conv's input gradient.
    """
    p, q, hw = config.model.channels, config.model.max_clusters, h * w
    first = 2 * hw * 27 * p
    others = (config.model.n_conv - 1) * 2 * hw * 9 * p * p
    classifier = 2 * hw * p * q
    return 2 * first + 3 * (others + classifier)


# Dense peak TFLOP/s of a card per product precision (the vendors' data sheets; SXM
# parts): the denominators of "fraction of the card's peak".
CARD_PEAK_TFLOPS = {  # the first name found in the device's name wins: specific parts first
    "H100 PCIe": {"float32": 51.0, "tensorfloat32": 378.0, "bfloat16": 756.0},
    "H200 NVL": {"float32": 60.0, "tensorfloat32": 418.0, "bfloat16": 835.0},
    "H200": {"float32": 67.0, "tensorfloat32": 495.0, "bfloat16": 990.0},
    "H100": {"float32": 67.0, "tensorfloat32": 495.0, "bfloat16": 990.0},
    "A100": {"float32": 19.5, "tensorfloat32": 156.0, "bfloat16": 312.0},
}


def jax_products(config) -> str:
    """The precision of the engine's products with learned weights, as executed."""
    from dynaseg_jax.models import executed_products
    return executed_products(config)


def platform_version(device) -> str | None:
    """The JAX backend's platform version (CUDA and driver on a GPU), where it says."""
    return getattr(getattr(device, "client", None), "platform_version", None)


def torch_products(args) -> str:
    """The precision of PyTorch's float32 convs and matmuls here (TF32 only on CUDA)."""
    return "tensorfloat32" if args.tf32 and args.device == "gpu" else "float32"


def card_peak_tflops(device_kind: str, precision: str | None, override: float | None = None) -> float | None:
    """The dense peak of ``device_kind`` (e.g. 'NVIDIA H200') for products in
    ``precision`` (None: JAX's default, counted as float32); None for unknown cards."""
    if override:
        return override
    for card, peaks in CARD_PEAK_TFLOPS.items():
        if card in device_kind:
            return peaks.get(precision or "float32")
    return None


def matmul_roofline(n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 GFLOP/s of an n^3 matmul on the JAX default device."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times) / 1e9


def synthetic_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(7 * yy + seed), np.cos(5 * xx), np.sin(3 * (xx + yy))], -1) * 0.4 + 0.5
    return np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1).astype(np.float32)


class JaxRunner:
    """``batch`` engine slots of one bucket, all busy (k_min = 0 never stops)."""

    def __init__(self, config, h, w, batch):
        self.engine = Engine(config.replace({"engine.batch": batch, "stop.max_iters": 10 ** 9}))
        bucket = bucket_shape(h, w, self.engine.config, self.engine.model)
        self.group = _SlotGroup(self.engine, bucket[:2])
        t = time.perf_counter()
        for i in range(batch):
            self.group.load(WorkItem(i, synthetic_image(h, w, i), 0), bucket[2])
        self.group.advance()
        list(self.group.collect())
        self._block()
        self.compile_seconds = time.perf_counter() - t
        self.batch = batch

    def _block(self):
        jax.block_until_ready(self.group.states)

    def step_memory_mb(self) -> dict:
        """Device memory of one compiled step call (XLA's buffer assignment, compiled again
        for the analysis): its arguments (the slots' states and images), outputs not
        aliased to donated arguments, and temporaries, in MiB."""
        g = self.group
        if g.vectorized:
            args = (g.states, g.images, g.masks, self.engine.shared, g.segments)
        else:
            args = (g.states[0], g.images[0], g.masks[0], self.engine.shared, g.segments[0])
        m = g.step.lower(*args).compile().memory_analysis()
        mb = lambda b: b / 2 ** 20
        total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        return {"step_arguments_mb": mb(m.argument_size_in_bytes), "step_temporaries_mb": mb(m.temp_size_in_bytes),
                "step_total_mb": mb(total)}

    def time_iters(self, iters: int) -> float:
        """Seconds per image-iteration, host loop exactly as the engine runs it."""
        n_calls = max(1, iters // self.engine.config.engine.sync_every)
        t = time.perf_counter()
        for _ in range(n_calls):
            self.group.advance()
            list(self.group.collect())  # reads the done flags, as the engine does
        self._block()
        return (time.perf_counter() - t) / (n_calls * self.engine.config.engine.sync_every * self.batch)


class TorchRunner:
    """The PyTorch reference's loop on one image (host sync for q' every step, as it does)."""

    def __init__(self, config, h, w, device):
        import torch
        import torch_reference as tr
        self.torch, self.tr, self.device = torch, tr, device
        self.config = config
        torch.manual_seed(config.seed)
        self.model = tr.build_model(config).to(device).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=config.optim.lr, momentum=config.optim.momentum,
                                   weight_decay=config.optim.weight_decay)
        self.schedule = tr.make_schedule(config)
        self.x = tr.image_to_tensor(synthetic_image(h, w, 0), device)
        self.t = 0
        self.time_iters(2)  # warm-up

    def _sync(self):
        if str(self.device).startswith("cuda"):
            self.torch.cuda.synchronize()

    def time_iters(self, iters: int) -> float:
        self._sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            self.opt.zero_grad(set_to_none=True)
            loss, _ = self.tr.loss_terms(self.model(self.x), self.schedule, self.t)
            loss.backward()
            self.opt.step()
            self.t += 1
        self._sync()
        return (time.perf_counter() - t0) / iters


class BatchedTorchRunner:
    """The tuned PyTorch opponent (torch_batched.py): ``batch`` images at once, q' on the
    device, stop flags read every ``check_every`` updates; optionally the update captured
    by ``torch.compile(mode="reduce-overhead")``."""

    def __init__(self, config, h, w, batch, device, compile_step=False, conv="bmm"):
        import torch
        import torch_batched as tb
        self.torch, self.device, self.batch = torch, device, batch
        sds = tb.initial_state_dicts(config, range(batch))
        self.params = {k: v.to(device).requires_grad_(True)
                       for k, v in tb.stack_state_dicts(sds, config.model.n_conv).items()}
        self.momenta = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.x = torch.cat([tb.ref.image_to_tensor(synthetic_image(h, w, i), device) for i in range(batch)])
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.update = tb.make_update(config, h, w, config.model.padding, conv)
        if compile_step:
            self.update = torch.compile(self.update, mode="reduce-overhead")
        self.time_iters(3)  # warm-up (and capture, when compiled)

    def time_iters(self, iters: int) -> float:
        if str(self.device).startswith("cuda"):
            self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            n_clusters = self.update(self.params, self.momenta, self.x, self.active)
        n_clusters.cpu()  # one sync, as a stop-flag read
        return (time.perf_counter() - t0) / (iters * self.batch)


def peak_memory_mb(device: str) -> dict:
    out = {"host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "gpu":
        try:
            stats = jax.devices()[0].memory_stats() or {}
            out["jax_device_peak_mb"] = stats.get("peak_bytes_in_use", 0) / 2 ** 20
        except Exception:  # noqa: BLE001 - not every backend has stats
            pass
        try:
            import torch
            out["torch_device_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        except Exception:  # noqa: BLE001
            pass
    return out


def bench_case(config, h, w, batch, strategy, conv_impl, args, roofline, torch_cache):
    cfg = config.replace({"engine.strategy": strategy, "model.conv_impl": conv_impl})
    jr = JaxRunner(cfg, h, w, batch)
    jr.time_iters(args.warmup)
    tkey = (h, w)
    if not args.no_torch and tkey not in torch_cache:
        torch_cache[tkey] = TorchRunner(config, h, w, "cuda" if args.device == "gpu" else "cpu")
    bkeys = [(h, w, batch, "batched", conv) for conv in args.torch_conv]
    for bkey in bkeys:
        if not args.no_torch and cfg.model.name == "cnn" and bkey not in torch_cache:
            torch_cache[bkey] = BatchedTorchRunner(config, h, w, batch, "cuda" if args.device == "gpu" else "cpu",
                                                   compile_step=args.torch_compile, conv=bkey[-1])
    jax_t, torch_t, batched_t = [], [], {bkey[-1]: [] for bkey in bkeys if bkey in torch_cache}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit every side
        jax_t.append(jr.time_iters(args.iters))
        if not args.no_torch:
            torch_t.append(torch_cache[tkey].time_iters(args.iters))
        for bkey in bkeys:
            if bkey in torch_cache:
                batched_t[bkey[-1]].append(torch_cache[bkey].time_iters(args.iters))
    jax_ms = statistics.median(jax_t) * 1e3
    torch_ms = statistics.median(torch_t) * 1e3 if torch_t else None
    # The tuned opponent: the faster of its conv forms.
    batched_by_conv = {conv: statistics.median(t) * 1e3 for conv, t in batched_t.items()}
    batched_conv = min(batched_by_conv, key=batched_by_conv.get) if batched_by_conv else None
    batched_ms = batched_by_conv[batched_conv] if batched_conv else None
    if cfg.model.name == "cnn":
        flops, flops_source = model_flops(h, w, cfg), "algorithmic (direct convolution)"
    else:
        flops, flops_source = xla_step_flops(jr.engine, h, w), "XLA cost analysis of the padded step"
    # Executed FLOPs: what XLA counts in the compiled step (Winograd executes fewer than
    # the direct convolution). Pallas kernels are custom calls, outside XLA's count.
    pallas = jr.engine.config.model.conv_impl == "pallas"  # custom calls: not in XLA's count
    executed = None
    if args.executed_flops and not pallas:  # the same count as flops_per_step, for models without a closed form
        executed = flops if cfg.model.name != "cnn" else xla_step_flops(jr.engine, h, w)
    products = jax_products(jr.engine.config)
    peak = card_peak_tflops(str(jax.devices()[0].device_kind), products, args.peak_tflops)
    jax_flops_per_s = flops / (jax_ms * 1e-3)
    row = {
        "size": f"{w}x{h}", "height": h, "width": w, "batch": batch, "model": cfg.model.name,
        "flops_per_step": flops, "flops_source": flops_source,
        "strategy": jr.engine.config.engine.strategy,
        "conv_impl": jr.engine.config.model.conv_impl, "sync_every": jr.engine.config.engine.sync_every,
        "tf32": args.tf32, "matmul_precision": jr.engine.config.model.matmul_precision,
        "torch_products": None if args.no_torch else torch_products(args),
        "jax_ms_per_image_iter": jax_ms, "torch_ms_per_image_iter": torch_ms,
        "ratio": jax_ms / torch_ms if torch_ms else None,
        "torch_batched_ms_per_image_iter": batched_ms, "torch_batched_compiled": bool(args.torch_compile),
        "torch_batched_conv": batched_conv, "torch_batched_ms_by_conv": batched_by_conv,
        "ratio_batched": jax_ms / batched_ms if batched_ms else None,
        "torch_batched_ms_all": {conv: [x * 1e3 for x in t] for conv, t in batched_t.items()},
        "jax_images_per_s_at_iters": 1e3 / (jax_ms * args.iters),
        "jax_gflops": flops / (jax_ms * 1e-3) / 1e9,
        "torch_gflops": flops / (torch_ms * 1e-3) / 1e9 if torch_ms else None,
        "jax_roofline_fraction": flops / (jax_ms * 1e-3) / 1e9 / roofline,
        "products": products, "card_peak_tflops": peak,
        "jax_peak_fraction_direct": jax_flops_per_s / (peak * 1e12) if peak else None,
        "executed_flops_per_step": executed,
        "jax_peak_fraction_executed": executed / (jax_ms * 1e-3) / (peak * 1e12) if peak and executed else None,
        "jax_compile_s": jr.compile_seconds, "jax_ms_all": [t * 1e3 for t in jax_t],
        "torch_ms_all": [t * 1e3 for t in torch_t],
    }
    if args.memory:
        row.update(jr.step_memory_mb())
    del jr
    row.update(peak_memory_mb(args.device))
    return row


def overrides(args) -> list[str]:
    """The config overrides of the command line: --set, and --tf32, which reaches the model
    through its config (the model names its precision explicitly)."""
    return (["model.matmul_precision=tensorfloat32"] if args.tf32 else []) + args.overrides


def val_images(n: int, scale: float) -> list:
    """The first n BSDS500 val images (float RGB), resized by ``scale``; [] if there are none."""
    from dynaseg_jax.images import load_image, resize_image
    imgs = [load_image(p) for p in sorted(BSDS_VAL.glob("*.jpg"))[:n]]
    return [resize_image(im, scale) for im in imgs] if scale != 1.0 else imgs


def full_run(config, args, save=lambda partial: None) -> dict:
    """Whole runs with early stopping on real BSDS500 val images: images per second.
    ``save(partial)`` is called after each side, so that a run cut short keeps them."""
    imgs = val_images(args.full_run, args.full_scale)
    if not imgs:
        return {"error": f"no BSDS500 val images at {BSDS_VAL}"}
    engine = Engine(config.replace({"engine.batch": args.full_batch, "engine.strategy": args.strategy[0],
                                    "model.conv_impl": args.conv_impl[0]}))
    warm = list(engine.run([WorkItem(-1, imgs[0], 10 ** 6)]))  # compile (stops after 1 step)
    t = time.perf_counter()
    res = list(engine.run(WorkItem(i, im, config.stop.k_min) for i, im in enumerate(imgs)))
    jax_s = time.perf_counter() - t
    out = {"images": len(imgs), "scale": args.full_scale, "size": "x".join(map(str, imgs[0].shape[1::-1])),
           "jax_seconds": jax_s, "jax_images_per_s": len(imgs) / jax_s,
           "jax_iterations": sorted(r.iterations for r in res), "strategy": engine.config.engine.strategy,
           "conv_impl": engine.config.model.conv_impl, "sync_every": engine.config.engine.sync_every,
           "batch": args.full_batch, "products": jax_products(engine.config)}
    del warm
    save(out)
    if not args.no_torch:
        import torch_reference as tr
        dev = "cuda" if args.device == "gpu" else "cpu"
        n_torch = min(len(imgs), args.full_torch or len(imgs))
        t = time.perf_counter()
        tres = [tr.segment_image(im, config, device=dev, tf32=args.tf32) for im in imgs[:n_torch]]
        torch_s = time.perf_counter() - t
        # Images per second of each side (the reference may run on the first few images only).
        out.update(torch_products=torch_products(args), torch_images=n_torch, torch_seconds=torch_s, torch_images_per_s=n_torch / torch_s,
                   torch_iterations=sorted(r["iterations"] for r in tres),
                   speedup=(len(imgs) / jax_s) / (n_torch / torch_s))
        save(out)
        if config.model.name == "cnn":
            # The tuned opponent: portraits transposed (as the engine does) and images of
            # one shape in batches of full_batch, each image from its own seed.
            import torch_batched as tb
            n_tuned = min(len(imgs), args.full_tuned or n_torch)
            upright = [im.transpose(1, 0, 2) if im.shape[0] > im.shape[1] else im for im in imgs[:n_tuned]]
            groups: dict = {}
            for im in upright:
                groups.setdefault(im.shape, []).append(im)
            # Its faster conv form, by 10 timed updates at the run's first shape and batch.
            h, w = next(iter(groups))[:2]
            pick_ms = {}
            for conv in args.torch_conv:
                runner = BatchedTorchRunner(config, h, w, min(args.full_batch, n_tuned), dev,
                                            compile_step=args.torch_compile, conv=conv)
                pick_ms[conv] = runner.time_iters(10) * 1e3
                del runner
            conv = min(pick_ms, key=pick_ms.get)
            t = time.perf_counter()
            bres = []
            for group in groups.values():
                for k in range(0, len(group), args.full_batch):
                    chunk = group[k:k + args.full_batch]
                    bres += tb.segment_batch(chunk, config, tb.initial_state_dicts(config, range(len(chunk))),
                                             device=dev, tf32=args.tf32, compile_step=args.torch_compile,
                                             conv=conv)
            batched_s = time.perf_counter() - t
            out.update(torch_batched_conv=conv, torch_batched_pick_ms_by_conv=pick_ms, torch_batched_images=n_tuned,
                       torch_batched_seconds=batched_s, torch_batched_images_per_s=n_tuned / batched_s,
                       torch_batched_iterations=sorted(r["iterations"] for r in bres),
                       speedup_batched=(len(imgs) / jax_s) / (n_tuned / batched_s))
    return out


def kstar_run(args, save=lambda partial: None) -> dict:
    """The silhouette phase against the device, on real BSDS500 val images.

    Three timings with one compiled engine: (1) k* for every image, computed as the
    runner computes them (``KStarEstimator.estimate_many``: its loader threads and
    ``engine.kstar_processes`` processes): k* estimates per second; (2) the engine alone
    with those k* given: images per second of the device; (3) ``runner.segment``, k* computed ahead while slots
    optimise, as a user's run does, with the time the engine waited for k* while slots
    were running (``input_wait["running"]``: the device stood still). The device never
    waits for k* when (3) matches (2) and that wait is about zero.
    """
    from dynaseg_jax import runner
    imgs = val_images(args.kstar_run, args.full_scale)
    if not imgs:
        return {"error": f"no BSDS500 val images at {BSDS_VAL}"}
    config = load_config(args.kstar_config, overrides(args) + [
        f"engine.batch={args.full_batch}", f"engine.strategy={args.strategy[0]}",
        f"model.conv_impl={args.conv_impl[0]}", f"engine.kstar_processes={args.kstar_processes}"])
    if config.stop.k_min != "silhouette":
        return {"error": f"--kstar-config {args.kstar_config}: stop.k_min is not 'silhouette'"}
    engine = Engine(config)
    kstar = runner.KStarEstimator(engine.config, engine.initial_variables, engine.model)
    names = [str(i) for i in range(len(imgs))]  # the names runner.segment gives arrays
    list(engine.run([WorkItem(-1, imgs[0], 10 ** 6)]))  # compile the step (stops after 1 step)
    kstar(imgs[0], "warm-up")  # compile the feature function, start the k* processes
    t = time.perf_counter()
    ks = kstar.estimate_many(imgs, names)
    kstar_s = time.perf_counter() - t
    out = {"images": len(imgs), "scale": args.full_scale, "config": args.kstar_config,
           "batch": args.full_batch, "kstar_processes": args.kstar_processes,
           "cpu_count": os.cpu_count(), "kstar": ks,
           "kstar_seconds": kstar_s, "kstar_per_s": len(imgs) / kstar_s}
    save(out)
    t = time.perf_counter()
    alone = {r.key: r for r in engine.run(WorkItem(i, im, ks[i], name=names[i]) for i, im in enumerate(imgs))}
    device_s = time.perf_counter() - t
    out.update(device_seconds=device_s, device_images_per_s=len(imgs) / device_s,
               iterations=[alone[i].iterations for i in range(len(imgs))])
    save(out)
    t = time.perf_counter()
    piped = runner.segment(imgs, engine=engine)
    pipeline_s = time.perf_counter() - t
    out.update(pipeline_seconds=pipeline_s, pipeline_images_per_s=len(imgs) / pipeline_s,
               wait_for_kstar_while_running_s=engine.input_wait["running"],
               wait_for_kstar_while_idle_s=engine.input_wait["idle"],
               same_iterations=[r["iterations"] for r in piped] == out["iterations"])
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", nargs="*", default=["64x64", "128x128", "240x160", "481x321"],
                    help="W x H sizes (none, as a bare --size: only --full-run / --kstar-run)")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--strategy", nargs="+", default=["auto"], help="auto, per_image, vmap")
    ap.add_argument("--conv-impl", nargs="+", default=["auto"], help="auto, lax, im2col, winograd, pallas")
    ap.add_argument("--tf32", action="store_true",
                    help="GPU: let both frameworks use TF32 for float32 convs/matmuls (default: strict float32)")
    ap.add_argument("--config", default="dynaseg_scf")
    ap.add_argument("--model", default=None,
                    help="model.name to time (e.g. resnet18_fpn, with random weights unless "
                         "--set model.weights=FILE); the PyTorch side runs its version of it")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                    help="override one config field; repeat for more")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-conv", nargs="+", default=["bmm"], choices=["bmm", "grouped"],
                    help="the tuned PyTorch's 3x3 conv forms to time (torch_batched.CONV_FORMS); the "
                         "faster one is reported")
    ap.add_argument("--torch-compile", action="store_true",
                    help="capture the batched PyTorch update with torch.compile(mode='reduce-overhead')")
    ap.add_argument("--full-run", type=int, default=0, metavar="N",
                    help="also segment N BSDS500 val images with early stopping")
    ap.add_argument("--full-batch", type=int, default=4)
    ap.add_argument("--full-scale", type=float, default=1.0,
                    help="resize the full-run images by this factor (CPU-sized runs)")
    ap.add_argument("--full-torch", type=int, default=0, metavar="N",
                    help="run the PyTorch reference on the first N full-run images only (0: all)")
    ap.add_argument("--full-tuned", type=int, default=0, metavar="N",
                    help="run the tuned PyTorch on the first N full-run images, --full-batch at once "
                         "(0: as many as --full-torch)")
    ap.add_argument("--executed-flops", action="store_true",
                    help="also count each case's executed FLOPs (XLA cost analysis of the step: one "
                         "more compile per case) and report their fraction of the card's peak; not "
                         "for conv_impl pallas, whose kernels XLA does not count")
    ap.add_argument("--memory", action="store_true",
                    help="also report the device memory of one compiled step (XLA's buffer assignment; "
                         "one more compile per case): rows at two batch sizes give the memory per slot")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the card's dense peak for the products' precision (default: CARD_PEAK_TFLOPS "
                         "by device name)")
    ap.add_argument("--kstar-run", type=int, default=0, metavar="N",
                    help="also time the silhouette phase against the device on N BSDS500 val images "
                         "(--full-scale, --full-batch; see kstar_run)")
    ap.add_argument("--kstar-config", default="dynaseg_scf_silhouette",
                    help="preset of --kstar-run (its stop.k_min must be 'silhouette')")
    ap.add_argument("--kstar-processes", type=int, default=0,
                    help="engine.kstar_processes of --kstar-run (0: k* in the loader threads)")
    ap.add_argument("--no-hugepages", action="store_true",
                    help="do not restart with GLIBC_TUNABLES=glibc.malloc.hugetlb=1")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and not args.no_hugepages:
        # Same process set-up as the `dynaseg` command (dynaseg_jax/runtime.py); it
        # applies to both frameworks, which share this process.
        from dynaseg_jax.runtime import hugepages_wanted, TUNABLE
        if hugepages_wanted():
            os.execve(sys.executable, [sys.executable, *sys.argv],
                      dict(os.environ, GLIBC_TUNABLES=TUNABLE, DYNASEG_REEXECED="1"))

    if args.device == "gpu" and jax.default_backend() != "gpu":
        print(f"--device gpu but JAX runs on {jax.default_backend()}", file=sys.stderr)
        return 2
    if args.device == "cpu" and jax.default_backend() != "cpu":
        jax.config.update("jax_platform_name", "cpu")
    model = [f"model.name={args.model}", "model.weights=random"] if args.model else []
    config = load_config(args.config, model + overrides(args) + ["engine.bucket_multiple=1"])
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if args.tf32 else "float32")
    if not args.no_torch:
        import torch
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    roofline = matmul_roofline()
    dev = jax.devices()[0]
    machine = {"device": args.device, "jax_device": str(dev.device_kind), "jax_backend": jax.default_backend(),
               "jax": jax.__version__,
               "jax_platform_version": platform_version(dev),
               "cpu_count": os.cpu_count(), "platform": platform.platform(),
               "matmul_roofline_gflops": roofline, "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
    if not args.no_torch:
        import torch
        machine["torch"] = torch.__version__
        machine["torch_threads"] = torch.get_num_threads()
        if args.device == "gpu":
            machine["torch_device"] = torch.cuda.get_device_name(0)
            machine["torch_cuda"] = torch.version.cuda
            machine["torch_cudnn"] = torch.backends.cudnn.version()
    print(f"# {machine['jax_device']} ({machine['jax_backend']}), {os.cpu_count()} CPUs, "
          f"matmul roofline {roofline:.0f} GFLOP/s (2048^3 float32)")
    hdr = f"{'size':>8} {'batch':>5} {'strategy':>9} {'conv':>6} {'JAX ms/it':>9} {'torch ms/it':>11} " \
          f"{'ratio':>6} {'tuned ms/it':>11} {'ratio':>6} {'JAX GF/s':>8} {'roofl':>6} {'compile s':>9} {'peak MB':>8}"
    print(hdr)
    rows, torch_cache = [], {}
    for size in args.size:
        w, h = (int(v) for v in size.lower().split("x"))
        for batch in args.batch:
            for strategy, conv_impl in [(s, c) for s in args.strategy for c in args.conv_impl]:
                try:
                    row = bench_case(config, h, w, batch, strategy, conv_impl, args, roofline, torch_cache)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory: report, go on
                    print(f"{size:>8} {batch:>5} {strategy:>9} {conv_impl}  failed: {type(e).__name__}: {e}")
                    continue
                rows.append(row)
                if args.json:  # after every row, so that a run cut short keeps its rows
                    write_text_atomic(args.json, json.dumps({**machine, "results": rows, "partial": True}, indent=2))
                tm = f"{row['torch_ms_per_image_iter']:.2f}" if row["torch_ms_per_image_iter"] else "-"
                ra = f"{row['ratio']:.2f}" if row["ratio"] else "-"
                bm = f"{row['torch_batched_ms_per_image_iter']:.2f}" if row["torch_batched_ms_per_image_iter"] else "-"
                rb = f"{row['ratio_batched']:.2f}" if row["ratio_batched"] else "-"
                print(f"{row['size']:>8} {batch:>5} {row['strategy']:>9} {row['conv_impl']:>6} "
                      f"{row['jax_ms_per_image_iter']:9.2f} {tm:>11} {ra:>6} {bm:>11} {rb:>6} {row['jax_gflops']:8.1f} "
                      f"{row['jax_roofline_fraction']:6.2f} {row['jax_compile_s']:9.2f} "
                      f"{row['host_peak_rss_mb']:8.0f}", flush=True)
        torch_cache.clear()
    result = {**machine, "results": rows}

    def saver(key):
        def save(partial):  # a phase's results, kept should the run be cut short
            if args.json:
                write_text_atomic(args.json, json.dumps({**result, key: partial, "partial": True}, indent=2))
        return save

    if args.full_run:
        result["full_run"] = full_run(config, args, saver("full_run"))
        print("full run:", json.dumps(result["full_run"]))
    if args.kstar_run:
        result["kstar_run"] = kstar_run(args, saver("kstar_run"))
        print("k* run:", json.dumps(result["kstar_run"]))
    if len(rows) == 1:
        result.update(rows[0])
        result["strategy"] = rows[0]["strategy"]
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2))
        print(f"json -> {args.json}")
    if args.plot:
        import speed_tables
        if speed_tables.plot([(args.json or "", result)], args.plot):
            print(f"plot -> {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scaling of the batch engine: local devices, processes, and the balance of static shares.

Three measurements, each in fresh processes, written to JSON (and a plot with ``--plot``):

* **devices**: images/s of the vmap engine with the slot axis split over D local devices
  (``engine.devices``, shard_map), ``--per-device`` slots each, and the overhead of the
  sharded path on one device (a one-device mesh against the plain vmap step). On a CPU
  machine the devices are forced (``jax_num_cpu_devices``) and share its cores, so these
  rows measure overhead and correctness of the split, not a speed-up;
* **processes**: wall time and images/s of ``dynaseg segment`` over a folder of mixed-size
  images with 1 process and with 2 processes on JAX's distributed runtime (127.0.0.1),
  and whether the 2-process labels equal the 1-process labels;
* **balance**: the slowest share against the mean share when P processes split the same
  images with the runner's static shares (sorted by bucket, round-robin), from the
  per-image seconds measured in the 1-process run (``--results FILE`` takes them from
  any finished run's results.jsonl instead, e.g. a BSDS500 run), against contiguous
  blocks of the same order.

What one machine cannot measure (several GPUs, several hosts) is reported as
"not measured".

Usage::

    python benchmarks/bench_scale.py --json benchmarks/results/scale_cpu.json --plot benchmarks/results/scale_cpu.png
    python benchmarks/bench_scale.py --only balance --results runs/bsds_val/dynaseg_fsf/results.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = """
[model]
channels = 16
max_clusters = 16
conv_impl = "lax"
[stop]
max_iters = {iters}
k_min = 3
[engine]
bucket_multiple = 8
strategy = "per_image"
batch = 1
"""

DEVICES_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import jax
    jax.config.update("jax_num_cpu_devices", {max_devices})
    import numpy as np
    from jax.sharding import Mesh
    from dynaseg_jax.config import Config
    from dynaseg_jax.engine import Engine, WorkItem
    from benchmarks.bench_speed import synthetic_image

    base = Config().replace({{"model.channels": 16, "model.max_clusters": 16, "model.conv_impl": "{conv}",
                             "stop.max_iters": {iters}, "stop.k_min": 1, "engine.bucket_multiple": 8,
                             "engine.strategy": "vmap", "engine.sync_every": 1}})
    images = [synthetic_image({h}, {w}, i) for i in range({n})]

    def timed(devices, one_device_mesh=False):
        cfg = base.replace({{"engine.devices": devices, "engine.batch": {per_device} * devices}})
        mesh = Mesh(np.array(jax.local_devices()[:1]), ("slots",)) if one_device_mesh else None
        engine = Engine(cfg, mesh=mesh)
        list(engine.run(WorkItem(i, im, 1) for i, im in enumerate(images[:devices * {per_device}])))  # compile
        best = float("inf")
        for _ in range({repeats}):
            t0 = time.perf_counter()
            labels = {{r.key: r.labels for r in engine.run(WorkItem(i, im, 1) for i, im in enumerate(images))}}
            best = min(best, time.perf_counter() - t0)
        return best, labels

    rows, ref = [], None
    for devices, sharded in [(1, False), (1, True)] + [(d, True) for d in {device_counts} if d > 1]:
        seconds, labels = timed(devices, one_device_mesh=sharded and devices == 1)
        rows.append({{"devices": devices, "sharded": sharded, "seconds": seconds,
                     "images_per_s": len(images) / seconds}})
        if devices == 1 and not sharded:
            ref = labels
        else:
            # Same slots per device: the computation of a one-device run, fused differently by
            # XLA inside a multi-device program (float32 rounding apart): labels differ only
            # at near-tied pixels.
            rows[-1]["labels_equal_one_device"] = all(np.array_equal(labels[k], ref[k]) for k in ref)
            rows[-1]["pixels_differing_max"] = max(float(np.mean(labels[k] != ref[k])) for k in ref)
    print(json.dumps(rows))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_devices(args) -> list[dict]:
    h, w = (int(x) for x in args.size.split("x"))
    script = DEVICES_SCRIPT.format(max_devices=max(args.devices), conv=args.conv_impl, iters=args.iters,
                                   h=h, w=w, n=args.images, per_device=args.per_device,
                                   repeats=args.repeats, device_counts=tuple(args.devices))
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode:
        raise SystemExit(f"devices run failed: {out.stderr[-2000:]}")
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    base = rows[0]["images_per_s"]
    for r in rows:
        r["relative_to_one_device"] = r["images_per_s"] / base
    return rows


def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` smooth synthetic images of mixed sizes (four buckets)."""
    from PIL import Image

    from benchmarks.bench_speed import synthetic_image
    folder = root / "in"
    folder.mkdir()
    rng = np.random.default_rng(seed)
    sizes = [(32, 48), (48, 64), (40, 40), (64, 96)]
    for i in range(n):
        h, w = sizes[rng.integers(len(sizes))]
        img = synthetic_image(int(h), int(w), i)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"img{i:03d}.png")
    return folder


def segment_cmd(folder: Path, out: Path, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dynaseg_jax.cli", "segment", str(folder), "--out", str(out),
            "--config", str(config), "--no-progress", *extra]


def run_processes(args, root: Path) -> tuple[dict, Path]:
    from dynaseg_jax import images as imio

    folder = make_folder(root, args.folder_images)
    config = root / "tiny.toml"
    config.write_text(TINY.format(iters=args.process_iters))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    subprocess.run(segment_cmd(folder, root / "one", config), check=True, env=env, stdout=subprocess.DEVNULL)
    one = time.perf_counter() - t0
    port = free_port()
    t0 = time.perf_counter()
    procs = [subprocess.Popen(segment_cmd(folder, root / "two", config, "--coordinator", f"127.0.0.1:{port}",
                                          "--num-processes", "2", "--process-id", str(i)),
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    ends = []
    for p in procs:
        _, err = p.communicate()
        ends.append(time.perf_counter() - t0)
        if p.returncode:
            raise SystemExit(f"2-process run failed: {err[-2000:]}")
    two = max(ends)
    recs1 = {r["source"]: r for r in imio.read_jsonl(root / "one" / "results.jsonl") if r["status"] == "ok"}
    recs2 = {r["source"]: r for r in imio.read_jsonl(root / "two" / "results.jsonl") if r["status"] == "ok"}
    equal = sorted(recs1) == sorted(recs2) and all(
        np.array_equal(imio.read_labels(root / "one" / f"{r['stem']}.png"),
                       imio.read_labels(root / "two" / f"{r['stem']}.png")) for r in recs1.values())
    n = len(recs1)
    return ({"images": n, "one_process_seconds": one, "two_process_seconds": two,
             "two_process_ends": ends, "one_process_images_per_s": n / one, "two_process_images_per_s": n / two,
             "two_process_labels_equal_one_process": bool(equal),
             "note": "wall time of whole commands (start-up and compilation included); both processes "
                     "share this machine's cores"}, root / "one" / "results.jsonl")


def share_balance(results: Path, counts=(2, 4, 8)) -> dict:
    """max/mean of the summed per-image seconds of P static shares (the runner's sorted
    round-robin, and contiguous blocks of the same order)."""
    from dynaseg_jax import images as imio
    from dynaseg_jax.config import Config, load_config
    from dynaseg_jax.runner import _share

    records = [r for r in imio.read_jsonl(results) if r.get("status") == "ok" and r.get("seconds")]
    folder = results.parent
    cfg_path = folder / "config.toml"
    cfg = load_config(str(cfg_path)) if cfg_path.exists() else Config()
    seconds = {r["source"]: float(r["seconds"]) for r in records}
    jobs = [(r["file"], r["source"], r["stem"], Path(r["source"]) if Path(r["source"]).exists() else (lambda: None))
            for r in records]
    out = {"results": str(results), "images": len(records),
           "seconds_per_image": {"min": min(seconds.values()), "max": max(seconds.values()),
                                 "mean": float(np.mean(list(seconds.values())))}, "shares": []}
    for p in counts:
        if p > len(records):
            continue
        rr = [sum(seconds[j[1]] for j in _share(jobs, i, p, 1.0, cfg)) for i in range(p)]
        ordered = _share(jobs, 0, 1, 1.0, cfg)
        blocks = [sum(seconds[j[1]] for j in part) for part in np.array_split(np.array(ordered, dtype=object), p)]
        out["shares"].append({"processes": p, "round_robin_max_over_mean": max(rr) / float(np.mean(rr)),
                              "contiguous_max_over_mean": max(blocks) / float(np.mean(blocks))})
    return out


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if report.get("devices"):
        rows = report["devices"]
        labels = [f"{r['devices']}{' (mesh)' if r['sharded'] and r['devices'] == 1 else ''}" for r in rows]
        axes[0].bar(labels, [r["images_per_s"] for r in rows])
        axes[0].set(title="vmap engine, forced devices\n(on a CPU they share its cores)",
                    xlabel="devices", ylabel="images / s")
    if report.get("processes"):
        p = report["processes"]
        axes[1].bar(["1 process", "2 processes"], [p["one_process_images_per_s"], p["two_process_images_per_s"]])
        axes[1].set(title="dynaseg segment, whole commands", ylabel="images / s")
    for name, bal in (("mixed-size folder", report.get("balance")), ("--results run", report.get("balance_results"))):
        if bal:
            ps = [s["processes"] for s in bal["shares"]]
            axes[2].plot(ps, [s["round_robin_max_over_mean"] for s in bal["shares"]], "o-",
                         label=f"{name}: sorted round-robin")
            axes[2].plot(ps, [s["contiguous_max_over_mean"] for s in bal["shares"]], "x--",
                         label=f"{name}: contiguous blocks")
    axes[2].axhline(1.2, color="gray", lw=0.8)
    axes[2].set(title="static shares: slowest / mean", xlabel="processes")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("devices", "processes", "balance"), action="append",
                    help="run only these parts (repeatable; default all)")
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4], help="device counts")
    ap.add_argument("--per-device", type=int, default=2, help="slots per device")
    ap.add_argument("--images", type=int, default=16, help="images of the devices part")
    ap.add_argument("--size", default="48x64", help="HxW of the devices part's images")
    ap.add_argument("--iters", type=int, default=20, help="iterations per image, devices part")
    ap.add_argument("--conv-impl", default="winograd")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--folder-images", type=int, default=24, help="images of the processes part")
    ap.add_argument("--process-iters", type=int, default=80,
                    help="stop.max_iters of the processes part (k_min 3 stops some earlier)")
    ap.add_argument("--results", help="also compute the balance from this finished run's results.jsonl")
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--plot", help="write a PNG plot here (needs matplotlib: the bench extra)")
    args = ap.parse_args(argv)
    parts = args.only or ["devices", "processes", "balance"]
    import jax
    report = {"host": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                       "backend": jax.default_backend()},
              "not_measured": ["several GPUs on one host", "several hosts"]}
    if "devices" in parts:
        report["devices"] = run_devices(args)
        for r in report["devices"]:
            print(f"devices {r['devices']}{' (1-device mesh)' if r['sharded'] and r['devices'] == 1 else ''}: "
                  f"{r['images_per_s']:.2f} images/s ({r['relative_to_one_device']:.2f}x one device)"
                  + (f", labels equal to one device: {r['labels_equal_one_device']} (pixels differing: at most "
                     f"{100 * r['pixels_differing_max']:.3f}% of an image)" if "labels_equal_one_device" in r else ""))
    with tempfile.TemporaryDirectory() as tmp:
        results = None
        if "processes" in parts or "balance" in parts:
            report["processes"], results = run_processes(args, Path(tmp))
            p = report["processes"]
            print(f"processes: 1 -> {p['one_process_images_per_s']:.2f} images/s, 2 -> "
                  f"{p['two_process_images_per_s']:.2f} images/s; 2-process labels equal: "
                  f"{p['two_process_labels_equal_one_process']}")
        if "balance" in parts:
            report["balance"] = share_balance(results)
    if args.results:
        report["balance_results"] = share_balance(Path(args.results))
    for key in ("balance", "balance_results"):
        for s in report.get(key, {}).get("shares", []):
            print(f"{key} ({report[key]['images']} images), {s['processes']} processes: slowest/mean "
                  f"{s['round_robin_max_over_mean']:.3f} sorted round-robin, "
                  f"{s['contiguous_max_over_mean']:.3f} contiguous blocks")
    print("not measured: " + "; ".join(report["not_measured"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

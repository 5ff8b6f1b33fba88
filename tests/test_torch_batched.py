"""The batched PyTorch opponent (``benchmarks/torch_batched.py``) runs the reference's
algorithm: one update within float32 rounding of a float64 reference update, the same
labels and iteration counts over a short run, finished images frozen exactly."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require, smooth_image

torch = require("torch")

REPO = Path(__file__).resolve().parents[1]
U32 = 2.0 ** -24  # float32 unit roundoff


def _load(name):
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


batched = _load("torch_batched")
ref = batched.ref
SHAPE = (20, 28)


@pytest.fixture(scope="module")
def setup(tiny_config):
    config = tiny_config.replace({"schedule.kind": "fsf", "schedule.alpha": 15.0, "optim.weight_decay": 1e-4})
    images = [smooth_image(*SHAPE, s) for s in range(3)]
    return config, images, batched.initial_state_dicts(config, seeds=[0, 1, 2])


def reference_update(config, image, state_dict, dtype):
    """One update of the reference (torch_reference) in ``dtype``: the new parameters."""
    model = ref.build_model(config).to(dtype)
    model.load_state_dict(state_dict)
    optimizer = ref.make_optimizer(model, config)
    optimizer.zero_grad()
    loss, _ = ref.loss_terms(model(ref.image_to_tensor(image, dtype=dtype)), ref.make_schedule(config), 0)
    loss.backward()
    optimizer.step()
    return batched.stack_state_dicts([model.state_dict()], config.model.n_conv)


@pytest.mark.parametrize("conv", batched.CONV_FORMS)
@pytest.mark.parametrize("padding", ["zeros", "reflect"])
def test_one_update_matches_the_reference(setup, padding, conv):
    config, images, sds = setup
    config = config.replace({"model.padding": padding})
    params = {k: v.requires_grad_(True) for k, v in batched.stack_state_dicts(sds, config.model.n_conv).items()}
    start = {k: v.detach().clone() for k, v in params.items()}
    momenta = {k: torch.zeros_like(v) for k, v in params.items()}
    x = torch.cat([ref.image_to_tensor(im) for im in images])
    update = batched.make_update(config, *SHAPE, padding, conv)
    update(params, momenta, x, torch.ones(3, dtype=torch.bool))
    n = SHAPE[0] * SHAPE[1]
    for i, (image, sd) in enumerate(zip(images, sds)):
        truth = reference_update(config, image, {k: v.double() for k, v in sd.items()}, torch.float64)
        theirs = reference_update(config, image, sd, torch.float32)
        for name, p in params.items():
            t = truth[name][0].numpy()
            ours, other = p[i].detach().double().numpy(), theirs[name][0].double().numpy()
            moved = np.linalg.norm(t - start[name][i].double().numpy())
            # The reference's own float32 error, times 4 for another reduction order
            # (bmm or a grouped conv against oneDNN's conv), plus a floor: a gradient sums H*W pixels'
            # terms (a random walk of sqrt(n) roundings of the update's size), and the
            # new parameter is rounded once more.
            bound = (4 * np.linalg.norm(other - t) + 4 * U32 * math.sqrt(n) * moved
                     + U32 * np.linalg.norm(t))
            assert np.linalg.norm(ours - t) <= bound, (padding, conv, i, name)


@pytest.mark.parametrize("conv", batched.CONV_FORMS)
def test_short_runs_equal_the_reference_and_finished_images_freeze(setup, conv):
    config, images, sds = setup
    config = config.replace({"stop.max_iters": 4})
    # Image 0 stops after its first update (k_min = q); the others run all 4. The stop
    # flags are read every 3 updates, so image 0 takes 2 more steps frozen.
    k_mins = [config.model.max_clusters, 1, 1]
    got = batched.segment_batch(images, config, sds, k_mins=k_mins, check_every=3, conv=conv)
    for i, (image, sd) in enumerate(zip(images, sds)):
        want = ref.segment_image(image, config, init_state_dict=sd, k_min=k_mins[i])
        assert got[i]["iterations"] == want["iterations"] == (1 if i == 0 else 4)
        # Few updates from smooth images: no near-tie of r' flips a label yet.
        np.testing.assert_array_equal(got[i]["labels"], want["labels"])
    with pytest.raises(ValueError, match="images of one size"):
        batched.segment_batch([images[0], images[0][:10]], config, sds[:2])

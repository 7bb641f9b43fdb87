"""How close sampled volumes are to the head phantoms they were meant to imitate.

    python -m pydiffmed.demo.evaluate [--model demo] [--num 8] [--solver dpmpp_2m] [--steps 20]

prints the distances of `compare_to_phantoms` for the model's samples and, as yardsticks, for a second set of
fresh phantoms (the floor), for clipped Gaussian noise and for the samples of an untrained network of the same
architecture (the ceilings; for a latent model the untrained UNet's latents go through the trained autoencoder).
The reference phantoms are family 1, which training (family 0) never sees.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .. import data

REFERENCE_FAMILY = 1


def compare_to_phantoms(volumes, reference) -> dict:
    """Distances (0 = alike) between a set of volumes and a set of phantoms, both (B, 1, D, H, W) in [-1, 1]:
      histogram: Wasserstein-1 distance of the pooled intensity histograms;
      fractions: L1 distance of the mean tissue-class fractions (background, bone, brain, lesion, CSF);
      structure: mean absolute difference, over background, bone and brain, of the share of the class held by
        its largest connected component (one head in one piece: ≈1 for phantoms, far lower for noise)."""
    fractions = (data.tissue_fractions(volumes).mean(0) - data.tissue_fractions(reference).mean(0)).abs().sum()
    largest = [data.component_statistics(v)["largest_fraction"][:, :3].mean(0) for v in (volumes, reference)]
    return {"histogram": data.intensity_histogram_distance(volumes, reference),
            "fractions": float(fractions),
            "structure": float((largest[0] - largest[1]).abs().mean())}


def sample_volumes(model, schedule, info, num, solver="dpmpp_2m", steps=20, seed=0, dtype=None, autoencoder=None):
    """`num` volumes of the model; a latent model's (info.is_latent) are decoded by `autoencoder`."""
    from ..engine import sample

    latent = {} if autoencoder is None else {"autoencoder": autoencoder, "scale_factor": info.scale_factor}
    return sample(model, shape=(num, *info.latent_shape()), solver=solver, num_steps=steps, schedule=schedule,
                  seed=seed, prediction_type=info.prediction_type, clip=info.clip_sample, dtype=dtype,
                  progress=False, **latent)


def evaluate(model_name="demo", num=8, solver="dpmpp_2m", steps=20, seed=0, dtype=None) -> dict:
    """compare_to_phantoms for the model's samples and for the yardsticks (see the module docstring)."""
    from ..modelfile import load_autoencoder, load_model
    from ..models import UNet3D

    model, schedule, info = load_model(model_name)
    autoencoder = load_autoencoder(model_name, dtype=dtype) if info.is_latent else None
    shape = tuple(info.volume_shape)
    reference = data.phantoms(num, seed=REFERENCE_FAMILY, shape=shape)
    torch.manual_seed(seed)
    untrained = UNet3D(**info.unet).eval()
    noise = torch.randn((num, 1, *shape), generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
    candidates = {
        "model": sample_volumes(model, schedule, info, num, solver, steps, seed, dtype, autoencoder),
        "phantoms": data.phantoms(num, seed=REFERENCE_FAMILY, shape=shape, start=num),
        "noise": noise,
        "untrained": sample_volumes(untrained, schedule, info, num, solver, steps, seed, dtype, autoencoder),
    }
    return {name: compare_to_phantoms(volumes, reference) for name, volumes in candidates.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pydiffmed.demo.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--num", type=int, default=8)
    parser.add_argument("--solver", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="run the networks in bfloat16 (state float32)")
    args = parser.parse_args(argv)
    results = evaluate(args.model, args.num, args.solver, args.steps, args.seed,
                       torch.bfloat16 if args.bf16 else None)
    print(f"{'':<10}" + "".join(f"{key:>12}" for key in next(iter(results.values()))))
    for name, distances in results.items():
        print(f"{name:<10}" + "".join(f"{value:12.4f}" for value in distances.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sample quality of the bundled demo models: pydiffmed.demo.evaluate's distances to unseen head phantoms, with
fresh phantoms (the floor), clipped Gaussian noise and an untrained network of the same architecture (ceilings).

    python benchmarks/bench_demo_quality.py [--quick] [--model demo,demo_latent] [--num N] [--solver dpmpp_2m]
                                            [--steps 20] [--smoke]

--model: the models, comma-separated (default: the pixel demo at 32³ and the latent demo at 128³). --quick and the
default use 8 volumes per set (a few minutes on 2 CPU cores); --smoke: 2 volumes, 2 steps (tests).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import save  # noqa: E402
from pydiffmed.demo import evaluate  # noqa: E402

COLUMNS = ["model", "volumes", "histogram_W1", "fractions_L1", "structure", "vs_noise_histogram"]
LABELS = {"model": "demo samples", "phantoms": "fresh phantoms (floor)", "noise": "clipped Gaussian noise",
          "untrained": "untrained network, same sampler"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the default sizes (kept for run_all.py)")
    parser.add_argument("--smoke", action="store_true", help="2 volumes, 2 steps (tests)")
    parser.add_argument("--model", default="demo,demo_latent", help="models, comma-separated")
    parser.add_argument("--num", type=int, default=None)
    parser.add_argument("--solver", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    num = args.num or (2 if args.smoke else 8)
    steps = args.steps or (2 if args.smoke else 20)
    rows = []
    for model in args.model.split(","):
        results = evaluate.evaluate(model, num=num, solver=args.solver, steps=steps)
        noise = results["noise"]["histogram"]
        rows += [{"model": model, "volumes": f"{num} {LABELS[name]}", "histogram_W1": d["histogram"],
                  "fractions_L1": d["fractions"], "structure": d["structure"],
                  "vs_noise_histogram": d["histogram"] / noise} for name, d in results.items()]
    notes = (f"Models {args.model!r}, {args.solver} {steps} steps, fp32, seed 0; reference: {num} phantoms of family "
             f"{evaluate.REFERENCE_FAMILY} (training used family 0). Distances (0 = alike) from "
             "pydiffmed.demo.evaluate.compare_to_phantoms: histogram_W1 = Wasserstein-1 distance of the pooled "
             "intensity histograms; fractions_L1 = L1 distance of the mean tissue-class fractions; structure = mean "
             "|difference| of the largest connected component's share of background, bone and brain.")
    print(save("bench_demo_quality", rows, COLUMNS, notes))


if __name__ == "__main__":
    main()

"""Feature caching (DeepCache-style, `feature_cache=N`): the speed-up of sampling the bundled demo model and what it
costs in sample quality, against the same sampler without caching, measured in the same run.

    python benchmarks/bench_feature_cache.py [--quick | --smoke] [--model demo] [--steps 20] [--num 8] [--batch 1]
                                             [--repeats R] [--threads N] [--device cpu|cuda]

Rows: no cache, interval 2 and 3 at branch 0 (the shallowest skip connection: conv_in, the last up resnet and the
output are recomputed between full evaluations), then interval 2 and 3 at the branch of the first model level (the
first down block and the last up block are recomputed). Time: interleaved medians of whole `Sampler` runs of
--batch volumes (wall and process CPU time: speedup and cpu_speedup; on a loaded machine the CPU-time ratio
with --threads 1 is the steadier). Quality: --num volumes sampled with
each setting from the same seeds, scored by pydiffmed.demo.evaluate.compare_to_phantoms against unseen phantoms
(0 = alike; bench_demo_quality.py gives the yardsticks), and the RMS change of the volumes against the uncached
ones relative to their RMS. --smoke: 2 steps, 2 volumes, 1 repeat (tests).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import interleaved_medians, save  # noqa: E402

from pydiffmed import data  # noqa: E402
from pydiffmed.demo import evaluate  # noqa: E402
from pydiffmed.engine import Sampler  # noqa: E402
from pydiffmed.modelfile import load_model  # noqa: E402

COLUMNS = ["feature_cache", "cache_branch", "steps", "evals", "full_evals", "batch", "ms", "cpu_ms", "speedup",
           "cpu_speedup", "histogram_W1", "fractions_L1", "structure", "rel_rms_change"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the default sizes (kept for run_all.py)")
    parser.add_argument("--smoke", action="store_true", help="2 steps, 2 volumes, 1 repeat (tests)")
    parser.add_argument("--model", default="demo", help="a bundled model name or a model directory")
    parser.add_argument("--solver", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=None, help="solver steps (default 20)")
    parser.add_argument("--num", type=int, default=None, help="volumes per quality set (default 8)")
    parser.add_argument("--batch", type=int, default=1, help="volumes per timed run (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per setting (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available")
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.smoke else 20)
    num = args.num or (2 if args.smoke else 8)
    repeats = args.repeats or (1 if args.smoke else 5)
    if min(steps, num, repeats, args.batch, args.threads or 1) < 1:
        parser.error("--steps, --num, --batch, --repeats and --threads must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, schedule, info = load_model(args.model, device=device)
    settings = [(None, None), (2, 0), (3, 0)]
    level_branch = model.cache_branch_of_level(1) if len(model.block_out_channels) > 1 else None
    if level_branch is not None and level_branch != 0:
        settings += [(2, level_branch), (3, level_branch)]

    def sampler(cache, branch, batch):
        return Sampler(model, args.solver, (batch, info.channels, *info.volume_shape), num_steps=steps,
                       schedule=schedule, prediction_type=info.prediction_type, clip=info.clip_sample,
                       feature_cache=cache, cache_branch=branch, device=device)

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    timed = {setting: sampler(*setting, args.batch) for setting in settings}
    times = interleaved_medians({setting: (lambda s=s: s(0)) for setting, s in timed.items()}, device, repeats,
                                warmup=1)
    reference = data.phantoms(num, seed=evaluate.REFERENCE_FAMILY, shape=tuple(info.volume_shape))
    plain = None
    rows = []
    for setting in settings:
        cache, branch = setting
        run = sampler(cache, branch, num)
        volumes = run(0).float().cpu()
        plain = volumes if plain is None else plain
        scores = evaluate.compare_to_phantoms(volumes, reference)
        wall, cpu = times[setting]
        schedule_kinds = run.cache_schedule()
        rows.append({"feature_cache": "off" if cache is None else cache, "cache_branch": branch, "steps": steps,
                     "evals": len(schedule_kinds), "full_evals": sum(k != "shallow" for k in schedule_kinds),
                     "batch": args.batch, "ms": wall * 1e3, "cpu_ms": cpu * 1e3,
                     "speedup": times[settings[0]][0] / wall, "cpu_speedup": times[settings[0]][1] / cpu,
                     "histogram_W1": scores["histogram"],
                     "fractions_L1": scores["fractions"], "structure": scores["structure"],
                     "rel_rms_change": float((volumes - plain).pow(2).mean().sqrt() / plain.pow(2).mean().sqrt())})
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    notes = (f"Model {args.model!r} ({'×'.join(map(str, info.volume_shape))}), {args.solver} {steps} steps, fp32, "
             f"{device}, {torch.get_num_threads()} thread(s); time: medians of {repeats} interleaved runs of a batch "
             f"of {args.batch} (speedup: the wall-time ratio to no cache; cpu_speedup: the process-CPU-time ratio, the "
             f"steadier on a loaded machine with --threads 1); quality: {num} volumes per setting, seed 0, against "
             f"{num} phantoms of family {evaluate.REFERENCE_FAMILY} (pydiffmed.demo.evaluate.compare_to_phantoms, 0 = "
             f"alike); rel_rms_change: the RMS of the change of the volumes against the uncached ones, relative to "
             f"their RMS. cache_branch {level_branch} recomputes the first model level. 1-minute load average: "
             f"{load_before:.2f} at the start, {load:.2f} at the end.")
    print(save("bench_feature_cache", rows, COLUMNS, notes))


if __name__ == "__main__":
    main()

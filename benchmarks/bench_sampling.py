"""Full sampling: pydiffmed's engine with UNet3D vs MONAI's DiffusionInferer + DiffusionModelUNet, same weights.

Model: the "small" configuration of bench_unet.py (channels (32, 64, 64), attention at the last level, one res
block, 16 groups), batch 1, one channel, random non-zero weights; UNet3D is built from the MONAI model
(UNet3D.from_monai), so both compute the same function.

Cases, per volume (32³, and 64³ unless --quick) and model dtype (fp32, bf16; on a GPU also fp16):
  * DDIM, 20 steps, whole run: MONAI `DiffusionInferer.sample` with `DDIMScheduler(clip_sample=False)` (20
    timesteps) vs `pydiffmed.Sampler` with `DDIM(spacing="monai", prev_rule="stride")` (MONAI's grid and
    previous-step rule), state fp32. For fp32 the two final volumes from the same initial noise are compared
    (max_abs_diff: they must agree).
  * DDPM, 1000 steps, per step: MONAI's inferer with `DDPMScheduler` whose timestep list is cut to the first
    --ddpm-steps steps; pydiffmed with the 1000-step DDPM plan run from SDEdit strength --ddpm-steps/1000 (its
    last steps). Time per step = run time / steps (every step costs the same: one forward and one update).
  * UNet3D forward alone (timed with the DDPM runs), for the engine's own per-step cost (step - forward).
On a GPU: pydiffmed eager and with CUDA graphs, and torch.compile(MONAI) (mode "max-autotune") in MONAI's loop.
Variants of a case are timed interleaved, round by round (as bench_unet.py does), so machine load hits them
alike; ms = median wall time, speed-ups against MONAI at the same dtype (same rounds) and MONAI fp32 (the
fp32 case of the volume).

    python benchmarks/bench_sampling.py [--quick] [--repeats N] [--ddpm-steps K] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_unet import CONFIGS, DTYPE_NAMES, randomize_  # noqa: E402
from common import interleaved_medians, save  # noqa: E402
import pydiffmed  # noqa: E402
from pydiffmed.models import UNet3D  # noqa: E402
from pydiffmed.schedules import NoiseSchedule  # noqa: E402
from pydiffmed.solvers import DDIM, DDPM  # noqa: E402

DDIM_STEPS = 20
SCHEDULE = NoiseSchedule.discrete("linear")  # MONAI's default linear_beta, 1000 steps


def monai_runner(model, scheduler_name, noise, ddpm_steps=None):
    """A callable running MONAI's DiffusionInferer.sample once from `noise`."""
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    if scheduler_name == "ddim":
        scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
        scheduler.set_timesteps(DDIM_STEPS)
    else:
        scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
        scheduler.set_timesteps(1000)
        scheduler.timesteps = scheduler.timesteps[:ddpm_steps]
    inferer = DiffusionInferer(scheduler)
    return lambda: inferer.sample(noise, model, scheduler, verbose=False)


def run_case(size, dtype, device, repeats, ddpm_steps):
    """Median (wall, process CPU) seconds of every variant: {"ddim": {...}, "ddpm": {...}} (DDPM values for
    ddpm_steps steps; its set includes the UNet3D forward run ddpm_steps times), and the fp32 DDIM
    agreement with MONAI (None for other dtypes)."""
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(0)
    monai32 = randomize_(DiffusionModelUNet(spatial_dims=3, in_channels=1, out_channels=1, **CONFIGS["small"]))
    monai32 = monai32.eval().to(device)
    name = DTYPE_NAMES[dtype]
    monai = copy.deepcopy(monai32).to(dtype) if dtype != torch.float32 else monai32
    unet = UNet3D.from_monai(monai32).eval().to(dtype)
    shape = (1, 1, size, size, size)
    noise32 = torch.randn(shape, device=device)
    noise = noise32.to(dtype)

    ddim = DDIM(SCHEDULE, DDIM_STEPS, spacing="monai", prev_rule="stride")
    ddpm = DDPM(SCHEDULE, 1000)
    graph_modes = (False, True) if device == "cuda" else (False,)
    t_forward = torch.full((1,), 500.0, device=device)
    init = torch.zeros(shape, device=device)
    with torch.no_grad():
        fns = {"ddpm": {f"MONAI {name}": monai_runner(monai, "ddpm", noise, ddpm_steps),
                        f"UNet3D {name} forward": lambda: [unet(noise, t_forward) for _ in range(ddpm_steps)]},
               "ddim": {f"MONAI {name}": monai_runner(monai, "ddim", noise)}}
        samplers = {}
        for graphs in graph_modes:
            label = f"pydiffmed {name}" + (" + CUDA graphs" if graphs else "")
            ddim_sampler = pydiffmed.Sampler(unet, ddim, shape, dtype=dtype, cuda_graph=graphs)
            ddpm_sampler = pydiffmed.Sampler(unet, ddpm, shape, dtype=dtype, cuda_graph=graphs,
                                             strength=ddpm_steps / 1000)
            fns["ddim"][label] = (lambda s=ddim_sampler: s(0))
            fns["ddpm"][label] = (lambda s=ddpm_sampler: s(0, init=init))
            samplers[label] = ddim_sampler
        if device == "cuda":
            compiled = torch.compile(copy.deepcopy(monai), mode="max-autotune")
            fns["ddim"][f"torch.compile(MONAI) {name}"] = monai_runner(compiled, "ddim", noise)
            fns["ddpm"][f"torch.compile(MONAI) {name}"] = monai_runner(compiled, "ddpm", noise, ddpm_steps)

        agreement = None
        if dtype == torch.float32:
            ours = samplers[f"pydiffmed {name}"](0, x_T=noise32)
            theirs = fns["ddim"][f"MONAI {name}"]()
            agreement = float((ours - theirs.float()).abs().max())
        # the DDPM set warms every model up (compilation, oneDNN primitives), so whole DDIM runs need no warm-up
        medians = {"ddpm": interleaved_medians(fns["ddpm"], device, repeats, warmup=1),
                   "ddim": interleaved_medians(fns["ddim"], device, max(1, repeats // 2), warmup=0)}
    return medians, agreement


def make_rows(size, name, medians, agreement, ddpm_steps, monai_fp32):
    """Table rows of one case; monai_fp32 = {"ddim": s, "ddpm": s} from the fp32 case of this volume."""
    forward = medians["ddpm"][f"UNet3D {name} forward"]
    forward_ms = forward[0] / ddpm_steps * 1e3
    rows = []
    for case, title, per in (("ddim", f"DDIM {DDIM_STEPS} steps (whole run)", 1),
                             ("ddpm", "DDPM 1000 steps (per step)", ddpm_steps)):
        same = medians[case][f"MONAI {name}"][0] / per
        fp32 = monai_fp32[case] / per
        for variant, (seconds, cpu_seconds) in medians[case].items():
            if variant.endswith("forward"):
                continue
            ms = seconds / per * 1e3
            row = {"volume": f"{size}³", "dtype": name, "case": title, "variant": variant, "ms": ms,
                   "speedup_vs_MONAI_same_dtype": same / (seconds / per),
                   "speedup_vs_MONAI_fp32": fp32 / (seconds / per), "cpu_ms": cpu_seconds / per * 1e3}
            if case == "ddpm" and variant.startswith("pydiffmed"):
                row["engine_ms_per_step"] = ms - forward_ms
            if case == "ddim" and variant == f"pydiffmed {name}" and agreement is not None:
                row["max_abs_diff_vs_MONAI"] = agreement
            rows.append(row)
            print(f"{size}³ {name:5s} {title:30s} {variant:38s} {ms:10.1f} ms  "
                  f"×{row['speedup_vs_MONAI_same_dtype']:5.2f} vs MONAI {name}  "
                  f"×{row['speedup_vs_MONAI_fp32']:5.2f} vs MONAI fp32", flush=True)
    rows.append({"volume": f"{size}³", "dtype": name, "case": "UNet3D forward (per call)",
                 "variant": f"UNet3D {name}", "ms": forward_ms, "cpu_ms": forward[1] / ddpm_steps * 1e3})
    print(f"{size}³ {name:5s} UNet3D forward alone {forward_ms:.1f} ms", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32³ only")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--ddpm-steps", type=int, default=None, help="DDPM steps timed (per-step time)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
    sizes = [32] if args.quick else [32, 64]
    repeats = args.repeats or (3 if device == "cpu" else 10)
    ddpm_steps = args.ddpm_steps or (3 if device == "cpu" else 20)
    rows = []
    for size in sizes:
        monai_fp32 = None
        for dtype in dtypes:
            medians, agreement = run_case(size, dtype, device, repeats, ddpm_steps)
            if dtype == torch.float32:
                monai_fp32 = {case: medians[case]["MONAI fp32"][0] for case in ("ddim", "ddpm")}
            rows += make_rows(size, DTYPE_NAMES[dtype], medians, agreement, ddpm_steps, monai_fp32)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    notes = (f"{'--quick ' if args.quick else ''}repeats={repeats} (DDIM whole runs: {max(1, repeats // 2)}), "
             f"DDPM per-step time from {ddpm_steps} steps, batch 1, torch threads {torch.get_num_threads()}, "
             f"1-min load average at the end {load:.2f}. Model: bench_unet 'small' config, same random weights in "
             "MONAI and UNet3D. pydiffmed state fp32. engine_ms_per_step = sampler time per model evaluation minus "
             "the UNet3D forward alone timed in the same rounds (the solver update, NaN check and loop). Speed-ups "
             "vs MONAI fp32 for half-precision rows use the fp32 case of the same volume (a separate set of "
             "rounds). max_abs_diff_vs_MONAI: final fp32 DDIM volumes from the same initial noise.")
    columns = ["volume", "dtype", "case", "variant", "ms", "speedup_vs_MONAI_same_dtype", "speedup_vs_MONAI_fp32",
               "cpu_ms", "engine_ms_per_step", "max_abs_diff_vs_MONAI"]
    print(save("bench_sampling", rows, columns, notes))


if __name__ == "__main__":
    main()

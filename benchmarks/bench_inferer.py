"""The drop-in MONAI inferer (issue 18): MONAI's DiffusionInferer.sample vs pydiffmed's drop-in
(pydiffmed.integrations.monai.DiffusionInferer), the same call with one import changed, same model and scheduler.

Model: MONAI `DiffusionModelUNet` in bench_unet's "small" configuration (channels 32, 64, 64; attention at the
last level; one res block) with random non-zero weights (bench_unet.randomize_), batch 1, one channel, 32³ (--quick,
the default; --full adds bench_unet's "large" configuration at 32³ and "small" at 64³). DDIM 20 steps, two cases:
* MONAI's default DDIMScheduler (clip_sample=True): MONAI keeps the noise estimate of the unclipped x0, which the
  drop-in runs step by step (accelerated model, two-pass update; no fused loop);
* DDIMScheduler(clip_sample=False): the drop-in runs pydiffmed's engine (fused loop; CUDA graphs on a GPU).
Rows per case: MONAI fp32 (the baseline of every ratio), MONAI under torch.autocast at half precision (the
equal-precision baseline of the half rows), the drop-in fp32 (dtype=None: the model's), and the drop-in
with a half-precision network (CPU: dtype=torch.bfloat16; GPU: torch.float16), solver state fp32. The drop-in
accelerates its own copy of the model in place (pydiffmed.accelerate); MONAI runs the untouched original.
Latent diffusion (issue 14), one more model: MONAI's LatentDiffusionInferer (DDIM, clip_sample=False,
scale_factor 0.5) on a latent DiffusionModelUNet (the "small" configuration with 4 channels in and out) and
bench_decode's AutoencoderKL (4× downsampling), latent 1×4×(S/4)³ → image 1×1×S³ (S = 64), against
pydiffmed.sample(UNet3D.from_monai(unet), ..., autoencoder=AutoencoderKL.from_monai(ae)) on the solver of the
same MONAI scheduler (pydiffmed.solvers.convert.from_monai), fp32 and with both networks in half precision
(solver state fp32), from the same latent noise. And the same for the bundled `demo_latent` model (its trained
UNet and autoencoder loaded into MONAI's modules, its cosine schedule and v-prediction, its scale factor; latent
1×4×32³ → image 128³).

ms: median wall time of one whole `sample` call (cpu_ms: the process's CPU time), all variants of a model timed in
turn within every round
(common.interleaved_medians) after one warm-up round (oneDNN primitives, the drop-in's prepared Sampler, CUDA
graph capture). max_abs_diff_vs_MONAI: the final volumes of the last timed runs (same input_noise; DDIM is
deterministic); MONAI_max_abs gives the scale. With random weights and clip_sample=True the trajectory amplifies
rounding (each step's clamp decides which voxels keep the network's x0), so its half-precision row differs by much
more than its fp32 row; the unclipped case shows the precision cost itself.

On the CPU the process keeps freed memory for reuse, as the `pydiffmed sample` command does (MONAI's rows gain
from it too); --fresh-pages keeps glibc's defaults.

    python benchmarks/bench_inferer.py [--quick | --full | --smoke] [--repeats R] [--steps S] [--threads N]
                                       [--fresh-pages]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_unet import CONFIGS, randomize_  # noqa: E402
from common import (add_fresh_pages_option, command_line, interleaved_medians, keep_freed_memory_unless,  # noqa: E402
                    save)

CASES = {"DDIM, MONAI default (clip_sample=True)": {}, "DDIM, clip_sample=False": {"clip_sample": False}}
MONAI_LABEL = "MONAI fp32 (monai.inferers.DiffusionInferer)"


def half_dtype(device):
    return torch.float16 if device == "cuda" else torch.bfloat16


def build(config_name, device):
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(0)
    model = DiffusionModelUNet(spatial_dims=3, in_channels=1, out_channels=1, **CONFIGS[config_name])
    return randomize_(model).eval().to(device)


def run_model(config_name, size, device, steps, repeats, warmup):
    """Rows of one model: both cases, every variant."""
    from monai.inferers import DiffusionInferer as MonaiInferer
    from monai.networks.schedulers import DDIMScheduler

    from pydiffmed.integrations.monai import DiffusionInferer

    monai_model = build(config_name, device)
    ours_model = copy.deepcopy(monai_model)      # accelerated in place by the drop-in
    x = torch.randn((1, 1, size, size, size), generator=torch.Generator().manual_seed(1)).to(device)
    half = half_dtype(device)
    half_name = "fp16" if half == torch.float16 else "bf16"
    rows = []
    for case, options in CASES.items():
        def scheduler(options=options):
            s = DDIMScheduler(**options)
            s.set_timesteps(steps)
            return s

        monai_half = f"MONAI {half_name} (torch.autocast)"
        inferers = {MONAI_LABEL: (MonaiInferer(scheduler()), "fp32"),
                    monai_half: (MonaiInferer(scheduler()), half_name),
                    "pydiffmed drop-in fp32": (DiffusionInferer(scheduler()), "fp32"),
                    f"pydiffmed drop-in {half_name} network": (DiffusionInferer(scheduler(), dtype=half), half_name)}
        last, runs = {}, {}

        def call(label, inferer):
            model = monai_model if label.startswith("MONAI") else ours_model
            with torch.autocast(device, dtype=half, enabled=label == monai_half):
                last[label] = inferer.sample(x, model, verbose=False)
            runs[label] = getattr(inferer, "last_run", "MONAI's loop")

        with torch.no_grad():
            fns = {label: (lambda label=label, inf=inf: call(label, inf)) for label, (inf, _) in inferers.items()}
            medians = interleaved_medians(fns, device, repeats, warmup=warmup)
        dtypes = {label: dtype_name for label, (_, dtype_name) in inferers.items()}
        rows += result_rows(config_name, f"{size}³", case, steps, dtypes, medians, last, runs, monai_half)
    return rows


def result_rows(model, volume, case, steps, dtypes, medians, last, paths, monai_half, monai_label=MONAI_LABEL):
    """One row per variant (dtypes: {label: dtype name}), ratios against the MONAI rows of the same rounds."""
    reference = last[monai_label].float()
    monai_ms, monai_cpu = (v * 1e3 for v in medians[monai_label])
    same_precision = {"fp32": monai_ms, dtypes[monai_half]: medians[monai_half][0] * 1e3}
    rows = []
    for label, dtype_name in dtypes.items():
        ms, cpu_ms = (v * 1e3 for v in medians[label])
        row = {"model": model, "volume": volume, "case": case, "variant": label, "dtype": dtype_name,
               "steps": steps, "ms": ms, "ms_per_step": ms / steps, "speedup_vs_MONAI": monai_ms / ms,
               "speedup_vs_MONAI_same_dtype": same_precision[dtype_name] / ms,
               "cpu_ms": cpu_ms, "cpu_speedup_vs_MONAI": monai_cpu / cpu_ms,
               "max_abs_diff_vs_MONAI": float((last[label].float() - reference).abs().max()),
               "MONAI_max_abs": float(reference.abs().max()), "path": paths[label]}
        rows.append(row)
        print(f"{model:>6} {volume} {case:40s} {label:40s} {ms:10.1f} ms ×{row['speedup_vs_MONAI']:6.2f} "
              f"max|Δ| {row['max_abs_diff_vs_MONAI']:.2g} ({row['path']})", flush=True)
    return rows


LATENT_SCALE_FACTOR = 0.5


def random_latent_networks(size, device):
    """(MONAI latent UNet, MONAI autoencoder, latent noise, scheduler options, scale factor): the "small" UNet with
    4 channels and bench_decode's autoencoder, random weights, for an S³ image."""
    from bench_decode import CONFIG as AE_CONFIG
    from bench_decode import FACTOR
    from monai.networks.nets import AutoencoderKL as MonaiAutoencoderKL
    from monai.networks.nets import DiffusionModelUNet

    channels = AE_CONFIG["latent_channels"]
    torch.manual_seed(0)
    unet = randomize_(DiffusionModelUNet(spatial_dims=3, in_channels=channels, out_channels=channels,
                                         **CONFIGS["small"])).eval().to(device)
    autoencoder = randomize_(MonaiAutoencoderKL(**AE_CONFIG)).eval().to(device)
    side = size // FACTOR
    z = torch.randn((1, channels, side, side, side), generator=torch.Generator().manual_seed(1)).to(device)
    return unet, autoencoder, z, {}, LATENT_SCALE_FACTOR


def demo_latent_networks(device):
    """The same for the bundled `demo_latent` model: its trained weights loaded into MONAI's modules, its
    schedule and prediction type, its scale factor, latent noise of its latent shape."""
    import inspect

    from monai.networks.nets import AutoencoderKL as MonaiAutoencoderKL
    from monai.networks.nets import DiffusionModelUNet

    import pydiffmed

    unet, _, info = pydiffmed.load_model("demo_latent")
    autoencoder = pydiffmed.load_autoencoder("demo_latent")

    def monai_module(cls, args, state):
        accepted = inspect.signature(cls).parameters
        module = cls(**{key: value for key, value in args.items() if key in accepted})
        module.load_state_dict(state)
        return module.eval().to(device)

    z = torch.randn((1, *info.latent_shape()), generator=torch.Generator().manual_seed(1)).to(device)
    scheduler = {"schedule": info.config["schedule"]["beta_schedule"], "prediction_type": info.prediction_type}
    return (monai_module(DiffusionModelUNet, info.unet, unet.state_dict()),
            monai_module(MonaiAutoencoderKL, info.autoencoder["args"], autoencoder.state_dict()), z, scheduler,
            info.scale_factor)


def run_latent(model, networks, device, steps, repeats, warmup):
    """MONAI's LatentDiffusionInferer against pydiffmed.sample(..., autoencoder=) on the same `networks`
    (random_latent_networks or demo_latent_networks)."""
    from monai.inferers import LatentDiffusionInferer
    from monai.networks.schedulers import DDIMScheduler

    import pydiffmed
    from pydiffmed.models import AutoencoderKL, UNet3D
    from pydiffmed.solvers.convert import from_monai

    monai_unet, monai_ae, z, scheduler_options, scale_factor = networks
    scheduler = DDIMScheduler(clip_sample=False, **scheduler_options)
    scheduler.set_timesteps(steps)
    solver = from_monai(scheduler)
    half = half_dtype(device)
    half_name = "fp16" if half == torch.float16 else "bf16"
    ours = {"fp32": (UNet3D.from_monai(monai_unet), AutoencoderKL.from_monai(monai_ae))}
    ours[half_name] = tuple(copy.deepcopy(net).to(half) for net in ours["fp32"])
    monai_label = "MONAI fp32 (monai.inferers.LatentDiffusionInferer)"
    monai_half = f"MONAI {half_name} (torch.autocast)"
    dtypes = {monai_label: "fp32", monai_half: half_name, "pydiffmed fp32": "fp32",
              f"pydiffmed {half_name} networks": half_name}
    last = {}

    def call(label):
        if label.startswith("MONAI"):
            with torch.autocast(device, dtype=half, enabled=label == monai_half):
                last[label] = LatentDiffusionInferer(scheduler, scale_factor=scale_factor).sample(
                    z, monai_ae, monai_unet, verbose=False)
        else:
            unet, autoencoder = ours[dtypes[label]]
            last[label] = pydiffmed.sample(unet, tuple(z.shape), solver, x_T=z, autoencoder=autoencoder,
                                           scale_factor=scale_factor, progress=False)

    with torch.no_grad():
        medians = interleaved_medians({label: (lambda label=label: call(label)) for label in dtypes}, device,
                                      repeats, warmup=warmup)
    paths = {label: "MONAI's loop" if label.startswith("MONAI") else "pydiffmed.sample(autoencoder=)"
             for label in dtypes}
    image, side = last[monai_label].shape[2], z.shape[2]
    return result_rows(model, f"{image}³ (latent {side}³)", "LDM DDIM, clip_sample=False", steps, dtypes, medians,
                       last, paths, monai_half, monai_label)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="small 32³ (the default)")
    sizes.add_argument("--full", action="store_true", help="adds large 32³ and small 64³")
    sizes.add_argument("--smoke", action="store_true", help="tiny (tests): small config at 8³, 2 steps, 1 round")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; GPU 5)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 20)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_fresh_pages_option(parser)
    args = parser.parse_args(argv)
    for name in ("repeats", "steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory_note = keep_freed_memory_unless(args.fresh_pages, device)
    steps = args.steps or (2 if args.smoke else 20)
    repeats = args.repeats or (1 if args.smoke else 5 if device == "cuda" else 3)
    warmup = 0 if args.smoke else 1
    models = [("small", 8)] if args.smoke else [("small", 32)]
    if args.full:
        models += [("large", 32), ("small", 64)]
    rows = []
    for config_name, size in models:
        rows += run_model(config_name, size, device, steps, repeats, warmup)
    rows += run_latent("latent small + autoencoder", random_latent_networks(16 if args.smoke else 64, device),
                       device, steps, repeats, warmup)
    rows += run_latent("demo_latent", demo_latent_networks(device), device, steps, repeats, warmup)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    notes = (f"`{command_line()}`: MONAI DiffusionModelUNet (bench_unet configs, random weights), batch 1, DDIM "
             f"{steps} steps from the same input_noise. ms: median of {repeats} interleaved rounds after "
             f"{warmup} warm-up round(s); speedup_vs_MONAI against MONAI fp32 of the same case in the same rounds, "
             "speedup_vs_MONAI_same_dtype against MONAI at the row's precision (half: under torch.autocast); "
             "cpu_ms / cpu_speedup_vs_MONAI: the same with this process's CPU time (all its threads), less "
             "sensitive to other processes on the cores; "
             f"max_abs_diff_vs_MONAI of the final volumes (MONAI_max_abs: their scale). path: how the drop-in ran "
             f"(engine: pydiffmed.Sampler's fused loop; step by step: MONAI's clipped DDIM, whose two-pass update "
             f"has no fused plan). torch threads {torch.get_num_threads()}, 1-min load average {load:.2f}.")
    notes += memory_note
    if device == "cuda":
        notes += (f" fp32 convolutions: torch.backends.cudnn.allow_tf32 = {torch.backends.cudnn.allow_tf32} "
                  "(torch's default).")
    columns = ["model", "volume", "case", "variant", "dtype", "steps", "ms", "ms_per_step", "speedup_vs_MONAI",
               "speedup_vs_MONAI_same_dtype",
               "cpu_ms", "cpu_speedup_vs_MONAI", "max_abs_diff_vs_MONAI", "MONAI_max_abs", "path"]
    print(save("bench_inferer", rows, columns, notes))


if __name__ == "__main__":
    main()

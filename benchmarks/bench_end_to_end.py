"""End-to-end sampling: pydiffmed at its best settings vs MONAI's DiffusionInferer, same weights, same noise.

Models (batch 1, one channel):
  * demo: the bundled model (`pydiffmed.load_model("demo")`, or --model PATH): UNet3D, v-prediction, cosine
    schedule, at its trained volume. MONAI runs `DiffusionModelUNet(**config["unet"])` with the UNet3D's state
    dict and its own schedule of the same name (checked to match pydiffmed's alphas_cumprod). A model that cannot
    be loaded (e.g. not trained yet) gives a "skipped" row with the reason.
  * small, large: the two configurations of bench_unet.py with random non-zero weights, linear schedule,
    epsilon prediction (MONAI's defaults).

Cases, per model:
  * DDIM, 20 steps, whole run: MONAI `DiffusionInferer.sample` + `DDIMScheduler` in fp32 (MONAI's usual) vs
    `pydiffmed.Sampler` with DDIM on MONAI's grid and previous-step rule (spacing="monai", prev_rule="stride"),
    at its best settings on this machine (CPU: bf16 model, fp32 state; GPU: fp16 model, fp32 state, CUDA
    graphs) and in fp32. max_abs_diff_vs_MONAI: the final volumes of both from the same initial noise.
  * What a user gains: pydiffmed's 20-step DPM-Solver++ (dpmpp_2m, best settings) vs MONAI's 1000-step DDPM
    (fp32). MONAI's 1000-step time is extrapolated from --ddpm-steps timed steps (×1000/K; every step costs the
    same: one forward and one update). Next to it the quality gap on the Gaussian-mixture problem of
    bench_solvers.py, with its measure (sliced W2 to exact draws; same problem, solvers and code): dpmpp_2m at
    20 steps vs ddpm at 1000 steps, and the floor of the metric (exact vs exact).
Clipping is off in both MONAI and pydiffmed (the demo config asks for clip_sample 1.0; MONAI's DDIM then takes
eps from the unclipped x0, a two-pass update pydiffmed runs only eagerly; the clamp itself costs nothing
measurable), so the two compute the same sampler and their outputs can be compared.
All variants of a model are timed interleaved, round by round (common.interleaved_medians). Before timing,
every model runs one forward at the volume (CPU) or every variant one whole run (GPU: CUDA graph capture). The
volumes compared are those of the last timed runs (DDIM from a given x_T is deterministic).

On the CPU the process keeps freed memory for reuse, as the `pydiffmed sample` command does (MONAI's runs gain
from it too); --fresh-pages keeps glibc's defaults.

    python benchmarks/bench_end_to_end.py [--quick] [--repeats N] [--ddpm-steps K] [--model demo] [--threads N]
                                          [--only demo,small,large] [--fresh-pages]

--quick: 32³ only; on CPU the large model runs with one repeat and without its pydiffmed fp32 run (a 20-step fp32
run of it takes minutes here). Full: CPU adds small at 64³ and large with fp32; GPU adds 64³ for both configs.
--smoke: tiny sizes for the tests. The results file is rewritten after every model (marked PARTIAL until done).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_solvers  # noqa: E402
from bench_unet import CONFIGS, randomize_  # noqa: E402
from common import (add_fresh_pages_option, command_line, interleaved_medians, keep_freed_memory_unless,  # noqa: E402
                    save)
import pydiffmed  # noqa: E402
from pydiffmed.models import UNet3D  # noqa: E402
from pydiffmed.schedules import NoiseSchedule  # noqa: E402
from pydiffmed.solvers import DDIM  # noqa: E402

DDIM_STEPS = 20
DPM_STEPS = 20
DDPM_STEPS = 1000
# pydiffmed's beta schedule names → MONAI's
MONAI_SCHEDULES = {"linear": "linear_beta", "scaled_linear": "scaled_linear_beta", "sigmoid": "sigmoid_beta",
                   "cosine": "cosine"}
MONAI_PREDICTIONS = ("epsilon", "v_prediction", "sample")


class Skip(Exception):
    """A model that cannot be benchmarked; the message says why."""


@dataclass
class Subject:
    name: str
    unet: torch.nn.Module          # pydiffmed UNet3D, fp32
    monai: torch.nn.Module         # MONAI DiffusionModelUNet, fp32, same weights
    schedule: NoiseSchedule
    prediction_type: str
    monai_scheduler_args: dict     # num_train_timesteps, schedule (+ beta_start/beta_end) for MONAI's schedulers
    size: tuple
    note: str = ""


def monai_scheduler_args(schedule_config: dict) -> dict:
    """MONAI scheduler arguments for a pydiffmed discrete schedule config (Skip if MONAI has no equivalent)."""
    config = dict(schedule_config)
    kind = config.pop("kind", "discrete")
    name = config.pop("beta_schedule", "linear")
    args = {"num_train_timesteps": config.pop("num_train_timesteps", 1000)}
    if kind != "discrete" or not isinstance(name, str) or name not in MONAI_SCHEDULES:
        raise Skip(f"schedule {schedule_config} has no MONAI equivalent")
    args["schedule"] = MONAI_SCHEDULES[name]
    beta_range = {"beta_start": config.pop("beta_start", 1e-4), "beta_end": config.pop("beta_end", 0.02)}
    if name != "cosine":  # the cosine schedule has no beta range
        args.update(beta_range)
    if name == "sigmoid" and "sigmoid_range" in config:
        args["sig_range"] = config.pop("sigmoid_range")
    extra = {k: v for k, v in config.items() if v not in (None, False)}
    if name == "cosine" and extra.pop("cosine_s", 0.008) != 0.008:
        raise Skip("cosine schedule with cosine_s != 0.008: MONAI's cosine has s = 0.008")
    if name == "cosine" and extra.pop("max_beta", 0.999) != 0.999:
        raise Skip("cosine schedule with max_beta != 0.999: MONAI clips betas at 0.999")
    if extra:
        raise Skip(f"schedule options {sorted(extra)} have no MONAI equivalent")
    return args


def schedule_mismatch(schedule: NoiseSchedule, scheduler_args: dict) -> float:
    """Largest |alphas_cumprod| difference between pydiffmed's schedule and MONAI's scheduler of that name."""
    from monai.networks.schedulers import DDIMScheduler

    theirs = DDIMScheduler(**scheduler_args).alphas_cumprod.double()
    ours = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float64)
    if ours.shape != theirs.shape:
        return float("inf")
    return float((ours - theirs).abs().max())


def demo_subject(model_name: str, device) -> Subject:
    from monai.networks.nets import DiffusionModelUNet

    try:
        unet, schedule, info = pydiffmed.load_model(model_name)
    except Exception as exc:  # not trained yet, missing, truncated: report, do not crash the suite
        raise Skip(f"pydiffmed.load_model({model_name!r}) failed: {type(exc).__name__}: {exc}") from None
    if info.prediction_type not in MONAI_PREDICTIONS:
        raise Skip(f"prediction type {info.prediction_type!r} has no MONAI DDIM/DDPM equivalent")
    if info.volume_shape is None:
        raise Skip("the model config has no volume_shape")
    args = monai_scheduler_args(info.schedule_config)
    mismatch = schedule_mismatch(schedule, args)
    if mismatch > 1e-5:
        raise Skip(f"MONAI's {args['schedule']!r} schedule differs from pydiffmed's (max |Δ alphas_cumprod| "
                   f"{mismatch:.2g})")
    try:
        monai = DiffusionModelUNet(**info.unet)
        monai.load_state_dict(unet.state_dict())
    except Exception as exc:
        raise Skip(f"MONAI DiffusionModelUNet cannot hold the model: {type(exc).__name__}: {exc}") from None
    note = (f"{info.name} (sha256 {info.sha256[:12]}), {info.prediction_type}, {args['schedule']} schedule "
            f"(max |Δ alphas_cumprod| vs MONAI {mismatch:.1e})")
    return Subject(info.name, unet.float().eval().to(device), monai.eval().to(device), schedule,
                   info.prediction_type, args, tuple(info.volume_shape), note)


def random_subject(config_name: str, size: int, device) -> Subject:
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(0)
    monai = randomize_(DiffusionModelUNet(spatial_dims=3, in_channels=1, out_channels=1, **CONFIGS[config_name]))
    monai = monai.eval().to(device)
    args = {"num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 1e-4, "beta_end": 0.02}
    return Subject(config_name, UNet3D.from_monai(monai).eval(), monai, NoiseSchedule.discrete("linear"), "epsilon",
                   args, (size,) * 3, "bench_unet config, random weights, linear schedule, epsilon")


def best_settings(device) -> tuple:
    """(model dtype, CUDA graphs, label) of pydiffmed's fastest sampling on this device; state stays fp32."""
    if device == "cuda":
        return torch.float16, True, "pydiffmed fp16 + CUDA graphs"
    return torch.bfloat16, False, "pydiffmed bf16"


def monai_sampler(model, scheduler_name, subject, num_steps, noise, keep_steps=None):
    """A callable running MONAI's DiffusionInferer.sample once from `noise` (only the first keep_steps steps)."""
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    cls = DDIMScheduler if scheduler_name == "ddim" else DDPMScheduler
    scheduler = cls(clip_sample=False, prediction_type=subject.prediction_type, **subject.monai_scheduler_args)
    scheduler.set_timesteps(num_steps)
    if keep_steps is not None:
        scheduler.timesteps = scheduler.timesteps[:keep_steps]
    inferer = DiffusionInferer(scheduler)
    return lambda: inferer.sample(noise, model, scheduler, verbose=False)


def run_subject(subject: Subject, device, repeats, ddpm_steps, with_fp32, gmm):
    """Time every variant for one model; return its table rows."""
    best_dtype, best_graphs, best_label = best_settings(device)
    shape = (1, 1, *subject.size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    ddim = DDIM(subject.schedule, DDIM_STEPS, spacing="monai", prev_rule="stride",
                prediction_type=subject.prediction_type)
    dpm = pydiffmed.get_solver("dpmpp_2m", subject.schedule, DPM_STEPS, prediction_type=subject.prediction_type)
    samplers = {best_label: pydiffmed.Sampler(subject.unet, ddim, shape, dtype=best_dtype, cuda_graph=best_graphs)}
    if with_fp32:
        fp32_label = "pydiffmed fp32" + (" + CUDA graphs" if device == "cuda" else "")
        samplers[fp32_label] = pydiffmed.Sampler(subject.unet, ddim, shape, dtype=torch.float32,
                                                 cuda_graph=device == "cuda")
    dpm_sampler = pydiffmed.Sampler(subject.unet, dpm, shape, dtype=best_dtype, cuda_graph=best_graphs)

    with torch.no_grad():
        monai_ddim = monai_sampler(subject.monai, "ddim", subject, DDIM_STEPS, noise)
        monai_ddpm = monai_sampler(subject.monai, "ddpm", subject, DDPM_STEPS, noise, keep_steps=ddpm_steps)
        if device == "cpu":  # oneDNN builds its primitives on the first call at a shape: keep that out of the timing
            t = torch.full((1,), 500.0)
            subject.monai(noise, timesteps=t)
            for sampler in (*samplers.values(), dpm_sampler):
                sampler.model(noise.to(sampler.dtype), t)
        # DDIM is deterministic: every run of a variant returns the same volume, so the last one is compared
        last = {}

        def keeping(label, fn):
            return lambda: last.__setitem__(label, fn())

        fns = {"MONAI DDIM": keeping("MONAI DDIM", monai_ddim),
               **{label: keeping(label, lambda s=s: s(0, x_T=noise)) for label, s in samplers.items()},
               "MONAI DDPM": monai_ddpm, "pydiffmed DPM": lambda: dpm_sampler(0, x_T=noise)}
        medians = interleaved_medians(fns, device, repeats, warmup=1 if device == "cuda" else 0)
    reference = last["MONAI DDIM"].float()
    diffs = {label: float((last[label].float() - reference).abs().max()) for label in samplers}

    volume = "×".join(map(str, subject.size)) if len(set(subject.size)) > 1 else f"{subject.size[0]}³"
    base = {"model": subject.name, "volume": volume}
    monai_ms = medians["MONAI DDIM"][0] * 1e3
    rows = [dict(base, case=f"DDIM {DDIM_STEPS} steps", variant="MONAI fp32 (DiffusionInferer + DDIMScheduler)",
                 steps=DDIM_STEPS, ms=monai_ms, ms_per_eval=monai_ms / DDIM_STEPS, speedup_vs_MONAI=1.0,
                 note=subject.note)]
    for label in samplers:
        ms = medians[label][0] * 1e3
        rows.append(dict(base, case=f"DDIM {DDIM_STEPS} steps", variant=label + ", state fp32", steps=DDIM_STEPS,
                         ms=ms, ms_per_eval=ms / DDIM_STEPS, speedup_vs_MONAI=monai_ms / ms,
                         max_abs_diff_vs_MONAI=diffs[label], MONAI_max_abs=float(reference.abs().max()),
                         note=f"max |MONAI output| {float(reference.abs().max()):.3g}"))
    ddpm_ms = medians["MONAI DDPM"][0] * 1e3 * DDPM_STEPS / ddpm_steps
    dpm_ms = medians["pydiffmed DPM"][0] * 1e3
    case = f"MONAI DDPM {DDPM_STEPS} vs pydiffmed DPM-Solver++ {DPM_STEPS}"
    rows.append(dict(base, case=case, variant="MONAI fp32 (DiffusionInferer + DDPMScheduler)", steps=DDPM_STEPS,
                     ms=ddpm_ms, ms_per_eval=ddpm_ms / DDPM_STEPS, speedup_vs_MONAI=1.0, gmm_sw2=gmm["ddpm"],
                     note=f"extrapolated ×{DDPM_STEPS}/{ddpm_steps} from {ddpm_steps} timed steps"))
    rows.append(dict(base, case=case, variant=f"{best_label} dpmpp_2m, state fp32", steps=DPM_STEPS, ms=dpm_ms,
                     ms_per_eval=dpm_ms / DPM_STEPS, speedup_vs_MONAI=ddpm_ms / dpm_ms, gmm_sw2=gmm["dpmpp_2m"]))
    for row in rows:
        print(f"{row['model']:>6} {row['volume']:>6} {row['case']:42s} {row['variant']:50s} {row['ms']:10.1f} ms "
              f"×{row['speedup_vs_MONAI']:7.2f}" + (f"  max|Δ| {row['max_abs_diff_vs_MONAI']:.2g}"
                                                    if "max_abs_diff_vs_MONAI" in row else ""), flush=True)
    return rows


def gmm_quality(side: int, samples: int) -> dict:
    """bench_solvers' measure (sliced W2 to exact draws) for ddpm at 1000 and dpmpp_2m at 20 model evaluations."""
    problem = bench_solvers.mixture_problem(side, samples)
    result = {"floor": problem["floor"]}
    for label, budget in (("ddpm", DDPM_STEPS), ("dpmpp_2m", DPM_STEPS)):
        entry = bench_solvers.find_entry(label)
        steps, solver = bench_solvers.build_solver(entry, budget)
        result[label] = bench_solvers.measure(entry, solver, problem)["sw2"]
    print(f"Gaussian mixture (d = {side ** 3}, N = {samples}): sw2 ddpm-{DDPM_STEPS} {result['ddpm']:.4f}, "
          f"dpmpp_2m-{DPM_STEPS} {result['dpmpp_2m']:.4f}, floor {result['floor']:.4f}", flush=True)
    return result


def plan(args, device):
    """[(subject name, volume side or None for the model's own, repeats, with pydiffmed fp32)]."""
    repeats = args.repeats
    if args.smoke:
        return [("demo", None, repeats or 1, True), ("small", 8, repeats or 1, True)]
    if device == "cuda":
        sizes = [32] if args.quick else [32, 64]
        return [("demo", None, repeats or 5, True)] + [(c, s, repeats or 5, True) for c in CONFIGS for s in sizes]
    if args.quick:
        return [("demo", None, repeats or 2, True), ("small", 32, repeats or 2, True), ("large", 32, 1, False)]
    return [("demo", None, repeats or 3, True), ("small", 32, repeats or 3, True), ("small", 64, repeats or 2, True),
            ("large", 32, repeats or 2, True)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32³ only; large with one repeat, no fp32 run")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (tests): 8³ small config, demo model")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--ddpm-steps", type=int, default=None, help="MONAI DDPM steps timed (default 3 CPU, 20 GPU)")
    parser.add_argument("--model", default="demo", help="the demo model: a bundled name or a model path")
    parser.add_argument("--only", default=None, help="comma-separated subset of demo,small,large")
    parser.add_argument("--gmm-samples", type=int, default=None, help="Gaussian-mixture samples (default 500)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_fresh_pages_option(parser)
    args = parser.parse_args(argv)
    for name in ("repeats", "ddpm_steps", "gmm_samples", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.memory_note = keep_freed_memory_unless(args.fresh_pages, device)
    ddpm_steps = args.ddpm_steps or (2 if args.smoke else 3 if device == "cpu" else 20)
    gmm_side, gmm_samples = (2, args.gmm_samples or 64) if args.smoke else (4, args.gmm_samples or 500)

    cases = plan(args, device)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = sorted(set(wanted) - {"demo", *CONFIGS})
        if unknown:
            parser.error(f"--only: unknown model(s) {unknown}; choose from demo, {', '.join(CONFIGS)}")
        cases = [case for case in cases if case[0] in wanted]
    gmm = gmm_quality(gmm_side, gmm_samples)
    gmm_base = {"model": "Gaussian mixture (exact denoiser)", "volume": f"{gmm_side}³ (N = {gmm_samples})",
                "case": "quality: sliced W2 to exact draws (bench_solvers)"}
    gmm_rows = [dict(gmm_base, variant=f"ddpm {DDPM_STEPS} steps", steps=DDPM_STEPS, gmm_sw2=gmm["ddpm"]),
                dict(gmm_base, variant=f"dpmpp_2m {DPM_STEPS} steps", steps=DPM_STEPS, gmm_sw2=gmm["dpmpp_2m"]),
                dict(gmm_base, variant="floor (exact vs exact)", gmm_sw2=gmm["floor"])]
    rows = []
    for k, (name, size, repeats, with_fp32) in enumerate(cases):
        try:
            subject = demo_subject(args.model, device) if name == "demo" else random_subject(name, size, device)
        except Skip as why:
            print(f"{name}: skipped: {why}", flush=True)
            rows.append({"model": name, "case": "skipped", "note": str(why)})
            continue
        rows += run_subject(subject, device, repeats, ddpm_steps, with_fp32, gmm)
        if k + 1 < len(cases):  # a run stopped by a time limit still leaves the models finished so far
            write(args, device, ddpm_steps, gmm_side, gmm_samples, rows + gmm_rows,
                  partial=f"PARTIAL: {k + 1} of {len(cases)} models done. ")
    print(write(args, device, ddpm_steps, gmm_side, gmm_samples, rows + gmm_rows))


def write(args, device, ddpm_steps, gmm_side, gmm_samples, rows, partial=""):
    """Save the rows (partial: a note put first while models are still to come); returns the markdown table."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    notes = (f"{partial}`{command_line()}`: batch 1, torch threads {torch.get_num_threads()}, 1-min load average "
             f"at the end {load:.2f}. ms = median wall time of a whole sampling run (variants of a model timed "
             f"interleaved); speed-ups against MONAI fp32 in the same rounds. pydiffmed's best settings here: "
             f"{best_settings(device)[2]}, solver state fp32. Same weights and initial noise in MONAI and pydiffmed; "
             f"clipping off in both. MONAI's {DDPM_STEPS}-step DDPM time is extrapolated from {ddpm_steps} timed "
             f"steps. gmm_sw2: bench_solvers' Gaussian-mixture problem (d = {gmm_side ** 3}, N = {gmm_samples}), "
             "sliced W2 to exact draws (floor = exact vs exact: differences below it are sampling noise).")
    notes += args.memory_note
    if args.quick and device == "cpu":
        notes += " --quick: the large config runs once, without its pydiffmed fp32 run (so without max_abs_diff)."
    if device == "cuda":
        notes += (f" fp32 convolutions: torch.backends.cudnn.allow_tf32 = {torch.backends.cudnn.allow_tf32} "
                  "(torch's default, as MONAI users get it).")
    columns = ["model", "volume", "case", "variant", "steps", "ms", "ms_per_eval", "speedup_vs_MONAI",
               "max_abs_diff_vs_MONAI", "gmm_sw2", "note"]
    return save("bench_end_to_end", rows, columns, notes)


if __name__ == "__main__":
    main()

"""Inverse problems (issue 17): posterior samplers against exact posteriors, phantom reconstructions against classical
baselines, anomaly AUROC, and pydiffmed's posterior sampling against the same algorithm as a plain PyTorch loop.

Sections (the rows' `section` column):
* exact posterior: the Gaussian-mixture set-up of tests/test_inverse_samplers.py (volumes 2×2×2, d = 8, the exact
  mixture denoiser as the model, linear schedule, epsilon prediction, N samples), y = A x0 + 0.25·n. Problems:
  "gaussian, Masking 3 of 8": prior N(μ, 0.5·I) (data_variance 0.5), A keeps 3 of the 8 voxels; every data step
  is then the exact E[x0 | x_t, y] (A Aᵀ = I), so the three posteriors give the same samples and the errors are
  the solver's discretisation plus Monte-Carlo noise. "gaussian, skewed dense 3×8": a dense A with A Aᵀ
  eigenvalues 0.99 / 2.1 / 6.3: DDS stays exact, projection is close, DPS (‖A‖²-normalised step) under-corrects.
  "mixture, Masking 3 of 8": 3 components, y at the midpoint of two: no data step is exact. Errors against the
  closed-form posterior (GaussianMixture.posterior): mean_err = max |m̂ - m| / s (s: the exact posterior standard
  deviation), var_err = max |v̂ / s² - 1|, weight_err = max |ŵ_k - w_k| (samples assigned to components by the
  prior's `assign`), per component of weight > 0.05. For each posterior (projection, dds, dps) and solver (ddim,
  dpmpp_2m, edm_heun) at NFE 20 / 50 / 100 (edm_heun: 2·steps - 1 evaluations, so 19 / 49 / 99); the "exact draws"
  rows are N draws from the exact posterior (the Monte-Carlo floor of the same statistics).
* reconstruction: unseen head phantoms (pydiffmed.data family 1, the demo model trained on family 0, TV tuned on
  family 2) from the tasks of pydiffmed.inverse.baselines.TASKS (3-D Cartesian MRI with Poisson-disc masks at 4× and
  8×, one coil and four; 30-view parallel-beam CT, run as its per-slice matrix `SliceMatrix`: the same linear map),
  by zero-filled (MRI) / FBP (CT), TV (TV_DEFAULTS) and the demo model (dpmpp_2m, DDS data step, half-precision
  network, fp32 state) at each NFE (--full adds the mean of 4 samples per phantom at the lowest NFE: a posterior-
  mean estimate, which PSNR favours over single samples). Mean PSNR (dB) and SSIM over the phantoms, everything
  clipped to [-1, 1]; s_per_volume: the wall time of one batched run divided by the number of phantoms.
* anomaly: voxel-level AUROC of lesions inside the brain (anomaly_map with the brain mask, smoothing 1 voxel) on
  family-1 phantoms with lesions, for reconstruct_healthy's methods at two noise levels (num_steps 20: level 0.3
  is 6 model evaluations, 0.5 is 10), with the model trained on healthy phantoms (demo_healthy) and, for contrast,
  the demo model (trained with lesions).
* speed: time per reconstruction (one volume) of the same posterior algorithm, DDIM (eta 0, clip 1, the clipped
  x0 for the noise estimate, leading spacing) + DDS (ρ_t = sigma_y²/r_t², the operator's gram_solve), at equal NFE:
  pydiffmed (`pydiffmed.Sampler` built once; CUDA graphs on a GPU) against a plain PyTorch loop over diffusers'
  `DDIMScheduler.step` calling MONAI's `DiffusionModelUNet` with the same weights, the data step written out in
  the loop on x0 (the way research code runs DDS). Equal precision: fp32 against fp32, and pydiffmed's half-
  precision network (CPU bf16, GPU fp16; state fp32) against the loop under torch.autocast to the same dtype.
  speedup_vs_fp32_loop: against the loop in fp32 (what research code usually runs). Same x_T; max_abs_diff: the
  two final volumes; PSNR of both. Timed interleaved (common.interleaved_medians) after a warm-up run.

    python benchmarks/bench_inverse.py [--quick | --full | --smoke] [--device cpu|cuda] [--sections ...]
                                       [--threads N] [--repeats R]

--quick (and the default): 3 phantoms, NFE 20 / 50 for the reconstructions, speed at NFE 20 on mri_8x; --full:
6 phantoms, NFE 20 / 50 / 100, speed at NFE 20 and 50 on mri_8x and ct_30, the demo model's anomaly rows;
--smoke: tiny sizes for the tests. The results file is rewritten after every section (PARTIAL until done).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import command_line, interleaved_medians, save  # noqa: E402
import pydiffmed  # noqa: E402
from pydiffmed import data  # noqa: E402
from pydiffmed.gmm import GaussianMixture  # noqa: E402
from pydiffmed.inverse import (Masking, Measurement, ParallelBeamCT, anomaly_map, as_operator, auroc,  # noqa: E402
                               reconstruct_healthy)
from pydiffmed.inverse.baselines import (TV_DEFAULTS, SliceMatrix, measure, psnr, ssim, task_operator,  # noqa: E402
                                         tv_reconstruction, zero_filled)
from pydiffmed.schedules import NoiseSchedule  # noqa: E402

COLUMNS = ["section", "problem", "method", "solver", "nfe", "dtype", "weight_err", "mean_err", "var_err", "psnr_dB",
           "ssim", "auroc", "s_per_volume", "ms", "loop_ms", "speedup", "speedup_vs_fp32_loop", "max_abs_diff",
           "note"]
POSTERIORS = ("projection", "dds", "dps")
GMM_SOLVERS = ("ddim", "dpmpp_2m", "edm_heun")


def half_dtype(device):
    return torch.float16 if device == "cuda" else torch.bfloat16


def dtype_name(dtype):
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# --------------------------------------------------------------------------------------------------- exact posterior
D, SIGMA_Y, V = 8, 0.25, 0.5
MASK = torch.zeros(2, 2, 2, dtype=torch.bool)
MASK.view(-1)[[0, 3, 5]] = True
A_MASK = torch.eye(D, dtype=torch.float64)[MASK.view(-1)].numpy()
A_SKEW = np.random.default_rng(3).normal(size=(3, D)) / math.sqrt(D) * 1.5  # A Aᵀ eigenvalues 0.99, 2.1, 6.3
LINEAR = NoiseSchedule.discrete("linear")


def dense_operator(a):
    """A (3, 8) matrix as an operator on N×1×2×2×2 volumes."""
    a = torch.tensor(a, dtype=torch.float32)
    return as_operator((lambda x: x.reshape(x.shape[0], -1) @ a.T.to(x.dtype),
                        lambda y: (y @ a.to(y.dtype)).reshape(y.shape[0], 1, 2, 2, 2)))


def gmm_problems():
    """{label: (prior, measurement, (weights, means, covs) of the exact posterior, posterior options)}."""
    gauss = GaussianMixture([1.0], [np.linspace(-1.0, 1.0, D)], [V * np.eye(D)])
    mixture = GaussianMixture.random(D, 3, seed=0)
    out = {}
    for name, prior, a, point, options in (
            ("gaussian, Masking 3 of 8", gauss, A_MASK, gauss.means[0] + 0.7, {"data_variance": V}),
            ("gaussian, skewed dense 3×8", gauss, A_SKEW, gauss.means[0] + 0.7, {"data_variance": V}),
            ("mixture, Masking 3 of 8", mixture, A_MASK, 0.5 * (mixture.means[1] + mixture.means[2]), {})):
        y = a @ point
        if a is A_MASK:
            m = Measurement(Masking(MASK), torch.tensor(y, dtype=torch.float32).reshape(1, 1, -1), SIGMA_Y)
        else:
            m = Measurement(dense_operator(a), torch.tensor(y, dtype=torch.float32).reshape(1, -1), SIGMA_Y)
        out[name] = (prior, m, prior.posterior(a, y, SIGMA_Y), options)
    return out


def gmm_errors(prior, x, weights, means, covs):
    """(weight error, mean error, var error) of samples x (n, d) against the exact posterior mixture."""
    labels = prior.assign(torch.from_numpy(x)).numpy()
    w_err = float(np.abs(np.bincount(labels, minlength=len(weights)) / len(labels) - weights).max())
    m_err = v_err = 0.0
    for k in range(len(weights)):
        if weights[k] < 0.05:
            continue
        xs = x[labels == k]
        if len(xs) < 2:  # the sampler left a component of the posterior (almost) empty
            return w_err, math.inf, math.inf
        var = np.diag(covs[k])
        keep = var > 1e-9
        sd = np.sqrt(var[keep])
        m_err = max(m_err, float(np.abs((xs.mean(0)[keep] - means[k][keep]) / sd).max()))
        v_err = max(v_err, float(np.abs(xs.var(0)[keep] / sd ** 2 - 1).max()))
    return w_err, m_err, v_err


def exact_posterior_rows(nfes, samples, device, solvers=GMM_SOLVERS):
    rows = []
    shape = (samples, 1, 2, 2, 2)
    for name, (prior, measurement, (weights, means, covs), options) in gmm_problems().items():
        base = {"section": "exact posterior", "problem": f"{name}, sigma_y {SIGMA_Y}, N {samples}"}
        draws, _ = GaussianMixture(weights, means, covs).sample(samples, seed=1)
        w, m, v = gmm_errors(prior, draws.numpy(), weights, means, covs)
        rows.append(dict(base, method="exact draws (Monte-Carlo floor)", weight_err=w, mean_err=m, var_err=v))
        model = prior.model(LINEAR, "epsilon")
        for posterior in POSTERIORS:
            for solver in solvers:
                for nfe in nfes:
                    steps = (nfe + 1) // 2 if solver == "edm_heun" else nfe
                    sampler = pydiffmed.Sampler(model, solver, shape, num_steps=steps, schedule=LINEAR, device=device,
                                                prediction_type="epsilon", measurement=measurement,
                                                posterior=posterior, posterior_options=options)
                    x = sampler(0).reshape(samples, -1).double().cpu().numpy()
                    w, m, v = gmm_errors(prior, x, weights, means, covs)
                    rows.append(dict(base, method=posterior, solver=solver, nfe=sampler.num_model_evals,
                                     weight_err=w, mean_err=m, var_err=v))
                    print(f"exact posterior {name:26s} {posterior:10s} {solver:8s} NFE {sampler.num_model_evals:3d}: "
                          f"weight {w:.3f} mean {m:.3f} var {v:.3f}", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------- reconstruction
def task_setup(task, x):
    """(operator, y, sigma_y, baseline reconstruction function, its label) for phantoms x; CT as SliceMatrix."""
    op, sigma_y = task_operator(task, tuple(x.shape[2:]), device=x.device)
    if isinstance(op, ParallelBeamCT):
        ct = op
        table = SliceMatrix.from_operator(ct, x.shape[3:])
        op = SliceMatrix(table.matrix.to(x.device, torch.float32), table.image_size, table.range_tail)
        y = measure(op, x, sigma_y, seed=0)
        return op, y, sigma_y, lambda: ct.fbp(y), "FBP"
    y = measure(op, x, sigma_y, seed=0)
    return op, y, sigma_y, lambda: zero_filled(op, y), "zero-filled"


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def reconstruction_rows(model, schedule, info, tasks, n, nfes, device, tv_iters=None, averages=()):
    x = data.phantoms(n, seed=1, shape=tuple(info.volume_shape)).to(device)
    rows = []
    half = half_dtype(device)
    for task in tasks:
        op, y, sigma_y, baseline, label = task_setup(task, x)
        base = {"section": "reconstruction", "problem": f"{task}, {n} phantoms (family 1)"}

        def add(method, recon, seconds, **extra):
            recon = recon.clamp(-1, 1)
            rows.append(dict(base, method=method, psnr_dB=float(psnr(recon, x, 2.0).mean()),
                             ssim=float(ssim(recon, x, 2.0).mean()), s_per_volume=seconds / n, **extra))
            r = rows[-1]
            print(f"{task:14s} {method:34s} NFE {extra.get('nfe', '-')!s:>3}: PSNR {r['psnr_dB']:6.2f} SSIM "
                  f"{r['ssim']:.4f}  {r['s_per_volume']:.3f} s/volume", flush=True)

        add(label, *timed(baseline, device))
        tv = TV_DEFAULTS[task]
        iters = tv_iters or tv["iters"]
        add(f"TV (lam {tv['lam']:g}, {iters} iterations)", *timed(lambda: tv_reconstruction(op, y, task, iters),
                                                                   device))
        for nfe, k in [(nfe, 1) for nfe in nfes] + [(nfes[0], k) for k in averages]:
            def run():  # k samples per phantom (seeds differ), averaged: an estimate of the posterior mean
                out = pydiffmed.sample(model, (n * k, *x.shape[1:]), "dpmpp_2m", nfe, schedule, seed=0, dtype=half,
                                       progress=False, prediction_type=info.prediction_type, clip=info.clip_sample,
                                       measurement=Measurement(op, y.repeat_interleave(k, 0), sigma_y),
                                       posterior="dds")
                return out.reshape(n, k, *x.shape[1:]).mean(1)
            label = "diffusion (demo, dpmpp_2m + dds)" if k == 1 else f"diffusion, mean of {k} samples"
            add(label, *timed(run, device), solver="dpmpp_2m", nfe=nfe, dtype=dtype_name(half))
    return rows


# --------------------------------------------------------------------------------------------------- anomaly
def anomaly_rows(models, n, methods, levels, steps, device):
    vols, labels = zip(*[data.head_phantom(1, i, 32, return_labels=True) for i in range(n)])
    x = torch.stack(vols).to(device)
    lab = torch.stack(labels)[:, None].to(device)
    brain, lesion = lab >= 2, lab == 3  # brain, lesion and CSF voxels; lesions
    rows = []
    for name in models:
        try:
            model, schedule, info = pydiffmed.load_model(name)
        except Exception as exc:  # e.g. not bundled in this checkout
            rows.append({"section": "anomaly", "problem": f"model {name}", "note": f"skipped: {exc}"})
            continue
        model = model.to(device)
        for method in methods:
            for level in levels:
                def run():
                    return reconstruct_healthy(model, x, method=method, level=level, num_steps=steps,
                                               schedule=schedule, seed=0, prediction_type=info.prediction_type,
                                               clip=info.clip_sample, dtype=half_dtype(device))
                recon, seconds = timed(run, device)
                score = auroc(anomaly_map(x, recon, smoothing_sigma=1.0, mask=brain), lesion, mask=brain)
                nfe = int(steps * level) * (2 if method == "ddim_inversion" else 1)
                rows.append({"section": "anomaly", "problem": f"lesions, {n} phantoms (family 1), model {name}",
                             "method": f"{method}, level {level}", "solver": "ddim", "nfe": nfe,
                             "dtype": dtype_name(half_dtype(device)), "auroc": score, "s_per_volume": seconds / n})
                print(f"anomaly {name:12s} {method:14s} level {level}: AUROC {score:.4f}  {seconds / n:.2f} s/volume",
                      flush=True)
    return rows


# --------------------------------------------------------------------------------------------------- speed
def diffusers_ddim(info):
    from diffusers import DDIMScheduler

    config = info.schedule_config
    if config.get("kind", "discrete") != "discrete" or config.get("beta_schedule") != "cosine":
        raise ValueError(f"schedule {config} is not diffusers' squaredcos_cap_v2")
    return DDIMScheduler(num_train_timesteps=config.get("num_train_timesteps", 1000),
                         beta_schedule="squaredcos_cap_v2", prediction_type=info.prediction_type, clip_sample=True,
                         clip_sample_range=float(info.clip_sample), timestep_spacing="leading", steps_offset=0,
                         set_alpha_to_one=True)


def plain_loop(unet, scheduler, nfe, op, y, sigma_y, x_T, autocast_dtype=None, cg_iters=5, cg_tol=1e-6, clip=1.0,
               data_variance=1.0):
    """DDIM + DDS as research code writes it: a loop over diffusers' scheduler steps, MONAI's network, the data
    step on the network's (clipped) x0 and the corrected x0 handed back as a v-prediction."""
    device = x_T.device
    scheduler.set_timesteps(nfe, device=device)
    alphas = scheduler.alphas_cumprod.to(torch.float64)
    x = x_T.clone()
    for t in scheduler.timesteps:
        cast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with torch.no_grad(), cast:
            out = unet(x, timesteps=t.reshape(1).expand(x.shape[0]))
        out = out.float()
        a, s = float(alphas[int(t)].sqrt()), float((1 - alphas[int(t)]).sqrt())
        x0 = (a * x - s * out).clamp(-clip, clip)
        r2 = data_variance * s * s / (a * a * data_variance + s * s)
        rho = min(sigma_y * sigma_y / r2, 1e10) if r2 > 0 else 1e10
        x0 = x0 + op.gram_solve(op.adjoint(y - op.forward(x0)), rho, iters=cg_iters, tol=cg_tol)
        v = (a * x - x0) / s
        x = scheduler.step(v, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x


def speed_rows(unet, schedule, info, tasks, nfes, repeats, device):
    from monai.networks.nets import DiffusionModelUNet

    from pydiffmed.solvers import DDIM

    monai = DiffusionModelUNet(**info.unet)
    monai.load_state_dict(unet.state_dict())
    monai = monai.float().eval().to(device)
    ours = unet.float().eval().to(device)
    half = half_dtype(device)
    x = data.phantoms(1, seed=1, start=5, shape=tuple(info.volume_shape)).to(device)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for task in tasks:
        op, y, sigma_y, _, _ = task_setup(task, x)
        loop_op = copy.copy(op)
        loop_op.check_finite = False  # as pydiffmed's bound copy: no per-call NaN check (a host sync)
        measurement = Measurement(op, y, sigma_y)
        for nfe in nfes:
            solver = DDIM(schedule, nfe, spacing="leading", prev_rule="stride", clip=float(info.clip_sample),
                          use_clipped_model_output=True, prediction_type=info.prediction_type)
            samplers = {dt: pydiffmed.Sampler(ours, solver, tuple(x.shape), device=device, dtype=dt,
                                              measurement=measurement, posterior="dds")
                        for dt in (torch.float32, half)}
            last = {}
            fns = {}
            for dt in (torch.float32, half):
                name = dtype_name(dt)
                fns[f"pydiffmed {name}"] = lambda s=samplers[dt], k=f"pydiffmed {name}": last.__setitem__(
                    k, s(0, x_T=noise))
                fns[f"loop {name}"] = lambda dt=dt, k=f"loop {name}": last.__setitem__(k, plain_loop(
                    monai, diffusers_ddim(info), nfe, loop_op, y, sigma_y, noise,
                    autocast_dtype=None if dt == torch.float32 else dt, clip=float(info.clip_sample)))
            medians = interleaved_medians(fns, device, repeats, warmup=1)
            fp32_loop = medians["loop fp32"][0]
            for dt in (torch.float32, half):
                name = dtype_name(dt)
                ms, loop_ms = medians[f"pydiffmed {name}"][0] * 1e3, medians[f"loop {name}"][0] * 1e3
                ours_x, loop_x = last[f"pydiffmed {name}"].float(), last[f"loop {name}"].float()
                base = {"section": "speed", "problem": f"{task}, 1 volume", "solver": "ddim + dds", "nfe": nfe,
                        "dtype": name}
                rows.append(dict(base, method="pydiffmed (Sampler" + (", CUDA graphs)" if device == "cuda" else ")"),
                                 ms=ms, loop_ms=loop_ms, speedup=loop_ms / ms,
                                 speedup_vs_fp32_loop=fp32_loop * 1e3 / ms,
                                 max_abs_diff=float((ours_x - loop_x).abs().max()),
                                 psnr_dB=float(psnr(ours_x.clamp(-1, 1), x, 2.0)),
                                 ssim=float(ssim(ours_x.clamp(-1, 1), x, 2.0))))
                rows.append(dict(base, method="plain loop (diffusers DDIMScheduler + MONAI DiffusionModelUNet"
                                 + (f", autocast {name})" if dt != torch.float32 else ")"),
                                 ms=loop_ms, loop_ms=loop_ms, speedup=1.0,
                                 speedup_vs_fp32_loop=fp32_loop * 1e3 / loop_ms,
                                 psnr_dB=float(psnr(loop_x.clamp(-1, 1), x, 2.0)),
                                 ssim=float(ssim(loop_x.clamp(-1, 1), x, 2.0))))
                print(f"speed {task} NFE {nfe} {name}: pydiffmed {ms:.0f} ms, loop {loop_ms:.0f} ms, "
                      f"×{loop_ms / ms:.2f} (×{fp32_loop * 1e3 / ms:.2f} vs fp32 loop), max|Δ| "
                      f"{rows[-2]['max_abs_diff']:.2g}, PSNR {rows[-2]['psnr_dB']:.2f} / {rows[-1]['psnr_dB']:.2f}",
                      flush=True)
    return rows


# --------------------------------------------------------------------------------------------------- main
SECTIONS = ("exact", "recon", "anomaly", "speed")


def plan(args):
    if args.smoke:
        return dict(gmm_nfes=[4], gmm_samples=200, gmm_solvers=("ddim",), recon_tasks=("mri_4x", "ct_30"), n=1,
                    recon_nfes=[2], tv_iters=20, averages=(), anomaly_models=("demo",), anomaly_n=1,
                    anomaly_methods=("gaussian",), anomaly_levels=(0.5,), anomaly_steps=4, speed_tasks=("mri_8x",),
                    speed_nfes=[2], repeats=args.repeats or 1)
    full = args.full
    return dict(gmm_nfes=[20, 50, 100], gmm_samples=2000, gmm_solvers=GMM_SOLVERS,
                recon_tasks=("mri_4x", "mri_8x", "mri_8x_4coils", "ct_30"), n=6 if full else 3,
                recon_nfes=[20, 50, 100] if full else [20, 50], tv_iters=None, averages=(4,) if full else (),
                anomaly_models=("demo_healthy", "demo") if full else ("demo_healthy",), anomaly_n=6 if full else 3,
                anomaly_methods=("gaussian", "simplex", "ddim_inversion") if full else ("gaussian", "simplex"),
                anomaly_levels=(0.3, 0.5), anomaly_steps=20,
                speed_tasks=("mri_8x", "ct_30") if full else ("mri_8x",), speed_nfes=[20, 50] if full else [20],
                repeats=args.repeats or (3 if full else 2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the default sizes (kept for run_all.py)")
    size.add_argument("--full", action="store_true", help="more phantoms, NFE up to 100, CT speed, more anomaly rows")
    size.add_argument("--smoke", action="store_true", help="tiny sizes (tests)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated subset of {SECTIONS} (default: all; on a GPU all but exact)")
    parser.add_argument("--model", default="demo", help="the model of the reconstruction and speed sections")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds of the speed section")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1 or args.repeats is not None and args.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # the exact-posterior section runs on the CPU whatever the device (exact float64 denoiser): the GPU run leaves it
    # to the CPU results unless --sections names it
    default = ",".join(s for s in SECTIONS if device == "cpu" or s != "exact")
    sections = [s.strip() for s in (args.sections or default).split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    p = plan(args)
    rows = []
    model = schedule = info = None
    if {"recon", "speed"} & set(sections):
        model, schedule, info = pydiffmed.load_model(args.model)
        model = model.float().eval().to(device)
    for k, section in enumerate(sections):
        start = time.perf_counter()
        if section == "exact":  # the exact mixture denoiser runs in float64 on the CPU, whatever --device says
            rows += exact_posterior_rows(p["gmm_nfes"], p["gmm_samples"], "cpu", p["gmm_solvers"])
        elif section == "recon":
            rows += reconstruction_rows(model, schedule, info, p["recon_tasks"], p["n"], p["recon_nfes"], device,
                                        p["tv_iters"], p["averages"])
        elif section == "anomaly":
            rows += anomaly_rows(p["anomaly_models"], p["anomaly_n"], p["anomaly_methods"], p["anomaly_levels"],
                                 p["anomaly_steps"], device)
        else:
            rows += speed_rows(model, schedule, info, p["speed_tasks"], p["speed_nfes"], p["repeats"], device)
        print(f"== section {section}: {time.perf_counter() - start:.1f} s", flush=True)
        partial = f"PARTIAL: {k + 1} of {len(sections)} sections done. " if k + 1 < len(sections) else ""
        table = write(args, device, p, rows, partial)
    print(table)


def write(args, device, p, rows, partial=""):
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    notes = (f"{partial}`{command_line()}`: device {device}, torch threads {torch.get_num_threads()}, 1-min load "
             f"average at the end {load:.2f}. Sections: exact posterior (Gaussian / Gaussian-mixture prior with its "
             f"exact denoiser, Masking 3 of 8 voxels or a skewed dense 3×8 A, sigma_y {SIGMA_Y}, "
             f"{p['gmm_samples']} samples; errors against the closed-form posterior in posterior standard "
             "deviations, 'exact draws' = the Monte-Carlo floor); reconstruction "
             f"({p['n']} unseen phantoms, family 1; PSNR/SSIM means, everything clipped to [-1, 1]; CT operator as "
             "its per-slice matrix; TV with TV_DEFAULTS (lam tuned on family 2); diffusion: model "
             f"{args.model!r}, dpmpp_2m + dds, {dtype_name(half_dtype(device))} network, fp32 state, seed 0; "
             "s_per_volume = one batched run / phantoms, on a GPU including that run's CUDA-graph capture); "
             "anomaly (voxel AUROC of lesions inside the brain); speed (DDIM + DDS, one volume: pydiffmed's "
             "Sampler vs a plain loop over diffusers' DDIMScheduler.step with MONAI's DiffusionModelUNet and the "
             f"same weights, equal NFE; speedup at equal precision, {p['repeats']} interleaved rounds after a "
             "warm-up; max_abs_diff between the two final volumes).")
    return save("bench_inverse", rows, COLUMNS, notes)


if __name__ == "__main__":
    main()

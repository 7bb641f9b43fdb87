"""Solver quality per model evaluation on the Gaussian-mixture problem (issue 5): no network, the exact denoiser.

Data: a 3-component Gaussian mixture on volumes of side s (d = s³ voxels, one channel; random rotations and
per-direction scales, well separated means). Every solver samples N volumes with the exact model of its own
schedule (the same data distribution under discrete VP, continuous VP, VE or rectified-flow noising), at the
largest step count whose number of model evaluations (NFE) fits each budget in {5, 10, 20, 50, 100, 250, 1000}.

Metrics
  sw2       sliced Wasserstein-2 distance between the solver's samples and exact draws (256 directions);
            `floor` row: the same distance between two exact draws (sampling noise of the metric itself);
  flow_err  deterministic solvers on the discrete VP schedule (all from the same x_T, all ending at the data):
            RMS distance to the exact probability-flow solution (adaptive Dormand-Prince, rtol = atol = 1e-8);
  seconds   wall time of the whole solve (exact model + solver steps, eager, this machine).
The target of the issue — DPM-Solver++ or UniPC at <= 20 NFE reach the flow error DDIM needs >= 100 steps for —
is checked and reported in the notes. Writes results/bench_solvers_<device>.json and a PNG plot next to it.

    python benchmarks/bench_solvers.py [--quick] [--side 4] [--samples 1000] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import result_path, save  # noqa: E402
from pydiffmed import get_solver  # noqa: E402
from pydiffmed.gmm import GaussianMixture, sliced_wasserstein  # noqa: E402
from pydiffmed.schedules import NoiseSchedule  # noqa: E402

BUDGETS = (5, 10, 20, 50, 100, 250, 1000)
DISCRETE = NoiseSchedule.discrete("linear")
VP, VE, FLOW = NoiseSchedule.vp(), NoiseSchedule.ve(sigma_max=20.0), NoiseSchedule.flow()

# name, label, schedule, options, prediction type, steps for an NFE budget, deterministic (flow error)
SOLVERS = [
    ("ddpm", "ddpm", DISCRETE, {"spacing": "linspace"}, "epsilon", lambda b: b, False),
    ("ddim", "ddim", DISCRETE, {"spacing": "linspace"}, "epsilon", lambda b: b, True),
    ("ddim", "ddim_eta1", DISCRETE, {"spacing": "linspace", "eta": 1.0}, "epsilon", lambda b: b, False),
    ("pndm", "pndm", DISCRETE, {"spacing": "linspace", "skip_prk_steps": True, "set_alpha_to_one": True},
     "epsilon", lambda b: b - 1, True),
    ("dpmpp_2m", "dpmpp_2m", DISCRETE, {}, "epsilon", lambda b: b, True),
    ("dpmpp_2m", "dpmpp_2m_karras", DISCRETE, {"grid": "karras"}, "epsilon", lambda b: b, True),
    ("dpmpp_3m", "dpmpp_3m", DISCRETE, {}, "epsilon", lambda b: b, True),
    ("dpmpp_3m", "dpmpp_3m_logsnr", DISCRETE, {"grid": "logsnr"}, "epsilon", lambda b: b, True),
    ("dpmpp_2m_sde", "dpmpp_2m_sde", DISCRETE, {"grid": "karras"}, "epsilon", lambda b: b, False),
    ("unipc", "unipc", DISCRETE, {}, "epsilon", lambda b: b, True),
    ("unipc", "unipc_logsnr", DISCRETE, {"grid": "logsnr"}, "epsilon", lambda b: b, True),
    ("edm_euler", "edm_euler", DISCRETE, {}, "epsilon", lambda b: b, True),
    ("edm_heun", "edm_heun", DISCRETE, {}, "epsilon", lambda b: (b + 1) // 2, True),
    ("ode_heun", "ode_heun", DISCRETE, {"spacing": "logsnr", "denoise": True}, "epsilon", lambda b: (b - 1) // 2,
     True),
    ("ode_rk4", "ode_rk4", DISCRETE, {"spacing": "logsnr", "denoise": True}, "epsilon", lambda b: (b - 1) // 4,
     True),
    ("rflow_euler", "rflow_euler", FLOW, {"use_discrete_timesteps": False}, "neg_flow", lambda b: b, False),
    ("euler_maruyama", "euler_maruyama_vp", VP, {}, "epsilon", lambda b: b, False),
    ("pc", "pc_vp", VP, {"norm_reduction": "batch"}, "epsilon", lambda b: b // 2, False),
    ("pc", "pc_ve", VE, {"norm_reduction": "batch"}, "score", lambda b: b // 2, False),
    ("ald", "ald", VE, {"step_lr": 5e-5}, "score", None, False),
]


def ald_options(budget):
    """Levels L and Langevin steps per level T with L·T + 1 <= budget."""
    per_level = 5 if budget >= 11 else 1
    return max(1, (budget - 1) // per_level), {"steps_per_level": per_level}


def mixture_problem(side, n):
    """The Gaussian-mixture problem: mixture, exact draws, SW2 floor (exact vs exact), x_T and per-sample seeds."""
    torch.manual_seed(0)
    mixture = GaussianMixture.random(side ** 3, 3, seed=0, separation=4.0, std_range=(0.3, 0.9))
    exact = mixture.sample(n, seed=1)[0]
    floor = sliced_wasserstein(exact, mixture.sample(n, seed=2)[0])
    x_T = torch.randn((n, 1, side, side, side), generator=torch.Generator().manual_seed(3))
    return {"mixture": mixture, "exact": exact, "floor": floor, "x_T": x_T, "seeds": torch.arange(n)}


def find_entry(label):
    """The SOLVERS entry with this label."""
    for entry in SOLVERS:
        if entry[1] == label:
            return entry
    raise ValueError(f"no solver labelled {label!r}; labels: {[e[1] for e in SOLVERS]}")


def build_solver(entry, budget):
    """(steps, solver) of a SOLVERS entry at the largest step count whose NFE fits the budget, or None."""
    name, label, schedule, opts, pred, steps_for, _ = entry
    if name == "ald":
        steps, extra = ald_options(budget)
    else:
        steps, extra = steps_for(budget), {}
    if steps < 1:
        return None
    try:
        solver = get_solver(name, schedule, steps, prediction_type=pred, **opts, **extra)
    except ValueError as err:        # e.g. PNDM's warm start needs a few steps
        print(f"{label} at {budget} NFE: {err}")
        return None
    if solver.num_model_evals > budget:
        return None
    return steps, solver


def measure(entry, solver, problem, reference=None):
    """Sample the problem with the exact model of the entry's schedule: the result row (sw2, seconds, and
    flow_err for a deterministic solver when the reference flow solution is given)."""
    _, label, schedule, _, pred, _, deterministic = entry
    model = problem["mixture"].model(schedule, pred)
    n = problem["x_T"].shape[0]
    begin = time.perf_counter()
    x = solver.sample(model, problem["x_T"] * solver.init_noise_scale, seeds=problem["seeds"])
    seconds = time.perf_counter() - begin
    row = {"solver": label, "schedule": schedule.kind, "steps": solver.num_steps, "nfe": solver.num_model_evals,
           "sw2": sliced_wasserstein(x.reshape(n, -1), problem["exact"]), "seconds": seconds}
    if deterministic and reference is not None:
        row["flow_err"] = float(((x.double() - reference) ** 2).mean().sqrt())
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="budgets up to 250 NFE, fewer samples")
    parser.add_argument("--side", type=int, default=4, help="volume side s (d = s³)")
    parser.add_argument("--samples", type=int, default=None, help="samples per solve (default 1000, quick 500)")
    parser.add_argument("--solvers", default=None, help="comma-separated labels to run (default: all)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the saved results")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the tensors are small; the metrics do not depend on it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.plot_only:
        import json

        with open(result_path("bench_solvers", "json")) as f:
            rows = json.load(f)["rows"]
        plot(rows, rows[0]["sw2"])
        return
    budgets = BUDGETS[:-1] if args.quick else BUDGETS
    n = args.samples or (500 if args.quick else 1000)
    side = args.side
    dim = side ** 3
    problem = mixture_problem(side, n)
    mixture, floor, x_T = problem["mixture"], problem["floor"], problem["x_T"]

    start = time.perf_counter()
    reference, ref_nfe = get_solver("ode_dopri5", DISCRETE, rtol=1e-8, atol=1e-8, denoise=True).sample(
        mixture.model(DISCRETE, "epsilon"), x_T.double())
    ref_seconds = time.perf_counter() - start
    print(f"d = {dim} (side {side}), N = {n}; SW2 floor (exact vs exact) {floor:.4f}; "
          f"reference flow: dopri5 {ref_nfe} NFE in {ref_seconds:.1f} s")

    wanted = None if args.solvers is None else set(args.solvers.split(","))
    rows = [{"solver": "floor (exact vs exact)", "schedule": "-", "steps": 0, "nfe": 0, "sw2": floor}]
    for entry in SOLVERS:
        if wanted is not None and entry[1] not in wanted:
            continue
        seen = set()
        for budget in budgets:
            built = build_solver(entry, budget)
            if built is None or built[0] in seen:
                continue
            seen.add(built[0])
            row = measure(entry, built[1], problem, reference)
            rows.append(row)
            print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    notes = target_check(rows)
    print(notes)
    columns = ["solver", "schedule", "steps", "nfe", "sw2", "flow_err", "seconds"]
    notes = (f"Gaussian mixture, d = {dim} voxels (side {side}), 3 components, N = {n} samples per solve; "
             f"sw2 = sliced Wasserstein-2 to exact draws (floor {floor:.4f} = exact vs exact); flow_err = RMS "
             f"distance to the exact probability-flow solution (dopri5 rtol 1e-8, {ref_nfe} NFE). " + notes)
    print(save("bench_solvers", rows, columns, notes))
    plot(rows, floor)


def target_check(rows):
    def best(label, max_nfe):
        errs = [r["flow_err"] for r in rows if r["solver"] == label and r["nfe"] <= max_nfe and "flow_err" in r]
        return min(errs) if errs else None

    ddim = [r for r in rows if r["solver"] == "ddim" and r["nfe"] >= 100 and "flow_err" in r]
    if not ddim:
        return "Target not evaluated (no DDIM run with >= 100 steps)."
    ddim_100 = min(ddim, key=lambda r: r["nfe"])
    labels = {r["solver"] for r in rows if r["solver"].startswith(("dpmpp", "unipc")) and "flow_err" in r}
    fast = {label: best(label, 20) for label in labels}
    fast = {k: v for k, v in fast.items() if v is not None}
    if not fast:
        return "Target not evaluated (no DPM-Solver++ / UniPC runs)."
    winner = min(fast, key=fast.get)
    met = fast[winner] <= ddim_100["flow_err"]
    return (f"Target {'MET' if met else 'NOT met'}: best of DPM-Solver++/UniPC at <= 20 NFE is {winner} with flow "
            f"error {fast[winner]:.3g}; DDIM at {ddim_100['nfe']} steps has {ddim_100['flow_err']:.3g}.")


def plot(rows, floor):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    labels = list(dict.fromkeys(r["solver"] for r in rows if r["nfe"] > 0))
    colors = plt.get_cmap("tab20")
    for k, label in enumerate(labels):
        pts = sorted(((r["nfe"], r) for r in rows if r["solver"] == label), key=lambda p: p[0])
        style = dict(marker="os^D"[k % 4], ms=3, color=colors(k % 20), ls=("-", "--")[k // 10 % 2], label=label)
        axes[0].plot([p[0] for p in pts], [p[1]["sw2"] for p in pts], **style)
        flow = [(p[0], p[1]["flow_err"]) for p in pts if "flow_err" in p[1]]
        if flow:
            axes[1].plot([f[0] for f in flow], [f[1] for f in flow], **style)
    axes[0].axhline(floor, color="k", ls="--", lw=1, label="exact vs exact")
    for ax, title in zip(axes, ("sliced W2 to exact samples", "RMS error vs exact probability flow")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model evaluations (NFE)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = result_path("bench_solvers", "png")
    fig.savefig(path, dpi=110)
    print("plot:", path)


if __name__ == "__main__":
    main()

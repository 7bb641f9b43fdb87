"""Train the bundled `demo` model: a small UNet3D denoiser on the procedural head phantoms of pydiffmed.data.

    python -m pydiffmed.demo.train                       # the shipped model (≈1 h on 2 CPU cores)
    python -m pydiffmed.demo.train --iterations 20 --out /tmp/demo_smoke
    python -m pydiffmed.demo.train --healthy --init demo --iterations 800 --lr 2e-4 \
        --out pydiffmed/models_data/demo_healthy   # the bundled `demo_healthy` (anomaly detection)

Every batch holds fresh phantoms (family 0, indices counting up from 0), so the run sees new data throughout;
phantom family 1 is kept apart for the quality checks. --healthy trains on the same heads without their lesions
(`data.head_phantom(..., lesions=False)`), --init starts from an existing model's weights (fine-tuning). The loss
is the v-prediction MSE at uniform discrete timesteps of a 1000-step cosine schedule; the forward runs under CPU
bf16 autocast with fp32 master weights, and the saved weights are an exponential moving average of the trained
ones. Everything (phantoms, timesteps, noise, initialisation) is drawn from generators seeded by --seed.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

import torch

from .. import data
from ..modelfile import MODELS_DIR, build_schedule, load_model, save_model
from ..models import UNet3D

DEFAULT_OUT = os.path.join(MODELS_DIR, "demo")
VOLUME_SIZE = 32
UNET = dict(spatial_dims=3, in_channels=1, out_channels=1, channels=(32, 64, 64),
            attention_levels=(False, False, True), num_res_blocks=1, num_head_channels=(0, 0, 64),
            norm_num_groups=16)
SCHEDULE = {"kind": "discrete", "num_train_timesteps": 1000, "beta_schedule": "cosine"}
PREDICTION = "v_prediction"
SPACING_MM = 7.0  # a ~180 mm head spans ~26 of the 32 voxels
INTENSITY = {"scale": 500.0, "offset": 500.0, "clip": [0.0, 1000.0]}  # model [-1, 1] → 0…1000 a.u.


def parameters_in_millions(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def model_config(model: UNet3D, size: int, source: dict, name: str = "demo", lesions: bool = True) -> dict:
    """The pydiffmed model config of the demo model (everything but the network arguments)."""
    millions = parameters_in_millions(model)
    spacing = SPACING_MM * VOLUME_SIZE / size
    phantoms = "head phantoms" if lesions else "head phantoms without lesions"
    return {"name": name, "description": f"UNet3D ({millions:.1f} M parameters) trained on pydiffmed.data {phantoms}, "
                                         f"{size}^3 at {spacing:g} mm",
            "schedule": SCHEDULE, "prediction_type": PREDICTION, "clip_sample": 1.0,
            "volume_shape": [size] * 3, "channels": 1, "spacing": [spacing] * 3, "orientation": "RAS",
            "intensity": INTENSITY, "source": source}


def learning_rate(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def train(out: str = DEFAULT_OUT, iterations: int = 2600, batch: int = 4, lr: float = 5e-4, ema_decay: float = 0.998,
          seed: int = 0, size: int = VOLUME_SIZE, unet: dict | None = None, bf16: bool = True, save_every: int = 500,
          lesions: bool = True, init: str | None = None, log=lambda line: print(line, flush=True)) -> UNet3D:
    """Train and save the demo model to `out` (a pydiffmed model directory); returns the EMA model."""
    for name, value in (("iterations", iterations), ("batch", batch), ("size", size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    torch.manual_seed(seed)
    model = UNet3D(**(unet or UNET)).train()
    if init is not None:
        model.load_state_dict(load_model(init)[0].state_dict())
    ema = UNet3D(**(unet or UNET)).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    started = time.perf_counter()

    def save(step, final_loss):
        source = {"script": "python -m pydiffmed.demo.train", "iterations": step, "batch": batch, "lr": lr,
                  "ema_decay": ema_decay, "seed": seed, "bf16_autocast": bf16, "init": init,
                  "data": f"pydiffmed.data phantom family {seed}, indices 0..{step * batch - 1}"
                  + ("" if lesions else ", without lesions"), "seconds": round(time.perf_counter() - started),
                  "final_loss": final_loss, "torch": torch.__version__, "commit": _git_commit()}
        name = os.path.basename(os.path.normpath(out)).removesuffix(".safetensors")
        save_model(out, ema, model_config(ema, size, source, name, lesions), overwrite=True)

    fit_denoiser(model, ema, lambda step: data.phantoms(batch, seed=seed, shape=size, start=step * batch,
                                                        lesions=lesions),
                 iterations, lr, ema_decay, seed, bf16, save, save_every, log)
    log(f"saved {out} after {iterations} iterations, {time.perf_counter() - started:.0f} s")
    return ema


def fit_denoiser(model, ema, draw_batch, iterations: int, lr: float, ema_decay: float, seed: int, bf16: bool, save,
                 save_every: int, log) -> None:
    """The demo models' training loop: v-prediction MSE at uniform timesteps of SCHEDULE on the clean batches
    `draw_batch(step)`, AdamW with `learning_rate`, gradient clipping, an EMA of the weights in `ema`;
    `save(step, smoothed_loss)` every `save_every` steps and at the end."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = build_schedule(SCHEDULE)
    alphas_cumprod = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    started, running_loss = time.perf_counter(), None
    for step in range(iterations):
        x0 = draw_batch(step)
        batch = x0.shape[0]
        t = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1, 1)
        s = (1.0 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1, 1)
        target = a * noise - s * x0
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, iterations, lr)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            prediction = model(a * x0 + s * noise, t)
        loss = (prediction.float() - target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        decay = min(ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1.0 - decay)
        value = loss.item()
        running_loss = value if running_loss is None else 0.98 * running_loss + 0.02 * value
        if step % 50 == 0 or step == iterations - 1:
            log(f"step {step:5d}/{iterations}  loss {value:.4f}  (smoothed {running_loss:.4f})  "
                f"lr {learning_rate(step, iterations, lr):.2e}  {time.perf_counter() - started:7.0f} s")
        if save_every and (step + 1) % save_every == 0 and step + 1 < iterations:
            save(step + 1, running_loss)
    save(iterations, running_loss)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pydiffmed.demo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="model directory to write (default: the bundled demo)")
    parser.add_argument("--iterations", type=int, default=2600)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32 (slower)")
    parser.add_argument("--healthy", action="store_true", help="phantoms without lesions (for anomaly detection)")
    parser.add_argument("--init", default=None, help="start from this model's weights (directory or bundled name)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train(args.out, args.iterations, args.batch, args.lr, seed=args.seed, bf16=args.bf16, lesions=not args.healthy,
          init=args.init)
    return 0


if __name__ == "__main__":
    sys.exit(main())

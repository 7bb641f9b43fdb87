"""Train the bundled `demo_latent` model: latent diffusion of 128³ head phantoms (a 4× AutoencoderKL and the demo
UNet on its 4×32³ latents).

    python -m pydiffmed.demo.train_latent                 # the shipped model (≈1.5 h on 2 CPU cores)
    python -m pydiffmed.demo.train_latent --autoencoder-iterations 4 --unet-iterations 4 --phantoms 4 \\
        --autoencoder-phantoms 2 --size 32 --out /tmp/latent_smoke

Three stages, every draw from generators seeded by --seed:
1. the autoencoder learns to reconstruct whole phantoms (family --seed, indices 0..--autoencoder-phantoms-1,
   randomly flipped along each axis): L1 loss plus MONAI's KL term at weight 1e-6, AdamW, bf16 autocast;
2. --phantoms phantoms (the same family from index 0) are encoded to their latent means; scale_factor is
   1 / their standard deviation, so that the UNet sees latents of unit variance (MONAI's latent tutorials);
3. the demo's UNet (4 channels in and out) learns the scaled latents with the pixel demo's loop
   (`train.fit_denoiser`: v-prediction, cosine schedule, EMA), each batch drawn from the latent pool.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .. import data
from ..modelfile import MODELS_DIR, load_autoencoder, save_model
from ..models import AutoencoderKL, UNet3D
from .train import UNET, _git_commit, fit_denoiser, learning_rate, model_config, parameters_in_millions

DEFAULT_OUT = os.path.join(MODELS_DIR, "demo_latent")
VOLUME_SIZE = 128
AUTOENCODER = dict(spatial_dims=3, in_channels=1, out_channels=1, channels=(16, 32, 32), latent_channels=4,
                   num_res_blocks=1, attention_levels=(False, False, False), norm_num_groups=8,
                   with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
LATENT_UNET = dict(UNET, in_channels=AUTOENCODER["latent_channels"], out_channels=AUTOENCODER["latent_channels"])
KL_WEIGHT = 1e-6


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """MONAI's KL term of AutoencoderKL training: KL(N(mu, sigma²) ‖ N(0, 1)) summed over a sample, batch mean."""
    z_mu, z_sigma = z_mu.float(), z_sigma.float()
    per_sample = 0.5 * (z_mu.square() + z_sigma.square() - torch.log(z_sigma.square()) - 1.0)
    return per_sample.flatten(1).sum(1).mean()


def train_autoencoder(phantoms: torch.Tensor, iterations: int, lr: float, seed: int, bf16: bool = True,
                      log=print) -> AutoencoderKL:
    """Stage 1: an AutoencoderKL(**AUTOENCODER) fitted to `phantoms` (N, 1, D, H, W), one randomly flipped
    phantom per step; returns it in eval mode."""
    torch.manual_seed(seed)  # initialisation and the posterior draws of `forward`
    autoencoder = AutoencoderKL(**AUTOENCODER).train()
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 1)
    started, running = time.perf_counter(), None
    for step in range(iterations):
        index = int(torch.randint(0, phantoms.shape[0], (), generator=generator))
        flips = [axis + 2 for axis in range(3) if torch.rand((), generator=generator) < 0.5]
        x = phantoms[index:index + 1].float()
        x = x.flip(flips) if flips else x
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, iterations, lr, warmup=min(100, iterations // 10 + 1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            reconstruction, z_mu, z_sigma = autoencoder(x)
        l1 = (reconstruction.float() - x).abs().mean()
        loss = l1 + KL_WEIGHT * kl_divergence(z_mu, z_sigma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(autoencoder.parameters(), 1.0)
        optimizer.step()
        running = l1.item() if running is None else 0.98 * running + 0.02 * l1.item()
        if step % 50 == 0 or step == iterations - 1:
            log(f"autoencoder step {step:5d}/{iterations}  L1 {l1.item():.4f}  (smoothed {running:.4f})  "
                f"{time.perf_counter() - started:7.0f} s")
    return autoencoder.eval().requires_grad_(False)


@torch.no_grad()
def encode_means(autoencoder: AutoencoderKL, volumes, bf16: bool = True) -> torch.Tensor:
    """The latent means of an iterable of (1, 1, D, H, W) volumes, stacked (N, latent_channels, ...) in float32."""
    means = []
    for volume in volumes:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            means.append(autoencoder.encode(volume)[0].float())
    return torch.cat(means)


def train_latent(out: str = DEFAULT_OUT, *, size: int = VOLUME_SIZE, autoencoder_phantoms: int = 256,
                 autoencoder_iterations: int = 800, autoencoder_lr: float = 1e-3, phantoms: int = 768,
                 unet_iterations: int = 2000, batch: int = 4, lr: float = 5e-4, ema_decay: float = 0.998,
                 seed: int = 0, bf16: bool = True, init_autoencoder: str | None = None, save_every: int = 500,
                 log=lambda line: print(line, flush=True)) -> tuple[UNet3D, AutoencoderKL]:
    """Train and save the latent demo model to `out` (a latent pydiffmed model directory); returns (UNet EMA,
    autoencoder). init_autoencoder: take the autoencoder of this latent model instead of stage 1."""
    for name, value in (("size", size), ("autoencoder_phantoms", autoencoder_phantoms), ("phantoms", phantoms),
                        ("unet_iterations", unet_iterations), ("batch", batch)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if init_autoencoder is None and autoencoder_iterations < 1:
        raise ValueError(f"autoencoder_iterations must be >= 1, got {autoencoder_iterations}")
    factor = 2 ** (len(AUTOENCODER["channels"]) - 1)
    latent_size = size // factor
    if size % factor or latent_size % 4:
        raise ValueError(f"size must be a multiple of {4 * factor} (the autoencoder's {factor}x and the UNet's "
                         f"levels), got {size}")
    started = time.perf_counter()

    def phantom(index):
        return data.head_phantom(seed, index, shape=size)[None]

    pool = min(autoencoder_phantoms, phantoms)
    first = torch.cat([phantom(i) for i in range(pool)])
    if init_autoencoder is None:
        autoencoder = train_autoencoder(first, autoencoder_iterations, autoencoder_lr, seed, bf16, log)
    else:
        autoencoder = load_autoencoder(init_autoencoder).eval().requires_grad_(False)
    latents = encode_means(autoencoder, [*first.split(1), *(phantom(i) for i in range(pool, phantoms))], bf16)
    del first
    scale_factor = 1.0 / float(latents.std())
    latents *= scale_factor
    log(f"encoded {phantoms} phantoms to latents {tuple(latents.shape[1:])}, scale_factor {scale_factor:.4f}  "
        f"{time.perf_counter() - started:7.0f} s")

    torch.manual_seed(seed)
    model = UNet3D(**LATENT_UNET).train()
    ema = UNet3D(**LATENT_UNET).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    draws = torch.Generator().manual_seed(seed + 2)

    def save(step, final_loss):
        source = {"script": "python -m pydiffmed.demo.train_latent", "seed": seed, "bf16_autocast": bf16,
                  "autoencoder": ({"iterations": autoencoder_iterations, "lr": autoencoder_lr,
                                   "data": f"pydiffmed.data phantom family {seed}, indices 0..{pool - 1}, "
                                           f"randomly flipped", "kl_weight": KL_WEIGHT}
                                  if init_autoencoder is None else {"init": init_autoencoder}),
                  "unet": {"iterations": step, "batch": batch, "lr": lr, "ema_decay": ema_decay,
                           "data": f"latent means of pydiffmed.data phantom family {seed}, indices 0..{phantoms - 1}",
                           "final_loss": final_loss},
                  "seconds": round(time.perf_counter() - started), "torch": torch.__version__,
                  "commit": _git_commit()}
        name = os.path.basename(os.path.normpath(out))
        config = model_config(ema, size, source, name)
        config["clip_sample"] = None  # latents of unit variance: clipping x0 to [-1, 1] would cut them
        unet_size, autoencoder_size = parameters_in_millions(ema), parameters_in_millions(autoencoder)
        config["description"] = (f"latent diffusion of pydiffmed.data head phantoms, {size}^3 at "
                                 f"{config['spacing'][0]:g} mm: UNet3D ({unet_size:.1f} M parameters) on the "
                                 f"{latent_size}^3 latents of a {factor}x AutoencoderKL ({autoencoder_size:.2f} "
                                 f"M parameters)")
        config["autoencoder"] = {"scale_factor": scale_factor}
        save_model(out, ema, config, autoencoder=autoencoder, overwrite=True)

    fit_denoiser(model, ema, lambda step: latents[torch.randint(0, phantoms, (batch,), generator=draws)],
                 unet_iterations, lr, ema_decay, seed, bf16, save, save_every, log)
    log(f"saved {out}, {time.perf_counter() - started:.0f} s")
    return ema, autoencoder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pydiffmed.demo.train_latent",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="model directory to write (default: the bundled "
                                                           "demo_latent)")
    parser.add_argument("--size", type=int, default=VOLUME_SIZE, help="image size (the latents are size/4)")
    parser.add_argument("--autoencoder-phantoms", type=int, default=256)
    parser.add_argument("--autoencoder-iterations", type=int, default=800)
    parser.add_argument("--autoencoder-lr", type=float, default=1e-3)
    parser.add_argument("--init-autoencoder", default=None,
                        help="reuse the autoencoder of this latent model directory (skips stage 1)")
    parser.add_argument("--phantoms", type=int, default=768, help="phantoms encoded for the UNet")
    parser.add_argument("--unet-iterations", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32 (slower)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_latent(args.out, size=args.size, autoencoder_phantoms=args.autoencoder_phantoms,
                 autoencoder_iterations=args.autoencoder_iterations, autoencoder_lr=args.autoencoder_lr,
                 phantoms=args.phantoms, unet_iterations=args.unet_iterations, batch=args.batch, lr=args.lr,
                 seed=args.seed, bf16=args.bf16, init_autoencoder=args.init_autoencoder)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Drop-in MONAI inferers whose `sample` runs on pydiffmed's engine: change one import.

    from pydiffmed.integrations.monai import DiffusionInferer        # was: from monai.inferers import ...
    inferer = DiffusionInferer(scheduler)                               # a MONAI scheduler, as before
    image = inferer.sample(input_noise=noise, diffusion_model=unet, scheduler=scheduler)

DiffusionInferer, LatentDiffusionInferer, ControlNetDiffusionInferer and ControlNetLatentDiffusionInferer subclass
MONAI's classes (so `__call__` for training and `get_likelihood` are MONAI's own) and replace `sample`, which takes
the same arguments (input_noise, diffusion_model, [autoencoder_model], [controlnet, cn_cond], scheduler,
save_intermediates, intermediate_steps, conditioning, mode 'crossattn' / 'concat', verbose, seg, cfg,
cfg_fill_value) and returns the same thing: the sample, or (sample, intermediates) with save_intermediates (the
state after every step whose timestep is a multiple of intermediate_steps, as MONAI keeps them; decoded for the
latent inferers). Per call:
* the MONAI scheduler becomes the pydiffmed solver taking the same steps (`pydiffmed.solvers.from_monai`; its
  timesteps checked against the scheduler's);
* MONAI's DiffusionModelUNet / ControlNet are accelerated in place (`pydiffmed.accelerate`: same parameters, same
  outputs; accelerate=False leaves them alone); any other module (UNet3D, ControlNet3D, SPADE models) runs as is;
* the loop is the engine's (`pydiffmed.Sampler`: fused updates, CUDA graphs on a GPU, prepared once and reused
  while the model's weights do not change), starting from input_noise itself.
Two cases run step by step instead (same model, same per-step update, no fused loop): MONAI's DDIMScheduler with
clip_sample=True (its default) keeps the noise estimate of the *unclipped* x0, a two-pass update no single fused
step expresses, and DDPM's learned variances (a per-voxel noise scale). The result is the same.

Equality with MONAI (fp32, same input_noise): the deterministic schedulers (DDIM, PNDM, RFlow) give MONAI's sample
within float rounding. DDPM draws fresh noise every step: by default from the engine's Philox generator (`seed=`,
default a seed drawn from torch's global RNG each call, so torch.manual_seed makes runs repeatable) — same
distribution, other values than MONAI's torch.randn; noise="torch" draws it as MONAI does instead (torch.randn from
the global RNG, in MONAI's order and shapes), so after the same torch.manual_seed the sample equals MONAI's.
dtype=torch.bfloat16 (or float16) runs the network in that precision with a float32 solver state.
"""
from __future__ import annotations

import copy
import math
import numbers
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

try:
    from monai import inferers as _inferers
    from monai.data import decollate_batch
    from monai.networks.nets import ControlNet, DiffusionModelUNet, SPADEAutoencoderKL, SPADEDiffusionModelUNet
except ImportError as exc:  # pragma: no cover - MONAI is what this module integrates with
    raise ImportError(f"pydiffmed.integrations.monai needs MONAI (pip install monai): {exc}") from exc

from ..accelerate import accelerate as _accelerate
from ..engine import Sampler
from ..ops._checks import tensor_state
from ..ops.fused_step import philox_keys
from ..solvers.convert import _check_grid, from_monai
from ..solvers.ddpm import DDPM

NOISE_MODES = ("philox", "torch")
_ARGUMENT_OF = {"context": "conditioning", "concat": "conditioning", "controlnet_cond": "cn_cond"}  # cond key → arg
_MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class MonaiModelCall(nn.Module):
    """A MONAI diffusion model (and ControlNet) in the engine's call form model(x, t, **cond), calling them exactly
    as MONAI's inferers do: cond 'context' (cross-attention), 'concat' (channels appended to x: mode='concat'),
    'controlnet_cond' (the ControlNet's image), 'seg' (SPADE models)."""

    def __init__(self, unet: nn.Module, controlnet: nn.Module | None = None):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.spade = isinstance(unet, SPADEDiffusionModelUNet)

    def forward(self, x, t, context=None, concat=None, controlnet_cond=None, seg=None):
        # MONAI's inferers pass the step's timestep as a (1,) tensor, broadcast over the batch: so does this (every
        # sample of a step has the same time; the time embedding is then computed once, as MONAI's)
        t = t.reshape(-1)[:1]
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        if context is not None and context.is_floating_point():
            context = context.to(x.dtype)
        extra = {"seg": seg} if self.spade else {}
        if self.controlnet is None:
            return self.unet(x, timesteps=t, context=context, **extra)
        down, mid = self.controlnet(x=x, timesteps=t, controlnet_cond=controlnet_cond.to(x.dtype), context=context)
        return self.unet(x, timesteps=t, context=context, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, **extra)


class _EngineSampling:
    """The sampling all four inferers share (a mixin before MONAI's class)."""

    def _configure(self, accelerate, dtype, noise, seed, cuda_graph):
        if dtype is not None and dtype not in _MODEL_DTYPES:
            raise TypeError(f"dtype must be None (the model's), torch.float32, torch.float16 or torch.bfloat16, "
                            f"got {dtype!r}")
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be None or an int, got {seed!r}")
        self.accelerate, self.dtype, self.noise, self.seed = bool(accelerate), dtype, noise, seed
        self.cuda_graph = bool(cuda_graph)
        self._call = None            # MonaiModelCall of the last models sampled
        self._prepared = None        # (key, model in the sampling dtype)
        self._sampler = None         # (key, Sampler)
        self.last_run = None         # "engine" or "step by step": how the last sample ran

    # -- arguments ---------------------------------------------------------------------------------------------
    @staticmethod
    def _check_arguments(input_noise, mode, conditioning, save_intermediates, intermediate_steps, cfg,
                         cfg_fill_value, concat_needs_conditioning):
        if mode not in ["crossattn", "concat"]:
            raise NotImplementedError(f"{mode} condition is not supported")
        if mode == "concat" and conditioning is None and concat_needs_conditioning:
            raise ValueError("Conditioning must be supplied for if condition mode is concat.")
        if not isinstance(input_noise, torch.Tensor) or not input_noise.is_floating_point():
            got = input_noise.dtype if isinstance(input_noise, torch.Tensor) else type(input_noise).__name__
            raise TypeError(f"input_noise must be a floating-point tensor, got {got}")
        if input_noise.ndim not in (4, 5):
            raise ValueError(f"input_noise must be (B, C, H, W) or (B, C, D, H, W), got shape "
                             f"{tuple(input_noise.shape)}")
        if conditioning is not None and not isinstance(conditioning, torch.Tensor):
            raise TypeError(f"conditioning must be a tensor or None, got {type(conditioning).__name__}")
        if save_intermediates and (isinstance(intermediate_steps, bool) or not isinstance(
                intermediate_steps, numbers.Integral) or intermediate_steps < 1):
            raise ValueError(f"save_intermediates needs intermediate_steps, a positive int (intermediates are kept "
                             f"after every step whose timestep is a multiple of it), got {intermediate_steps!r}")
        for name, value in (("cfg", cfg), ("cfg_fill_value", cfg_fill_value)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                      or not math.isfinite(value)):
                raise TypeError(f"{name} must be a finite number{' or None' if name == 'cfg' else ''}, got {value!r}")

    def _solver_for(self, scheduler):
        if scheduler is None:
            raise ValueError("no scheduler: pass scheduler= to sample() or give one to the inferer")
        num_steps = None
        if getattr(scheduler, "num_inference_steps", 0) is None and getattr(scheduler, "timesteps", None) is not None:
            num_steps = len(scheduler.timesteps)     # MONAI's DDPM before set_timesteps: all its training steps
        solver = from_monai(scheduler, num_steps)
        _check_grid(solver, scheduler.timesteps, f"MONAI {type(scheduler).__name__}")
        return solver

    # -- models ------------------------------------------------------------------------------------------------
    def _model(self, diffusion_model, controlnet, device):
        """The engine's model (MonaiModelCall), in the sampling dtype and on `device`: a converted copy when they
        differ from the model's, kept while the model's weights stay the same."""
        for name, module in (("diffusion_model", diffusion_model), ("controlnet", controlnet)):
            if module is not None and not isinstance(module, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(module).__name__}")
        if self.accelerate:
            for module in (diffusion_model, controlnet):
                if type(module) in (DiffusionModelUNet, ControlNet):
                    _accelerate(module)
        call = self._call
        if call is None or call.unet is not diffusion_model or call.controlnet is not controlnet:
            call = self._call = MonaiModelCall(diffusion_model, controlnet)
        own = next((p.dtype for p in call.parameters() if p.is_floating_point()), torch.float32)
        dtype = self.dtype or (own if own in _MODEL_DTYPES else torch.float32)
        tensors = [*call.parameters(), *call.buffers()]
        if all(t.device == device for t in tensors) and all(p.dtype == dtype for p in call.parameters()
                                                            if p.is_floating_point()):
            return call, dtype
        key = (id(diffusion_model), id(controlnet), device, dtype,
               tuple(tensor_state(t) for t in tensors))
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = (key, copy.deepcopy(call).to(device=device, dtype=dtype))
        return self._prepared[1], dtype

    def _sampler_for(self, model, solver, shape, dtype, guidance, device):
        tensors = [*model.parameters(), *model.buffers()]
        key = (id(model), tuple(tensor_state(t) for t in tensors), shape, dtype, guidance, device,
               solver.plan("cpu").identity(), type(solver).__name__)
        if self._sampler is None or self._sampler[0] != key:
            self._sampler = None
            sampler = Sampler(model, solver, shape, device=device, dtype=dtype, guidance_scale=guidance,
                              cuda_graph=self.cuda_graph)
            self._sampler = (key, sampler)
        return self._sampler[1]

    # -- the loop ----------------------------------------------------------------------------------------------
    def _sample_state(self, input_noise, diffusion_model, controlnet, cn_cond, scheduler, save_intermediates,
                      intermediate_steps, conditioning, mode, verbose, seg, cfg, cfg_fill_value,
                      concat_needs_conditioning):
        """(final state, [intermediate states]) of MONAI's sampling loop, run by pydiffmed."""
        self._check_arguments(input_noise, mode, conditioning, save_intermediates, intermediate_steps, cfg,
                              cfg_fill_value, concat_needs_conditioning)
        if controlnet is not None and not isinstance(cn_cond, torch.Tensor):
            raise TypeError(f"cn_cond (the ControlNet's conditioning image) must be a tensor, got "
                            f"{type(cn_cond).__name__}")
        scheduler = scheduler or self.scheduler
        solver = self._solver_for(scheduler)
        device = input_noise.device
        model, dtype = self._model(diffusion_model, controlnet, device)

        cond = {}
        key = "concat" if mode == "concat" else "context"
        if conditioning is not None:
            cond[key] = conditioning
        if controlnet is not None:
            cond["controlnet_cond"] = cn_cond
        if seg is not None and model.spade:
            cond["seg"] = seg
        batch = input_noise.shape[0]
        for name, value in cond.items():
            if value.ndim == 0 or value.shape[0] not in (1, batch):
                what = _ARGUMENT_OF.get(name, name)
                raise ValueError(f"{what} must have a leading batch dimension of 1 or {batch} (input_noise's), got "
                                 f"shape {tuple(value.shape)}")
        cond = {k: v.expand(batch, *v.shape[1:]) for k, v in cond.items()}
        # MONAI's cfg without conditioning runs two identical halves: the same as no guidance
        guidance = float(cfg) if cfg is not None and conditioning is not None else None
        uncond = None
        if guidance is not None:
            uncond = dict(cond, **{key: torch.full_like(cond[key], cfg_fill_value)})

        times = torch.as_tensor(scheduler.timesteps).detach().cpu()
        keep = {i for i, t in enumerate(times) if save_intermediates and bool(t % intermediate_steps == 0)}
        # the evaluations after which MONAI's scheduler draws noise: DDPM's while t > 0 (its DDIM has eta 0 here)
        noisy = [isinstance(solver, DDPM) and float(t) > 0 for t in solver.timesteps]
        seed = self.seed
        if seed is None and any(noisy) and self.noise == "philox":
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        try:
            solver.plan("cpu")
            fused = not (self.noise == "torch" and any(noisy))
        except ValueError:        # MONAI's default clipped DDIM, learned variances: no single-pass plan
            fused = False
        shape = tuple(input_noise.shape)
        if fused:
            self.last_run = "engine"
            sampler = self._sampler_for(model, solver, shape, dtype, guidance, device)
            kept = []

            def callback(e, _x0):
                if e in keep:
                    form = sampler.plan.forms[sampler.plan.form_of_eval[e]]
                    kept.append(sampler.buffers[form.out].clone())

            out = sampler(0 if seed is None else seed, cond=cond or None, uncond=uncond, x_T=input_noise,
                          callback=callback if keep else None, progress=bool(verbose))
            return out.to(input_noise.dtype), [k.to(input_noise.dtype) for k in kept]
        self.last_run = "step by step"
        return self._step_by_step(model, dtype, solver, input_noise, cond, uncond, guidance, keep, noisy,
                                  0 if seed is None else seed, verbose)

    def _step_by_step(self, model, dtype, solver, input_noise, cond, uncond, guidance, keep, noisy, seed, verbose):
        batch = input_noise.shape[0]
        kwargs = dict(cond)
        if guidance is not None:
            kwargs = {k: torch.cat([uncond[k], v]) for k, v in cond.items()}
        seeds = philox_keys(seed, batch).to(input_noise.device)
        times = solver.timesteps.to(input_noise.device)
        solver.reset()
        x = input_noise.float().clone()
        kept = []
        steps = range(solver.num_model_evals)
        if verbose:
            try:
                from tqdm.auto import tqdm
                steps = tqdm(steps, desc="sampling", leave=False)
            except ImportError:
                pass
        for i in steps:
            model_input = x.to(dtype)
            if guidance is not None:
                model_input = torch.cat([model_input, model_input])
            m = model(model_input, times[i].expand(model_input.shape[0]), **kwargs)
            if guidance is not None:
                m_uncond, m_cond = m.float().chunk(2)
                m = m_uncond + guidance * (m_cond - m_uncond)
            noise = None
            if self.noise == "torch" and noisy[i]:   # as MONAI's DDPMScheduler.step draws it
                noise = torch.randn(x.shape, dtype=m.dtype, layout=m.layout, device=m.device)
            x = solver.step(i, x, m, noise, seeds=seeds)
            if i in keep:
                kept.append(x.to(input_noise.dtype))
        return x.to(input_noise.dtype), kept

    def _decode(self, autoencoder_model, latent, latent_intermediates, seg):
        """MONAI's latent inferers' ending: crop to autoencoder_latent_shape, undo scale_factor, decode."""
        if not callable(getattr(autoencoder_model, "decode_stage_2_outputs", None)):
            raise TypeError(f"autoencoder_model must have decode_stage_2_outputs (a MONAI AutoencoderKL / VQVAE or "
                            f"pydiffmed's AutoencoderKL), got {type(autoencoder_model).__name__}")
        if self.autoencoder_latent_shape is not None:
            latent = torch.stack([self.autoencoder_resizer(i) for i in decollate_batch(latent)], 0)
            latent_intermediates = [torch.stack([self.autoencoder_resizer(i) for i in decollate_batch(z)], 0)
                                    for z in latent_intermediates]
        decode = autoencoder_model.decode_stage_2_outputs
        if isinstance(autoencoder_model, SPADEAutoencoderKL):
            decode = partial(autoencoder_model.decode_stage_2_outputs, seg=seg)
        return decode(latent / self.scale_factor), [decode(z / self.scale_factor) for z in latent_intermediates]

    @staticmethod
    def _check_spade(autoencoder_model, diffusion_model):
        if (isinstance(autoencoder_model, SPADEAutoencoderKL) and isinstance(diffusion_model, SPADEDiffusionModelUNet)
                and autoencoder_model.decoder.label_nc != diffusion_model.label_nc):
            raise ValueError(f"If both autoencoder_model and diffusion_model implement SPADE, the number of semantic "
                             f"labels for each must be compatible, but got {autoencoder_model.decoder.label_nc} and "
                             f"{diffusion_model.label_nc}")


def _result(image, intermediates, save_intermediates):
    return (image, intermediates) if save_intermediates else image


_OPTIONS_DOC = """
    pydiffmed options (keyword only): accelerate (default True: pydiffmed.accelerate MONAI's DiffusionModelUNet /
    ControlNet in place), dtype (the network's precision: None = the model's, or torch.bfloat16 / torch.float16 with
    a float32 solver state), noise ('philox' or 'torch': where DDPM's per-step noise comes from, see the module
    docstring), seed (the Philox seed; None = drawn from torch's global RNG per call), cuda_graph (on a GPU)."""


class DiffusionInferer(_EngineSampling, _inferers.DiffusionInferer):
    __doc__ = "MONAI's DiffusionInferer, sampling on pydiffmed's engine." + _OPTIONS_DOC

    def __init__(self, scheduler, *, accelerate=True, dtype=None, noise="philox", seed=None, cuda_graph=True):
        _inferers.DiffusionInferer.__init__(self, scheduler)
        self._configure(accelerate, dtype, noise, seed, cuda_graph)

    @torch.no_grad()
    def sample(self, input_noise, diffusion_model, scheduler=None, save_intermediates=False, intermediate_steps=100,
               conditioning=None, mode="crossattn", verbose=True, seg=None, cfg=None, cfg_fill_value=-1.0):
        """As MONAI's DiffusionInferer.sample (same arguments, same result)."""
        image, intermediates = self._sample_state(input_noise, diffusion_model, None, None, scheduler,
                                                  save_intermediates, intermediate_steps, conditioning, mode,
                                                  verbose, seg, cfg, cfg_fill_value, True)
        return _result(image, intermediates, save_intermediates)


class LatentDiffusionInferer(_EngineSampling, _inferers.LatentDiffusionInferer):
    __doc__ = "MONAI's LatentDiffusionInferer, sampling on pydiffmed's engine." + _OPTIONS_DOC

    def __init__(self, scheduler, scale_factor=1.0, ldm_latent_shape=None, autoencoder_latent_shape=None, *,
                 accelerate=True, dtype=None, noise="philox", seed=None, cuda_graph=True):
        _inferers.LatentDiffusionInferer.__init__(self, scheduler, scale_factor, ldm_latent_shape,
                                                  autoencoder_latent_shape)
        self._configure(accelerate, dtype, noise, seed, cuda_graph)

    @torch.no_grad()
    def sample(self, input_noise, autoencoder_model, diffusion_model, scheduler=None, save_intermediates=False,
               intermediate_steps=100, conditioning=None, mode="crossattn", verbose=True, seg=None, cfg=None,
               cfg_fill_value=-1.0):
        """As MONAI's LatentDiffusionInferer.sample: the latent sampled by pydiffmed, decoded by the autoencoder's
        own decode_stage_2_outputs (intermediates too)."""
        self._check_spade(autoencoder_model, diffusion_model)
        latent, latents = self._sample_state(input_noise, diffusion_model, None, None, scheduler, save_intermediates,
                                             intermediate_steps, conditioning, mode, verbose, seg, cfg,
                                             cfg_fill_value, True)
        image, intermediates = self._decode(autoencoder_model, latent, latents, seg)
        return _result(image, intermediates, save_intermediates)


class ControlNetDiffusionInferer(_EngineSampling, _inferers.ControlNetDiffusionInferer):
    __doc__ = "MONAI's ControlNetDiffusionInferer, sampling on pydiffmed's engine." + _OPTIONS_DOC

    def __init__(self, scheduler, *, accelerate=True, dtype=None, noise="philox", seed=None, cuda_graph=True):
        _inferers.ControlNetDiffusionInferer.__init__(self, scheduler)
        self._configure(accelerate, dtype, noise, seed, cuda_graph)

    @torch.no_grad()
    def sample(self, input_noise, diffusion_model, controlnet, cn_cond, scheduler=None, save_intermediates=False,
               intermediate_steps=100, conditioning=None, mode="crossattn", verbose=True, seg=None, cfg=None,
               cfg_fill_value=-1.0):
        """As MONAI's ControlNetDiffusionInferer.sample: ControlNet and UNet are one model call per step."""
        if not isinstance(controlnet, nn.Module):
            raise TypeError(f"controlnet must be a torch.nn.Module, got {type(controlnet).__name__}")
        image, intermediates = self._sample_state(input_noise, diffusion_model, controlnet, cn_cond, scheduler,
                                                  save_intermediates, intermediate_steps, conditioning, mode,
                                                  verbose, seg, cfg, cfg_fill_value, False)
        return _result(image, intermediates, save_intermediates)


class ControlNetLatentDiffusionInferer(_EngineSampling, _inferers.ControlNetLatentDiffusionInferer):
    __doc__ = "MONAI's ControlNetLatentDiffusionInferer, sampling on pydiffmed's engine." + _OPTIONS_DOC

    def __init__(self, scheduler, scale_factor=1.0, ldm_latent_shape=None, autoencoder_latent_shape=None, *,
                 accelerate=True, dtype=None, noise="philox", seed=None, cuda_graph=True):
        _inferers.ControlNetLatentDiffusionInferer.__init__(self, scheduler, scale_factor, ldm_latent_shape,
                                                            autoencoder_latent_shape)
        self._configure(accelerate, dtype, noise, seed, cuda_graph)

    @torch.no_grad()
    def sample(self, input_noise, autoencoder_model, diffusion_model, controlnet, cn_cond, scheduler=None,
               save_intermediates=False, intermediate_steps=100, conditioning=None, mode="crossattn", verbose=True,
               seg=None, cfg=None, cfg_fill_value=-1.0):
        """As MONAI's ControlNetLatentDiffusionInferer.sample."""
        if not isinstance(controlnet, nn.Module):
            raise TypeError(f"controlnet must be a torch.nn.Module, got {type(controlnet).__name__}")
        self._check_spade(autoencoder_model, diffusion_model)
        if isinstance(cn_cond, torch.Tensor) and isinstance(input_noise, torch.Tensor) and \
                cn_cond.shape[2:] != input_noise.shape[2:]:
            cn_cond = F.interpolate(cn_cond, input_noise.shape[2:])   # as MONAI: the image at the latent's size
        latent, latents = self._sample_state(input_noise, diffusion_model, controlnet, cn_cond, scheduler,
                                             save_intermediates, intermediate_steps, conditioning, mode, verbose,
                                             seg, cfg, cfg_fill_value, False)
        image, intermediates = self._decode(autoencoder_model, latent, latents, seg)
        return _result(image, intermediates, save_intermediates)


__all__ = ["ControlNetDiffusionInferer", "ControlNetLatentDiffusionInferer", "DiffusionInferer",
           "LatentDiffusionInferer", "MonaiModelCall", "NOISE_MODES"]

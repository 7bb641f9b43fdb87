"""pydiffmed.integrations.monai: the drop-in inferers against MONAI's own, on small seeded MONAI models (random
non-zero weights, 8³ volumes, batch 2), fp32, same input_noise.

* DiffusionInferer: DDIM (MONAI's default clip_sample=True, run step by step; and clip_sample=False, run by the
  engine), PNDM, RFlow (with the resolution shift), DDPM with noise="torch" (MONAI's torch.randn noise, same
  manual_seed) and with learned variances; DDPM with the default Philox noise is repeatable from a seed and equals
  the solver's own loop with that noise; cross-attention conditioning with and without cfg, concat conditioning;
  intermediates (same count, same positions, same values); the in-place acceleration and accelerate=False; the
  prepared Sampler is reused until the weights change; bf16 within the ARCHITECTURE §6 rule.
* LatentDiffusionInferer: with scale_factor and the latent pad/crop (ldm_latent_shape / autoencoder_latent_shape),
  MONAI's AutoencoderKL decoding, intermediates decoded.
* ControlNetDiffusionInferer (with cfg) and ControlNetLatentDiffusionInferer.
* Same sample() signatures as MONAI's; wrong arguments fail with a clear message.
Tolerance: max |ours - MONAI| <= 1e-4 · max |MONAI| (measured: a few 1e-7 relative for the deterministic runs,
up to ~4e-5 where MONAI's float32 tables or the clipped DDIM's saturated values dominate)."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

from helpers import max_abs_err, randomize_

monai_nets = pytest.importorskip("monai.networks.nets")
pytest.importorskip("einops")  # MONAI's attention blocks need it
from monai import inferers as monai_inferers  # noqa: E402
from monai.networks import schedulers  # noqa: E402

import pydiffmed  # noqa: E402
from pydiffmed.integrations import monai as dropin  # noqa: E402

SHAPE = (2, 1, 8, 8, 8)
STEPS = 10
RTOL = 1e-4
UNET = dict(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, True),
            num_res_blocks=1, num_head_channels=8, norm_num_groups=4)

pytestmark = pytest.mark.usefixtures("one_thread")


def unet(seed=0, **changes):
    torch.manual_seed(seed)
    return randomize_(monai_nets.DiffusionModelUNet(**{**UNET, **changes}).eval(), seed)


def noise(shape=SHAPE, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def scheduler(name, steps=STEPS, numel=None, **options):
    sched = getattr(schedulers, name)(**options)
    if numel is None:
        sched.set_timesteps(steps)
    else:
        sched.set_timesteps(steps, input_img_size_numel=numel)
    return sched


def assert_close(ours, ref, rtol=RTOL, what=""):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (what, ours.shape, ref.shape, ours.dtype, ref.dtype)
    scale = ref.abs().max().item()
    err = max_abs_err(ours, ref)
    assert scale > 0 and err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} × max|MONAI| ({scale:.3g})"


def both(sched_factory, model, x, ours_options=None, **sample_kwargs):
    """(MONAI's sample, ours, our inferer) from the same model weights and input noise (ours on a copy, so MONAI's
    model stays un-accelerated)."""
    with torch.no_grad():
        ref = monai_inferers.DiffusionInferer(sched_factory()).sample(x, model, verbose=False, **sample_kwargs)
    inferer = dropin.DiffusionInferer(sched_factory(), **(ours_options or {}))
    out = inferer.sample(x, copy.deepcopy(model), verbose=False, **sample_kwargs)
    return ref, out, inferer


# --- DiffusionInferer ------------------------------------------------------------------------------------------

SCHEDULERS = {  # name -> (factory, how our inferer runs it)
    "DDIM clip_sample=True (MONAI's default)": (lambda: scheduler("DDIMScheduler"), "step by step"),
    "DDIM clip_sample=False, v-prediction": (
        lambda: scheduler("DDIMScheduler", clip_sample=False, prediction_type="v_prediction"), "engine"),
    "DDIM steps_offset, set_alpha_to_one=False": (
        lambda: scheduler("DDIMScheduler", 12, clip_sample=False, steps_offset=1, set_alpha_to_one=False), "engine"),
    "PNDM (Runge-Kutta warm start)": (lambda: scheduler("PNDMScheduler", 12), "engine"),
    "PNDM skip_prk_steps": (lambda: scheduler("PNDMScheduler", skip_prk_steps=True), "engine"),
    "RFlow with the resolution shift": (
        lambda: scheduler("RFlowScheduler", numel=8 ** 3, use_timestep_transform=True, base_img_size_numel=4 ** 3),
        "engine"),
    "RFlow continuous timesteps": (lambda: scheduler("RFlowScheduler", 7, use_discrete_timesteps=False), "engine"),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_sample_equals_monai(name):
    factory, how = SCHEDULERS[name]
    ref, out, inferer = both(factory, unet(), noise())
    assert inferer.last_run == how
    assert_close(out, ref, what=name)


def test_intermediates_equal_monai():
    """Same count and positions (after the steps whose timestep is a multiple of intermediate_steps), same values,
    on the engine and on the step-by-step path."""
    model, x = unet(1), noise(seed=2)
    for factory in (lambda: scheduler("DDIMScheduler", 10, clip_sample=False),
                    lambda: scheduler("DDIMScheduler", 10), lambda: scheduler("PNDMScheduler", 5)):
        ref, ref_steps = monai_inferers.DiffusionInferer(factory()).sample(
            x, model, save_intermediates=True, intermediate_steps=3, verbose=False)
        out, steps = dropin.DiffusionInferer(factory()).sample(x, copy.deepcopy(model), save_intermediates=True,
                                                               intermediate_steps=3, verbose=False)
        assert len(ref_steps) >= 3 and len(steps) == len(ref_steps)
        for k, (a, b) in enumerate(zip(steps, ref_steps)):
            assert_close(a, b, what=f"intermediate {k}")
        assert_close(out, ref, what="final")


def test_ddpm_with_torch_noise_equals_monai():
    """noise='torch' draws DDPM's noise as MONAI does: after the same manual_seed the samples agree. MONAI's float32
    tables lose up to 1.7e-4 (relative) on the last step (test_solvers.test_ddpm_monai_as_is), hence 5e-4."""
    model, x = unet(2), noise(seed=3)
    torch.manual_seed(123)
    ref = monai_inferers.DiffusionInferer(scheduler("DDPMScheduler")).sample(x, model, verbose=False)
    inferer = dropin.DiffusionInferer(scheduler("DDPMScheduler"), noise="torch")
    torch.manual_seed(123)
    out = inferer.sample(x, copy.deepcopy(model), verbose=False)
    assert inferer.last_run == "step by step"
    assert_close(out, ref, rtol=5e-4, what="DDPM, MONAI's noise")
    # the noise matters: another seed gives another sample
    torch.manual_seed(124)
    assert max_abs_err(inferer.sample(x, model, verbose=False), ref) > 1e-2 * ref.abs().max().item()


def test_ddpm_learned_range_with_torch_noise_equals_monai():
    model, x = unet(3, out_channels=2), noise(seed=4)
    make = lambda: scheduler("DDPMScheduler", variance_type="learned_range", clip_sample=False)  # noqa: E731
    torch.manual_seed(5)
    ref = monai_inferers.DiffusionInferer(make()).sample(x, model, verbose=False)
    torch.manual_seed(5)
    out = dropin.DiffusionInferer(make(), noise="torch").sample(x, copy.deepcopy(model), verbose=False)
    assert_close(out, ref, rtol=5e-4, what="DDPM learned_range")


def test_ddpm_philox_noise_is_the_engines_and_repeatable():
    """Default noise: the engine's Philox noise, seeded from torch's global RNG (or seed=): repeatable, and the
    same as the solver's own step loop with those seeds (so it is the documented sampler, not MONAI's draws)."""
    model, x = unet(4), noise(seed=5)
    sched = scheduler("DDPMScheduler")
    inferer = dropin.DiffusionInferer(sched, seed=77)
    out = inferer.sample(x, model, verbose=False)
    assert inferer.last_run == "engine"
    assert torch.equal(out, inferer.sample(x, model, verbose=False))
    solver = pydiffmed.solvers.from_monai(sched)
    seeds = torch.arange(2) + 77
    call = dropin.MonaiModelCall(model)
    with torch.no_grad():
        loop = solver.sample(lambda v, t: call(v, t), x, seeds=seeds)
    assert_close(out, loop, rtol=1e-5, what="engine vs the solver's loop")
    other = dropin.DiffusionInferer(sched, seed=78).sample(x, model, verbose=False)
    assert max_abs_err(other, out) > 1e-2 * out.abs().max().item()
    free = dropin.DiffusionInferer(sched)   # seed drawn from torch's RNG
    torch.manual_seed(9)
    a = free.sample(x, model, verbose=False)
    torch.manual_seed(9)
    assert torch.equal(a, free.sample(x, model, verbose=False))


@pytest.mark.parametrize("cfg", [None, 2.5])
def test_crossattn_conditioning_and_cfg_equal_monai(cfg):
    """On the engine (DDIM) and step by step (DDPM with MONAI's noise). Not MONAI's clipped DDIM here: with a
    random network, conditioning and 10 steps its trajectory amplifies float rounding (MONAI's own float32 tables
    against float64 ones move its result by ~1e-2), which would measure that, not the sampler."""
    model = unet(5, with_conditioning=True, cross_attention_dim=6, attention_levels=(True, True))
    context = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(6))
    x = noise(seed=7)
    ref, out, inferer = both(lambda: scheduler("DDIMScheduler", clip_sample=False), model, x, conditioning=context,
                             cfg=cfg, cfg_fill_value=-0.5)
    assert inferer.last_run == "engine"
    assert_close(out, ref, what=f"crossattn cfg={cfg}, engine")
    torch.manual_seed(11)
    ref = monai_inferers.DiffusionInferer(scheduler("DDPMScheduler")).sample(x, model, conditioning=context, cfg=cfg,
                                                                            cfg_fill_value=-0.5, verbose=False)
    torch.manual_seed(11)
    inferer = dropin.DiffusionInferer(scheduler("DDPMScheduler"), noise="torch")
    out = inferer.sample(x, copy.deepcopy(model), conditioning=context, cfg=cfg, cfg_fill_value=-0.5, verbose=False)
    assert inferer.last_run == "step by step"
    assert_close(out, ref, rtol=5e-4, what=f"crossattn cfg={cfg}, step by step")
    # one conditioning for the whole batch (leading dimension 1), as MONAI's models broadcast it
    one = dropin.DiffusionInferer(scheduler("DDPMScheduler"), noise="torch")
    torch.manual_seed(11)
    single = one.sample(x, copy.deepcopy(model), conditioning=context[:1], cfg=cfg, cfg_fill_value=-0.5,
                        verbose=False)
    torch.manual_seed(11)
    expanded = one.sample(x, copy.deepcopy(model), conditioning=context[:1].expand(2, 3, 6), cfg=cfg,
                          cfg_fill_value=-0.5, verbose=False)
    assert torch.equal(single, expanded)
    if cfg is not None:  # guidance does act
        plain = monai_inferers.DiffusionInferer(scheduler("DDIMScheduler", clip_sample=False)).sample(
            x, model, conditioning=context, verbose=False)
        assert max_abs_err(plain, ref) > 1e-2 * ref.abs().max().item()


@pytest.mark.parametrize("cfg", [None, 3.0])
def test_concat_conditioning_equals_monai(cfg):
    model = unet(6, in_channels=3)
    image = torch.randn(2, 2, 8, 8, 8, generator=torch.Generator().manual_seed(8))
    ref, out, _ = both(lambda: scheduler("DDIMScheduler", clip_sample=False), model, noise(seed=9),
                       conditioning=image, mode="concat", cfg=cfg)
    assert_close(out, ref, what=f"concat cfg={cfg}")


def test_acceleration_in_place_or_not():
    model = unet(7)
    x = noise(seed=10)
    ref = monai_inferers.DiffusionInferer(scheduler("PNDMScheduler")).sample(x, model, verbose=False)
    plain = copy.deepcopy(model)
    kinds = {type(m).__name__ for m in plain.modules()}
    out = dropin.DiffusionInferer(scheduler("PNDMScheduler"), accelerate=False).sample(x, plain, verbose=False)
    assert {type(m).__name__ for m in plain.modules()} == kinds
    assert_close(out, ref, what="accelerate=False")
    fast = copy.deepcopy(model)
    dropin.DiffusionInferer(scheduler("PNDMScheduler")).sample(x, fast, verbose=False)
    assert getattr(fast, "_pdm_accelerated", False)
    assert set(fast.state_dict()) == set(model.state_dict())
    with torch.no_grad():   # MONAI's inferers pass one timestep for the whole batch: the accelerated model takes it
        t = torch.tensor([321.0])
        assert_close(fast(x, t), model(x, t), rtol=1e-5, what="accelerated model, a (1,) timestep for batch 2")


def test_prepared_sampler_is_reused_until_the_weights_change():
    model, x = unet(8), noise(seed=11)
    make = lambda: scheduler("DDIMScheduler", clip_sample=False)  # noqa: E731
    inferer = dropin.DiffusionInferer(make())
    first = inferer.sample(x, model, verbose=False)
    sampler = inferer._sampler[1]
    assert torch.equal(inferer.sample(x, model, verbose=False), first) and inferer._sampler[1] is sampler
    with torch.no_grad():
        for p in model.parameters():        # an optimizer step, in place
            p.mul_(1.05)
    again = inferer.sample(x, model, verbose=False)
    assert inferer._sampler[1] is not sampler
    with torch.no_grad():
        ref = monai_inferers.DiffusionInferer(make()).sample(x, copy.deepcopy(model), verbose=False)
    assert_close(again, ref, what="after the weights changed")
    assert max_abs_err(again, first) > 1e-3 * first.abs().max().item()

    with torch.inference_mode():  # a MONAI script's usual wrapper: tensors made there have no version counter
        assert torch.equal(inferer.sample(x, model, verbose=False), again)
        assert torch.equal(dropin.DiffusionInferer(make()).sample(x, copy.deepcopy(model), verbose=False), again)


def test_bf16_within_design_rule():
    """bf16 network, fp32 state: the error against MONAI fp32 is at most twice that of MONAI run in bf16."""
    model, x = unet(9), noise(seed=12)
    make = lambda: scheduler("DDIMScheduler", clip_sample=False)  # noqa: E731
    with torch.no_grad():
        ref = monai_inferers.DiffusionInferer(make()).sample(x, model, verbose=False)
        theirs = monai_inferers.DiffusionInferer(make()).sample(x.bfloat16(), copy.deepcopy(model).bfloat16(),
                                                                verbose=False).float()
    inferer = dropin.DiffusionInferer(make(), dtype=torch.bfloat16)
    ours = inferer.sample(x, copy.deepcopy(model), verbose=False)
    assert ours.dtype == torch.float32 and inferer.last_run == "engine"
    assert max_abs_err(ours, ref) <= 2 * max_abs_err(theirs, ref) + 1e-3 * ref.abs().max().item()


def test_signatures_match_monai():
    for name in ("DiffusionInferer", "LatentDiffusionInferer", "ControlNetDiffusionInferer",
                 "ControlNetLatentDiffusionInferer"):
        ours, theirs = getattr(dropin, name), getattr(monai_inferers, name)
        params = lambda f: [(p.name, p.default) for p in inspect.signature(f).parameters.values()]  # noqa: E731
        assert params(ours.sample) == params(theirs.sample), name
        monai_init = params(theirs.__init__)
        assert params(ours.__init__)[:len(monai_init)] == monai_init, name
        assert issubclass(ours, theirs)


def test_wrong_arguments_fail_clearly():
    model, x = unet(10), noise(seed=13)
    inferer = dropin.DiffusionInferer(scheduler("DDIMScheduler", 3))
    with pytest.raises(NotImplementedError, match="sideways condition is not supported"):
        inferer.sample(x, model, mode="sideways")
    with pytest.raises(ValueError, match="Conditioning must be supplied"):
        inferer.sample(x, model, mode="concat")
    with pytest.raises(TypeError, match="input_noise must be a floating-point tensor"):
        inferer.sample(x.numpy(), model)
    with pytest.raises(ValueError, match=r"input_noise must be \(B, C, H, W\) or \(B, C, D, H, W\)"):
        inferer.sample(x[0, 0], model)
    with pytest.raises(ValueError, match="intermediate_steps, a positive int"):
        inferer.sample(x, model, save_intermediates=True, intermediate_steps=None)
    with pytest.raises(TypeError, match="cfg must be a finite number or None"):
        inferer.sample(x, model, cfg="3")
    with pytest.raises(TypeError, match="diffusion_model must be a torch.nn.Module"):
        inferer.sample(x, lambda v, t: v)
    with pytest.raises(ValueError, match=r"conditioning must have a leading batch dimension of 1 or 2 \(input_noise"):
        inferer.sample(x, unet(10, with_conditioning=True, cross_attention_dim=6, attention_levels=(True, True)),
                       conditioning=torch.zeros(3, 1, 6), verbose=False)
    with pytest.raises(ValueError, match="no scheduler"):
        dropin.DiffusionInferer(None).sample(x, model)
    with pytest.raises(ValueError, match=r"clip_sample_min=-2, clip_sample_max=1"):
        inferer.sample(x, model, scheduler("DDIMScheduler", 3, clip_sample_min=-2.0))
    moved = scheduler("DDIMScheduler", 3)
    moved.timesteps = moved.timesteps - 1
    with pytest.raises(ValueError, match="not the grid its options give"):
        inferer.sample(x, model, moved)
    diffusers = pytest.importorskip("diffusers")
    with pytest.raises(TypeError, match="from_diffusers"):
        inferer.sample(x, model, diffusers.DDIMScheduler())
    with pytest.raises(ValueError, match="noise must be one of"):
        dropin.DiffusionInferer(moved, noise="numpy")
    with pytest.raises(TypeError, match="dtype must be None"):
        dropin.DiffusionInferer(moved, dtype=torch.float64)
    with pytest.raises(TypeError, match="seed must be None or an int"):
        dropin.DiffusionInferer(moved, seed=1.5)


# --- latent and ControlNet ---------------------------------------------------------------------------------------

AE = dict(spatial_dims=3, in_channels=1, out_channels=1, channels=(4, 8), latent_channels=2, num_res_blocks=1,
          attention_levels=(False, False), norm_num_groups=4, with_encoder_nonlocal_attn=False,
          with_decoder_nonlocal_attn=False)


def autoencoder(seed=20):
    torch.manual_seed(seed)
    return randomize_(monai_nets.AutoencoderKL(**AE).eval(), seed)


@pytest.mark.parametrize("pad", [False, True])
def test_latent_inferer_equals_monai(pad):
    """Latent 2×2×4³ (the autoencoder's 8³ output halved), scale_factor 0.7; with pad the diffusion model runs on a
    6³ latent (ldm_latent_shape) cropped back to 4³ before decoding, as MONAI does."""
    ae, model = autoencoder(), unet(21, in_channels=2, out_channels=2)
    side = 6 if pad else 4
    x = noise((2, 2, side, side, side), seed=22)
    shapes = dict(ldm_latent_shape=[6, 6, 6], autoencoder_latent_shape=[4, 4, 4]) if pad else {}
    make = lambda: scheduler("DDIMScheduler", 6, clip_sample=False)  # noqa: E731
    ref, ref_steps = monai_inferers.LatentDiffusionInferer(make(), scale_factor=0.7, **shapes).sample(
        x, ae, model, save_intermediates=True, intermediate_steps=200, verbose=False)
    out, steps = dropin.LatentDiffusionInferer(make(), scale_factor=0.7, **shapes).sample(
        x, ae, copy.deepcopy(model), save_intermediates=True, intermediate_steps=200, verbose=False)
    assert out.shape == (2, 1, 8, 8, 8)
    assert_close(out, ref, what="decoded sample")
    assert len(steps) == len(ref_steps) >= 2
    for a, b in zip(steps, ref_steps):
        assert_close(a, b, what="decoded intermediate")
    with pytest.raises(TypeError, match="decode_stage_2_outputs"):
        dropin.LatentDiffusionInferer(make()).sample(x[:, :, :4, :4, :4], object(), model, verbose=False)


CONTROL = dict(spatial_dims=3, in_channels=1, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
               num_head_channels=8, norm_num_groups=4, with_conditioning=True, cross_attention_dim=6,
               conditioning_embedding_in_channels=1, conditioning_embedding_num_channels=(4, 8))


def controlled(seed=30, in_channels=1, embedding=(4, 8)):
    torch.manual_seed(seed)
    model = unet(seed, with_conditioning=True, cross_attention_dim=6, in_channels=in_channels,
                 out_channels=in_channels)
    control = randomize_(monai_nets.ControlNet(**{**CONTROL, "in_channels": in_channels,
                                                  "conditioning_embedding_num_channels": embedding}).eval(), seed + 1)
    return model, control


@pytest.mark.parametrize("cfg", [None, 3.0])
def test_controlnet_inferer_equals_monai(cfg):
    model, control = controlled()
    gen = torch.Generator().manual_seed(31)
    x, image, context = torch.randn(SHAPE, generator=gen), torch.randn(2, 1, 16, 16, 16, generator=gen), \
        torch.randn(2, 3, 6, generator=gen)
    make = lambda: scheduler("DDIMScheduler", 6, clip_sample=False)  # noqa: E731
    ref = monai_inferers.ControlNetDiffusionInferer(make()).sample(x, model, control, image, conditioning=context,
                                                                     cfg=cfg, verbose=False)
    inferer = dropin.ControlNetDiffusionInferer(make())
    out = inferer.sample(x, copy.deepcopy(model), copy.deepcopy(control), image, conditioning=context, cfg=cfg,
                         verbose=False)
    assert inferer.last_run == "engine"
    assert_close(out, ref, what=f"ControlNet cfg={cfg}")
    with pytest.raises(TypeError, match="cn_cond .* must be a tensor"):
        inferer.sample(x, model, control, None, conditioning=context)


def test_controlnet_latent_inferer_equals_monai():
    """MONAI resizes the ControlNet's image to the latent's size (nearest): here 8³ → 4³, embedded at 4³."""
    ae = autoencoder(40)
    model, control = controlled(41, in_channels=2, embedding=(4,))
    gen = torch.Generator().manual_seed(42)
    x, image, context = torch.randn(2, 2, 4, 4, 4, generator=gen), torch.randn(2, 1, 8, 8, 8, generator=gen), \
        torch.randn(2, 3, 6, generator=gen)
    make = lambda: scheduler("PNDMScheduler", 5)  # noqa: E731
    ref = monai_inferers.ControlNetLatentDiffusionInferer(make(), scale_factor=1.3).sample(
        x, ae, model, control, image, conditioning=context, verbose=False)
    out = dropin.ControlNetLatentDiffusionInferer(make(), scale_factor=1.3).sample(
        x, ae, copy.deepcopy(model), copy.deepcopy(control), image, conditioning=context, verbose=False)
    assert_close(out, ref, what="ControlNet latent")

"""ControlNet3D and accelerate()d MONAI ControlNets against MONAI's `ControlNet` (random weights, zero convolutions
randomised too), bf16 by the ARCHITECTURE §6 rule, and ControlledUNet sampling with pydiffmed.sample against MONAI's
`ControlNetDiffusionInferer.sample` with the same initial noise (with and without classifier-free guidance)."""
import copy

import pytest
import torch
from torch import nn

from helpers import assert_close_by_rule, max_abs_err, randomize_
import pydiffmed
from pydiffmed.models import CheckpointError, ControlledUNet, ControlNet3D, UNet3D

monai_nets = pytest.importorskip("monai.networks.nets")
pytest.importorskip("einops")  # MONAI's attention blocks need it
from monai.inferers import ControlNetDiffusionInferer  # noqa: E402
from monai.networks.schedulers import DDIMScheduler  # noqa: E402

MonaiControlNet, MonaiUNet = monai_nets.ControlNet, monai_nets.DiffusionModelUNet
IN_CH = 2

# name -> (MONAI ControlNet arguments, x's spatial size, conditioning image's spatial size). Odd and ragged sizes;
# the conditioning embedding halves its input once per entry of conditioning_embedding_num_channels after the
# first (ceil), so (10, 13, 17) → (5, 7, 9).
CONFIGS = {
    "2lvl_attn_1res_odd": (dict(channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
                                num_head_channels=8, norm_num_groups=4, conditioning_embedding_in_channels=3,
                                conditioning_embedding_num_channels=(4, 8)), (10, 6, 14), (20, 12, 28)),
    "3lvl_noattn_2res_classes": (dict(channels=(8, 16, 16), attention_levels=(False, False, False),
                                      num_res_blocks=2, num_head_channels=8, norm_num_groups=4, num_class_embeds=3,
                                      conditioning_embedding_in_channels=1,
                                      conditioning_embedding_num_channels=(4, 8)), (12, 20, 8), (24, 39, 15)),
    "2lvl_noattn_1res_oddest": (dict(channels=(8, 8), attention_levels=(False, False), num_res_blocks=1,
                                     num_head_channels=4, norm_num_groups=4, conditioning_embedding_in_channels=1,
                                     conditioning_embedding_num_channels=(4, 8)), (5, 7, 9), (10, 13, 17)),
    "3lvl_cross_updown_res_tuple": (dict(channels=(8, 16, 16), attention_levels=(False, True, True),
                                         num_res_blocks=(1, 2, 1), num_head_channels=(0, 8, 8), norm_num_groups=4,
                                         with_conditioning=True, cross_attention_dim=6, transformer_num_layers=2,
                                         resblock_updown=True, conditioning_embedding_in_channels=2,
                                         conditioning_embedding_num_channels=(4,)), (8, 12, 16), (8, 12, 16)),
    "2lvl_self_attn_combined_nofc_2res": (dict(channels=(8, 16), attention_levels=(True, True), num_res_blocks=2,
                                               num_head_channels=4, norm_num_groups=4, include_fc=False,
                                               use_combined_linear=True, conditioning_embedding_in_channels=1,
                                               conditioning_embedding_num_channels=(4, 4, 8)), (6, 10, 6),
                                          (24, 40, 24)),
    "2d_cross_attn": (dict(spatial_dims=2, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
                           num_head_channels=8, norm_num_groups=4, with_conditioning=True, cross_attention_dim=5,
                           conditioning_embedding_in_channels=1, conditioning_embedding_num_channels=(4, 8)),
                      (14, 10), (28, 20)),
}


def build(name, seed=0, batch=2):
    config, spatial, cond_spatial = CONFIGS[name]
    config = {"spatial_dims": 3, **config}
    torch.manual_seed(seed)
    monai = randomize_(MonaiControlNet(in_channels=IN_CH, **config).eval(), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, IN_CH, *spatial, generator=gen)
    cond = torch.randn(batch, config["conditioning_embedding_in_channels"], *cond_spatial, generator=gen)
    kwargs = {}
    if config.get("with_conditioning"):
        kwargs["context"] = torch.randn(batch, 4, config["cross_attention_dim"], generator=gen)
    if config.get("num_class_embeds"):
        kwargs["class_labels"] = torch.tensor([0, config["num_class_embeds"] - 1][:batch])
    return config, monai, x, cond, torch.tensor([7, 613][:batch]), kwargs


def assert_residuals_close(out, ref, rtol=1e-4, what=""):
    """Every down residual and the mid residual within rtol × max|its reference|."""
    (down, mid), (ref_down, ref_mid) = out, ref
    assert len(down) == len(ref_down), f"{what}: {len(down)} down residuals, MONAI gives {len(ref_down)}"
    for i, (a, b) in enumerate([*zip(down, ref_down), (mid, ref_mid)]):
        assert a.shape == b.shape, f"{what}: residual {i} has shape {tuple(a.shape)}, MONAI's {tuple(b.shape)}"
        scale = b.abs().max().item()
        err = max_abs_err(a, b)
        assert scale > 0 and err <= rtol * scale, f"{what}: residual {i}: max error {err:.3g} > {rtol:g} × {scale:.3g}"


# --- equality with MONAI --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_controlnet3d_and_accelerate_match_monai(name):
    config, monai, x, cond, t, kwargs = build(name)
    native = ControlNet3D.from_monai(monai).eval()
    accelerated = pydiffmed.accelerate(copy.deepcopy(monai))
    with torch.no_grad():
        ref = monai(x, t, cond, 0.7, **kwargs)
        assert_residuals_close(native(x, t, cond, 0.7, **kwargs), ref, what=f"ControlNet3D {name}")
        assert_residuals_close(accelerated(x, t, cond, 0.7, **kwargs), ref, what=f"accelerate {name}")
        # MONAI's keyword form, default scale
        ref = monai(x=x, timesteps=t, controlnet_cond=cond, **kwargs)
        assert_residuals_close(native(x=x, timesteps=t, controlnet_cond=cond, **kwargs), ref, what="keywords")
    assert native.config == ControlNet3D(**native.config).config


def test_defaults_and_keys_equal_monai():
    ours, theirs = ControlNet3D(3, 1), MonaiControlNet(3, 1)
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert list(mine) and set(mine) == set(ref)
    assert all(mine[k].shape == ref[k].shape for k in ref)
    assert "controlnet_down_blocks.0.weight" in mine and "controlnet_mid_block.conv.weight" in mine
    zero_inits = [p for name, p in ours.named_parameters()
                  if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding."
                                                                                        "conv_out"))]
    assert zero_inits and all(not p.any() for p in zero_inits), "zero convolutions start at zero, as MONAI's"


def test_state_dict_round_trip_and_errors():
    config, monai, x, cond, t, kwargs = build("2lvl_attn_1res_odd", seed=3)
    model = ControlNet3D(in_channels=IN_CH, **config)
    model.load_state_dict(monai.state_dict())
    with torch.no_grad():
        assert_residuals_close(model(x, t, cond), monai(x, t, cond), what="load_state_dict")
    state = monai.state_dict()
    del state["controlnet_mid_block.conv.bias"]
    state["controlnet_down_blocks.0.weight"] = state["controlnet_down_blocks.0.weight"][:1]
    with pytest.raises(CheckpointError, match="controlnet_mid_block.conv.bias") as info:
        ControlNet3D(in_channels=IN_CH, **config).load_state_dict(state)
    assert "controlnet_down_blocks.0.weight" in str(info.value)


def test_forward_rejects_bad_inputs():
    config, monai, x, cond, t, kwargs = build("2lvl_attn_1res_odd")
    model = ControlNet3D.from_monai(monai).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="after the conditioning embedding"):
        model(x, t, cond[..., :-2])
    with torch.no_grad(), pytest.raises(ValueError, match="controlnet_cond must be"):
        model(x, t, cond[:, :1])
    with torch.no_grad(), pytest.raises(TypeError, match="controlnet_cond"):
        model(x, t, None)
    with pytest.raises(ValueError, match="conditioning_embedding_num_channels"):
        ControlNet3D(3, 1, conditioning_embedding_num_channels=())


def test_conditioning_scale_and_batch_one_conditioning_image():
    config, monai, x, cond, t, kwargs = build("2lvl_attn_1res_odd", seed=4)
    model = ControlNet3D.from_monai(monai).eval()
    with torch.no_grad():
        assert_residuals_close(model(x, t, cond[:1], 0.0 + 2.5), monai(x, t, cond[:1].expand_as(cond), 2.5),
                               what="batch-1 conditioning image")
        down, mid = model(x, t, cond, 0.0)
    assert not mid.any() and not any(d.any() for d in down)


# --- precision ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["2lvl_attn_1res_odd", "3lvl_noattn_2res_classes",
                                  "2lvl_self_attn_combined_nofc_2res"])
def test_bf16_within_design_rule(name):
    """bf16 ControlNet3D (and accelerate()d MONAI in bf16) vs fp32 MONAI: error ≤ 2 × (MONAI in bf16 vs fp32)."""
    config, monai, x, cond, t, kwargs = build(name, seed=5)
    native = ControlNet3D.from_monai(monai).eval().bfloat16()
    accelerated = pydiffmed.accelerate(copy.deepcopy(monai).bfloat16())
    with torch.no_grad():
        ref_down, ref_mid = monai(x, t, cond, **kwargs)
        torch_down, torch_mid = copy.deepcopy(monai).bfloat16()(x.bfloat16(), t, cond.bfloat16(), **kwargs)
        for label, model in (("ControlNet3D", native), ("accelerate", accelerated)):
            down, mid = model(x.bfloat16(), t, cond.bfloat16(), **kwargs)
            assert mid.dtype == torch.bfloat16
            for i, (out, ref, theirs) in enumerate(zip([*down, mid], [*ref_down, ref_mid], [*torch_down, torch_mid])):
                assert_close_by_rule(out, ref, theirs, floor=1e-3 * ref.abs().max().item(),
                                     what=f"bf16 {label} {name} residual {i}")


# --- sampling: ControlledUNet through the engine vs MONAI's ControlNetDiffusionInferer ---------------------------

UNET = dict(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, True),
            num_res_blocks=1, num_head_channels=8, norm_num_groups=4, with_conditioning=True, cross_attention_dim=6)
CONTROL = dict(spatial_dims=3, in_channels=1, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
               num_head_channels=8, norm_num_groups=4, with_conditioning=True, cross_attention_dim=6,
               conditioning_embedding_in_channels=1, conditioning_embedding_num_channels=(4, 8))
SHAPE, STEPS = (2, 1, 8, 6, 10), 5


def sampling_case(seed=11):
    torch.manual_seed(seed)
    unet = randomize_(MonaiUNet(**UNET).eval(), seed)
    controlnet = randomize_(MonaiControlNet(**CONTROL).eval(), seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    noise = torch.randn(SHAPE, generator=gen)
    image = torch.randn(SHAPE[0], 1, *(2 * s for s in SHAPE[2:]), generator=gen)
    context = torch.randn(SHAPE[0], 3, 6, generator=gen)
    return unet, controlnet, noise, image, context


def monai_sample(unet, controlnet, noise, image, context, cfg=None):
    # MONAI's linear_beta 1000-step schedule; no clipping (MONAI's clip_sample keeps the unclipped eps, a rule the
    # engine's one-pass plan does not apply: pydiffmed.solvers.ddim)
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        return ControlNetDiffusionInferer(scheduler).sample(noise, unet, controlnet, image, scheduler,
                                                            conditioning=context, verbose=False, cfg=cfg)


def ours_sample(model, noise, image, context, guidance_scale=None):
    cond = {"controlnet_cond": image, "context": context}
    uncond = None if guidance_scale is None else {"controlnet_cond": image, "context": torch.full_like(context, -1.0)}
    return pydiffmed.sample(model, SHAPE, solver="ddim", num_steps=STEPS, schedule="linear_beta", spacing="monai",
                            prev_rule="stride", x_T=noise, cond=cond, uncond=uncond,
                            guidance_scale=guidance_scale, progress=False)


def assert_samples_close(out, ref, rtol=1e-4, what=""):
    scale = ref.abs().max().item()
    err = max_abs_err(out, ref)
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} × max|ref| ({scale:.3g})"


@pytest.mark.parametrize("guidance", [None, 3.0])
def test_controlled_sampling_matches_monai_inferer(guidance):
    unet, controlnet, noise, image, context = sampling_case()
    ref = monai_sample(unet, controlnet, noise, image, context, cfg=guidance)
    native = ControlledUNet.from_monai(unet, controlnet).eval()
    assert_samples_close(ours_sample(native, noise, image, context, guidance), ref, what="ControlNet3D + UNet3D")
    accelerated = ControlledUNet(pydiffmed.accelerate(copy.deepcopy(unet)),
                                 pydiffmed.accelerate(copy.deepcopy(controlnet))).eval()
    assert_samples_close(ours_sample(accelerated, noise, image, context, guidance), ref,
                         what="accelerate()d MONAI models")
    # the control does steer the sample: without the ControlNet the result differs
    with torch.no_grad():
        plain = monai_sample(unet, _NoControl(controlnet), noise, image, context, cfg=guidance)
    assert max_abs_err(plain, ref) > 1e-2 * ref.abs().max().item()


class _NoControl(nn.Module):
    """A ControlNet stand-in whose residuals are all zero."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, **kwargs):
        down, mid = self.controlnet(**kwargs)
        return [torch.zeros_like(d) for d in down], torch.zeros_like(mid)


def test_controlled_unet_forward_and_scale():
    unet, controlnet, noise, image, context = sampling_case(seed=21)
    model = ControlledUNet.from_monai(unet, controlnet, conditioning_scale=0.4).eval()
    t = torch.tensor([3.0, 900.0])
    with torch.no_grad():
        down, mid = controlnet(noise, t, image, 0.4, context)
        ref = unet(noise, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        assert_samples_close(model(noise, t, controlnet_cond=image, context=context), ref, what="scale 0.4")
        down, mid = controlnet(noise, t, image, 1.5, context)
        ref = unet(noise, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        out = model(noise, t, controlnet_cond=image, context=context, conditioning_scale=1.5)
        assert_samples_close(out, ref, what="scale given per call")
        # bf16 model, fp32 conditioning image (the engine keeps cond tensors in the caller's dtype)
        half = model.bfloat16()(noise.bfloat16(), t, controlnet_cond=image, context=context.bfloat16())
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    with pytest.raises(TypeError, match="conditioning_scale"):
        ControlledUNet(model.unet, model.controlnet, conditioning_scale="1")
    assert isinstance(model.unet, UNet3D) and isinstance(model.controlnet, ControlNet3D)


def test_forward_reads_no_device_values():
    """On the meta device every tensor value is unknown, so a forward that completes there has no host sync (what
    capturing ControlNet + UNet in one CUDA graph per step needs)."""
    model = ControlledUNet(UNet3D(**UNET), ControlNet3D(**CONTROL), conditioning_scale=0.5).eval().to("meta")
    x = torch.empty(SHAPE, device="meta")
    with torch.no_grad():
        out = model(x, torch.empty(2, device="meta"), controlnet_cond=torch.empty(2, 1, 16, 12, 20, device="meta"),
                    context=torch.empty(2, 3, 6, device="meta"))
    assert out.shape == SHAPE


# --- GPU ------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_graph_sampling_matches_monai_inferer():
    """ControlNet + UNet with guidance as one model call, captured in the engine's per-step CUDA graph."""
    unet, controlnet, noise, image, context = sampling_case()
    ref = monai_sample(unet, controlnet, noise, image, context, cfg=3.0)
    model = ControlledUNet.from_monai(unet, controlnet).eval().cuda()
    sampler = pydiffmed.Sampler(model, "ddim", SHAPE, num_steps=STEPS, schedule="linear_beta", spacing="monai",
                                prev_rule="stride", guidance_scale=3.0)
    cond = {"controlnet_cond": image.cuda(), "context": context.cuda()}
    uncond = {"controlnet_cond": image.cuda(), "context": torch.full_like(context, -1.0).cuda()}
    out = sampler(cond=cond, uncond=uncond, x_T=noise.cuda(), progress=False)
    assert sampler.graph_failure is None and sampler._graphs
    assert_samples_close(out.cpu(), ref, rtol=1e-3, what="cuda graph fp32")  # TF32 convolutions
    again = sampler(cond=cond, uncond=uncond, x_T=noise.cuda(), progress=False)
    assert torch.equal(again, out)

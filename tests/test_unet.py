"""UNet3D and accelerate() against MONAI's DiffusionModelUNet (random weights, both key namings), bf16 by the
ARCHITECTURE §6 rule, device-value-free forward, and checkpoint loading that never unpickles arbitrary objects."""
import copy
import pathlib
import pickle
import random
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_close_by_rule, max_abs_err, randomize_
import pydiffmed
from pydiffmed.models import CheckpointError, UNet3D, convert_monai_state_dict, load_state_dict_file
from pydiffmed.models import layers

monai_nets = pytest.importorskip("monai.networks.nets")
pytest.importorskip("einops")  # MONAI's attention blocks need it (test dependency only; pydiffmed does not)
MonaiUNet = monai_nets.DiffusionModelUNet

HAS_CUDA = torch.cuda.is_available()

# name -> (MONAI constructor arguments, spatial size); small channels and volumes keep the file fast on CPU
CONFIGS = {
    "attn_last_level": (dict(channels=(8, 16, 16), attention_levels=(False, False, True), num_res_blocks=1,
                             num_head_channels=(0, 0, 8), norm_num_groups=4), (24, 32, 16)),
    "attn_two_levels_2res_updown": (dict(channels=(8, 16, 16), attention_levels=(False, True, True),
                                         num_res_blocks=2, num_head_channels=4, norm_num_groups=4,
                                         resblock_updown=True), (16, 16, 16)),
    "four_levels_res_tuple_classes": (dict(channels=(8, 8, 16, 16), attention_levels=(False, False, True, True),
                                           num_res_blocks=(1, 2, 1, 1), num_head_channels=(0, 0, 8, 16),
                                           norm_num_groups=4, num_class_embeds=4), (24, 32, 16)),
    "cross_attention": (dict(channels=(8, 16, 24), attention_levels=(False, True, True), num_res_blocks=1,
                             num_head_channels=(0, 8, 16), norm_num_groups=4, with_conditioning=True,
                             cross_attention_dim=12, transformer_num_layers=2, num_class_embeds=3,
                             resblock_updown=True), (16, 24, 16)),
    "cross_attention_combined_nofc_upcast": (dict(channels=(8, 16, 16), attention_levels=(False, True, True),
                                                  num_res_blocks=1, num_head_channels=8, norm_num_groups=4,
                                                  with_conditioning=True, cross_attention_dim=6,
                                                  include_fc=False, use_combined_linear=True,
                                                  upcast_attention=True), (16, 16, 16)),
    "self_attention_combined_nofc": (dict(channels=(8, 16, 16), attention_levels=(False, True, True),
                                          num_res_blocks=1, num_head_channels=8, norm_num_groups=4,
                                          include_fc=False, use_combined_linear=True), (24, 32, 16)),
    "2d_updown": (dict(spatial_dims=2, channels=(8, 16, 16), attention_levels=(False, True, True),
                       num_res_blocks=1, num_head_channels=8, norm_num_groups=4, resblock_updown=True), (24, 32)),
    "2d_cross_attention": (dict(spatial_dims=2, channels=(8, 16, 16), attention_levels=(False, False, True),
                                num_res_blocks=(2, 1, 1), num_head_channels=(0, 0, 4), norm_num_groups=4,
                                with_conditioning=True, cross_attention_dim=6), (16, 24)),
}
IN_CH, OUT_CH = 2, 3


def build(name, seed=0):
    config, spatial = CONFIGS[name]
    config = {"spatial_dims": 3, **config}
    torch.manual_seed(seed)
    monai = randomize_(MonaiUNet(in_channels=IN_CH, out_channels=OUT_CH, **config).eval(), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, IN_CH, *spatial, generator=gen)
    kwargs = {}
    if config.get("with_conditioning"):
        kwargs["context"] = torch.randn(2, 5, config["cross_attention_dim"], generator=gen)
    if config.get("num_class_embeds"):
        kwargs["class_labels"] = torch.tensor([0, config["num_class_embeds"] - 1])
    return config, monai, x, torch.tensor([7, 613]), kwargs


def to_generative_models_names(state_dict):
    """Today's MONAI keys renamed to the older GenerativeModels ones (the inverse of what MONAI's own
    load_old_state_dict undoes): attention q/k/v and proj_attn on the block, to_out.0, upsampler conv."""
    old = {}
    for key, value in state_dict.items():
        key = re.sub(r"\.attn\.(to_[qkv])\.", r".\1.", key)
        key = key.replace(".attn.out_proj.", ".proj_attn.")
        key = re.sub(r"\.(attn[12])\.out_proj\.", r".\1.to_out.0.", key)
        key = key.replace(".upsampler.postconv.", ".upsampler.conv.")
        old[key] = value
    return old


def assert_relative_close(out, ref, rtol=1e-4, what=""):
    scale = ref.abs().max().item()
    err = max_abs_err(out, ref)
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} × max|ref| ({scale:.3g})"


# --- equality with MONAI --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet3d_matches_monai_both_key_namings(name):
    config, monai, x, t, kwargs = build(name)
    with torch.no_grad():
        ref = monai(x, t, **kwargs)
    model = UNet3D(in_channels=IN_CH, out_channels=OUT_CH, **config).eval()
    state = monai.state_dict()
    assert list(model.state_dict()) and set(model.state_dict()) == set(state)
    model.load_state_dict(state)
    with torch.no_grad():
        out = model(x, t, **kwargs)
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
    assert_relative_close(out, ref, what=f"{name}, MONAI keys")

    if not config.get("include_fc", True) or config.get("use_combined_linear", False):
        return  # GenerativeModels had neither option, so such a model has no old-named checkpoint
    old = to_generative_models_names(state)
    assert set(old) != set(state), "the config has attention and an upsampler, so some names must differ"
    check = MonaiUNet(in_channels=IN_CH, out_channels=OUT_CH, **config)  # MONAI's own converter agrees
    check.load_old_state_dict(dict(old))
    assert all(torch.equal(a, b) for a, b in zip(check.state_dict().values(), state.values()))
    from_old = UNet3D(in_channels=IN_CH, out_channels=OUT_CH, **config).eval()
    from_old.load_state_dict(old)
    with torch.no_grad():
        assert_relative_close(from_old(x, t, **kwargs), ref, what=f"{name}, GenerativeModels keys")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_accelerate_matches_monai_in_place(name):
    config, monai, x, t, kwargs = build(name, seed=3)
    with torch.no_grad():
        ref = monai(x, t, **kwargs)
    state_before = monai.state_dict(keep_vars=True)
    accelerated = pydiffmed.accelerate(monai)
    assert accelerated is monai
    state_after = monai.state_dict(keep_vars=True)
    assert list(state_after) == list(state_before)
    assert all(state_after[k] is state_before[k] for k in state_before), "parameters must be the same objects"
    kinds = {type(m).__name__ for m in monai.modules()}
    assert "DiffusionUNetResnetBlock" not in kinds and "GroupNorm" not in kinds
    with torch.no_grad():
        out = monai(x, t, **kwargs)
    assert out.is_contiguous()
    assert_relative_close(out, ref, what=f"accelerate, {name}")
    with torch.no_grad():  # a second call (cached fused weights) and accelerating twice are harmless
        assert_relative_close(pydiffmed.accelerate(monai)(x, t, **kwargs), ref, what="again")


def test_gradients_match_monai():
    """Training (the demo model) backpropagates through the fused ops: parameter gradients equal MONAI's."""
    config, monai, x, t, kwargs = build("attn_last_level", seed=4)
    model = UNet3D.from_monai(monai)
    out = model(x, t, **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * grad_out).sum().backward()
    (monai(x, t, **kwargs) * grad_out).sum().backward()
    monai_grads = {name: p.grad for name, p in monai.named_parameters()}
    largest = max(g.abs().max().item() for g in monai_grads.values())
    for name, p in model.named_parameters():
        # relative to the tensor's own gradient, floored at 1e-3 of the largest: some are zero up to rounding
        # (a key bias shifts every score of a query alike, which softmax ignores)
        scale = max(monai_grads[name].abs().max().item(), 1e-3 * largest)
        err = max_abs_err(p.grad, monai_grads[name])
        assert err <= 1e-4 * scale, f"gradient of {name}: max error {err:.3g} > 1e-4 × {scale:.3g}"


def test_accelerate_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        pydiffmed.accelerate({"conv_in.conv.weight": torch.zeros(1)})


def test_controlnet_residuals_match_monai():
    config, monai, x, t, kwargs = build("attn_two_levels_2res_updown", seed=8)
    shapes = []
    hooks = [monai.conv_in.register_forward_hook(lambda m, i, out: shapes.append(out.shape))]
    hooks += [block.register_forward_hook(lambda m, i, out: shapes.extend(r.shape for r in out[1]))
              for block in monai.down_blocks]
    with torch.no_grad():
        monai(x, t)
    for hook in hooks:
        hook.remove()
    gen = torch.Generator().manual_seed(9)
    residuals = [torch.randn(shape, generator=gen) for shape in shapes]
    mid = torch.randn(shapes[-1], generator=gen)
    model = UNet3D.from_monai(monai).eval()
    with torch.no_grad():
        ref = monai(x, t, down_block_additional_residuals=residuals, mid_block_additional_residual=mid)
        out = model(x, t, down_block_additional_residuals=residuals, mid_block_additional_residual=mid)
    assert_relative_close(out, ref, what="ControlNet residuals")
    assert max_abs_err(ref, monai(x, t)) > 1e-3 * ref.abs().max().item()  # the residuals did change the output


def test_from_monai_copies_config_weights_dtype():
    config, monai, x, t, kwargs = build("cross_attention")
    model = UNet3D.from_monai(monai).eval()
    assert model.config["transformer_num_layers"] == 2 and model.config["cross_attention_dim"] == 12
    assert model.config["resblock_updown"] and model.config["num_head_channels"] == (0, 8, 16)
    with torch.no_grad():
        assert_relative_close(model(x, t, **kwargs), monai(x, t, **kwargs), what="from_monai")
    assert next(UNet3D.from_monai(monai.bfloat16()).parameters()).dtype == torch.bfloat16


def test_defaults_and_keys_equal_monai():
    ours, theirs = UNet3D(3, 1, 1), MonaiUNet(3, 1, 1)
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert list(mine) and set(mine) == set(ref)
    assert all(mine[k].shape == ref[k].shape for k in ref)
    assert ours.config["norm_eps"] == 1e-6 and ours.config["num_head_channels"] == (8, 8, 8, 8)
    assert all(not p.any() for p in ours.out[2].parameters()), "output conv starts at zero, as MONAI's"


# --- precision ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["attn_last_level", "self_attention_combined_nofc", "2d_cross_attention"])
def test_bf16_within_design_rule(name):
    """bf16 UNet3D vs fp32 MONAI: error ≤ 2 × (MONAI run in bf16 vs fp32) (ARCHITECTURE §6)."""
    config, monai, x, t, kwargs = build(name, seed=5)
    model = UNet3D.from_monai(monai).eval()
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in kwargs.items()}
    with torch.no_grad():
        ref = monai(x, t, **kwargs)
        torch_bf16 = copy.deepcopy(monai).bfloat16()(x.bfloat16(), t, **half)
        out = model.bfloat16()(x.bfloat16(), t, **half)
    assert out.dtype == torch.bfloat16
    assert_close_by_rule(out, ref, torch_bf16, floor=1e-3 * ref.abs().max().item(), what=f"bf16 {name}")


@pytest.mark.parametrize("name", ["cross_attention", "cross_attention_combined_nofc_upcast"])
def test_bf16_runs_where_monai_cannot(name):
    """MONAI cannot run these in bf16 on CPU (torch's CPU avg_pool3d lacks bf16; its upcast attention mixes
    fp32 and bf16 in one einsum); UNet3D can, close to its fp32 output."""
    config, monai, x, t, kwargs = build(name, seed=6)
    model = UNet3D.from_monai(monai).eval()
    with torch.no_grad():
        ref = model(x, t, **kwargs)
        out = model.bfloat16()(x.bfloat16(), t, **{k: v.bfloat16() if v.is_floating_point() else v
                                                   for k, v in kwargs.items()})
    assert torch.isfinite(out).all()
    assert max_abs_err(out, ref) <= 0.05 * ref.abs().max().item()


# --- forward contract -----------------------------------------------------------------------------------------

def small_model(**overrides):
    config = dict(channels=(8, 16), attention_levels=(False, True), num_res_blocks=1, num_head_channels=8,
                  norm_num_groups=4, **overrides)
    return randomize_(UNet3D(3, 1, 1, **config).eval(), seed=2)


def test_timestep_forms_and_layouts():
    model = small_model()
    x = torch.randn(3, 1, 8, 12, 8)
    with torch.no_grad():
        ref = model(x, torch.tensor([250, 250, 250]))
        assert torch.equal(model(x, torch.tensor(250)), ref)
        assert torch.equal(model(x, torch.tensor([250.0])), ref)
        assert torch.equal(model(x, 250), ref)
        out_cl = model(x.contiguous(memory_format=torch.channels_last_3d), torch.tensor([250] * 3))
    assert out_cl.is_contiguous()
    assert_relative_close(out_cl, ref, rtol=1e-6, what="channels_last input")


def test_forward_rejects_bad_inputs():
    model = small_model(num_class_embeds=2)
    x, t = torch.randn(2, 1, 8, 8, 8), torch.tensor([1, 2])
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(2, 1, 8, 9, 8), t, class_labels=labels)
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(2, 3, 8, 8, 8), t, class_labels=labels)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, torch.tensor([1, 2, 3]), class_labels=labels)
    with pytest.raises(ValueError, match="class_labels"):
        model(x, t)
    with pytest.raises(ValueError, match="with_conditioning"):
        model(x, t, context=torch.randn(2, 1, 4), class_labels=labels)


@pytest.mark.parametrize("kwargs, message", [
    (dict(channels=(8, 18)), "divisible by norm_num_groups"),
    (dict(attention_levels=(True,)), "attention_levels"),
    (dict(with_conditioning=True), "cross_attention_dim"),
    (dict(cross_attention_dim=8), "with_conditioning"),
    (dict(num_head_channels=3), "num_head_channels"),
    (dict(num_res_blocks=(1, 1, 1)), "num_res_blocks"),
    (dict(spatial_dims=1), "spatial_dims"),
])
def test_constructor_rejects_bad_config(kwargs, message):
    config = dict(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, True),
                  num_res_blocks=1, num_head_channels=8, norm_num_groups=4)
    with pytest.raises(ValueError, match=message):
        UNet3D(**{**config, **kwargs})


def test_forward_reads_no_device_values():
    """On the meta device every tensor value is unknown: .item(), bool() or a host branch on a tensor would
    raise, so a forward that completes there has no host sync (the CUDA-graph requirement)."""
    config, _, _, _, _ = build("cross_attention")
    model = UNet3D(in_channels=IN_CH, out_channels=OUT_CH, **config).eval().to("meta")
    x = torch.empty(2, IN_CH, 16, 24, 16, device="meta")
    with torch.no_grad():
        out = model(x, torch.empty(2, dtype=torch.long, device="meta"), context=torch.empty(2, 5, 12, device="meta"),
                    class_labels=torch.empty(2, dtype=torch.long, device="meta"))
    assert out.shape == (2, OUT_CH, 16, 24, 16)
    with pytest.raises(RuntimeError):
        torch.empty(2, device="meta").sum().item()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_upsample_conv_equals_interpolate_then_conv(dims, dtype):
    conv = (nn.Conv3d if dims == 3 else nn.Conv2d)(6, 5, 3, padding=1)
    x = torch.randn(2, 6, *(5, 4, 3)[:dims])
    with torch.no_grad():
        ref = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        out = layers.upsample_conv(x.to(dtype), conv.to(dtype))
        plain = conv(F.interpolate(x.to(dtype), scale_factor=2.0, mode="nearest"))
    assert out.shape == ref.shape
    assert_close_by_rule(out, ref, plain, floor=1e-5, what=f"upsample_conv {dims}-D {dtype}")


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [5, 32])
def test_interleave_phases_kernel_equals_torch_copy(dims, dtype, channels):
    """The C++ interleave of upsample_conv's phase blocks is a copy: bit-equal to torch's strided copy, for run
    lengths with a fixed-size copy (32 channels) and without (5), batch 2, odd sizes."""
    assert layers._cpu_interleave() is not None, "pydiffmed._C lacks subpixel_interleave (run `make build`)"
    gen = torch.Generator().manual_seed(11)
    z = layers.to_channels_last(torch.randn(2, 2 ** dims * channels, *(4, 3, 6)[:dims], generator=gen).to(dtype))
    got = layers.interleave_phases(z, channels)
    want = layers._interleave_phases_torch(z, channels)
    assert got.shape == (2, channels, *(6, 4, 10)[:dims])
    assert got.is_contiguous(memory_format=layers.channels_last_format(got.ndim))
    assert torch.equal(got, want)


def test_float32_parameters_are_cached_until_changed():
    """A half-precision GroupNorm's affine parameters are cast to fp32 once, not per call; an in-place update
    gives fresh copies; fp32 parameters pass through; with autograd the copies stay differentiable."""
    norm = nn.GroupNorm(2, 4).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.5, -2.0, 0.25, 3.0]))
    with torch.no_grad():
        weight, bias = layers.norm_affine(norm)
        assert weight.dtype == bias.dtype == torch.float32
        assert torch.equal(weight, norm.weight.float()) and torch.equal(bias, norm.bias.float())
        again = layers.norm_affine(norm)
        assert again[0] is weight and again[1] is bias
        norm.weight.mul_(2)
        assert torch.equal(layers.norm_affine(norm)[0], weight * 2)
    assert layers.norm_affine(norm)[0].requires_grad  # autograd on: rebuilt each call, differentiable
    layers.norm_affine(norm)[0].sum().backward()
    assert torch.equal(norm.weight.grad, torch.ones(4, dtype=torch.bfloat16))
    plain = nn.GroupNorm(2, 4)
    assert layers.norm_affine(plain)[0] is plain.weight


@pytest.mark.skipif(not layers._HAS_WEIGHT_PACKING or torch.bfloat16 not in layers._onednn_dtypes(),
                    reason="this torch build has no oneDNN weight packing (convolutions reorder per call)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_give_the_same_bits_and_follow_the_weight(monkeypatch, dtype):
    """The UNet forward with packed convolution weights equals, bit for bit, the one that reorders weights per
    call; each weight keeps one packed copy, made anew for a new input shape or an in-place change; the model
    stays deep-copyable and its state dict savable; estimate_memory counts the copies with the parameters."""
    gen = torch.Generator().manual_seed(4)
    net = randomize_(MonaiUNet(spatial_dims=3, in_channels=1, out_channels=1, **CONFIGS["attn_last_level"][0]))
    model = UNet3D.from_monai(net).to(dtype).eval()
    x = torch.randn(1, 1, 8, 16, 8, generator=gen)
    t = torch.tensor([321])
    with torch.no_grad():
        packed = model(x, t)
        weight = model.down_blocks[0].resnets[0].conv1.conv.weight
        first = layers._packed_weights[weight]
        assert first[1].is_mkldnn and model(x, t) is not None and layers._packed_weights[weight] is first
        monkeypatch.setattr(layers, "_HAS_WEIGHT_PACKING", False)
        assert torch.equal(model(x, t), packed)
        monkeypatch.setattr(layers, "_HAS_WEIGHT_PACKING", True)
        model(torch.randn(1, 1, 16, 8, 8, generator=gen), t)
        second = layers._packed_weights[weight]
        assert second[0] != first[0]  # a new input shape: packed anew, the old copy dropped
        weight.mul_(0.5)
        assert not torch.equal(model(x, t), packed) and layers._packed_weights[weight][0] != second[0]
    copy.deepcopy(model)
    pickle.dumps(model.state_dict())
    conv_bytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Conv3d))
    estimate = pydiffmed.estimate_memory(model, (1, 1, 8, 16, 8))
    plain = sum(p.numel() * p.element_size() for p in model.parameters())
    assert conv_bytes <= estimate.parameters - plain <= 4 * conv_bytes, (estimate.parameters - plain, conv_bytes)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("depth", [2, 4])
def test_bf16_weight_gradients_of_a_volume_shallower_than_the_kernel(autocast, depth):
    """layers.convolution's bf16 weight gradients with autograd, input depth below the kernel's or not, bf16
    tensors or CPU autocast: close to the fp32 ones (torch's own bf16 kernel got the depth-2 case wrong on an AMD
    Zen 4, see layers._wrong_bf16_weight_gradient), and the output stays bf16."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 32, depth, 4, 4, generator=gen)
    weight = torch.randn(32, 32, 3, 3, 3, generator=gen) * 0.05
    bias = torch.randn(32, generator=gen)
    grad = torch.randn(2, 32, depth, 4, 4, generator=gen)
    want = [t.clone().double().requires_grad_() for t in (x, weight, bias)]
    layers.convolution(*want, padding=1).backward(grad.double())
    half = [t.clone().requires_grad_() for t in ((x, weight, bias) if autocast else
                                                 (x.bfloat16(), weight.bfloat16(), bias.bfloat16()))]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layers.convolution(*half, padding=1)
    assert y.dtype == torch.bfloat16
    y.backward(grad.bfloat16())
    for name, got, ref in zip(("input", "weight", "bias"), half, want):
        error = (got.grad.double() - ref.grad).abs().max() / ref.grad.abs().max()
        assert error < 0.02, f"{name} gradient, relative error {error:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_mode_gives_the_same_bits_as_no_grad(dtype):
    """Under torch.inference_mode (where tensors carry no version counter, which the caches of packed and padded
    weights and fp32 parameter copies key on) the forward and a whole sampling run equal those under no_grad,
    for a model built normally and for one built and loaded under inference_mode."""
    gen = torch.Generator().manual_seed(6)
    net = randomize_(MonaiUNet(spatial_dims=3, in_channels=1, out_channels=1, **CONFIGS["attn_last_level"][0]))
    model = UNet3D.from_monai(net).to(dtype).eval()
    x, t = torch.randn(1, 1, 8, 8, 8, generator=gen).to(dtype), torch.tensor([321])
    with torch.no_grad():
        ref = model(x, t)
        sampled = pydiffmed.sample(model, (1, 1, 8, 8, 8), "dpmpp_2m", 3, seed=2, progress=False)
    with torch.inference_mode():
        assert torch.equal(model(x, t), ref) and torch.equal(model(x, t), ref)
        built_here = UNet3D.from_monai(net).to(dtype).eval()
        assert torch.equal(built_here(x, t), ref)
        assert torch.equal(pydiffmed.sample(model, (1, 1, 8, 8, 8), "dpmpp_2m", 3, seed=2, progress=False), sampled)
        assert torch.equal(pydiffmed.sample(built_here, (1, 1, 8, 8, 8), "dpmpp_2m", 3, seed=2, progress=False),
                           sampled)
        other = UNet3D.from_monai(randomize_(MonaiUNet(spatial_dims=3, in_channels=1, out_channels=1,
                                                       **CONFIGS["attn_last_level"][0]), seed=9)).to(dtype).eval()
        built_here.load_state_dict(other.state_dict())  # in place, and unversioned: no cache may keep old weights
        assert torch.equal(built_here(x, t), other(x, t)) and not torch.equal(built_here(x, t), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_time_projections_in_one_gemm_equal_the_per_resnet_ones(monkeypatch, dtype):
    """Without autograd, every resnet's time projection comes from one stacked GEMM (unet.project_time) and the
    forward equals the one where each resnet projects its own (batch 2: per-sample rows, non-contiguous parts);
    with autograd each resnet projects its own again (nothing kept on the blocks)."""
    from pydiffmed.models import unet as unet_module

    gen = torch.Generator().manual_seed(5)
    net = randomize_(MonaiUNet(spatial_dims=3, in_channels=1, out_channels=1,
                               **CONFIGS["attn_two_levels_2res_updown"][0]))
    model = UNet3D.from_monai(net).to(dtype).eval()
    x, t = torch.randn(2, 1, 8, 8, 8, generator=gen), torch.tensor([321, 17])
    with torch.no_grad():
        stacked = model(x, t)
        resnets = [m for m in model.modules() if isinstance(m, unet_module.ResnetBlock)]
        block = resnets[-1]
        silu_emb = block.__dict__["_pdm_time_projection"][0]
        proj = block.time_emb_proj
        assert torch.equal(unet_module.time_projection(block, silu_emb),
                           layers.linear(silu_emb, proj.weight, proj.bias, owner=proj))
        monkeypatch.setattr(unet_module, "project_time", lambda *args: None)
        for b in resnets:
            b.__dict__.pop("_pdm_time_projection")
        assert torch.equal(model(x, t), stacked)
    monkeypatch.undo()
    model(x, t).float().sum().backward()
    assert all("_pdm_time_projection" not in b.__dict__ for b in resnets)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("with_add", [False, True])
def test_convolution_into_rows_of_an_output(batch, with_add):
    """convolution(..., out=rows): the depth rows of a preallocated output get what the allocating call returns
    (batch 1: oneDNN writes into the slice itself; batch 2, whose slice is not dense: a copy); nothing else of
    the output is touched."""
    gen = torch.Generator().manual_seed(3)
    x = layers.to_channels_last(torch.randn(batch, 6, 5, 7, 4, generator=gen))
    weight = layers.to_channels_last(torch.randn(8, 6, 3, 3, 3, generator=gen) / 10)
    bias = torch.randn(8, generator=gen)
    add = layers.to_channels_last(torch.randn(batch, 8, 3, 7, 4, generator=gen)) if with_add else None
    want = layers.convolution(x, weight, bias, 1, [0, 1, 1], add=add)
    out = layers.to_channels_last(torch.full((batch, 8, 9, 7, 4), 7.0))
    got = layers.convolution(x, weight, bias, 1, [0, 1, 1], add=add, out=out[:, :, 2:5])
    assert got.data_ptr() == out[:, :, 2:5].data_ptr()
    assert torch.equal(out[:, :, 2:5], want)
    assert (out[:, :, :2] == 7).all() and (out[:, :, 5:] == 7).all()


# --- checkpoints ----------------------------------------------------------------------------------------------

def checkpoint_model():
    return UNet3D(3, 1, 1, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
                  num_head_channels=8, norm_num_groups=4)


def test_missing_and_unknown_keys_are_listed():
    model = checkpoint_model()
    state = model.state_dict()
    del state["conv_in.conv.bias"], state["middle_block.attention.attn.to_k.weight"]
    state["down_blocks.0.resnets.0.norm9.weight"] = torch.ones(8)
    with pytest.raises(CheckpointError) as info:
        model.load_state_dict(state)
    message = str(info.value)
    for key in ("conv_in.conv.bias", "middle_block.attention.attn.to_k.weight", "norm9.weight"):
        assert key in message
    assert "2 missing" in message and "1 unknown" in message
    model.load_state_dict(state, strict=False)  # non-strict loads what fits


def test_shape_mismatch_names_key_and_both_shapes():
    model = checkpoint_model()
    state = model.state_dict()
    state["down_blocks.1.resnets.0.conv1.conv.weight"] = torch.zeros(16, 8, 3, 3, 1)
    with pytest.raises(CheckpointError, match=re.escape(
            "'down_blocks.1.resnets.0.conv1.conv.weight': checkpoint has (16, 8, 3, 3, 1), model expects "
            "(16, 8, 3, 3, 3)")):
        model.load_state_dict(state)


def test_non_tensor_values_are_rejected():
    model = checkpoint_model()
    state = model.state_dict()
    state["conv_in.conv.bias"] = [0.0] * 8
    with pytest.raises(CheckpointError, match="conv_in.conv.bias.*list"):
        model.load_state_dict(state)


def test_convert_is_idempotent_and_detects_collisions():
    model = checkpoint_model()
    state = model.state_dict()
    old = to_generative_models_names(state)
    assert convert_monai_state_dict(old).keys() == state.keys()
    assert convert_monai_state_dict(state).keys() == state.keys()
    both = {**state, **old}
    with pytest.raises(CheckpointError, match="maps to"):
        convert_monai_state_dict(both)


def test_checkpoint_files_round_trip(tmp_path):
    from safetensors.torch import save_file

    model = randomize_(checkpoint_model().eval(), seed=4)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    x, t = torch.randn(1, 1, 8, 8, 8), torch.tensor([3])
    with torch.no_grad():
        ref = model(x, t)
    save_file(state, tmp_path / "unet.safetensors")
    torch.save({"state_dict": to_generative_models_names(state), "epoch": 7}, tmp_path / "wrapped.pt")
    for name in ("unet.safetensors", "wrapped.pt"):
        loaded = checkpoint_model().eval().load_checkpoint(tmp_path / name)
        with torch.no_grad():
            assert torch.equal(loaded(x, t), ref), name


class _Marker:
    """Unpickling this would create a file: the stand-in for a malicious checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_malicious_and_non_tensor_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    state = checkpoint_model().state_dict()
    torch.save({**state, "payload": _Marker(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: refused.*weights_only"):
        load_state_dict_file(tmp_path / "evil.pt")
    assert not marker.exists()
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"weight": _Marker(str(marker))}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused"):
        load_state_dict_file(tmp_path / "plain.pkl")
    assert not marker.exists()
    torch.save({"conv_in.conv.weight": torch.zeros(1), "step": 3, "name": "x"}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="not tensors.*'step' \\(int\\)"):
        load_state_dict_file(tmp_path / "mixed.pt")


def test_broken_files_name_the_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(100)}, tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable safetensors"):
        load_state_dict_file(tmp_path / "cut.safetensors")
    rng = random.Random(0)
    for length in (1, 7, 64, 300):  # seeded: a few of these made torch.load raise IndexError / KeyError
        for _ in range(50):
            (tmp_path / "junk.pt").write_bytes(bytes(rng.getrandbits(8) for _ in range(length)))
            with pytest.raises(CheckpointError, match="junk.pt"):
                load_state_dict_file(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        load_state_dict_file(tmp_path / "absent.pt")


# --- GPU ------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("name", ["attn_two_levels_2res_updown", "cross_attention"])
def test_cuda_matches_monai_and_captures_in_a_graph(name):
    config, monai, x, t, kwargs = build(name)
    monai = monai.cuda()
    x, t = x.cuda(), t.cuda()
    kwargs = {k: v.cuda() for k, v in kwargs.items()}
    model = UNet3D.from_monai(monai).eval()
    with torch.no_grad():
        ref = monai(x, t, **kwargs)
        assert_relative_close(model(x, t, **kwargs), ref, rtol=1e-3, what=f"cuda fp32 {name}")  # TF32 convs
        half = {k: v.half() if v.is_floating_point() else v for k, v in kwargs.items()}
        torch_fp16 = copy.deepcopy(monai).half()(x.half(), t, **half)
        fp16 = copy.deepcopy(model).half()
        assert_close_by_rule(fp16(x.half(), t, **half), ref, torch_fp16, floor=1e-3 * ref.abs().max().item(),
                             what=f"cuda fp16 {name}")
        static_x, static_t = x.half().clone(), t.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fp16(static_x, static_t, **half)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.graph(graph):
                static_out = fp16(static_x, static_t, **half)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        static_t.fill_(999)
        graph.replay()
        expected = fp16(static_x, static_t, **half)
        assert torch.equal(static_out, expected)

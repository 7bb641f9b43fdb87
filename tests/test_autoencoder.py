"""AutoencoderKL against MONAI's AutoencoderKL (random weights, several configurations, fp32 and the ARCHITECTURE §6
bf16 rule), and the exact slab-wise decode/encode (pydiffmed/partition.py) against the whole-volume call."""
import math

import pytest
import torch

from helpers import assert_close_by_rule, max_abs_err, randomize_
from pydiffmed import partition
from pydiffmed.models import AutoencoderKL, CheckpointError

monai_nets = pytest.importorskip("monai.networks.nets")
pytest.importorskip("einops")  # MONAI's attention blocks need it
MonaiAE = monai_nets.AutoencoderKL

# name -> (MONAI constructor arguments, image size); the latent is the image size halved (levels − 1) times
CONFIGS = {
    "attn_nonlocal": (dict(channels=(8, 16), attention_levels=(False, True), num_res_blocks=1), (10, 12, 14)),
    "three_levels_no_attn_odd": (dict(channels=(8, 16, 16), attention_levels=(False, False, False),
                                      num_res_blocks=(1, 2, 1), with_encoder_nonlocal_attn=False,
                                      with_decoder_nonlocal_attn=False, in_channels=2, out_channels=3),
                                 (12, 10, 9)),
    "encoder_attn_only_combined_nofc": (dict(channels=(8, 16), attention_levels=(False, False), num_res_blocks=2,
                                             with_decoder_nonlocal_attn=False, include_fc=False,
                                             use_combined_linear=True), (8, 9, 12)),
    "convtranspose_attn_levels": (dict(channels=(8, 16), attention_levels=(True, False), num_res_blocks=1,
                                       with_encoder_nonlocal_attn=False, use_convtranspose=True, latent_channels=4),
                                  (8, 8, 10)),
    "2d": (dict(spatial_dims=2, channels=(8, 16, 16), attention_levels=(False, False, True), num_res_blocks=1),
           (16, 12)),
}


def rel_err(out, ref) -> float:
    return max_abs_err(out, ref) / ref.double().abs().max().item()


def build(config, seed=0):
    config = {"spatial_dims": 3, "latent_channels": 3, "norm_num_groups": 4, **config}
    torch.manual_seed(seed)
    monai = randomize_(MonaiAE(**config).eval(), seed)
    return monai, AutoencoderKL.from_monai(monai).eval()


def inputs(monai, size, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    levels = len(monai.encoder.channels)
    x = torch.randn(batch, monai.encoder.in_channels, *size, generator=gen)
    latent = [math.ceil(s / 2 ** (levels - 1)) for s in size]
    z = torch.randn(batch, monai.latent_channels, *latent, generator=gen)
    return x, z


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_keys_and_config_match_monai(name):
    config, _ = CONFIGS[name]
    monai, ours = build(config)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
           [(k, v.shape) for k, v in monai.state_dict().items()]
    direct = AutoencoderKL(**{"spatial_dims": 3, "latent_channels": 3, "norm_num_groups": 4, **config})
    assert direct.config == ours.config


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_monai_fp32(name, monkeypatch):
    config, size = CONFIGS[name]
    monai, ours = build(config)
    x, z = inputs(monai, size)
    # The same noise for both samplings: MONAI's z_sigma is sometimes channels_last (2-D), and randn_like follows
    # the layout, so a shared seed alone would not give the same values per voxel.
    with torch.no_grad():
        for ref, out in zip(monai.encode(x), ours.encode(x)):
            assert out.shape == ref.shape and out.is_contiguous()
            assert rel_err(out, ref) < 1e-4
        noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9))
        monkeypatch.setattr(torch, "randn_like", lambda t: noise.to(t))
        ref, out = monai.decode(z), ours.decode(z)
        assert out.shape == ref.shape and out.is_contiguous()
        assert rel_err(out, ref) < 1e-4
        for ref, out in zip(monai(x), ours(x)):
            assert rel_err(out, ref) < 1e-4
        assert rel_err(ours.reconstruct(x), monai.reconstruct(x)) < 1e-4
        assert rel_err(ours.encode_stage_2_inputs(x), monai.encode_stage_2_inputs(x)) < 1e-4
        assert rel_err(ours.decode_stage_2_outputs(z), monai.decode_stage_2_outputs(z)) < 1e-4


@pytest.mark.parametrize("name", ["attn_nonlocal", "three_levels_no_attn_odd"])
def test_bf16_by_design_rule(name):
    config, size = CONFIGS[name]
    monai, ours = build(config)
    x, z = inputs(monai, size, batch=1)
    with torch.no_grad():
        ref_mu, ref_dec = monai.encode(x)[0], monai.decode(z)
        monai_bf16 = monai.to(torch.bfloat16)
        ours_bf16 = ours.to(torch.bfloat16)
        torch_mu = monai_bf16.encode(x.bfloat16())[0]
        torch_dec = monai_bf16.decode(z.bfloat16())
        out_mu, out_dec = ours_bf16.encode(x)[0], ours_bf16.decode(z)
    assert out_mu.dtype == out_dec.dtype == torch.bfloat16
    assert_close_by_rule(out_mu, ref_mu, torch_mu, what=f"{name} encode bf16")
    assert_close_by_rule(out_dec, ref_dec, torch_dec, what=f"{name} decode bf16")
    if name == "three_levels_no_attn_odd":  # the slab-wise path in bf16, by the same rule
        with torch.no_grad():
            assert_close_by_rule(ours_bf16.decode(z, tile=3), ref_dec, torch_dec, what="tiled decode bf16")


# --- exact decode/encode by slabs ---------------------------------------------------------------------------------

NO_ATTENTION = dict(with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)


@pytest.mark.parametrize("config, latent, tiles", [
    (dict(channels=(8, 16), attention_levels=(False, False), num_res_blocks=1), (5, 6, 7), (1, 2, 3, 4, 100)),
    (dict(channels=(8, 16, 16), attention_levels=(False, False, False), num_res_blocks=(2, 1, 1),
          in_channels=2, out_channels=3), (3, 4, 5), (3, 5)),
    (dict(channels=(8, 16), attention_levels=(False, False), num_res_blocks=2, use_convtranspose=True),
     (8, 8, 6), (3, 5)),
    (dict(spatial_dims=2, channels=(8, 16, 16), attention_levels=(False, False, False), num_res_blocks=1),
     (5, 7), (1, 3)),
])
def test_tiled_decode_equals_whole(config, latent, tiles):
    _, ours = build({**config, **NO_ATTENTION})
    z = torch.randn(2, 3, *latent, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = ours.decode(z)
        for tile in tiles:  # slabs that do not divide the volume; halos reach the border
            out = ours.decode(z, tile=tile)
            assert out.shape == whole.shape and out.is_contiguous()
            assert rel_err(out, whole) <= 1e-5, f"tile={tile}"
        # batch rows are independent: sample 1 alone gives its own rows of the batched result
        alone = ours.decode(z[1:], tile=tiles[0])
        assert rel_err(alone, whole[1:]) <= 1e-5
        assert rel_err(ours.decode(z, tile=tiles[0], storage="cpu"), whole) <= 1e-5


def test_tiled_encode_equals_whole():
    _, ours = build(dict(channels=(8, 16, 16), attention_levels=(False, False, False), num_res_blocks=(1, 2, 1),
                         in_channels=2, **NO_ATTENTION))
    x = torch.randn(2, 2, 13, 12, 10, generator=torch.Generator().manual_seed(4))  # odd depth: asymmetric pad
    with torch.no_grad():
        mu, sigma = ours.encode(x)
        for tile in (1, 2, 3, 5):
            tiled_mu, tiled_sigma = ours.encode(x, tile=tile)
            assert rel_err(tiled_mu, mu) <= 1e-5 and rel_err(tiled_sigma, sigma) <= 1e-5, f"tile={tile}"


def test_max_memory_plans_slabs_within_budget():
    from pydiffmed.models.autoencoder import run_blocks_by_slabs

    _, ours = build(dict(channels=(8, 16), attention_levels=(False, False), num_res_blocks=1, **NO_ATTENTION))
    z = torch.randn(2, 3, 6, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = ours.decode(z)
        h = ours.post_quant_conv(z)
        one_slab = partition.SlabPlan(tile=10 ** 6)  # every layer in one slab: the whole-volume working need
        run_blocks_by_slabs(ours.decoder.blocks, h, one_slab, contiguous_output=True)
        budget = one_slab.peak_estimate // 3
        plan = partition.SlabPlan(max_memory=budget)
        out = run_blocks_by_slabs(ours.decoder.blocks, h, plan, contiguous_output=True)
        assert 0 < plan.peak_estimate <= budget
        assert rel_err(out, whole) <= 1e-5
        assert rel_err(ours.decode(z, max_memory=budget), whole) <= 1e-5
        with pytest.raises(ValueError, match="smallest slab"):
            ours.decode(z, max_memory=1000)
    with pytest.raises(ValueError, match="tile"):
        partition.SlabPlan(tile=0)


def test_slab_decode_needs_under_a_third_of_the_whole_decodes_memory():
    """A 3-level decoder, latent 16³ → 64³: the tensors a slab decode creates peak at under a third of what MONAI's
    whole decode creates (measured the way the engine measures forwards, memory._LiveBytes: 0.31 of it with tile 2
    or 4, against 0.70 before residual blocks wrote over their first convolution's output and upsampled
    activations were recomputed rather than stored), with the same numbers."""
    from pydiffmed.memory import _LiveBytes

    monai, ours = build(dict(channels=(8, 16, 16), attention_levels=(False,) * 3, num_res_blocks=1, latent_channels=4,
                             **NO_ATTENTION))
    z = torch.randn(1, 4, 16, 16, 16, generator=torch.Generator().manual_seed(0))

    def peak(decode):
        tracker = _LiveBytes()
        with torch.no_grad(), tracker:
            out = decode(z)
        return tracker.peak, out

    whole, reference = peak(monai.decode)
    for tile in (2, 4):
        tiled, out = peak(lambda z: ours.decode(z, tile=tile))
        assert tiled < whole / 3, (tile, tiled / whole)
        assert rel_err(out, reference) <= 1e-5


def test_tiled_refuses_attention():
    _, ours = build(dict(channels=(8, 16), attention_levels=(False, False), num_res_blocks=1,
                         with_encoder_nonlocal_attn=False))
    z = torch.randn(1, 3, 4, 4, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="attention"):
        ours.decode(z, tile=2)
    with torch.no_grad():  # the encoder has none here
        ours.encode(torch.randn(1, 1, 8, 8, 8), tile=3)


def test_group_stats_merge_keeps_centred_precision():
    """Per-slab statistics merged with Chan's formula equal the whole-volume fp64 statistics to fp32 rounding of
    the data, also where the mean dwarfs the spread (μ/σ = 10³): E[x²] − E[x]² in fp32 loses every digit there."""
    x = (1e3 + torch.randn(2, 6, 11, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))).float()
    x = x.contiguous(memory_format=torch.channels_last_3d)
    stats = partition.GroupStats(3)
    for a, b in partition.slab_ranges(11, 4):
        stats.update(x[:, :, a:b])
    grouped = x.double().reshape(2, 3, -1)
    var = grouped.var(-1, unbiased=False)
    assert stats.count == grouped.shape[-1]
    torch.testing.assert_close(stats.mean, grouped.mean(-1), rtol=1e-7, atol=0)
    torch.testing.assert_close(stats.m2 / stats.count, var, rtol=1e-5, atol=0)
    naive = (x.reshape(2, 3, -1).square().mean(-1) - x.reshape(2, 3, -1).mean(-1).square()).double()
    assert ((naive - var).abs() / var).max() > 1e-2  # the cancellation the centred form avoids


def test_slab_ranges():
    assert partition.slab_ranges(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert partition.slab_ranges(10, 3, align=2) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert partition.slab_ranges(4, 1, align=2) == [(0, 2), (2, 4)]


# --- loading ------------------------------------------------------------------------------------------------------

def test_loads_old_generative_models_keys():
    """GenerativeModels checkpoints: attention to_q/to_k/to_v/proj_attn directly on the block, the upsampler's
    convolution under `conv` (the encoder's downsampler keeps `conv.conv`)."""
    monai, ours = build(dict(channels=(8, 16), attention_levels=(False, True), num_res_blocks=1), seed=3)
    old = {}
    for key, value in monai.state_dict().items():
        key = key.replace(".attn.out_proj.", ".proj_attn.").replace(".attn.to_", ".to_")
        if key.startswith("decoder.") and ".postconv." in key:
            key = key.replace(".postconv.", ".conv.")
        old[key] = value
    assert any(k.startswith("encoder.") and ".conv.conv." in k for k in old)
    fresh = AutoencoderKL(**ours.config)
    fresh.load_state_dict(old)
    for key, value in monai.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(CheckpointError, match="missing"):
        fresh.load_state_dict({k: v for k, v in old.items() if "quant" not in k})


def test_input_checks():
    _, ours = build(dict(channels=(8, 16), attention_levels=(False, False), num_res_blocks=1))
    with pytest.raises(ValueError, match="5-D"):
        ours.decode(torch.randn(3, 4, 4, 4))
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderKL(3, channels=(8, 12), attention_levels=(False, False), norm_num_groups=8)

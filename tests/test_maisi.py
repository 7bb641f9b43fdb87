"""MAISI's networks (MONAI's monai.apps.generation.maisi, issue 14) on pydiffmed's path, with random weights:
AutoencoderKlMaisi as pydiffmed's AutoencoderKL (from_maisi, MAISI checkpoints, exact slab decode),
DiffusionModelUNetMaisi and ControlNetMaisi through accelerate() (and sampled by the engine with their extra inputs
as per-sample conditioning), MAISI's checkpoint wrappers, and a bundle with an AutoencoderKlMaisi."""
import copy
import json

import pytest
import torch

import pydiffmed
from helpers import max_abs_err, randomize_
from pydiffmed import modelfile
from pydiffmed.models import AutoencoderKL, CheckpointError
from pydiffmed.models.checkpoint import load_state_dict_file

pytest.importorskip("einops")  # MONAI's attention blocks need it
maisi = pytest.importorskip("monai.apps.generation.maisi.networks")
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi  # noqa: E402
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi  # noqa: E402
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi  # noqa: E402

RTOL = 1e-4


def rel_err(out, ref) -> float:
    return max_abs_err(out, ref) / ref.double().abs().max().item()


def assert_close(out, ref, what, rtol=RTOL):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)}, MAISI's {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


# --- the autoencoder ---------------------------------------------------------------------------------------------

# name -> (AutoencoderKlMaisi arguments, image size, latent size for decode). MAISI's num_splits > 1 computes its
# convolutions by overlapping pieces; it is exact (and runs) only where every level splits evenly, so those
# configurations use sizes it accepts. The others use MAISI's num_splits=1 and odd sizes.
AE_CONFIGS = {
    "1res_odd": (dict(num_channels=(8, 16), num_res_blocks=(1, 1)), (13, 9, 11), (5, 3, 4)),
    "2res_3levels_channels": (dict(num_channels=(8, 16, 16), num_res_blocks=(2, 1, 2), in_channels=2,
                                   out_channels=3), (12, 10, 7), (3, 4, 5)),
    "splits2_depth": (dict(num_channels=(8, 16), num_res_blocks=(2, 2), num_splits=2, dim_split=0),
                      (16, 8, 12), (8, 6, 4)),
    "splits4_height": (dict(num_channels=(8, 16), num_res_blocks=(1, 1), num_splits=4, dim_split=1),
                       (8, 48, 12), (4, 24, 6)),
    "convtranspose_odd": (dict(num_channels=(8, 16), num_res_blocks=(1, 2), use_convtranspose=True),
                          (11, 8, 9), (5, 3, 4)),
    "attention_nonlocal_fc": (dict(num_channels=(8, 16), num_res_blocks=(1, 1), attention_levels=(False, True),
                                   with_encoder_nonlocal_attn=True, with_decoder_nonlocal_attn=True,
                                   include_fc=True, use_combined_linear=True), (10, 8, 9), (5, 3, 4)),
}


def build_ae(name, seed=0):
    args, image, latent = AE_CONFIGS[name]
    args = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 4, "norm_num_groups": 4,
            "attention_levels": (False,) * len(args["num_channels"]), "num_splits": 1, "save_mem": False, **args}
    torch.manual_seed(seed)
    return randomize_(AutoencoderKlMaisi(**args).eval(), seed), args, image, latent


@pytest.mark.parametrize("name", list(AE_CONFIGS))
def test_autoencoder_matches_maisi(name):
    theirs, args, image, latent = build_ae(name)
    ours = AutoencoderKL.from_maisi(theirs).eval()
    assert ours.config["upsample_mode"] == "linear" and ours.config["convtranspose_kernel_size"] == 3
    assert ours.config["latent_channels"] == 4 and ours.config["channels"] == tuple(args["num_channels"])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, args["in_channels"], *image, generator=gen)
    z = torch.randn(2, 4, *latent, generator=gen)
    attention = any(args["attention_levels"]) or args.get("with_decoder_nonlocal_attn")
    with torch.no_grad():
        mu, sigma = theirs.encode(x)
        our_mu, our_sigma = ours.encode(x)
        assert_close(our_mu, mu, f"{name}: z_mu")
        assert_close(our_sigma, sigma, f"{name}: z_sigma")
        ref = theirs.decode(z)
        assert_close(ours.decode(z), ref, f"{name}: decode")
        assert_close(ours.reconstruct(x), theirs.reconstruct(x), f"{name}: reconstruct")
        if not attention:  # slabs: exact, whatever the tiling (attention needs the whole volume)
            for tile in (1, 2, 3):
                assert_close(ours.decode(z, tile=tile), ref, f"{name}: decode(tile={tile})")
            assert_close(ours.encode(x, tile=2)[0], mu, f"{name}: encode(tile=2)")
    # the configuration rebuilds the same network: what a model directory stores
    rebuilt = AutoencoderKL(**ours.config)
    assert rebuilt.config == ours.config
    rebuilt.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        assert_close(rebuilt.eval().decode(z), ref, f"{name}: rebuilt from config")


def test_slab_decode_with_a_memory_budget_and_host_storage():
    theirs, args, image, latent = build_ae("2res_3levels_channels", seed=2)
    ours = AutoencoderKL.from_maisi(theirs).eval()
    z = torch.randn(1, 4, 6, 5, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = theirs.decode(z)
        assert_close(ours.decode(z, max_memory=500_000), ref, "decode(max_memory=)")
        assert_close(ours.decode(z, tile=2, storage="cpu"), ref, "decode(tile=2, storage='cpu')")


def test_norm_float16_and_memory_options_do_not_change_the_network():
    """num_splits/dim_split/save_mem/print_info are MAISI's memory tricks, norm_float16 its fp16 rounding of the
    normalised activations: pydiffmed builds the same fp32 network from either (see AutoencoderKL.from_maisi)."""
    theirs, args, image, latent = build_ae("1res_odd")
    other = AutoencoderKlMaisi(**{**args, "norm_float16": True, "num_splits": 8, "dim_split": 2})
    other.load_state_dict(theirs.state_dict())
    a, b = AutoencoderKL.from_maisi(theirs), AutoencoderKL.from_maisi(other)
    assert a.config == b.config
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert AutoencoderKL.from_monai(theirs).config == a.config


def test_from_maisi_refuses_other_models():
    from monai.networks.nets import AutoencoderKL as MonaiAE

    with pytest.raises(TypeError, match="expects a MONAI AutoencoderKlMaisi, got AutoencoderKL"):
        AutoencoderKL.from_maisi(MonaiAE(3, channels=(8, 8), attention_levels=(False, False), num_res_blocks=1,
                                           norm_num_groups=4))


def test_maisi_key_names():
    theirs, args, image, latent = build_ae("convtranspose_odd")
    ours = AutoencoderKL.from_maisi(theirs)
    mapping = ours.maisi_key_map()
    keys = set(theirs.state_dict())
    assert "encoder.blocks.0.conv.conv.weight" in keys and mapping["encoder.blocks.0.conv.conv.weight"] == \
        "encoder.blocks.0.conv.weight"
    assert mapping["encoder.blocks.1.conv1.conv.conv.weight"] == "encoder.blocks.1.conv1.conv.weight"
    upsampler = next(k for k in keys if k.startswith("decoder.") and k.endswith(".conv.conv.conv.weight")
                     and theirs.state_dict()[k].ndim == 5 and theirs.state_dict()[k].shape[2] == 3
                     and mapping.get(k, "").endswith(".deconv.weight"))
    assert upsampler
    converted = ours.convert_keys(theirs.state_dict())
    assert set(converted) == set(ours.state_dict())


# --- MAISI checkpoints -------------------------------------------------------------------------------------------

def test_maisi_checkpoints_load_unchanged(tmp_path):
    """MAISI saves its autoencoder as {"epoch", "unet_state_dict", "epoch_finished"}, its diffusion UNet with
    "unet_state_dict" (+ scale_factor, ...) and its ControlNet with "controlnet_state_dict"."""
    theirs, args, image, latent = build_ae("splits2_depth", seed=5)
    torch.save({"epoch": 273, "unet_state_dict": theirs.state_dict(), "epoch_finished": True},
               tmp_path / "autoencoder_epoch273.pt")
    ours = AutoencoderKL(**AutoencoderKL.from_maisi(theirs).config).load_checkpoint(
        tmp_path / "autoencoder_epoch273.pt").eval()
    z = torch.randn(1, 4, 8, 6, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert_close(ours.decode(z), theirs.decode(z), "autoencoder from a MAISI checkpoint")

    state = {"w": torch.ones(2)}
    torch.save({"epoch": 1, "controlnet_state_dict": state, "loss": 0.5}, tmp_path / "controlnet.pt")
    assert torch.equal(load_state_dict_file(tmp_path / "controlnet.pt")["w"], state["w"])
    torch.save({"epoch": 1, "scale_factor": torch.tensor(0.9), "num_train_timesteps": 1000,
                "unet_state_dict": state}, tmp_path / "diffusion_unet.pt")
    assert list(load_state_dict_file(tmp_path / "diffusion_unet.pt")) == ["w"]


def test_unknown_wrapper_names_the_top_level_keys(tmp_path):
    torch.save({"epoch": 3, "weights_ema": {"w": torch.ones(1)}, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError) as caught:
        load_state_dict_file(tmp_path / "ckpt.pt")
    message = str(caught.value)
    assert "ckpt.pt: entries that are not tensors" in message
    assert "unet_state_dict" in message and "controlnet_state_dict" in message
    assert "top-level keys: 'epoch', 'weights_ema', 'optimizer'" in message


# --- the diffusion UNet and the ControlNet through accelerate() --------------------------------------------------

UNET = dict(spatial_dims=3, in_channels=4, out_channels=4, num_channels=(8, 16), attention_levels=(False, True),
            num_res_blocks=(1, 2), norm_num_groups=4, num_head_channels=(0, 8))
EXTRA_INPUTS = {  # flags -> MAISI's forward arguments (per sample)
    "include_top_region_index_input": ("top_region_index_tensor", 4),
    "include_bottom_region_index_input": ("bottom_region_index_tensor", 4),
    "include_spacing_input": ("spacing_tensor", 3),
}
FLAG_SETS = {
    "none": (),
    "top": ("include_top_region_index_input",),
    "bottom_spacing": ("include_bottom_region_index_input", "include_spacing_input"),
    "all": tuple(EXTRA_INPUTS),
}
SPATIAL = (8, 6, 10)


def build_unet(flags, seed=0, **changes):
    config = {**UNET, **{flag: flag in flags for flag in EXTRA_INPUTS}, **changes}
    torch.manual_seed(seed)
    return randomize_(DiffusionModelUNetMaisi(**config).eval(), seed)


def extra_inputs(flags, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {EXTRA_INPUTS[f][0]: torch.rand(batch, EXTRA_INPUTS[f][1], generator=gen) for f in flags}


@pytest.mark.parametrize("flags", list(FLAG_SETS))
def test_accelerated_maisi_unet_matches(flags):
    flags = FLAG_SETS[flags]
    theirs = build_unet(flags)
    ours = pydiffmed.accelerate(copy.deepcopy(theirs))
    x = torch.randn(2, 4, *SPATIAL, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([17.0, 802.0])
    kwargs = extra_inputs(flags, 2)
    with torch.no_grad():
        assert_close(ours(x, t, **kwargs), theirs(x, t, **kwargs), f"accelerate(DiffusionModelUNetMaisi) {flags}")
    assert set(ours.state_dict()) == set(theirs.state_dict())


def test_accelerated_maisi_unet_with_cross_attention_and_resblock_updown():
    theirs = build_unet(("include_spacing_input",), seed=3, with_conditioning=True, cross_attention_dim=6,
                        resblock_updown=True, include_fc=True)
    ours = pydiffmed.accelerate(copy.deepcopy(theirs))
    gen = torch.Generator().manual_seed(4)
    x, context = torch.randn(2, 4, *SPATIAL, generator=gen), torch.randn(2, 3, 6, generator=gen)
    kwargs = dict(context=context, spacing_tensor=torch.rand(2, 3, generator=gen))
    with torch.no_grad():
        assert_close(ours(x, torch.tensor([5.0, 500.0]), **kwargs), theirs(x, torch.tensor([5.0, 500.0]), **kwargs),
                     "cross attention")


def build_controlnet(seed=1):
    torch.manual_seed(seed)
    config = {k: v for k, v in UNET.items() if k != "out_channels"}
    return randomize_(ControlNetMaisi(**config, conditioning_embedding_in_channels=1,
                                      conditioning_embedding_num_channels=(4, 8), use_checkpointing=False).eval(), seed)


def test_accelerated_maisi_controlnet_and_controlled_unet_match():
    flags = FLAG_SETS["all"]
    unet, controlnet = build_unet(flags, seed=2), build_controlnet()
    fast_unet, fast_controlnet = pydiffmed.accelerate(copy.deepcopy(unet)), pydiffmed.accelerate(
        copy.deepcopy(controlnet))
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, *SPATIAL, generator=gen)
    mask = torch.randn(2, 1, *(2 * s for s in SPATIAL), generator=gen)
    t = torch.tensor([40.0, 960.0])
    kwargs = extra_inputs(flags, 2, seed=8)
    with torch.no_grad():
        down, mid = controlnet(x, t, mask, 0.8)
        fast_down, fast_mid = fast_controlnet(x, t, mask, 0.8)
        assert len(down) == len(fast_down)
        for i, (a, b) in enumerate(zip([*fast_down, fast_mid], [*down, mid])):
            assert_close(a, b, f"ControlNetMaisi residual {i}")
        # MAISI adds the residuals in place: give each UNet its own copies
        ref = unet(x, t, down_block_additional_residuals=[r.clone() for r in down],
                   mid_block_additional_residual=mid.clone(), **kwargs)
        out = fast_unet(x, t, down_block_additional_residuals=[r.clone() for r in fast_down],
                        mid_block_additional_residual=fast_mid.clone(), **kwargs)
        assert_close(out, ref, "controlled DiffusionModelUNetMaisi")


@pytest.mark.parametrize("solver", ["ddim", "rflow_euler"])
def test_engine_samples_an_accelerated_maisi_unet(solver):
    """The extra inputs are per-sample conditioning (leading dimension 1 or B, like every cond tensor); the
    engine passes them as keyword arguments, so MAISI's forward needs no wrapper."""
    flags = FLAG_SETS["all"]
    theirs = build_unet(flags, seed=9)
    ours = pydiffmed.accelerate(copy.deepcopy(theirs))
    schedule = pydiffmed.NoiseSchedule.flow() if solver.startswith("rflow") else None
    x_T = torch.randn(2, 4, *SPATIAL, generator=torch.Generator().manual_seed(10))
    cond = extra_inputs(flags, 2, seed=11)
    cond["bottom_region_index_tensor"] = cond["bottom_region_index_tensor"][:1]  # one row for the whole batch
    common = dict(solver=solver, schedule=schedule, num_steps=4, x_T=x_T, progress=False)
    ref = pydiffmed.sample(theirs, x_T.shape, cond=cond, **common)
    out = pydiffmed.sample(ours, x_T.shape, cond=cond, **common)
    assert torch.isfinite(ref).all()
    assert_close(out, ref, f"sample({solver}) accelerated vs MONAI")
    # the conditioning reaches the model: another spacing, another volume
    other = pydiffmed.sample(ours, x_T.shape, cond={**cond, "spacing_tensor": cond["spacing_tensor"] + 1.0}, **common)
    assert rel_err(other, ref) > 1e-3


# --- a bundle with MAISI's autoencoder ---------------------------------------------------------------------------

def test_bundle_with_a_maisi_autoencoder_converts(tmp_path):
    from monai.networks.nets import DiffusionModelUNet

    theirs, args, image, latent = build_ae("1res_odd", seed=12)
    unet_args = dict(spatial_dims=3, in_channels=4, out_channels=4, channels=(8, 16),
                     attention_levels=(False, False), num_res_blocks=1, norm_num_groups=4)
    torch.manual_seed(13)
    unet = randomize_(DiffusionModelUNet(**unet_args).eval(), 13)
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    ae_def = {"_target_": "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi",
              **{k: list(v) if isinstance(v, tuple) else v for k, v in args.items()},
              "norm_float16": True, "num_splits": 8, "dim_split": 1, "use_checkpointing": False}
    config = {"latent_channels": 4, "autoencoder_def": ae_def,
              "trained_autoencoder_path": "$@model_dir + '/autoencoder_epoch273.pt'",
              "diffusion_unet_def": {"_target_": "monai.networks.nets.DiffusionModelUNet",
                                     **{k: list(v) if isinstance(v, tuple) else v for k, v in unet_args.items()}},
              "trained_diffusion_path": "$@model_dir + '/diffusion_unet.pt'",
              "noise_scheduler": {"_target_": "monai.networks.schedulers.RFlowScheduler",
                                  "num_train_timesteps": 1000, "use_discrete_timesteps": False}}
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    torch.save({"epoch": 273, "unet_state_dict": theirs.state_dict(), "epoch_finished": True},
               bundle / "models" / "autoencoder_epoch273.pt")
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(0.8), "epoch": 1},
               bundle / "models" / "diffusion_unet.pt")
    info = modelfile.convert_monai_bundle(bundle, tmp_path / "converted")
    assert info.is_latent and info.scale_factor == pytest.approx(0.8)
    stored = info.autoencoder["args"]
    assert stored["upsample_mode"] == "linear" and stored["convtranspose_kernel_size"] == 3
    assert stored["with_encoder_nonlocal_attn"] is False and stored["include_fc"] is False
    ae = pydiffmed.load_autoencoder(tmp_path / "converted")
    z = torch.randn(1, 4, 5, 3, 4, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        assert_close(ae.decode(z), theirs.decode(z), "converted MAISI autoencoder")

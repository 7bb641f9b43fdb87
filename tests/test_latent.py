"""Latent models (issue 14): model directories holding an autoencoder next to the UNet (config checks, load, save),
pydiffmed.sample(..., autoencoder=) against MONAI's LatentDiffusionInferer, `pydiffmed sample` on a latent model
(decoded NIfTI, sidecar, --resume, --decode-tile), and `convert --monai-bundle` on a synthetic bundle directory
(tiny random MONAI networks saved with torch.save, a JSON config) whose converted model samples what MONAI samples
with the bundle's networks. Tolerance as in test_integrations_monai: max |ours - MONAI| <= 1e-4 · max |MONAI|."""
from __future__ import annotations

import copy
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import max_abs_err, randomize_

import pydiffmed
from pydiffmed import modelfile
from pydiffmed.cli import main
from pydiffmed.engine import Sampler
from pydiffmed.models import AutoencoderKL, UNet3D, layers
from pydiffmed.solvers import get_solver

monai_nets = pytest.importorskip("monai.networks.nets")
pytest.importorskip("einops")
from monai import inferers as monai_inferers  # noqa: E402
from monai.networks import schedulers  # noqa: E402

from pydiffmed.solvers.convert import from_monai  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-4
UNET = dict(spatial_dims=3, in_channels=2, out_channels=2, channels=(8, 16), attention_levels=(False, True),
            num_res_blocks=1, num_head_channels=8, norm_num_groups=4)
AE = dict(spatial_dims=3, in_channels=1, out_channels=1, channels=(4, 8), latent_channels=2, num_res_blocks=1,
          attention_levels=(False, False), norm_num_groups=4, with_encoder_nonlocal_attn=False,
          with_decoder_nonlocal_attn=False)
IMAGE = (8, 8, 8)        # the autoencoder halves it once: latents 2×4³
LATENT = (2, 4, 4, 4)
CONFIG = {"schedule": {"kind": "discrete", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                       "beta_start": 0.0015, "beta_end": 0.0205},
          "prediction_type": "epsilon", "volume_shape": list(IMAGE), "autoencoder": {"scale_factor": 0.7}}
SCHEDULER = dict(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0205,
                 clip_sample=False)


def monai_unet(seed=0):
    torch.manual_seed(seed)
    return randomize_(monai_nets.DiffusionModelUNet(**UNET).eval(), seed)


def monai_autoencoder(seed=1):
    torch.manual_seed(seed)
    return randomize_(monai_nets.AutoencoderKL(**AE).eval(), seed)


def ddim(steps=6):
    scheduler = schedulers.DDIMScheduler(**SCHEDULER)
    scheduler.set_timesteps(steps)
    return scheduler


def monai_grid(schedule, steps=6):
    """DDIM on the model's own schedule (the config's, not MONAI's float32 table) at MONAI's timesteps."""
    monai_schedule = from_monai(ddim(steps)).schedule
    np.testing.assert_allclose(schedule.alphas_cumprod, monai_schedule.alphas_cumprod, rtol=1e-6)
    return get_solver("ddim", schedule, steps, spacing="monai", prev_rule="stride")


def noise(seed=3, batch=2):
    return torch.randn((batch, *LATENT), generator=torch.Generator().manual_seed(seed))


def assert_close(ours, ref, what=""):
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    scale, err = ref.abs().max().item(), max_abs_err(ours, ref)
    assert scale > 0 and err <= RTOL * scale, f"{what}: max error {err:.3g} > {RTOL:g} × max|MONAI| ({scale:.3g})"


def monai_sample(x, autoencoder, unet, scale_factor):
    with torch.no_grad():
        return monai_inferers.LatentDiffusionInferer(ddim(), scale_factor=scale_factor).sample(
            x, autoencoder, unet, verbose=False)


@pytest.fixture(scope="module")
def networks():
    return monai_unet(), monai_autoencoder()


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory, networks):
    unet, autoencoder = networks
    path = tmp_path_factory.mktemp("models") / "latent"
    modelfile.save_model(path, UNet3D.from_monai(unet), copy.deepcopy(CONFIG),
                         autoencoder=AutoencoderKL.from_monai(autoencoder))
    return path


# --- the model directory ---------------------------------------------------------------------------------------

def test_latent_directory_round_trip(latent_dir, networks):
    info = modelfile.read_model_info(latent_dir)
    assert info.is_latent and info.scale_factor == 0.7 and info.downsampling == 2
    assert info.channels == 1 and info.volume_shape == IMAGE and info.latent_shape() == LATENT
    assert info.latent_shape((16, 8, 8)) == (2, 8, 4, 4)
    assert sorted(os.listdir(latent_dir)) == ["autoencoder.safetensors", "config.json", "model.safetensors"]
    assert info.autoencoder["weights_sha256"] == modelfile.file_sha256(latent_dir / "autoencoder.safetensors")
    assert info.autoencoder["args"]["latent_channels"] == 2
    ae = pydiffmed.load_autoencoder(latent_dir)
    assert isinstance(ae, AutoencoderKL) and not ae.training
    z = noise(5)
    with torch.no_grad():
        assert_close(ae.decode(z), networks[1].decode_stage_2_outputs(z), "decode")
    unet, _, _ = pydiffmed.load_model(latent_dir)
    assert unet.config["in_channels"] == 2


def test_plain_models_are_unchanged(tmp_path):
    info = modelfile.save_model(tmp_path / "plain", UNet3D(**{**UNET, "in_channels": 1, "out_channels": 1}),
                                {k: v for k, v in CONFIG.items() if k != "autoencoder"})
    assert not info.is_latent and info.scale_factor is None and info.downsampling == 1
    assert info.latent_shape() == (1, *IMAGE) and "autoencoder" not in info.config
    with pytest.raises(modelfile.ModelFileError, match="not a latent model"):
        modelfile.load_autoencoder(tmp_path / "plain")


def _config(latent_dir):
    with open(latent_dir / "config.json") as f:
        return json.load(f)


@pytest.mark.parametrize("change, problem", [
    (lambda c: c["unet"].update(in_channels=3, out_channels=3), r"args.latent_channels \(2\) must equal unet.in_"),
    (lambda c: c.update(volume_shape=[8, 8, 6]), r"must be divisible by 4: the autoencoder divides each size by 2"),
    (lambda c: c.update(channels=2), r"channels \(2\) must equal autoencoder.args.out_channels \(1\)"),
    (lambda c: c["autoencoder"].update(latent_shape=[2, 4, 4, 4]), r"autoencoder: unknown key\(s\) \['latent_sh"),
    (lambda c: c["autoencoder"].update(scale_factor=0), r"autoencoder.scale_factor must be a positive number"),
    (lambda c: c["autoencoder"]["args"].update(channels=[4, 6]), r"autoencoder.args: every entry of channels"),
    (lambda c: c["autoencoder"]["args"].update(colour=1), r"autoencoder.args: unknown argument\(s\) \['colour'\]"),
    (lambda c: c["autoencoder"].pop("args"), r"autoencoder.args must be an object of AutoencoderKL arguments"),
    (lambda c: c["autoencoder"].update(weights_sha256="x"), r"autoencoder.weights_sha256 must be 64"),
])
def test_config_problems_are_named(latent_dir, change, problem):
    config = _config(latent_dir)
    change(config)
    with pytest.raises(modelfile.ModelFileError, match=problem):
        modelfile.validate_config(config, "config.json")


@pytest.mark.parametrize("damage, problem", [
    ("missing", r"autoencoder.safetensors: missing \(the autoencoder of the latent model"),
    ("corrupt", r"autoencoder.safetensors: does not match .*config.json"),
    ("other weights", r"autoencoder.safetensors: weights do not fit the autoencoder configured in"),
])
def test_autoencoder_file_problems_are_named(latent_dir, tmp_path, damage, problem):
    path = tmp_path / "copy"
    shutil.copytree(latent_dir, path)
    weights = path / "autoencoder.safetensors"
    if damage == "missing":
        weights.unlink()
    elif damage == "corrupt":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(weights))
        config = _config(path)
        config["autoencoder"]["weights_sha256"] = modelfile.file_sha256(weights)
        (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(modelfile.ModelFileError, match=problem):
        modelfile.load_autoencoder(path)
    if damage != "other weights":
        with pytest.raises(modelfile.ModelFileError, match=problem):
            modelfile.load_model(path)


def test_save_refusals(tmp_path, networks):
    unet, ae = UNet3D.from_monai(networks[0]), AutoencoderKL.from_monai(networks[1])
    with pytest.raises(ValueError, match="a latent model is a directory"):
        modelfile.save_model(tmp_path / "one.safetensors", unet, copy.deepcopy(CONFIG), autoencoder=ae)
    with pytest.raises(ValueError, match="no autoencoder= was given"):
        modelfile.save_model(tmp_path / "m", unet, copy.deepcopy(CONFIG))
    with pytest.raises(modelfile.ModelFileError, match=r"args.latent_channels \(2\) must equal unet.in_channels"):
        modelfile.save_model(tmp_path / "m", UNet3D(**{**UNET, "in_channels": 3, "out_channels": 3}),
                             copy.deepcopy(CONFIG), autoencoder=ae)


# --- sampling ----------------------------------------------------------------------------------------------------

def test_sample_equals_monai_latent_inferer(latent_dir, networks):
    """The directory's UNet and autoencoder through pydiffmed.sample equal MONAI's LatentDiffusionInferer on the
    original MONAI networks (same input noise, MONAI's DDIMScheduler); slab decoding changes nothing."""
    x = noise()
    ref = monai_sample(x, networks[1], networks[0], 0.7)
    unet, schedule, info = pydiffmed.load_model(latent_dir)
    ae = pydiffmed.load_autoencoder(latent_dir)
    solver = monai_grid(schedule)
    out = pydiffmed.sample(unet, (2, *info.latent_shape()), solver, x_T=x, autoencoder=ae,
                           scale_factor=info.scale_factor, progress=False)
    assert out.shape == (2, 1, *IMAGE) and out.dtype == torch.float32
    assert_close(out, ref, "decoded sample")
    tiled = pydiffmed.sample(unet, (2, *LATENT), solver, x_T=x, autoencoder=ae, scale_factor=0.7, decode_tile=2,
                             progress=False)
    assert_close(tiled, ref, "decoded by slabs")
    monai_ae = pydiffmed.sample(unet, (2, *LATENT), solver, x_T=x, autoencoder=networks[1], scale_factor=0.7,
                                progress=False)
    assert_close(monai_ae, ref, "decoded by MONAI's autoencoder")


def test_sample_argument_errors(latent_dir):
    unet, _, _ = pydiffmed.load_model(latent_dir)
    ae = pydiffmed.load_autoencoder(latent_dir)
    with pytest.raises(ValueError, match="go with autoencoder="):
        pydiffmed.sample(unet, (1, *LATENT), "ddim", 2, scale_factor=0.5, progress=False)
    with pytest.raises(ValueError, match="scale_factor must be a positive number"):
        pydiffmed.sample(unet, (1, *LATENT), "ddim", 2, autoencoder=ae, scale_factor=-1.0, progress=False)
    with pytest.raises(ValueError, match="decode tile must be a positive int"):
        pydiffmed.sample(unet, (1, *LATENT), "ddim", 2, autoencoder=ae, decode_tile=0, progress=False)


# --- the command -------------------------------------------------------------------------------------------------

def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_command_samples_a_latent_model(latent_dir, tmp_path, capsys):
    out = tmp_path / "out"
    common = ("sample", "--model", latent_dir, "--out", out, "--num", 2, "--batch", 2, "--solver", "ddim",
              "--steps", 3, "--quiet")
    code, stdout, err = run(capsys, *common, "--decode-tile", 2)
    assert code == 0, err
    unet, schedule, info = pydiffmed.load_model(latent_dir)
    ae = pydiffmed.load_autoencoder(latent_dir)
    latents = Sampler(unet, get_solver("ddim", schedule, 3, prediction_type="epsilon"), (2, *LATENT))([0, 1])
    with torch.no_grad():
        expected = ae.decode(latents / 0.7)[:, 0].numpy()
    for k in range(2):
        volume = nib.load(str(out / f"sample_{k:04d}.nii.gz")).get_fdata(dtype=np.float32)
        assert volume.shape == IMAGE
        np.testing.assert_allclose(volume, expected[k], rtol=0, atol=1e-5 * np.abs(expected).max())
        sidecar = json.loads((out / f"sample_{k:04d}.json").read_text())
        assert sidecar["shape"] == [1, *IMAGE]
        assert sidecar["latent"] == {"autoencoder_sha256": info.autoencoder["weights_sha256"], "scale_factor": 0.7,
                                     "latent_shape": list(LATENT), "decode_tile": 2, "decode_max_memory": None}
    # decoding by slabs changes no voxel: --resume keeps both volumes whatever the tiling
    code, stdout, err = run(capsys, *common, "--resume", "--decode-max-memory", "64M")
    assert code == 0 and "0 volume(s) written" in stdout and "2 complete volume(s) kept" in stdout, (stdout, err)


@pytest.mark.parametrize("extra, problem", [
    (("--init", "x.nii.gz", "--strength", "0.5"), "--init: the model 'latent' is a latent model"),
    (("--shape", 8, 8, 6), "--shape 8 8 6: every size must be divisible by 4"),
    (("--decode-tile", 0), "--decode-tile must be a positive number of rows"),
    (("--decode-max-memory", "lots"), "expected a size such as 2G"),
])
def test_command_refuses_bad_latent_options(latent_dir, tmp_path, capsys, extra, problem):
    code, _, err = run(capsys, "sample", "--model", latent_dir, "--out", tmp_path / "o", "--quiet", *extra)
    assert code == 2 and problem in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_command_decode_options_need_a_latent_model(tmp_path, capsys):
    plain = tmp_path / "plain"
    modelfile.save_model(plain, UNet3D(**{**UNET, "in_channels": 1, "out_channels": 1}),
                         {k: v for k, v in CONFIG.items() if k != "autoencoder"})
    code, _, err = run(capsys, "sample", "--model", plain, "--out", tmp_path / "o", "--decode-tile", 4)
    assert code == 2 and "is not a latent model" in err


# --- MONAI bundles -----------------------------------------------------------------------------------------------

def write_bundle(root, unet, autoencoder, config_changes=None, files=None):
    """A bundle laid out like the brain LDM one: configs/inference.json (network definitions with "@" references,
    "$" expressions elsewhere), models/model.pt and models/autoencoder.pt (torch.save of the state dicts)."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    config = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "model_dir": "$@bundle_root + '/models'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "spatial_dims": 3,
        "latent_channels": 2,
        "latent_shape": ["@latent_channels", 4, 4, 4],
        "autoencoder_def": {"_target_": "monai.networks.nets.AutoencoderKL", "spatial_dims": "@spatial_dims",
                            "latent_channels": "@latent_channels",
                            **{k: v for k, v in AE.items() if k not in ("spatial_dims", "latent_channels")}},
        "network_def": "@autoencoder_def",
        "load_autoencoder_path": "$@model_dir + '/autoencoder.pt'",
        "load_autoencoder": "$@autoencoder_def.load_state_dict(torch.load(@load_autoencoder_path))",
        "diffusion_def": {"_target_": "monai.networks.nets.DiffusionModelUNet", "spatial_dims": "@spatial_dims",
                          "in_channels": "@latent_channels", "out_channels": "@latent_channels",
                          **{k: v for k, v in UNET.items() if k not in ("spatial_dims", "in_channels",
                                                                           "out_channels")}},
        "load_diffusion_path": "$@model_dir + '/model.pt'",
        "load_diffusion": "$@diffusion_def.load_state_dict(torch.load(@load_diffusion_path))",
        "scheduler": {"_target_": "monai.networks.schedulers.DDIMScheduler",
                      "_requires_": ["@load_diffusion", "@load_autoencoder"], **SCHEDULER},
        "scale_factor": 0.7,
    }
    config.update(config_changes or {})
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=1))
    (root / "configs" / "metadata.json").write_text(json.dumps({"version": "1.0.0"}))
    files = files or {"model.pt": unet.state_dict(), "autoencoder.pt": autoencoder.state_dict()}
    for name, state in files.items():
        torch.save(state, root / "models" / name)
    return root


def test_bundle_converts_and_samples_like_monai(tmp_path, networks, capsys):
    unet, autoencoder = networks
    bundle = write_bundle(tmp_path / "bundle", unet, autoencoder)
    code, stdout, err = run(capsys, "convert", "--monai-bundle", bundle, "--out", tmp_path / "converted")
    assert code == 0, err
    assert "latent model (scale factor 0.7)" in stdout
    model, schedule, info = pydiffmed.load_model(tmp_path / "converted")
    assert info.is_latent and info.scale_factor == 0.7 and info.volume_shape == IMAGE
    assert info.prediction_type == "epsilon" and info.clip_sample is None
    source = info.config["source"]
    assert (source["network"], source["autoencoder"], source["checkpoint"]) == \
        ("diffusion_def", "autoencoder_def", os.path.join("models", "model.pt"))
    assert source["scale_factor_from"] == "inference.json: scale_factor"
    solver = monai_grid(schedule)
    x = noise(7)
    out = pydiffmed.sample(model, (2, *info.latent_shape()), solver, x_T=x, progress=False,
                           autoencoder=pydiffmed.load_autoencoder(tmp_path / "converted"),
                           scale_factor=info.scale_factor)
    assert_close(out, monai_sample(x, autoencoder, unet, 0.7), "converted bundle")


def test_bundle_scale_factor_from_the_checkpoint_or_default(tmp_path, networks):
    unet, autoencoder = networks
    stored = {"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(1.25)}
    bundle = write_bundle(tmp_path / "b1", unet, autoencoder, {"scale_factor": "$@checkpoint['scale_factor']"},
                          files={"model.pt": {"state_dict": stored["unet_state_dict"],
                                              "scale_factor": stored["scale_factor"]},
                                 "autoencoder.pt": autoencoder.state_dict()})
    info = modelfile.convert_monai_bundle(bundle, tmp_path / "m1")
    assert info.scale_factor == 1.25 and info.config["source"]["scale_factor_from"] == "model.pt: scale_factor"
    config = json.loads((tmp_path / "b1" / "configs" / "inference.json").read_text())
    del config["scale_factor"]
    bundle = write_bundle(tmp_path / "b2", unet, autoencoder)
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="gives no scale_factor"):
        info = modelfile.convert_monai_bundle(bundle, tmp_path / "m2")
    assert info.scale_factor == 1.0


def test_bundle_without_autoencoder_is_a_plain_model(tmp_path):
    torch.manual_seed(4)
    plain = randomize_(monai_nets.DiffusionModelUNet(**{**UNET, "in_channels": 1, "out_channels": 1}).eval(), 4)
    bundle = write_bundle(tmp_path / "b", plain, None, {"latent_channels": 1}, files={"model.pt": plain.state_dict()})
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    for key in ("autoencoder_def", "network_def", "load_autoencoder_path", "load_autoencoder"):
        del config[key]
    config["scheduler"]["_requires_"] = ["@load_diffusion"]
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    info = modelfile.convert_monai_bundle(bundle, tmp_path / "m")
    assert not info.is_latent and info.channels == 1


BAD_BUNDLES = {
    "no configs": (lambda b: shutil.rmtree(b / "configs"), "not a MONAI bundle: it has no configs/ directory"),
    "no diffusion network": (lambda b: _edit(b, lambda c: c.pop("diffusion_def")),
                             "no diffusion network: none of inference.json has an entry whose _target_ is a "
                             "DiffusionModelUNet"),
    "missing weights": (lambda b: (b / "models" / "model.pt").unlink(),
                        "load_diffusion_path names the weights model.pt, but"),
    "no weights named or conventional": (
        lambda b: (_edit(b, lambda c: c.pop("load_autoencoder_path")), (b / "models" / "autoencoder.pt").unlink()),
        "no weights for the autoencoder autoencoder_def: "),
    "key mismatch": (lambda b: shutil.copy(b / "models" / "autoencoder.pt", b / "models" / "model.pt"),
                     "model.pt: does not fit the network diffusion_def of"),
    "MAISI": (lambda b: _edit(b, lambda c: c["diffusion_def"].update(
        _target_="monai.apps.generation.maisi.networks.diffusion_model_unet_maisi.DiffusionModelUNetMaisi")),
        "diffusion_def (DiffusionModelUNetMaisi), which pydiffmed does not build"),
    "two diffusion networks": (lambda b: _edit(b, lambda c: c.update(other_def=c["diffusion_def"])),
                               "several DiffusionModelUNet definitions (diffusion_def, other_def)"),
    "an expression as an argument": (lambda b: _edit(b, lambda c: c["diffusion_def"].update(num_res_blocks="$1")),
                                     "is a bundle expression or macro, which pydiffmed does not evaluate"),
    "latent channels disagree": (lambda b: _edit(b, lambda c: c["autoencoder_def"].update(latent_channels=3)),
                                 "args.latent_channels (3) must equal unet.in_channels (2)"),
}


def _edit(bundle, change):
    path = bundle / "configs" / "inference.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("name", list(BAD_BUNDLES))
def test_malformed_bundles_give_one_clear_line(tmp_path, networks, capsys, name):
    damage, problem = BAD_BUNDLES[name]
    bundle = write_bundle(tmp_path / "bundle", *networks)
    damage(bundle)
    with pytest.raises(modelfile.ModelFileError) as caught:
        modelfile.convert_monai_bundle(bundle, tmp_path / "m")
    assert problem in str(caught.value)
    code, _, err = run(capsys, "convert", "--monai-bundle", bundle, "--out", tmp_path / "m")
    assert code == 2 and problem in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m").exists()


def test_convert_option_pairs(tmp_path, capsys):
    code, _, err = run(capsys, "convert", "--out", tmp_path / "m")
    assert code == 2 and "--monai-checkpoint and --monai-config, or --monai-bundle" in err
    code, _, err = run(capsys, "convert", "--monai-bundle", tmp_path, "--monai-config", "c.json", "--out", tmp_path)
    assert code == 2 and "--monai-bundle replaces" in err


# --- memory of the decode ----------------------------------------------------------------------------------------

def _measured_decode_peak(autoencoder, shape, **slabs):
    from pydiffmed.memory import _LiveBytes

    tracker = _LiveBytes()
    with torch.no_grad(), tracker:
        out = autoencoder.decode(torch.randn(shape, generator=torch.Generator().manual_seed(0)), **slabs)
    del out
    return tracker.peak


@pytest.mark.parametrize("slabs", [{}, {"tile": 3}, {"tile": 1}, {"max_memory": 200_000}])
@pytest.mark.parametrize("shape", [(1, 2, 6, 6, 6), (2, 2, 5, 7, 4)])
def test_decode_memory_estimate_is_close_above_the_measured_peak(networks, slabs, shape):
    """Whole decodes are extrapolated from proxy latents, slab decodes planned on the meta device at full size:
    both within 20 % of the peak of the tensors a real decode creates (measured, the same way the engine measures
    forwards; the whole-volume extrapolation overestimates volumes this small)."""
    from pydiffmed.memory import decode_memory

    ae = AutoencoderKL.from_monai(networks[1])
    on_device, stored, _ = decode_memory(ae, shape, **slabs)
    measured = _measured_decode_peak(ae, shape, **slabs)
    assert stored == 0  # storage is the model's device here
    assert 0.98 * measured <= on_device <= 1.2 * measured, (on_device, measured)


def test_estimate_memory_adds_the_autoencoder_and_its_decode(networks):
    unet, ae = UNet3D.from_monai(networks[0]), AutoencoderKL.from_monai(networks[1])
    plain = pydiffmed.estimate_memory(unet, (1, *LATENT))
    latent = pydiffmed.estimate_memory(unet, (1, *LATENT), autoencoder=ae, decode_tile=2)
    ae_bytes = sum(p.numel() * p.element_size() for p in ae.parameters())
    decoder_conv_bytes = sum(m.weight.numel() * m.weight.element_size() for m in ae.decoder.modules()
                             if isinstance(m, torch.nn.Conv3d))
    packed = latent.parameters - plain.parameters - ae_bytes  # the decoder's packed weight copies (CPU oneDNN)
    assert (packed == 0 if not layers._HAS_WEIGHT_PACKING else decoder_conv_bytes <= packed <= 4 * decoder_conv_bytes)
    assert latent.decode > 0 and latent.decode_storage == 0 and "decode" in str(latent)
    assert latent.total == latent.parameters + latent.state + max(latent.activations, latent.decode)


def test_a_decode_that_cannot_fit_is_refused_before_sampling(latent_dir, tmp_path, capsys, monkeypatch):
    from pydiffmed import memory

    unet, schedule, _ = pydiffmed.load_model(latent_dir)
    ae = pydiffmed.load_autoencoder(latent_dir)
    whole = memory.decode_memory(ae, (2, *LATENT))[0]
    monkeypatch.setattr(memory, "available_memory", lambda device: whole // 2)
    calls = []
    monkeypatch.setattr(unet, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(memory.InsufficientMemoryError, match="decoding latents of shape .* try decode by slabs"):
        pydiffmed.sample(unet, (2, *LATENT), "ddim", 3, schedule, autoencoder=ae, scale_factor=0.7,
                         check_memory=True)
    assert not calls
    code, _, err = run(capsys, "sample", "--model", latent_dir, "--out", tmp_path / "o", "--num", 2, "--batch", 2,
                       "--steps", 2, "--quiet")
    assert code == 2 and "--batch 2" in err and "decoding latents" in err and "--decode-tile" in err, err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_decode_max_memory_auto_picks_whole_or_the_deepest_slabs_that_fit(latent_dir, tmp_path, capsys,
                                                                          monkeypatch):
    """decode_max_memory="auto" (--decode-max-memory auto): the whole decode where it fits the free memory, else
    the deepest slabs whose planned decode fits, with the same images; refused before sampling when nothing fits."""
    from pydiffmed import latent, memory

    unet, schedule, info = pydiffmed.load_model(latent_dir)
    ae = pydiffmed.load_autoencoder(latent_dir)
    shape = (1, 2, 16, 16, 16)  # 32³ images: big enough that slabs need less than the whole decode
    whole_bytes = memory.decode_memory(ae, shape)[0]
    slab_bytes = {tile: memory.decode_memory(ae, shape, tile=tile)[0] for tile in (16, 8, 4, 2, 1)}
    assert latent.auto_decode(ae, shape) == {}  # this machine has room for a whole 32³ decode
    free = int(min(slab_bytes.values()) / 0.95) + 1
    assert whole_bytes > 0.95 * free
    expected = next(tile for tile in (16, 8, 4, 2, 1) if slab_bytes[tile] <= 0.95 * free)
    monkeypatch.setattr(memory, "available_memory", lambda device: free)
    assert latent.auto_decode(ae, shape) == {"tile": expected}
    options = dict(solver="ddim", num_steps=3, schedule=schedule, autoencoder=ae, scale_factor=info.scale_factor,
                   progress=False)
    auto = pydiffmed.sample(unet, shape, decode_max_memory="auto", **options)
    monkeypatch.undo()
    whole = pydiffmed.sample(unet, shape, **options)
    assert_close(auto, whole, "auto decode")
    out = tmp_path / "o"
    monkeypatch.setattr(memory, "available_memory", lambda device: free)
    code, _, err = run(capsys, "sample", "--model", latent_dir, "--out", out, "--num", 1, "--steps", 2,
                       "--shape", 32, 32, 32, "--decode-max-memory", "auto", "--quiet")
    assert code == 0, err
    assert json.loads((out / "sample_0000.json").read_text())["latent"]["decode_max_memory"] == "auto"
    monkeypatch.setattr(memory, "available_memory", lambda device: min(slab_bytes.values()) // 2)
    calls = []
    monkeypatch.setattr(unet, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(memory.InsufficientMemoryError, match="not even by one-row slabs"):
        pydiffmed.sample(unet, shape, decode_max_memory="auto", **options)
    assert not calls
    code, _, err = run(capsys, "sample", "--model", latent_dir, "--out", tmp_path / "p", "--decode-tile", 2,
                       "--decode-max-memory", "auto", "--quiet")
    assert code == 2 and "drop --decode-tile" in err
    with pytest.raises(ValueError, match="give no tile"):
        latent.check_decode_options(2, "auto")


def test_image_commands_refuse_a_latent_model(latent_dir, tmp_path, capsys):
    volume = tmp_path / "x.nii.gz"
    import nibabel

    nibabel.save(nibabel.Nifti1Image(np.zeros(IMAGE, dtype=np.float32), np.eye(4)), str(volume))
    code, _, err = run(capsys, "anomaly", "--model", latent_dir, "--input", volume, "--out", tmp_path / "o")
    assert code == 2 and "a latent model" in err and "this command works on images" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()

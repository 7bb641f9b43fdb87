"""pydiffmed.modelfile: the safetensors + config model format, bundled-name lookup, clear errors for missing,
truncated, mismatched or invalid files, refusal of pickled code, and MONAI checkpoint import."""
import hashlib
import json
import os
import pathlib
import warnings

import numpy as np
import pytest
import torch

import pydiffmed
from pydiffmed import modelfile
from pydiffmed.modelfile import ModelFileError
from pydiffmed.models import UNet3D

SMALL_UNET = dict(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=1, channels=(8, 16),
                  attention_levels=(False, True), norm_num_groups=8, num_head_channels=8)
CONFIG = {"schedule": {"kind": "discrete", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                       "beta_start": 0.0015, "beta_end": 0.0195},
          "prediction_type": "v_prediction", "clip_sample": 1.0, "volume_shape": [16, 16, 16],
          "spacing": [1.0, 1.2, 2.0], "orientation": "LPS", "intensity": {"scale": 500.0, "offset": 0.0},
          "description": "a test model"}


def _randomised(model, seed=0):
    """Non-trivial weights (MONAI zero-initialises the output convolution and each resnet's second one)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def unet():
    return _randomised(UNet3D(**SMALL_UNET))


@pytest.fixture(scope="module")
def probe():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 16, 16, 16, generator=generator), torch.tensor([3, 700])


# --- round trips ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["directory", "file"])
def test_save_load_round_trip(tmp_path, unet, probe, form):
    path = tmp_path / ("model" if form == "directory" else "model.safetensors")
    saved = modelfile.save_model(path, unet, CONFIG)
    model, schedule, info = pydiffmed.load_model(path)

    x, t = probe
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), unet(x, t), rtol=0, atol=0)
    assert not model.training
    expected = pydiffmed.schedules.NoiseSchedule.discrete("scaled_linear", 1000, 0.0015, 0.0195)
    np.testing.assert_array_equal(schedule.alphas_cumprod, expected.alphas_cumprod)
    weights = path / "model.safetensors" if form == "directory" else path
    assert info.sha256 == saved.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert info.name == "model" and info.description == "a test model"
    assert info.prediction_type == "v_prediction" and info.clip_sample == 1.0
    assert info.volume_shape == (16, 16, 16) and info.channels == 1
    assert info.intensity == {"scale": 500.0, "offset": 0.0, "clip": None}
    np.testing.assert_allclose(info.affine(), pydiffmed.io.make_affine((1.0, 1.2, 2.0), "LPS", shape=(16, 16, 16)))
    assert info.unet["channels"] == [8, 16]
    assert modelfile.read_model_info(path).sha256 == info.sha256
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(weights).st_mode & 0o777 == 0o666 & ~umask  # not the 0o600 safetensors writes by itself
    if form == "directory":
        assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
        assert json.loads((path / "config.json").read_text())["weights_sha256"] == info.sha256


def test_load_model_device_and_dtype(tmp_path, unet):
    modelfile.save_model(tmp_path / "m", unet, CONFIG)
    model, _, _ = modelfile.load_model(tmp_path / "m", dtype=torch.float64)
    assert next(model.parameters()).dtype == torch.float64


def test_save_does_not_overwrite_unless_asked(tmp_path, unet):
    info = modelfile.save_model(tmp_path / "m", unet, CONFIG)
    other = _randomised(UNet3D(**SMALL_UNET), seed=5)
    with pytest.raises(FileExistsError, match="model.safetensors already exists"):
        modelfile.save_model(tmp_path / "m", other, CONFIG)
    assert modelfile.read_model_info(tmp_path / "m").sha256 == info.sha256
    replaced = modelfile.save_model(tmp_path / "m", other, CONFIG, overwrite=True)
    assert replaced.sha256 != info.sha256
    assert modelfile.read_model_info(tmp_path / "m").sha256 == replaced.sha256
    modelfile.save_model(tmp_path / "one.safetensors", unet, CONFIG)
    with pytest.raises(FileExistsError, match="one.safetensors already exists"):
        modelfile.save_model(tmp_path / "one.safetensors", unet, CONFIG)


def test_save_model_arguments(tmp_path, unet):
    with pytest.raises(TypeError, match="UNet3D"):
        modelfile.save_model(tmp_path / "m", torch.nn.Linear(2, 2), CONFIG)
    with pytest.raises(ValueError, match="must not hold 'unet'"):
        modelfile.save_model(tmp_path / "m", unet, {**CONFIG, "unet": SMALL_UNET})
    with pytest.raises(ModelFileError, match="missing required key"):
        modelfile.save_model(tmp_path / "m", unet, {"schedule": CONFIG["schedule"]})
    assert not (tmp_path / "m").exists()


# --- bundled models ------------------------------------------------------------------------------------------

def test_bundled_names_resolve_to_models_data(tmp_path, unet, probe, monkeypatch):
    monkeypatch.setattr(modelfile, "MODELS_DIR", str(tmp_path))
    assert modelfile.bundled_models() == []
    with pytest.raises(ModelFileError, match="not the name of a bundled model.*no bundled models"):
        modelfile.load_model("tiny")
    modelfile.save_model(tmp_path / "tiny", unet, CONFIG)
    modelfile.save_model(tmp_path / "solo.safetensors", unet, CONFIG)
    (tmp_path / "README.md").write_text("not a model")
    os.mkdir(tmp_path / "empty")
    assert modelfile.bundled_models() == ["solo", "tiny"]
    for name in ("tiny", "solo"):
        model, _, info = modelfile.load_model(name)
        assert info.name == name
    with pytest.raises(ModelFileError, match="bundled models: solo, tiny"):
        modelfile.load_model("nope")
    # A same-named folder in the working directory that is not a model does not hide the bundled one.
    monkeypatch.chdir(tmp_path / "empty")
    os.mkdir("tiny")
    assert modelfile.read_model_info("tiny").path == str(tmp_path / "tiny")
    modelfile.save_model("tiny", unet, CONFIG, overwrite=True)  # once it is a model, the local path wins
    assert modelfile.read_model_info("tiny").path == "tiny"


def test_shipped_models_directory_exists():
    assert os.path.isdir(modelfile.MODELS_DIR)
    for name in modelfile.bundled_models():  # whatever ships must load
        assert modelfile.read_model_info(name).name


# --- broken files --------------------------------------------------------------------------------------------

def test_missing_pieces_are_named(tmp_path, unet):
    modelfile.save_model(tmp_path / "m", unet, CONFIG)
    os.remove(tmp_path / "m" / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"m/model.safetensors: missing"):
        modelfile.load_model(tmp_path / "m")
    modelfile.save_model(tmp_path / "n", unet, CONFIG)
    os.remove(tmp_path / "n" / "config.json")
    with pytest.raises(ModelFileError, match=r"n/config.json: missing"):
        modelfile.load_model(tmp_path / "n")
    with pytest.raises(ModelFileError, match="nowhere: no such file"):
        modelfile.load_model(tmp_path / "nowhere")


@pytest.mark.parametrize("form", ["directory", "file"])
@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_truncated_or_corrupt_weights(tmp_path, unet, form, damage):
    path = tmp_path / ("m" if form == "directory" else "m.safetensors")
    modelfile.save_model(path, unet, CONFIG)
    weights = path / "model.safetensors" if form == "directory" else path
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000] if damage == "truncate" else b"\xff" * 8 + data[8:])
    if form == "directory":  # a stale hash would also catch it; without one the file itself must be checked
        config = json.loads((path / "config.json").read_text())
        del config["weights_sha256"]
        (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=f"{weights.name}: not a readable safetensors file"):
        modelfile.load_model(path)


def test_weights_from_another_save_are_detected_by_hash(tmp_path, unet):
    modelfile.save_model(tmp_path / "a", unet, CONFIG)
    modelfile.save_model(tmp_path / "b", _randomised(UNet3D(**SMALL_UNET), seed=3), CONFIG)
    os.replace(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"a/model.safetensors: does not match .*config.json"):
        modelfile.load_model(tmp_path / "a")


def test_weights_of_a_different_network_are_listed(tmp_path, unet):
    modelfile.save_model(tmp_path / "a", unet, CONFIG)
    bigger = UNet3D(**{**SMALL_UNET, "channels": (8, 24)})
    modelfile.save_model(tmp_path / "b", bigger, CONFIG)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    del config["weights_sha256"]
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))  # b's weights, a's (smaller) network
    with pytest.raises(ModelFileError, match=r"(?s)b/model.safetensors: weights do not fit the network "
                                             r"configured in .*b/config.json.*shape mismatch"):
        modelfile.load_model(tmp_path / "b")


def test_single_file_without_config_and_other_formats(tmp_path, unet):
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(bare))
    with pytest.raises(ModelFileError, match="bare.safetensors: a .safetensors file without an embedded"):
        modelfile.load_model(bare)
    checkpoint = tmp_path / "model.pt"
    torch.save(unet.state_dict(), checkpoint)
    with pytest.raises(ModelFileError, match="model.pt: not a pydiffmed model.*pydiffmed convert"):
        modelfile.load_model(checkpoint)


def test_invalid_network_arguments_name_the_config(tmp_path, unet):
    modelfile.save_model(tmp_path / "m", unet, CONFIG)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["unet"]["norm_num_groups"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError,
                       match=r"(?s)m/config.json: invalid model config:.*unet: .*divisible by norm_num_groups=3"):
        modelfile.load_model(tmp_path / "m")


def test_corrupt_config_json(tmp_path, unet):
    modelfile.save_model(tmp_path / "m", unet, CONFIG)
    (tmp_path / "m" / "config.json").write_text('{"unet": ')
    with pytest.raises(ModelFileError, match="config.json: not valid JSON"):
        modelfile.load_model(tmp_path / "m")


# --- config validation ---------------------------------------------------------------------------------------

def _valid():
    return {"unet": dict(SMALL_UNET), **json.loads(json.dumps(CONFIG))}


@pytest.mark.parametrize("change, message", [
    ({"colour": "blue"}, r"unknown key\(s\) \['colour'\]"),
    ({"unet": None}, "unet must be an object"),
    ({"unet": {**SMALL_UNET, "depth": 3}}, r"unet: unknown argument\(s\) \['depth'\]"),
    ({"unet": {"channels": [8, 16]}}, "unet: missing required argument"),
    ({"unet": {**SMALL_UNET, "out_channels": 2}}, "out_channels .* must equal in_channels"),
    ({"schedule": {"kind": "magic"}}, "kind must be one of"),
    ({"schedule": {"kind": "discrete", "beta_schedule": "wiggly"}}, "unknown schedule 'wiggly'"),
    ({"schedule": {"kind": "flow", "beta_start": 0.1}}, r"unknown key\(s\) \['beta_start'\] for kind 'flow'"),
    ({"prediction_type": "noise"}, "prediction_type must be one of"),
    ({"volume_shape": [16, 16, 15]}, "must be divisible by 2"),
    ({"volume_shape": [16, 16]}, "volume_shape must be 3 positive ints"),
    ({"channels": 2}, r"channels \(2\) must equal unet.in_channels"),
    ({"spacing": [1, 0, 1]}, "spacing must be positive"),
    ({"orientation": "RRS"}, "orientation"),
    ({"intensity": {"scale": 0}}, "scale must be non-zero"),
    ({"clip_sample": -1}, "clip_sample must be"),
    ({"format_version": 99}, "newer than this pydiffmed"),
    ({"format": "other"}, "format must be 'pydiffmed-model'"),
    ({"weights_sha256": "abc"}, "64 lower-case hex"),
])
def test_config_validation_messages(change, message):
    config = {**_valid(), **change}
    with pytest.raises(ModelFileError, match=f"(?s)cfg.json: invalid model config:.*{message}"):
        modelfile.validate_config(config, "cfg.json")


def test_config_validation_lists_every_problem_and_fills_defaults():
    config = _valid()
    del config["prediction_type"]
    config["colour"] = 1
    config["spacing"] = [1, 1]
    with pytest.raises(ModelFileError) as error:
        modelfile.validate_config(config, "cfg.json")
    text = str(error.value)
    assert "missing required key(s) ['prediction_type']" in text and "colour" in text and "spacing" in text

    minimal = {"unet": dict(SMALL_UNET), "schedule": {"beta_schedule": "linear"}, "prediction_type": "eps"}
    full = modelfile.validate_config(minimal)
    assert full["prediction_type"] == "epsilon" and full["schedule"]["kind"] == "discrete"
    assert full["spacing"] == [1.0, 1.0, 1.0] and full["orientation"] == "RAS" and full["channels"] == 1
    assert full["volume_shape"] is None and full["intensity"] is None and full["clip_sample"] is None


@pytest.mark.parametrize("spec, kind", [
    ({"kind": "flow", "num_train_timesteps": 1000}, "flow"),
    ({"kind": "vp", "beta_min": 0.1, "beta_max": 20.0}, "vp"),
    ({"kind": "ve", "sigma_min": 0.01, "sigma_max": 50.0}, "ve"),
    ({"betas": [0.1, 0.2, 0.3], "num_train_timesteps": 3}, "discrete"),
    ({"beta_schedule": "linear_beta", "num_train_timesteps": 10}, "discrete"),
])
def test_build_schedule(spec, kind):
    schedule = modelfile.build_schedule(spec)
    assert schedule.kind == kind
    if "betas" in spec:
        np.testing.assert_allclose(schedule.betas, spec["betas"])


def test_build_schedule_rejects_inconsistent_betas():
    with pytest.raises(ValueError, match="does not match the 3 betas"):
        modelfile.build_schedule({"betas": [0.1, 0.2, 0.3], "num_train_timesteps": 1000})
    with pytest.raises(ValueError, match="not both"):
        modelfile.build_schedule({"betas": [0.1, 0.2], "beta_schedule": "linear"})


# --- pickles are refused -------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs pathlib.Path.write_text(marker, "pwned"): arbitrary code in a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "pwned"))


def test_malicious_checkpoint_is_refused_without_running_it(tmp_path, unet):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": unet.state_dict(), "extra": _Payload(str(marker))}, evil)
    config = tmp_path / "net.json"
    config.write_text(json.dumps(SMALL_UNET))

    with pytest.raises(pydiffmed.models.CheckpointError, match="evil.pt: refused to load"):
        modelfile.convert_monai(evil, config, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()

    # The payload is live: a plain unpickling load does run it.
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "pwned"


# --- MONAI import --------------------------------------------------------------------------------------------

def _monai_unet(**overrides):
    from monai.networks.nets import DiffusionModelUNet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _randomised(DiffusionModelUNet(**{**SMALL_UNET, **overrides}), seed=11)


def _old_key_names(state_dict):
    """Today's MONAI names → the older GenerativeModels ones (attention q/k/v directly on the block, `proj_attn`,
    the upsampler's `conv`)."""
    renamed = {}
    for key, value in state_dict.items():
        key = key.replace(".attn.to_q.", ".to_q.").replace(".attn.to_k.", ".to_k.").replace(".attn.to_v.", ".to_v.")
        key = key.replace(".attn.out_proj.", ".proj_attn.")
        key = key.replace(".upsampler.postconv.conv.", ".upsampler.conv.conv.")
        renamed[key] = value
    return renamed


def test_convert_monai_plain_config_gives_monai_outputs(tmp_path, probe):
    monai_net = _monai_unet()
    checkpoint = tmp_path / "model.pt"
    torch.save({"state_dict": monai_net.state_dict(), "epoch": 7}, checkpoint)
    config = tmp_path / "network.json"
    config.write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in SMALL_UNET.items()}))

    with pytest.warns(UserWarning, match="names no scheduler"):
        info = modelfile.convert_monai(checkpoint, config, tmp_path / "converted", volume_shape=[16, 16, 16])
    model, schedule, loaded = modelfile.load_model(tmp_path / "converted")
    x, t = probe
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), monai_net(x, t), rtol=1e-4, atol=1e-4)
    assert loaded.sha256 == info.sha256
    assert loaded.prediction_type == "epsilon" and loaded.clip_sample == 1.0 and schedule.num_train_timesteps == 1000
    assert loaded.config["source"]["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()


def test_convert_monai_bundle_yaml_old_key_names(tmp_path, probe):
    yaml = pytest.importorskip("yaml")
    monai_net = _monai_unet()
    checkpoint = tmp_path / "model.pt"
    old = _old_key_names(monai_net.state_dict())
    assert any(".proj_attn." in k for k in old) and any(".upsampler.conv.conv." in k for k in old)
    torch.save({"module." + k: v for k, v in old.items()}, checkpoint)  # as saved from DataParallel
    bundle = {
        "channels": [8, 16],
        "diffusion_def": {"_target_": "generative.networks.nets.DiffusionModelUNet", "spatial_dims": 3,
                          "in_channels": 1, "out_channels": 1, "num_res_blocks": 1, "num_channels": "@channels",
                          "attention_levels": [False, True], "norm_num_groups": 8, "num_head_channels": 8},
        "noise_scheduler": {"_target_": "generative.networks.schedulers.DDIMScheduler", "num_train_timesteps": 500,
                            "beta_schedule": "scaled_linear", "beta_start": 0.0015, "beta_end": 0.0195,
                            "prediction_type": "v_prediction", "clip_sample": False},
        "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-4},
    }
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(bundle))
    modelfile.convert_monai(checkpoint, config, tmp_path / "conv.safetensors")
    model, schedule, info = modelfile.load_model(tmp_path / "conv.safetensors")
    x, t = probe
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), monai_net(x, t), rtol=1e-4, atol=1e-4)
    assert info.prediction_type == "v_prediction" and info.clip_sample is None
    assert schedule.num_train_timesteps == 500
    expected = pydiffmed.schedules.NoiseSchedule.discrete("scaled_linear", 500, 0.0015, 0.0195)
    np.testing.assert_allclose(schedule.alphas_cumprod, expected.alphas_cumprod)
    assert info.config["source"]["schedule_from"].startswith("noise_scheduler")


def test_convert_monai_rflow_scheduler_and_overrides(tmp_path):
    monai_net = _monai_unet()
    checkpoint = tmp_path / "model.pt"
    torch.save({"model": monai_net.state_dict()}, checkpoint)
    bundle = {"network_def": {"_target_": "monai.networks.nets.DiffusionModelUNet", **SMALL_UNET},
              "scheduler": {"_target_": "monai.networks.schedulers.RFlowScheduler", "num_train_timesteps": 1000}}
    config = tmp_path / "bundle.json"
    config.write_text(json.dumps(bundle, default=list))
    info = modelfile.convert_monai(checkpoint, config, tmp_path / "flow", name="flowy", spacing=[2, 2, 2])
    assert info.schedule_config == {"kind": "flow", "num_train_timesteps": 1000}
    assert info.prediction_type == "neg_flow" and info.name == "flowy" and info.spacing == (2.0, 2.0, 2.0)
    _, schedule, _ = modelfile.load_model(tmp_path / "flow")
    assert schedule.kind == "flow"


def test_convert_monai_errors_name_the_files(tmp_path):
    monai_net = _monai_unet()
    checkpoint = tmp_path / "model.pt"
    torch.save(monai_net.state_dict(), checkpoint)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**SMALL_UNET, "channels": [8, 24]}, default=list))
    with pytest.raises(ModelFileError, match=r"(?s)model.pt: does not fit the network described by .*wrong.json"):
        modelfile.convert_monai(checkpoint, wrong, tmp_path / "out")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({**SMALL_UNET, "wings": 2}, default=list))
    with pytest.raises(ModelFileError, match=r"unknown.json: .*\['wings'\]"):
        modelfile.convert_monai(checkpoint, unknown, tmp_path / "out")
    expression = tmp_path / "expr.json"
    expression.write_text(json.dumps({"net": {"_target_": "monai.networks.nets.DiffusionModelUNet",
                                              **{**SMALL_UNET, "channels": "$[8, 16]"}}}, default=list))
    with pytest.raises(ModelFileError, match=r"expr.json: net.channels: '\$\[8, 16\]' is a bundle expression"):
        modelfile.convert_monai(checkpoint, expression, tmp_path / "out")
    nothing = tmp_path / "nothing.json"
    nothing.write_text(json.dumps({"lr": 0.1}))
    with pytest.raises(ModelFileError, match="nothing.json: no DiffusionModelUNet arguments"):
        modelfile.convert_monai(checkpoint, nothing, tmp_path / "out")
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:500])
    good = tmp_path / "good.json"
    good.write_text(json.dumps(SMALL_UNET, default=list))
    with pytest.raises(pydiffmed.models.CheckpointError, match="cut.pt: not a readable torch checkpoint"):
        modelfile.convert_monai(truncated, good, tmp_path / "out")
    with pytest.raises(ModelFileError, match="absent.json: no such file"):
        modelfile.convert_monai(checkpoint, tmp_path / "absent.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()

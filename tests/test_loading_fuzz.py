"""Every reader of a user's file (torch checkpoint, safetensors, model directory config, MONAI bundle JSON/YAML,
NIfTI) either succeeds or raises the project's own error naming the file: a hypothesis fuzz with a fixed profile
(random bytes, truncations and byte flips of real files, values of the wrong type at every key of a config), and
targeted tests for the bad-input classes of issue 15 (resource bombs, wrong types, invalid schedules, weights that
are not floats or not finite)."""
import copy
import gzip
import json
import os
import struct
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pydiffmed import io, modelfile
from pydiffmed.modelfile import ModelFileError
from pydiffmed.models import CheckpointError, UNet3D, load_state_dict_file
from pydiffmed.schedules import NoiseSchedule

TINY_UNET = dict(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=1, channels=[4, 8],
                 attention_levels=[False, True], norm_num_groups=4, num_head_channels=4)
CONFIG = {"schedule": {"kind": "discrete", "num_train_timesteps": 1000, "beta_schedule": "linear",
                       "beta_start": 0.0001, "beta_end": 0.02},
          "prediction_type": "epsilon", "clip_sample": 1.0, "volume_shape": [8, 8, 8],
          "spacing": [1.0, 1.0, 2.0], "orientation": "LPS", "intensity": {"scale": 100.0, "offset": 0.0}}
BUNDLE = {
    "channels": [4, 8],
    "network_def": {"_target_": "monai.networks.nets.DiffusionModelUNet", **TINY_UNET, "channels": "@channels"},
    "scheduler": {"_target_": "monai.networks.schedulers.DDPMScheduler", "num_train_timesteps": 1000,
                  "schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0195,
                  "prediction_type": "epsilon", "clip_sample": True},
}

# The fixed fuzz profile: the same examples on every run and machine, nothing remembered between runs
# (PYDIFFMED_FUZZ_EXAMPLES=N runs a longer, still derandomized, search).
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                max_examples=int(os.environ.get("PYDIFFMED_FUZZ_EXAMPLES", "200")),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def _model(seed=0):
    generator = torch.Generator().manual_seed(seed)
    model = UNet3D(**TINY_UNET)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Valid files of every kind, their bytes, and a scratch directory for the mutated copies."""
    import yaml

    root = tmp_path_factory.mktemp("valid")
    model = _model()
    modelfile.save_model(root / "dir", model, CONFIG)
    modelfile.save_model(root / "single.safetensors", model, CONFIG)
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, root / "ckpt.pt")
    (root / "bundle.json").write_text(json.dumps(BUNDLE))
    (root / "bundle.yaml").write_text(yaml.safe_dump(BUNDLE))
    volume = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(2))
    io.save_volume(root / "vol.nii", volume)
    io.save_volume(root / "vol.nii.gz", volume)
    data = {name: (root / name).read_bytes() for name in
            ("dir/config.json", "dir/model.safetensors", "single.safetensors", "ckpt.pt", "bundle.json",
             "bundle.yaml", "vol.nii", "vol.nii.gz")}
    data["vol.nii (raw)"] = gzip.decompress(data["vol.nii.gz"])
    return _Files((root, data, tmp_path_factory.mktemp("scratch")))


class _Files(tuple):
    def __repr__(self):  # hypothesis prints the arguments of a failing example; the bytes would drown it
        return "<valid files>"


def _check_only(errors, name_in_message, load, *args, **kwargs):
    """load(...) succeeds or raises `errors` whose message names the file; anything else fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.load warns about odd pickle protocols in damaged files
            load(*args, **kwargs)
    except errors as exc:
        assert name_in_message in str(exc), f"{name_in_message!r} not named in: {exc}"
        assert "Traceback" not in str(exc)


# --- strategies ----------------------------------------------------------------------------------------------

def mutated(data: bytes, hot: int = 0):
    """`data` truncated, with up to 6 bytes replaced and/or a slice removed or duplicated; positions are drawn
    from the whole file and (when hot > 0) from its first `hot` bytes, where headers live."""
    position = st.integers(0, len(data) - 1)
    if hot:
        position = st.one_of(st.integers(0, min(hot, len(data)) - 1), position)
    flips = st.lists(st.tuples(position, st.integers(0, 255)), max_size=6)
    return st.tuples(flips, st.one_of(st.none(), st.integers(0, len(data))),
                     st.one_of(st.none(), st.tuples(position, position))).map(
        lambda draw: _apply(data, *draw))


def _apply(data, flips, cut, splice):
    buffer = bytearray(data)
    for where, value in flips:
        buffer[where] = value
    if splice is not None:
        a, b = sorted(splice)
        buffer = buffer[:a] + buffer[b:] if (a + b) % 2 else buffer[:b] + buffer[a:]
    return bytes(buffer[:cut] if cut is not None else buffer)


random_bytes = st.binary(min_size=0, max_size=400)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=6)
    | st.sampled_from([0, -1, 1, 3, 2 ** 31, 10 ** 9, 0.5, 1.5, "", "@channels", "@missing", "$x", "abc"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


def _key_paths(value, prefix=()):
    paths = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += _key_paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += _key_paths(item, prefix + (index,))
    return paths


def retyped(document):
    """`document` with the value at one of its key paths replaced by an arbitrary JSON value (or deleted)."""
    paths = [p for p in _key_paths(document) if p]
    return st.tuples(st.sampled_from(paths), json_values, st.booleans()).map(
        lambda draw: _replace(document, *draw))


def _replace(document, path, value, delete):
    document = copy.deepcopy(document)
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return json.dumps(document).encode()


# --- fuzz: each reader raises its own error or succeeds ------------------------------------------------------

@FUZZ
@given(data=st.one_of(random_bytes, st.deferred(lambda: mutated(_VALID["ckpt.pt"], hot=200))))
def test_fuzz_torch_checkpoint(files, data):
    path = files[2] / "fuzz.pt"
    path.write_bytes(data)
    _check_only(CheckpointError, "fuzz.pt", load_state_dict_file, path)


@FUZZ
@given(data=st.one_of(random_bytes, st.deferred(lambda: mutated(_VALID["dir/model.safetensors"], hot=600))))
def test_fuzz_safetensors_file(files, data):
    path = files[2] / "fuzz.safetensors"
    path.write_bytes(data)
    _check_only(CheckpointError, "fuzz.safetensors", load_state_dict_file, path)


@FUZZ
@given(data=st.one_of(random_bytes, st.deferred(lambda: mutated(_VALID["single.safetensors"], hot=1500))))
def test_fuzz_single_file_model(files, data):
    path = files[2] / "fuzz_model.safetensors"
    path.write_bytes(data)
    _check_only(ModelFileError, "fuzz_model.safetensors", modelfile.load_model, path)


@FUZZ
@given(data=st.one_of(random_bytes, st.deferred(lambda: mutated(_VALID["dir/config.json"], hot=0)),
                      st.deferred(lambda: retyped(json.loads(_VALID["dir/config.json"])))))
def test_fuzz_model_directory_config(files, data):
    root, valid, scratch = files
    directory = scratch / "fuzzdir"
    directory.mkdir(exist_ok=True)
    (directory / "model.safetensors").write_bytes(valid["dir/model.safetensors"])
    (directory / "config.json").write_bytes(data)
    _check_only(ModelFileError, "config.json", modelfile.load_model, directory)


@FUZZ
@given(data=st.one_of(random_bytes, st.deferred(lambda: mutated(_VALID["bundle.json"])),
                      st.deferred(lambda: retyped(BUNDLE))),
       suffix=st.sampled_from([".json", ".yaml"]))
def test_fuzz_monai_bundle_config(files, data, suffix):
    root, valid, scratch = files
    path = scratch / f"fuzz_bundle{suffix}"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check_only(ModelFileError, path.name, modelfile.convert_monai, root / "ckpt.pt", path,
                    scratch / "fuzz_out.safetensors", overwrite=True)


@FUZZ
@given(data=st.one_of(random_bytes, st.deferred(lambda: mutated(_VALID["bundle.yaml"]))))
def test_fuzz_monai_bundle_yaml_bytes(files, data):
    root, valid, scratch = files
    path = scratch / "fuzz_bundle_bytes.yaml"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check_only(ModelFileError, path.name, modelfile.convert_monai, root / "ckpt.pt", path,
                    scratch / "fuzz_out2.safetensors", overwrite=True)


@FUZZ
@given(case=st.one_of(
    st.tuples(st.just("fuzz.nii"), random_bytes),
    st.tuples(st.just("fuzz.nii"), st.deferred(lambda: mutated(_VALID["vol.nii"], hot=352))),
    st.tuples(st.just("fuzz.nii.gz"), random_bytes),
    st.tuples(st.just("fuzz.nii.gz"), st.deferred(lambda: mutated(_VALID["vol.nii.gz"], hot=40))),  # the stream
    st.tuples(st.just("fuzz.nii.gz"), st.deferred(lambda: mutated(_VALID["vol.nii (raw)"], hot=352).map(
        lambda raw: gzip.compress(raw, mtime=0))))))  # a damaged header, compressed intact
def test_fuzz_nifti(files, case):
    name, data = case
    path = files[2] / name
    path.write_bytes(data)
    _check_only(io.FileReadError, name, io.load_volume, path)


_VALID = {}


@pytest.fixture(scope="module", autouse=True)
def _valid_bytes(files):
    """The strategies above are built lazily (st.deferred) from the valid files' bytes."""
    _VALID.update(files[1])
    yield
    _VALID.clear()


# --- resource bombs ------------------------------------------------------------------------------------------

def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    lines = ["l0: &l0 [8, 8, 8, 8, 8, 8, 8, 8, 8]"]
    for level in range(1, 10):  # 9^10 values once expanded
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    lines.append("network_def: {_target_: DiffusionModelUNet, spatial_dims: 3, in_channels: 1, out_channels: 1, "
                 "channels: *l9}")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines))
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match=r"bomb.yaml: expands to more than 1000000 values \(YAML aliases"):
        modelfile.convert_monai(tmp_path / "unused.pt", path, tmp_path / "out")
    assert time.perf_counter() - start < 2.0
    assert not (tmp_path / "out").exists()


def test_recursive_yaml_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("a: &a [1, *a]\n")
    with pytest.raises(ModelFileError, match="loop.yaml: an entry contains itself"):
        modelfile.convert_monai(tmp_path / "unused.pt", path, tmp_path / "out")


def test_reference_bomb_is_refused_quickly(tmp_path):
    bundle = {"r0": [8] * 9}
    for level in range(1, 10):
        bundle[f"r{level}"] = [f"@r{level - 1}"] * 9
    bundle["network_def"] = {"_target_": "DiffusionModelUNet", "spatial_dims": 3, "in_channels": 1,
                             "out_channels": 1, "channels": "@r9"}
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(bundle))
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match=r'refs.json: network_def.channels\S*: its "@" references expand to '
                                             r"more than 1000000 values"):
        modelfile.convert_monai(tmp_path / "unused.pt", path, tmp_path / "out")
    assert time.perf_counter() - start < 2.0


def test_oversized_and_deeply_nested_configs_are_refused(tmp_path, monkeypatch):
    deep = tmp_path / "deep.json"
    deep.write_text('{"a": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ModelFileError, match="deep.json: not valid JSON \\(nested too deeply\\)"):
        modelfile.convert_monai(tmp_path / "unused.pt", deep, tmp_path / "out")
    monkeypatch.setattr(modelfile, "MAX_CONFIG_BYTES", 1000)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"pad": "x" * 2000}))
    with pytest.raises(ModelFileError, match="big.json: larger than"):
        modelfile.convert_monai(tmp_path / "unused.pt", big, tmp_path / "out")


def test_nifti_header_claiming_a_huge_volume_is_refused_before_reading(tmp_path):
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    for shape, message in (((4096, 4096, 4096), "claims a 4096×4096×4096 image \\(68719476736 voxels\\), more "
                                                 "than pydiffmed reads"),
                           ((1024, 1024, 512), None)):
        header.set_data_shape(shape)
        raw = header.binaryblock + b"\0" * 4 + np.zeros(100, np.float32).tobytes()
        assert len(raw) < 1024
        for suffix in (".nii", ".nii.gz"):
            path = tmp_path / f"huge{suffix}"
            path.write_bytes(gzip.compress(raw, mtime=0) if suffix.endswith(".gz") else raw)
            expected = message or ("more than a \\d+-byte gzip file can hold" if suffix.endswith(".gz") else
                                   "the file is truncated: the header claims a 1024×1024×512 image of float32 "
                                   "\\(\\d+ bytes\\), but the file has 752 bytes")
            start = time.perf_counter()
            with pytest.raises(io.FileReadError, match=f"huge{suffix}: cannot read as a NIfTI volume: .*{expected}"):
                io.load_volume(path)
            assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("damage, message", [
    ("nan", "holds 1 NaN/Inf voxel"),
    ("inf", "holds 1 NaN/Inf voxel"),
    ("2d", "expected a 3-D or 4-D image"),
    ("empty", "holds no voxels"),
    ("zero affine", "unusable voxel-to-world geometry"),
    ("truncated", "the file is truncated"),
])
def test_bad_nifti_contents_name_the_file(tmp_path, damage, message):
    import nibabel as nib

    data = np.ones((4, 3, 2), np.float32)
    affine = np.eye(4)
    if damage == "nan":
        data[1, 1, 1] = np.nan
    elif damage == "inf":
        data[0, 0, 0] = -np.inf
    elif damage == "2d":
        data = data[:, :, 0]
    elif damage == "empty":
        data = np.ones((4, 0, 2), np.float32)
    path = tmp_path / "bad.nii"
    nib.save(nib.Nifti1Image(data, affine), path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "zero affine":  # a header whose only geometry (the sform) maps every voxel to one point
        header = nib.load(path).header.copy()
        header["qform_code"], header["sform_code"] = 0, 1
        header["srow_x"] = header["srow_y"] = header["srow_z"] = [0.0, 0.0, 0.0, 0.0]
        path.write_bytes(header.binaryblock + path.read_bytes()[348:])
    with pytest.raises(io.FileReadError, match=f"bad.nii: .*{message}"):
        io.load_volume(path)


# --- configs: the key that is wrong is named --------------------------------------------------------------------

@pytest.fixture()
def model_dir(tmp_path):
    modelfile.save_model(tmp_path / "m", _model(), CONFIG)
    return tmp_path / "m"


def _edit_config(directory, edit):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_non_utf8_configs_name_the_file(model_dir, tmp_path):
    (model_dir / "config.json").write_bytes('{"name": "caf\u00e9"}'.encode("latin-1"))
    with pytest.raises(ModelFileError, match=r"m/config.json: not UTF-8 text \(byte 13 is b'\\xe9'\)"):
        modelfile.read_model_info(model_dir)
    bundle = tmp_path / "net.yaml"
    bundle.write_bytes(b"spatial_dims: 3\nname: caf\xe9\n")
    with pytest.raises(ModelFileError, match="net.yaml: not UTF-8 text"):
        modelfile.convert_monai(tmp_path / "unused.pt", bundle, tmp_path / "out")


@pytest.mark.parametrize("key, value, message", [
    ("channels", "abc", "unet: channels must be a non-empty list of positive ints, got 'abc'"),
    ("channels", [-4, 8], "unet: channels must be a non-empty list of positive ints, got [-4, 8]"),
    ("channels", [4.0, 8], "unet: channels must be a non-empty list of positive ints"),
    ("num_res_blocks", -1, "unet: num_res_blocks must be a positive int or a list of positive ints"),
    ("norm_num_groups", 3, "unet: every entry of channels (4, 8) must be divisible by norm_num_groups=3"),
    ("norm_num_groups", "4", "unet: norm_num_groups must be a positive int, got '4'"),
    ("attention_levels", "yes", "unet: attention_levels must be a list of booleans"),
    ("norm_eps", "tiny", "unet: norm_eps must be a positive finite number"),
    ("num_head_channels", 0, "unet: num_head_channels must be a positive int"),
    ("with_conditioning", "no", "unet: with_conditioning must be true or false"),
    ("cross_attention_dim", [8], "unet: cross_attention_dim must be null or a positive int"),
    ("spatial_dims", 4, "unet: spatial_dims must be 2 or 3"),
])
def test_wrong_typed_unet_key_is_blamed(model_dir, key, value, message):
    _edit_config(model_dir, lambda config: config["unet"].__setitem__(key, value))
    for load in (modelfile.read_model_info, modelfile.load_model):
        with pytest.raises(ModelFileError) as info:
            load(model_dir)
        text = str(info.value)
        assert text.startswith(f"{model_dir / 'config.json'}: invalid model config:")
        assert message in text
        assert "string formatting" not in text and "object is not" not in text and "unsupported operand" not in text


@pytest.mark.parametrize("channels, message", [
    ([10 ** 9, 10 ** 9], "unet: channels holds 1000000000, beyond any real network (at most 16777216)"),
    ([65536, 65536], "unet: the network would have 2.88e+12 parameters (1.07e+04 GiB in float32), more than "
                     "pydiffmed loads (4e+09)"),
])
def test_huge_network_is_refused_before_allocating(model_dir, tmp_path, channels, message):
    # Building either network for real would need terabytes; the config check must refuse it from the numbers.
    _edit_config(model_dir, lambda config: config["unet"].update(channels=channels))
    start = time.perf_counter()
    for load in (modelfile.read_model_info, modelfile.load_model):
        with pytest.raises(ModelFileError, match="m/config.json: invalid model config") as info:
            load(model_dir)
        assert message in str(info.value)
    bundle = tmp_path / "huge.json"
    bundle.write_text(json.dumps({**TINY_UNET, "channels": channels}))
    with pytest.raises(ModelFileError, match="huge.json: invalid model config") as info:
        modelfile.convert_monai(tmp_path / "unused.pt", bundle, tmp_path / "out")
    assert message in str(info.value)
    assert time.perf_counter() - start < 5.0


def test_too_many_blocks_are_refused_before_building(model_dir):
    _edit_config(model_dir, lambda config: config["unet"].update(num_res_blocks=10 ** 6))
    with pytest.raises(ModelFileError, match=r"unet: channels \(2 levels\), num_res_blocks and transformer_num_layers "
                                             r"make ~8000012 blocks, more than pydiffmed builds \(2000\)"):
        modelfile.read_model_info(model_dir)


def _linear(**change):
    return {"kind": "discrete", "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
            "beta_end": 0.02, **change}


@pytest.mark.parametrize("schedule, message", [
    (_linear(beta_end=1.5), "schedule: beta_end must lie in (0, 1)"),
    (_linear(beta_start=-0.001), "schedule: beta_start must lie in (0, 1)"),
    (_linear(beta_start=float("nan")), "schedule: beta_start must be a finite number, got nan"),
    (_linear(beta_end=float("inf")), "schedule: beta_end must be a finite number, got inf"),
    (_linear(beta_end="0.02"), "schedule: beta_end must be a finite number, got '0.02'"),
    (_linear(num_train_timesteps=10 ** 12), "schedule: num_train_timesteps must be at most 1048576"),
    (_linear(beta_schedule="cosine", max_beta=1.0), "schedule: max_beta must lie in (0, 1)"),
    (_linear(beta_schedule=["linear"]), "schedule: beta_schedule must be a name, got ['linear']"),
    ({"kind": "discrete", "betas": [0.1, 1.2]}, "explicit betas must be a sequence of at least 2 values in (0, 1)"),
    ({"kind": "discrete", "betas": [0.1, "x"]}, "explicit betas must be a sequence of at least 2 values"),
    ({"kind": "discrete", "betas": 0.1}, "schedule: betas must be a list of numbers, got float"),
    ({"kind": "vp", "beta_max": float("nan")}, "schedule: beta_max must be a finite number, got nan"),
    ({"kind": "ve", "sigma_max": float("inf")}, "schedule: sigma_max must be a finite number, got inf"),
    ({"kind": "flow", "num_train_timesteps": "1000"}, "schedule: num_train_timesteps must be a positive int, got "
                                                     "'1000'"),
    ({"kind": ["discrete"]}, "schedule: kind must be one of"),
])
def test_invalid_schedule_is_refused(model_dir, schedule, message):
    _edit_config(model_dir, lambda config: config.update(schedule=schedule))
    with pytest.raises(ModelFileError, match="m/config.json: invalid model config") as info:
        modelfile.read_model_info(model_dir)
    assert message in str(info.value)


def test_schedule_constructors_refuse_invalid_numbers():
    with pytest.raises(ValueError, match=r"beta_end must lie in \(0, 1\)"):
        NoiseSchedule.discrete("linear", beta_end=1.5)
    with pytest.raises(ValueError, match=r"beta_start must lie in \(0, 1\)"):
        NoiseSchedule.discrete("scaled_linear", beta_start=-1e-4)
    with pytest.raises(ValueError, match="beta_start must be a finite number"):
        NoiseSchedule.discrete("sigmoid", beta_start=float("nan"))
    with pytest.raises(ValueError, match="beta_max must be a finite number"):
        NoiseSchedule.vp(beta_max=float("inf"))
    with pytest.raises(ValueError, match="need beta_min >= 0"):
        NoiseSchedule.subvp(beta_min=-1.0)
    with pytest.raises(ValueError, match="t_min must be a finite number"):
        NoiseSchedule.flow(t_min=float("nan"))
    with pytest.raises(ValueError, match="time_scale must be positive"):
        NoiseSchedule.vp(time_scale=0.0)


def test_bad_monai_scheduler_entries_name_the_key(tmp_path):
    for entry, message in (({"clip_sample": "yes"}, "scheduler.clip_sample must be true or false"),
                           ({"clip_sample_max": "big"}, "scheduler: clip_sample_min and clip_sample_max must be "
                                                        "finite numbers"),
                           ({"num_train_timesteps": "many"}, "num_train_timesteps must be a positive int"),
                           ({"beta_end": 2.0}, "beta_end must lie in (0, 1)")):
        bundle = copy.deepcopy(BUNDLE)
        bundle["scheduler"].update(entry)
        path = tmp_path / "sched.json"
        path.write_text(json.dumps(bundle))
        with pytest.raises(ModelFileError, match="sched.json") as info:
            modelfile.convert_monai(tmp_path / "unused.pt", path, tmp_path / "out")
        assert message in str(info.value)
        assert not (tmp_path / "out").exists()


# --- weights -------------------------------------------------------------------------------------------------

def _write_weights(directory, tensors):
    from safetensors.torch import save_file

    save_file(tensors, directory / "model.safetensors", metadata={"format": modelfile.FORMAT})
    _edit_config(directory, lambda config: config.update(weights_sha256=modelfile.file_sha256(
        directory / "model.safetensors")))


def test_float_weights_stored_as_integers_are_refused(model_dir, tmp_path):
    tensors = dict(_model().state_dict())
    tensors["conv_in.conv.weight"] = torch.ones_like(tensors["conv_in.conv.weight"], dtype=torch.int32)
    tensors["out.2.conv.bias"] = torch.zeros_like(tensors["out.2.conv.bias"], dtype=torch.bool)
    _write_weights(model_dir, {k: v.contiguous() for k, v in tensors.items()})
    with pytest.raises(ModelFileError, match=r"(?s)m/model.safetensors: weights do not fit .*2 float parameter\(s\) "
                                             r"stored as another type \(pydiffmed does not cast them\): "
                                             r"'conv_in.conv.weight' \(torch.int32\), 'out.2.conv.bias' "
                                             r"\(torch.bool\)"):
        modelfile.load_model(model_dir)
    checkpoint = tmp_path / "ints.pt"
    torch.save(tensors, checkpoint)
    config = tmp_path / "net.json"
    config.write_text(json.dumps(TINY_UNET))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ModelFileError, match=r"(?s)ints.pt: does not fit the network described by .*net.json.*"
                                                 r"'conv_in.conv.weight' \(torch.int32\)"):
            modelfile.convert_monai(checkpoint, config, tmp_path / "out")


def test_non_finite_weights_are_refused_in_convert_and_load(model_dir, tmp_path):
    state = {k: torch.full_like(v, float("nan")) for k, v in _model().state_dict().items()}
    checkpoint = tmp_path / "nan.pt"
    torch.save({"state_dict": state}, checkpoint)
    config = tmp_path / "net.json"
    config.write_text(json.dumps(TINY_UNET))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ModelFileError, match=rf"(?s)nan.pt: does not fit the network described by .*net.json.*"
                                                 rf"{len(state)} tensor\(s\) hold NaN/Inf values: 'conv_in.conv."
                                                 rf"weight' \(108 of 108\)"):
            modelfile.convert_monai(checkpoint, config, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    tensors = dict(_model().state_dict())
    tensors["out.2.conv.bias"] = torch.tensor([float("inf")])
    _write_weights(model_dir, {k: v.contiguous() for k, v in tensors.items()})
    with pytest.raises(ModelFileError, match=r"(?s)m/model.safetensors: weights do not fit .*1 tensor\(s\) hold "
                                             r"NaN/Inf "
                                             r"values: 'out.2.conv.bias' \(1 of 1\)"):
        modelfile.load_model(model_dir)


def test_checkpoint_with_non_string_keys_is_refused(tmp_path):
    path = tmp_path / "ints.pt"
    torch.save({0: torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"ints.pt: keys that are not names: 0"):
        load_state_dict_file(path)


def test_valid_files_still_load(files):
    root, valid, scratch = files
    modelfile.load_model(root / "dir")
    modelfile.load_model(root / "single.safetensors")
    assert set(load_state_dict_file(root / "ckpt.pt")) == set(_model().state_dict())
    for name in ("bundle.json", "bundle.yaml"):
        info = modelfile.convert_monai(root / "ckpt.pt", root / name, scratch / f"ok-{name}.safetensors")
        assert info.config["schedule"]["beta_schedule"] == "scaled_linear_beta"
    for name in ("vol.nii", "vol.nii.gz"):
        volume, _ = io.load_volume(root / name)
        assert volume.shape == (1, 6, 5, 4)
    assert struct.unpack("<i", valid["vol.nii"][:4])[0] == 348  # the header the fuzz mutates is a NIfTI-1 one

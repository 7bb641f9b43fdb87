"""Determinism as a promise (issue 15): on the CPU, volume k is bitwise the same whatever its batch size and
companions, for the real networks — UNet3D (attention, class labels, cross-attention) and an accelerate()d MONAI
DiffusionModelUNet — at fp32 and bf16, through a forward, through `pydiffmed.sample`, and through the command's
files for every --batch. Sampler(batch_invariant=True) (per-sample model calls, the mode for GPUs) gives the
same volumes."""
import pathlib

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

from helpers import randomised
import pydiffmed
from pydiffmed import modelfile
from pydiffmed.cli import main
from pydiffmed.models import AutoencoderKL, UNet3D

TWO_LEVELS = dict(spatial_dims=3, in_channels=1, out_channels=1, channels=(16, 32), attention_levels=(False, True),
                  num_res_blocks=1, num_head_channels=(0, 16), norm_num_groups=8)
CONFIGS = {
    "attention": TWO_LEVELS,
    "class_labels": dict(TWO_LEVELS, num_class_embeds=3),
    "cross_attention": dict(TWO_LEVELS, with_conditioning=True, cross_attention_dim=8, transformer_num_layers=1),
}
COMPANIONS = ([0, 1], [2, 0, 4], [3, 1, 0, 2], [4, 3, 2, 1, 0])


def inputs(config, dtype):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, 1, 16, 16, 16, generator=generator).to(dtype)
    t = torch.tensor([10.0, 500.0, 900.0, 33.0, 250.0])
    kwargs = {}
    if config.get("num_class_embeds"):
        kwargs["class_labels"] = torch.tensor([0, 1, 2, 1, 0])
    if config.get("with_conditioning"):
        kwargs["context"] = torch.randn(5, 3, 8, generator=generator).to(dtype)
    return x, t, kwargs


def assert_batch_invariant(model, x, t, kwargs):
    with torch.no_grad():
        alone = [model(x[k:k + 1], t[k:k + 1], **{n: v[k:k + 1] for n, v in kwargs.items()}) for k in range(5)]
        for idx in COMPANIONS:
            batch = model(x[idx], t[idx], **{n: v[idx] for n, v in kwargs.items()})
            for j, k in enumerate(idx):
                assert torch.equal(batch[j], alone[k][0]), f"sample {k} in batch {idx} differs from it alone"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", CONFIGS)
def test_unet3d_sample_k_is_bitwise_independent_of_its_batch(name, dtype):
    model = randomised(UNet3D(**CONFIGS[name])).to(dtype)
    assert_batch_invariant(model, *inputs(CONFIGS[name], dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["attention", "class_labels"])
def test_accelerated_monai_sample_k_is_bitwise_independent_of_its_batch(name, dtype):
    model = pydiffmed.accelerate(randomised(DiffusionModelUNet(**CONFIGS[name]))).to(dtype)
    assert_batch_invariant(model, *inputs(CONFIGS[name], dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autoencoder_decode_of_latent_k_is_bitwise_independent_of_its_batch(dtype):
    """The latent pipeline's decoder, whole and by slabs (attention at the last level for the whole decode)."""
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(4, 3, 6, 5, 4, generator=generator).to(dtype)
    for attention, slabs in ((True, {}), (False, {"tile": 3})):
        ae = randomised(AutoencoderKL(3, latent_channels=3, channels=(8, 16), num_res_blocks=(1, 1),
                                      attention_levels=(False, attention), norm_num_groups=4,
                                      with_encoder_nonlocal_attn=attention,
                                      with_decoder_nonlocal_attn=attention)).to(dtype)
        with torch.no_grad():
            alone = [ae.decode(z[k:k + 1], **slabs) for k in range(4)]
            for idx in ([1, 0], [3, 2, 0], [2, 0, 3, 1]):
                batch = ae.decode(z[idx], **slabs)
                for j, k in enumerate(idx):
                    assert torch.equal(batch[j], alone[k][0]), f"latent {k} in batch {idx}, {slabs}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampled_volume_k_is_the_same_alone_and_in_any_batch(dtype):
    model = randomised(UNet3D(**CONFIGS["class_labels"]))
    shape = (1, 1, 16, 16, 16)

    def sample(seeds, labels, **options):
        return pydiffmed.sample(model, (len(seeds), *shape[1:]), "dpmpp_2m_sde", 3, seed=torch.tensor(seeds),
                                dtype=dtype, cond={"class_labels": torch.tensor(labels)}, progress=False,
                                **options)

    alone = {seed: sample([seed], [seed % 3]) for seed in (11, 12, 13)}
    batched = sample([12, 11, 13], [0, 2, 1])
    for j, seed in enumerate((12, 11, 13)):
        assert torch.equal(batched[j], alone[seed][0])
    guided = pydiffmed.sample(model, (2, *shape[1:]), "ddim", 3, seed=torch.tensor([13, 11]), dtype=dtype,
                              guidance_scale=2.0, cond={"class_labels": torch.tensor([1, 2])},
                              uncond={"class_labels": torch.tensor([0, 0])}, progress=False)
    guided_alone = pydiffmed.sample(model, shape, "ddim", 3, seed=11, dtype=dtype, guidance_scale=2.0,
                                    cond={"class_labels": torch.tensor([2])},
                                    uncond={"class_labels": torch.tensor([0])}, progress=False)
    assert torch.equal(guided[1], guided_alone[0])
    per_sample_calls = sample([12, 11, 13], [0, 2, 1], batch_invariant=True)
    assert torch.equal(per_sample_calls, batched)


def test_batch_invariant_mode_calls_the_model_once_per_sample():
    calls = []

    class Recording(torch.nn.Module):
        def forward(self, x, t, scale):
            calls.append((x.shape[0], t.shape[0], scale.shape[0]))
            return x * scale.view(-1, 1, 1, 1, 1)

    out = pydiffmed.sample(Recording(), (3, 1, 4, 4, 4), "ddim", 2, cond={"scale": torch.tensor([0.1, 0.2, 0.3])},
                           batch_invariant=True, progress=False)
    assert calls and set(calls) == {(1, 1, 1)} and len(calls) == 3 * 2
    calls.clear()
    batched = pydiffmed.sample(Recording(), (3, 1, 4, 4, 4), "ddim", 2,
                               cond={"scale": torch.tensor([0.1, 0.2, 0.3])}, progress=False)
    assert set(calls) == {(3, 3, 3)} and torch.equal(out, batched)


def test_command_files_are_byte_identical_for_every_batch(tmp_path, capsys):
    model = randomised(UNet3D(**TWO_LEVELS))
    config = {"schedule": {"kind": "discrete", "num_train_timesteps": 1000, "beta_schedule": "linear"},
              "prediction_type": "epsilon", "volume_shape": [16, 16, 16]}
    modelfile.save_model(tmp_path / "model", model, config)
    outputs = {}
    for batch in (1, 3, 4):
        out = tmp_path / f"batch{batch}"
        code = main(["sample", "--model", str(tmp_path / "model"), "--num", "4", "--batch", str(batch),
                     "--solver", "dpmpp_2m", "--steps", "3", "--seed", "5", "--out", str(out), "--quiet"])
        assert code == 0, capsys.readouterr().err
        outputs[batch] = {p.name: p.read_bytes() for p in sorted(pathlib.Path(out).iterdir())
                          if p.suffix in (".gz", ".png")}
    assert len(outputs[1]) == 8
    assert outputs[1] == outputs[3] == outputs[4]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_batch_invariant_mode_keeps_volume_k_bitwise(dtype):
    """On CUDA the batched model may round differently by batch size; batch_invariant=True must not."""
    torch.backends.cudnn.benchmark = False
    model = randomised(UNet3D(**CONFIGS["class_labels"])).cuda()

    def sample(seeds, labels):
        return pydiffmed.sample(model, (len(seeds), 1, 16, 16, 16), "dpmpp_2m", 3, seed=torch.tensor(seeds),
                                dtype=dtype, cond={"class_labels": torch.tensor(labels, device="cuda")},
                                batch_invariant=True, progress=False)

    alone = sample([11], [2])
    batched = sample([12, 11, 13], [0, 2, 1])
    assert torch.equal(batched[1], alone[0])

"""pydiffmed.data: the head phantom family (determinism, range, plausible anatomy) and the statistics the demo
model's quality check uses (tissue fractions, histogram distance, connected components)."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from pydiffmed import data

BACKGROUND, BONE, BRAIN, LESION, CSF = (data.TISSUE_CLASSES.index(n)
                                        for n in ("background", "bone", "brain", "lesion", "csf"))


@pytest.fixture(scope="module")
def heads():
    """Ten phantoms of family 0 with their ground-truth label maps."""
    pairs = [data.head_phantom(0, i, return_labels=True) for i in range(10)]
    return torch.stack([v for v, _ in pairs]), torch.stack([lab for _, lab in pairs])


# --- the phantom ---------------------------------------------------------------------------------------------

def test_phantom_is_deterministic_by_seed_and_index():
    a = data.head_phantom(3, 5)
    assert torch.equal(a, data.head_phantom(3, 5))
    assert not torch.equal(a, data.head_phantom(3, 6))
    assert not torch.equal(a, data.head_phantom(4, 5))
    batch = data.phantoms(3, seed=3, start=4)
    assert torch.equal(batch[1], a)  # independent of batch size and position
    dataset = data.PhantomDataset(10, seed=3)
    assert len(dataset) == 10 and torch.equal(dataset[5], a)
    with pytest.raises(IndexError):
        dataset[10]


def test_phantom_shape_dtype_range():
    v = data.head_phantom(0, 0)
    assert v.shape == (1, 32, 32, 32) and v.dtype == torch.float32 and v.is_contiguous()
    assert float(v.min()) >= -1.0 and float(v.max()) <= 1.0
    assert float(v.max()) > 0.6 and float(v.min()) == -1.0  # CSF is bright, air is black
    w = data.head_phantom(0, 0, shape=(16, 24, 20))
    assert w.shape == (1, 16, 24, 20)


@pytest.mark.parametrize("kwargs, message", [
    ({"seed": -1}, "seed"), ({"index": 1.5}, "index"), ({"shape": 4}, "shape"), ({"shape": (32, 32)}, "shape")])
def test_phantom_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.head_phantom(**kwargs)


def test_phantom_anatomy_is_plausible(heads):
    volumes, labels = heads
    truth = torch.stack([torch.bincount(lab.reshape(-1), minlength=5).double() / lab.numel() for lab in labels])
    # The head fills a good part of the field of view; bone and brain dominate it; ventricles and lesions are small.
    assert ((truth[:, BACKGROUND] > 0.55) & (truth[:, BACKGROUND] < 0.85)).all()
    assert ((truth[:, BONE] > 0.06) & (truth[:, BONE] < 0.2)).all()
    assert ((truth[:, BRAIN] > 0.1) & (truth[:, BRAIN] < 0.3)).all()
    assert ((truth[:, CSF] > 0.001) & (truth[:, CSF] < 0.02)).all()
    assert ((truth[:, LESION] > 0.0005) & (truth[:, LESION] < 0.03)).all()
    # The head stays inside the field of view and its parts nest: bone around brain around ventricles.
    border = torch.ones(32, 32, 32, dtype=torch.bool)
    border[1:-1, 1:-1, 1:-1] = False
    assert all(int((lab[border] != BACKGROUND).sum()) < 20 for lab in labels)
    for lab in labels:
        brain_like = (lab == BRAIN) | (lab == CSF) | (lab == LESION)
        filled = torch.from_numpy(ndimage.binary_fill_holes((lab == BONE).numpy()))
        assert bool(filled[brain_like].all())
    # Anatomy varies between phantoms.
    assert float(truth[:, BRAIN].std()) > 0.005 and len({int((lab == LESION).sum()) for lab in labels}) > 5


def test_intensity_classes_recover_the_labels(heads):
    volumes, labels = heads
    estimated = data.tissue_fractions(volumes)
    truth = torch.stack([torch.bincount(lab.reshape(-1), minlength=5).double() / lab.numel() for lab in labels])
    assert estimated.shape == (10, 5)
    torch.testing.assert_close(estimated.sum(1), torch.ones(10, dtype=torch.float64))
    # Only partial-volume edge voxels can land in another class.
    assert float((estimated - truth).abs().max()) < 0.012
    agreement = (data.tissue_labels(volumes) == labels).double().mean()
    assert float(agreement) > 0.97


# --- statistics ----------------------------------------------------------------------------------------------

def test_tissue_fractions_input_forms():
    v = data.head_phantom(1, 0)
    one = data.tissue_fractions(v)
    assert one.shape == (1, 5)
    torch.testing.assert_close(data.tissue_fractions(v[0]), one)
    torch.testing.assert_close(data.tissue_fractions(v[None]), one)
    with pytest.raises(ValueError, match="one channel"):
        data.tissue_fractions(torch.zeros(2, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="4-D input"):
        data.tissue_fractions(torch.zeros(3, 8, 8, 8))
    labels = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]).reshape(1, 1, 5)
    assert data.tissue_labels(labels).reshape(-1).tolist() == [BACKGROUND, BONE, BRAIN, LESION, CSF]


def test_histogram_distance_known_values(heads):
    volumes, _ = heads
    assert data.intensity_histogram_distance(volumes, volumes) == 0.0
    # Point masses at -0.5 and 0.5: Wasserstein-1 = 1 (to within a bin width).
    a, b = torch.full((100,), -0.5), torch.full((50,), 0.5)
    assert data.intensity_histogram_distance(a, b, bins=200) == pytest.approx(1.0, abs=0.011)
    assert data.intensity_histogram_distance(a, b) == data.intensity_histogram_distance(b, a)
    with pytest.raises(ValueError, match="NaN"):
        data.intensity_histogram_distance(torch.tensor([float("nan")]), a)


def test_statistics_separate_phantoms_from_noise(heads):
    volumes, _ = heads
    fresh = data.phantoms(4, seed=9)
    noise = torch.rand(3, 1, 32, 32, 32) * 2 - 1
    between_phantoms = data.intensity_histogram_distance(volumes, fresh)
    to_noise = data.intensity_histogram_distance(fresh, noise)
    assert between_phantoms < 0.02 < 0.3 < to_noise

    stats = data.component_statistics(volumes)
    counts, largest = stats["counts"], stats["largest_fraction"]
    # One air region, one skull shell, one brain; ventricles (1-2) and lesions (1-4, some merge or touch).
    assert (counts[:, [BACKGROUND, BONE, BRAIN]] == 1).all()
    assert ((counts[:, CSF] >= 1) & (counts[:, CSF] <= 3)).all()
    assert ((counts[:, LESION] >= 1) & (counts[:, LESION] <= 6)).all()
    assert (largest[:, [BACKGROUND, BONE, BRAIN]] > 0.99).all()
    noisy = data.component_statistics(noise)
    assert (noisy["counts"][:, [BONE, BRAIN, LESION, CSF]] > 100).all()
    assert (noisy["largest_fraction"][:, [BONE, BRAIN, LESION, CSF]] < 0.2).all()


@pytest.mark.parametrize("shape, density", [((3, 12, 13, 14), 0.5), ((2, 9, 1, 17), 0.6), ((1, 6, 6, 6), 0.0),
                                            ((1, 5, 6, 7), 1.0), ((4, 10, 10, 10), 0.3)])
def test_connected_components_match_scipy(shape, density):
    generator = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=generator) < density
    labels, sizes = data.connected_components(mask)
    assert labels.shape == mask.shape and len(sizes) == shape[0]
    for b in range(shape[0]):
        reference, count = ndimage.label(mask[b].numpy())  # 6-connectivity, numbered in scan order
        np.testing.assert_array_equal(labels[b].numpy(), reference)
        assert sizes[b].tolist() == np.bincount(reference.reshape(-1), minlength=count + 1)[1:].tolist()


def test_connected_components_long_snake():
    """A one-voxel-wide path winding through the volume: the worst case for label propagation."""
    mask = torch.zeros(9, 9, 9, dtype=torch.bool)
    mask[::2] = True  # slabs at x = 0, 2, 4, 6, 8 ...
    for x in range(1, 9, 2):  # ... joined alternately at one corner or the opposite one
        mask[x, 0 if x % 4 == 1 else 8, 0 if x % 4 == 1 else 8] = True
    labels, sizes = data.connected_components(mask)
    assert sizes[0].tolist() == [int(mask.sum())] and int(labels.max()) == 1
    with pytest.raises(TypeError, match="bool"):
        data.connected_components(mask.int())

"""Data registry: every dataset yields images of the model's input shape, in [0, 1]."""

from __future__ import annotations

import pytest
import torch

from rcomp.data.adapt import adapt_images
from rcomp.data.registry import check_fits, get_dataset, make_loader
from rcomp.errors import RcompError
from rcomp.spec import InputSpec


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 28, 28)])
def test_digits_adapts_and_stays_in_range(shape):
    spec = InputSpec(*shape, mean=[0.0] * shape[0], std=[1.0] * shape[0])
    train, test = get_dataset("digits", "train", spec), get_dataset("digits", "test", spec)
    assert len(train) + len(test) == 1797 and len(test) == 360
    x, y = next(iter(make_loader(test, 64)))
    assert x.shape == (64, *shape) and x.min() >= 0 and x.max() <= 1
    assert y.min() >= 0 and y.max() <= 9
    # the split is fixed: the same images every time
    assert torch.equal(get_dataset("digits", "test", spec)[5][0], test[5][0])


def test_adapt_grey_rgb_round_trip():
    x = torch.rand(2, 1, 8, 8)
    rgb = adapt_images(x, InputSpec(3, 8, 8))
    assert rgb.shape == (2, 3, 8, 8) and torch.equal(rgb[:, 0], rgb[:, 2])
    back = adapt_images(rgb, InputSpec(1, 8, 8, mean=[0.0], std=[1.0]))
    assert torch.allclose(back, x, atol=1e-6)


def test_fake_is_deterministic_and_learnable_shape():
    spec = InputSpec(3, 16, 16)
    a = get_dataset("fake", "test", spec, fake_size=50)
    b = get_dataset("fake", "test", spec, fake_size=50)
    assert len(a) == 50
    assert torch.equal(a[7][0], b[7][0]) and a[7][1] == b[7][1]
    assert 0 <= a[7][0].min() and a[7][0].max() <= 1


def test_missing_torchvision_dataset_names_the_files(tmp_path):
    with pytest.raises(RcompError, match="cifar-10-batches-py"):
        get_dataset("cifar10", "test", InputSpec(3, 32, 32), data_dir=tmp_path)
    with pytest.raises(RcompError, match="MNIST/raw"):
        get_dataset("mnist", "test", InputSpec(1, 28, 28, mean=[0.0], std=[1.0]), data_dir=tmp_path)


def test_unknown_dataset_and_split():
    with pytest.raises(RcompError, match="did you mean digits"):
        get_dataset("digit", "test", InputSpec(1, 8, 8, mean=[0.0], std=[1.0]))
    with pytest.raises(RcompError, match="split"):
        get_dataset("digits", "val", InputSpec(1, 8, 8, mean=[0.0], std=[1.0]))


def test_class_count_must_fit():
    ds = get_dataset("digits", "test", InputSpec(1, 8, 8, mean=[0.0], std=[1.0]))
    check_fits(ds, 10, "digits")
    with pytest.raises(RcompError, match="10 classes"):
        check_fits(ds, 5, "digits")


def test_imagefolder_reads_and_names_corrupt_file(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (10, 12), color=(i * 100, 50, 200)).save(tmp_path / cls / f"{i}.png")
    ds = get_dataset("imagefolder", "test", InputSpec(3, 8, 8), data_dir=tmp_path)
    assert len(ds) == 4 and ds.num_classes == 2
    x, y = ds[3]
    assert x.shape == (3, 8, 8) and y == 1 and 0 <= x.min() and x.max() <= 1
    (tmp_path / "dog" / "1.png").write_bytes(b"not a png")
    with pytest.raises(RcompError, match="1.png"):
        ds[3]

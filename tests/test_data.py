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
    assert len(ds) == 2 and ds.num_classes == 2  # no train/ and test/: one image per class held out
    x, y = ds[1]
    assert x.shape == (3, 8, 8) and y == 1 and 0 <= x.min() and x.max() <= 1
    ds.samples[1][0].write_bytes(b"not a png")
    with pytest.raises(RcompError, match=ds.samples[1][0].name):
        ds[1]


# ----------------------------------------------------------------------------- image folders (issues 15, 16)


def _folder(root, size=(12, 10), mode="RGB", per_class=5, classes=("cat", "dog")):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new(mode, size, color=(i * 40, 50, 200) if mode == "RGB" else i * 40).save(root / c / f"{i}.png")
    return root


def test_native_shape_is_the_images_own(tmp_path):
    from rcomp.data.registry import native_shape

    _folder(tmp_path / "rgb", size=(32, 24))
    shape, note = native_shape("imagefolder", tmp_path / "rgb")
    assert shape == (3, 24, 32) and "3x24x32" in note and "own size" in note
    _folder(tmp_path / "grey", size=(8, 8), mode="L")
    assert native_shape("imagefolder", tmp_path / "grey")[0] == (1, 8, 8)
    assert native_shape("digits")[0] == (1, 8, 8)


def test_native_shape_takes_most_common_size_and_says_so(tmp_path):
    from PIL import Image

    from rcomp.data.registry import native_shape

    _folder(tmp_path, size=(16, 16))
    Image.new("RGB", (20, 30)).save(tmp_path / "cat" / "odd.png")
    shape, note = native_shape("imagefolder", tmp_path)
    assert shape == (3, 16, 16) and "most common" in note and "10 of 11" in note


def test_folder_without_split_gets_seeded_held_out_test(tmp_path):
    _folder(tmp_path, per_class=10)
    notes = []
    spec = InputSpec(3, 8, 8)
    train = get_dataset("imagefolder", "train", spec, data_dir=tmp_path, log=notes.append)
    test = get_dataset("imagefolder", "test", spec, data_dir=tmp_path, log=notes.append, seed=7)
    assert len(train) == 16 and len(test) == 4
    assert not {str(p) for p, _ in train.samples} & {str(p) for p, _ in test.samples}
    assert {y for _, y in test.samples} == {0, 1}  # every class is held out
    assert "held-out 20%" in notes[0] and "test: 4 of 20" in notes[1]
    again = get_dataset("imagefolder", "test", spec, data_dir=tmp_path)  # another run seed: same split
    assert again.samples == test.samples


def test_folder_with_train_and_test_uses_them(tmp_path):
    _folder(tmp_path / "train", per_class=3)
    _folder(tmp_path / "test", per_class=2)
    notes = []
    assert len(get_dataset("imagefolder", "test", InputSpec(3, 8, 8), data_dir=tmp_path, log=notes.append)) == 4
    assert notes == []


def test_missing_dataset_says_where_files_go_and_where_archives_are(tmp_path):
    with pytest.raises(RcompError) as err:
        get_dataset("cifar10", "test", InputSpec(3, 32, 32), data_dir=tmp_path)
    msg = str(err.value)
    assert "download=True" not in msg and "\n" not in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg and str(tmp_path) in msg


def test_decompression_bomb_refused_from_header(tmp_path):
    """A small PNG claiming 12000x12000 pixels is refused before decoding, naming the file."""
    import tracemalloc

    from PIL import Image

    _folder(tmp_path, per_class=1)
    Image.new("L", (12000, 12000)).save(tmp_path / "cat" / "bomb.png")  # about 140 KB on disk
    assert (tmp_path / "cat" / "bomb.png").stat().st_size < 1_000_000
    from rcomp.data.sources import ImageFiles

    ds = ImageFiles([(tmp_path / "cat" / "bomb.png", 0)], InputSpec(3, 8, 8), ("cat", "dog"))
    tracemalloc.start()
    with pytest.raises(RcompError, match=r"bomb\.png is 12000x12000 pixels"):
        ds[0]
    assert tracemalloc.get_traced_memory()[1] < 50_000_000
    tracemalloc.stop()


def test_symlink_loop_in_image_folder_refused(tmp_path):
    _folder(tmp_path)
    (tmp_path / "cat" / "loop").symlink_to(tmp_path / "cat")
    with pytest.raises(RcompError, match="symlink loop"):
        get_dataset("imagefolder", "train", InputSpec(3, 8, 8), data_dir=tmp_path)
    (tmp_path / "cat" / "loop").unlink()
    (tmp_path / "cat" / "self.png").symlink_to(tmp_path / "cat" / "self.png")
    with pytest.raises(RcompError, match="self.png"):
        get_dataset("imagefolder", "train", InputSpec(3, 8, 8), data_dir=tmp_path)


def test_non_regular_file_refused(tmp_path):
    import os

    _folder(tmp_path)
    os.mkfifo(tmp_path / "dog" / "pipe.png")
    with pytest.raises(RcompError, match="pipe.png is not a regular file"):
        get_dataset("imagefolder", "train", InputSpec(3, 8, 8), data_dir=tmp_path)


def test_pil_warnings_do_not_leak(tmp_path, monkeypatch, recwarn):
    import warnings

    from PIL import Image

    _folder(tmp_path, size=(8, 7), per_class=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 56-pixel images now make PIL warn (bomb warning)
    with pytest.warns(Image.DecompressionBombWarning):  # the test can fail: PIL does warn here
        Image.open(tmp_path / "cat" / "0.png").close()
    warnings.resetwarnings()
    recwarn.clear()
    ds = get_dataset("imagefolder", "train", InputSpec(3, 8, 8), data_dir=tmp_path)
    for i in range(len(ds)):
        ds[i]
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_huge_input_spec_adapts_digits_image_by_image():
    """A file recording 3x8192x8192 made digits allocate 290 GB for the whole split before -n was applied."""
    ds = get_dataset("digits", "test", InputSpec(1, 1024, 1024))  # 360 x 4 MB adapted: above the eager limit
    assert ds.spec is not None and ds.images.shape[-2:] == (8, 8)
    x, y = ds[5]
    assert x.shape == (1, 1024, 1024) and 0 <= float(x.min()) <= float(x.max()) <= 1
    sub = ds.subset([5, 7])
    assert torch.equal(sub[0][0], x) and int(sub[0][1]) == int(y)


def test_image_by_image_adaptation_equals_the_eager_one(monkeypatch):
    import rcomp.data.sources as S

    eager = get_dataset("digits", "test", InputSpec(3, 20, 20))
    monkeypatch.setattr(S, "EAGER_BYTES", 0)
    lazy = get_dataset("digits", "test", InputSpec(3, 20, 20))
    assert eager.spec is None and lazy.spec is not None
    for i in (0, 17, 359):
        assert torch.equal(eager[i][0], lazy[i][0]) and int(eager[i][1]) == int(lazy[i][1])
    assert torch.equal(next(iter(make_loader(lazy, 64)))[0], next(iter(make_loader(eager, 64)))[0])

"""The datasets, listed once (no torch): name, loader, help, paper, and the facts commands need
before loading anything (classes, native shape, mean and std, class names).

An entry's ``ref`` names ``load(entry, train, spec, root, *, seed, fake_size, log) -> Dataset``
(items ``(image in [0, 1] adapted to spec, label)``, the dataset has ``num_classes``); ``extra``
holds ``num_classes``, ``shape`` (C, H, W), ``mean``, ``std``, ``classes`` and, for files the
user provides, ``missing``: where to put them; ``augment``: (padding of random crops in pixels,
horizontal flips) when training, and ``augment_default``: augmented unless --no-augment. Installed packages add datasets through the
``rcomp.datasets`` entry-point group (see :mod:`rcomp.catalog`).
"""

from __future__ import annotations

from rcomp.catalog import Catalogue, Entry

_TEN = tuple(str(i) for i in range(10))
_TV = "rcomp.data.sources:load_torchvision"
_MNIST_FILES = ("train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, "
                "gunzipped")

DATASETS = Catalogue("dataset", [
    Entry("digits", "rcomp.data.sources:load_sklearn_digits",
          "scikit-learn's 8x8 handwritten digits, bundled, offline (1797 images)", "Alpaydin and Kaynak 1998",
          extra={"augment": (1, False), "num_classes": 10, "shape": (1, 8, 8), "mean": (0.3051,), "std": (0.3789,), "classes": _TEN}),
    Entry("mnist", _TV, "MNIST via torchvision, local files", "LeCun et al. 1998",
          extra={"augment": (2, False), "num_classes": 10, "shape": (1, 28, 28), "mean": (0.1307,), "std": (0.3081,), "classes": _TEN,
                 "torchvision": "MNIST",
                 "missing": f"put MNIST's four raw files ({_MNIST_FILES}) in {{root}}/MNIST/raw/; the archives are at "
                            "https://ossci-datasets.s3.amazonaws.com/mnist/ (mirror of http://yann.lecun.com/exdb/mnist/)"}),
    Entry("fashion-mnist", _TV, "Fashion-MNIST via torchvision, local files", "Xiao et al. 2017",
          extra={"augment": (2, True), "num_classes": 10, "shape": (1, 28, 28), "mean": (0.2860,), "std": (0.3530,),
                 "classes": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                             "Bag", "Ankle boot"),
                 "torchvision": "FashionMNIST",
                 "missing": f"put Fashion-MNIST's four raw files ({_MNIST_FILES}) in {{root}}/FashionMNIST/raw/; "
                            "the archives are at http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}),
    Entry("cifar10", _TV, "CIFAR-10 via torchvision, local files", "Krizhevsky 2009",
          extra={"augment": (4, True), "augment_default": True, "num_classes": 10, "shape": (3, 32, 32), "mean": (0.4914, 0.4822, 0.4465),
                 "std": (0.2470, 0.2435, 0.2616),
                 "classes": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
                 "torchvision": "CIFAR10",
                 "missing": "extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) "
                            "in {root} so that {root}/cifar-10-batches-py/ exists"}),
    Entry("cifar100", _TV, "CIFAR-100 via torchvision, local files", "Krizhevsky 2009",
          extra={"augment": (4, True), "augment_default": True, "num_classes": 100, "shape": (3, 32, 32), "mean": (0.5071, 0.4865, 0.4409),
                 "std": (0.2673, 0.2564, 0.2762), "torchvision": "CIFAR100",
                 "missing": "extract cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz) "
                            "in {root} so that {root}/cifar-100-python/ exists"}),
    Entry("svhn", _TV, "SVHN via torchvision, local files", "Netzer et al. 2011",
          extra={"augment": (4, False), "augment_default": True, "num_classes": 10, "shape": (3, 32, 32), "mean": (0.4377, 0.4438, 0.4728),
                 "std": (0.1980, 0.2010, 0.1970), "classes": _TEN, "torchvision": "SVHN", "split_arg": True,
                 "missing": "put train_32x32.mat and test_32x32.mat (from http://ufldl.stanford.edu/housenumbers/) "
                            "in {root}/"}),
    Entry("imagefolder", "rcomp.data.sources:load_folder",
          "class sub-folders under --data-dir (DIR/train and DIR/test, else a held-out 20%); the images' own shape",
          "", extra={"augment": (0, True), "num_classes": 0, "shape": (3, 224, 224), "mean": (0.485, 0.456, 0.406),
                     "std": (0.229, 0.224, 0.225), "native_shape": "rcomp.data.images:native_shape"}),
    Entry("fake", "rcomp.data.sources:load_fake",
          "synthetic images with a class-dependent pattern (2,000 train, 10,000 test; smoke tests)", "",
          extra={"augment": (2, True), "num_classes": 10, "shape": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                 "sizes": (2000, 10000)}),
], group="rcomp.datasets", flag="--data", listing="rcomp info --datasets")

"""Image datasets, loaded into memory as uint8 tensors (N, C, H, W) with int64 labels.

Every loader looks for a local copy under `data_dir` first, in the layouts that torchvision,
the original distributions and the offline copies in `shared/data` use; with `download=True`
torchvision fetches what is missing. Models see images as float tensors in [0, 1].
"""

from __future__ import annotations

import functools
import gzip
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedsim.errors import FedsimError

SAMPLE_DIR = Path(__file__).parent / "data"


@dataclass
class ImageDataset:
    """A train and a test split of labelled images, all in memory."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def resized(self, size: int) -> ImageDataset:
        """The same dataset with square images of `size` pixels (bilinear, antialiased)."""
        if size == 0 or self.input_shape[1:] == (size, size):
            return self

        def resize(x: torch.Tensor) -> torch.Tensor:
            out = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            return out.round().clamp(0, 255).to(torch.uint8)

        return ImageDataset(
            self.name,
            resize(self.train_x),
            self.train_y,
            resize(self.test_x),
            self.test_y,
            self.classes,
            [*self.notes, f"resized to {size}x{size}"],
        )


def split_classes(data: ImageDataset, public: list[int]) -> tuple[ImageDataset, ImageDataset]:
    """(public, private): the images of the `public` classes and those of the others, each relabelled 0.. in order.

    Both splits keep their train/test division; no image is in both (the classes are disjoint).
    """
    if not public or min(public) < 0 or max(public) >= data.num_classes:
        raise FedsimError(
            f"public-classes must be labels in 0..{data.num_classes - 1}: {data.name} has {data.num_classes} classes"
        )
    private = [c for c in range(data.num_classes) if c not in set(public)]
    if len(private) < 2:
        raise FedsimError(
            f"public-classes leaves {len(private)} of {data.name}'s {data.num_classes} classes private; "
            "the clients need at least 2"
        )

    def part(classes: list[int], what: str) -> ImageDataset:
        relabel = torch.full((data.num_classes,), -1, dtype=torch.long)
        relabel[classes] = torch.arange(len(classes))
        keep_train, keep_test = relabel[data.train_y] >= 0, relabel[data.test_y] >= 0
        return ImageDataset(
            f"{data.name}[{what}]",
            data.train_x[keep_train],
            relabel[data.train_y[keep_train]],
            data.test_x[keep_test],
            relabel[data.test_y[keep_test]],
            [data.classes[c] for c in classes],
            [*data.notes, f"{what}: classes {', '.join(map(str, classes))} of {data.name}, relabelled from 0"],
        )

    return part(sorted(public), "public"), part(private, "private")


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images to the float [0, 1] tensors every model takes."""
    return x.float().div_(255.0)


def _from_hwc(x: np.ndarray) -> torch.Tensor:
    x = np.asarray(x, dtype=np.uint8)
    if x.ndim == 3:  # grey images without a channel axis
        x = x[..., None]
    return torch.tensor(x.transpose(0, 3, 1, 2)).contiguous()


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(y).astype(np.int64))


def _missing(name: str, data_dir: Path, expected: str, downloadable: bool) -> FedsimError:
    how = (
        "run with --download (needs internet) or point --data-dir at a folder that holds it"
        if downloadable
        else "point --data-dir at a folder that holds it"
    )
    return FedsimError(f"dataset {name!r} not found under {data_dir}: expected {expected}; {how}")


# --- shipped samples ---------------------------------------------------------------------


def _sample_file(file: str) -> Path:
    """A shipped sample. A Flower App Bundle carries only text files, so when this copy of fedsim
    came from one (`flwr run`), the installed fedsim's copy of the sample is used."""
    for folder in (SAMPLE_DIR, *(Path(p) / "fedsim" / "data" for p in sys.path if p)):
        if (folder / file).is_file():
            return folder / file
    raise FedsimError(f"the shipped sample {file} is missing; reinstall fedsim (pip install -e .)")


def _load_sample(name: str, file: str) -> ImageDataset:
    with np.load(_sample_file(file), allow_pickle=False) as data:
        return ImageDataset(
            name,
            _from_hwc(data["train_x"]),
            _labels(data["train_y"]),
            _from_hwc(data["test_x"]),
            _labels(data["test_y"]),
            [str(c) for c in data["class_names"]],
            [f"shipped sample {file} (see fedsim/data/README.md)"],
        )


# --- MNIST and Fashion-MNIST -------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _load_idx_dataset(
    name: str, data_dir: Path, subdirs: list[str], tv_class: str, download: bool, classes: list[str]
) -> ImageDataset:
    folders = [data_dir, *(data_dir / s for s in subdirs), data_dir / tv_class / "raw"]
    test_x, test_y = _find_idx(folders, "t10k-images-idx3-ubyte"), _find_idx(folders, "t10k-labels-idx1-ubyte")
    train_x, train_y = _find_idx(folders, "train-images-idx3-ubyte"), _find_idx(folders, "train-labels-idx1-ubyte")
    if (test_x is None or test_y is None) and download:
        import torchvision

        getattr(torchvision.datasets, tv_class)(str(data_dir), train=True, download=True)
        getattr(torchvision.datasets, tv_class)(str(data_dir), train=False, download=True)
        return _load_idx_dataset(name, data_dir, subdirs, tv_class, False, classes)
    if test_x is None or test_y is None:
        raise _missing(name, data_dir, "t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz)", True)
    tx, ty = _read_idx(test_x), _read_idx(test_y)
    if train_x is not None and train_y is not None:
        return ImageDataset(
            name, _from_hwc(_read_idx(train_x)), _labels(_read_idx(train_y)), _from_hwc(tx), _labels(ty), classes
        )
    # Only the official test split is here: keep its first 80 % for the clients, the rest for testing.
    cut = len(tx) * 4 // 5
    return ImageDataset(
        name,
        _from_hwc(tx[:cut]),
        _labels(ty[:cut]),
        _from_hwc(tx[cut:]),
        _labels(ty[cut:]),
        classes,
        [
            f"only the test split was found in {test_x.parent}: its first {cut} images train the "
            f"clients, the last {len(tx) - cut} test the global model"
        ],
    )


def load_mnist(data_dir: Path, download: bool) -> ImageDataset:
    return _load_idx_dataset("mnist", data_dir, ["mnist", "MNIST"], "MNIST", download, [str(i) for i in range(10)])


FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def load_fashion_mnist(data_dir: Path, download: bool) -> ImageDataset:
    return _load_idx_dataset(
        "fashion-mnist",
        data_dir,
        ["fashion_mnist", "fashion-mnist", "FashionMNIST"],
        "FashionMNIST",
        download,
        FASHION_CLASSES,
    )


# --- CIFAR -------------------------------------------------------------------------------


def _load_torchvision_cifar(name: str, tv_class: str, data_dir: Path, download: bool) -> ImageDataset:
    import torchvision

    cls = getattr(torchvision.datasets, tv_class)
    train = cls(str(data_dir), train=True, download=download)
    test = cls(str(data_dir), train=False, download=download)
    return ImageDataset(
        name,
        _from_hwc(train.data),
        _labels(train.targets),
        _from_hwc(test.data),
        _labels(test.targets),
        list(train.classes),
    )


def load_cifar10(data_dir: Path, download: bool) -> ImageDataset:
    if (data_dir / "cifar-10-batches-py").is_dir() or download:
        return _load_torchvision_cifar("cifar10", "CIFAR10", data_dir, download)
    # The offline copy: a lossless train sample and a JPEG-recompressed test set, as .npz.
    for folder in (data_dir, data_dir / "cifar10"):
        trains, tests = sorted(folder.glob("cifar10_train*.npz")), sorted(folder.glob("cifar10_test*.npz"))
        if trains and tests:
            with np.load(trains[0], allow_pickle=False) as tr, np.load(tests[0], allow_pickle=False) as te:
                return ImageDataset(
                    "cifar10",
                    _from_hwc(tr["x"]),
                    _labels(tr["y"]),
                    _from_hwc(te["x"]),
                    _labels(te["y"]),
                    [str(c) for c in tr["class_names"]],
                    [f"offline copy: train from {trains[0].name}, test from {tests[0].name}"],
                )
    raise _missing(
        "cifar10", data_dir, "cifar-10-batches-py/ (torchvision) or cifar10_train*.npz + cifar10_test*.npz", True
    )


def load_cifar100(data_dir: Path, download: bool) -> ImageDataset:
    if not (data_dir / "cifar-100-python").is_dir() and not download:
        raise _missing("cifar100", data_dir, "cifar-100-python/ (torchvision's layout)", True)
    return _load_torchvision_cifar("cifar100", "CIFAR100", data_dir, download)


# --- faces -------------------------------------------------------------------------------


def _split_per_class(x: torch.Tensor, y: torch.Tensor, test_every: int) -> tuple[torch.Tensor, ...]:
    """A deterministic stratified split: every `test_every`-th image of each class goes to the test split."""
    rank = torch.zeros_like(y)
    for c in y.unique():
        members = (y == c).nonzero().flatten()
        rank[members] = torch.arange(len(members))
    test = (rank % test_every) == (test_every - 1)
    return x[~test], y[~test], x[test], y[test]


def load_olivetti(data_dir: Path, download: bool) -> ImageDataset:
    for candidate in (data_dir / "olivettifaces.mat", data_dir / "olivetti_faces" / "olivettifaces.mat"):
        if candidate.is_file():
            from scipy.io import loadmat

            faces = loadmat(candidate)["faces"]
            images = faces.T.reshape(400, 64, 64).transpose(0, 2, 1)
            x, y = _from_hwc(images), torch.arange(400) // 10
            tr_x, tr_y, te_x, te_y = _split_per_class(x, y, 5)
            return ImageDataset(
                "olivetti",
                tr_x,
                tr_y,
                te_x,
                te_y,
                [f"subject {i + 1}" for i in range(40)],
                ["8 images per subject train, 2 test"],
            )
    raise _missing("olivetti", data_dir, "olivettifaces.mat (Roweis' 64x64 version)", False)


def load_orl(data_dir: Path, download: bool) -> ImageDataset:
    from PIL import Image

    for root in (data_dir, data_dir / "orl_faces", data_dir / "att_faces"):
        subjects = sorted(
            (p for p in root.glob("s*") if p.is_dir() and p.name[1:].isdigit()), key=lambda p: int(p.name[1:])
        )
        if subjects:
            images, labels = [], []
            for label, folder in enumerate(subjects):
                for pgm in sorted(folder.glob("*.pgm"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0):
                    images.append(np.asarray(Image.open(pgm).convert("L")))
                    labels.append(label)
            x, y = _from_hwc(np.stack(images)), torch.tensor(labels)
            tr_x, tr_y, te_x, te_y = _split_per_class(x, y, 5)
            return ImageDataset(
                "orl", tr_x, tr_y, te_x, te_y, [p.name for p in subjects], ["8 images per subject train, 2 test"]
            )
    raise _missing("orl", data_dir, "the ORL folders s1/ ... s40/ of .pgm files", False)


def load_lfw(data_dir: Path, download: bool) -> ImageDataset:
    import torchvision

    try:
        train = torchvision.datasets.LFWPeople(str(data_dir), split="train", download=download)
        test = torchvision.datasets.LFWPeople(str(data_dir), split="test", download=download)
    except RuntimeError:
        raise _missing("lfw", data_dir, "lfw-py/ (torchvision's LFWPeople layout)", True) from None

    def load(ds: torchvision.datasets.LFWPeople) -> tuple[torch.Tensor, torch.Tensor]:
        arrays = [np.asarray(ds._loader(path)) for path in ds.data]
        return _from_hwc(np.stack(arrays)), _labels(ds.targets)

    tr_x, tr_y = load(train)
    te_x, te_y = load(test)
    names = sorted(train.class_to_idx, key=train.class_to_idx.get)
    return ImageDataset("lfw", tr_x, tr_y, te_x, te_y, names)


def load_image_folder(data_dir: Path, download: bool, size: int = 32) -> ImageDataset:
    """The user's own photos: one sub-folder per class, as torchvision's ImageFolder reads them."""
    import torchvision

    if not data_dir.is_dir():
        raise FedsimError(
            f"image folder {data_dir} does not exist; point --data-dir at a folder with one "
            "sub-folder of images per class"
        )
    try:
        folder = torchvision.datasets.ImageFolder(str(data_dir))
    except (FileNotFoundError, RuntimeError) as exc:
        raise FedsimError(
            f"cannot read {data_dir} as an image folder ({exc}); it needs one sub-folder of images per class"
        ) from None
    if len(folder.classes) < 2:
        raise FedsimError(
            f"image folder {data_dir} holds {len(folder.classes)} class ({', '.join(folder.classes)}); a classifier "
            "needs at least 2: one sub-folder of images per class"
        )
    side = size or 32
    images = []
    for path, _ in folder.samples:
        try:
            image = folder.loader(path).convert("RGB").resize((side, side))
        except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for corrupt and truncated files
            raise FedsimError(f"image {path} cannot be read ({exc}); remove or replace it") from None
        images.append(np.asarray(image))
    x, y = _from_hwc(np.stack(images)), _labels([t for _, t in folder.samples])
    tr_x, tr_y, te_x, te_y = _split_per_class(x, y, 5)
    split = (
        "every 5th image of each class tests the global model"
        if len(te_x)
        else "no class has 5 images, so there is no test split: the global model's accuracy is not measured"
    )
    return ImageDataset(
        "imagefolder",
        tr_x,
        tr_y,
        te_x,
        te_y,
        list(folder.classes),
        [f"{len(folder.samples)} images from {data_dir}, resized to {side}x{side}; {split}"],
    )


LOADERS: dict[str, Callable[[Path, bool], ImageDataset]] = {
    "sample-mnist": lambda _d, _dl: _load_sample("sample-mnist", "sample_mnist.npz"),
    "sample-cifar10": lambda _d, _dl: _load_sample("sample-cifar10", "sample_cifar10.npz"),
    "sample-fashion-mnist": lambda _d, _dl: _load_sample("sample-fashion-mnist", "sample_fashion_mnist.npz"),
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "lfw": load_lfw,
    "olivetti": load_olivetti,
    "orl": load_orl,
    "imagefolder": load_image_folder,
}

DESCRIPTIONS = {
    "sample-mnist": "3,000 real MNIST digits shipped with fedsim (offline default)",
    "sample-cifar10": "200 lossless CIFAR-10 training images + 500 test images, shipped (offline)",
    "sample-fashion-mnist": "1,000 real Fashion-MNIST images shipped with fedsim (offline; public data for TL-DMI)",
    "mnist": "MNIST (torchvision layout, or the raw idx files)",
    "fashion-mnist": "Fashion-MNIST (torchvision layout, or the raw idx files)",
    "cifar10": "CIFAR-10 (torchvision layout, or the offline .npz copies)",
    "cifar100": "CIFAR-100 (torchvision layout)",
    "lfw": "Labeled Faces in the Wild, people split (torchvision)",
    "olivetti": "Olivetti faces, 40 subjects x 10 images, 64x64 (olivettifaces.mat)",
    "orl": "AT&T/ORL faces, 40 subjects x 10 images, 112x92 (s1..s40 PGM folders)",
    "imagefolder": "your own photos: --data-dir with one sub-folder per class",
}


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, data_dir: str = "data", download: bool = False, image_size: int = 0) -> ImageDataset:
    """Load dataset `name`, cached per process (clients in one Ray actor share it)."""
    if name not in LOADERS:
        raise FedsimError(f"unknown dataset {name!r}; choose one of: {', '.join(LOADERS)}")
    path = Path(data_dir).expanduser()
    try:
        if name == "imagefolder":
            return load_image_folder(path, download, image_size)
        return LOADERS[name](path, download).resized(image_size)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:  # unreadable or corrupt files
        raise FedsimError(f"dataset {name!r} under {path} cannot be read: {exc}") from None

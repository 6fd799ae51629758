"""Rebuild the small real image samples shipped in fedsim/data/ from the verified offline copies.

Usage: python scripts/make_sample_data.py [SHARED_DATA_DIR]  (default: ../shared/data)
"""

import gzip
import sys
from pathlib import Path

import numpy as np

shared = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "data")
out = Path(__file__).resolve().parents[1] / "fedsim" / "data"


def idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def idx_sample(name: str, first: int, train: int, class_names: list[str]) -> None:
    """The first `first` test images of the IDX dataset in shared/<name>: `train` train the clients, the rest test."""
    images = idx(shared / name / "t10k-images-idx3-ubyte.gz")[:first]
    labels = idx(shared / name / "t10k-labels-idx1-ubyte.gz")[:first]
    np.savez_compressed(
        out / f"sample_{name}.npz",
        train_x=images[:train],
        train_y=labels[:train],
        test_x=images[train:],
        test_y=labels[train:],
        class_names=np.array(class_names),
    )


# MNIST: the first 3,000 test images; 2,400 train the clients, 600 measure the global model.
idx_sample("mnist", 3000, 2400, [str(i) for i in range(10)])

# Fashion-MNIST: the first 1,000 test images (800 / 200): public data for transfer learning (TL-DMI)
# next to the MNIST sample, and a second offline dataset for teaching.
fashion = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
idx_sample("fashion_mnist", 1000, 800, fashion)

# CIFAR-10: the 200 lossless training images (exact pixels: what the attacks are scored on)
# and the first 500 test images (JPEG q75, only used to measure accuracy).
train = np.load(shared / "cifar10" / "cifar10_train_first200_kaggle_png.npz", allow_pickle=False)
test = np.load(shared / "cifar10" / "cifar10_test_yoongikim_jpeg_q75.npz", allow_pickle=False)
np.savez_compressed(
    out / "sample_cifar10.npz",
    train_x=train["x"],
    train_y=train["y"],
    test_x=test["x"][:500],
    test_y=test["y"][:500],
    class_names=train["class_names"],
)
for f in sorted(out.glob("*.npz")):
    print(f.name, f.stat().st_size)

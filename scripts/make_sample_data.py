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


# MNIST: the first 3,000 test images; 2,400 train the clients, 600 measure the global model.
images = idx(shared / "mnist" / "t10k-images-idx3-ubyte.gz")[:3000]
labels = idx(shared / "mnist" / "t10k-labels-idx1-ubyte.gz")[:3000]
np.savez_compressed(
    out / "sample_mnist.npz",
    train_x=images[:2400],
    train_y=labels[:2400],
    test_x=images[2400:],
    test_y=labels[2400:],
    class_names=np.array([str(i) for i in range(10)]),
)

# Fashion-MNIST: the first 1,000 test images (800 / 200): public data for transfer learning (TL-DMI)
# next to the MNIST sample, and a second offline dataset for teaching.
images = idx(shared / "fashion_mnist" / "t10k-images-idx3-ubyte.gz")[:1000]
labels = idx(shared / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz")[:1000]
fashion = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
np.savez_compressed(
    out / "sample_fashion_mnist.npz",
    train_x=images[:800],
    train_y=labels[:800],
    test_x=images[800:],
    test_y=labels[800:],
    class_names=np.array(fashion),
)

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

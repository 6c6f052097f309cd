"""Writers of tiny datasets in the exact on-disk formats the real datasets ship in.

Each ``write_*(root)`` writes a few random images per class under ``root``, laid out as the
download unpacks, and returns the expected ``{"train": LabelledImages, "test": LabelledImages}``.
Labels are valid for the real dataset's class count.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct

import numpy as np

from ead_dist.data.formats import LabelledImages

MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck"]
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab",
    "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl",
    "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree",
    "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain",
    "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose",
    "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
]
CIFAR100_COARSE_CLASSES = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
]
SVHN_CLASSES = [str(d) for d in range(10)]


def _labels(rng: np.random.Generator, classes: list[int], per_class: int) -> np.ndarray:
    """``per_class`` samples of each of ``classes``, shuffled."""
    return rng.permutation(np.repeat(np.asarray(classes, np.int64), per_class))


def _pixels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------

def write_idx(root: str, layout: str = "torchvision", gz: bool = True,
              dataset: str = "mnist", seed: int = 0) -> dict[str, LabelledImages]:
    """IDX files as on yann.lecun.com / zalandoresearch, flat in ``root`` or in torchvision's
    ``root/MNIST/raw`` (``root/FashionMNIST/raw``) layout."""
    classes = {"mnist": MNIST_CLASSES, "fashion_mnist": FASHION_MNIST_CLASSES}[dataset]
    if layout == "torchvision":
        folder = os.path.join(root, {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[dataset],
                              "raw")
    elif layout == "flat":
        folder = root
    else:
        raise ValueError(f"unknown layout {layout!r}")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    expected = {}
    for split, prefix, per_class in (("train", "train", 3), ("test", "t10k", 2)):
        labels = _labels(rng, list(range(10)), per_class)
        images = _pixels(rng, (len(labels), 28, 28))
        _write_idx_file(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), 0x803, images, gz)
        _write_idx_file(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), 0x801,
                        labels.astype(np.uint8), gz)
        expected[split] = LabelledImages(images[..., None], labels, list(classes))
    return expected


def _write_idx_file(path: str, magic: int, array: np.ndarray, gz: bool) -> None:
    raw = idx_bytes(magic, array)
    if gz:
        with open(path + ".gz", "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as g:
            g.write(raw)
    else:
        with open(path, "wb") as f:
            f.write(raw)


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    """The bytes of one plain IDX file, for tests that corrupt them."""
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) \
        + array.astype(np.uint8).tobytes()


# --- CIFAR (Python 2 pickles) ---------------------------------------------------------------

class _Python2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes what Python 2's cPickle and numpy 1.x wrote.

    The real CIFAR batches were pickled by Python 2, where ``str`` is bytes: every string is a
    SHORT_BINSTRING/BINSTRING opcode (Python 3 would write ``_codecs.encode`` calls instead), and
    numpy arrays are rebuilt by ``numpy.core.multiarray._reconstruct``.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file):
        super().__init__(file, protocol=2)

    def _save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str

    def save_global(self, obj, name=None):
        if obj is np.empty(0).__reduce__()[0]:  # numpy's _reconstruct, under either module
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    dispatch[type(len)] = save_global  # builtin functions such as _reconstruct


def python2_pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer).dump(obj)
    return buffer.getvalue()


def _write_pickle(path: str, obj: object) -> None:
    with open(path, "wb") as f:
        f.write(python2_pickle(obj))


def _cifar_batch(rng, batch_label: str, labels: np.ndarray, labels_key: bytes,
                 extra: dict) -> tuple[dict, np.ndarray]:
    data = _pixels(rng, (len(labels), 3072))  # R plane, G plane, B plane, each 32x32 row-major
    filenames = [f"tiny_{i:05d}.png".encode() for i in range(len(labels))]
    batch = {b"batch_label": batch_label.encode(), labels_key: [int(v) for v in labels],
             b"data": data, b"filenames": filenames}
    batch.update(extra)
    return batch, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def write_cifar10(root: str, seed: int = 0) -> dict[str, LabelledImages]:
    """``root/cifar-10-batches-py/`` with data_batch_1..5, test_batch and batches.meta."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    _write_pickle(os.path.join(folder, "batches.meta"), {
        b"num_cases_per_batch": 10000,
        b"label_names": [n.encode() for n in CIFAR10_CLASSES],
        b"num_vis": 3072,
    })
    train_images, train_labels = [], []
    for i in range(1, 6):
        labels = _labels(rng, [0, 4, 9], 1)
        batch, images = _cifar_batch(rng, f"training batch {i} of 5", labels, b"labels", {})
        _write_pickle(os.path.join(folder, f"data_batch_{i}"), batch)
        train_images.append(images)
        train_labels.append(labels)
    labels = _labels(rng, list(range(10)), 1)
    batch, test_images = _cifar_batch(rng, "testing batch 1 of 1", labels, b"labels", {})
    _write_pickle(os.path.join(folder, "test_batch"), batch)
    return {
        "train": LabelledImages(np.concatenate(train_images), np.concatenate(train_labels),
                                list(CIFAR10_CLASSES)),
        "test": LabelledImages(test_images, labels, list(CIFAR10_CLASSES)),
    }


def write_cifar100(root: str, seed: int = 0) -> dict[str, LabelledImages]:
    """``root/cifar-100-python/`` with train, test and meta (fine and coarse label names)."""
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    _write_pickle(os.path.join(folder, "meta"), {
        b"fine_label_names": [n.encode() for n in CIFAR100_CLASSES],
        b"coarse_label_names": [n.encode() for n in CIFAR100_COARSE_CLASSES],
    })
    expected = {}
    for split, per_class in (("train", 4), ("test", 2)):
        labels = _labels(rng, [0, 57, 99], per_class)
        # The reader ignores coarse labels; these are placeholders, not the real fine->coarse map.
        coarse = {b"coarse_labels": [int(v) // 5 for v in labels]}
        batch_label = {"train": "training", "test": "testing"}[split] + " batch 1 of 1"
        batch, images = _cifar_batch(rng, batch_label, labels, b"fine_labels", coarse)
        _write_pickle(os.path.join(folder, split), batch)
        expected[split] = LabelledImages(images, labels, list(CIFAR100_CLASSES))
    return expected


# --- SVHN (MATLAB 5 files) ------------------------------------------------------------------

def write_svhn(root: str, seed: int = 0) -> dict[str, LabelledImages]:
    """``root/{train,test}_32x32.mat`` with X uint8 (32, 32, 3, N) and y uint8 (N, 1) in 1..10."""
    import scipy.io

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    expected = {}
    for split, per_class in (("train", 2), ("test", 1)):
        digits = _labels(rng, list(range(10)), per_class)
        images = _pixels(rng, (len(digits), 32, 32, 3))
        y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(os.path.join(root, f"{split}_32x32.mat"),
                         {"X": images.transpose(1, 2, 3, 0), "y": y}, format="5")
        expected[split] = LabelledImages(images, digits, list(SVHN_CLASSES))
    return expected


# --- Tiny-ImageNet (folder of JPEGs) --------------------------------------------------------

def write_tiny_imagenet(root: str, num_classes: int = 3, per_class: int = 2,
                        seed: int = 0) -> dict[str, LabelledImages]:
    """``root/tiny-imagenet-200/`` as unzipped: wnids.txt, words.txt, train/<wnid>/images and
    <wnid>_boxes.txt, val/images with val_annotations.txt, and unlabelled test/images.

    The last wnid has no entry in words.txt, so its class name is the wnid itself. JPEG is
    lossy, so expected pixels are what PIL decodes from the written files.
    """
    from PIL import Image

    base = os.path.join(root, "tiny-imagenet-200")
    rng = np.random.default_rng(seed)
    wnids = [f"n{int(v):08d}" for v in rng.choice(10**8, num_classes, replace=False)]
    with open(os.path.join(_mkdir(base), "wnids.txt"), "w") as f:
        f.writelines(w + "\n" for w in wnids)  # unsorted, like the real file
    names = {w: f"tiny class {i}, synthetic" for i, w in enumerate(wnids[:-1])}
    with open(os.path.join(base, "words.txt"), "w") as f:
        f.write("n00001740\tentity\n")  # the real words.txt covers all of WordNet
        f.writelines(f"{w}\t{names[w]}\n" for w in wnids[:-1])
    order = sorted(wnids)
    classes = [names.get(w, w) for w in order]

    def save(path: str) -> np.ndarray:
        Image.fromarray(_pixels(rng, (64, 64, 3))).save(path, "JPEG")
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))

    def box() -> str:
        x0, y0 = rng.integers(0, 32, 2)
        x1, y1 = rng.integers(32, 64, 2)
        return f"{x0}\t{y0}\t{x1}\t{y1}"

    train_images, train_labels = [], []
    for label, wnid in enumerate(order):
        folder = _mkdir(os.path.join(base, "train", wnid, "images"))
        lines = []
        for i in range(per_class):
            name = f"{wnid}_{i}.JPEG"
            train_images.append(save(os.path.join(folder, name)))
            train_labels.append(label)
            lines.append(f"{name}\t{box()}\n")
        with open(os.path.join(base, "train", wnid, f"{wnid}_boxes.txt"), "w") as f:
            f.writelines(lines)

    val_folder = _mkdir(os.path.join(base, "val", "images"))
    val_labels = _labels(rng, list(range(num_classes)), per_class)
    val_images, lines = [], []
    for i, label in enumerate(val_labels):
        name = f"val_{i}.JPEG"
        val_images.append(save(os.path.join(val_folder, name)))
        lines.append(f"{name}\t{order[label]}\t{box()}\n")
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        f.writelines(lines)

    test_folder = _mkdir(os.path.join(base, "test", "images"))
    for i in range(per_class):
        save(os.path.join(test_folder, f"test_{i}.JPEG"))

    return {
        "train": LabelledImages(np.stack(train_images), np.asarray(train_labels, np.int64),
                                classes),
        "test": LabelledImages(np.stack(val_images), val_labels, list(classes)),
    }


def _mkdir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def user_picture(pixels: np.ndarray, variant: int) -> tuple[Image.Image, str]:
    """A 28x28 greyscale item as a user's folder might hold it: variant 0 a 28x28 L PNG,
    variant 1 a tinted 40x48 RGB JPEG (another size, aspect and mode)."""
    from PIL import Image

    if variant == 0:
        return Image.fromarray(pixels, mode="L"), "png"
    grey = np.asarray(Image.fromarray(pixels, mode="L").resize((40, 48), Image.BICUBIC))
    tint = np.stack([grey, (grey * 0.8).astype(np.uint8), (grey * 0.5 + 40).astype(np.uint8)],
                    axis=-1)
    return Image.fromarray(tint, mode="RGB"), "jpg"


def write_imagefolder(root: str, images: np.ndarray, labels: np.ndarray, classes: list[str],
                      split_of=None) -> list[tuple[str, int]]:
    """``root/[split/]<class>/item-NNN.{png,jpg}`` alternating :func:`user_picture`'s variants;
    ``split_of(i)`` gives a split folder (None: the flat layout). Returns (path, label)."""
    written = []
    for i, (pixels, label) in enumerate(zip(images, labels)):
        picture, ext = user_picture(pixels, i % 2)
        parts = [root] + ([split_of(i)] if split_of else []) + [classes[int(label)]]
        path = os.path.join(_mkdir(os.path.join(*parts)), f"item-{i:03d}.{ext}")
        picture.save(path, **({"quality": 95} if ext == "jpg" else {}))
        written.append((path, int(label)))
    return written

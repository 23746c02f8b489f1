import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.data import DataError, ImageDataset, Preprocess, load_data

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


def pattern_images(n, c, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


def balanced_labels(n, k):
    return np.arange(n) % k


# ---------------------------------------------------------------------------------------------
# fixtures: one tiny dataset per format


def write_idx(path, array, magic):
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def fashion_dir(tmp_path):
    data = {}
    for prefix, n, seed in (("train", 40, 1), ("t10k", 10, 2)):
        images = pattern_images(n, 1, 28, 28, seed)[:, 0]
        labels = balanced_labels(n, 10).astype(np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images, 0x803)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x801)
        data[prefix] = (images, labels)
    return tmp_path, data


def write_pickle(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.fixture
def cifar10_dir(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = []
    for i in range(1, 6):
        images = pattern_images(10, 3, 32, 32, seed=i)
        labels = list(balanced_labels(10, 10))
        # python-2 style bytes keys, as in the real distribution
        write_pickle(root / f"data_batch_{i}", {b"data": images.reshape(10, -1), b"labels": labels})
        batches.append((images, labels))
    test = pattern_images(10, 3, 32, 32, seed=9)
    write_pickle(root / "test_batch", {b"data": test.reshape(10, -1), b"labels": list(range(10))})
    return tmp_path, batches, test


def test_digits_splits_are_stratified_and_seeded():
    a = load_data("digits", seed=3)
    b = load_data("digits", seed=3)
    c = load_data("digits", seed=4)
    assert len(a.train) + len(a.val) == 1437 and len(a.test) == 360
    assert a.num_classes == 10 and a.in_chans == 1 and a.input_size == (8, 8)
    assert torch.equal(a.val.images, b.val.images) and not torch.equal(a.val.images, c.val.images)
    assert torch.equal(a.test.images, c.test.images)  # the test split does not depend on the seed
    val_counts = a.val.labels.bincount()
    assert val_counts.min() >= 13 and val_counts.max() <= 16  # ~10% of each class
    assert a.train.images.dtype == torch.uint8 and int(a.train.images.max()) == 255


def test_train_subset_is_class_balanced_and_seeded():
    a = load_data("digits", train_subset=95, seed=1)
    assert a.train.labels.bincount().tolist() == [10] * 5 + [9] * 5
    assert torch.equal(a.train.images, load_data("digits", train_subset=95, seed=1).train.images)
    assert len(a.val) == len(load_data("digits", seed=1).val)  # the subset never touches val
    with pytest.raises(ValueError, match="train_subset"):
        load_data("digits", train_subset=100_000)


def test_fashion_mnist_fixture(fashion_dir):
    root, data = fashion_dir
    bundle = load_data(f"fashion-mnist:{root}", val_fraction=0.25)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (30, 10, 10)
    assert bundle.train.images.shape[1:] == (1, 28, 28)
    assert bundle.class_names[0] == "T-shirt/top" and bundle.num_classes == 10
    test_images, test_labels = data["t10k"]
    assert np.array_equal(bundle.test.images[:, 0].numpy(), test_images)
    assert np.array_equal(bundle.test.labels.numpy(), test_labels)
    assert bundle.val.labels.bincount().tolist() == [1] * 10


@pytest.mark.parametrize(
    ("name", "corrupt", "match"),
    [
        ("train-images-idx3-ubyte.gz", lambda p: p.unlink(), "file not found"),
        ("train-images-idx3-ubyte.gz", lambda p: p.write_bytes(b"not gzip"), "cannot decompress"),
        (
            "train-images-idx3-ubyte.gz",
            lambda p: p.write_bytes(gzip.decompress(p.read_bytes())[:-100]),
            "decompress",
        ),
        ("t10k-labels-idx1-ubyte.gz", lambda p: write_idx(p, np.zeros((10, 2)), 0x802), "bad magic"),
        (
            "t10k-images-idx3-ubyte.gz",
            lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-5])),
            "data bytes",
        ),
        ("t10k-labels-idx1-ubyte.gz", lambda p: write_idx(p, np.zeros(9), 0x801), "9 labels for 10 images"),
    ],
)
def test_fashion_mnist_corrupt_files(fashion_dir, name, corrupt, match):
    root, _ = fashion_dir
    corrupt(root / name)
    with pytest.raises(DataError, match=match) as info:
        load_data(f"fashion-mnist:{root}")
    assert name in str(info.value) and "\n" not in str(info.value)


def test_fashion_mnist_canvas_fixture(fashion_dir):
    root, data = fashion_dir
    bundle = load_data(f"fashion-mnist-canvas:{root},canvas=40,clutter=0", val_fraction=0.25)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (30, 10, 10)
    assert bundle.input_size == (40, 40) and bundle.in_chans == 1 and bundle.crop_padding == 0
    test_images, test_labels = data["t10k"]
    assert np.array_equal(bundle.test.labels.numpy(), test_labels)
    # without clutter each canvas holds exactly its item (pixel-exact paste at scale 1)
    sums = bundle.test.images.flatten(1).sum(1, dtype=torch.int64).numpy()
    assert np.array_equal(sums, test_images.reshape(10, -1).astype(np.int64).sum(1))
    assert bundle.mean[0] > 0 and bundle.std[0] > 0  # computed from the training canvases

    spec = f"fashion-mnist-canvas:{root},canvas=48,clutter=2,clutter_intensity=0.5"
    a, b = load_data(spec), load_data(spec)
    assert a.train.images.shape[1:] == (1, 48, 48)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    other = load_data(spec + ",seed=3")
    assert not torch.equal(a.test.images, other.test.images)
    assert torch.equal(a.test.labels, other.test.labels)


def test_fashion_mnist_canvas_option_errors(fashion_dir):
    root, _ = fashion_dir
    with pytest.raises(ValueError, match="expected key=value with key in canvas"):
        load_data(f"fashion-mnist-canvas:{root},bogus=1")
    with pytest.raises(ValueError, match="cannot parse 'big'"):
        load_data(f"fashion-mnist-canvas:{root},canvas=big")
    with pytest.raises(ValueError, match="cannot hold"):
        load_data(f"fashion-mnist-canvas:{root},canvas=20")
    with pytest.raises(ValueError, match="takes no options"):
        load_data("digits,canvas=40")


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist():
    bundle = load_data("fashion-mnist")
    assert (len(bundle.train) + len(bundle.val), len(bundle.test)) == (60000, 10000)
    assert bundle.test.labels.bincount().tolist() == [1000] * 10
    assert bundle.val.labels.bincount().tolist() == [600] * 10


def test_cifar10_fixture(cifar10_dir):
    root, batches, test = cifar10_dir
    bundle = load_data(f"cifar10:{root}", val_fraction=0.2)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (40, 10, 10)
    assert bundle.in_chans == 3 and bundle.input_size == (32, 32) and bundle.class_names[0] == "airplane"
    assert np.array_equal(bundle.test.images.numpy(), test)
    assert bundle.test.labels.tolist() == list(range(10))
    all_train = np.concatenate([b[0] for b in batches])
    first = bundle.train.images[0].numpy()
    assert any(np.array_equal(first, img) for img in all_train)  # channel-major layout kept
    assert load_data(f"cifar10:{root / 'cifar-10-batches-py'}").test.images.shape == (10, 3, 32, 32)


def test_cifar100_fixture(tmp_path):
    images = pattern_images(20, 3, 32, 32)
    labels = [i % 100 for i in range(0, 200, 10)]
    write_pickle(
        tmp_path / "train", {"data": images.reshape(20, -1), "fine_labels": labels, "coarse_labels": [0] * 20}
    )
    write_pickle(tmp_path / "test", {"data": images[:5].reshape(5, -1), "fine_labels": [99, 0, 1, 2, 3]})
    write_pickle(tmp_path / "meta", {"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    bundle = load_data(f"cifar100:{tmp_path}", val_fraction=0.5)
    assert bundle.num_classes == 100 and bundle.class_names[99] == "c99"
    assert bundle.test.labels.tolist() == [99, 0, 1, 2, 3]
    assert len(bundle.train) + len(bundle.val) == 20


def test_cifar_errors(cifar10_dir):
    tmp_root, _, _ = cifar10_dir
    root = tmp_root / "cifar-10-batches-py"
    (root / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3: file not found"):
        load_data(f"cifar10:{tmp_root}")
    (root / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR python batch"):
        load_data(f"cifar10:{tmp_root}")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    write_pickle(root / "data_batch_3", {"data": Evil()})
    with pytest.raises(DataError, match="refusing to load .*print"):
        load_data(f"cifar10:{tmp_root}")
    write_pickle(root / "data_batch_3", {"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]})
    with pytest.raises(DataError, match="uint8 \\(N, 3072\\)"):
        load_data(f"cifar10:{tmp_root}")
    write_pickle(root / "data_batch_3", {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]})
    with pytest.raises(DataError, match="labels outside"):
        load_data(f"cifar10:{tmp_root}")


def write_stl(root, split, images, labels):
    # STL-10 stores each image channel column-major: (N, C, W, H)
    (root / f"{split}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())
    (root / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())


def test_stl10_fixture_and_errors(tmp_path):
    root = tmp_path / "stl10_binary"
    root.mkdir()
    train = pattern_images(10, 3, 96, 96, seed=5)
    test = pattern_images(4, 3, 96, 96, seed=6)
    write_stl(root, "train", train, balanced_labels(10, 10))
    write_stl(root, "test", test, np.array([9, 0, 3, 3]))
    bundle = load_data(f"stl10:{tmp_path}", val_fraction=0.5)
    assert bundle.test.images.shape == (4, 3, 96, 96)
    assert np.array_equal(bundle.test.images.numpy(), test)  # (row, col) orientation restored
    assert bundle.test.labels.tolist() == [9, 0, 3, 3] and bundle.class_names[9] == "truck"
    assert bundle.crop_padding == 12

    (root / "test_y.bin").write_bytes(bytes([1, 2, 3]))
    with pytest.raises(DataError, match="test_y.bin: 3 labels for 4 images"):
        load_data(f"stl10:{root}")
    (root / "test_y.bin").write_bytes(bytes([1, 2, 3, 11]))
    with pytest.raises(DataError, match="test_y.bin: labels outside 1..10"):
        load_data(f"stl10:{root}")
    (root / "test_X.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(DataError, match="test_X.bin: 1000 bytes"):
        load_data(f"stl10:{root}")


@pytest.fixture
def folder_dir(tmp_path):
    from PIL import Image

    pixels = {}
    for split, per_class in (("train", 3), ("val", 1)):
        for ci, name in enumerate(("cat", "dog")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(per_class):
                array = np.full((6, 8, 3), 40 * ci + 10 * i, np.uint8)
                array[0, 0] = (255, 0, 0)
                Image.fromarray(array).save(tmp_path / split / name / f"{i}.png")
                pixels[(split, name, i)] = array
    return tmp_path, pixels


def test_imagefolder_fixture(folder_dir):
    root, pixels = folder_dir
    bundle = load_data(f"imagefolder:{root}", val_fraction=0.34)
    assert bundle.class_names == ("cat", "dog") and bundle.in_chans == 3 and bundle.input_size == (6, 8)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (4, 2, 2)
    assert bundle.test.labels.tolist() == [0, 1]
    assert np.array_equal(bundle.test.images[1].numpy(), pixels[("val", "dog", 0)].transpose(2, 0, 1))
    resized = load_data(f"imagefolder:{root}", image_size=4)
    assert resized.train.images.shape[1:] == (3, 4, 4) and resized.input_size == (4, 4)


def test_imagefolder_errors(folder_dir):
    from PIL import Image

    root, _ = folder_dir
    Image.new("RGB", (5, 5)).save(root / "train" / "cat" / "big.png")
    with pytest.raises(DataError, match="big.png: size 5x5 differs from 8x6; pass image_size"):
        load_data(f"imagefolder:{root}")
    (root / "train" / "cat" / "big.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="big.png: cannot decode image"):
        load_data(f"imagefolder:{root}")
    (root / "train" / "cat" / "big.png").unlink()
    (root / "val").rename(root / "elsewhere")
    with pytest.raises(DataError, match="neither test/ nor val/"):
        load_data(f"imagefolder:{root}")


def test_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data format 'mnist'"):
        load_data("mnist")
    with pytest.raises(ValueError, match="needs a directory"):
        load_data("cifar10")
    with pytest.raises(ValueError, match="takes no directory"):
        load_data("digits:/x")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: file not found"):
        load_data(f"fashion-mnist:{tmp_path}")


def test_preprocess_eval_and_augment():
    p = Preprocess(mean=(0.5,), std=(0.25,), size=(4, 4), crop_padding=1, hflip=True)
    x = torch.arange(2 * 16, dtype=torch.uint8).reshape(2, 1, 4, 4) * 8
    expected = (x.float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(p(x, train=False), expected)
    a = p(x, train=True, generator=torch.Generator().manual_seed(0))
    b = p(x, train=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    zero = (0 - 0.5) / 0.25
    padded = torch.nn.functional.pad(expected, (1, 1, 1, 1), value=zero)
    for i in range(2):  # every sample is a (possibly flipped) 4x4 window of the zero-padded image
        windows = [padded[i, :, r : r + 4, c : c + 4] for r in range(3) for c in range(3)]
        assert any(torch.allclose(a[i], w) or torch.allclose(a[i], w.flip(2)) for w in windows)
    resized = Preprocess((0.0,), (1.0,), (8, 8))(x, train=False)
    assert resized.shape == (2, 1, 8, 8)


def test_datasets_are_simple_and_picklable():
    bundle = load_data("digits", train_subset=20)
    clone = pickle.loads(pickle.dumps(bundle.train))
    assert isinstance(clone, ImageDataset) and len(clone) == 20
    image, label = clone[3]
    assert image.shape == (1, 8, 8) and image.dtype == torch.uint8 and label.dtype == torch.int64
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64))

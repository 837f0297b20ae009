"""How good an encoder's features are: kNN and linear-probe accuracy, and the projector.

Every epoch (`RepresentationMonitor`) the features of the labelled validation split are scored
against the training split's; at the end the validation embeddings go to TensorBoard's
projector with image sprites and labels.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa import config as config_lib
from tfkarpa import runs
from tfkarpa.data import pipeline, sources


def embedder(encoder: tf.keras.Model):
    """The encoder in inference mode as one traced function (build it once, call it often)."""
    @tf.function
    def embed(x):
        return encoder(x, training=False)

    return embed


def features(embed, split: sources.Split, cfg: config_lib.Config,
             num_classes: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features (L2-normalised) from `embed` (see `embedder`) and labels of a split, without
    augmentation."""
    ds = pipeline.make_dataset(split, cfg, num_classes, training=False, batch_size=256,
                               one_hot=False)
    if limit:
        ds = ds.unbatch().take(limit).batch(256)
    feats, labels = [], []
    for x, y in ds:
        feats.append(embed(x).numpy())
        labels.append(y.numpy())
    f = np.concatenate(feats).astype(np.float32)
    f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return f, np.concatenate(labels)


def knn_accuracy(bank: np.ndarray, bank_labels: np.ndarray, query: np.ndarray,
                 query_labels: np.ndarray, k: int, num_classes: int,
                 temperature: float = 0.07) -> float:
    """Weighted kNN on cosine similarity (Wu et al. 2018, the usual SimCLR monitor)."""
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(query), 1024):  # blocks keep the similarity matrix small
        sim = query[start:start + 1024] @ bank.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sim, top, 1) / temperature)
        votes = np.zeros((len(top), num_classes))
        np.add.at(votes, (np.arange(len(top))[:, None], bank_labels[top]), weights)
        correct += int(np.sum(votes.argmax(1) == query_labels[start:start + 1024]))
    return correct / max(1, len(query))


def linear_probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    """A logistic-regression probe on frozen features (scikit-learn: the standard, and exact)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_y)) < 2:
        return float("nan")
    scaler = StandardScaler().fit(train_x)
    probe = LogisticRegression(max_iter=2000, C=1.0)
    probe.fit(scaler.transform(train_x), train_y)
    return float(probe.score(scaler.transform(test_x), test_y))


class RepresentationMonitor(tf.keras.callbacks.Callback):
    """kNN and linear-probe accuracy of the encoder on the validation split, into the logs."""

    def __init__(self, encoder, data: sources.SourceData, cfg: config_lib.Config):
        super().__init__()
        self.encoder, self.data, self.cfg = encoder, data, cfg
        self.every = cfg.contrastive.monitor_every
        self.embed = embedder(encoder)  # traced once, not at every epoch

    def measure(self, split: str = "val") -> dict:
        cfg, n = self.cfg, self.data.num_classes
        train_x, train_y = features(self.embed, self.data.splits["train"], cfg, n)
        x, y = features(self.embed, self.data.splits[split], cfg, n)
        return {"knn_accuracy": knn_accuracy(train_x, train_y, x, y, cfg.contrastive.knn_k, n),
                "linear_probe_accuracy": linear_probe_accuracy(train_x, train_y, x, y)}

    def on_train_begin(self, logs=None):
        self.first_of_session = True

    def on_epoch_end(self, epoch, logs=None):
        # Always on the first epoch of a session (a resumed one too): CSVLogger fixes its
        # columns then.
        due = getattr(self, "first_of_session", True) or epoch + 1 == self.cfg.epochs or (
            self.every and (epoch + 1) % self.every == 0)
        self.first_of_session = False
        if logs is None or not due:
            return
        logs.update(self.measure())


def write_projector(encoder, data: sources.SourceData, cfg: config_lib.Config,
                    log_dir: Path) -> Path:
    """Validation embeddings, labels and a sprite of the images for TensorBoard's projector."""
    from PIL import Image
    from tensorboard.plugins import projector

    limit = cfg.contrastive.projector_images
    ds = pipeline.make_dataset(data.splits["val"], cfg, data.num_classes, training=False,
                               batch_size=256, one_hot=False).unbatch().take(limit)
    images = np.stack([x.numpy() for x, _ in ds]).astype(np.uint8)
    feats, labels = features(embedder(encoder), data.splits["val"], cfg, data.num_classes,
                             limit)
    out = Path(log_dir) / "projector"
    out.mkdir(parents=True, exist_ok=True)
    runs.atomic_write_text(out / "metadata.tsv",
                           "".join(f"{data.class_names[int(i)]}\n" for i in labels))
    side = int(math.ceil(math.sqrt(len(images))))
    thumb = images.shape[1]
    sheet = np.zeros((side * thumb, side * thumb, 3), np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, side)
        sheet[r * thumb:(r + 1) * thumb, c * thumb:(c + 1) * thumb] = image
    Image.fromarray(sheet).save(out / "sprite.png")
    checkpoint = tf.train.Checkpoint(embedding=tf.Variable(feats, name="embedding"))
    checkpoint.save(str(out / "embedding.ckpt"))
    setup = projector.ProjectorConfig()
    embedding = setup.embeddings.add()
    embedding.tensor_name = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
    embedding.metadata_path = "metadata.tsv"
    embedding.sprite.image_path = "sprite.png"
    embedding.sprite.single_image_dim.extend([thumb, thumb])
    projector.visualize_embeddings(str(out), setup)
    # An event file makes the folder a TensorBoard run, which is where the projector plugin
    # looks for projector_config.pbtxt whatever --logdir points at above it.
    writer = tf.summary.create_file_writer(str(out))
    with writer.as_default():
        tf.summary.text("embeddings", f"{len(feats)} validation images of {data.source}: "
                        f"{encoder.name} features (L2-normalised), labelled, with a sprite",
                        step=cfg.epochs)
    writer.close()
    return out

"""SimCLR (Chen et al. 2020): contrastive pretraining on unlabelled images, then transfer.

`task=pretrain` runs through the same fit loop as classification (`train.run`), with this
module's `PretrainTask`:

- views: two augmentations of every image, made on whole batches inside tf.data with keras-cv
  layers (random resized crop, flip, colour jitter, grayscale, optional blur);
- model: the encoder of any classifier from `tfkarpa.models` (everything up to its global
  pooling layer, "pool") and an MLP projection head;
- loss: NT-Xent with temperature. With several replicas each one's projections are gathered
  from all replicas (`all_gather`, whose gradient flows back to the replica that made them), so
  the negatives are the whole global batch, as in the paper;
- monitors each epoch: contrastive accuracy (is the other view the nearest?), kNN accuracy and
  linear-probe accuracy of the encoder's features on the labelled validation split, all in
  history.csv and TensorBoard; at the end the validation embeddings go to TensorBoard's
  projector with image sprites and labels.

The run delivers the encoder (`checkpoints/final.weights.h5`); `backbone=RUN` loads it into a
classifier of the same architecture for fine-tuning (`finetune`) or linear evaluation
(`linear-eval`, `freeze_backbone=true`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import tensorflow as tf
import yaml

from tfkarpa import config as config_lib
from tfkarpa import models, runs, train
from tfkarpa.data import pipeline, sources
from tfkarpa.errors import TfkarpaError

log = logging.getLogger(__name__)
AUTOTUNE = tf.data.AUTOTUNE


# ---- views ---------------------------------------------------------------------------------

class RandomApplyEach(tf.keras.layers.Layer):
    """Applies `layer` to each image of a batch with probability `rate`.

    Written here rather than using keras-cv's RandomApply, which decides image by image inside
    tf.map_fn: its parallel iterations draw from the random state in an order that changes from
    run to run (so even deterministic=true could not repeat a pretraining), and it runs the
    wrapped layer one image at a time. Here the whole batch goes through the (vectorized) layer
    at once and one draw picks the images that keep the result.
    """

    def __init__(self, layer: tf.keras.layers.Layer, rate: float, seed: int | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        if not 0 <= rate <= 1:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        self.layer, self.rate, self.seed = layer, rate, seed
        self._generator = (tf.random.Generator.from_seed(seed) if seed is not None
                           else tf.random.get_global_generator())

    def call(self, images, training=True):
        if not training or self.rate == 0:
            return images
        chosen = self._generator.uniform([tf.shape(images)[0], 1, 1, 1]) < self.rate
        return tf.where(chosen, tf.cast(self.layer(images, training=True), images.dtype), images)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed,
                "layer": tf.keras.layers.serialize(self.layer)}


def view_augmenter(cfg: config_lib.Config, seed: int | None) -> tf.keras.Sequential:
    with pipeline.float32_layers():
        return _view_augmenter(cfg, seed)


def _view_augmenter(cfg: config_lib.Config, seed: int | None) -> tf.keras.Sequential:
    """SimCLR's augmentation for float images in [0, 255], built from keras-cv layers.

    keras-cv's colour factors differ from the paper's: brightness is an additive share of the
    value range (as in SimCLR's own code), saturation f multiplies by f / (1 - f), hue shifts by
    up to half the factor of the colour circle. The paper's ranges are converted below.
    """
    from tfkarpa import kcv
    keras_cv = kcv.load()

    c, size, s = cfg.contrastive, cfg.data.image_size, cfg.contrastive.strength
    low, high = max(1e-3, 1 - 0.8 * s), 1 + 0.8 * s  # the paper's saturation multipliers
    stages = [keras_cv.layers.RandomCropAndResize(
        target_size=(size, size), crop_area_factor=(c.crop_min, 1.0),
        aspect_ratio_factor=(3 / 4, 4 / 3), seed=seed)]
    if cfg.data.flip:
        stages.append(keras_cv.layers.RandomFlip("horizontal", seed=seed))
    if c.rotation > 0:
        stages.append(keras_cv.layers.RandomRotation(c.rotation, fill_mode="reflect", seed=seed))
    if s > 0 and c.jitter_prob > 0:
        jitter = keras_cv.layers.RandomColorJitter(
            value_range=(0, 255), brightness_factor=min(1.0, 0.8 * s),
            contrast_factor=min(1.0, 0.8 * s),
            saturation_factor=(low / (1 + low), high / (1 + high)),
            hue_factor=min(1.0, 0.4 * s), seed=seed)
        stages.append(RandomApplyEach(jitter, rate=c.jitter_prob, seed=seed))
    if c.gray_prob > 0:
        stages.append(RandomApplyEach(
            keras_cv.layers.Grayscale(output_channels=3), rate=c.gray_prob, seed=seed))
    if c.blur_prob > 0:
        kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # 10% of the side, odd (as in SimCLR)
        stages.append(RandomApplyEach(
            keras_cv.layers.RandomGaussianBlur(kernel_size=kernel, factor=(0.1, 2.0), seed=seed),
            rate=c.blur_prob, seed=seed))
    return tf.keras.Sequential(stages, name="simclr_views")


def views_dataset(split: sources.Split, cfg: config_lib.Config, training: bool,
                  workers: int = 1) -> tf.data.Dataset:
    """Batches of (view1, view2), float32 [B, S, S, 3]; labels are dropped."""
    ds = pipeline.prepared(split, cfg, training)
    # Full batches in training: every image needs the others as negatives.
    ds = ds.batch(cfg.batch_size, drop_remainder=training, num_parallel_calls=AUTOTUNE)
    aug = view_augmenter(cfg, cfg.seed if training else cfg.seed + 1)

    def two_views(x, y):
        x = tf.cast(x, tf.float32)
        return aug(x, training=True), aug(x, training=True)

    # The augmentation layers draw from stateful generators: parallel calls would take their
    # draws in a varying order, so a deterministic run makes its views one batch at a time.
    ds = ds.map(two_views, num_parallel_calls=None if cfg.deterministic else AUTOTUNE)
    return pipeline.finished(ds, split, cfg, training, workers, by_file=training)


# ---- model and loss ------------------------------------------------------------------------

def encoder_of(model: tf.keras.Model) -> tf.keras.Model:
    """The classifier up to its global pooling layer: image in, feature vector out."""
    try:
        pool = model.get_layer("pool")
    except ValueError:
        raise TfkarpaError(f"model '{model.name}' has no 'pool' layer to cut an encoder at") from None
    return tf.keras.Model(model.input, pool.output, name=f"{model.name}_encoder")


def projection_head(features: int, hidden: int, out: int) -> tf.keras.Model:
    inputs = tf.keras.Input((features,), name="features")
    x = tf.keras.layers.Dense(hidden, use_bias=False, name="proj_dense1")(inputs)
    x = tf.keras.layers.BatchNormalization(name="proj_bn1")(x)
    x = tf.keras.layers.ReLU(name="proj_relu")(x)
    x = tf.keras.layers.Dense(out, name="proj_dense2")(x)
    return tf.keras.Model(inputs, tf.keras.layers.Activation("linear", dtype="float32")(x),
                          name="projection_head")


def nt_xent(z1: tf.Tensor, z2: tf.Tensor, temperature: float) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-example NT-Xent loss of this replica's pairs and whether each found its partner.

    Each of the 2n local views must pick out its partner among all 2N - 1 other views of the
    global batch (N over every replica). Under one replica N = n.
    """
    z1 = tf.math.l2_normalize(tf.cast(z1, tf.float32), axis=1)
    z2 = tf.math.l2_normalize(tf.cast(z2, tf.float32), axis=1)
    n = tf.shape(z1)[0]
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        z1_all, z2_all = ctx.all_gather(z1, axis=0), ctx.all_gather(z2, axis=0)
        sizes = ctx.all_gather(tf.reshape(n, [1]), axis=0)
        offset = tf.reduce_sum(sizes[:ctx.replica_id_in_sync_group])
    else:
        z1_all, z2_all, offset = z1, z2, 0
    labels = tf.range(n) + offset
    self_mask = tf.one_hot(labels, tf.shape(z1_all)[0]) * 1e9
    logits_11 = tf.matmul(z1, z1_all, transpose_b=True) / temperature - self_mask
    logits_22 = tf.matmul(z2, z2_all, transpose_b=True) / temperature - self_mask
    logits_12 = tf.matmul(z1, z2_all, transpose_b=True) / temperature
    logits_21 = tf.matmul(z2, z1_all, transpose_b=True) / temperature
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits
    loss = (ce(labels, tf.concat([logits_12, logits_11], 1))
            + ce(labels, tf.concat([logits_21, logits_22], 1)))
    hit = tf.cast(tf.equal(tf.argmax(logits_12, 1, output_type=tf.int32), labels), tf.float32)
    return loss, hit


class SimCLR(tf.keras.Model):
    """Encoder + projection head trained with NT-Xent on pairs of views."""

    def __init__(self, encoder, projector, temperature: float, **kwargs):
        super().__init__(name="simclr", **kwargs)
        self.encoder, self.projector, self.temperature = encoder, projector, temperature
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")
        self.accuracy_tracker = tf.keras.metrics.Mean(name="contrastive_accuracy")

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def call(self, images, training=False):
        return self.projector(self.encoder(images, training=training), training=training)

    def _pairs(self, views, training):
        v1, v2 = views
        z = self(tf.concat([v1, v2], 0), training=training)  # one pass: BatchNorm sees both
        z1, z2 = tf.split(z, 2, axis=0)
        return nt_xent(z1, z2, self.temperature)

    def train_step(self, views):
        with tf.GradientTape() as tape:
            per_example, hit = self._pairs(views, training=True)
            # Gradients are summed over replicas: scale so the step is the global mean.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            loss = tf.reduce_mean(per_example) / replicas
        self.optimizer.minimize(loss, self.trainable_variables, tape=tape)
        return self._track(per_example, hit)

    def test_step(self, views):
        return self._track(*self._pairs(views, training=False))

    def _track(self, per_example, hit):
        self.loss_tracker.update_state(per_example)
        self.accuracy_tracker.update_state(hit)
        return {m.name: m.result() for m in self.metrics}


# ---- representation quality ----------------------------------------------------------------

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


# ---- the task on the shared fit loop -------------------------------------------------------

def read_pretrain_run(run_dir: str | Path) -> config_lib.Config:
    """The config of a finished contrastive run, or an error saying what `run_dir` is."""
    path = Path(run_dir)
    try:
        stored = yaml.safe_load((path / "config.yaml").read_text())
    except FileNotFoundError:
        raise TfkarpaError(f"'{path}' is not a run directory (no config.yaml)") from None
    except yaml.YAMLError as err:
        raise TfkarpaError(f"{path / 'config.yaml'}: not valid YAML ({err})") from None
    if not isinstance(stored, dict) or stored.get("task") != "pretrain":
        task = stored.get("task") if isinstance(stored, dict) else None
        raise TfkarpaError(f"'{path}' is a {task or 'unknown'} run, not a contrastive one; pass "
                           "a run made with `python -m pipelines pretrain`")
    if not (path / "checkpoints" / "final.weights.h5").exists():
        raise TfkarpaError(f"contrastive run '{path}' has not finished (no "
                           "checkpoints/final.weights.h5); re-run its pretrain command")
    return config_lib.build(base=stored)


def load_encoder_into(model: tf.keras.Model, run_dir: str | Path, freeze: bool) -> None:
    """Put a contrastive run's encoder weights into `model` (same architecture)."""
    encoder = encoder_of(model)
    weights = Path(run_dir) / "checkpoints" / "final.weights.h5"
    try:
        encoder.load_weights(str(weights))
    except (ValueError, OSError) as err:
        raise TfkarpaError(f"cannot load the encoder of '{run_dir}' into {model.name}: {err}") from None
    if freeze:
        encoder.trainable = False  # frozen BatchNorm also runs in inference mode
    log.info("backbone from %s%s", run_dir, " (frozen)" if freeze else "")


class PretrainTask(train.Task):
    """SimCLR on the training images; delivers the encoder. Labels only feed its monitors."""

    def check(self, cfg: config_lib.Config, data: sources.SourceData) -> None:
        if cfg.stages or cfg.qat or cfg.distill.teacher or cfg.backbone:
            raise TfkarpaError("task=pretrain trains an encoder from scratch: compression stages, "
                               "qat, distill.teacher and backbone do not apply")
        if cfg.batch_size < 2:
            raise TfkarpaError("contrastive pretraining needs batch_size >= 2: each image's "
                               "negatives are the other images of the batch")
        n = data.splits["train"].num_examples
        if 0 <= n < cfg.batch_size:
            raise TfkarpaError(
                f"{data.source}: {n} training image(s) do not fill one batch of {cfg.batch_size} "
                "(pretraining uses full batches, 2 views each); lower batch_size or add images")

    def build(self, cfg, data, placement, run_, steps):
        from tfkarpa.train import FitParts, make_optimizer

        shape = (cfg.data.image_size, cfg.data.image_size, 3)
        encoder = encoder_of(models.build_classifier(cfg.model, shape, data.num_classes))
        c = cfg.contrastive
        projector = projection_head(encoder.output_shape[-1], c.projection_hidden,
                                    c.projection_dim)
        model = SimCLR(encoder, projector, c.temperature)
        model.compile(optimizer=make_optimizer(cfg.optimizer, cfg.epochs, steps, cfg.batch_size),
                      jit_compile=cfg.xla)
        model(tf.zeros((1, *shape)))  # build, so checkpoints can be restored into it
        train_ds = views_dataset(data.splits["train"], cfg, True, placement.workers)
        val_ds = views_dataset(data.splits["val"], cfg, False, placement.workers)
        if placement.name in ("multi_worker", "tpu"):
            val_ds = val_ds.unbatch().batch(cfg.batch_size, drop_remainder=True)
        sample = next(iter(views_dataset(data.splits["train"], cfg, True).take(1)))[0].numpy()
        return FitParts(model, encoder, train_ds, val_ds, sample, monitor="knn_accuracy",
                        callbacks=[RepresentationMonitor(encoder, data, cfg)], reload_best=False)

    def finish(self, cfg, data, placement, run_, parts, export_dir, hist):
        from tfkarpa.train import save_final

        encoder = parts.net
        final = save_final(encoder, run_)
        if placement.name in ("multi_worker", "tpu"):  # measure a local copy (no collectives)
            shape = (cfg.data.image_size, cfg.data.image_size, 3)
            encoder = encoder_of(models.build_classifier(cfg.model, shape, data.num_classes))
            encoder.load_weights(str(final))
        monitor = RepresentationMonitor(encoder, data, cfg)
        test = monitor.measure("test")
        out = run_.dir / "eval" / "test"
        runs.atomic_write_json(out / "report.json", {"split": "test", "source": data.source,
                                                     **test})
        runs.atomic_write_text(out / "report.md", (
            f"# {run_.name}: SimCLR encoder on {data.source} / test\n\n"
            f"kNN accuracy (k={cfg.contrastive.knn_k}, bank = training split): "
            f"{test['knn_accuracy']:.4f}  \n"
            f"linear-probe accuracy (logistic regression on frozen features): "
            f"{test['linear_probe_accuracy']:.4f}  \n"))
        projector_dir = write_projector(encoder, data, cfg, run_.logs)
        metrics = {
            "test_knn_accuracy": test["knn_accuracy"],
            "test_linear_probe_accuracy": test["linear_probe_accuracy"],
            "final_contrastive_accuracy": (hist.get("contrastive_accuracy") or [float("nan")])[-1],
            "best_val_knn_accuracy": max(hist.get("knn_accuracy", [float("nan")])),
            "params": int(encoder.count_params()),
        }
        return metrics, {"encoder_weights": str(final), "test_report": str(out / "report.md"),
                         "projector": str(projector_dir)}

"""Compression with TF-MOT: magnitude pruning (incl. 2:4), weight clustering, QAT.

A compression stage wraps a trained model's layers, fine-tunes it through the one fit loop and
strips the wrappers again. `compress` chains stages in the order TF-MOT's collaborative
optimisation needs (prune, then cluster, then QAT), one run directory per stage, and each stage
keeps what the earlier ones made: clustering a pruned model preserves its zeros, and QAT picks
TF-MOT's prune-preserving, cluster-preserving or sparsity-and-cluster-preserving scheme.

Only layers TF-MOT knows are wrapped, through `clone_model(clone_function=...)`: wrapping a whole
model fails on layers such as Rescaling. Layers with weights that are left alone are listed in
the stage report rather than failing, and a model with nothing to wrap is an error before any
training starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from tfkarpa import config as config_lib
from tfkarpa.errors import TfkarpaError

log = logging.getLogger(__name__)

STAGES = ("prune", "cluster", "qat")


@dataclass
class Wrapped:
    """A model ready for a stage's fine-tuning, the callbacks it needs, and what was skipped."""

    model: tf.keras.Model
    callbacks: list = field(default_factory=list)
    wrapped: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def requested_stages(cfg: config_lib.Config) -> list[str]:
    wanted = {"prune": cfg.prune.sparsity > 0 or cfg.prune.structure == "2:4",
              "cluster": cfg.cluster.clusters > 0, "qat": cfg.qat}
    return [s for s in STAGES if wanted[s]]


def _tfmot():
    import tensorflow_model_optimization as tfmot  # deferred: a second of import time

    return tfmot


# Weightless plumbing that no compression applies to; every other layer left alone is listed.
_PLUMBING = (tf.keras.layers.InputLayer, tf.keras.layers.BatchNormalization, tf.keras.layers.ReLU,
             tf.keras.layers.Activation, tf.keras.layers.Add, tf.keras.layers.MaxPooling2D,
             tf.keras.layers.AveragePooling2D, tf.keras.layers.GlobalAveragePooling2D,
             tf.keras.layers.Dropout, tf.keras.layers.Flatten, tf.keras.layers.ZeroPadding2D,
             tf.keras.layers.Concatenate, tf.keras.layers.Reshape)


def _worth_listing(layer) -> bool:
    return bool(layer.weights) or not isinstance(layer, _PLUMBING)


def _clone(model, decide):
    """clone_model with `decide(layer) -> wrapped layer or None`; records what happened.

    Wrappers wrap the trained layer objects and unwrapped layers are reused as they are, so the
    new model starts from the trained weights without copying them.
    """
    wrapped, skipped = [], []

    def clone(layer):
        new = decide(layer)
        if new is not None:
            wrapped.append(layer.name)
            return new
        if _worth_listing(layer) and not isinstance(layer, tf.keras.layers.BatchNormalization):
            skipped.append(f"{layer.name} ({type(layer).__name__})")
        return layer

    return tf.keras.models.clone_model(model, clone_function=clone), wrapped, skipped


def prune(model: tf.keras.Model, cfg: config_lib.PruneConfig, total_steps: int, log_dir) -> Wrapped:
    tfmot = _tfmot()
    sparsity = 0.5 if cfg.structure == "2:4" else cfg.sparsity
    begin = int(cfg.begin * total_steps)
    end = max(begin + 1, int(cfg.end * total_steps))
    frequency = cfg.frequency or max(1, (end - begin) // 10)
    # TF-MOT updates masks only on steps begin + k * frequency up to end: align end to one, or
    # the last update falls short of the target.
    end = begin + frequency * max(1, (end - begin) // frequency)
    if end > total_steps:
        raise TfkarpaError(
            f"config key 'prune.frequency': {frequency} steps between mask updates cannot reach "
            f"the target within {total_steps} fine-tuning steps; lower it or raise epochs")
    if cfg.schedule == "constant" or cfg.structure == "2:4":
        schedule = tfmot.sparsity.keras.ConstantSparsity(sparsity, begin, frequency=frequency)
    else:
        schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, sparsity, begin, end, frequency=frequency)
    structured = cfg.structure == "2:4"
    # 2:4 sparsity is defined by TF-MOT for Conv2D and Dense kernels only.
    kinds = (tf.keras.layers.Conv2D, tf.keras.layers.Dense) if structured else (
        tf.keras.layers.Conv2D, tf.keras.layers.Dense, tf.keras.layers.DepthwiseConv2D)

    def decide(layer):
        if layer.name in cfg.exclude or not isinstance(layer, kinds):
            return None
        if structured and isinstance(layer, tf.keras.layers.DepthwiseConv2D):
            return None
        return tfmot.sparsity.keras.prune_low_magnitude(
            layer, pruning_schedule=schedule, sparsity_m_by_n=(2, 4) if structured else None)

    wrapped_model, wrapped, skipped = _clone(model, decide)
    _require(wrapped, "prune", model)
    callbacks = [tfmot.sparsity.keras.UpdatePruningStep(),
                 tfmot.sparsity.keras.PruningSummaries(log_dir=str(log_dir))]
    log.info("pruning %d layers to %.0f%% (%s, steps %d-%d, every %d)", len(wrapped),
             100 * sparsity, "2:4" if structured else cfg.schedule, begin, end, frequency)
    return Wrapped(wrapped_model, callbacks, wrapped, skipped)


_CENTROIDS = {"kmeans++": "KMEANS_PLUS_PLUS", "linear": "LINEAR", "density": "DENSITY_BASED",
              "random": "RANDOM"}


def cluster(model: tf.keras.Model, cfg: config_lib.ClusterConfig, preserve_sparsity: bool) -> Wrapped:
    tfmot = _tfmot()
    init = getattr(tfmot.clustering.keras.CentroidInitialization, _CENTROIDS[cfg.init])
    kinds = (tf.keras.layers.Conv2D, tf.keras.layers.Dense, tf.keras.layers.DepthwiseConv2D)

    def decide(layer):
        if layer.name in cfg.exclude or not isinstance(layer, kinds):
            return None
        return tfmot.clustering.keras.cluster_weights(
            layer, number_of_clusters=cfg.clusters, cluster_centroids_init=init,
            preserve_sparsity=preserve_sparsity)

    wrapped_model, wrapped, skipped = _clone(model, decide)
    _require(wrapped, "cluster", model)
    log.info("clustering %d layers into %d centroids%s", len(wrapped), cfg.clusters,
             " (keeping zeros)" if preserve_sparsity else "")
    return Wrapped(wrapped_model, [], wrapped, skipped)


def qat(model: tf.keras.Model, pruned: bool, clustered: bool) -> Wrapped:
    tfmot = _tfmot()
    q = tfmot.quantization.keras
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_registry,
    )

    registry = default_8bit_quantize_registry.Default8BitQuantizeRegistry()
    output_only = _output_only_config()

    def decide(layer):
        if isinstance(layer, tf.keras.layers.InputLayer):
            return None
        if registry.supports(layer):
            return q.quantize_annotate_layer(layer)
        if not layer.trainable_weights:
            # Weightless layers the registry does not know (Rescaling): quantize their output.
            # Left unannotated, TF-MOT's prune- and cluster-preserving registries claim to
            # support them and then fail inside quantize_apply.
            return q.quantize_annotate_layer(layer, quantize_config=output_only)
        return None

    annotated, wrapped, skipped = _clone(model, decide)
    _require(wrapped, "quantize", model)
    combine = tfmot.experimental.combine
    if clustered:
        scheme = combine.Default8BitClusterPreserveQuantizeScheme(preserve_sparsity=pruned)
    elif pruned:
        scheme = combine.Default8BitPrunePreserveQuantizeScheme()
    else:
        from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
            default_8bit_quantize_scheme,
        )

        scheme = default_8bit_quantize_scheme.Default8BitQuantizeScheme()
    with q.quantize_scope({type(output_only).__name__: type(output_only)}):
        quantized = q.quantize_apply(annotated, scheme)
    log.info("quantization-aware training on %d layers with %s", len(wrapped), type(scheme).__name__)
    return Wrapped(quantized, [], wrapped, skipped)


_OUTPUT_ONLY = None


def _output_only_config():
    """A QuantizeConfig that quantizes a layer's output only (made once: TF-MOT is imported
    lazily, and its wrappers look the class up by name when they are cloned)."""
    global _OUTPUT_ONLY
    if _OUTPUT_ONLY is None:
        q = _tfmot().quantization.keras
        plain = tf.autograph.experimental.do_not_convert

        class OutputOnlyQuantizeConfig(q.QuantizeConfig):
            """No weights or activations to quantize, an 8-bit moving-average output quantizer."""

            @plain
            def get_weights_and_quantizers(self, layer):
                return []

            @plain
            def get_activations_and_quantizers(self, layer):
                return []

            @plain
            def set_quantize_weights(self, layer, quantize_weights):
                return None

            @plain
            def set_quantize_activations(self, layer, quantize_activations):
                return None

            @plain
            def get_output_quantizers(self, layer):
                return [q.quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False,
                                                            symmetric=False, narrow_range=False)]

            def get_config(self):
                return {}

        _OUTPUT_ONLY = OutputOnlyQuantizeConfig
    return _OUTPUT_ONLY()


def _require(wrapped: list[str], what: str, model) -> None:
    if not wrapped:
        raise TfkarpaError(
            f"model '{model.name}' has no layer TF-MOT can {what} (it wraps top-level Conv2D, "
            "DepthwiseConv2D and Dense layers; nested backbones such as keras-cv's are one "
            "opaque layer to it); choose a tfkarpa model such as small_cnn, resnet or mobilenet_v2"
        )


def wrap(stage: str, model: tf.keras.Model, cfg: config_lib.Config, total_steps: int,
         log_dir, earlier: list[str]) -> Wrapped:
    """Wrap `model` for `stage`, given the stages its weights already went through."""
    if stage == "prune":
        if "qat" in earlier or "cluster" in earlier:
            raise TfkarpaError("pruning must come before clustering and QAT")
        return prune(model, cfg.prune, total_steps, log_dir)
    if stage == "cluster":
        if "qat" in earlier:
            raise TfkarpaError("clustering must come before QAT")
        return cluster(model, cfg.cluster, preserve_sparsity="prune" in earlier)
    if stage == "qat":
        return qat(model, pruned="prune" in earlier, clustered="cluster" in earlier)
    raise ValueError(stage)


def strip(stage: str, model: tf.keras.Model) -> tf.keras.Model:
    """Remove training-only wrappers: the result has the base architecture (QAT keeps its own)."""
    tfmot = _tfmot()
    if stage == "prune":
        return tfmot.sparsity.keras.strip_pruning(model)
    if stage == "cluster":
        return tfmot.clustering.keras.strip_clustering(model)
    return model


def rebuild(base: tf.keras.Model, stages_done: list[str]) -> tf.keras.Model:
    """The architecture a finished stage's weights belong to (QAT has its own layers)."""
    if "qat" in stages_done:
        return qat(base, "prune" in stages_done, "cluster" in stages_done).model
    return base


def sparsity_report(model: tf.keras.Model) -> dict:
    """Share of exactly-zero kernel weights per layer, and over all kernels together."""
    layers, zeros, total = {}, 0, 0
    for layer in model.layers:
        for weight in layer.weights:
            name = weight.name.split("/")[-1]
            if "kernel" not in name:
                continue
            values = weight.numpy()
            z = int(np.sum(values == 0))
            layers[layer.name] = {"weights": int(values.size), "sparsity": z / values.size,
                                  "unique_values": int(len(np.unique(values)))}
            zeros += z
            total += values.size
    return {"overall_sparsity": zeros / total if total else 0.0, "layers": layers}

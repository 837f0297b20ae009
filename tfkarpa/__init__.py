"""tfkarpa: Keras 2 (tf_keras) vision models, tf.data pipelines, compression and export.

Importing the package pins the Keras flavour (and turns on TensorFlow's oneDNN kernels) before
TensorFlow loads. TF-MOT only prunes and quantizes tf_keras models, and keras-cv 0.9 builds
Keras 2 models only when TF_USE_LEGACY_KERAS=1 is set before TensorFlow is first imported (see
shared/STACK.md). If TensorFlow is already loaded with Keras 3 active we cannot switch it any
more, so we stop with a message that says how to fix the import order.
"""

import os
import sys

__version__ = "0.1.0"


class KerasFlavourError(ImportError):
    """TensorFlow was imported with Keras 3 before tfkarpa could select tf_keras."""


def _select_keras_2() -> None:
    if "tensorflow" not in sys.modules:
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        # TensorFlow turns its oneDNN kernels on by itself only on CPUs with AVX-512. On an
        # AVX2-only AMD EPYC of this project's machine kind they were off, and training ran
        # 2.5x slower: ResNet-20 94 -> 246 images/s, the small CNN 125 -> 313 with them on
        # (keras-cv's YOLOv8 unchanged); benchmarks/results/onednn.json. A user's
        # TF_ENABLE_ONEDNN_OPTS=0 still wins.
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
        return
    if os.environ.get("TF_USE_LEGACY_KERAS", "").lower() in ("1", "true", "yes"):
        return
    raise KerasFlavourError(
        "tfkarpa needs Keras 2 (tf_keras), but TensorFlow was imported before tfkarpa with "
        "Keras 3 active. Import tfkarpa before tensorflow, or set TF_USE_LEGACY_KERAS=1 in "
        "the environment before starting Python."
    )


_select_keras_2()

from tfkarpa.errors import TfkarpaError  # noqa: E402  (must follow the Keras selection)

__all__ = ["TfkarpaError", "__version__"]

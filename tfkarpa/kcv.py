"""keras-cv, imported quietly.

keras-cv 0.9 imports keras-core, whose import writes "Using TensorFlow backend" to stdout. Our
commands keep stdout for their summary (and --json's last line), so keras-cv is imported here,
once, with stdout redirected. It is also deferred: importing it costs seconds.
"""

import contextlib
import io
import sys


def load():
    if "keras_cv" not in sys.modules:
        with contextlib.redirect_stdout(io.StringIO()):
            import keras_cv  # noqa: F401
    return sys.modules["keras_cv"]

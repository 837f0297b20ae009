"""ONNX files, whatever the task: converted from the task's checked TFLite graph, opened in
onnxruntime, checked, written with their metadata inside.

Why from TFLite and not from the SavedModel: tf2onnx (1.17) cannot convert the SavedModel
signatures (the antialiased resize becomes ScaleAndTranslate, the bytes signature DecodeImage,
the detectors' NMS BroadcastArgs), while the TFLite graph of every mode converts as it is,
int8 files included (QuantizeLinear/DequantizeLinear), and has the same inputs: images at the
model's side, uint8 where the TFLite file takes uint8. So an ONNX file is exactly one TFLite
file's graph for a runtime that needs only onnxruntime.

tf2onnx exits without error when an op does not convert and leaves the TFLite op in the graph,
which onnxruntime then refuses: `from_tflite` names such ops and opens the result in
onnxruntime before anything is written (`write` is atomic). The task's metadata is stored as
JSON in the model's `metadata_props` under "tfkarpa", as TFLite files carry it.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np

from tfkarpa import runs
from tfkarpa.errors import TfkarpaError

log = logging.getLogger(__name__)

SUFFIX = ".onnx"
OPSET = 17  # the opset the files are written in; tf2onnx 1.17 writes it, onnxruntime 1.32 runs it
METADATA_KEY = "tfkarpa"
_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


def _quiet_tf2onnx():
    """tf2onnx, imported lazily (it imports TensorFlow's converter modules), logging errors
    only: its per-node INFO lines, and the traceback it prints as a warning when one of its
    graph optimizers fails on an int8 detector graph (q_dq_optimizer on keras-cv's NMS), after
    which it goes on with the graph unoptimized; the file is checked like any other."""
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    return tf2onnx


def unsupported_ops(model) -> list[str]:
    """The op types of `model` (an onnx ModelProto) that no ONNX opset defines: what tf2onnx
    left in the graph unconverted (it keeps the TFLite op's name, e.g. TFL_BUCKETIZE)."""
    import onnx

    return sorted({node.op_type for node in model.graph.node
                   if node.domain not in _STANDARD_DOMAINS
                   or not onnx.defs.has(node.op_type, node.domain or "")})


def from_tflite(content: bytes, where: str) -> bytes:
    """The ONNX bytes of a TFLite graph, or a TfkarpaError naming what does not convert (the
    op types, or onnxruntime's first line), so that nothing is written. `where` names the file
    to be written in messages."""
    tf2onnx = _quiet_tf2onnx()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "model.tflite"
        source.write_bytes(content)
        try:
            with warnings.catch_warnings():  # it reads shapes with TF's deprecated interpreter
                warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
                model, _ = tf2onnx.convert.from_tflite(str(source), opset=OPSET)
        except Exception as err:  # tf2onnx raises what its handlers raise
            raise TfkarpaError(f"ONNX export '{where}': tf2onnx could not convert the TFLite "
                               f"graph ({type(err).__name__}: {str(err)[:200]}); nothing was "
                               "written") from None
    bad = unsupported_ops(model)
    if bad:
        raise TfkarpaError(f"ONNX export '{where}': {len(bad)} op(s) have no ONNX form: "
                           f"{', '.join(bad)}; nothing was written (export formats=tflite runs "
                           "them)")
    data = model.SerializeToString()
    session(data, 1, where)  # onnxruntime must open it: the only proof that counts
    return data


def session(content: bytes, num_threads: int | None, where: str):
    """An onnxruntime session on the CPU with `num_threads` intra-op threads (None: its
    default), or a TfkarpaError naming the file."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings name graph rewrites
    if num_threads:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(content, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types on a bad graph
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise TfkarpaError(f"'{where}' does not open in onnxruntime: {first}") from None


def embed_metadata(content: bytes, info: dict) -> bytes:
    import onnx

    model = onnx.load_from_string(content)
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(info, default=str)
    return model.SerializeToString()


def read_metadata(content: bytes, where: str) -> dict:
    import onnx

    try:
        model = onnx.load_from_string(content)
    except Exception as err:  # protobuf's DecodeError and friends
        raise TfkarpaError(f"'{where}' is not a valid ONNX file ({type(err).__name__}); "
                           "export it again from its run") from None
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return {}


def write(path: str | Path, content: bytes, info: dict) -> None:
    """The converted, already checked file with its metadata, written atomically."""
    runs.atomic_write_bytes(Path(path), embed_metadata(content, info), kind="onnx")


def tflite_interface(content: bytes) -> dict:
    """What an ONNX file converted from this TFLite graph needs to be fed and read like it:
    {"input": (scale, zero) or None, "outputs": {tensor name: {"name": the signature's output
    name, "quantization": (scale, zero) or None}}}. tf2onnx names the ONNX inputs and outputs
    after the TFLite tensors; the LiteRT signature names them after what they are (boxes,
    probabilities, a head). Integer tensors carry the scale and zero point to (de)quantize."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    details = {t["index"]: t for t in interpreter.get_tensor_details()}
    signatures = interpreter._get_full_signature_list()  # noqa: SLF001 (no public form)
    signature = signatures.get("serving_default") or next(iter(signatures.values()))

    def quantization(detail):  # None: float, or integer values as they are (scale 0)
        scale, zero = detail["quantization"]
        if detail["dtype"] == np.float32 or not scale:
            return None
        return [float(scale), int(zero)]

    (first,) = signature["inputs"].values()
    return {"input": quantization(details[first]),
            "outputs": {details[i]["name"]: {"name": key, "quantization": quantization(details[i])}
                        for key, i in signature["outputs"].items()}}


class Runner:
    """An ONNX file's graph in onnxruntime with its TFLite file's interface (`tflite_interface`,
    kept in the file's metadata): one input array (the batch; quantized where the input is
    integer, as the TFLite interpreter is fed) in, {signature output name: float array} out,
    dequantized where an output is integer."""

    def __init__(self, content: bytes, interface: dict, num_threads: int | None = 2,
                 where: str = "ONNX file"):
        self.session = session(content, num_threads, where)
        self.input = self.session.get_inputs()[0]
        self.output_names = [o.name for o in self.session.get_outputs()]
        outputs = interface.get("outputs", {})
        missing = [n for n in self.output_names if n not in outputs]
        if missing:
            raise TfkarpaError(f"'{where}': output '{missing[0]}' is not described in its "
                               "metadata; export it again from its run")
        self.outputs = [outputs[n] for n in self.output_names]
        self.input_quantization = interface.get("input")
        self._dtype = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8,
                       "tensor(int8)": np.int8}.get(self.input.type, np.float32)

    def feed(self, x: np.ndarray) -> np.ndarray:
        if self._dtype is np.float32 or self.input_quantization is None:
            return np.asarray(x).astype(self._dtype)  # float, or integers taken as they are
        scale, zero = self.input_quantization
        info = np.iinfo(self._dtype)
        x = np.asarray(x, np.float32)
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(self._dtype)

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        values = self.session.run(self.output_names, {self.input.name: self.feed(x)})
        result = {}
        for out, value in zip(self.outputs, values):
            if out["quantization"] is not None:
                scale, zero = out["quantization"]
                value = (value.astype(np.float32) - zero) * scale
            result[out["name"]] = value
        return result

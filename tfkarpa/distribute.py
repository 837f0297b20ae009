"""tf.distribute strategy from a name, and what the run needs to know about it.

`resolve(cfg)` turns `strategy=` (`auto`, `default`, `one_device`, `mirrored`, `multi_worker`,
`tpu`) into a `Placement`: the strategy, the replica and worker counts, whether this process is
the chief (the only one that writes real outputs), and the per-replica batch. Everything that
can be wrong (an unknown device, a TF_CONFIG that does not parse or does not name this task, a
global batch that does not divide over the replicas, a TPU that does not answer) is an error
here, before a run directory exists.

It must run before TensorFlow's runtime starts: `MultiWorkerMirroredStrategy` configures
collective ops and logical CPU devices can only be created before then. `core.fit.run` calls it
first for that reason.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from urllib.parse import urlparse

import tensorflow as tf

from tfkarpa.config import STRATEGIES
from tfkarpa.errors import TfkarpaError

log = logging.getLogger(__name__)


@dataclass
class Placement:
    strategy: tf.distribute.Strategy
    name: str  # the resolved strategy (never "auto")
    replicas: int
    workers: int = 1
    is_chief: bool = True
    task: dict = field(default_factory=dict)  # TF_CONFIG's task under multi_worker
    devices: list[str] = field(default_factory=list)

    def per_replica_batch(self, global_batch: int) -> int:
        if global_batch % self.replicas:
            raise TfkarpaError(
                f"config key 'batch_size': the global batch {global_batch} does not divide over "
                f"the {self.replicas} replicas of strategy '{self.name}'; use a multiple of "
                f"{self.replicas} (e.g. {max(1, round(global_batch / self.replicas)) * self.replicas})")
        return global_batch // self.replicas

    def describe(self, global_batch: int) -> dict:
        return {"strategy": self.name, "replicas": self.replicas, "workers": self.workers,
                "chief": self.is_chief, "task": self.task, "devices": self.devices,
                "global_batch": global_batch,
                "per_replica_batch": self.per_replica_batch(global_batch)}


def read_tf_config(environ=os.environ) -> dict | None:
    """TF_CONFIG as a dict, checked; None when it is unset or empty."""
    raw = environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        tf_config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise TfkarpaError(f"TF_CONFIG does not parse as JSON: {err.msg} at line {err.lineno}, "
                           f"column {err.colno}") from None
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    if not isinstance(cluster, dict) or not cluster:
        raise TfkarpaError("TF_CONFIG has no 'cluster' mapping of job names to address lists")
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise TfkarpaError(f"TF_CONFIG cluster job '{job}' must be a list of 'host:port' strings")
    task = tf_config.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise TfkarpaError("TF_CONFIG has no 'task' with 'type' and 'index' naming this process")
    if task["type"] not in cluster:
        raise TfkarpaError(f"TF_CONFIG task type '{task['type']}' is not a job of the cluster "
                           f"({', '.join(cluster)})")
    if not isinstance(task["index"], int) or not 0 <= task["index"] < len(cluster[task["type"]]):
        raise TfkarpaError(
            f"TF_CONFIG task index {task['index']!r} is out of range: job '{task['type']}' has "
            f"{len(cluster[task['type']])} address(es)")
    unsupported = set(cluster) - {"chief", "worker"}
    if unsupported:
        raise TfkarpaError(f"TF_CONFIG job(s) {', '.join(repr(j) for j in sorted(unsupported))} "
                           "are not used by multi_worker training (it takes 'chief' and 'worker')")
    return tf_config


def is_chief(tf_config: dict) -> bool:
    task, cluster = tf_config["task"], tf_config["cluster"]
    return task["type"] == "chief" or (task["type"] == "worker" and task["index"] == 0
                                       and "chief" not in cluster)


def _ensure_devices(devices: list[str]) -> list[str]:
    """Check named devices exist; CPU devices beyond the first are made as logical devices
    (the way to test multi-replica code on one CPU), which only works before TF starts."""
    names = [d if d.startswith("/") else f"/{d}" for d in devices]
    want_cpus = 1 + max((int(d.rsplit(":", 1)[1]) for d in names
                         if d.lower().startswith("/cpu:") and d.rsplit(":", 1)[1].isdigit()),
                        default=0)
    cpus = tf.config.list_physical_devices("CPU")
    if want_cpus > 1:
        try:
            if len(tf.config.get_logical_device_configuration(cpus[0]) or [None]) < want_cpus:
                tf.config.set_logical_device_configuration(
                    cpus[0], [tf.config.LogicalDeviceConfiguration()] * want_cpus)
        except RuntimeError:
            pass  # runtime already started: the check below names what is missing
    known = {d.name.lower().replace("/device:", "/").replace("/job:localhost/replica:0/task:0", "")
             for d in tf.config.list_logical_devices()}
    for name in names:
        if name.lower() not in known:
            raise TfkarpaError(
                f"config key 'devices': device '{name}' does not exist here (available: "
                f"{', '.join(sorted(known))}). Extra CPU devices can only be created before "
                "TensorFlow starts, so name them in the first run of a process")
    return names


def _check_tpu_answers(address: str, timeout: float) -> None:
    """A `grpc://host:port` or `host:port` TPU address must accept a connection in time;
    TensorFlow itself would otherwise wait without bound."""
    url = urlparse(address if "://" in address else f"grpc://{address}")
    if not url.hostname or not url.port:
        return  # a TPU name for the Cloud TPU API, or "local": the resolver checks those
    try:
        with socket.create_connection((url.hostname, url.port), timeout=timeout):
            pass
    except OSError as err:
        raise TfkarpaError(f"config key 'tpu': TPU at '{address}' does not answer within "
                           f"{timeout:g} s ({err.strerror or err})") from None


def _with_timeout(fn, timeout: float, what: str):
    result, error = [], []

    def target():
        try:
            result.append(fn())
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TfkarpaError(f"{what} did not finish within {timeout:g} s")
    if error:
        raise TfkarpaError(f"{what} failed: {error[0]}") from None
    return result[0]


def _tpu(address: str, timeout: float) -> Placement:
    address = address or os.environ.get("TPU_NAME", "")
    if not address:
        raise TfkarpaError("strategy=tpu needs tpu=ADDRESS (grpc://host:port, a TPU name, or "
                           "'local' on a TPU VM)")
    _check_tpu_answers(address, timeout)

    def connect():
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)

    strategy = _with_timeout(connect, timeout, f"connecting to the TPU at '{address}'")
    return Placement(strategy, "tpu", strategy.num_replicas_in_sync,
                     devices=[d.name for d in tf.config.list_logical_devices("TPU")])


def _multi_worker(tf_config: dict | None, timeout: int) -> Placement:
    if tf_config is None:
        raise TfkarpaError("strategy=multi_worker needs TF_CONFIG describing the cluster and "
                           "this process's task (see README: Scale out)")
    cluster = tf_config["cluster"]
    workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    coordinated = [job for job in ("chief", "worker") if job in cluster]
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context

    # Configured here rather than left to the strategy so that a lost worker is noticed in
    # `timeout` seconds (the heartbeat) instead of hanging the others in a collective.
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=f"/job:{'chief' if 'chief' in cluster else 'worker'}/replica:0/task:0",
        heartbeat_timeout_in_ms=timeout * 1000,
        cluster_register_timeout_in_ms=timeout * 1000,
        shutdown_barrier_timeout_in_ms=timeout * 1000,
        coordinated_jobs=[coordination_config_pb2.CoordinatedJob(
            name=job, num_tasks=len(cluster[job])) for job in coordinated],
    )
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except RuntimeError as err:
        raise TfkarpaError(f"strategy=multi_worker must start before TensorFlow runs anything "
                           f"else in this process: {err}") from None
    return Placement(strategy, "multi_worker", strategy.num_replicas_in_sync, workers,
                     is_chief(tf_config), dict(tf_config["task"]))


_MIRRORED: dict[tuple, tf.distribute.MirroredStrategy] = {}


def resolve(strategy: str, devices: list[str] = (), tpu: str = "",
            timeout: int = 60) -> Placement:
    """The strategy for `strategy=NAME`; `auto` picks what the machine has."""
    devices = list(devices or [])
    tf_config = read_tf_config() if strategy in ("auto", "multi_worker") else None
    if strategy == "auto":
        gpus = tf.config.list_physical_devices("GPU")
        if tf_config and sum(len(v) for k, v in tf_config["cluster"].items()
                             if k in ("chief", "worker")) > 1:
            strategy = "multi_worker"
        elif tpu or os.environ.get("TPU_NAME"):
            strategy = "tpu"
        elif devices:
            strategy = "mirrored" if len(devices) > 1 else "one_device"
        else:
            strategy = "mirrored" if len(gpus) > 1 else "one_device" if gpus else "default"
        log.info("strategy=auto chose %s", strategy)
    if strategy == "default":
        return Placement(tf.distribute.get_strategy(), "default", 1)
    if strategy == "one_device":
        if len(devices) > 1:
            raise TfkarpaError("config key 'devices': one_device takes one device, got "
                               f"{', '.join(devices)}")
        if devices:
            device = _ensure_devices(devices)[0]
        else:
            device = "/gpu:0" if tf.config.list_physical_devices("GPU") else "/cpu:0"
        return Placement(tf.distribute.OneDeviceStrategy(device), "one_device", 1, devices=[device])
    if strategy == "mirrored":
        names = _ensure_devices(devices) if devices else None
        key = tuple(names or ())
        # One per device set and process: two MirroredStrategy objects over the same devices
        # number their collective ops alike, and the second one's clash with the first's.
        mirrored = _MIRRORED.get(key) or _MIRRORED.setdefault(
            key, tf.distribute.MirroredStrategy(names))
        return Placement(mirrored, "mirrored", mirrored.num_replicas_in_sync,
                         devices=list(mirrored.extended.worker_devices))
    if strategy == "multi_worker":
        return _multi_worker(tf_config, timeout)
    if strategy == "tpu":
        return _tpu(tpu, timeout)
    raise TfkarpaError(f"config key 'strategy': unknown strategy '{strategy}' "
                       f"(choose {', '.join(STRATEGIES)})")

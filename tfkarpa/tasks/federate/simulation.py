"""Clients in this process: a Flower `Grid` that hands each message to the `ClientApp` at once.

Flower's own simulation engine runs ClientApps as Ray actors; it needs `flwr[simulation]`,
which pins Ray 2.55.1 (a large install) and starts a Ray cluster per run, and on a small machine
each TensorFlow client in its own actor costs more memory and start-up than the training. Here
the clients share one process and one model, one after another, which is what a 2-core machine
can run anyway. Messages are deep-copied on the way in and out, as a wire would, so no client
sees another's records (the SecAgg+ mod changes the records it reads).
"""

from __future__ import annotations

import copy
import uuid

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from tfkarpa.tasks.federate.client import PARTITION_KEY

SERVER_NODE = 0
_FIRST_NODE = 1000


class InProcessGrid(Grid):
    """`clients` nodes, node i holding partition i, each with its own Flower context (state)."""

    def __init__(self, app, clients: int, run_id: int = 1):
        self.app = app
        self.contexts = {
            _FIRST_NODE + i: Context(run_id=run_id, node_id=_FIRST_NODE + i,
                                     node_config={PARTITION_KEY: i, "num-partitions": clients},
                                     state=RecordDict(), run_config={})
            for i in range(clients)}
        self._run = Run.create_empty(run_id)
        self._replies: dict[str, Message] = {}
        self.bytes_down = self.bytes_up = 0  # model arrays sent to and received from clients
        # Flower stamps every message with the identity of the process's task.
        TaskIdentity.run_id, TaskIdentity.task_id = run_id, run_id
        TaskIdentity.node_id = SERVER_NODE

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message_id = str(uuid.uuid4())
            node = message.metadata.dst_node_id
            self.bytes_down += _array_bytes(message)
            TaskIdentity.node_id = node
            try:  # a client's exception stops the run here: in one process it is a bug, not a
                reply = self.app(copy.deepcopy(message), self.contexts[node])  # lost device
            finally:
                TaskIdentity.node_id = SERVER_NODE
            self.bytes_up += _array_bytes(reply)
            self._replies[message_id] = copy.deepcopy(reply)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def _array_bytes(message: Message) -> int:
    if message.has_error():
        return 0
    return sum(record.count_bytes() for record in message.content.array_records.values())

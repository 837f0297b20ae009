"""Data: sources (`sources`, `tfrecord`, `detection`, `annotations`, `shapes`) turn a source
string into checked splits (`splits`); `pipeline` makes batched tf.data datasets of them."""

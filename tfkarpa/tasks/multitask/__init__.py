"""Multi-task learning: one backbone, several heads (classes and values), one run
(`task=multitask`); data, model and trainer, evaluation, exports and the task object."""

"""The family contract: what a model family declares and what it gets, in one layer.

A family (``diffsplit/families/<name>/``) imports from here and from the planner, never from storage,
training or the stages; storage, training, tasks and the run import from here, never from a family.

* :mod:`.family`: :class:`~.family.Family` and its parts (task units, tiny builder, example, sampling);
* :mod:`.components`: :class:`~.components.ComponentSpec`, one component of a pipeline;
* :mod:`.options`: the options dataclass convention and a family's own flags;
* :mod:`.context`: :class:`~.context.UnitContext`, what a unit runs with, and the declared-options guard;
* :mod:`.sizing`, :mod:`.buckets`, :mod:`.images`: training sizes and image -> tensor, the pure functions a
  family's resize unit calls and the dataset reader checks rows with.

This package's ``__init__`` imports nothing, so importing one module never pulls in the others.
"""

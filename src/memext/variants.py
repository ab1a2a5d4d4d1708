"""Every family of variants, by its registry: what ``memext info`` lists and the help points to.

It imports from every layer that has a registry, so only the command line (the top) imports it.
"""

from __future__ import annotations

from memext.registry import Registry


def registries() -> list[Registry]:
    """The registries, lowest layer first; importing them registers every built-in variant."""
    from memext.adapters import MODEL_KINDS
    from memext.data.tasks import TASKS
    from memext.evals.suite_tasks import SUITE_TASKS
    from memext.infer.cache import CACHES
    from memext.nn.attention import ATTENTION
    from memext.nn.memory import MEMORY
    from memext.nn.rope_scaling import ROPE_SCALING
    from memext.pipelines.aggregators import AGGREGATORS

    return [ATTENTION, MEMORY, ROPE_SCALING, CACHES, TASKS, MODEL_KINDS, SUITE_TASKS, AGGREGATORS]

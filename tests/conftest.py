import collections

import jax
import pytest

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles: collections.Counter = collections.Counter()


def _listener(event, duration, **kwargs):
    if event == _COMPILE_EVENT:
        _compiles[kwargs.get("fun_name", "?")] += 1


jax.monitoring.register_event_duration_secs_listener(_listener)


class CompileCounter:
    """Counts XLA compilations (by function name) from the moment it is created."""

    def __init__(self):
        self._start = collections.Counter(_compiles)

    def __call__(self, fun_name=None):
        now = _compiles - self._start
        if fun_name is None:
            return sum(now.values())
        return sum(v for k, v in now.items() if fun_name in k)


@pytest.fixture
def compiles():
    return CompileCounter


def step_counts(opt_state, names):
    """`{name: step count}` of the first per-leaf (Adam) state in `opt_state`; `names` in the
    params' flatten order (sorted, for a Trainer's state)."""
    from lrmult.resync import find
    from lrmult.transforms import CohortState

    node = find(opt_state, CohortState)[0][1]
    return {
        name: int(node.states[c].count)
        for name, c in zip(names, node.spec.cohorts, strict=True)
        if c >= 0
    }

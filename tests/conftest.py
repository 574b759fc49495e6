import collections
import os

# Tests compile hundreds of small steps and run each a few times: XLA:CPU's optimizing passes
# cost more than they save here (about a fifth of the suite). Set before any backend starts;
# subprocesses and notebook kernels inherit it. Numbers are compared to float32 rounding or
# between two runs under the same flags, never to an optimized build's exact bits.
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
    ]
).strip()

import jax  # noqa: E402
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

"""optax transformations that run inside a step: per-leaf multipliers and the structural freeze.

- `scale_by_lr_mult` / `add_decayed_weights`: multipliers resolved through the lookup chain at
  `init`, kept in the state as float32 scalars per leaf (so changing them never recompiles).
- `per_leaf`: runs a transformation per cohort of leaves, so each leaf has its own step count.
- `trainable_only`: frozen leaves hold no state and take no part in the inner chain.

Each state node (`MultState`, `CohortState`, `TrainableState`) has a `spec` of static data:
small, immutable and compared by value (names, shapes, flags; the inner transformation's `init`
function, which `lrmult.refresh` needs to give newly trainable leaves fresh state), plus, for a
state built from a ParamDict, its `Binding` (`binding.py`): whenever JAX flattens the state, a
multiplier node hands out the ParamDict's current multipliers, and a frozen-set change makes the
next update raise, naming the call to make. Between steps, `lrmult.refresh` (`resync.py`) rebuilds
a state for a new frozen set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrmult import flax_trees, lookup, schedules
from lrmult.binding import Binding, binder
from lrmult.lookup import Leaf, Rows, is_masked, is_position


def flatten(tree: Any) -> tuple[list[Any], Any]:
    """`jax.tree.flatten` down to positions: arrays, MaskedNodes (frozen) and `Rows` groups."""
    return jax.tree.flatten(tree, is_leaf=is_position)


def _position_paths(tree: Any) -> list[Any]:
    """The key path of each position of `tree`, in `flatten`'s order."""
    return [p for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_position)[0]]


def check_param_dict(param_dict: Any, where: str) -> None:
    """Raise unless `param_dict` is None or a mapping name -> Parameter."""
    if param_dict is not None and not isinstance(param_dict, Mapping):
        raise TypeError(f"{where}: param_dict must be a ParamDict, got {type(param_dict).__name__}")


def place_like(value: Any, like: Any, dtype: Any = np.float32) -> jax.Array:
    """`value` as an array placed for the step that takes `like` as an input.

    Replicated over the mesh of a `NamedSharding` parameter (no collective is added), left to
    jit for anything else, and built with `jnp` while tracing (`jax.jit(tx.init)`,
    `jax.eval_shape`), where jit's `out_shardings` decide the placement.
    """
    if isinstance(like, jax.core.Tracer):
        return jnp.asarray(value, dtype)
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    elif not getattr(like, "committed", False) or len(sharding.device_set) > 1:
        sharding = None  # uncommitted, as jit's outputs are when its inputs were
    return jax.device_put(np.asarray(value, dtype), sharding)


def register_structural(
    cls: type, child: str, spec_type: type, now: Callable[[Any], Any], built: Callable[[Any], Any]
) -> None:
    """Register a state node whose structure a ParamDict setting decides (frozen, anchored set).

    Its aux is its spec; a setting changed since (`now(spec) != built(spec)`) makes the aux
    differ, so a jitted step retraces and the update raises (the spec's `check_fresh`).

    Args:
      cls: the node class, built as `cls(child_value, spec)`.
      child: the attribute holding the node's arrays.
      spec_type: the spec's class.
      now: the setting as the ParamDict says now.
      built: the setting the node was built for.
    """

    def flat(s: Any, with_keys: bool) -> tuple:
        current = now(s.spec)
        aux = s.spec if current == built(s.spec) else (s.spec, current)
        value = getattr(s, child)
        return ((jax.tree_util.GetAttrKey(child), value) if with_keys else value,), aux

    jax.tree_util.register_pytree_with_keys(
        cls,
        lambda s: flat(s, True),
        lambda aux, children: cls(children[0], aux if isinstance(aux, spec_type) else aux[0]),
        flatten_func=lambda s: flat(s, False),
    )


# -- multipliers -----------------------------------------------------------------------------------


def _concrete(tree: Any) -> bool:
    """Whether `tree`'s arrays are values (not tracers of a jit/vmap being traced)."""
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


# Multipliers per buffer of the state. Each position of the tree reads its multiplier as a static
# slice of a small block: few buffers (one per BLOCK leaves, not one per leaf), and few distinct
# slice offsets, so XLA compiles about BLOCK variants of each per-leaf kernel, not one per leaf.
BLOCK = 8


class Slot(NamedTuple):
    """Where one position's multiplier sits in a `MultState`'s blocks, and what it is.

    The multiplier is `constant · kind(t)`. `constant` (shaped `shape`) sits in a block at
    `start`. A `schedules.Schedule` kind's numbers sit in the same block, in the same columns,
    as rows `row .. row + numbers` of it: a block holding schedules is 2-D, `(1 + rows, width)`,
    its row 0 the constants, so a schedule costs no buffer of its own (each buffer costs a step
    time). Each kind is evaluated over the block as one vector op: an `INLINE` helper's inside
    the kernel of each leaf that reads it, any other once per step into a buffer of its own.

    Attributes:
      block: which block.
      start: the first entry (column) in that block.
      shape: the multiplier's shape: () for a leaf, its stacked axes for a stacked leaf, (rows,)
        for a group of layers.
      rows: the group's rows (of `total`), or None for a whole leaf.
      total: the number of layers of the group's leaf (0 for a whole leaf).
      kind: None (a constant), a `schedules.Schedule` subclass, or a user's schedule function.
      numbers: how many rows the kind keeps in the block (its numbers and derived rows; 0: none).
      row: the first of the block's rows holding them.
    """

    block: int
    start: int
    shape: tuple[int, ...]
    rows: tuple[int, ...] | None = None
    total: int = 0
    kind: Any = None
    numbers: int = 0
    row: int = 0

    @property
    def size(self) -> int:
        """The number of entries of the constant."""
        return int(np.prod(self.shape, dtype=np.int64))

    def take(self, value: Any) -> Any:
        """A leaf's multiplier (scalar, per layer, or schedule) as this position holds it."""
        if self.rows is None:
            return value
        if schedules.is_schedule(value):
            return _Rows(value, self.rows, self.total)
        flat = np.asarray(value, np.float32).reshape(-1)
        flat = np.broadcast_to(flat, (self.total,)) if flat.size == 1 else flat
        return flat[list(self.rows)]


def _pieces(vector: jax.Array, cuts: list[tuple[int, int]]) -> dict[int, jax.Array]:
    """`start -> vector[start:start + size]` for each `(start, size)` in `cuts` (disjoint).

    One `lax.split` for all of them: one op to trace per block row instead of a `lax.slice`
    per position (jnp indexing would trace ~0.4 ms a read); XLA sees the same slices.
    """
    sizes, ends, at = [], {}, 0
    for start, size in sorted(set(cuts)):
        if start > at:
            sizes.append(start - at)
        ends[start], at = len(sizes), start + size
        sizes.append(size)
    if at < vector.shape[0]:
        sizes.append(vector.shape[0] - at)
    parts = [vector] if len(sizes) == 1 else jax.lax.split(vector, sizes)
    return {start: parts[i] for start, i in ends.items()}


def _materialized(v: jax.Array, after: jax.Array | None = None) -> jax.Array:
    """`v`, computed once into a buffer of its own, after `after`'s (if given) has been.

    XLA copies a cheap producer into each of its consumers, and so inlines a schedule formula
    made of cheap ops into the kernel of each leaf that reads it (the schedules' `INLINE`
    helpers count on it). A formula with an expensive op (a divide, a power, a user's function)
    it does not copy: it gets a kernel of its own anyway, and `v / 1` makes that one small
    kernel per block; the 1 is `|v| * 0 + 1`, which XLA cannot fold away (`x * 0` is not 0 for
    floats). Exact for finite `v`.

    Such kernels have no input in common but the step count; left independent, XLA:CPU's
    thunk executor hands them to its worker threads, and the step then waits for the threads
    (+5% at 200 leaves). `after`, the previous one, chains them: `v` gets an exact 0 read from
    it, finite whatever `after` holds (one block's bad value stays in its block), and they run
    one after another on the step's own thread.
    """
    if after is not None:
        v = v + 0.0 * jnp.nan_to_num(after[0], nan=0.0, posinf=0.0, neginf=0.0)
    return v / (jnp.abs(v) * 0.0 + 1.0)


def _row(block: jax.Array, row: int) -> jax.Array:
    """Row `row` of a 2-D block (a 1-D block is its own row 0)."""
    if block.ndim == 1:
        return block
    return jax.lax.index_in_dim(block, row, axis=0, keepdims=False)


def _spread(m: jax.Array, shape: tuple[int, ...], like: jax.Array) -> jax.Array:
    """A position's flat multiplier `m` (see `Slot.value`) broadcast to `like`'s shape.

    A scalar multiplier (`shape == ()`) broadcasts to every entry; a stacked leaf's per-layer
    multiplier (`shape`: its stacked axes) to the leading axes of `like`.
    """
    if not shape:
        if like.ndim == 0:
            return jax.lax.reshape(m, ())
        return jax.lax.broadcast_in_dim(m, like.shape, (like.ndim - 1,))
    if len(shape) > 1:
        m = jax.lax.reshape(m, shape)
    return jax.lax.broadcast_in_dim(m, like.shape, tuple(range(len(shape))))


class _Rows:
    """A schedule for some rows of a stacked leaf (a group of layers)."""

    __slots__ = ("schedule", "rows", "total")

    def __init__(self, schedule: Any, rows: tuple[int, ...], total: int) -> None:
        self.schedule, self.rows, self.total = schedule, rows, total


def _parts(held: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, Any, np.ndarray | None]:
    """`schedules.parts` of a position's multiplier (a group's rows taken)."""
    if not isinstance(held, _Rows):
        return schedules.parts(held, shape)
    full = (held.total,)
    constant, kind, numbers = schedules.parts(held.schedule, full)
    rows = list(held.rows)
    return constant[rows], kind, None if numbers is None else numbers[:, rows]


def layout(lengths: list[int | None]) -> tuple[list[int], list[tuple[int, int]]]:
    """Pack positions taking the given numbers of entries (None: frozen) into blocks.

    Returns:
      `(sizes of the blocks, (block, start) of each position)` (`(-1, 0)` for None): small
      multipliers share blocks of `BLOCK` entries; a position of `BLOCK` entries or more (a
      stacked leaf's vector) has a block of its own.
    """
    sizes: list[int] = []
    places: list[tuple[int, int]] = []
    open_block, used = -1, BLOCK
    for n in lengths:
        if n is None:
            places.append((-1, 0))
            continue
        if n >= BLOCK:
            sizes.append(n)
            places.append((len(sizes) - 1, 0))
            continue
        if used + n > BLOCK:
            sizes.append(BLOCK)
            open_block, used = len(sizes) - 1, 0
        places.append((open_block, used))
        used += n
    return sizes, places


def _shape_of(position: Any, value: Any) -> tuple[int, ...]:
    """A position's multiplier shape: a group's rows, else the value's (a stack's layers)."""
    if position:
        return (len(position[0]),)
    if schedules.is_schedule(value):
        return tuple(np.shape(getattr(value, "factor", 1.0))) or _stack_shape(value)
    return tuple(np.shape(value))


def _stack_shape(value: Any) -> tuple[int, ...]:
    if isinstance(value, schedules.Schedule):
        shapes = [np.shape(v) for v in value.numbers.values()]
        return max(shapes, key=len) if shapes else ()
    return ()


def plan_slots(
    positions: tuple[Any, ...], held: list[Any]
) -> tuple[tuple[Slot | None, ...], tuple[tuple[int, int], ...]]:
    """The slots and blocks `(rows of schedule numbers, width)` for `positions` holding `held`.

    Args:
      positions: each position as `_positions` gives it (None: frozen).
      held: each position's multiplier (`_held`).
    """
    kinds = []
    for position, h in zip(positions, held, strict=True):
        if h is None:
            kinds.append(None)
            continue
        shape = _shape_of(position, h)
        _, kind, numbers = _parts(h, shape)
        kinds.append((shape, kind, 0 if numbers is None else len(numbers)))
    lengths = [None if k is None else int(np.prod(k[0], dtype=np.int64)) for k in kinds]
    sizes, places = layout(lengths)
    # Each kind of schedule present in a block gets rows of its own in it, below the constants:
    # a position reads its numbers at its own columns (one of BLOCK offsets, as its constant).
    kind_rows: list[dict[Any, int]] = [{} for _ in sizes]
    extra = [0] * len(sizes)
    slots = []
    for position, k, (block, start) in zip(positions, kinds, places, strict=True):
        if k is None:
            slots.append(None)
            continue
        shape, kind, numbers = k
        rows, total = position or (None, 0)
        row = 0
        if numbers:
            if kind not in kind_rows[block]:
                kind_rows[block][kind] = 1 + extra[block]
                extra[block] += numbers
            row = kind_rows[block][kind]
        slots.append(Slot(block, start, shape, rows, total, kind, numbers, row))
    return tuple(slots), tuple(zip(extra, sizes, strict=True))


@dataclasses.dataclass(frozen=True)
class MultSpec:
    """Static data of a `MultState`: which multiplier, for which leaves, with which overrides.

    Attributes:
      attr: `lr_mult` or `wd_mult`.
      leaves: the leaves of the tree given to `init` (index, name, shape, path name).
      overrides: the transformation's override dict, as sorted `(key, value)` pairs.
      idx2name: the transformation's `idx2name`, as sorted pairs, or None.
      binding: the live link to the ParamDict the state tracks, or None.
      rate: the base rate this multiplier scales (the chain's learning rate for `lr_mult`, its
        weight decay for `wd_mult`), a number or schedule, for `explain`; None when unknown.
      slots: each position's `Slot` in the blocks (None where the position is frozen).
      blocks: each block's `(rows of schedule numbers, width)`: `(width,)` float32 without
        schedules, `(1 + rows, width)` with.
      positions: each position's rows and total (a group of layers) or None, to re-plan slots.
    """

    attr: str
    leaves: tuple[Leaf, ...]
    overrides: tuple[tuple[int | str, float], ...]
    idx2name: tuple[tuple[int, str], ...] | None
    binding: Binding | None = None
    rate: Any = None
    slots: tuple[Slot | None, ...] = ()
    blocks: tuple[tuple[int, int], ...] = ()
    positions: tuple[Any, ...] = ()

    def leaves_for(self, param_dict: Mapping[str, Any] | None) -> list[Leaf]:
        """The leaves as `param_dict` indexes them (a ParamDict's order is the one users count)."""
        return lookup.leaves_named(
            [leaf.path for leaf in self.leaves],
            [leaf.shape for leaf in self.leaves],
            param_dict,
            None if self.idx2name is None else dict(self.idx2name),
        )

    def pack(self, held: list[Any]) -> list[np.ndarray]:
        """The blocks holding each position's multiplier (padding: 1.0, numbers 0.0)."""
        blocks = []
        for rows, width in self.blocks:
            block = np.zeros((1 + rows, width), np.float32)
            block[0] = 1.0
            blocks.append(block if rows else block[0])
        for slot, h in zip(self.slots, held, strict=True):
            if slot is None:
                continue
            constant, _, numbers = _parts(h, slot.shape)
            block, columns = blocks[slot.block], slice(slot.start, slot.start + slot.size)
            (block if block.ndim == 1 else block[0])[columns] = np.reshape(constant, -1)
            if numbers is not None:
                rows = slice(slot.row, slot.row + slot.numbers)
                block[rows, columns] = np.reshape(numbers, (slot.numbers, -1))
        return blocks

    def multipliers(self, values: list[Any], t: jax.Array, rate: Any = 1.0) -> list[Any]:
        """Each position's multiplier at step `t` times `rate`, flat (`slot.size` entries).

        Each kind of schedule is evaluated over a block's columns as one vector op, times the
        block's constants, and each vector a position reads is cut once. An `INLINE` helper's
        formula is left for XLA to inline into the kernels of the leaves reading it (no kernel
        of its own); any other (a power, a user's function) is computed once into a buffer of
        its own (`_materialized`).

        Args:
          values: the blocks, as the state holds them.
          t: the step count (float32).
          rate: a scalar applied to the constants once, not to each position.
        """
        constants = [_row(block, 0) for block in values]
        if not (isinstance(rate, (int, float)) and rate == 1.0):
            constants = [c * rate for c in constants]
        # (block, row) -> the vector its positions read: row 0 the constants, a helper's
        # first row its values (a slot without numbers has row 0).
        vectors: dict[tuple[int, int], jax.Array] = {}
        cuts: dict[tuple[int, int], list[tuple[int, int]]] = {}
        last = None
        for slot in self.slots:
            if slot is None:
                continue
            key = (slot.block, slot.row)
            if key not in vectors:
                vectors[key] = constants[slot.block]
                if slot.numbers:
                    block = values[slot.block]
                    numbers = [_row(block, slot.row + i) for i in range(slot.numbers)]
                    v = vectors[key] * slot.kind.formula(t, numbers)
                    if not slot.kind.INLINE:
                        v = last = _materialized(v, last)
                    vectors[key] = v
            cuts.setdefault(key, []).append((slot.start, slot.size))
        pieces = {key: _pieces(vectors[key], cut) for key, cut in cuts.items()}
        out = []
        for slot in self.slots:
            if slot is None:
                out.append(None)
                continue
            m = pieces[slot.block, slot.row][slot.start]
            if slot.kind is not None and not slot.numbers:  # a user's schedule function
                f = jnp.asarray(slot.kind(t), jnp.float32)
                if f.ndim and slot.rows is not None:
                    f = f.reshape(-1)[np.array(slot.rows)]
                m = last = _materialized(m * jnp.broadcast_to(f, slot.shape).reshape(-1), last)
            out.append(m)
        return out

    def unpack(self, values: list[np.ndarray], t: int) -> list[np.ndarray | None]:
        """Each position's multiplier at step `t`, on the host (None where frozen)."""
        tt = jnp.asarray(t, jnp.float32)
        ms = self.multipliers([jnp.asarray(v) for v in values], tt)
        return [
            None if slot is None else np.asarray(m, np.float32).reshape(slot.shape)
            for slot, m in zip(self.slots, ms, strict=True)
        ]


def _position_slot(position: Any) -> Slot:
    """A slot that only knows which rows a position holds (for `Slot.take`)."""
    if position == ():
        return Slot(0, 0, ())
    rows, total = position
    return Slot(0, 0, (len(rows),), rows, total)


def _held(positions: tuple[Any, ...], values: list[Any]) -> list[Any]:
    """Each position's multiplier from its leaf's (None where the position is frozen)."""
    return [
        None if p is None else _position_slot(p).take(v)
        for p, v in zip(positions, values, strict=True)
    ]


def _positions(flat: list[Any]) -> tuple[Any, ...]:
    """Each position of a flattened tree: None (frozen), `()` (a leaf) or `(rows, total)`."""
    return tuple(
        None if is_masked(x) else ((tuple(x.rows), x.total) if isinstance(x, Rows) else ())
        for x in flat
    )


def _placed(blocks: list[np.ndarray], like: Any) -> list[jax.Array]:
    return [place_like(b, like) for b in blocks]


def _reference(tree: Any) -> Any:
    """An array of `tree` whose placement the blocks follow (None when all is frozen)."""
    for x in flatten(tree)[0]:
        if isinstance(x, Rows):
            return x.value
        if not is_masked(x):
            return x
    return None


class MultState:
    """Per-leaf multipliers, packed into a few small float32 blocks (`MultSpec.slots`).

    Changing a multiplier's value, or a `lrmult.schedules` helper's numbers, changes a block's
    values, never its shape: no recompilation. Putting a schedule in place of a number changes
    the slots (the step compiles once for each such layout). With a binding, `live()` (what JAX
    sees when it flattens the node) holds the ParamDict's current multipliers.
    """

    __slots__ = ("values", "spec", "version")

    def __init__(self, values: list[jax.Array], spec: MultSpec) -> None:
        # A list, not a tuple: flax NNX writes updated state back into the containers in place.
        self.values = values if isinstance(values, list) else list(values)
        self.spec = spec
        self.version = spec.binding.version if spec.binding is not None else 0

    def held(self, t: int = 0) -> list[np.ndarray | None]:
        """Each position's multiplier at step `t`, on the host (None: frozen)."""
        live = self.live()
        blocks = jax.device_get([b.addressable_data(0) for b in jax.tree.leaves(live.values)])
        return live.spec.unpack(blocks, t)

    def tree(self, like: Any, t: int = 0) -> Any:
        """The multipliers at step `t`, as a tree shaped like `like` (the params of `init`)."""
        flat, treedef = flatten(like)
        out = []
        for x, h in zip(flat, self.held(t), strict=True):
            if isinstance(x, Rows):
                out.append(Rows(h, x.rows, x.total))
            else:
                out.append(x if h is None else h)
        return treedef.unflatten(out)

    def refreshed(
        self, param_dict: Mapping[str, Any], overrides: Mapping | None = None
    ) -> MultState:
        """This node with `param_dict`'s multipliers (unchanged blocks keep their arrays).

        A schedule put in place of a number (or the reverse) gives new slots: a new spec.

        Args:
          param_dict: the ParamDict to read.
          overrides: override dict replacing the transformation's own (the Trainer's).
        """
        spec = self.spec
        leaves = spec.leaves_for(param_dict)
        lookup.check_leaves_named(leaves, param_dict, "refresh")
        overrides = dict(spec.overrides) if overrides is None else overrides
        lookup.warn_shadowed(spec.attr, overrides, leaves, param_dict)
        values = lookup.multiplier_values(spec.attr, leaves, param_dict, overrides)
        held = _held(spec.positions, values)
        slots, blocks = plan_slots(spec.positions, held)
        arrays, treedef = jax.tree.flatten(self.values)
        if slots != spec.slots or blocks != spec.blocks:
            new_spec = dataclasses.replace(spec, slots=slots, blocks=blocks)
            ref = arrays[0] if arrays else None
            return MultState(_placed(new_spec.pack(held), ref), new_spec)
        new = spec.pack(held)
        # Through jax.tree, so wrappers around the blocks (nnx.Optimizer's) are kept.
        old = jax.device_get([b.addressable_data(0) for b in arrays])  # one transfer
        out, changed = list(arrays), False
        for i, (o, n) in enumerate(zip(old, new, strict=True)):
            if not np.array_equal(np.asarray(o, np.float32), n):
                out[i], changed = place_like(n, arrays[i]), True
        return MultState(treedef.unflatten(out), spec) if changed else self

    def live(self) -> MultState:
        """This node with the multipliers to apply now: the ParamDict's current ones when bound."""
        binding = self.spec.binding
        if binding is None or (self.version == binding.version and not binding.changed()):
            return self
        if not _concrete(self.values):
            return self  # inside a trace: the values JAX passed in are current
        return binding.current(lambda pd: self.refreshed(pd), self, self.spec.positions)

    def __repr__(self) -> str:
        return f"MultState({self.spec.attr}, {len(self.values)} blocks)"


def _flatten_mult(s: MultState, with_keys: bool) -> tuple:
    live = s.live()
    child = (jax.tree_util.GetAttrKey("values"), live.values) if with_keys else live.values
    return (child,), live.spec


jax.tree_util.register_pytree_with_keys(
    MultState,
    lambda s: _flatten_mult(s, True),
    lambda spec, children: MultState(children[0], spec),
    flatten_func=lambda s: _flatten_mult(s, False),
)


class ClockState(NamedTuple):
    """The step count at which a multiplier transformation evaluates schedules."""

    count: jax.Array


def _clock() -> ClockState:
    return ClockState(count=jnp.zeros([], jnp.int32))


def _sorted_items(mapping: Mapping | None) -> tuple:
    return tuple(sorted((mapping or {}).items(), key=repr))


def _multiplier_init(
    attr: str,
    param_dict: Any,
    overrides: Any,
    idx2name: Any,
    where: str,
    track: bool,
    rate: Any = None,
):
    """Shared `init` of `scale_by_lr_mult` and `add_decayed_weights`, validated when built."""
    check_param_dict(param_dict, where)
    overrides = lookup.normalize_overrides(attr, overrides)
    idx2name = lookup.check_idx2name(idx2name)
    lookup.check_overrides_against(attr, overrides, param_dict, idx2name)
    bind = binder(param_dict, track)

    def init(params: Any) -> MultState:
        params = flax_trees.unbox_variables(params, is_masked)
        leaves = lookup.leaves_of(params, param_dict, idx2name)
        lookup.check_idx2name_range(idx2name, leaves)
        lookup.check_leaves_named(leaves, param_dict, where)
        lookup.override_leaves(attr, overrides, leaves, param_dict)
        flat = flatten(params)[0]
        values = lookup.multiplier_values(attr, leaves, param_dict, overrides)
        positions = _positions(flat)
        held = _held(positions, values)
        slots, blocks = plan_slots(positions, held)
        spec = MultSpec(
            attr,
            tuple(leaves),
            _sorted_items(overrides),
            None if idx2name is None else _sorted_items(idx2name),
            bind(tuple(leaves)),
            rate if isinstance(rate, float | int) or callable(rate) else None,
            slots,
            blocks,
            positions,
        )
        return MultState(_placed(spec.pack(held), _reference(params)), spec)

    return init


def _scaled(
    spec: MultSpec, values: list, t: jax.Array, tree: Any, fn: Callable, rate: Any = 1.0
) -> Any:
    """`fn(x, m)` for each position `x` of `tree` that holds a slot.

    `m` is the position's multiplier times `rate` (a scalar, applied to the blocks' constants
    once, not to each leaf), spread to `x`'s shape.
    """
    flat, treedef = flatten(tree)
    out = []
    for x, slot, m in zip(flat, spec.slots, spec.multipliers(values, t, rate), strict=True):
        if slot is None or is_masked(x):
            out.append(x)
            continue
        value = x.value if isinstance(x, Rows) else x
        m = _spread(m, slot.shape, value)
        out.append(Rows(fn(value, m), x.rows, x.total) if isinstance(x, Rows) else fn(value, m))
    return treedef.unflatten(out)


def _times(x: jax.Array, m: jax.Array) -> jax.Array:
    """`x * m` in float32 (m's dtype), as jnp's promotion of a low-precision `x` would."""
    return jax.lax.mul(jax.lax.convert_element_type(x, m.dtype), m)


def scale_by_lr_mult(
    param_dict: Mapping[str, Any] | None = None,
    *,
    lr_mult: Mapping[int | str, float] | None = None,
    idx2name: Mapping[int, str] | None = None,
    track: bool = True,
    rate: Any = None,
) -> optax.GradientTransformation:
    """Multiply each leaf's update by its `lr_mult` (a number, array or schedule).

    Place it after any adaptive preconditioner (the ready chains put it last, after the learning
    rate), so `lr_mult` scales the step, never the gradient. A frozen leaf's update is zeroed;
    the ready chains (`lrmult.adam`, ...) go further and drop its state. A schedule is evaluated
    at this transformation's step count (0 at the first update).

    Args:
      param_dict: a ParamDict whose Parameters' `lr_mult` come first in the lookup chain.
      lr_mult: override dict, parameter index or name -> multiplier (links 2 and 3 of the chain).
      idx2name: index -> name, for trees whose path names are not the parameter names.
      track: keep the state in step with `param_dict`: a changed multiplier applies at the next
        update, in any jitted step, without `lrmult.refresh` (the Trainer tracks changes itself).
      rate: the base learning rate (a number or schedule) applied before this link, recorded
        so that `explain` can show effective rates; it does not scale anything here.

    Returns:
      An `optax.GradientTransformation` whose state is `(MultState, ClockState)`: the
      multipliers in a few float32 blocks (`BLOCK` leaves a buffer) and the step count.
    """
    init = _multiplier_init(
        "lr_mult", param_dict, lr_mult, idx2name, "scale_by_lr_mult", track, rate
    )

    def init_fn(params):
        return init(params), _clock()

    def update_fn(updates, state, params=None):
        del params
        mults, clock = state
        live = mults.live()
        t = clock.count.astype(jnp.float32)
        out = _scaled(
            live.spec,
            live.values,
            t,
            updates,
            lambda u, m: jax.lax.convert_element_type(_times(u, m), u.dtype),
        )
        return out, (mults, ClockState(optax.safe_increment(clock.count)))

    return optax.GradientTransformation(init_fn, update_fn)


def check_weight_decay(weight_decay: Any, where: str) -> None:
    """A weight decay is a number >= 0, an array or a schedule; raise naming `where` otherwise."""
    if callable(weight_decay):
        return
    if not isinstance(weight_decay, (int, float, jax.Array, np.ndarray)) or isinstance(
        weight_decay, bool
    ):
        raise TypeError(
            f"{where}: weight_decay must be a number, got {type(weight_decay).__name__}"
        )
    if isinstance(weight_decay, (int, float)) and not (
        weight_decay >= 0 and np.isfinite(weight_decay)
    ):
        raise ValueError(f"{where}: weight_decay must be >= 0, got {weight_decay!r}")


def add_decayed_weights(
    weight_decay: float | jax.Array = 0.0,
    param_dict: Mapping[str, Any] | None = None,
    *,
    wd_mult: Mapping[int | str, float] | None = None,
    idx2name: Mapping[int, str] | None = None,
    track: bool = True,
) -> optax.GradientTransformation:
    """Add `weight_decay * wd_mult * param` to each leaf's update (optax's, per leaf).

    A leaf whose Parameter has `decay_to_init` is decayed toward its value when the state was
    built, w₀, instead of toward zero: `weight_decay * wd_mult * (param - w₀)` (L2-SP). The state
    keeps w₀ for those leaves only (`AnchorState`). Which leaves are anchored is the state's
    structure, as the frozen set is: after changing `decay_to_init`, call `lrmult.refresh` (an
    update raises until then, naming the parameter); the Trainer does it itself.

    Args:
      weight_decay: the base rate λ: a number, or a schedule step -> rate (evaluated, as the
        `wd_mult` schedules, at this transformation's step count).
      param_dict: a ParamDict whose Parameters' `wd_mult` come first in the lookup chain, and
        whose `decay_to_init` chooses the leaves decayed toward w₀.
      wd_mult: override dict, parameter index or name -> multiplier (a number or schedule).
      idx2name: index -> name, for trees whose path names are not the parameter names.
      track: keep the state in step with `param_dict` (see `scale_by_lr_mult`).

    Returns:
      An `optax.GradientTransformation`; frozen leaves get no decay. Its state is
      `(MultState, ClockState)`, then the `AnchorState` when there is a `param_dict`.
    """
    check_weight_decay(weight_decay, "add_decayed_weights")
    mult_init = _multiplier_init(
        "wd_mult", param_dict, wd_mult, idx2name, "add_decayed_weights", track, weight_decay
    )
    scheduled = callable(weight_decay)
    anchor_init = None
    if param_dict is not None:
        anchor_init = _anchor_init(param_dict, lookup.check_idx2name(idx2name), track)

    def init(params):
        out = (mult_init(params), _clock())
        return out if anchor_init is None else (*out, anchor_init(params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(grads, state, params)")
        mults, clock = state[0], state[1]
        anchors = state[2] if anchor_init is not None else None
        rate = weight_decay(clock.count) if scheduled else weight_decay
        toward = params if anchors is None else anchors.pulled(params)  # w - w₀ where anchored
        live = mults.live()
        t = clock.count.astype(jnp.float32)
        if jnp.ndim(rate) == 0:
            decayed = _scaled(live.spec, live.values, t, toward, _times, rate)
        else:  # an array rate broadcasts against each leaf
            decayed = _scaled(live.spec, live.values, t, toward, lambda p, d: rate * _times(p, d))
        out = jax.tree.map(lambda u, dp: (u + dp).astype(u.dtype), updates, decayed)
        return out, (mults, ClockState(optax.safe_increment(clock.count)), *state[2:])

    return optax.GradientTransformation(init, update_fn)


# -- decay toward w₀ (L2-SP) -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AnchorSpec:
    """Static data of an `AnchorState`: which positions keep w₀, and how to anchor others later.

    Attributes:
      anchored: whether each params position keeps its w₀: its Parameter has `decay_to_init`,
        and the position is not frozen.
      present: whether each position holds an array (False where `init` saw a MaskedNode: a
        frozen leaf, which keeps nothing; a new frozen set builds the state anew).
      rows: `(rows, total)` for a position that is a group of layers of a stacked leaf, None for
        a whole leaf.
      dtypes: each position's dtype name ('' where absent).
      leaves: the leaves of the tree given to `init`.
      binding: the live link to the ParamDict the state tracks, or None.
      paths: each position's `keystr` path: an anchored position's key in the state's anchors.
    """

    anchored: tuple[bool, ...]
    present: tuple[bool, ...]
    rows: tuple[tuple[tuple[int, ...], int] | None, ...]
    dtypes: tuple[str, ...]
    leaves: tuple[Leaf, ...]
    binding: Binding | None = None
    paths: tuple[str, ...] = ()

    def wanted(self, param_dict: Mapping[str, Any] | None) -> tuple[bool, ...]:
        """The positions `param_dict` says to anchor now."""
        flags = lookup.anchored_mask(list(self.leaves), param_dict)
        return tuple(p and f for p, f in zip(self.present, flags, strict=True))

    def anchored_now(self) -> tuple[bool, ...]:
        """The anchored set the ParamDict says now (the one the state was built for if unbound)."""
        if self.binding is None:
            return self.anchored
        return self.binding.current(self.wanted, self.anchored)

    def check_fresh(self) -> None:
        """Raise, naming the first changed parameter, if the anchored set changed since.

        Anchoring a parameter adds its w₀ to the state, changing the state's structure, which a
        jitted step cannot do by itself; the fix is one call between steps.
        """
        now = self.anchored_now()
        if now == self.anchored:
            return
        leaf, was = next(
            (lf, a) for lf, a, n in zip(self.leaves, self.anchored, now, strict=True) if a != n
        )
        raise ValueError(
            f"parameter {leaf.name!r} had decay_to_init={was} when this optimizer state was "
            f"built and has decay_to_init={not was} now: the state keeps w₀ only for parameters "
            f"decayed toward it, so its structure must change, and nothing was updated. Call "
            f"opt_state = lrmult.refresh(opt_state, param_dict, params=params) (nnx.Optimizer: "
            f"lrmult.refresh_optimizer(optimizer, param_dict, params=nnx.state(model, nnx.Param)))"
            f" before the next update; a newly anchored parameter takes its value then as w₀"
        )


class AnchorState:
    """The w₀ of the anchored positions (`decay_to_init`), `{position's keystr path: w₀}`.

    Only anchored parameters cost memory (one copy of their value, in their dtype and
    placement) and host time: a step flattens one entry per anchored position, none for others.
    """

    __slots__ = ("anchors", "spec")

    def __init__(self, anchors: dict[str, Any], spec: AnchorSpec) -> None:
        self.anchors = anchors
        self.spec = spec

    def pulled(self, params: Any) -> Any:
        """`params` with w₀ subtracted where anchored, so that the decay pulls toward w₀.

        Raises:
          ValueError: the anchored set changed since the state was built (`check_fresh`), or
            `params` does not have the state's positions.
        """
        spec = self.spec
        spec.check_fresh()
        flat, treedef = flatten(params)
        if len(flat) != len(spec.anchored):
            raise ValueError(
                f"add_decayed_weights: params has {len(flat)} leaves, the state was built for "
                f"{len(spec.anchored)}"
            )
        if not self.anchors:
            return params
        out = list(flat)
        for i, (p, a) in enumerate(zip(flat, spec.anchored, strict=True)):
            if not a or is_masked(p):
                continue
            w0 = self.anchors[spec.paths[i]]
            if isinstance(p, Rows):
                out[i] = Rows((p.value - w0.value).astype(p.value.dtype), p.rows, p.total)
            else:
                out[i] = (p - w0).astype(p.dtype)
        return treedef.unflatten(out)

    def refreshed(
        self, param_dict: Mapping[str, Any], values: Mapping[str, Any] | None = None
    ) -> AnchorState:
        """This node with the anchored set `param_dict` says now.

        Positions that stay anchored keep their w₀, positions no longer anchored drop it, and
        newly anchored ones take their value now as w₀.

        Args:
          param_dict: the ParamDict to read.
          values: `{leaf path: array}`, the values being trained (the optax level); a leaf not
            in it takes its Parameter's value.
        """
        spec = self.spec
        lookup.check_leaves_named(list(spec.leaves), param_dict, "refresh")
        now = spec.wanted(param_dict)
        if now == spec.anchored:
            return self
        out = {}
        for i, (was, new) in enumerate(zip(spec.anchored, now, strict=True)):
            key = spec.paths[i]
            if new:
                out[key] = self.anchors[key] if was else _anchor_for(spec, i, param_dict, values)
        return AnchorState(out, dataclasses.replace(spec, anchored=now))

    def __repr__(self) -> str:
        return f"AnchorState({sum(self.spec.anchored)} anchored of {len(self.spec.anchored)})"


register_structural(
    AnchorState, "anchors", AnchorSpec, lambda spec: spec.anchored_now(), lambda spec: spec.anchored
)


def _copied(x: Any) -> Any:
    """A position's value as a w₀ of its own (a Trainer donates the parameter's buffer)."""
    if isinstance(x, Rows):
        return Rows(jnp.array(x.value, copy=True), x.rows, x.total)
    return jnp.array(x, copy=True)


def value_now(leaf: Leaf, param_dict: Mapping[str, Any], values: Mapping[str, Any] | None) -> Any:
    """A leaf's value now: `values[leaf.path]` when values are given, else its Parameter's.

    Raises:
      KeyError: `values` has no such leaf.
    """
    if values is None:
        return param_dict[leaf.name].peek()
    if leaf.path not in values:
        raise KeyError(
            f"refresh: params has no leaf {leaf.path!r} (parameter {leaf.name!r}); pass the whole "
            f"tree the optimizer state steps"
        )
    return values[leaf.path]


def _anchor_for(
    spec: AnchorSpec, i: int, param_dict: Mapping[str, Any], values: Mapping[str, Any] | None
) -> Any:
    """w₀ for position `i` of `spec`, taken from its value now.

    Args:
      spec: the state's spec.
      i: the position.
      param_dict: where a leaf's Parameter gives its value.
      values: `{leaf path: array}` given instead (the values being trained), or None.

    Raises:
      ValueError: the value's shape or dtype is not the parameter's, naming it.
    """
    leaf, rows, dtype = spec.leaves[i], spec.rows[i], spec.dtypes[i]
    value = value_now(leaf, param_dict, values)
    got = tuple(np.shape(value))
    # A group's rows are of the stacked axes flattened: (layers, *one layer's shape).
    shape = tuple(leaf.shape) if rows is None else (rows[1], *leaf.shape[1:])
    fits = got == shape if rows is None else np.prod(got) == np.prod(shape)
    if not fits or (rows is not None and got[len(got) - len(shape) + 1 :] != shape[1:]):
        raise ValueError(
            f"refresh: parameter {leaf.name!r} has shape {got}, but the state was built for "
            f"{shape if rows is None else f'{rows[1]} layers of shape {shape[1:]}'}"
        )
    if str(jnp.result_type(value)) != dtype:
        raise ValueError(
            f"refresh: parameter {leaf.name!r} has dtype {jnp.result_type(value)}, but the state "
            f"was built for {dtype}"
        )
    if rows is None:
        return _copied(value)
    layers = jnp.reshape(value, shape)
    return Rows(layers[np.array(rows[0])], rows[0], rows[1])


def _anchor_init(
    param_dict: Mapping[str, Any], idx2name: Mapping[int, str] | None, track: bool
) -> Callable[[Any], AnchorState]:
    """`init` of the anchors: w₀ a copy of the params given, where `decay_to_init` says.

    Built from the params given alone, so `jax.eval_shape(init)` and `jax.jit(init)` work; under
    `jax.jit`, w₀ is the value passed in.
    """
    bind = binder(param_dict, track)

    def init(params: Any) -> AnchorState:
        params = flax_trees.unbox_variables(params, is_masked)
        leaves = tuple(lookup.leaves_of(params, param_dict, idx2name))
        flat, treedef = flatten(params)
        present = tuple(not is_masked(x) for x in flat)
        rows = tuple((tuple(x.rows), x.total) if isinstance(x, Rows) else None for x in flat)
        dtypes = tuple(
            "" if is_masked(x) else str(jnp.result_type(x.value if isinstance(x, Rows) else x))
            for x in flat
        )
        paths = tuple(jax.tree_util.keystr(p) for p in _position_paths(params))
        spec = AnchorSpec((), present, rows, dtypes, leaves, bind(leaves), paths)
        spec = dataclasses.replace(spec, anchored=spec.wanted(param_dict))
        anchors = {
            path: _copied(x) for x, a, path in zip(flat, spec.anchored, paths, strict=True) if a
        }
        return AnchorState(anchors, spec)

    return init


# -- per-leaf step counts --------------------------------------------------------------------------


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class CohortSpec:
    """Static data of a `CohortState`.

    Attributes:
      cohorts: each params position's cohort label (-1: frozen).
      init: the inner transformation's `init`, to give a new cohort fresh state.
      paths: each position's key path (`keystr`), by which a refresh keeps cohorts.
    """

    cohorts: tuple[int, ...]
    init: Callable[[Any], Any]
    paths: tuple[str, ...] = ()


class CohortState(NamedTuple):
    """`inner`'s state once per cohort: the leaves that became trainable at the same time.

    Leaves of one cohort always have equal step counts, so they share one optax state (one
    count, one traced update: as fast as plain optax). A leaf unfrozen later joins a new cohort
    whose count starts at zero: its bias correction restarts, as in PyTorch and MXNet.
    `states` maps a cohort's label to its state, built on the params tree with every leaf
    outside the cohort replaced by `optax.MaskedNode`.
    """

    states: dict[int, Any]
    spec: CohortSpec


def members(tree: Any, cohorts: tuple[int, ...], label: int) -> Any:
    """`tree` with every leaf outside cohort `label` replaced by `optax.MaskedNode`."""
    flat, treedef = flatten(tree)
    return treedef.unflatten(
        [x if c == label else optax.MaskedNode() for x, c in zip(flat, cohorts, strict=True)]
    )


def per_leaf(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Give each leaf its own run of `inner`, step count included.

    optax's `scale_by_adam` keeps one step count for the whole tree; under `per_leaf` a leaf that
    joins training later (unfrozen, through `refresh` or a Trainer) starts its bias correction
    afresh, as in PyTorch and MXNet. Leaves whose counts are equal by construction (those that
    joined together) share one state, so the common case costs exactly what `inner` costs.
    """

    def init_fn(params):
        params = flax_trees.unbox_variables(params, is_masked)
        flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_position)[0]
        cohorts = tuple(-1 if is_masked(x) else 0 for _, x in flat)
        paths = tuple(jax.tree_util.keystr(p) for p, _ in flat)
        states = {0: inner.init(params)} if 0 in cohorts else {}
        return CohortState(states, CohortSpec(cohorts, inner.init, paths))

    def update_fn(updates, state, params=None):
        cohorts = state.spec.cohorts
        flat, treedef = flatten(updates)
        out = list(flat)
        new_states = {}
        for label, st in state.states.items():
            u, new_states[label] = inner.update(
                members(updates, cohorts, label),
                st,
                None if params is None else members(params, cohorts, label),
            )
            for i, (x, c) in enumerate(zip(flatten(u)[0], cohorts, strict=True)):
                if c == label:
                    out[i] = x
        return treedef.unflatten(out), CohortState(new_states, state.spec)

    return optax.GradientTransformation(init_fn, update_fn)


# -- the structural freeze -------------------------------------------------------------------------


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static data of a `TrainableState`: the frozen mask and how to build state for a new one.

    Attributes:
      frozen: whether each params position is frozen (a tuple of flags over the flattened
        layers of a stacked leaf with some layers frozen).
      leaves: the leaves of the tree given to `init`.
      dtypes: each leaf's dtype name ('' where `init` saw a MaskedNode).
      treedef: the params' structure (MaskedNode kept as a leaf).
      init: the inner chain's `init`.
      binding: the live link to the ParamDict the state tracks, or None.
      labels: for a leaf whose layers train in groups, each layer's group label (-1: frozen;
        layers that joined training together share a label); None for a whole leaf.
      stacks: each leaf's number of stacked axes (its layers are the rows of those axes).
    """

    frozen: tuple[bool | tuple[bool, ...], ...]
    leaves: tuple[Leaf, ...]
    dtypes: tuple[str, ...]
    treedef: Any
    init: Callable[[Any], Any]
    binding: Binding | None = None
    labels: tuple[tuple[int, ...] | None, ...] = ()
    stacks: tuple[int, ...] = ()

    def frozen_now(self) -> tuple[bool, ...]:
        """The frozen set the ParamDict says now (the one the state was built for if unbound)."""
        if self.binding is None:
            return self.frozen
        return self.binding.current(
            lambda pd: lookup.frozen_mask(list(self.leaves), pd), self.frozen
        )

    def check_fresh(self) -> None:
        """Raise, naming the first changed parameter, if the frozen set changed since.

        A frozen-set change changes the state's structure, which a jitted step cannot do by
        itself; the fix is one call between steps.
        """
        now = self.frozen_now()
        if now == self.frozen:
            return
        leaf, was, new = next(
            (lf, f, n) for lf, f, n in zip(self.leaves, self.frozen, now, strict=True) if f != n
        )

        def says(flag: Any) -> str:
            if isinstance(flag, tuple):
                return f"frozen in layers {[i for i, f in enumerate(flag) if f]}"
            return "frozen" if flag else "trainable"

        raise ValueError(
            f"parameter {leaf.name!r} was {says(was)} when this optimizer state was built and is "
            f"{says(new)} now: the state's "
            f"structure must change, so nothing was updated. Call "
            f"opt_state = lrmult.refresh(opt_state, param_dict) (nnx.Optimizer: "
            f"lrmult.refresh_optimizer(optimizer, param_dict)) before the next update"
        )

    def mask(self) -> Any:
        """The trainable mask as a tree (optax.masked's `mask`); a leaf in groups is trainable."""
        return self.treedef.unflatten([fz is not True for fz in self.frozen])

    def _per_leaf(self, n: int) -> tuple[list[Any], list[int]]:
        labels = list(self.labels) if self.labels else [None] * n
        stacks = list(self.stacks) if self.stacks else [0] * n
        return labels, stacks

    def grouped(self, tree: Any) -> Any:
        """`tree` (params or updates) as the inner chain sees it.

        A leaf whose layers train in groups becomes `{label: Rows(its rows)}`, frozen layers in
        no group; every other leaf stays as it is.
        """
        flat = self.treedef.flatten_up_to(tree)
        labels, stacks = self._per_leaf(len(flat))
        out = []
        for x, lab, stack in zip(flat, labels, stacks, strict=True):
            if lab is None or is_masked(x):
                out.append(x)
                continue
            rows = x.reshape((len(lab), *x.shape[stack:]))
            out.append({k: Rows(_take(rows, m), m, len(lab)) for k, m in _groups(lab).items()})
        return self.treedef.unflatten(out)

    def ungrouped(self, tree: Any, like: Any) -> Any:
        """`grouped`'s inverse for updates: groups scattered back, zeros in frozen layers.

        Args:
          tree: the inner chain's updates, grouped.
          like: the updates given to the chain (each leaf's shape and dtype).
        """
        flat = self.treedef.flatten_up_to(tree)
        like_flat = self.treedef.flatten_up_to(like)
        labels, stacks = self._per_leaf(len(flat))
        out = []
        for x, ref, lab, stack in zip(flat, like_flat, labels, stacks, strict=True):
            if lab is None or is_masked(ref):
                out.append(x)
                continue
            out.append(_put(x.values(), len(lab), ref, stack).reshape(ref.shape))
        return self.treedef.unflatten(out)


def zero_frozen_layers(updates: Any, state: Any) -> Any:
    """`updates` with the frozen layers of stacked leaves zeroed (per `state`'s frozen masks).

    A Trainer calls it on the gradients before clipping, so frozen layers take no part in the
    global norm, as frozen leaves take none.
    """
    nodes = jax.tree_util.tree_flatten(state, is_leaf=lambda x: isinstance(x, TrainableState))[0]
    for node in nodes:
        if not isinstance(node, TrainableState):
            continue
        spec = node.spec
        if not any(isinstance(fz, tuple) for fz in spec.frozen):
            return updates
        flat = spec.treedef.flatten_up_to(updates)
        out = []
        for g, fz, stack in zip(flat, spec.frozen, spec.stacks or [0] * len(flat), strict=True):
            if isinstance(fz, tuple) and not is_masked(g):
                keep = jnp.asarray(~np.array(fz)).reshape(g.shape[:stack] + (1,) * (g.ndim - stack))
                g = jnp.where(keep, g, jnp.zeros_like(g))
            out.append(g)
        return spec.treedef.unflatten(out)
    return updates


def _runs(rows: tuple[int, ...]) -> list[tuple[int, int]]:
    """`rows` as `[start, stop)` runs of consecutive rows."""
    out: list[tuple[int, int]] = []
    for r in rows:
        if out and out[-1][1] == r:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out


def _take(rows: jax.Array, members: tuple[int, ...]) -> jax.Array:
    """The member rows: a static slice for consecutive rows, a gather only for scattered ones."""
    runs = _runs(members)
    if len(runs) == 1:
        return rows[runs[0][0] : runs[0][1]]
    return rows[np.array(members)]


def _put(groups: Any, total: int, ref: jax.Array, stack: int) -> jax.Array:
    """The groups' rows back in one array of `total` rows, zeros elsewhere.

    Runs of consecutive rows are concatenated (no scatter), which XLA fuses like a plain update.
    """
    pieces: dict[int, tuple[int, jax.Array]] = {}
    for group in groups:
        value = group.value.astype(ref.dtype)
        offset = 0
        for start, stop in _runs(group.rows):
            pieces[start] = (stop, value[offset : offset + stop - start])
            offset += stop - start
    parts, at, rest = [], 0, ref.shape[stack:]
    for start in sorted(pieces):
        stop, value = pieces[start]
        if start > at:
            parts.append(jnp.zeros((start - at, *rest), ref.dtype))
        parts.append(value)
        at = stop
    if at < total:
        parts.append(jnp.zeros((total - at, *rest), ref.dtype))
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def _groups(labels: tuple[int, ...]) -> dict[int, tuple[int, ...]]:
    """`{label: the rows with that label}` of a leaf's layers (-1, frozen, in none)."""
    out: dict[int, list[int]] = {}
    for row, label in enumerate(labels):
        if label >= 0:
            out.setdefault(label, []).append(row)
    return {k: tuple(v) for k, v in sorted(out.items())}


def layer_labels(frozen: Any, previous: tuple[int, ...] | None, new_label: int) -> Any:
    """A leaf's group labels for its frozen flags: None for a whole leaf, else per layer.

    Args:
      frozen: the leaf's flag, or a tuple of flags over its layers.
      previous: its labels before (None: it was a whole leaf, all layers in group 0 if trained).
      new_label: the label of layers that join training now.
    """
    if not isinstance(frozen, tuple):
        if previous is None or frozen:
            return None
        frozen = (False,) * len(previous)  # wholly trainable again: its groups stay
    old = previous if previous is not None else (0,) * len(frozen)
    pairs = zip(old, frozen, strict=True)
    return tuple(-1 if f else (o if o >= 0 else new_label) for o, f in pairs)


class TrainableState:
    """The state of the inner chain, over the trainable leaves only (frozen: MaskedNode)."""

    __slots__ = ("inner", "spec")

    def __init__(self, inner: Any, spec: MaskSpec) -> None:
        self.inner = inner
        self.spec = spec

    def __repr__(self) -> str:
        frozen = sum(fz is True for fz in self.spec.frozen)
        return f"TrainableState(frozen={frozen}, inner={self.inner!r})"


register_structural(
    TrainableState, "inner", MaskSpec, lambda spec: spec.frozen_now(), lambda spec: spec.frozen
)


def _check_matches(tree: Any, spec: MaskSpec) -> None:
    flat = flatten(tree)[0]
    if len(flat) == len(spec.frozen):
        return
    got = {leaf.path for leaf in lookup.leaves_of(tree, None, None)}
    want = [leaf.path for leaf in spec.leaves]
    missing = [n for n in want if n not in got]
    extra = sorted(got - set(want))
    detail = f"leaf {missing[0]!r} is missing" if missing else f"leaf {extra[0]!r} is unexpected"
    raise ValueError(
        f"trainable_only: the tree does not match the state: {detail} ({len(flat)} leaves, "
        f"the state was built for {len(spec.frozen)})"
    )


def _mask_spec(params: Any, param_dict: Any, idx2name: Any, init: Callable, bind) -> MaskSpec:
    """The `MaskSpec` of `params` with `param_dict`'s frozen set."""
    leaves = lookup.leaves_of(params, param_dict, idx2name)
    lookup.check_leaves_named(leaves, param_dict, "trainable_only")
    frozen = lookup.frozen_mask(leaves, param_dict)
    flat, treedef = flatten(params)
    dtypes = tuple("" if is_masked(x) else str(jnp.result_type(x)) for x in flat)
    labels = tuple(layer_labels(fz, None, 0) for fz in frozen)
    stacks = tuple(
        param_dict[leaf.name].stacked if param_dict is not None and leaf.name in param_dict else 0
        for leaf in leaves
    )
    binding = bind(tuple(leaves))
    return MaskSpec(tuple(frozen), tuple(leaves), dtypes, treedef, init, binding, labels, stacks)


def trainable_only(
    inner: optax.GradientTransformation,
    param_dict: Mapping[str, Any] | None,
    *,
    idx2name: Mapping[int, str] | None = None,
    track: bool = True,
) -> optax.GradientTransformation:
    """Apply `inner` to the trainable leaves only (`optax.masked`); frozen leaves hold no state.

    Frozen is read from `param_dict` at `init` (and at `refresh`) and kept in the state's static
    spec. Frozen leaves stand in the inner state as `optax.MaskedNode`: no moments, no step count,
    no part in global-norm clipping. Their update is a MaskedNode where the gradient was one (a
    Trainer never computes it) and exact zeros where an array was given. `idx2name` names the
    leaves as for the multipliers (the whole lookup chain applies). With `track`, an update
    after the frozen set changed raises before updating, naming the parameter and the call that
    rebuilds the state (`lrmult.refresh`).
    """
    check_param_dict(param_dict, "trainable_only")
    idx2name = lookup.check_idx2name(idx2name)
    bind = binder(param_dict, track)

    def init_fn(params):
        params = flax_trees.unbox_variables(params, is_masked)
        spec = _mask_spec(params, param_dict, idx2name, inner.init, bind)
        grouped = spec.grouped(params)
        return TrainableState(optax.masked(inner, spec.mask()).init(grouped).inner_state, spec)

    def update_fn(updates, state, params=None, **extra_args):
        spec = state.spec
        spec.check_fresh()
        _check_matches(updates, spec)
        masked = optax.masked(inner, spec.mask())
        out, new = masked.update(
            spec.grouped(updates),
            optax.MaskedState(state.inner),
            None if params is None else spec.grouped(params),
            **extra_args,
        )
        flat, treedef = jax.tree.flatten(spec.ungrouped(out, updates), is_leaf=is_masked)
        zeroed = [
            jnp.zeros_like(x) if fz is True and not is_masked(x) else x
            for x, fz in zip(flat, spec.frozen, strict=True)
        ]
        return treedef.unflatten(zeroed), TrainableState(new.inner_state, spec)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

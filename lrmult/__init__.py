"""lrmult: MXNet Gluon's per-parameter lr_mult, wd_mult and frozen for JAX, on optax."""

import optax as _optax

from lrmult import presets, schedules
from lrmult.flax_interop import NNXTrainer, from_linen, from_nnx, refresh_optimizer
from lrmult.optimizers import adagrad, adam, adamw, lamb, lion, nag, rmsprop, sgd
from lrmult.paramdict import ParamDict
from lrmult.parameter import Parameter
from lrmult.report import ExplainRow, explain
from lrmult.resync import refresh
from lrmult.rules import apply_rules
from lrmult.trainer import Trainer
from lrmult.transforms import add_decayed_weights, per_leaf, scale_by_lr_mult, trainable_only

# A frozen leaf's place in an optimizer state: optax's own empty node, under lrmult's old name.
FrozenLeaf = _optax.MaskedNode

__all__ = [
    "ExplainRow",
    "FrozenLeaf",
    "NNXTrainer",
    "ParamDict",
    "Parameter",
    "Trainer",
    "adagrad",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_rules",
    "explain",
    "from_linen",
    "from_nnx",
    "lamb",
    "lion",
    "nag",
    "per_leaf",
    "presets",
    "refresh",
    "refresh_optimizer",
    "rmsprop",
    "scale_by_lr_mult",
    "schedules",
    "sgd",
    "trainable_only",
]

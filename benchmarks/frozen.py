"""4. Frozen backbone: every layer but the last frozen, against training everything

Adam. The Trainer differentiates the trainable leaves only; the optax-level `lrmult.adam` gets
full gradients from a hand-jitted step. Speed-up: the baseline's step time / this one's.
Moments: the state's arrays with more entries than the model has leaves, which must be Adam's
two moments of the trainable leaves only; the rest (step counts, learning rate, multipliers) is
bookkeeping.
"""

from __future__ import annotations

import sys

import harness as h
import optax

import lrmult


def run(quick: bool) -> h.Report:
    model = h.MLP(4, 64, 16) if quick else h.MLP(8, 512, 128)
    rounds, block_s = (4, 0.01) if quick else (16, 0.05)
    params, batch = model.init(), model.batch_data()

    def backbone_frozen() -> lrmult.ParamDict:
        pd = h.param_dict(params)
        for name, p in pd.items():
            p.frozen = not name.startswith(f"layers/{model.layers - 1}/")
        return pd

    adam = {"learning_rate": h.LR}
    runners = {
        "optax.adam, all trainable": h.OptaxRunner(optax.adam(h.LR), params, batch),
        "Trainer, all trainable": h.TrainerRunner(h.param_dict(params), "adam", adam, batch),
        "Trainer, backbone frozen": h.TrainerRunner(backbone_frozen(), "adam", adam, batch),
        "lrmult.adam (optax level), backbone frozen": h.OptaxRunner(
            lrmult.adam(h.LR, param_dict=backbone_frozen()), params, batch
        ),
    }
    t, base = h.interleave(runners, rounds, block_s), "optax.adam, all trainable"
    trainable_bytes = h.tree_bytes(params["layers"][-1])
    rep, rows = h.Report(__doc__, figures={"trainable_bytes": trainable_bytes}), []
    for k, r in runners.items():
        state, moments = h.tree_bytes(r.state), h.tree_bytes(r.state, min_size=model.leaves)
        rows.append([k, h.fmt_time(h.median(t[k])), *h.ratio(t[base], t[k], 2)])
        rows[-1] += h.ratio(t["Trainer, all trainable"], t[k], 2) + [h.fmt_bytes(state)]
        rows[-1] += [f"{moments / trainable_bytes:.2f}", h.fmt_bytes(state - moments)]
        rep.figures[k] = {"state_bytes": state, "moment_bytes": moments}
        if "frozen" in k:
            rep.checks[f"{k}: moments = 2 × trainable bytes"] = moments == 2 * trainable_bytes
    header = ["variant", "step", "speed-up vs optax all med", "… min", "vs Trainer all med"]
    header += ["… min", "optimizer state", "moments / trainable bytes", "bookkeeping"]
    rep.text += [
        f"{model.describe()}; trainable {h.fmt_bytes(trainable_bytes)} of "
        f"{h.fmt_bytes(h.tree_bytes(params))}; {rounds} rounds.",
        h.table(header, rows),
    ]
    return rep


if __name__ == "__main__":
    sys.exit(h.main(run, __doc__))

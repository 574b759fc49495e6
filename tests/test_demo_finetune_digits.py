"""Smoke test of README's first command's demo, examples/finetune_digits.py, with few steps."""

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_digits.py"


def load_example():
    spec = importlib.util.spec_from_file_location("finetune_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_digits_runs_and_writes_its_png(tmp_path, capsys):
    demo = load_example()
    png = tmp_path / "finetune_digits.png"
    finals = demo.main(steps=8, pretrain_steps=10, seeds=1, eval_every=4, png=png, progress=False)
    assert list(finals) == list(demo.STRATEGIES)
    assert all(0.0 <= acc <= 1.0 for acc in finals.values())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert out.count("Trainer.explain") == len(demo.STRATEGIES)  # before each fine-tuning
    assert "preset:layerwise_lr_decay" in out and "preset:linear_probe" in out
    assert "preset:gradual_unfreezing" in out and "gradual unfreezing" in out  # the plan's table
    for column in ("held-out accuracy", "step time (ms)", "optimizer state"):
        assert column in out
    assert demo.PNG == EXAMPLE.with_suffix(".png")  # the default: next to the script


def test_finetune_digits_frozen_backbone_holds_only_the_heads_state():
    demo = load_example()
    _, _, train, test = demo.load(2, 0)
    pretrained = demo.MLP(5, rngs=demo.nnx.Rngs(0))
    runs = {
        s: demo.finetune(s, pretrained, (train, test), 8, 0, 4, lambda: None, None)
        for s in demo.STRATEGIES
    }
    # AdamW holds two float32 moments per trained value: the head is 128 x 5 + 5 values.
    head = 2 * 4 * (128 * 5 + 5)
    everything = 2 * 4 * (64 * 128 + 128 + 2 * (128 * 128 + 128) + 128 * 5 + 5)
    state = {s: r["state_bytes"] for s, r in runs.items()}
    # + step counts and the multiplier blocks (eight float32 each, two kinds)
    assert head <= state["frozen backbone"] < head + 128
    assert everything <= state["all at 1x"] < everything + 256
    # The plan (stages of 8 // 4 = 2 steps) has unfrozen everything by step 6.
    assert runs["LLRD + gradual unfreezing"]["unfreeze_at"] == [2, 4, 6]
    assert everything <= state["LLRD + gradual unfreezing"] < everything + 512

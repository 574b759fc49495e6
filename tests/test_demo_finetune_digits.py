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
    finals = demo.main(steps=6, pretrain_steps=10, seeds=1, eval_every=3, png=png, progress=False)
    assert list(finals) == list(demo.STRATEGIES)
    assert all(0.0 <= acc <= 1.0 for acc in finals.values())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "Trainer.explain" in out and "LP-FT + LLRD" in out
    assert demo.PNG == EXAMPLE.with_suffix(".png")  # the default: next to the script

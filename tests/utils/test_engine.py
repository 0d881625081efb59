"""The training engine (dcube.utils.engine): one optimiser step, its checkpoint and resume, the best weights;
and no trainer runs its own optimiser step outside it."""

import re
from pathlib import Path

import torch

from dcube.utils.engine import Best, Engine
from dcube.utils.runtime import EMA

SRC = Path(__file__).resolve().parents[2] / "src" / "dcube"


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)


def _train(last: Path, total: int, stop: int | None = None, every: int = 2) -> torch.nn.Module:
    """`total` steps of a linear model from a fixed seed, checkpointed every `every` steps; stop early at `stop`."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    engine = Engine(model, torch.optim.AdamW(model.parameters(), lr=0.1), ema=EMA(model, 0.9), last=last)
    engine.resume()
    while engine.steps < (stop or total):
        x, y = _batch(engine.steps)
        loss = (model(x) - y).pow(2).mean()
        with engine.step():
            engine.backward(loss)
        engine.history.append({"step": engine.steps, "loss": loss.item()})
        if engine.steps % every == 0 or engine.steps == total:
            engine.save(note="extra")
    return engine


def test_a_step_is_one_optimiser_step_and_the_ema_follows():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    ref = torch.nn.Linear(3, 1)
    ref.load_state_dict(model.state_dict())
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.5), ema=EMA(model, 0.9))
    x, y = _batch(0)
    with engine.step():
        engine.backward((model(x) - y).pow(2).mean())
    (ref(x) - y).pow(2).mean().backward()
    with torch.no_grad():
        expected = [p - 0.5 * p.grad for p in ref.parameters()]
    assert engine.steps == 1
    assert all(torch.allclose(a, b) for a, b in zip(model.parameters(), expected))
    assert not torch.equal(engine.ema.module.weight, model.weight)  # the EMA lags the weights


def test_resume_from_the_checkpoint_gives_the_uninterrupted_run(tmp_path):
    whole = _train(tmp_path / "a.safetensors", 6)
    _train(tmp_path / "b.safetensors", 6, stop=4)  # "killed" after its checkpoint at step 4
    resumed = _train(tmp_path / "b.safetensors", 6)
    assert resumed.steps == whole.steps == 6 and resumed.history == whole.history
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(whole.ema.module.weight, resumed.ema.module.weight)
    assert resumed.resume()["note"] == "extra"


def test_best_keeps_the_strictly_higher_score_and_restores_its_weights():
    model = torch.nn.Linear(2, 1)
    best = Best(0.5, model)  # the starting point to beat
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight += 1
    assert not best.update(0.5, model, 1) and best.epoch == 0  # a tie does not replace
    assert best.update(0.7, model, 2) and best.epoch == 2
    with torch.no_grad():
        model.weight += 1
    best.restore(model)
    assert torch.equal(model.weight, first["weight"] + 1)


STEP = re.compile(r"(?<!engine)\.backward\(|\b(?:opt|optimizer|amp)\.step\(|\.zero_grad\(")  # engine.backward: fine


def test_no_trainer_runs_its_own_optimiser_step_outside_the_engine():
    found = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if STEP.search(p.read_text(encoding="utf-8"))}
    assert found == {"utils/engine.py", "utils/compute.py"}  # the step itself and its fp16 loss scaling

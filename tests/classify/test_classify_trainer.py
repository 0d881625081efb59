import pytest
import torch

from dcube.classify.trainer import BEST, LAST, FeatureSplit, head_probabilities, train_classifier
from dcube.config import ClassifierConfig
from dcube.utils.io import load_tensors


def _split(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    feats = [torch.randn(n, 4, 4, 4, generator=g) + y[:, None, None, None] * 1.5]
    images = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    return FeatureSplit(feats, images, y, [f.flip(-1) for f in feats])


def _score(y, p):
    acc = float(((p[:, 1] > 0.5) == (y == 1)).mean())
    return acc, acc


CFG = ClassifierConfig(subfeature="none", epochs=3, batch_size=16, cycle_weight=0)


def test_learns_and_selects_on_validation(tmp_path):
    torch.manual_seed(0)
    head, best = train_classifier(CFG, _split(64, 0), _split(32, 1), ["a", "b"], tmp_path, _score)
    assert best["epoch"] >= 1 and best["score"] >= 0.9
    assert (tmp_path / BEST).exists()
    probs = head_probabilities(head, _split(32, 2))
    assert torch.allclose(probs.sum(1), torch.ones(32))
    assert torch.equal(probs, head_probabilities(head, _split(32, 2)))  # deterministic prediction


def test_interrupted_classifier_resumes_to_identical_result(tmp_path):
    torch.manual_seed(0)
    straight, _ = train_classifier(CFG, _split(64, 0), _split(32, 1), ["a", "b"], tmp_path / "a", _score)

    def stop(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(CFG, _split(64, 0), _split(32, 1), ["a", "b"], tmp_path / "b", _score, on_epoch=stop)
    assert load_tensors(tmp_path / "b" / LAST)[1]["epoch"] == 1
    torch.manual_seed(99)
    resumed, _ = train_classifier(CFG, _split(64, 0), _split(32, 1), ["a", "b"], tmp_path / "b", _score)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_min_steps_repeats_a_small_split_within_each_epoch(tmp_path, monkeypatch):
    from dataclasses import replace

    import dcube.classify.trainer as mod
    from dcube.utils.io import read_json

    seen = []
    real = mod.epoch_batches
    monkeypatch.setattr(mod, "epoch_batches", lambda *a: seen.append(real(*a)) or seen[-1])
    cfg = replace(CFG, epochs=2, min_steps=9)  # 20 images in batches of 16: 2 steps per pass -> 3 passes
    train_classifier(cfg, _split(20, 0), _split(16, 1), ["a", "b"], tmp_path, _score)
    assert [r["epoch"] for r in read_json(tmp_path / "history.json")["history"]] == [1, 2]
    assert [len(b) for b in seen] == [6, 6]  # 12 optimiser steps >= 9
    assert all(sorted(torch.cat(b).tolist()) == sorted(list(range(20)) * 3) for b in seen)
    assert torch.equal(real(20, 16, 0, 1, 1)[0], torch.randperm(20, generator=torch.Generator().manual_seed(1))[:16])


def test_a_run_of_few_steps_names_min_steps(tmp_path, capsys):
    train_classifier(CFG, _split(20, 0), _split(16, 1), ["a", "b"], tmp_path / "few", _score)  # 3 epochs x 2 steps
    assert "6 optimiser steps in all" in capsys.readouterr().out
    from dataclasses import replace

    train_classifier(replace(CFG, min_steps=6), _split(20, 0), _split(16, 1), ["a", "b"], tmp_path / "set", _score)
    assert "classifier.min_steps" not in capsys.readouterr().out


def test_subfeature_auto_keeps_the_first_candidate_on_a_tie(tmp_path, monkeypatch):
    """train_auto: the higher best validation score wins; equal scores keep the first (the ImageNet CNN)."""
    from dcube.classify import trainer as tr
    from dcube.config import ClassifierConfig

    scores = {}

    def fake(cfg, train, val, names, out_dir, score_fn, **kw):
        out_dir.mkdir(parents=True)
        (out_dir / "history.json").write_text(cfg.subfeature)
        (out_dir / tr.BEST).write_bytes(cfg.subfeature.encode())
        return cfg.subfeature, {"score": scores[cfg.subfeature], "epoch": 1, "metric": "auc"}

    monkeypatch.setattr(tr, "train_classifier", fake)
    cfg = ClassifierConfig(subfeature="auto")
    for i, (eff, res, want) in enumerate([(0.8, 0.9, "resnet18"), (0.9, 0.8, "efficientnet-lite0"),
                                          (0.9, 0.9, "efficientnet-lite0")]):
        scores.update({"efficientnet-lite0": eff, "resnet18": res})
        head, best = tr.train_auto(cfg, None, None, ["a", "b"], tmp_path / str(i), None)
        assert head == want and best["score"] == max(eff, res)
        assert (tmp_path / str(i) / tr.BEST).read_bytes() == want.encode()
        assert tr.resolve_subfeature(cfg, tmp_path / str(i)).subfeature == want
    assert tr.resolve_subfeature(ClassifierConfig(), tmp_path / "0").subfeature == "efficientnet-lite0"

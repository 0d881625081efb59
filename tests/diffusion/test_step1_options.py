"""Step-1 options: the paper's contrastive loss (Eq. 4) with pairs drawn inside the batch, and the
latent denoiser trained purely class-conditionally."""


import pytest
import torch

from dcube.config import DiffusionConfig
from dcube.diffusion.losses import contrastive_loss_paper, pair_within_batch
from dcube.diffusion.trainer import make_batch, train_diffusion
from dcube.utils.io import read_json


def test_paper_contrastive_loss_equals_eq4_by_hand():
    f1 = torch.tensor([[0.0, 0.0], [0.1, 0.0], [1.0, 1.0]])
    f2 = torch.tensor([[0.3, 0.4], [0.0, 0.0], [1.0, 1.0]])
    same = torch.tensor([True, False, False])
    # D = ||f1 - f2||^2 = 0.25, 0.01, 0; same -> D, different -> max(0, 0.1 - D)
    expected = (0.25 + (0.1 - 0.01) + 0.1) / 3
    assert contrastive_loss_paper(f1, f2, same, margin=0.1).item() == pytest.approx(expected)
    assert contrastive_loss_paper(f1, f2, torch.tensor([False, False, False]), margin=0.1).item() == \
        pytest.approx((0.0 + 0.09 + 0.1) / 3)  # a distant different-class pair costs nothing


@pytest.mark.parametrize("n", [7, 16])
def test_pairs_within_the_batch_are_a_permutation(n):
    labels = torch.tensor([0, 1] * 8)[:n]
    a, b, rest = pair_within_batch(labels, torch.Generator().manual_seed(0))
    allrows = torch.cat([a, b, rest])
    assert sorted(allrows.tolist()) == list(range(n)) and len(rest) == n % 2
    same = labels[a] == labels[b]
    if n == 16:
        assert 0 < same.sum() < len(a)  # both kinds of pair occur


@pytest.mark.parametrize("form,once", [("paper", True), ("normalized", False)])
def test_every_training_image_is_seen_once_per_epoch(form, once):
    """Paper form: each image is denoised exactly once per epoch. The normalized form (dcube 0.1)
    replaces a quarter of every batch with partner copies, so some images are never seen."""
    cfg = DiffusionConfig(batch_size=16, contrastive_form=form)
    labels = torch.arange(64) % 3
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    seen = []
    for k in range(4):
        rows, y, t, noise, cond, q = make_batch(cfg, labels, order[16 * k:16 * (k + 1)],
                                                torch.Generator().manual_seed(k), 3, True, (1, 2, 2))
        assert torch.equal(y, labels[rows]) and torch.equal(t[:q], t[q:2 * q])
        assert torch.equal(noise[:q], noise[q:2 * q])
        seen += rows.tolist()
    counts = torch.bincount(torch.tensor(seen), minlength=64)
    assert (counts == 1).all().item() is once


def test_paper_form_trains_and_logs(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 16, 16, generator=g) * 2 - 1
    cfg = DiffusionConfig(backbone="unet", preset="micro", max_steps=3, batch_size=16, sample_grid=False,
                          contrastive_form="paper", contrastive_weight=1.0)
    train_diffusion(cfg, x, torch.arange(32) % 2, 2, tmp_path / "paper")
    hist = read_json(tmp_path / "paper" / "history.json")["history"]
    assert len(hist) == 3 and all(h["contrastive"] > 0 and h["mse"] > 0 for h in hist)


def test_latent_denoiser_trains_purely_class_conditionally(tmp_path, monkeypatch):
    from dcube.latent import diffusion as ld
    from dcube.latent.autoencoder import LatentCodec

    seen = {}

    def fake_train(cfg, *args, **kwargs):
        seen["contrastive_weight"] = cfg.contrastive_weight
        raise RuntimeError("stop")

    monkeypatch.setattr(ld, "train_diffusion", fake_train)
    with pytest.raises(RuntimeError, match="stop"):
        ld.train_latent_diffusion(DiffusionConfig(contrastive_weight=0.1), LatentCodec(None), torch.zeros(4, 1, 4, 4),
                                  torch.zeros(4, dtype=torch.long), 2, tmp_path)
    assert seen["contrastive_weight"] == 0.0


def test_auto_stop_keeps_the_argmax_of_the_validation_curve(tmp_path):
    from dcube.diffusion.trainer import BEST_EMA, FINAL, LAST
    from dcube.utils.io import load_tensors

    scores = iter([0.50, 0.70, 0.60, 0.65, 0.40, 0.99])  # best at the 2nd evaluation; patience 2 stops at the 4th
    calls = []

    def eval_fn(model):
        calls.append(1)
        return next(scores), {"layer": "x"}

    torch.manual_seed(0)
    x = torch.rand(32, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = DiffusionConfig(backbone="unet", preset="micro", epochs="auto", checkpoint_every=2, patience=2, batch_size=16,
                          sample_grid=False, max_steps=40)
    train_diffusion(cfg, x, torch.arange(32) % 2, 2, tmp_path, eval_fn=eval_fn)
    hist = read_json(tmp_path / "history.json")
    assert [p["score"] for p in hist["probe"]] == [0.50, 0.70, 0.60, 0.65] and len(calls) == 4
    assert hist["chosen_step"] == 4 and hist["steps"] == 8 and hist["stopped_early"]
    final, meta = load_tensors(tmp_path / FINAL)
    best, _ = load_tensors(tmp_path / BEST_EMA)
    last, _ = load_tensors(tmp_path / LAST)
    assert meta["chosen_step"] == 4
    assert all(torch.equal(final[k], best[k]) for k in best)  # the model step 2 uses is the best one...
    ema_last = {"model." + k[len("ema."):]: v for k, v in last.items() if k.startswith("ema.")}
    assert set(ema_last) == set(final)
    assert any(not torch.equal(final[k], v) for k, v in ema_last.items())  # ...not the one at the last step
    assert (tmp_path / "probe_curve.png").exists()
    with pytest.raises(ValueError, match="auto"):
        train_diffusion(cfg, x, torch.arange(32) % 2, 2, tmp_path / "b")


def test_auto_stop_in_the_pipeline_never_reads_the_test_split(shared_data, tmp_path):
    from dcube.config import from_dict
    from dcube.pipeline import DCube

    class NoTest:
        def __getattr__(self, name):
            raise AssertionError(f"step 1 read the test split ({name})")

    cfg = from_dict({
        "run_dir": str(tmp_path / "run"), "seed": 0,
        "data": {"source": "medmnist", "name": "pneumoniamnist", "download": False,
                 "path": str(shared_data / "medmnist" / "pneumoniamnist.npz"),
                 "max_train": 96, "max_val": 48, "max_test": 32},
        "diffusion": {"backbone": "unet", "preset": "micro", "epochs": "auto", "checkpoint_every": 2, "patience": 1,
                      "max_steps": 9, "batch_size": 32, "sample_grid": False}})
    r = DCube(cfg)
    r.data.test = NoTest()
    r.train_diffusion()
    hist = read_json(tmp_path / "run" / "diffusion" / "history.json")
    curve = [p["score"] for p in hist["probe"]]
    assert 0.5 < max(curve) <= 1.0 and hist["chosen_step"] == hist["probe"][curve.index(max(curve))]["step"]
    assert set(hist["probe"][0]["per_layer"]) == set(r.denoiser()[0].feature_names)


@pytest.mark.parametrize("form", ["normalized", "paper"])
def test_unlabelled_rows_go_to_the_null_class_and_are_never_paired(form):
    cfg = DiffusionConfig(batch_size=16, contrastive_form=form, class_dropout=0.0)
    labels = torch.tensor([0, 1] * 6 + [-1] * 4)
    rows, y, t, noise, cond, q = make_batch(cfg, labels, torch.arange(16), torch.Generator().manual_seed(0), 2,
                                            True, (1, 2, 2))
    assert sorted(rows.tolist()) == list(range(16)) or form == "normalized"
    assert (y[:2 * q] >= 0).all()  # every pair is labelled
    unl = y < 0
    assert unl.sum() == 4 and cond.shape[1] == 3
    assert torch.equal(cond[unl], torch.tensor([[0.0, 0.0, 1.0]] * 4))
    assert (cond[~unl, 2] == 0).all()


def test_unlabelled_images_reach_step_1_only(shared_data, tmp_path):
    """data.unlabelled_rest: the training images max_train leaves out join step 1 (null class) and
    never step 2, validation or test; an external data.unlabelled npz is added the same way."""
    import numpy as np

    from dcube.config import from_dict
    from dcube.pipeline import run

    extra = tmp_path / "extra.npz"
    np.savez(extra, images=np.random.default_rng(0).integers(0, 255, (5, 40, 40), dtype=np.uint8))
    npz = shared_data / "medmnist" / "breastmnist.npz"
    cfg = from_dict({
        "run_dir": str(tmp_path / "run"), "seed": 0,
        "data": {"source": "medmnist", "name": "breastmnist", "download": False, "path": str(npz),
                 "max_train": 60, "max_val": 40, "max_test": 40, "unlabelled_rest": True, "unlabelled": str(extra)},
        "diffusion": {"backbone": "unet", "preset": "micro", "epochs": 1, "batch_size": 64, "sample_grid": False},
        "classifier": {"subfeature": "none", "epochs": 1, "batch_size": 32}})
    out = run(cfg)
    info = read_json(tmp_path / "run" / "run.json")["data"]
    assert info["unlabelled"] == {"n": 546 - 60 + 5, "training_rest": 546 - 60,
                                  "source": {"path": str(extra.resolve()), "n": 5}}
    steps = read_json(tmp_path / "run" / "diffusion" / "history.json")["steps"]
    assert steps == -(-(546 + 5) // 64)  # one epoch over labelled + unlabelled
    from dcube.data import load_data
    from dcube.utils.io import load_tensors

    d = load_data(cfg.data, 0)
    labelled = set(d.train.ids) | set(d.val.ids) | set(d.test.ids)
    assert not labelled & set(d.unlabelled_ids)
    assert len(set(d.train.ids) | set(d.unlabelled_ids[:-5])) == 546  # the rest is exactly the dropped part
    feats, _ = load_tensors(tmp_path / "run" / "features" / "train.safetensors")
    assert all(v.shape[0] == 60 for v in feats.values())  # step 2 trains on the 60 labelled images only
    assert out["test"]["n"] == 40

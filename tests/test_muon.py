"""Muon for the block matrices, AdamW for the rest: the update, exact resume, growth, old folders, DDP."""
import json

import pytest
import torch

from engine.data.sources import source_from_text
from engine.folder.model_folder import ModelFolder
from engine.model.config import ModelConfig
from engine.model.gpt import GPT
from engine.runtime import hardware
from engine.training.events import Notice, StepDone
from engine.training.runs import StopFlag
from engine.training.step import MuonAdamW, orthogonalize
from trainer import TrainConfig, Trainer, make_optimizer

from conftest import SAMPLE_TEXT, TINY_MODEL, TINY_TRAIN

MUON = {**TINY_TRAIN, "optimizer": "muon"}
LLAMA = {**TINY_MODEL, "arch": "llama"}


def test_orthogonalize_flattens_the_singular_values_of_wide_and_tall_matrices():
    torch.manual_seed(0)
    for shape in [(16, 48), (48, 16)]:
        g = torch.randn(shape) @ torch.diag(torch.logspace(0, 3, shape[1]))[:shape[1], :shape[1]] \
            if shape[0] < shape[1] else torch.randn(shape)
        s = torch.linalg.svdvals(orthogonalize(g, torch.float32))
        assert s.min() > 0.5 and s.max() < 1.5  # Newton-Schulz's band, whatever g's spread
        assert orthogonalize(g, torch.float32).shape == shape


def test_the_blocks_matrices_go_to_muon_split_as_they_stack_and_the_rest_to_adamw():
    model = GPT(ModelConfig(vocab_size=300, **LLAMA))
    opt = make_optimizer(model, TrainConfig(optimizer="muon"), hardware.detect_runtime("cpu", "fp32"))
    assert isinstance(opt, MuonAdamW)
    muon = {id(p): g["splits"] for g in opt.param_groups if g["muon"] for p in g["params"]}
    assert muon == {id(p): n for p, n in model.block_matrices()}
    assert muon[id(model.h[0].attn.c_attn.weight)] == 3 and muon[id(model.h[0].mlp.c_fc.weight)] == 2
    rest = [p for g in opt.param_groups if not g["muon"] for p in g["params"]]
    assert any(p is model.wte.weight for p in rest) and len(muon) + len(rest) == len(list(model.parameters()))


def test_each_stacked_block_is_orthogonalized_on_its_own():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(48, 16))
    opt = MuonAdamW([{"params": [w], "muon": True, "splits": 3}], lr=1.0, weight_decay=0.0, momentum=0.0)
    w.grad = torch.cat([torch.randn(16, 16), 100 * torch.randn(16, 16), 0.01 * torch.randn(16, 16)])
    opt.step()
    sizes = [float(torch.linalg.svdvals(block).mean()) for block in w.detach().chunk(3)]
    assert max(sizes) / min(sizes) < 1.3  # each block moved alike, though their gradients differ 10,000-fold
    whole = MuonAdamW([{"params": [w2 := torch.nn.Parameter(torch.zeros(48, 16))], "muon": True}], lr=1.0,
                      weight_decay=0.0, momentum=0.0)
    w2.grad = w.grad
    whole.step()  # orthogonalized as one matrix, the small blocks would hardly move
    assert float(torch.linalg.svdvals(w2.detach()[32:]).mean()) < 0.01 * min(sizes)


def record(losses, stop_at=None, flag=None):
    def on_event(event):
        if isinstance(event, StepDone):
            losses[event.step] = event.loss
            if event.step == stop_at:
                flag.set("interrupted")
    return on_event


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_muon_run_resumes_with_identical_losses(tmp_path, arch):
    model = {**TINY_MODEL, "arch": arch}
    src = source_from_text(SAMPLE_TEXT)
    straight, first, resumed = {}, {}, {}
    Trainer(str(tmp_path / "a"), "bpe", model_overrides=model, train_overrides=MUON).train(src, 2, record(straight))
    flag = StopFlag()
    Trainer(str(tmp_path / "b"), "bpe", model_overrides=model, train_overrides=MUON).train(
        src, 2, record(first, 7, flag), flag)
    again = Trainer(str(tmp_path / "b"), "bpe", model_overrides=model, train_overrides=MUON)
    again.train(src, 2, record(resumed))
    assert {**first, **resumed} == straight  # exactly equal floats, step for step
    state = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)["optimizer"]["state"]
    assert any("momentum_buffer" in s for s in state.values()) and any("exp_avg" in s for s in state.values())
    assert json.loads((tmp_path / "b" / "config.json").read_text())["training"]["optimizer"] == "muon"


def test_growing_the_vocabulary_keeps_every_muon_and_adamw_moment(tmp_path):
    trainer = Trainer(str(tmp_path / "m"), "bpe", model_overrides=LLAMA, train_overrides=MUON)
    trainer.train(source_from_text(SAMPLE_TEXT), 1)
    before = {k: {n: t.clone() for n, t in s.items() if torch.is_tensor(t)}
              for k, s in trainer.optimizer.state_dict()["state"].items()}
    growth = trainer.grow_vocabulary(["Photosynthesis in chloroplasts makes sugar from sunlight. " * 40], 20)
    assert growth.added > 0
    after = trainer.optimizer.state_dict()["state"]
    for key, old in before.items():
        for name, t in old.items():
            new = after[key][name]
            assert torch.equal(new[:t.shape[0]] if new.dim() else new, t)  # old rows exactly as they were


def test_an_old_folder_trains_on_with_adamw_and_a_request_for_muon_is_explained(tmp_path):
    folder = tmp_path / "m"
    Trainer(str(folder), "bpe", model_overrides={**TINY_MODEL, "arch": "gpt2"},
            train_overrides={**TINY_TRAIN, "optimizer": "adamw"}).train(
        source_from_text(SAMPLE_TEXT), 1)
    meta = json.loads((folder / "config.json").read_text())
    del meta["training"]["optimizer"], meta["model"]["arch"]  # as every folder before these settings
    (folder / "config.json").write_text(json.dumps(meta))
    assert ModelFolder(folder).read_meta().training["optimizer"] == "adamw"
    again = Trainer(str(folder), "bpe", train_overrides={**TINY_TRAIN, "optimizer": "muon"})
    events = []
    again.train(source_from_text(SAMPLE_TEXT), 1, events.append)
    assert isinstance(again.optimizer, torch.optim.AdamW) and again.config.optimizer == "adamw"
    assert any(isinstance(e, Notice) and "keeps the adamw optimizer" in e.text for e in events)


def test_the_recipe_decides_new_models_only_and_flipping_it_is_one_change(tmp_path, monkeypatch):
    """``NEW_MODEL_RECIPE`` is where a new model's block design, optimizer and learning rate come from;
    flipped, a new model is a llama trained with Muon, flags still win, and a folder saved before
    these settings existed goes on as the gpt2 + AdamW model it is."""
    from engine.training import config as training_config

    assert ModelConfig(vocab_size=300).arch == "gpt2" and TrainConfig().optimizer == "adamw"  # what old folders mean
    src = source_from_text(SAMPLE_TEXT)
    old = tmp_path / "old"
    Trainer(str(old), "bpe", model_overrides={**TINY_MODEL, "arch": "gpt2"},
            train_overrides={**TINY_TRAIN, "optimizer": "adamw", "learning_rate": 1e-3}).train(src, 1)
    meta = json.loads((old / "config.json").read_text())
    del meta["training"]["optimizer"], meta["model"]["arch"], meta["model"]["qk_norm"]  # as before these settings
    (old / "config.json").write_text(json.dumps(meta))

    flipped = training_config.Recipe(arch="llama", qk_norm=True, optimizer="muon", learning_rate=2e-3)
    monkeypatch.setattr(training_config, "NEW_MODEL_RECIPE", flipped)
    new = Trainer(str(tmp_path / "new"), "bpe", model_overrides=TINY_MODEL, train_overrides=TINY_TRAIN)
    new.train(src, 1)
    assert (new.model.config.arch, new.model.config.qk_norm) == ("llama", True)
    assert isinstance(new.optimizer, MuonAdamW) and new.config.learning_rate == 2e-3
    saved = ModelFolder(tmp_path / "new").read_meta()
    assert saved.model.arch == "llama" and saved.training["optimizer"] == "muon"

    flags = Trainer(str(tmp_path / "flags"), "bpe", model_overrides={**TINY_MODEL, "arch": "gpt2"},
                    train_overrides={**TINY_TRAIN, "optimizer": "adamw", "learning_rate": 5e-4})
    config = flags.planner.model_config(300)
    assert (config.arch, config.qk_norm) == ("gpt2", False)  # the recipe's QK-norm is llama's only
    assert (flags.config.optimizer, flags.config.learning_rate) == ("adamw", 5e-4)
    # Another optimizer without --lr gets that optimizer's rate, not the one tuned for Muon,
    # in the config and in a time budget's plan alike.
    picked = Trainer(str(tmp_path / "picked"), "bpe", model_overrides=TINY_MODEL,
                     train_overrides={**TINY_TRAIN, "optimizer": "adamw"})
    adamw_rate = training_config.LEARNING_RATES["adamw"]
    assert (picked.config.optimizer, picked.config.learning_rate) == ("adamw", adamw_rate) and adamw_rate != 2e-3
    assert picked.planner.recipe.base_learning_rate(picked.planner.train_overrides) == adamw_rate

    again = Trainer(str(old), "bpe", train_overrides=TINY_TRAIN)
    again.train(src, 1)
    assert again.model.config.arch == "gpt2" and not again.model.config.qk_norm
    assert isinstance(again.optimizer, torch.optim.AdamW) and again.config.learning_rate == 1e-3
    assert ModelFolder(old).read_meta().training["optimizer"] == "adamw"

"""Continuous learning: vocabulary growth that keeps old ids, rows and knowledge."""
import json

import pytest
import torch

from engine.data.sources import source_from_text
from engine.data.tokenizer import KINDS, train_tokenizer
from engine.data.vocab_growth import expand_tokenizer, learn_merges
from engine.folder.model_folder import ModelFolder
from engine.runtime import storage
from engine.training import continual
from engine.training.events import StepDone
from engine.training.step import StepRunner
from trainer import Trainer, lr_at

from conftest import SAMPLE_TEXT, TINY_MODEL, TINY_TRAIN

NEW_DOMAIN = ("Photosynthesis in chloroplasts turns sunlight into sugar, and mitochondria burn it. "
              "Chloroplasts and mitochondria both carry their own DNA. ") * 30


def make_trainer(folder, kind="bpe", **train):
    return Trainer(str(folder), kind, model_overrides=TINY_MODEL, train_overrides={**TINY_TRAIN, **train})


@pytest.fixture(scope="module", params=KINDS)
def grown(request):
    old = train_tokenizer(request.param, [SAMPLE_TEXT], 400)
    return old, expand_tokenizer(old, [NEW_DOMAIN], max_new=60)


def test_old_ids_keep_their_meaning(grown):
    old, expansion = grown
    new = expansion.tokenizer
    assert expansion.n_added > 0 and new.vocab_size == old.vocab_size + expansion.n_added
    for i in range(old.vocab_size):
        assert new.id_to_piece(i) == old.id_to_piece(i)
    assert new.eot_id == old.eot_id and new.pad_id == old.pad_id


@pytest.mark.parametrize("text", [SAMPLE_TEXT[:400], NEW_DOMAIN[:300], "naïve café 日本語", "emoji 😀🚀", ""])
def test_grown_tokenizer_round_trips(grown, text):
    new = grown[1].tokenizer
    assert new.decode(new.encode(text)) == text


def test_new_domain_words_take_fewer_tokens(grown):
    old, expansion = grown
    for word in ("Photosynthesis", " chloroplasts", " mitochondria"):
        assert len(expansion.tokenizer.encode(word)) < len(old.encode(word)), word


def test_new_tokens_are_made_of_old_ones(grown):
    old, expansion = grown
    for text, parts in zip(expansion.added, expansion.parts):
        assert parts and all(p < old.vocab_size for p in parts)
        assert old.decode(parts) == text


def test_expansion_respects_the_cap():
    old = train_tokenizer("bpe", [SAMPLE_TEXT], 400)
    assert expand_tokenizer(old, [NEW_DOMAIN], max_new=5).n_added == 5


def test_learn_merges_skips_rare_pairs():
    from collections import Counter

    assert learn_merges(Counter({("x", "y"): 2}), {"x", "y"}, 10, 3) == []


def test_resize_in_trainer_keeps_old_logits_and_moments(tmp_path):
    folder = tmp_path / "m"
    make_trainer(folder).train(source_from_text(SAMPLE_TEXT), 1)
    trainer = make_trainer(folder)
    trainer.load()
    old_ids = torch.tensor([trainer.tokenizer.encode(SAMPLE_TEXT[:200])[:30]])
    trainer.model.eval()
    before = trainer.model(old_ids)[0].detach()
    old_rows = trainer.model.wte.weight.detach().clone()
    old_moments = {k: v.clone() for k, v in trainer.optimizer.state[trainer.model.wte.weight].items()}
    growth = trainer.grow_vocabulary([NEW_DOMAIN], max_new_tokens=40)
    assert growth.added > 0 and growth.tokens_per_byte_after < growth.tokens_per_byte_before
    assert 0.0 <= growth.drift <= 1.0
    after = trainer.model(old_ids)[0].detach()
    n_old = old_rows.shape[0]
    assert torch.equal(trainer.model.wte.weight[:n_old], old_rows)
    torch.testing.assert_close(after[..., :n_old], before, atol=1e-6, rtol=0)
    moments = trainer.optimizer.state[trainer.model.wte.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(moments[key][:n_old], old_moments[key])
        assert not moments[key][n_old:].any()
    # The folder now holds the grown model, consistently.
    model, tok, meta = ModelFolder(folder).load_model()
    assert tok.vocab_size == model.config.vocab_size == n_old + growth.added


def test_train_on_new_data_continues_step_and_schedule(tmp_path):
    folder = tmp_path / "m"
    first = make_trainer(folder).train(source_from_text(SAMPLE_TEXT), 1)
    trainer = make_trainer(folder, warmup_steps=5)
    lrs = []
    report = continual.train_on_new_data(trainer, [NEW_DOMAIN], epochs=4, expand_vocab=True, max_new_tokens=30,
                                         on_event=lambda e: isinstance(e, StepDone) and lrs.append(e.lr))
    result = report.result
    assert result.global_step == first.global_step + result.steps and not result.resumed
    total = trainer.progress.run.total_steps
    assert total == result.steps
    assert lrs == [lr_at(s, total, trainer.config) for s in range(total)]  # a fresh warm-up and decay
    assert lrs[0] < max(lrs) and lrs[-1] < max(lrs)
    names = [row.name for row in report.table]
    assert len(names) == 2 and report.table[0].before is not None
    assert report.table[1].before is None  # the new dataset had no "before"
    saved = json.loads((folder / "datasets.json").read_text())
    assert len(saved) == 2 and all(d["latest"]["bpb"] > 0 for d in saved)


def test_rehearsal_replays_earlier_data(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    make_trainer(folder).train(source_from_text(SAMPLE_TEXT), 1)
    trainer = make_trainer(folder, rehearsal=0.5)
    seen = []
    original = StepRunner.step

    def spy(self, x, y, *args):
        seen.append(x.clone())
        return original(self, x, y, *args)

    monkeypatch.setattr(StepRunner, "step", spy)
    continual.train_on_new_data(trainer, [NEW_DOMAIN], epochs=1, expand_vocab=False)
    old_text = trainer.tokenizer.decode(seen[0][-1].tolist())
    new_text = trainer.tokenizer.decode(seen[0][0].tolist())
    assert old_text in SAMPLE_TEXT  # the replayed row comes from the first dataset
    assert new_text in NEW_DOMAIN


@pytest.mark.parametrize("point", ["staged:model.pth", "before-journal"])
def test_failure_before_commit_keeps_previous_model(tmp_path, monkeypatch, point):
    folder = tmp_path / "m"
    make_trainer(folder).train(source_from_text(SAMPLE_TEXT), 1)
    old_vocab = ModelFolder(folder).load_tokenizer().vocab_size

    def fail(name):
        if name == point:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage, "_crash_point", fail)
    with pytest.raises(OSError, match="No space"):
        make_trainer(folder).grow_vocabulary([NEW_DOMAIN], max_new_tokens=20)
    monkeypatch.undo()
    model, tok, _ = ModelFolder(folder).load_model()
    assert tok.vocab_size == model.config.vocab_size == old_vocab
    assert not (folder / storage.STAGING_DIR).exists()


def test_failure_after_commit_point_rolls_forward(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    make_trainer(folder).train(source_from_text(SAMPLE_TEXT), 1)
    old_vocab = ModelFolder(folder).load_tokenizer().vocab_size

    def fail(name):
        if name == "after-journal":
            raise KeyboardInterrupt  # as if the process died right after the commit point

    monkeypatch.setattr(storage, "_crash_point", fail)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(folder).grow_vocabulary([NEW_DOMAIN], max_new_tokens=20)
    monkeypatch.undo()
    model, tok, _ = ModelFolder(folder).load_model()  # opening the folder finishes the commit
    assert tok.vocab_size == model.config.vocab_size > old_vocab
    assert not (folder / storage.JOURNAL_FILE).exists()

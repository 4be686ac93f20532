"""Shared fixtures: tiny configs, seeded tiny models and sample texts on disk.

Every model here is small enough (d_model 32-64, 1-2 layers) that a test trains
in seconds on two CPU cores. Model folders always live under ``tmp_path``.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.runtime.hardware import usable_cpu_cores  # noqa: E402

# Under pytest-xdist (the README's test command runs one worker per core) every worker
# gets its share of the cores, and so do the programs it starts (they inherit the
# variables). Two workers with two OpenMP threads each on two cores spin at each other's
# barriers: the suite took as long as one worker did.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, usable_cpu_cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_share)
    torch.set_num_threads(_share)

from model import GPT, ModelConfig  # noqa: E402

# A few paragraphs of varied English, repeated with small changes so BPE finds merges.
_PARAGRAPHS = [
    "The river ran past the old mill, and the miller counted sacks of grain by lamplight.",
    "In spring the orchard filled with blossom; bees worked from dawn until the evening bell.",
    "A careful student reads the question twice, writes the answer once, and checks it again.",
    "Trains left the station every hour, carrying letters, tools and travellers to the coast.",
    "When the storm came, the fishermen pulled their boats high on the shingle and waited.",
]
SAMPLE_TEXT = "\n\n".join(f"{p} (part {i})" for i in range(12) for p in _PARAGRAPHS) + "\n"

TINY_MODEL = dict(d_model=32, n_layer=1, n_head=2, context=32)
TINY_TRAIN = dict(target_vocab_size=320, batch_size=4, checkpoint_every=10, eval_batches=4)
TINY_CLI = ["--d-model", "32", "--n-layer", "1", "--n-head", "2", "--context", "32",
            "--target-vocab-size", "320", "--batch-size", "4", "--seed", "7"]


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: the cores this process may use (a container's limit, not the host's count)."""
    return usable_cpu_cores()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig(vocab_size=97, context=24, d_model=32, n_layer=2, n_head=2, dropout=0.0)


@pytest.fixture
def tiny_model(tiny_config) -> GPT:
    torch.manual_seed(1234)
    return GPT(tiny_config).eval()


@pytest.fixture
def sample_file(tmp_path) -> Path:
    path = tmp_path / "sample.txt"
    path.write_text(SAMPLE_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return tmp_path / "model"


@pytest.fixture(scope="session")
def trained_once(tmp_path_factory):
    """Train a tiny model per (tokenizer, epochs) once per test session; return its folder.

    Training is the slow part of most tests. Tests that only read a model share these
    folders; tests that change one take a private copy (``trained_copy``).
    """
    from engine.data.sources import source_from_text
    from trainer import Trainer

    made: dict[tuple[str, int, str | None], Path] = {}

    def get(kind: str = "bpe", epochs: int = 1, arch: str | None = None) -> Path:
        """``arch`` None: the block a new model gets (``NEW_MODEL_RECIPE``); or pinned, e.g. "gpt2"."""
        if (kind, epochs, arch) not in made:
            folder = tmp_path_factory.mktemp(f"trained-{kind}-{epochs}-{arch or 'new'}") / "model"
            overrides = TINY_MODEL if arch is None else {**TINY_MODEL, "arch": arch}
            Trainer(str(folder), kind, model_overrides=overrides, train_overrides=TINY_TRAIN).train(
                source_from_text(SAMPLE_TEXT), epochs)
            made[kind, epochs, arch] = folder
        return made[kind, epochs, arch]

    return get


@pytest.fixture
def trained_copy(trained_once, tmp_path):
    """A private copy of a shared trained folder, for a test that writes to it."""
    def copy(kind: str = "bpe", epochs: int = 1) -> Path:
        target = tmp_path / f"model-{kind}-{epochs}"
        shutil.copytree(trained_once(kind, epochs), target)
        return target

    return copy

"""Training's GPU paths on a machine without a GPU: random state, saves, budget probes, batch sizes.

``torch.cuda``'s queries are faked (``FakeCuda`` from test_gpu_paths), and so are the
CUDA random-state calls, which record what they were asked; a call a path must not
make raises. A move to the GPU and back is faked as a copy (``Tensor.cpu``).
"""
import io
import zipfile

import pytest
import torch
from test_gpu_paths import FakeCuda

from engine.data.sources import source_from_text
from engine.folder.model_folder import CHECKPOINT_FILE, WEIGHTS_FILE, ModelFolder
from engine.model.config import ModelConfig
from engine.runtime import hardware
from engine.training import budget
from engine.training.checkpoint import restore_rng, rng_state
from engine.training.config import TrainConfig
from engine.training.events import StepDone
from engine.training.planning import Planner
from engine.training.runs import StopFlag
from trainer import Trainer

from conftest import SAMPLE_TEXT, TINY_MODEL, TINY_TRAIN


def gpu_runtime(index: int | None = None) -> hardware.Runtime:
    return hardware.Runtime(torch.device("cuda", index) if index is not None else torch.device("cuda"),
                            torch.bfloat16, False, "faked")


def cpu_runtime() -> hardware.Runtime:
    return hardware.detect_runtime("cpu", "fp32")


class CudaRandomState:
    """The CUDA random-state calls, faked: ``set_rng_state`` records its state and device;
    ``get_rng_state_all``/``set_rng_state_all`` (every visible GPU) must never be called."""

    def __init__(self, monkeypatch) -> None:
        self.restored: list[tuple[torch.Tensor, object]] = []
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "set_rng_state", lambda state, device="cuda": self.restored.append((state, device)))
        monkeypatch.setattr(cuda, "get_rng_state", lambda device="cuda": torch.full((16,), 7, dtype=torch.uint8))
        monkeypatch.setattr(cuda, "get_rng_state_all", self.refuse)
        monkeypatch.setattr(cuda, "set_rng_state_all", self.refuse)

    @staticmethod
    def refuse(*args, **kwargs):
        raise AssertionError("every visible GPU's random state was asked for")


def gpu_states(n: int) -> list[torch.Tensor]:
    return [torch.full((16,), i, dtype=torch.uint8) for i in range(n)]


# -- random state ------------------------------------------------------------------------------

def test_a_checkpoint_with_four_gpu_states_goes_on_on_one_gpu(monkeypatch):
    """What a single-process run saved on a 4-GPU host (every GPU's state) resumes on one GPU:
    the state of its own index is restored, and one line says the others are left."""
    FakeCuda(monkeypatch, [(9, 0)])  # one GPU visible (or CUDA_VISIBLE_DEVICES narrowed to one)
    cuda = CudaRandomState(monkeypatch)
    saved = {"torch": torch.get_rng_state(), "cuda": gpu_states(4)}
    note = restore_rng(saved, gpu_runtime())
    assert [(int(state[0]), device) for state, device in cuda.restored] == [(0, torch.device("cuda"))]
    assert note == "this checkpoint holds the random state of 4 GPUs and this run trains on one: that of GPU 0 is restored"
    assert "\n" not in note


def test_a_gpu_run_saves_its_own_gpu_state_only_and_takes_it_back_on_any_gpu(monkeypatch):
    FakeCuda(monkeypatch, [(9, 0), (9, 0)])
    cuda = CudaRandomState(monkeypatch)
    state = rng_state(gpu_runtime(1))
    assert set(state) == {"torch", "cuda_device"}
    assert restore_rng(state, gpu_runtime(0)) == ""  # exact: one state, one device
    assert cuda.restored[-1][1] == torch.device("cuda", 0)
    assert restore_rng({"torch": torch.get_rng_state(), "cuda": gpu_states(1)}, gpu_runtime(0)) == ""
    note = restore_rng({"torch": torch.get_rng_state(), "cuda": gpu_states(1)}, gpu_runtime(1))
    assert note.startswith("this checkpoint holds no random state for cuda:1 (it was saved on 1 GPU(s))")
    assert restore_rng({"torch": torch.get_rng_state()}, gpu_runtime(0)).startswith(
        "this checkpoint holds no random state for cuda:0 (it was saved on the CPU)")


def test_a_cpu_run_on_a_gpu_host_resumes_a_four_gpu_checkpoint_without_touching_cuda(tmp_path, monkeypatch):
    """--device cpu on a host with 4 GPUs: the old checkpoint's GPU states are left aside (one
    line says so), the run finishes, and CUDA is never initialised nor asked for its state."""
    folder = tmp_path / "model"
    stop = StopFlag()

    def stop_at_step_3(event):
        if isinstance(event, StepDone) and event.step == 3:
            stop.set("interrupted")

    runtime = cpu_runtime()
    Trainer(str(folder), "bpe", model_overrides=TINY_MODEL, train_overrides=TINY_TRAIN, runtime=runtime).train(
        source_from_text(SAMPLE_TEXT), 1, stop_at_step_3, stop)
    as_saved_before(folder, gpu_states(4))  # what a single process saved on that host before

    FakeCuda(monkeypatch, [(9, 0)] * 4)
    CudaRandomState(monkeypatch)
    monkeypatch.setattr(torch.cuda, "set_rng_state", CudaRandomState.refuse)
    monkeypatch.setattr(torch.cuda, "get_rng_state", CudaRandomState.refuse)
    monkeypatch.setattr(torch.cuda, "_lazy_init", CudaRandomState.refuse)
    trainer = Trainer(str(folder), runtime=runtime)
    assert trainer.interrupted_run() is not None
    assert trainer.notes == ["this checkpoint holds GPU random state and training goes on on the CPU: it is left "
                             "aside, so dropout draws differ from those of an uninterrupted run"]
    result = trainer.resume()
    assert result.resumed and result.stopped_early == "" and trainer.progress.run.finished
    assert not torch.cuda.is_initialized()
    saved = torch.load(folder / CHECKPOINT_FILE, weights_only=True)
    assert set(saved["rng"]) == {"torch"}  # the CPU run's own state only


def as_saved_before(folder, states: list[torch.Tensor]) -> None:
    """Rewrite the folder's last save with ``states`` as every visible GPU's random state (one journaled save)."""
    model_folder = ModelFolder(folder)
    checkpoint = torch.load(folder / CHECKPOINT_FILE, weights_only=True)
    checkpoint["rng"]["cuda"] = states
    model_folder.commit_save(torch.load(folder / WEIGHTS_FILE, weights_only=True), checkpoint,
                             model_folder.read_meta(), model_folder.read_history(), model_folder.read_datasets())


# -- saving from a GPU -------------------------------------------------------------------------

def storages(blob: bytes) -> dict[str, int]:
    """The tensor storages a torch.save file holds: their entries' names and sizes."""
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        return {i.filename: i.file_size for i in archive.infolist() if "/data/" in i.filename}


def test_saving_from_a_gpu_keeps_the_tied_embedding_one_tensor(trained_copy, monkeypatch):
    """``.cpu()`` copies a GPU tensor: per key, it stored wte and lm_head as two embeddings.
    Faked here as a copy; the files must be those a CPU run writes, one storage for both."""
    folder = trained_copy("bpe", 1)
    trainer = Trainer(str(folder))
    trainer.load()
    trainer.save_checkpoint()
    on_cpu = {name: storages((folder / name).read_bytes()) for name in (WEIGHTS_FILE, CHECKPOINT_FILE)}
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: real_cpu(self, *a, **k).clone())
    trainer.save_checkpoint()
    monkeypatch.undo()
    for name in (WEIGHTS_FILE, CHECKPOINT_FILE):
        assert storages((folder / name).read_bytes()) == on_cpu[name], name
    weights = torch.load(folder / WEIGHTS_FILE, weights_only=True)
    assert weights["lm_head.weight"].untyped_storage().data_ptr() == weights["wte.weight"].untyped_storage().data_ptr()
    model, _, _ = ModelFolder(folder).load_model()
    assert model.lm_head.weight is model.wte.weight


# -- time-budget probes and batch sizes --------------------------------------------------------

@pytest.fixture
def probes(monkeypatch):
    """The probe's calls, (batch, model config), answered with a fixed rate."""
    calls = []

    def probe(runtime, model, batch_size, config=None, seconds=None):
        calls.append((batch_size, model))
        return 1e12
    monkeypatch.setattr(budget, "probe_flop_rate", probe)
    return calls


def test_a_budget_on_a_24gb_card_probes_the_large_preset_with_the_batch_it_will_train(monkeypatch, probes):
    """--preset large --minutes N once probed 256 x 256 tokens at d1024 x 12 on a 24 GB card
    (the batch of a d256 model) and ran out of memory."""
    FakeCuda(monkeypatch, [(8, 6)], [23.6])
    runtime = gpu_runtime()
    Planner(runtime, "large").budget_plan(10, 1_000_000, 8000, TrainConfig())
    (batch, shape), = probes
    assert (shape.d_model, shape.n_layer) == (1024, 12)
    large = ModelConfig(vocab_size=8000, context=256, d_model=1024, n_layer=12, n_head=16)
    assert batch == hardware.default_batch_size(runtime, large) < 256
    assert batch < hardware.default_batch_size(runtime, ModelConfig(vocab_size=8000))  # the d256 x 4 it used to probe


def test_a_new_run_sizes_its_batch_for_the_model_it_trains(monkeypatch):
    from engine.folder.records import RunKind

    asked = []
    monkeypatch.setattr(hardware, "default_batch_size", lambda *args: asked.append(args[1:]) or 8)
    dataset = FakeData()
    model = ModelConfig(vocab_size=5000, context=64, d_model=128, n_layer=3, n_head=4)
    Planner(cpu_runtime()).new_run(dataset, "d", "c.bin", 1, RunKind.TEXT, TrainConfig(), model, 0)
    assert asked == [(model, 48)]  # the window in force: 48


class FakeData:
    """A data set of 100 windows of 48 tokens, as a run's plan reads it."""

    window, n_train_tokens = 48, 4800

    def epoch_plan(self, seed, epoch, batch_size):
        from engine.data.windows import EpochPlan

        return EpochPlan(0, torch.arange(100).numpy(), min(batch_size, 100))


def test_a_budget_for_several_processes_counts_them_all(probes):
    """A torchrun job of 4: each probes its share of the global batch, and the plan is sized for all four."""
    from engine.folder.records import RunKind
    from engine.model.config import ModelConfig
    from engine.training.runs import Budget

    model = ModelConfig(vocab_size=5000, context=48, d_model=128, n_layer=3, n_head=4)
    config = TrainConfig(batch_size=16)
    totals = {}
    for world_size in (1, 4):
        planner = Planner(cpu_runtime(), world_size=world_size)
        run = planner.new_run(FakeData(), "d", "c.bin", 1, RunKind.TEXT, config, model, 0,
                              Budget(60.0, 0.0, clock=lambda: 0.0))
        totals[world_size] = run.total_steps
        assert probes[-1][0] == 16 // world_size and planner.flop_rate == world_size * 1e12
    assert totals[4] == pytest.approx(4 * totals[1], abs=4)

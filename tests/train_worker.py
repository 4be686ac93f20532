"""A training process for the crash tests: trains a tiny model and prints each step.

    python tests/train_worker.py MODEL_DIR DATA_FILE EPOCHS

Prints one line per optimizer step, "step <n> <loss repr>", flushed at once, so the
parent can kill it at any moment and compare losses exactly after a resume.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from engine.data.sources import open_source  # noqa: E402
from engine.training.events import StepDone  # noqa: E402
from trainer import Trainer  # noqa: E402

from conftest import TINY_MODEL, TINY_TRAIN  # noqa: E402


def main() -> None:
    model_dir, data_file, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)  # identical arithmetic in every process

    def on_event(event):
        if isinstance(event, StepDone):
            print(f"step {event.step} {event.loss!r}", flush=True)

    trainer = Trainer(model_dir, "bpe", model_overrides=TINY_MODEL,
                      train_overrides={**TINY_TRAIN, "checkpoint_every": 5})
    trainer.train(open_source(data_file), epochs, on_event)
    print("done", flush=True)


if __name__ == "__main__":
    main()

"""A torchrun worker for the time-budget test: a budget run whose ranks time their steps differently.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_budget_worker.py MODEL_DIR DATA_FILE MINUTES

The probe answers ``PROBE_RATE`` FLOP/s and records the batch it was asked to time; each
rank's clock moves ``STEP_S * (rank + 1)`` per optimizer step and never otherwise, so
each rank alone would re-plan the schedule differently. Each rank prints one line,
"rank R {json}": the batches the probe timed and the (run step, total steps) of every
learning rate it asked ``lr_at`` for.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from engine.data.sources import open_source  # noqa: E402
from engine.runtime import distributed  # noqa: E402
from engine.training import budget, loop  # noqa: E402
from engine.training.step import StepRunner  # noqa: E402
from engine.training.trainer import Trainer  # noqa: E402

from conftest import TINY_MODEL, TINY_TRAIN  # noqa: E402

PROBE_RATE = 1e8
STEP_S = 0.1


def main() -> None:
    model_dir, data_file, minutes = sys.argv[1], sys.argv[2], float(sys.argv[3])
    torch.set_num_threads(1)
    env = distributed.LaunchEnv.from_environ()
    now = [1000.0 * (env.rank + 1)]  # each process's monotonic clock has its own origin
    probed, schedule = [], []

    def probe(runtime, vocab_size, batch_size, shape=None, seconds=None):
        probed.append(batch_size)
        return PROBE_RATE

    def lr_at(step, total_steps, cfg):
        schedule.append((step, total_steps))
        return real_lr_at(step, total_steps, cfg)

    def step(self, *args, **kwargs):
        loss = real_step(self, *args, **kwargs)
        now[0] += STEP_S * (env.rank + 1)
        return loss

    real_lr_at, real_step = loop.lr_at, StepRunner.step
    budget.probe_flop_rate, loop.lr_at, StepRunner.step = probe, lr_at, step
    clock = lambda: now[0]  # noqa: E731
    group = distributed.init_distributed(env, "cpu", "fp32", timeout_s=60)
    try:
        if group.is_main:
            trainer = Trainer(model_dir, "bpe", model_overrides={**TINY_MODEL, "dropout": 0.0},
                              train_overrides=TINY_TRAIN, distributed=group, clock=clock)
            result = trainer.train(open_source(data_file), 1, minutes=minutes)
        else:
            result = Trainer.follow(group, clock=clock)
    finally:
        group.close()
    report = {"probed": probed, "schedule": schedule, "steps": result.steps, "stopped": str(result.stopped_early)}
    sys.stdout.write(f"rank {env.rank} {json.dumps(report)}\n")  # one write: the ranks share the pipe
    sys.stdout.flush()


if __name__ == "__main__":
    main()

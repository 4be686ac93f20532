"""Distributed training under torchrun: two gloo processes on the CPU, tiny models.

Each launch is ``python -m torch.distributed.run --nproc_per_node=2 interface.py train``
with one thread per process, a free port of its own, and a timeout, so a hang fails the
test instead of the suite. Losses are compared in fp32 with dropout 0.
"""
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import interface
from engine.folder.model_folder import ModelFolder
from engine.runtime.distributed import LaunchEnv
from engine.training.runs import RunState, StopCheck, StopFlag, micro_batches_for
from trainer import accumulate_gradients

from conftest import ROOT, SAMPLE_TEXT

FLAGS = ["--d-model", "32", "--n-layer", "1", "--n-head", "2", "--context", "32", "--target-vocab-size", "320",
         "--batch-size", "4", "--dropout", "0", "--precision", "fp32", "--device", "cpu", "--log-every", "1",
         "--epochs", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(name, None)
STEP = re.compile(r"^step (\d+) \| loss ([\d.]+)", re.MULTILINE)


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", str(ROOT / "interface.py"), "train", *args]


def losses(output: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in STEP.findall(output)}


def run_job(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=ENV)


def start_job(*args: str) -> subprocess.Popen:
    return subprocess.Popen(torchrun(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=ENV)


def read_until(proc: subprocess.Popen, pattern: str, timeout: float = 90) -> str:
    """The job's output up to the first line matching ``pattern``."""
    seen, end = [], time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
        assert time.monotonic() < end, "".join(seen)[-3000:]
    raise AssertionError("the job ended first:\n" + "".join(seen)[-3000:])


def descendants(pid: int) -> list[int]:
    """``pid``'s child processes, their children and so on (torchrun's workers)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def rank_pid(job: subprocess.Popen, rank: int) -> int:
    for pid in descendants(job.pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no process of rank {rank}")


@pytest.fixture
def one_thread():
    """In-process training with one thread, like each torchrun process here (two threads on a
    busy two-core machine spin against each other: steps ran up to 50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sample.txt"
    path.write_text(SAMPLE_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, data_file):
    """One uninterrupted 2-process run: (its folder, its losses by step)."""
    folder = tmp_path_factory.mktemp("ddp") / "model"
    proc = run_job(str(data_file), "--model-dir", str(folder), *FLAGS)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "Training complete" in proc.stdout and "2 processes" in proc.stdout
    return folder, losses(proc.stdout)


def test_two_processes_learn_what_one_process_learns_with_the_same_global_batch(two_process_run, data_file,
                                                                               tmp_path, capsys, one_thread):
    _, ddp = two_process_run
    code = interface.main(["train", str(data_file), "--model-dir", str(tmp_path / "one"), *FLAGS])
    single = losses(capsys.readouterr().out)
    assert code == 0
    assert len(ddp) == len(single) >= 20
    assert max(abs(ddp[step] - single[step]) for step in single) < 1e-5


def test_a_killed_job_resumes_with_the_losses_of_the_uninterrupted_run(two_process_run, data_file, tmp_path):
    _, straight = two_process_run
    folder = tmp_path / "model"
    job = start_job(str(data_file), "--model-dir", str(folder), "--checkpoint-every", "5", *FLAGS)
    try:
        read_until(job, r"^step 12 ")
    finally:
        for pid in [job.pid, *descendants(job.pid)]:  # the whole job, at once
            os.kill(pid, signal.SIGKILL)
        job.wait(30)
    again = run_job(str(data_file), "--model-dir", str(folder), "--checkpoint-every", "5", *FLAGS)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "Resuming the interrupted run" in again.stdout
    resumed = losses(again.stdout)
    assert min(resumed) in (6, 11)  # after the last checkpoint before the kill
    assert max(resumed) == max(straight)
    assert max(abs(resumed[step] - straight[step]) for step in resumed) < 1e-5


def test_a_folder_trained_by_two_processes_opens_in_the_menu_and_chats(two_process_run):
    folder, _ = two_process_run
    state = torch.load(folder / "model.pth", weights_only=True)
    assert not any(key.startswith("module.") for key in state)  # DDP's prefix never reaches the folder
    menu = ["2", "2", "Hello there", "/bye", "6", "5"]  # Response, Chat, a message, leave, Back, Exit
    proc = subprocess.run([sys.executable, str(ROOT / "interface.py"), "--model-dir", str(folder),
                           "--max-new-tokens", "12", "--seed", "1"], input="\n".join(menu) + "\n",
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "AI: " in proc.stdout and "Goodbye." in proc.stdout


def test_a_batch_that_the_processes_cannot_share_is_refused(data_file, tmp_path):
    proc = run_job(str(data_file), "--model-dir", str(tmp_path / "model"), *FLAGS, "--batch-size", "3")
    assert proc.returncode != 0
    assert "a batch of 3 sequences cannot be split evenly over 2 processes" in proc.stderr
    assert "trainer.py" not in proc.stderr  # one line of ours; the traceback is torchrun's summary
    assert not (tmp_path / "model" / "model.pth").exists()


def test_a_missing_rendezvous_is_a_clear_error_not_a_hang(data_file, tmp_path):
    env = {**ENV, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}  # nobody listens there
    # A hang would run into the subprocess timeout; the message says the 2 s wait was the one applied.
    proc = subprocess.run([sys.executable, str(ROOT / "interface.py"), "train", str(data_file), "--model-dir",
                           str(tmp_path / "model"), *FLAGS, "--dist-timeout", "2"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 1
    assert "rank 1: could not join the other 1 process(es) at 127.0.0.1:" in proc.stderr
    assert "within 2 s" in proc.stderr
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_a_second_job_on_a_folder_in_training_is_refused(two_process_run, data_file):
    folder, _ = two_process_run
    with ModelFolder(folder).writer_lock():  # as a job training it would
        proc = run_job(str(data_file), "--model-dir", str(folder), *FLAGS)
    assert proc.returncode != 0
    assert f"rank 0: Error: {folder} is being trained by process {os.getpid()}" in proc.stderr


@pytest.mark.slow
def test_ctrl_c_saves_once_and_one_process_resumes_at_the_same_step(two_process_run, data_file, tmp_path, capsys,
                                                                   one_thread):
    _, straight = two_process_run
    folder = tmp_path / "model"
    job = start_job(str(data_file), "--model-dir", str(folder), *FLAGS)
    seen = read_until(job, r"^step 8 ")
    job.send_signal(signal.SIGINT)  # what Ctrl+C does to torchrun, which passes it on to every process
    rest, _ = job.communicate(timeout=60)
    output = seen + rest
    stopped = re.search(r"Training stopped \(interrupted\) at step (\d+); checkpoint saved", output)
    assert stopped, output[-3000:]
    step = int(stopped[1])
    assert ModelFolder(folder).read_meta().progress.step == step
    assert "lost contact" not in output and "trainer.py" not in output  # torchrun's own traceback only

    code = interface.main(["train", "--resume", "--model-dir", str(folder), *FLAGS])  # one process now
    out = capsys.readouterr().out
    assert code == 0
    assert "this run was saved by 2 process(es) and goes on with 1" in out
    resumed = losses(out)
    assert min(resumed) == step + 1 and max(resumed) == max(straight)
    assert max(abs(resumed[s] - straight[s]) for s in resumed) < 1e-5


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_other_and_the_folder_keeps_its_last_save(data_file, tmp_path):
    folder = tmp_path / "model"
    job = start_job(str(data_file), "--model-dir", str(folder), "--checkpoint-every", "5", *FLAGS)
    seen = read_until(job, r"^step 12 ")
    os.kill(rank_pid(job, 1), signal.SIGKILL)
    rest, _ = job.communicate(timeout=120)  # a rank left waiting for the dead one would hang here
    assert job.returncode != 0
    assert "rank 0: lost contact with the other processes" in rest, (seen + rest)[-3000:]
    step = ModelFolder(folder).read_meta().progress.step
    assert step in (10, 15)
    model, _, _ = ModelFolder(folder).load_model()  # whole and verified against the manifest
    assert model.config.d_model == 32


# -- the pieces, in one process --------------------------------------------------------------

def test_the_launch_environment_is_read_or_refused_clearly():
    env = LaunchEnv.from_environ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "node0",
                                  "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank, env.master_port) == (3, 8, 3, 29500)
    with pytest.raises(ValueError, match="lacks LOCAL_RANK, MASTER_ADDR, MASTER_PORT; start the job with torchrun"):
        LaunchEnv.from_environ({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="RANK 2 does not fit WORLD_SIZE 2"):
        LaunchEnv.from_environ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x",
                                "MASTER_PORT": "1"})


def test_ranks_weighted_by_the_global_batch_average_to_its_gradient(tiny_model, tiny_config):
    """Two ranks' shares of a batch whose learned targets are uneven (as in conversations):
    weighted by the global count and averaged as DDP does, they give the whole batch's gradient."""
    from engine.runtime import hardware

    runtime = hardware.detect_runtime("cpu", "fp32")
    tiny_model.train()
    x = torch.randint(0, tiny_config.vocab_size, (4, 16))
    y = torch.randint(0, tiny_config.vocab_size, (4, 16))
    y[:2, 3:] = -1  # rank 0's rows learn far less than rank 1's
    y[1] = -1  # and one of its rows nothing at all

    def grads(xs, ys, **kw):
        tiny_model.zero_grad()
        loss = accumulate_gradients(tiny_model, xs, ys, runtime, **kw)
        return loss, [p.grad.clone() for p in tiny_model.parameters()]

    whole_loss, whole = grads(x, y)
    learned = int((y >= 0).sum())
    parts = [grads(x[r:r + 2], y[r:r + 2], micro_batches=2, learned_total=learned, world_size=2,
                   no_sync=contextlib.nullcontext) for r in (0, 2)]
    assert torch.allclose(parts[0][0] + parts[1][0], whole_loss, atol=1e-6)
    for i, g in enumerate(whole):
        assert torch.allclose((parts[0][1][i] + parts[1][1][i]) / 2, g, atol=1e-6)


def test_stopping_is_what_any_rank_asked_for():
    flag = StopFlag()
    check = StopCheck(flag, None, agreed_by_ranks=True)
    assert check.votes() == [0.0, 0.0, 0.0]
    flag.set("interrupted")
    assert check.reason() == ""  # not before the ranks agreed
    check.agree([0.0, 1.0, 0.0])
    assert check.reason() == "interrupted"
    check.agree([1.0, 1.0, 2.0])
    assert check.reason() == "terminated"
    assert StopCheck(flag, None).reason() == "interrupted"  # alone: the own flag at once


def test_micro_batches_keep_their_slice_size_on_another_world_size():
    run = RunState(cache_file="c", name="n", epochs=1, total_steps=10, batch_size=16, window=8, start_step=0,
                   micro_batches=4, world_size=1)  # slices of 4 sequences
    assert micro_batches_for(run, 2) == 2 and micro_batches_for(run, 4) == 1
    run.world_size, run.micro_batches = 4, 1
    assert micro_batches_for(run, 1) == 4


@pytest.mark.slow
def test_a_rank_that_cannot_see_the_data_file_gets_it_from_rank_0(tmp_path):
    data = tmp_path / "tokens.uint16.bin"
    data.write_bytes(os.urandom(4321))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master-addr=127.0.0.1", f"--master-port={free_port()}",
                           str(ROOT / "tests" / "ddp_file_worker.py"), str(data)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = dict(line.split(" ", 2)[1:] for line in proc.stdout.splitlines() if line.startswith("rank "))
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    assert seen["0"] == f"{data} {digest} True"  # rank 0 reads its own file
    copy, copy_digest, left = seen["1"].split()
    assert copy != str(data) and copy.endswith(data.name)  # rank 1 a private copy, outside the folder
    assert copy_digest == digest and left == "False"  # the same bytes, removed when the job ended


def test_a_time_budget_plans_with_the_rate_of_the_whole_job_and_every_rank_keeps_rank_0s_schedule(data_file,
                                                                                                  tmp_path):
    """Two processes: the first guess counts both (the probe times one process's share of the
    batch), the schedule is re-planned from the real steps, and both ranks learn with rank 0's
    plan although rank 1's clock runs at half the speed."""
    from engine.folder.records import RunKind
    from engine.training import budget
    from engine.training.runs import REPLAN_EVERY

    folder = tmp_path / "model"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master-addr=127.0.0.1", f"--master-port={free_port()}",
                           str(ROOT / "tests" / "ddp_budget_worker.py"), str(folder), str(data_file), "0.1"],
                          capture_output=True, text=True, timeout=180, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    reports = {int(line.split(" ", 2)[1]): json.loads(line.split(" ", 2)[2])
               for line in proc.stdout.splitlines() if line.startswith("rank ")}
    zero, one = reports[0], reports[1]
    assert zero["stopped"] == one["stopped"] == "" and zero["steps"] == one["steps"] > REPLAN_EVERY
    assert zero["probed"] == [2] and one["probed"] == []  # rank 0's share of the batch of 4, once
    meta = ModelFolder(folder).read_meta()
    run = torch.load(folder / "checkpoint.pth", weights_only=True)["state"]["run"]
    assert run["world_size"] == 2 and run["batch_size"] == 4 and RunKind(run["kind"]) is RunKind.TEXT
    shape = budget.Shape(meta.model.d_model, meta.model.n_layer, meta.model.n_head, run["window"])
    job_tokens_per_s = 2 * 1e8 / shape.flops_per_token(meta.model.vocab_size)
    first_total = zero["schedule"][0][1]
    assert first_total == int(6.0 * job_tokens_per_s / (4 * run["window"]))  # the whole job's rate, not one GPU's
    totals = [total for _, total in zero["schedule"]]
    assert totals[REPLAN_EVERY] != first_total  # re-planned from the timed steps ...
    assert one["schedule"] == zero["schedule"]  # ... and every rank follows rank 0's plan

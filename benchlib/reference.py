"""The race: ours against Hugging Face transformers' GPT-2 at the same configuration.

``run_reference`` runs ``reference_hf.py`` (in ``../shared/bench``) in a subprocess, and
``race`` alternates ours and theirs, back to back, so each ratio compares two numbers
taken one right after the other on a machine whose speed drifts.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from benchlib.generation import bench_generation
from benchlib.machine import OtherLoad, measure_when_quiet, spread
from benchlib.training import bench_training
from model import ModelConfig


def run_reference(script: Path, cfg: ModelConfig, batch: int, steps: int, warmup: int, new_tokens: int,
                  prompt_len: int, repeats: int, only: str = "") -> dict:
    """reference_hf.py at our configuration; ``only`` "train" or "gen" runs that half alone."""
    if importlib.util.find_spec("transformers") is None:
        return {"skipped": "transformers is not installed (pip install -r requirements-bench.txt)"}
    if not script.exists():
        return {"skipped": f"{script} not found"}
    cmd = [sys.executable, str(script), "--d-model", str(cfg.d_model), "--n-layer", str(cfg.n_layer),
           "--n-head", str(cfg.n_head), "--seq-len", str(cfg.context), "--vocab", str(cfg.vocab_size),
           "--dropout", str(cfg.dropout), "--batch", str(batch), "--train-steps", str(steps),
           "--warmup", str(warmup), "--gen-tokens", str(new_tokens), "--prompt-len", str(prompt_len),
           "--gen-repeats", str(repeats), "--device", "cpu", "--dtype", "float32"]
    if only:
        cmd.append("--skip-gen" if only == "train" else "--skip-train")
    with OtherLoad() as load:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"skipped": f"the reference failed (exit {proc.returncode}): {tail[0]}"}
    result = json.loads(lines[-1])
    # The child's CPU counts as ours here: what is left is other processes.
    result["other_load"] = load.share
    return result


def race(script: Path, cfg: ModelConfig, gen_cfg: ModelConfig, tokenizer, batch: int, steps: int, warmup: int,
         new_tokens: int, prompt_len: int, repeats: int, rounds: int, max_wait: float) -> dict:
    """Ours, then theirs, back to back, ``rounds`` times, for training and for generation.

    The speed of a shared machine drifts over minutes, so each ratio compares two
    measurements taken one right after the other, never at the same time.
    """
    out: dict = {"rounds": []}
    for _ in range(rounds):
        row = {"ours_train": measure_when_quiet(
            lambda: bench_training(cfg, batch, "fp32", steps, warmup), max_wait)["tokens_per_s"]["median"]}
        ref = measure_when_quiet(lambda: run_reference(script, cfg, batch, steps, warmup, new_tokens, prompt_len,
                                                       repeats, only="train"), max_wait)
        if "skipped" in ref:
            return ref
        out["reference"] = ref
        row["theirs_train"] = ref["train_tokens_per_s"]
        gen = measure_when_quiet(lambda: bench_generation(gen_cfg, tokenizer, new_tokens, prompt_len, repeats,
                                                          plain_only=True), max_wait)
        row["ours_gen"] = gen["cached"]["tokens_per_s"]["median"]
        row["ours_gen_fp32"] = gen.get("cached_fp32", gen["cached"])["tokens_per_s"]["median"]
        row["ours_gen_default"] = gen["cached_default_sampling"]["tokens_per_s"]["median"]
        ref = measure_when_quiet(lambda: run_reference(script, cfg, batch, steps, warmup, new_tokens, prompt_len,
                                                       repeats, only="gen"), max_wait)
        if "skipped" in ref:
            return ref
        row["theirs_gen"] = ref["gen_tokens_per_s_median"]
        row["train_ratio"] = row["ours_train"] / row["theirs_train"]
        row["gen_ratio"] = row["ours_gen"] / row["theirs_gen"]
        row["gen_ratio_fp32"] = row["ours_gen_fp32"] / row["theirs_gen"]
        row["gen_ratio_default"] = row["ours_gen_default"] / row["theirs_gen"]
        out["rounds"].append(row)
    out["gen_weights"] = gen["weights"]
    for key in ("ours_train", "theirs_train", "ours_gen", "ours_gen_fp32", "ours_gen_default", "theirs_gen",
                "train_ratio", "gen_ratio", "gen_ratio_fp32", "gen_ratio_default"):
        out[key] = spread([row[key] for row in out["rounds"]])
    return out

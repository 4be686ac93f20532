"""The text of results, the same for the menu and the command line.

Each function takes a typed value (a status report, a model's information, an export
report) and returns the text to print; none of them reads files or prints. The
values come from ``session.Session``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.app.display import human_bytes, human_count, loss_chart, rows_table
from engine.data.conversations import ConversationSource
from engine.data.sources import Source
from engine.export.model_export import ExportReport
from engine.folder.records import FolderStatus, ModelSummary, RunKind
from engine.generation.generator import ModelInfo
from engine.training.events import ContinualReport, TrainResult


@dataclass(frozen=True)
class StatusReport:
    """The Training Status screen's facts: the folder's status and where its loss plot stands."""

    model_dir: Path
    status: FolderStatus
    loss_plot: Path | None  # None: never drawn
    plot_is_stale: bool  # training has moved on since the plot was drawn


@dataclass(frozen=True)
class SystemReport:
    """The System Information screen's facts: the machine, and the model folder without loading it."""

    hardware: list[tuple[str, str]]
    model_dir: Path
    model: ModelSummary | None  # None: no trained model yet (or config.json unreadable)
    config_error: str  # why config.json could not be read; "" when it could
    files: list[tuple[str, int]]  # (path inside the folder, bytes)


def notes(lines: list[str]) -> list[str]:
    return [f"Note: {line}" for line in lines]


def source_summary(source: Source) -> str:
    """What the training data is, and any note about reading it."""
    return "\n".join([f"Data: {source.name} ({human_bytes(source.n_bytes)})", *notes(source.notes)])


def conversations_summary(source: ConversationSource) -> str:
    head = f"Data: {source.name} ({len(source.conversations):,} conversations, {human_bytes(source.n_bytes)})"
    return "\n".join([head, *notes(source.notes)])


def training_outcome(result: TrainResult, model_dir: Path | str, resume_hint: str) -> str:
    """The last line of a training call that returned: stopped and saved, or complete."""
    if result.stopped_early:
        return (f"Training stopped ({result.stopped_early}) at step {result.global_step}; "
                f"checkpoint saved. {resume_hint}")
    return (f"Training complete: {result.steps} steps this run, {result.global_step} in total. "
            f"Model saved in {model_dir}")


def continual_screen(report: ContinualReport) -> str:
    """After Continue Training: the vocabulary growth, then held-out results before and after."""
    lines = []
    growth = report.growth
    if growth is not None and growth.added == 0:
        lines.append("Vocabulary: no new token was frequent enough to add.")
    elif growth is not None:
        examples = ", ".join(repr(t) for t in growth.examples[:8])
        lines.append(f"Vocabulary: {growth.old_vocab:,} -> {growth.new_vocab:,} tokens "
                     f"({growth.added} added, e.g. {examples})")
        lines.append(f"Tokens per byte of the new data: {growth.tokens_per_byte_before:.3f} -> "
                     f"{growth.tokens_per_byte_after:.3f}; earlier validation text tokenized "
                     f"differently: {growth.drift:.1%}")
    rows = [("Dataset", "loss before -> after | bits/byte before -> after")]
    for row in report.table:
        before, after = row.before, row.after
        if before:
            text = f"{before.val_loss:.4f} -> {after.val_loss:.4f} | {before.bpb:.4f} -> {after.bpb:.4f}"
        else:
            text = f"(new) -> {after.val_loss:.4f} | (new) -> {after.bpb:.4f}"
        rows.append((row.name, text))
    lines += ["\nHeld-out results per dataset:", rows_table(rows)]
    return "\n".join(lines)


def _status_rows(status: FolderStatus) -> list[tuple[str, str]]:
    last = status.last_eval
    rows = [("Tokenizer", status.tokenizer),
            ("Stage", status.stage + ("" if status.chat_tuned else " (Train on Conversations makes it a chat model)")),
            ("Steps", f"{status.steps:,}"),
            ("Tokens seen", f"{status.tokens_seen:,}"),
            ("Epochs completed", str(status.epochs))]
    if last:
        rows.append(("Last validation", f"loss {last.val_loss:.4f} | perplexity {last.perplexity:.2f} "
                                        f"| {last.bpb:.4f} bits/byte (step {last.step})"))
        rows.append(("Best validation loss", f"{status.best_val_loss:.4f}"))
    else:
        rows.append(("Validation", "none yet (runs at the end of each epoch)"))
    for run in status.runs[-5:]:
        what = "Fine-tuned on" if run.kind is RunKind.CHAT else "Trained on"
        length = f"a {run.minutes:g}-minute budget" if run.minutes else f"{run.epochs} epochs"
        rows.append((what, f"{run.name} ({run.tokens:,} tokens, {length})"))
    for record in status.datasets:
        latest = record.latest
        if latest is None:
            result = "not evaluated yet"
        elif record.kind is RunKind.CHAT:
            result = f"held-out assistant loss {latest.val_loss:.4f}, {latest.bpb:.4f} bits/byte"
        else:
            result = f"{latest.bpb:.4f} bits/byte"
        rows.append(("Dataset", f"{record.name}: {result}"))
    return rows


def loss_plot_note(report: StatusReport) -> str:
    """Where the drawn loss curves are, and whether training has moved on since."""
    redraw = f"python interface.py status --plot --model-dir {report.model_dir}"
    if report.loss_plot is None:
        return f"none yet; draw them with: {redraw}"
    if report.plot_is_stale:
        return f"{report.loss_plot} (drawn before the latest training; redraw: {redraw})"
    return str(report.loss_plot)


def status_screen(report: StatusReport) -> str:
    rows = [("Model folder", str(report.model_dir)), *_status_rows(report.status),
            ("Loss curves (PNG)", loss_plot_note(report))]
    return "\n".join(["\n=== Training Status ===", rows_table(rows),
                      "\nTraining loss by step:", loss_chart(report.status.losses)])


def system_screen(report: SystemReport) -> str:
    lines = ["\n=== System Information ===", "Hardware:", rows_table(report.hardware),
             f"\nModel folder: {report.model_dir}"]
    m = report.model
    if report.config_error:
        return "\n".join([*lines, f"  cannot read config.json: {report.config_error}"])
    if m is None:
        return "\n".join([*lines, "  (no trained model yet)"])
    lines.append(rows_table([
        ("Parameters", f"{m.parameters:,} ({human_count(m.parameters)})"),
        ("Vocabulary", f"{m.vocab_size:,} ({m.tokenizer})"),
        ("Layers / heads", f"{m.n_layer} / {m.n_head} (d_model {m.d_model})"),
        ("Context", f"{m.context} tokens"),
        ("Size in memory", human_bytes(m.parameters * 4) + " (fp32)"),
        ("Training steps", f"{m.training_steps:,}"),
    ]))
    lines += ["Files:", rows_table([(name, human_bytes(size)) for name, size in report.files])]
    return "\n".join(lines)


def model_screen(info: ModelInfo) -> str:
    return "\n".join(["\n=== Model Information ===", rows_table([
        ("Parameters", f"{info.parameters:,} ({human_count(info.parameters)})"),
        ("Vocabulary size", f"{info.config.vocab_size:,} ({info.tokenizer})"),
        ("Architecture", f"{info.config.n_layer} layers, {info.config.n_head} heads, d_model {info.config.d_model}"),
        ("Context", f"{info.config.context} tokens"),
        ("Memory (fp32 weights)", f"{info.memory_mb:.1f} MB"),
        ("Training steps", f"{info.training_steps:,}"),
        ("Device", info.device),
    ])])


def export_summary(report: ExportReport) -> str:
    """What was written, and the one step to use it."""
    chat = " with the chat template" if report.chat_template else ""
    if report.format == "hf":
        return (f"Exported{chat} to {report.path} ({len(report.files)} files, {human_bytes(report.n_bytes)}). "
                f"Load it with transformers: AutoModelForCausalLM.from_pretrained({report.path!r})")
    return (f"Exported{chat} to {report.path} ({human_bytes(report.n_bytes)}). "
            f"Run it with llama.cpp: llama-cli -m {report.path}")

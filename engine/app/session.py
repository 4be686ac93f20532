"""One console session: the model folder, the machine, the generation settings and the actions.

The menu (``interface.py``) and the command line (``cli``) each make a ``Session`` from
their flags and call the same actions on it: train on a source for a length, teach
the model new data, fine-tune it on conversations, resume an interrupted run, load
the generator, read the status, system and model information, export, serve. Neither
reaches into the other. The session asks nothing: the menu and the command line get
their answers first, and format what comes back with ``screens``.

Every training call goes through ``Session.drive``: notes, the progress bar, Ctrl+C
(the first saves and stops, a second stops at once) and the final line, printed
through the session's ``out``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from engine.app.console import Terminated, TrainingLength
from engine.app.display import TrainingProgress
from engine.app.distributed_training import make_trainer
from engine.app.screens import StatusReport, SystemReport, notes, training_outcome
from engine.data.conversations import ConversationSource
from engine.data.sources import Source
from engine.export.model_export import ExportReport, export_model
from engine.folder.model_folder import HISTORY_FILE, LOSS_PLOT_FILE, ModelFolder, TokenizerChoice
from engine.generation.generator import ModelInfo, ResponseGenerator
from engine.generation.sampling import GenerationConfig
from engine.runtime import hardware
from engine.serving import server
from engine.training import continual
from engine.training.events import ContinualReport, TrainingEvent, TrainResult
from engine.training.runs import StopFlag, StopReason
from engine.training.trainer import Trainer

MENU_RESUME_HINT = "Choose Continue Training to resume."
# A training call as the driver starts it: progress events go to the first argument.
TrainingCall = Callable[[Callable[[TrainingEvent], None], StopFlag], TrainResult]


def generation_settings(args: argparse.Namespace) -> GenerationConfig:
    """The generation flags as the settings every answer starts from."""
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


class Session:
    """The state both console entry points share, and the actions they run on it.

    ``args`` holds every flag (the command line lays a subcommand's own over the
    defaults of the rest); ``out`` receives what training prints; ``resume_hint`` ends
    the line of a run that stopped early (the menu and the command line resume
    differently).
    """

    def __init__(self, args: argparse.Namespace, out: Callable[[str], None] = print,
                 resume_hint: str = MENU_RESUME_HINT) -> None:
        self.args = args
        self.out = out
        self.resume_hint = resume_hint
        self.model_dir = Path(args.model_dir).expanduser()
        self.tokenizer_kind: str | None = args.tokenizer
        self.gen_cfg = generation_settings(args)  # a chat's /set changes stay for the next chat
        self.generator: ResponseGenerator | None = None
        self._runtime: hardware.Runtime | None = None

    @property
    def folder(self) -> ModelFolder:
        return ModelFolder(self.model_dir)

    @property
    def runtime(self) -> hardware.Runtime:
        """The device and precision the flags ask for, decided on first use (ValueError if impossible)."""
        if self._runtime is None:
            self._runtime = hardware.detect_runtime(self.args.device, self.args.precision)
        return self._runtime

    def has_model(self) -> bool:
        return self.folder.has_model()

    def choose_tokenizer(self, requested: str | None) -> TokenizerChoice:
        """The folder's tokenizer, or ``requested`` for a new model; kept when one is decided."""
        choice = self.folder.choose_tokenizer(requested)
        if choice.kind is not None:
            self.tokenizer_kind = choice.kind
        return choice

    # -- training ---------------------------------------------------------------------------
    def make_trainer(self) -> Trainer:
        return make_trainer(self.args, self.runtime, tokenizer_kind=self.tokenizer_kind)

    def drive(self, trainer: Trainer, start: TrainingCall) -> TrainResult | None:
        """Run a training call with a progress bar; Ctrl+C saves and returns.

        Returns the call's result, or None when a second Ctrl+C stopped it at once.
        Raises ``Terminated`` after the save when SIGTERM stopped it.
        """
        self._tell_notes(trainer)
        progress = TrainingProgress(self.out)
        self.generator = None  # the weights are about to change
        try:
            result = start(progress, StopFlag())
        except KeyboardInterrupt:
            progress.close()
            self.out("Stopped at once; the last checkpoint on disk is intact.")
            return None
        finally:
            progress.close()
        self._tell_notes(trainer)
        if result.stopped_early is StopReason.TERMINATED:
            self.out(f"Terminated at step {result.global_step}; checkpoint saved.")
            raise Terminated
        self.out(training_outcome(result, self.model_dir, self.resume_hint))
        return result

    def _tell_notes(self, trainer: Trainer) -> None:
        for line in notes(trainer.notes):
            self.out(line)
        trainer.notes.clear()

    def train_on(self, source: Source, length: TrainingLength) -> TrainResult | None:
        """Train the folder's model (a new one if there is none) on ``source``."""
        trainer = self.make_trainer()
        return self.drive(trainer, lambda on_event, stop: trainer.train(source, length.epochs, on_event, stop,
                                                                        length.minutes))

    def continue_on(self, trainer: Trainer, source: Source, expand: bool, max_new: int,
                    length: TrainingLength) -> ContinualReport | None:
        """Teach the model ``source`` (vocabulary growth, rehearsal); the before/after report."""
        reports: list[ContinualReport] = []

        def start(on_event, stop) -> TrainResult:
            reports.append(continual.train_on_new_data(trainer, source, length.epochs, expand, max_new, on_event,
                                                       stop, length.minutes))
            return reports[-1].result

        return reports[-1] if self.drive(trainer, start) is not None else None

    def resume(self, trainer: Trainer) -> TrainResult | None:
        """Finish the run an interruption left (``trainer.interrupted_run()`` is not None)."""
        return self.drive(trainer, lambda on_event, stop: trainer.resume(on_event, stop))

    def finetune_on(self, source: ConversationSource, length: TrainingLength) -> TrainResult | None:
        """Fine-tune the model on conversations for ``length`` (passes or minutes): it learns the chat format."""
        trainer = self.make_trainer()
        return self.drive(trainer, lambda on_event, stop: trainer.train_conversations(source, length.epochs, on_event,
                                                                                      stop, length.minutes))

    # -- the trained model ------------------------------------------------------------------
    def load_generator(self) -> ResponseGenerator:
        """The folder's model, ready to answer (loaded once, again after training)."""
        if self.generator is None:
            if not self.has_model():
                raise FileNotFoundError(f"no trained model in {self.model_dir}; "
                                        "train one first: python interface.py train")
            self.generator = ResponseGenerator(str(self.model_dir), self.runtime)
        return self.generator

    def model_info(self) -> ModelInfo:
        return self.load_generator().info()

    def status_report(self) -> StatusReport | None:
        """The Training Status facts; None when the folder holds no model."""
        folder = self.folder
        status = folder.status()
        if status is None:
            return None
        plot, history = folder.file(LOSS_PLOT_FILE), folder.file(HISTORY_FILE)
        drawn = plot.exists()
        stale = drawn and history.exists() and history.stat().st_mtime > plot.stat().st_mtime
        return StatusReport(self.model_dir, status, plot if drawn else None, stale)

    def system_report(self) -> SystemReport:
        """The machine and the model folder, read without loading the model."""
        hardware_rows = hardware.system_summary(self.runtime)
        try:
            summary, error = self.folder.summary(), ""
        except ValueError as exc:
            summary, error = None, str(exc)
        files = []
        if summary is not None:
            files = [(str(p.relative_to(self.model_dir)), p.stat().st_size)
                     for p in sorted(self.model_dir.rglob("*")) if p.is_file()]
        return SystemReport(hardware_rows, self.model_dir, summary, error, files)

    def export(self, fmt: str, destination: str | Path, dtype: str | None = None, force: bool = False) -> ExportReport:
        """The model for transformers (``hf``, a folder) or llama.cpp (``gguf``, a file)."""
        return export_model(self.model_dir, fmt, destination, dtype, force)

    def serve(self, settings: server.ServeSettings | argparse.Namespace, output_fn: Callable[[str], None],
              verbose: bool = False) -> int:
        """The OpenAI-compatible server until Ctrl+C; this session's settings are each request's defaults."""
        return server.run_serve(self.model_dir, settings, self.gen_cfg, self.runtime, output_fn=output_fn,
                                verbose=verbose)

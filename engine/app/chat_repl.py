"""The console chat: a loop with the habits of Ollama's and llama.cpp's prompts.

Lines starting with "/" are commands; a line of three double quotes starts
multi-line input, which ends at the next line that ends with them. Line editing and
history come from the terminal's readline (``console.edit_lines_on_a_terminal``, which
``interface.main`` calls for the menu and every subcommand). Input and output come
through a ``Console``, like the rest of the interface; ``run_chat`` is the Chat of
the menu and of ``interface.py chat`` alike.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Callable, Iterator

from engine.app.console import USER_ERRORS, Console
from engine.app.session import Session
from engine.data.conversations import append_conversation, last_conversation
from engine.generation.generator import ChatSession
from engine.generation.sampling import GenerationConfig

MULTILINE = '"""'
EXIT_COMMANDS = ("/bye", "/exit", "/quit", "/back")
# /set NAME VALUE: the names people type, and the GenerationConfig field each sets.
SETTING_NAMES = {"temperature": "temperature", "temp": "temperature", "top_k": "top_k", "topk": "top_k",
                 "top_p": "top_p", "topp": "top_p", "repetition_penalty": "repetition_penalty",
                 "repeat_penalty": "repetition_penalty", "max_new_tokens": "max_new_tokens",
                 "num_predict": "max_new_tokens", "length": "max_new_tokens", "len": "max_new_tokens",
                 "seed": "seed"}
SHORT_FORMS = {"/temp": "temperature", "/temperature": "temperature", "/len": "max_new_tokens",
               "/length": "max_new_tokens", "/topk": "top_k", "/seed": "seed"}
CHAT_HELP = f"""Chat commands:
  /system TEXT        set the system message (/system alone removes it)
  /set NAME VALUE     temperature, top_k, top_p, repetition_penalty, max_new_tokens, seed
                      (seed off: not repeatable); /temp /len /topk /seed are short forms
  /show               the model and the settings in force
  /save FILE          add this conversation to FILE as a JSONL line (the training format)
  /load FILE          continue the last conversation saved in FILE
  /reset              forget the conversation so far
  {MULTILINE}                 start or end a message of several lines
  /help               this list
  /bye                back to the Response Menu (/exit works too)"""


def parse_setting(name: str, value: str, cfg: GenerationConfig) -> GenerationConfig:
    """``cfg`` with one setting changed; ValueError with the fix for a bad name or value."""
    field = SETTING_NAMES.get(name.lower().replace("-", "_"))
    if field is None:
        known = ", ".join(f.name for f in fields(GenerationConfig))
        raise ValueError(f"unknown setting {name!r}; choose one of {known}")
    value = value.strip()
    try:
        if field == "seed":
            parsed = None if value.lower() in ("off", "none", "") else int(value)
        elif field in ("top_k", "max_new_tokens"):
            parsed = int(value)
        else:
            parsed = float(value)
    except ValueError:
        raise ValueError(f"{field} needs a number (got {value!r})") from None
    return GenerationConfig.from_dict({**cfg.to_dict(), field: parsed})


def describe_settings(cfg: GenerationConfig) -> str:
    seed = "off" if cfg.seed is None else cfg.seed
    return (f"temperature {cfg.temperature}, top_k {cfg.top_k}, top_p {cfg.top_p}, repetition_penalty "
            f"{cfg.repetition_penalty}, max_new_tokens {cfg.max_new_tokens}, seed {seed}")


class ChatLoop:
    """One chat from the Response Menu (or ``interface.py chat``) until /bye."""

    def __init__(self, session: ChatSession, ask: Callable[[str], str], out: Callable[[str], None],
                 show_stream: Callable, model_line: str) -> None:
        self.session = session
        self.ask = ask
        self.out = out
        self.show_stream = show_stream
        self.model_line = model_line

    def run(self) -> None:
        while True:
            message = self.read_message()
            if message is None:
                return
            if message:
                self.show_stream("AI: ", self.session.send(message))

    def read_message(self) -> str | None:
        """The next message ('' when the line was a command or empty); None to leave."""
        line = self.ask("You: ")
        if line.strip().startswith(MULTILINE):
            return self.read_multiline(line.strip()[len(MULTILINE):])
        line = line.strip()
        if not line:
            self.out("(type a message, /help for commands, /bye to leave)")
            return ""
        if line.startswith("/"):
            return None if not self.command(line) else ""
        return line

    def read_multiline(self, first: str) -> str:
        lines = [first]
        while not lines[-1].rstrip().endswith(MULTILINE):
            lines.append(self.ask("... "))
        lines[-1] = lines[-1].rstrip()[: -len(MULTILINE)]
        return "\n".join(lines).strip("\n")

    def command(self, line: str) -> bool:
        """Apply a /command; False when the chat should end."""
        name, _, value = line.partition(" ")
        name, value = name.lower(), value.strip()
        session = self.session
        try:
            if name in EXIT_COMMANDS:
                return False
            if name == "/help":
                self.out(CHAT_HELP)
            elif name == "/reset":
                session.reset()
                self.out("(conversation cleared; the system message stays)")
            elif name == "/system":
                session.system = value
                self.out(f"(system message set: {value})" if value else "(system message removed)")
            elif name == "/set":
                setting, _, setting_value = value.partition(" ")
                if not setting:
                    raise ValueError("usage: /set NAME VALUE, e.g. /set temperature 0.7")
                session.cfg = parse_setting(setting, setting_value, session.cfg)
                self.out(f"({describe_settings(session.cfg)})")
            elif name in SHORT_FORMS:
                session.cfg = parse_setting(SHORT_FORMS[name], value, session.cfg)
                self.out(f"({describe_settings(session.cfg)})")
            elif name == "/show":
                self.out(self.model_line)
                self.out(f"Settings: {describe_settings(session.cfg)}")
                self.out(f"System message: {session.system or '(none)'}")
                self.out(f"Turns so far: {len(session.messages) // 2}")
            elif name == "/save":
                if not value:
                    raise ValueError("usage: /save FILE, e.g. /save chats.jsonl")
                path = append_conversation(value, session.conversation())
                self.out(f"(conversation saved to {path}; train on it with Train on Conversations)")
            elif name == "/load":
                if not value:
                    raise ValueError("usage: /load FILE")
                session.load(last_conversation(value))
                self.out(f"(loaded {len(session.messages) // 2} exchange(s) from {value}; go on)")
            else:
                self.out(f"Unknown command {name}; /help lists them.")
        except USER_ERRORS as exc:
            self.out(f"Error: {exc}")
        return True


def run_chat(session: Session, console: Console) -> None:
    """A chat with the session's model until /bye (or the end of input)."""
    generator = session.load_generator()
    chat = ChatSession(generator, session.gen_cfg)
    learned = generator.chat_ids is not None
    console.out("Chat: the model remembers the conversation. /help for commands, /bye to leave.")
    if not learned:
        console.out("Note: this model was not fine-tuned on conversations, so it tends to continue text rather "
                    "than take turns; Training Menu 5 (Train on Conversations) makes it a chat model.")
    model_line = (f"Model: {session.model_dir} ({generator.model.num_params():,} parameters, "
                  + ("learned chat format)" if learned else "plain User:/AI: prompt, not chat-tuned)"))

    def show(prefix: str, pieces: Iterator[str]) -> None:
        console.show_stream(prefix, pieces)
        console.notes(generator.notices)

    try:
        ChatLoop(chat, console.ask, console.out, show, model_line).run()
    finally:
        session.gen_cfg = chat.cfg  # settings changed in the chat stay for the next one

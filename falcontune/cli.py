"""The ``falcontune`` command: ``finetune``, ``generate``, ``check-dataset``, ``export`` and ``plot``.

Flag names and defaults follow falcontune (rmihaylov/falcontune ``run.py``), so the commands
of its tutorials work verbatim. finetune's flags (and generate's model flags) are built from the
fields of ``settings.FinetuneConfig``; a ``ParameterError`` raised by the API is printed with
flag names. ``--flag=value`` and ``--flag value`` both work; boolean flags
accept a bare ``--flag`` or ``--flag=true|false|1|0``.

User errors (missing files, malformed data, bad flags, unknown models, out of memory) print a
single line ``falcontune: error: <message>`` and exit with status 2; ``--verbose`` adds the
traceback. A training stopped with Ctrl-C saves a checkpoint and the adapter, then exits 130.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Any, Callable, Optional, Sequence

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def str2bool(value: str) -> bool:
    s = str(value).strip().lower()
    if s in ("1", "true", "t", "yes", "y", "on"):
        return True
    if s in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false or 1/0, got {value!r}")


def _optional_int(value: str) -> Optional[int]:
    return None if str(value).strip().lower() in ("", "none", "null") else int(value)


def _add_bool(p: argparse.ArgumentParser, *names: str, default: Optional[bool] = False, help: str = "") -> None:
    p.add_argument(*names, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL",
                   help=f"{help} Default: %(default)s")


class _Given(argparse.Action):
    """Stores the value and remembers that the flag was typed (args.given)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", set()) | {self.dest}


_KINDS: dict[str, Callable[[str], Any]] = {"str": str, "int": int, "float": float, "optional_int": _optional_int}


def _add_setting(p: argparse.ArgumentParser, name: str) -> None:
    """A flag described by the FinetuneConfig field of the same name (help, default, parsing)."""
    from dataclasses import MISSING, fields

    from .settings import FinetuneConfig

    f = next(f for f in fields(FinetuneConfig) if f.name == name)
    meta = f.metadata
    flags = (*meta["aliases"], f"--{name}")
    if meta["kind"] == "bool":
        _add_bool(p, *flags, default=f.default, help=meta["help"])
    elif f.default is MISSING:
        p.add_argument(*flags, required=True, type=_KINDS[meta["kind"]], help=meta["help"])
    else:
        default = "" if f.default is None else " Default: %(default)s"
        p.add_argument(*flags, type=_KINDS[meta["kind"]], default=f.default, choices=meta["choices"],
                       help=meta["help"] + default)


_MODEL_SETTINGS = ("model", "weights", "tokenizer", "backend", "device", "verbose")


_DATA_TYPE_HELP = ("Dataset format: alpaca (instruction/input/output), gpt4all (prompt/response), chat (OpenAI "
                   "'messages' or ShareGPT 'conversations', rendered with a chat template) or text (raw documents: "
                   ".txt separated by blank lines, or {\"text\": ...} records; cut into cutoff_len windows). "
                   "Default: %(default)s")


def _add_data_type(p: argparse.ArgumentParser) -> None:
    from .data import DATA_TYPES
    p.add_argument("--data_type", default="alpaca", choices=DATA_TYPES, help=_DATA_TYPE_HELP)


def _add_chat_template(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat_template", default=None, metavar="NAME|FILE",
                   help="Chat template for --data_type=chat: a built-in name (falcon, chatml), a Jinja file, or a "
                        "tokenizer_config.json. Default: the chat_template of the tokenizer_config.json next to "
                        "tokenizer.json, else falcon (User: / Assistant: lines)")


def _finetune_parser(sub: Any) -> None:
    from dataclasses import fields

    from .settings import FinetuneConfig

    p = sub.add_parser("finetune", help="train a LoRA adapter",
                       description="Fine-tune a GPTQ Falcon model with LoRA. Every flag is also a parameter of "
                                   "falcontune.finetune().")
    for f in fields(FinetuneConfig):
        _add_setting(p, f.name)
    p.set_defaults(func=_run_finetune)


def _generate_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate text", description="Generate text with a model (+ LoRA).")
    for name in _MODEL_SETTINGS:
        _add_setting(p, name)
    p.add_argument("--lora_apply_dir", default=None, help="LoRA adapter directory to apply.")
    p.add_argument("--prompt", default="", help="Text used to initialize generation")
    p.add_argument("--instruction", default="", help="Instruction for an alpaca-style model")
    p.add_argument("--input", default="", help="Input (context) of the instruction")
    p.add_argument("--prompt_template", default="alpaca", choices=("alpaca", "fr"),
                   help="Template wrapping --instruction. Default: %(default)s")
    _add_bool(p, "--chat", help="Chat model: the prompt (or each line with --interactive, which keeps the "
                                "conversation) is a user message rendered with the chat template.")
    _add_chat_template(p)
    for name, typ, default, help_ in (
            ("--max_new_tokens", int, 400, "Maximum new tokens."),
            ("--top_p", float, 0.95, "Top-p (with --do_sample)."), ("--top_k", int, 40, "Top-k (with --do_sample)."),
            ("--temperature", float, 0.8, "Sampling temperature (with --do_sample)."),
            ("--num_beams", int, 1, "Number of beams."), ("--repetition_penalty", float, 1.0, "Repetition penalty."),
            ("--seed", _optional_int, None, "Sampling seed.")):
        p.add_argument(name, type=typ, default=default, action=_Given, help=f"{help_} Default: %(default)s")
    _add_bool(p, "--use_cache", default=True, help="Use the KV cache.")
    _add_bool(p, "--do_sample", help="Sample instead of greedy decoding.")
    _add_bool(p, "--interactive", help="Then read one prompt/instruction per line from stdin, until EOF or an "
                                       "empty line.")
    p.set_defaults(func=_run_generate, given=set())


def _check_parser(sub: Any) -> None:
    from .data import DATA_TYPES

    p = sub.add_parser("check-dataset", help="validate a dataset file",
                       description="Check every record of a dataset (all errors, by record number; unknown fields, "
                                   "with the known field they probably mean) and, with --tokenizer, report token "
                                   "lengths and how many examples --cutoff_len would cut. Exit status 1 when the "
                                   "dataset has errors.")
    p.add_argument("file", help="dataset file (JSON array or JSON Lines)")
    _add_data_type(p)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (or its directory) for token lengths; its tokenizer_config.json gives the "
                        "chat template")
    p.add_argument("--cutoff_len", type=int, default=256,
                   help="With --tokenizer: count the examples longer than this many tokens (finetune cuts them; "
                        "text documents are cut into windows). Default: %(default)s")
    p.add_argument("--prompt_template", default="alpaca", choices=("alpaca", "fr"),
                   help="Prompt template used to count tokens (alpaca data). Default: %(default)s")
    _add_chat_template(p)
    _add_bool(p, "--strict", help="Treat unknown fields (e.g. a misspelled 'imput') as errors.")
    _add_bool(p, "--verbose", help="Print the traceback of errors.")
    p.set_defaults(func=_run_check)


def _export_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="write the merged model (base + LoRA) as GGUF or HF safetensors",
                       description="Fold a LoRA adapter into the base model and write it as GGUF (llama.cpp, "
                                   "Ollama) or as a float16 Hugging Face checkpoint (what -c writes). "
                                   "No engine is built: this needs memory for one tensor at a time.")
    for name in ("model", "weights", "tokenizer"):
        _add_setting(p, name)
    p.add_argument("--lora_apply_dir", default=None, help="the LoRA adapter to fold in (default: none, the base alone)")
    p.add_argument("--format", default="gguf", choices=("gguf", "hf"), help="Default: %(default)s")
    p.add_argument("--outtype", default="f16", choices=("f16", "q8_0"),
                   help="GGUF matrices as float16 or llama.cpp's 8-bit q8_0. Default: %(default)s")
    p.add_argument("--out", required=True, help="the .gguf file, or the directory for --format=hf")
    _add_bool(p, "--verbose", help="Print the traceback of errors.")
    p.set_defaults(func=_run_export)


def _plot_parser(sub: Any) -> None:
    p = sub.add_parser("plot", help="draw the training curves of a run as a PNG",
                       description="Draw loss, eval loss and learning rate from LORA_OUT_DIR/log.jsonl into a PNG "
                                   "(needs matplotlib).")
    p.add_argument("lora_out_dir", metavar="LORA_OUT_DIR", help="the --lora_out_dir of a finetune run")
    p.add_argument("--output", default=None, help="PNG file to write. Default: LORA_OUT_DIR/training_curves.png")
    _add_bool(p, "--verbose", help="Print the traceback of errors.")
    p.set_defaults(func=_run_plot)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="falcontune",
                                     description="Fine-tune GPTQ Falcon models with LoRA (C/CUDA engine, no PyTorch)")
    parser.add_argument("--version", action="version", version=f"falcontune {__version__}")
    sub = parser.add_subparsers(title="commands", dest="command")
    _finetune_parser(sub)
    _generate_parser(sub)
    _check_parser(sub)
    _export_parser(sub)
    _plot_parser(sub)
    return parser


# ---------------------------------------------------------------------------------------------
# commands


def _run_finetune(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from . import trainer
    from .settings import FinetuneConfig

    kwargs = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig)}
    # in an MPI job, main() phrases an error with flags, prints it once and ends the job (dist.end_job)
    result = trainer.finetune(**kwargs, _end_job_on_error=False)
    return EXIT_INTERRUPTED if result.interrupted else 0


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "num_beams": args.num_beams,
          "use_cache": args.use_cache, "repetition_penalty": args.repetition_penalty, "seed": args.seed}
    if args.do_sample:
        kw.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    return kw


def _run_generate(args: argparse.Namespace) -> int:
    from .generate import check_sampling_args
    from .model import load_model, resolve_device
    from .tokenizer import missing_tokenizer_error

    if args.prompt and args.instruction:
        raise ValueError("give either --prompt or --instruction, not both")
    if not (args.prompt or args.instruction or args.interactive):
        raise ValueError("give --prompt or --instruction (or --interactive to read them from stdin)")
    note: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    ignored = check_sampling_args(args.do_sample, **{k: (True if k in args.given else None)
                                                     for k in ("temperature", "top_p", "top_k")})
    if ignored:
        note(f"note: {', '.join('--' + k for k in ignored)} only apply with --do_sample: greedy decoding "
             "ignores them (add --do_sample to sample)")
    model = load_model(args.model, args.weights, device=resolve_device(args.backend, args.device, note),
                       tokenizer=args.tokenizer)
    if model.tokenizer is None:
        raise missing_tokenizer_error(args.model)
    if args.lora_apply_dir:
        model.load_lora(args.lora_apply_dir)
    model.eval()
    instruction_mode = bool(args.instruction) or not args.prompt
    kw = _generation_kwargs(args)
    chat = _Chat(model, args.chat_template) if args.chat else None

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    def answer(text: str) -> None:
        t0 = time.perf_counter()
        if chat is not None:
            chat.reply(text, dict(kw, stream=show))
        elif instruction_mode:
            model.generate(instruction=text, input=args.input, template=args.prompt_template, stream=show, **kw)
        else:
            model.generate(prompt=text, stream=show, **kw)
        print(flush=True)
        note(f"(Took {time.perf_counter() - t0:.3f} s)")

    first = args.instruction or args.prompt
    if first:
        answer(first)
    if args.interactive:
        what = "instruction" if instruction_mode else "prompt"
        while True:
            if sys.stdin.isatty():
                print(f"Enter new {what}: ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line or not line.strip():
                break
            answer(line.rstrip("\r\n"))
    return 0


class _Chat:
    """generate --chat: the conversation so far, rendered with the chat template for each reply."""

    def __init__(self, model: Any, chat_template: Optional[str]) -> None:
        from .chat import resolve_template

        self.model = model
        self.template = resolve_template(chat_template, model.tokenizer)
        self.messages: list[dict[str, str]] = []

    def reply(self, text: str, kw: dict[str, Any]) -> str:
        import numpy as np

        from .chat import encode_chat

        self.messages.append({"role": "user", "content": text})
        ids = encode_chat(self.template, self.messages, self.model.tokenizer, add_generation_prompt=True)
        out = self.model.generate(input_ids=np.asarray([ids], dtype=np.int64), **kw)
        self.messages.append({"role": "assistant", "content": out.strip()})
        return out


def _run_check(args: argparse.Namespace) -> int:
    from .data import check_dataset
    from .tokenizer import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer) if args.tokenizer else None
    report = check_dataset(args.file, data_type=args.data_type, tokenizer=tok, cutoff_len=args.cutoff_len,
                           template=args.prompt_template, chat_template=args.chat_template, strict=args.strict)
    print(report)
    return 0 if report.ok else 1


def _run_export(args: argparse.Namespace) -> int:
    from .export import export

    out = export(args.model, args.out, format=args.format, outtype=args.outtype, weights=args.weights,
                 lora_apply_dir=args.lora_apply_dir, tokenizer=args.tokenizer)
    print(f"Modèle fusionné écrit / merged model written: {out}", file=sys.stderr, flush=True)
    return 0


def _run_plot(args: argparse.Namespace) -> int:
    from .plot import write_training_plot

    print(f"Courbes / training curves: {write_training_plot(args.lora_out_dir, args.output)}")
    return 0


def _with_flag_names(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The API phrases parameter errors with Python names (epochs=0); the command with flags."""
    from .errors import ParameterError

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except ParameterError as exc:
            raise ValueError(exc.as_flags()) from exc
    return run


# ---------------------------------------------------------------------------------------------
# errors


def _user_error_types() -> tuple[type, ...]:
    return (OSError, ValueError, KeyError, MemoryError, NotImplementedError)


# What a user of each command can change when memory runs out. The engine's messages state facts
# only (what it was allocating, how much); the advice is added here, once, for the command at hand.
_OUT_OF_MEMORY_ADVICE = {
    "finetune": "lower --mbatch_size or --cutoff_len, or use --gradient_checkpointing",
    "generate": "lower --max_new_tokens or --num_beams",
}


def _message(exc: BaseException, command: Optional[str] = None) -> str:
    """The one-line message of an error, with the advice that fits the command that failed."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and type(exc).__str__ is KeyError.__str__:
        text = str(exc.args[0])
    else:
        text = str(exc) or type(exc).__name__
    if isinstance(exc, MemoryError):
        if "out of memory" not in text.lower():
            text = f"out of memory ({text})"
        advice = _OUT_OF_MEMORY_ADVICE.get(command or "")
        if advice:
            text = f"{text}: {advice}"
    elif isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return " ".join(text.split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USER_ERROR
    verbose = bool(getattr(args, "verbose", False))
    from .dist import active_world, end_job

    try:
        return int(_with_flag_names(args.func)(args))
    except KeyboardInterrupt:
        world = active_world()
        if world is not None:  # a rank of an MPI job: the others must not wait for it
            end_job(world, "interrupted", EXIT_INTERRUPTED)
        print("falcontune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # one line for the user, the traceback with --verbose
        if verbose:
            traceback.print_exc()
        user = isinstance(exc, _user_error_types())
        hint = "" if user or verbose else " (run with --verbose for the traceback)"
        world = active_world()
        if world is not None:  # one message for the job, then every rank ends (MPI_Abort)
            end_job(world, f"{_message(exc, args.command)}{hint}", EXIT_USER_ERROR if user else 1)
        print(f"falcontune: error: {_message(exc, args.command)}{hint}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR if user else 1


if __name__ == "__main__":
    sys.exit(main())

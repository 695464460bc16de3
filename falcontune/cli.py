"""The ``falcontune`` command: ``finetune``, ``generate``, ``check-dataset`` and ``export``.

Flag names and defaults follow falcontune (rmihaylov/falcontune ``run.py``), so the commands
of its tutorials work verbatim. ``--flag=value`` and ``--flag value`` both work; boolean flags
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


_MODEL_HELP = ("a directory holding config.json, a Hugging Face Hub repo id ORG/NAME[@REVISION] (downloaded into "
               "the HF cache; HF_HUB_OFFLINE=1 uses the cache only), a known model name (e.g. "
               "falcon-7b-instruct-4bit: its repo unless --weights is given), or 'demo' (a small random model)")
_WEIGHTS_HELP = ("the .safetensors file, its directory or a Hub repo id (default: the model's directory or repo; "
                 "for a known name, its Hub repo)")
_TOKENIZER_HELP = "tokenizer.json, its directory or a Hub repo id (default: the one next to the model or the weights)"


def _add_model_args(p: argparse.ArgumentParser, weights_help: str) -> None:
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--weights", default=None, help=weights_help)
    p.add_argument("--tokenizer", default=None, help=_TOKENIZER_HELP)
    p.add_argument("--backend", default="auto",
                   help="auto, cpu or cuda (falcontune's triton and torch mean cuda here). Default: %(default)s")
    p.add_argument("--device", default=None, help="alias of --backend that also accepts cuda:N")
    _add_bool(p, "--verbose", help="Print the traceback of errors and more details.")


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
    p = sub.add_parser("finetune", help="train a LoRA adapter",
                       description="Fine-tune a GPTQ Falcon model with LoRA.")
    _add_model_args(p, _WEIGHTS_HELP)
    _add_data_type(p)
    p.add_argument("--dataset", default=None,
                   help="Path to local dataset file (JSON array or JSON Lines; .txt for --data_type=text).")
    p.add_argument("--lora_out_dir", default="alpaca_lora", help="Directory to place new LoRA. Default: %(default)s")
    p.add_argument("--lora_apply_dir", default=None, help="Directory of a LoRA adapter to start from.")
    p.add_argument("--resume_checkpoint", default=None,
                   help="checkpoint-N directory to resume from, or 'true'/'latest' for the newest in lora_out_dir")
    for name, typ, default, help_ in (
            ("--mbatch_size", int, 1, "Micro-batch size."), ("--batch_size", int, 2, "Batch size."),
            ("--epochs", int, 3, "Epochs."), ("--lr", float, 2e-4, "Learning rate."),
            ("--cutoff_len", int, 256, "Maximum tokens per example."), ("--lora_r", int, 8, "LoRA rank."),
            ("--lora_alpha", float, 16, "LoRA alpha."), ("--lora_dropout", float, 0.05, "LoRA dropout."),
            ("--gradient_checkpointing_ratio", float, 1.0, "Gradient checkpoint ratio."),
            ("--val_set_size", float, 0.2, "Validation set size (fraction, or a count if > 1)."),
            ("--warmup_steps", int, 50, "Warmup steps."), ("--save_steps", int, 50, "Checkpoint every N steps."),
            ("--save_total_limit", int, 3, "Checkpoints to keep."), ("--logging_steps", int, 10, "Log every N steps."),
            ("--eval_steps", _optional_int, None, "Evaluate every N steps (default: falcontune's rule)."),
            ("--seed", int, 42, "Seed of the split, LoRA init, data order and dropout."),
            ("--local_rank", int, 0, "Local rank (multi-GPU is not supported yet).")):
        p.add_argument(name, type=typ, default=default, help=f"{help_} Default: %(default)s")
    _add_bool(p, "--gradient_checkpointing", help="Use gradient checkpointing.")
    _add_bool(p, "-c", "--checkpoint", help="Also write the merged float16 model (transformers format).")
    p.add_argument("--merged_dir", default=None, help="Where -c writes the merged model. Default: LORA_OUT_DIR/merged")
    _add_bool(p, "--skip", help="Don't train (e.g. to merge an existing adapter with -c).")
    p.add_argument("--target_modules", default='["query_key_value"]',
                   help="Target modules for LoRA, a list such as '[\"query_key_value\", \"dense\"]'. "
                        "Default: %(default)s")
    p.add_argument("--use_eos_token", type=str2bool, default=True, metavar="BOOL",
                   help="Append the end-of-text token to examples (1/0). Default: %(default)s")
    p.add_argument("--prompt_template", default="alpaca", choices=("alpaca", "fr"),
                   help="Prompt template for alpaca data. Default: %(default)s")
    p.add_argument("--train_on_inputs", type=str2bool, default=None, metavar="BOOL",
                   help="Learn the prompt tokens too (default: true for alpaca, false for gpt4all and chat, where "
                        "only the assistant turns are learned; text learns every token)")
    _add_chat_template(p)
    _add_bool(p, "--packing", help="Pack several examples into each cutoff_len row (each example only sees "
                                   "itself; positions restart per example): less padding, fewer steps. "
                                   "Evaluation is packed too.")
    p.set_defaults(func=_run_finetune)


def _generate_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate text", description="Generate text with a model (+ LoRA).")
    _add_model_args(p, _WEIGHTS_HELP)
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
            ("--max_new_tokens", int, 400, "Maximum new tokens."), ("--top_p", float, 0.95, "Top-p."),
            ("--top_k", int, 40, "Top-k."), ("--temperature", float, 0.8, "Sampling temperature."),
            ("--num_beams", int, 1, "Number of beams."), ("--repetition_penalty", float, 1.0, "Repetition penalty."),
            ("--seed", _optional_int, None, "Sampling seed.")):
        p.add_argument(name, type=typ, default=default, help=f"{help_} Default: %(default)s")
    _add_bool(p, "--use_cache", default=True, help="Use the KV cache.")
    _add_bool(p, "--do_sample", help="Sample instead of greedy decoding.")
    _add_bool(p, "--interactive", help="Then read one prompt/instruction per line from stdin, until EOF or an "
                                       "empty line.")
    p.set_defaults(func=_run_generate)


def _check_parser(sub: Any) -> None:
    p = sub.add_parser("check-dataset", help="validate a dataset file",
                       description="Check every record of a dataset and report token lengths.")
    p.add_argument("file", help="dataset file (JSON array or JSON Lines)")
    _add_data_type(p)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (or its directory) for token lengths; its tokenizer_config.json gives the "
                        "chat template")
    p.add_argument("--cutoff_len", type=int, default=256, help="Maximum tokens per example. Default: %(default)s")
    p.add_argument("--prompt_template", default="alpaca", choices=("alpaca", "fr"),
                   help="Prompt template for alpaca data. Default: %(default)s")
    _add_chat_template(p)
    _add_bool(p, "--verbose", help="Print the traceback of errors.")
    p.set_defaults(func=_run_check)


def _export_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="write the merged model (base + LoRA) as GGUF or HF safetensors",
                       description="Fold a LoRA adapter into the base model and write it as GGUF (llama.cpp, "
                                   "Ollama) or as a float16 Hugging Face checkpoint (what -c writes). "
                                   "No engine is built: this needs memory for one tensor at a time.")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--weights", default=None, help=_WEIGHTS_HELP)
    p.add_argument("--tokenizer", default=None, help=_TOKENIZER_HELP)
    p.add_argument("--lora_apply_dir", default=None, help="the LoRA adapter to fold in (default: none, the base alone)")
    p.add_argument("--format", default="gguf", choices=("gguf", "hf"), help="Default: %(default)s")
    p.add_argument("--outtype", default="f16", choices=("f16", "q8_0"),
                   help="GGUF matrices as float16 or llama.cpp's 8-bit q8_0. Default: %(default)s")
    p.add_argument("--out", required=True, help="the .gguf file, or the directory for --format=hf")
    _add_bool(p, "--verbose", help="Print the traceback of errors.")
    p.set_defaults(func=_run_export)


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
    return parser


# ---------------------------------------------------------------------------------------------
# commands


_CLI_ONLY = ("func", "command")


def _run_finetune(args: argparse.Namespace) -> int:
    from .trainer import finetune

    kwargs = {k: v for k, v in vars(args).items() if k not in _CLI_ONLY}
    result = finetune(**kwargs)
    return EXIT_INTERRUPTED if result.interrupted else 0


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k, "num_beams": args.num_beams, "use_cache": args.use_cache,
            "repetition_penalty": args.repetition_penalty, "seed": args.seed}


def _run_generate(args: argparse.Namespace) -> int:
    from .model import load_model
    from .trainer import _no_tokenizer_error, resolve_device

    if args.prompt and args.instruction:
        raise ValueError("give either --prompt or --instruction, not both")
    if not (args.prompt or args.instruction or args.interactive):
        raise ValueError("give --prompt or --instruction (or --interactive to read them from stdin)")
    note: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    model = load_model(args.model, args.weights, device=resolve_device(args.backend, args.device, note),
                       tokenizer=args.tokenizer)
    if model.tokenizer is None:
        raise _no_tokenizer_error(args.model)
    if args.lora_apply_dir:
        model.load_lora(args.lora_apply_dir)
    model.eval()
    instruction_mode = bool(args.instruction) or not args.prompt
    kw = _generation_kwargs(args)
    chat = _Chat(model, args.chat_template) if args.chat else None

    def answer(text: str) -> None:
        t0 = time.perf_counter()
        if chat is not None:
            out = chat.reply(text, kw)
        elif instruction_mode:
            out = model.generate(instruction=text, input=args.input, template=args.prompt_template, **kw)
        else:
            out = model.generate(prompt=text, **kw)
        print(out, flush=True)
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
                           template=args.prompt_template, chat_template=args.chat_template)
    print(report)
    return 0 if report.ok else 1


def _run_export(args: argparse.Namespace) -> int:
    from .export import export

    out = export(args.model, args.out, format=args.format, outtype=args.outtype, weights=args.weights,
                 lora_apply_dir=args.lora_apply_dir, tokenizer=args.tokenizer)
    print(f"Modèle fusionné écrit / merged model written: {out}", file=sys.stderr, flush=True)
    return 0


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
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("falcontune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # one line for the user, the traceback with --verbose
        if verbose:
            traceback.print_exc()
        user = isinstance(exc, _user_error_types())
        hint = "" if user or verbose else " (run with --verbose for the traceback)"
        print(f"falcontune: error: {_message(exc, args.command)}{hint}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR if user else 1


if __name__ == "__main__":
    sys.exit(main())

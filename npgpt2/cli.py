"""`npgpt2 <command>`: parses flags, calls the library, prints.

Flag names follow OpenAI's gpt-2 scripts (generate_unconditional_samples.py,
interactive_conditional_samples.py, encode.py, train.py) where they overlap.
"""
import argparse
import contextlib
import logging
import shlex
import sys

from .errors import Npgpt2Error

log = logging.getLogger("npgpt2")


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, unless its help already says it (in words or %(default)s)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and "default" not in text.lower() and action.default is not None
                and action.default is not False and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with npgpt2's error format: the usage, then `npgpt2: error: <message>`
    (argparse would print `npgpt2 <command>: error:`), exit status 2."""

    def error(self, message):
        self.print_usage(sys.stderr)
        command = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"npgpt2: error: {command}{message}\n")


# ---------------------------------------------------------------- shared flags
def add_model_flags(p, default_models_dir="weights", adapter=True):
    p.add_argument("--model_name", default="124M", help="model folder name (default 124M; 117M/345M are aliases)")
    p.add_argument("--models_dir", default=default_models_dir,
                   help="folder holding model folders (default %(default)s)")
    if adapter:
        p.add_argument("--adapter", default=None, metavar="DIR",
                       help="LoRA adapters on the model: an npgpt2 `train --lora` run folder or a Hugging Face "
                            "PEFT folder (a LoRA run folder also loads by itself as --model_name)")
    p.add_argument("--example", default=None, metavar="NAME",
                   help="use a trained model shipped with npgpt2: induction or jargon (wins over "
                        "--models_dir/--model_name)")


def apply_example(args):
    """--example NAME: point --models_dir/--model_name at the shipped example's folder."""
    if getattr(args, "example", None) is not None:
        from .examples import example_dir
        folder = example_dir(args.example)
        args.models_dir, args.model_name = str(folder.parent), folder.name


def add_sampling_knobs(p):
    """The flags that shape each draw; shared by prompt/generate and chat."""
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; higher = more random")
    p.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")


def add_sampling_flags(p):
    p.add_argument("--seed", type=int, default=None, help="random seed; same seed, same text")
    p.add_argument("--nsamples", type=int, default=1, help="samples to generate (0 = forever)")
    p.add_argument("--batch_size", type=int, default=1, help="samples computed together")
    p.add_argument("--length", type=int, default=None, help="tokens per sample (default n_ctx // 2)")
    add_sampling_knobs(p)
    p.add_argument("--truncate", default=None, help='stop a sample as soon as this text appears, e.g. "<|endoftext|>"')


def add_dtype_flag(p):
    p.add_argument("--dtype", default="float32", type=dtype_choice,
                   help="weights: float32 (default) or int8 (8-bit, quantised at load: a quarter of the memory; "
                        "generation measured 1.0-1.6x faster than float32, depending on the CPU)")


def add_lora_flags(p):
    """train's LoRA flags (lora.py); the library checks them again (lora.check_train_flags)."""
    from .lora import TARGETS
    p.add_argument("--lora", type=lora_rank, default=0, metavar="R",
                   help="train LoRA adapters of rank R on a frozen base instead of every weight (e.g. 8)")
    p.add_argument("--lora_alpha", type=float, default=None, help="LoRA's alpha: updates scale by alpha/R (default 2R)")
    p.add_argument("--lora_targets", default=",".join(TARGETS),
                   help="the matrices that get adapters: a block's four (default, in every block: %(default)s) "
                        "and wte, the tied token embedding / output head (one adapter for both uses)")
    p.add_argument("--dtype", default="float32", type=dtype_choice,
                   help="the frozen base's weights with --lora: float32 (default) or int8 (8-bit, quantised at load)")


def lora_rank(text):
    """--lora R: a whole number >= 1 (0, the default, is no LoRA; it is not a value to give)."""
    try:
        r = int(text)
    except ValueError:
        r = None
    if r is None or r < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return r


def dtype_choice(text):
    from .quant import check_dtype
    try:
        return check_dtype(text)
    except Npgpt2Error as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def load_for_generation(args):
    from .model import load_model, resolve_model_dir
    from .tokenizer import load_tokenizer
    model_dir = resolve_model_dir(args.models_dir, args.model_name)
    model = load_model(model_dir, dtype=getattr(args, "dtype", "float32"),  # explain has no --dtype
                       adapter=args.adapter)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.n_vocab != model.hparams["n_vocab"]:
        log.warning("%s: the tokenizer has %d ids but the model %d; the text will not be the model's", model_dir,
                    tokenizer.n_vocab, model.hparams["n_vocab"])
    return model, tokenizer


def print_samples(model, enc, context, args):
    """Generate args.nsamples samples after `context` in OpenAI's output format, --batch_size
    of them decoded together (batch_decode.py); sample i draws from row_rng(--seed, i), so the
    text does not depend on --batch_size."""
    from .batch_decode import Row, decode, row_rng
    from .sampling import TextStream, check_batch_memory, check_sampling_args, check_seed, fit_prompt
    if args.batch_size < 1:
        raise Npgpt2Error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.nsamples < 0:
        raise Npgpt2Error(f"--nsamples must be >= 0, got {args.nsamples}")
    length = args.length if args.length is not None else model.hparams["n_ctx"] // 2
    # check every flag (and trim the prompt, warning once) before the first header is printed
    check_sampling_args(args.temperature, args.top_k, args.top_p)
    check_seed(args.seed)
    context = fit_prompt(context, length, model.hparams["n_ctx"])
    # the rows of one batch (all of them with --nsamples 0) are held at once
    batch = args.batch_size if args.nsamples == 0 else min(args.batch_size, args.nsamples)
    check_batch_memory(model.hparams, batch, len(context), length, model.dtype)

    def rows():
        i = 0
        while args.nsamples == 0 or i < args.nsamples:
            row = Row(context, length, args.temperature, args.top_k, args.top_p, row_rng(args.seed, i), tag=i)
            row.text = TextStream(enc, [args.truncate] if args.truncate else [])
            yield row
            i += 1

    live = batch == 1  # one sample at a time is shown as it is generated
    finished, shown = {}, 0  # samples done, waiting for the ones before them to be printed
    for row, token in decode(model, rows(), batch):
        if live and len(row.tokens) == 1:
            print_header(row.tag + 1)
        text, row.stop = row.text.push(token)
        if live:
            sys.stdout.write(text)
        if row.stop or row.finished:
            tail = row.text.finish()
            finished[row.tag] = tail if live else row.text.shown_text
            while shown in finished:
                if not live:
                    print_header(shown + 1)
                sys.stdout.write(finished.pop(shown) + "\n")
                shown += 1
        sys.stdout.flush()


def enable_line_editing():
    """Arrow keys and history for input() at a terminal (readline is absent on some systems)."""
    try:
        import readline  # noqa: F401
    except ImportError:
        pass


def print_header(i):
    sys.stdout.write("=" * 40 + " SAMPLE " + str(i) + " " + "=" * 40 + "\n")


# ---------------------------------------------------------------- commands
def cmd_generate(args):
    """Unconditional samples, as generate_unconditional_samples.py."""
    model, enc = load_for_generation(args)
    if enc.eot_token is None:  # a compact vocabulary (the demo's) may lack it
        raise Npgpt2Error(f"{model.source_dir}: the model's vocabulary has no <|endoftext|> token to start "
                          f"unconditional samples from; give it a prompt with `npgpt2 prompt`")
    print_samples(model, enc, [enc.eot_token], args)


def cmd_prompt(args):
    """Conditional samples for prompts read until end of input, as interactive_conditional_samples.py."""
    model, enc = load_for_generation(args)
    interactive = sys.stdin.isatty()
    if interactive:
        enable_line_editing()
    while True:
        try:
            raw = input("Model prompt >>> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and raw == "":
            break  # end of a piped input
        raw = raw.rstrip("\n")
        if not raw.strip():
            print("Prompt should not be empty!", file=sys.stderr)
            continue
        print_samples(model, enc, enc.encode(raw), args)
        print("=" * 80)
        sys.stdout.flush()


# ---------------------------------------------------------------- chat and serve
CHAT_HELP = """commands:
  /reset       forget the conversation
  /save FILE   write the transcript so far to FILE
  /help        this text
  //text       send "/text" as a message
End of input (Ctrl-D) or Ctrl-C at the prompt quits; Ctrl-C during a reply stops the reply."""


def add_chat_flags(p):
    p.add_argument("--seed", type=int, default=None, help="random seed; same seed and messages, same replies")
    p.add_argument("--length", type=int, default=None, help="most tokens per reply (default n_ctx // 4)")
    add_sampling_knobs(p)
    p.add_argument("--truncate", default=None, help="also end a reply where this text appears")
    add_template_flags(p)


def add_template_flags(p, what="the transcript"):
    """--user_tag/--bot_tag/--system: default the model folder's chat.json (written by a run trained
    on conversations), else User:, Bot: and no system text."""
    p.add_argument("--user_tag", default=None, help=f"the user's speaker tag in {what} (default: the run's "
                                                     f"chat.json, else User:)")
    p.add_argument("--bot_tag", default=None, help=f"the model's speaker tag in {what} (default: the run's "
                                                    f"chat.json, else Bot:)")
    p.add_argument("--system", default=None, help="text on top of the transcript (default: the run's chat.json, "
                                                   "else none)")


def chat_template(args, model):
    from .chat import resolve_template
    return resolve_template(model.source_dir, args.user_tag, args.bot_tag, args.system)


def chat_command(chat, line):
    """Run a /command; returns False to quit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name == "/reset":
        chat.reset()
        print("(conversation cleared)", file=sys.stderr)
    elif name == "/save" and arg:
        chat.save(arg)
        print(f"(saved {len(chat.turns)} turns to {arg})", file=sys.stderr)
    elif name in ("/quit", "/exit"):
        return False
    elif name == "/help":
        print(CHAT_HELP, file=sys.stderr)
    else:
        print(f"unknown command {line!r}; /help lists them" if name != "/save" else "usage: /save FILE",
              file=sys.stderr)
    return True


def cmd_chat(args):
    """A conversation on the terminal (or over a pipe): one message per line."""
    from .chat import ChatSession
    from .sampling import check_seed
    check_seed(args.seed)
    model, enc = load_for_generation(args)
    t = chat_template(args, model)
    chat = ChatSession(model, enc, args.length, args.temperature, args.top_k, args.top_p, args.seed,
                       args.truncate, t["user_tag"], t["bot_tag"], t["system"])
    interactive = sys.stdin.isatty()
    if interactive:
        enable_line_editing()
    if interactive:
        print(f"Chatting with {args.model_name}; /help lists commands, Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input(chat.user_tag + " ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not interactive and line == "":
            return 0  # end of a piped input
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            try:
                if not chat_command(chat, text):
                    return 0
            except Npgpt2Error as e:
                print(f"npgpt2: error: {e}", file=sys.stderr)
            continue
        text = text[1:] if text.startswith("//") else text
        try:
            reply = chat.say(text)
        except Npgpt2Error as e:  # this message alone is too long; the chat goes on
            print(f"npgpt2: error: {e}", file=sys.stderr)
            continue
        if not interactive:
            sys.stdout.write(f"{chat.user_tag} {text}\n")
        sys.stdout.write(chat.bot_tag + " ")
        sys.stdout.flush()
        try:
            for piece in reply:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            reply.close()  # keeps what was shown as the bot's turn
        sys.stdout.write("\n")
        sys.stdout.flush()


def cmd_serve(args):
    """The HTTP API and chat page until Ctrl-C."""
    import signal

    from .server import Limits, Server
    limits = Limits(max_body=args.max_body, max_length=args.max_length, max_prompt_tokens=args.max_prompt_tokens,
                    timeout=args.timeout, max_queue=args.max_queue, max_connections=args.max_connections,
                    read_timeout=args.read_timeout, max_batch=args.max_batch,
                    max_request_tokens=args.max_request_tokens)
    limits.check()
    model, enc = load_for_generation(args)
    t = chat_template(args, model)
    server = Server(model, enc, args.host, args.port, limits, t["user_tag"], t["bot_tag"],
                    model_name=args.model_name, system=t["system"], allowed_hosts=args.allowed_hosts)

    def stop(signum, frame):  # SIGTERM (systemd, docker stop) ends it as cleanly as Ctrl-C
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    try:
        print(f"serving {args.model_name} on {server.url} (Ctrl-C stops)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def cmd_download(args):
    """Fetch OpenAI's released files, as download_model.py, resumable and crc-checked."""
    from .download import download_model
    for name in args.model_name:
        print(download_model(name, models_dir=args.models_dir, base_url=args.base_url, force=args.force,
                             progress=not args.no_progress, retries=args.retries))


def cmd_convert(args):
    """Convert weights between an OpenAI TF folder, a .npz and a Hugging Face folder."""
    from .convert import convert
    print(convert(args.src, args.dst, fmt=args.fmt, src_fmt=args.src_fmt, force=args.force, dtype=args.dtype,
                  merge=args.merge, base=args.base))


# ---------------------------------------------------------------- encode, train, eval, demo
def cmd_encode(args):
    """Text files (file, folder or glob) -> .npz of uint16 tokens, as encode.py; or conversations
    (with a loss mask), JSON Lines or CSV documents (chat_data.py)."""
    from .chat_data import encode_dataset
    from .data import encode_corpus
    from .model import ALIASES, MODEL_HPARAMS, resolve_model_dir
    from .tokenizer import load_tokenizer
    try:
        model_dir = resolve_model_dir(args.models_dir, args.model_name)
    except Npgpt2Error:
        if ALIASES.get(args.model_name, args.model_name) not in MODEL_HPARAMS:
            raise
        model_dir = None  # every released size has the same vocabulary, which npgpt2 ships
        log.info("%s/%s not found: using the GPT-2 vocabulary packaged with npgpt2", args.models_dir, args.model_name)
    if args.format == "text":
        stats = encode_corpus(args.in_text, args.out_npz, load_tokenizer(model_dir), args.combine, args.encoding,
                              keep_crlf=args.keep_crlf)
    else:
        from .chat import DEFAULT_BOT_TAG, DEFAULT_USER_TAG
        stats = encode_dataset(args.in_text, args.out_npz, load_tokenizer(model_dir), args.format,
                               args.user_tag or DEFAULT_USER_TAG, args.bot_tag or DEFAULT_BOT_TAG, args.system or "",
                               args.column, args.encoding, args.combine)
    trained = f" ({stats['trained']} of them trained on: the replies and their ends)" if stats.get("trained") else ""
    print(f"Wrote {stats['tokens']} tokens{trained} from {stats['files']} file(s) to {args.out_npz}")


def add_dataset_flags(p):
    p.add_argument("--combine", type=int, default=50000,
                   help="encode text in pieces of this many characters (default %(default)s)")
    p.add_argument("--encoding", default="utf-8", help="text encoding of .txt inputs (default %(default)s)")


@contextlib.contextmanager
def terminal_bar(total=None, unit="step"):
    """A tqdm bar on stderr (count, rate, ETA; log lines printed above it) when stderr is a
    terminal; None otherwise, where the library's plain log lines tell the progress."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    with tqdm(total=total, unit=unit, dynamic_ncols=True) as bar, logging_redirect_tqdm():
        yield bar


def step_reporter(bar):
    """fit()'s on_step for the bar: one tick per update, the running loss and tokens/s."""
    if bar is None:
        return None

    def on_step(info):
        bar.set_postfix_str(f"loss={info['avg']:.3f} tok/s={info['tok_s']:.0f}", refresh=False)
        bar.update(1)
    return on_step


def add_keep_crlf_flag(p):
    p.add_argument("--keep_crlf", action="store_true",
                   help="keep \\r\\n and \\r line endings as they are (default: read them as \\n, "
                        "as Python's text mode and OpenAI's encode.py do)")


ABORT_GRACE = 5.0  # seconds a failed rank > 0 waits for rank 0's abort before printing its own error


def cmd_train(args):
    """Fine-tune, as train.py; the run folder is an OpenAI-layout model folder.

    Under mpirun/mpiexec every process runs this; rank 0 prints, the others only report errors.
    """
    import dataclasses

    from .dist import get_comm
    from .sampling import check_seed
    from .train import TrainConfig, train
    check_seed(args.seed)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                         if hasattr(args, f.name)})
    comm = get_comm()
    if comm.world_size > 1:
        if not comm.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        try:
            result = train(cfg, on_step=None, comm=comm)
        except Npgpt2Error as e:  # one rank's error must end every rank, not leave them waiting
            if comm.rank:
                # an error every rank meets (a flag checked by all) is printed by rank 0, whose
                # abort ends this rank within this pause; an error of this rank's own still shows
                import time
                time.sleep(ABORT_GRACE)
                print(f"npgpt2: error (rank {comm.rank}): {e}", file=sys.stderr, flush=True)
            else:
                print(f"npgpt2: error: {e}", file=sys.stderr, flush=True)
            comm.abort(2)
        if not comm.is_main:
            return 0
    else:
        with terminal_bar(args.steps or None) as bar:
            result = train(cfg, on_step=step_reporter(bar))
    where = result["checkpoint"] or "(nothing saved)"
    how = "Interrupted" if result["interrupted"] else "Stopped early" if result.get("early_stopped") else "Done"
    print(f"{how} at step {result['step']}: avg loss {result['avg']:.4f}; checkpoint {where}")


def cmd_eval(args):
    """Mean loss and perplexity of a model over every token of a dataset."""
    import math

    from .chat_data import load_masked_dataset, training_mask
    from .data import check_tokens, expand_paths
    from .model import load_model, read_hparams, resolve_model_dir
    from .tokenizer import load_tokenizer
    from .train import context_length, evaluate
    expand_paths(args.dataset, "--dataset")  # bad inputs are reported before the model loads
    model_dir = resolve_model_dir(args.models_dir, args.model_name)
    T = context_length(args.context, read_hparams(model_dir)["n_ctx"])
    model = load_model(model_dir, dtype=args.dtype, adapter=args.adapter)
    tokens, mask, _ = load_masked_dataset(args.dataset, load_tokenizer(model_dir), args.encoding, args.combine,
                                          keep_crlf=args.keep_crlf)
    mask = training_mask(args.score_on, mask, args.dataset, "--score_on")
    check_tokens(tokens, model.hparams["n_vocab"], 1, args.dataset)
    with terminal_bar(unit="window") as bar:
        tenth = [0]

        def progress(done, total):
            if bar is not None:
                bar.total = total
                bar.update(done - bar.n)
            elif done * 10 // total > tenth[0] and done < total:  # a plain line every 10%
                tenth[0] = done * 10 // total
                log.info("eval: %d of %d windows", done, total)
        loss, n = evaluate(model, tokens, T, progress=progress, mask=mask)
    which = "" if mask is None else f" (the assistant replies' tokens, of {tokens.size - 1})"
    print(f"loss {loss:.4f} nats/token, perplexity {math.exp(loss):.2f} over {n} tokens{which} "
          f"(windows of {T} tokens) of {args.dataset}")


def cmd_demo_chat(args):
    """demo --chat: train a model that answers questions about jargon, then chat with it."""
    import argparse as _argparse
    from pathlib import Path

    from .demo_chat import FULL, QUICK, run_chat_demo
    out = Path(args.out if args.out != DEMO_OUT else DEMO_OUT + "-chat")
    preset = QUICK if args.quick else FULL
    print(f"Training a small GPT-2 to answer questions about the bundled Jargon File; the run goes to {out}/.",
          flush=True)
    with terminal_bar(preset["pretrain_steps"] + (args.steps or preset["steps"])) as bar:
        r = run_chat_demo(out, quick=args.quick, seed=args.seed, steps=args.steps, on_step=step_reporter(bar))
    h = r["history"]
    print(f"Pretrained on the training terms' entries ({r['pretrain_seconds']:.0f} s), then fine-tuned on "
          f"{r['n_train']} conversations with the loss on the answers for {r['steps']} steps "
          f"({r['finetune_seconds']:.0f} s{', stopped early' if r['early_stopped'] else ''}).")
    if h["val_step"]:
        print("Validation loss on the answers of held-out terms by step: " +
              ", ".join(f"{s}: {v:.2f}" for s, v in zip(h["val_step"], h["val_loss"])))
    where = f"--models_dir {shlex.quote(str(out.resolve().parent))} --model_name {shlex.quote(out.name)}"
    if not sys.stdin.isatty():
        print("Greedy answers to questions about held-out terms (never trained on):")
        for q, a, ended in r["answers"]:
            print(f"Q: {q}\nA: {a}{'' if ended else ' [...]'}")
        print(f"Chat with it:  npgpt2 chat {where}")
        return 0
    print(f"Chatting with it (npgpt2 chat {where}); ask e.g. \"{r['answers'][0][0]}\"")
    chat_args = _argparse.Namespace(models_dir=str(out.resolve().parent), model_name=out.name, dtype="float32",
                                    seed=args.seed, length=None, temperature=0.0, top_k=0, top_p=1.0,
                                    truncate=None, user_tag=None, bot_tag=None, system=None, adapter=None)
    return cmd_chat(chat_args)


DEMO_OUT = "checkpoint/demo"


def cmd_demo(args):
    """Train a small GPT-2 from scratch on the bundled Jargon File and show it learning."""
    import importlib.util
    from pathlib import Path

    from .demo import preset, run_demo
    if args.chat:
        return cmd_demo_chat(args)
    out = Path(args.out)
    plot = importlib.util.find_spec("matplotlib") is not None  # loss.png is written only with it
    print(f"Training a small GPT-2 on the bundled Jargon File; the run goes to {out}/ "
          f"(checkpoint, {'loss.png, ' if plot else ''}samples.txt).", flush=True)
    settings = preset(args.quick, args.steps)
    with terminal_bar(settings["steps"]) as bar:
        r = run_demo(steps=args.steps, quick=args.quick, seed=args.seed, out_dir=out, on_step=step_reporter(bar))
    print(f"Trained a {r['params'] / 1e6:.2f}M-parameter GPT-2 for {r['steps']} steps "
          f"({r['train_seconds']:.0f} s) on {r['corpus']}.")
    margin = r["unigram_entropy"] - r["val_loss"]
    verdict = (f"{margin:.2f} nats/token below it: it learnt more than word frequencies" if margin > 0 else
               f"{-margin:.2f} nats/token above it: train longer (--steps) to get below it")
    print(f"Validation loss {r['val_loss']:.3f} nats/token over {r['eval_tokens']} held-out tokens; "
          f"a model of token frequencies alone scores {r['unigram_entropy']:.3f} (the corpus' unigram entropy): "
          f"{verdict}.")
    h = r["history"]
    if h["val_step"]:  # none when Ctrl-C came before the first validation
        # a cheaper figure than the one above: a few fixed batches, not every held-out token
        print(f"Validation loss by step (estimated on {settings['val_batch_count']} fixed batches of held-out "
              f"windows; the line above is over {r['eval_tokens']} held-out tokens, hence the small difference): "
              + ", ".join(f"{s}: {v:.2f}" for s, v in zip(h["val_step"], h["val_loss"])))
    for i, text in enumerate(r["samples"]):
        print_header(i + 1)
        print(text)
    saved = ", ".join(Path(f).name for f in r["files"].values() if f is not None)
    named = out.resolve() if out.name in ("", "..") else out  # `--out .` has no folder name to give
    where = f"--models_dir {shlex.quote(str(named.parent))} --model_name {shlex.quote(named.name)}"
    print(f"Saved in {out}/: {saved}" + ("" if r["files"].get("loss.png") else
                                         " (no loss.png: pip install 'npgpt2[plot]')") + ".")
    print(f"Look inside it:  npgpt2 explain {where} \"hacker: a person who\"")
    print(f"Prompt it:       echo \"kludge:\" | npgpt2 prompt {where}")


def cmd_explain(args):
    """What the model computes for a text: next tokens, logit lens, attention, attributions."""
    import shutil

    from . import explain
    from .fsutil import atomic_write, check_writable
    text = args.text
    if text is None:  # from stdin; a piped line's newline is not part of the text
        text = sys.stdin.read()
        text = text[:-1] if text.endswith("\n") else text
    if not text:
        raise Npgpt2Error("text is empty (give it as an argument or on stdin)")
    full = args.out is not None  # `--out ""` is a mistake, not "no file"
    if args.layer is not None and not full:
        raise Npgpt2Error("--layer chooses the attention patterns written with --out; give --out too")
    if full:
        check_writable(args.out, "--out")  # before the model loads and the report is computed
    model, enc = load_for_generation(args)
    ids, note = explain.encode_text(enc, text, model.hparams["n_ctx"])
    if full:
        explain.check_page_size(model.hparams, len(ids), args.layer)
    # the terminal needs the logit lens at the last position only and no attention patterns
    report = explain.report_for_ids(model, enc, ids, args.top_k, args.lens_k, args.layer, note=note, text=text,
                                    lens_positions="all" if full else "last", patterns=full)
    print(explain.format_report(report, shutil.get_terminal_size((100, 24)).columns))
    if full:
        page = explain.page_html(report).encode("utf-8")
        with atomic_write(args.out) as f:
            f.write(page)
        print(f"\nWrote {args.out} ({explain.mb(len(page))}): open it in a browser")


def cmd_gradcheck(args):
    """Every backward in layers.py, then a model's gradients, against central finite differences."""
    import time

    import numpy as np

    from . import gradcheck
    from .jit import plain_requested
    from .model import load_model, resolve_model_dir
    from .sampling import check_seed
    check_seed(args.seed)
    if args.entries is not None and args.entries < 1:
        raise Npgpt2Error(f"--entries must be >= 1, got {args.entries}")
    t0 = time.perf_counter()
    if args.model_name:  # a bad folder fails before any check runs
        model = load_model(resolve_model_dir(args.models_dir, args.model_name), dtype=np.float64)
        what = f"{args.models_dir}/{args.model_name}"
    else:
        model, what = gradcheck.tiny_model(args.seed), "a tiny random 2-layer model"
    rows = gradcheck.check_layers(seed=args.seed)
    print("\n".join(gradcheck.format_table(rows, "layers.py, float64, each backward vs central differences:")))
    entries = args.entries or gradcheck.default_entries(model)
    if sys.stderr.isatty():  # a 124M check takes a while: show it moving
        from tqdm import tqdm
        with tqdm(total=len(model.params), unit="tensor", dynamic_ncols=True, leave=False) as bar:
            model_rows = gradcheck.check_model(model, entries=entries, seed=args.seed,
                                               progress=lambda done, total: bar.update(1))
    else:
        model_rows = gradcheck.check_model(model, entries=entries, seed=args.seed)
    path = "plain layers.py" if plain_requested() else "Numba kernels"
    print()
    print("\n".join(gradcheck.format_table(
        model_rows, f"{what} ({path}), loss_and_grads vs central differences on "
                    f"{entries} sampled entries per tensor:")))
    rows += model_rows
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} checks passed in {time.perf_counter() - t0:.1f} s")
    if bad:
        print("FAILED: " + ", ".join(f"{r.name} ({r.worst}, error {r.error:.1e} > {r.tol:.0e})" for r in bad))
        return 1
    return 0


# ---------------------------------------------------------------- exercises
def cmd_exercise(args):
    """List the exercises, show one, or grade a learner's file for one (exit 1 on a failed case)."""
    from . import exercises
    if args.action == "list":
        print(exercises.format_list())
    elif args.action == "show":
        print(exercises.show(args.name, hint=args.hint))
    else:
        ex, cases = exercises.check(args.name, args.file, seed=args.seed)
        print(exercises.format_check(ex, cases, args.file))
        return 0 if all(c.ok for c in cases) else 1


def add_exercise_parser(sub):
    p = sub.add_parser("exercise", help="exercises that grade themselves: write a backward pass, break a layer")
    actions = p.add_subparsers(dest="action", metavar="<list|show|check>")
    actions.required = True
    actions.add_parser("list", help="the exercises")
    a = actions.add_parser("show", help="an exercise's task and a starter to copy")
    a.add_argument("name")
    a.add_argument("--hint", action="store_true", help="also print the hints")
    a = actions.add_parser("check", help="grade your file: which case fails, where and by how much")
    a.add_argument("name")
    a.add_argument("file", help="your .py file defining the exercise's function")
    a.add_argument("--seed", type=int, default=0, help="seed of the random shapes and values (default 0)")
    p.set_defaults(func=cmd_exercise)


# ---------------------------------------------------------------- each command's flags
def add_download_parser(sub):
    """`npgpt2 download`: fetch OpenAI's released checkpoints."""
    p = sub.add_parser("download", help="fetch OpenAI's GPT-2 files (resumable, crc-checked)")
    p.add_argument("model_name", nargs="+", help="124M, 355M, 774M or 1558M (117M/345M are old names)")
    p.add_argument("--models_dir", default="weights", help="folder to put <model_name>/ in (default %(default)s)")
    p.add_argument("--base_url", default=None,
                   help="download from URL/<model_name>/<file> (default $NPGPT2_BASE_URL, else OpenAI's storage)")
    p.add_argument("--force", action="store_true", help="download again even if the folder is complete")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--retries", type=int, default=5,
                   help="retries per file after failures that make no progress (default %(default)s)")
    p.set_defaults(func=cmd_download)


def add_convert_parser(sub):
    """`npgpt2 convert`: between OpenAI TF, .npz and Hugging Face folders; LoRA adapters."""
    p = sub.add_parser("convert", help="convert weights: OpenAI TF folder <-> .npz <-> Hugging Face folder; "
                                          "LoRA adapters: merge them (--merge) or write them for PEFT (--to peft)")
    p.add_argument("src", help="a model folder (OpenAI TF or Hugging Face) or a .npz; or LoRA adapters "
                               "(a `train --lora` run folder, or a PEFT folder with --base)")
    p.add_argument("dst", help="where to write; *.npz for a single file")
    p.add_argument("--to", dest="fmt", choices=["tf", "npz", "hf", "peft"], default=None,
                   help="output format (default: npz for *.npz, else hf from tf, tf from the others); "
                        "peft: LoRA adapters as a Hugging Face PEFT adapter folder")
    p.add_argument("--from", dest="src_fmt", choices=["tf", "npz", "hf"], default=None,
                   help="input format when the folder holds two")
    p.add_argument("--force", action="store_true", help="replace a model already at DST")
    p.add_argument("--dtype", default="float32", type=dtype_choice,
                   help="float32 (default: the same bits) or int8 (8-bit weights, an OpenAI-layout folder; "
                        "see HACKING.md)")
    # LoRA adapters (adapter_files.py): SRC is an npgpt2 `train --lora` run folder or a PEFT adapter folder
    p.add_argument("--merge", action="store_true",
                   help="SRC holds LoRA adapters: write its base with them merged in (W + alpha/r * A @ B), "
                        "a full model (OpenAI layout unless --to says otherwise)")
    p.add_argument("--base", default=None, metavar="DIR",
                   help="the model a PEFT adapter folder SRC adapts (a run folder names its own base)")
    p.set_defaults(func=cmd_convert)


def add_generate_parser(sub):
    """`npgpt2 generate`: unconditional samples."""
    p = sub.add_parser("generate", help="unconditional samples (generate_unconditional_samples.py)")
    add_model_flags(p)
    add_dtype_flag(p)
    add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)


def add_prompt_parser(sub):
    """`npgpt2 prompt`: samples for prompts read from stdin."""
    p = sub.add_parser("prompt", help="samples for prompts read from stdin (interactive_conditional_samples.py)")
    add_model_flags(p)
    add_dtype_flag(p)
    add_sampling_flags(p)
    p.set_defaults(func=cmd_prompt)


def add_chat_parser(sub):
    """`npgpt2 chat`: a conversation with the model."""
    p = sub.add_parser("chat", help="a conversation with the model, with history (/help inside)")
    add_model_flags(p)
    add_dtype_flag(p)
    add_chat_flags(p)
    p.set_defaults(func=cmd_chat)


def add_serve_parser(sub):
    """`npgpt2 serve`: the HTTP API and its pages."""
    p = sub.add_parser("serve",
                       help="HTTP API (/v1/generate, /v1/chat, /v1/explain, OpenAI's /v1/completions and "
                            "/v1/chat/completions, streaming), chat and explain pages")
    add_model_flags(p)
    add_dtype_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default %(default)s; 0 = any free port)")
    p.add_argument("--allowed_hosts", nargs="*", default=[], metavar="NAME",
                   help="host names (beyond IP addresses, localhost and --host) that the Host header may give, "
                        "e.g. the machine's name when serving on --host 0.0.0.0 (default: none)")
    add_template_flags(p, "/v1/chat and the chat page")
    p.add_argument("--max_body", type=int, default=256 * 1024,
                   help="largest request body in bytes (default %(default)s)")
    p.add_argument("--max_length", type=int, default=None,
                   help="most tokens one request may ask for (default n_ctx - 1)")
    p.add_argument("--max_prompt_tokens", type=int, default=None,
                   help="longest /v1/generate prompt or /v1/explain text in tokens (default 8 * n_ctx)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds per request, queueing included (default %(default)s)")
    p.add_argument("--max_queue", type=int, default=64,
                   help="requests queued or running before new ones get 503 (default %(default)s)")
    p.add_argument("--max_connections", type=int, default=64,
                   help="requests read or answered at once before new ones get 503 (default %(default)s)")
    p.add_argument("--read_timeout", type=float, default=10.0,
                   help="seconds a client may take to send a request's headers, and again its body "
                        "(default %(default)s)")
    # batched decoding and the OpenAI API (issue 20)
    p.add_argument("--max_batch", type=int, default=8,
                   help="sequences decoded together: requests (and OpenAI's n choices) share each step "
                        "(default %(default)s)")
    p.add_argument("--max_request_tokens", type=int, default=None,
                   help="new tokens one request may ask for in all, n x prompts x max_tokens (default 4 * n_ctx)")
    p.set_defaults(func=cmd_serve)


def add_encode_parser(sub):
    """`npgpt2 encode`: text files into a .npz of tokens."""
    p = sub.add_parser("encode", help="encode text files into a .npz of tokens for train (encode.py)")
    p.add_argument("in_text", help="a text file, a folder of them, or a glob")
    p.add_argument("out_npz", help="the .npz to write")
    add_model_flags(p, adapter=False)
    add_dataset_flags(p)
    add_keep_crlf_flag(p)
    p.add_argument("--format", default="text", choices=["text", "chat", "jsonl", "csv"],
                   help="text (default): plain text files; chat: JSON Lines of {\"messages\": [{role, content}]} "
                        "(OpenAI's fine-tuning format) rendered as `npgpt2 chat` transcripts, with a loss mask on "
                        "the replies; jsonl: a \"text\" field per line; csv: one document per row (--column)")
    p.add_argument("--column", default="text", help="--format csv: the column holding the text (default %(default)s)")
    p.add_argument("--user_tag", default=None, help="--format chat: the user's speaker tag (default User:)")
    p.add_argument("--bot_tag", default=None, help="--format chat: the model's speaker tag (default Bot:)")
    p.add_argument("--system", default=None,
                   help="--format chat: system text for conversations without a system message (default none)")
    p.set_defaults(func=cmd_encode)


def add_train_parser(sub):
    """`npgpt2 train`: fine-tuning, full or LoRA."""
    p = sub.add_parser("train", help="fine-tune on a dataset (train.py); checkpoints in --checkpoint_dir/--run_name",
                       description="Fine-tune a model: all its weights, or LoRA adapters on a frozen float32 "
                                   "or int8 base (--lora R). Full fine-tuning runs in float32.",
                       epilog="Training runs in float32. Data-parallel over MPI (pip install \"npgpt2[mpi]\"): "
                              "mpirun -n N npgpt2 train ... (add --hostfile FILE for several machines); the "
                              "effective batch is N x --batch_size x --accumulate_gradients; rank 0 reads the files "
                              "and writes checkpoints; kill -USR1 <mpirun pid> saves and stops every rank.")
    p.add_argument("--shared_stream", action="store_true", help=argparse.SUPPRESS)  # tests: see dist.RankSlice
    p.add_argument("--dataset", required=True, help=".npz from encode, or text file / folder / glob")
    add_model_flags(p, adapter=False)
    add_dataset_flags(p)
    add_keep_crlf_flag(p)
    add_lora_flags(p)
    p.add_argument("--batch_size", type=int, default=1, help="sequences per micro-batch (default %(default)s)")
    p.add_argument("--learning_rate", type=float, default=2e-5, help="peak learning rate (default %(default)s)")
    p.add_argument("--accumulate_gradients", type=int, default=1, help="micro-batches per update (default %(default)s)")
    p.add_argument("--optimizer", default="adam", help="adam = AdamW (default), sgd")
    p.add_argument("--only_train_transformer_layers", action="store_true", help="keep wte, wpe and ln_f fixed")
    p.add_argument("--run_name", default="run1", help="run folder name under --checkpoint_dir (default %(default)s)")
    p.add_argument("--restore_from", default="latest",
                   help="latest (the run's newest checkpoint, else the base model), fresh (the base model), "
                        "best (the run's best validation checkpoint, see --keep_best) or a model folder")
    p.add_argument("--checkpoint_dir", default="checkpoint", help="folder of run folders (default %(default)s)")
    p.add_argument("--sample_dir", default="samples", help="samples go to SAMPLE_DIR/RUN_NAME (default %(default)s)")
    p.add_argument("--sample_every", type=int, default=100,
                   help="write samples every N steps; 0 = never (default %(default)s)")
    p.add_argument("--sample_length", type=int, default=128, help="tokens per sample (default %(default)s)")
    p.add_argument("--sample_num", type=int, default=1, help="samples each time (default %(default)s)")
    p.add_argument("--save_every", type=int, default=1000,
                   help="checkpoint every N steps; 0 = only at the end (default %(default)s)")
    p.add_argument("--max_to_keep", type=int, default=5, help="newest checkpoints kept (default %(default)s)")
    p.add_argument("--val_dataset", default=None, help="validation data (default: the training data)")
    p.add_argument("--val_every", type=int, default=0, help="validation loss every N steps; 0 = never (default)")
    p.add_argument("--val_batch_size", type=int, default=2, help="sequences per validation batch (default %(default)s)")
    p.add_argument("--val_batch_count", type=int, default=40, help="fixed validation batches (default %(default)s)")
    p.add_argument("--top_k", type=int, default=40, help="top-k for samples (default %(default)s; 0 = off)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus mass for samples (default 1.0 = off)")
    p.add_argument("--steps", type=int, default=0, help="stop after N updates; 0 = until Ctrl-C (default)")
    p.add_argument("--context", type=int, default=0,
                   help="tokens per sequence; 0 (the default) means the model's n_ctx. Shorter is much faster")
    p.add_argument("--seed", type=int, default=None, help="seed of the batch order (default: random, saved for resume)")
    p.add_argument("--weight_decay", type=float, default=0.0,
                   help="AdamW decoupled weight decay on matrices (default 0)")
    p.add_argument("--warmup", type=int, default=0, help="linear learning-rate warmup steps (default 0)")
    p.add_argument("--lr_schedule", default="constant", help="constant or cosine, after warmup (default constant)")
    p.add_argument("--lr_decay_steps", type=int, default=0,
                   help="cosine reaches its minimum at this step (default: the last)")
    p.add_argument("--grad_clip", type=float, default=1.0,
                   help="clip the gradients' global norm to this; 0 = off (default %(default)s)")
    p.add_argument("--memory_saving_gradients", action="store_true",
                   help="keep only each layer's input in the forward and recompute the layer in the backward: "
                        "the same gradients with much less memory (a bigger --batch_size or --context fits), "
                        "for one more forward pass of the layers per step (default off)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="replace each input token (never a target) by a uniformly random token with this "
                        "probability, in [0, 1); seeded by --seed and resumed exactly (default 0 = off)")
    p.add_argument("--train_on", default=None, choices=["assistant", "all"],
                   help="assistant: loss on the replies only (the default for a dataset encoded with --format "
                        "chat, which has a loss mask); all: every token")
    p.add_argument("--early_stop", type=int, default=0,
                   help="stop when the validation loss has not improved for N validations (needs --val_every; "
                        "0 = off)")
    p.add_argument("--keep_best", action="store_true",
                   help="keep the best validation checkpoint (model-best-<step>, named in best.json) beside the "
                        "latest; --restore_from best continues from it")
    p.set_defaults(func=cmd_train)


def add_eval_parser(sub):
    """`npgpt2 eval`: loss and perplexity over a dataset."""
    p = sub.add_parser("eval", help="mean loss and perplexity over a dataset (all windows, deterministic)")
    p.add_argument("--dataset", required=True, help=".npz from encode, or text file / folder / glob")
    add_model_flags(p)
    add_dataset_flags(p)
    add_keep_crlf_flag(p)
    p.add_argument("--context", type=int, default=0, help="tokens per window; 0 (the default) means the model's n_ctx")
    p.add_argument("--score_on", default=None, choices=["assistant", "all"],
                   help="assistant: score the replies' tokens only (the default for a dataset with a loss mask, "
                        "from encode --format chat); all: every token")
    add_dtype_flag(p)
    p.set_defaults(func=cmd_eval)


def add_explain_parser(sub):
    """`npgpt2 explain`: look inside the model."""
    p = sub.add_parser("explain", help="look inside the model: next tokens, logit lens, attention heads, attributions")
    p.add_argument("text", nargs="?", default=None, help="the text (default: read from stdin)")
    add_model_flags(p)
    p.add_argument("--top_k", type=int, default=10, help="next tokens to list (default %(default)s)")
    p.add_argument("--lens_k", type=int, default=3, help="logit-lens tokens per layer, 1 to 10 (default %(default)s)")
    p.add_argument("--out", default=None, help="also write a self-contained HTML report to this file")
    p.add_argument("--layer", type=int, default=None,
                   help="with --out: only this layer's attention patterns (default all)")
    p.set_defaults(func=cmd_explain)


def add_demo_parser(sub):
    """`npgpt2 demo`: train a small model offline on the Jargon File."""
    p = sub.add_parser("demo", help="offline: train a small GPT-2 from scratch on the bundled Jargon File")
    p.add_argument("--steps", type=int, default=None, help="updates (default 500; a few minutes on 2 cores)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny model, 40 steps: a smoke test (about 15 s once Numba's kernels are compiled)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and the batches (default %(default)s)")
    p.add_argument("--out", default=DEMO_OUT,
                   help="the run folder: checkpoint, loss.png, samples.txt; loads like a model folder "
                        "(default %(default)s: --models_dir checkpoint --model_name demo; checkpoint/demo-chat "
                        "with --chat)")
    p.add_argument("--chat", action="store_true",
                   help="train a model that answers questions about jargon terms (pretraining, then fine-tuning "
                        "on generated conversations with the loss on the answers), then chat with it")
    p.set_defaults(func=cmd_demo)


def add_gradcheck_parser(sub):
    """`npgpt2 gradcheck`: every backward against finite differences."""
    p = sub.add_parser("gradcheck", help="check every backward pass against finite differences (float64)")
    p.add_argument("--model_name", default=None, help="also check this model folder (default: a tiny random model)")
    p.add_argument("--models_dir", default="weights", help="folder holding model folders (default %(default)s)")
    p.add_argument("--entries", type=int, default=None,
                   help="sampled entries per parameter tensor (default 2; 1 above 10M parameters)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shapes' values, tokens and samples (default 0)")
    p.set_defaults(func=cmd_gradcheck)


# ---------------------------------------------------------------- the parser
def build_parser():
    """The `npgpt2` parser: one add_<command>_parser per command adds its flags."""
    parser = Parser(prog="npgpt2", description="GPT-2 in NumPy: generate, fine-tune, chat, serve.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    add_download_parser(sub)
    add_convert_parser(sub)
    add_generate_parser(sub)
    add_prompt_parser(sub)
    add_chat_parser(sub)
    add_serve_parser(sub)
    add_encode_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub)
    add_explain_parser(sub)
    add_demo_parser(sub)
    add_gradcheck_parser(sub)
    add_exercise_parser(sub)
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        p.set_defaults(subparser=p)
        p.formatter_class = HelpFormatter  # every --help shows the defaults ...
        if not p.description:  # ... and says what the command does
            p.description = helps[name][0].upper() + helps[name][1:] + "."
    return parser


def main(argv=None):
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before a command started (the library is imported inside _main)
        print(file=sys.stderr)
        return 130


def _main(argv):
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # report a mistyped flag with the command's own usage line
        args.subparser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="npgpt2: %(message)s", stream=sys.stderr)
    try:
        apply_example(args)
        return args.func(args) or 0
    except Npgpt2Error as e:
        print(f"npgpt2: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:
        # a file-system failure the library did not foresee: still one line, no traceback
        where = e.filename2 or e.filename
        print(f"npgpt2: error: {where + ': ' if where else ''}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

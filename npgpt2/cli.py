"""`npgpt2 <command>`: parses flags, calls the library, prints.

Flag names follow OpenAI's gpt-2 scripts (generate_unconditional_samples.py,
interactive_conditional_samples.py, encode.py, train.py) where they overlap.
"""
import argparse
import logging
import sys

from .errors import Npgpt2Error

log = logging.getLogger("npgpt2")


# ---------------------------------------------------------------- shared flags
def add_model_flags(p, default_models_dir="weights"):
    p.add_argument("--model_name", default="124M", help="model folder name (default 124M; 117M/345M are aliases)")
    p.add_argument("--models_dir", default=default_models_dir, help="folder holding model folders (default %(default)s)")


def add_sampling_flags(p):
    p.add_argument("--seed", type=int, default=None, help="random seed; same seed, same text")
    p.add_argument("--nsamples", type=int, default=1, help="samples to generate (0 = forever)")
    p.add_argument("--batch_size", type=int, default=1, help="samples computed together")
    p.add_argument("--length", type=int, default=None, help="tokens per sample (default n_ctx // 2)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; higher = more random")
    p.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--truncate", default=None, help='stop a sample as soon as this text appears, e.g. "<|endoftext|>"')


def load_for_generation(args):
    from .model import load_model, resolve_model_dir
    from .tokenizer import load_tokenizer
    model_dir = resolve_model_dir(args.models_dir, args.model_name)
    return load_model(model_dir), load_tokenizer(model_dir)


def print_samples(model, enc, context, args, counter):
    """Generate args.nsamples samples after `context` in OpenAI's output format."""
    import numpy as np
    from .sampling import TextStream, generate_stream
    if args.batch_size < 1:
        raise Npgpt2Error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.nsamples < 0:
        raise Npgpt2Error(f"--nsamples must be >= 0, got {args.nsamples}")
    length = args.length if args.length is not None else model.hparams["n_ctx"] // 2
    rng = np.random.default_rng(args.seed)
    done = 0
    while args.nsamples == 0 or done < args.nsamples:
        rows = args.batch_size if args.nsamples == 0 else min(args.batch_size, args.nsamples - done)
        streams = [TextStream(enc, [args.truncate] if args.truncate else []) for _ in range(rows)]
        live = rows == 1  # one sample at a time is shown as it is generated
        if live:
            print_header(counter + done + 1)
        for tokens in generate_stream(model, context, length, args.temperature, args.top_k,
                                      args.top_p, batch_size=rows, rng=rng):
            for s, t in zip(streams, tokens):
                text, _ = s.push(t)
                if live:
                    sys.stdout.write(text)
                    sys.stdout.flush()
            if all(s.stopped for s in streams):
                break
        for i, s in enumerate(streams):
            tail = s.finish()
            if live:
                sys.stdout.write(tail + "\n")
            else:
                print_header(counter + done + i + 1)
                sys.stdout.write(s.shown_text + "\n")
        sys.stdout.flush()
        done += rows
    return counter + done


def print_header(i):
    sys.stdout.write("=" * 40 + " SAMPLE " + str(i) + " " + "=" * 40 + "\n")


# ---------------------------------------------------------------- commands
def cmd_generate(args):
    """Unconditional samples, as generate_unconditional_samples.py."""
    model, enc = load_for_generation(args)
    print_samples(model, enc, [enc.eot_token], args, 0)


def cmd_prompt(args):
    """Conditional samples for prompts read until end of input, as interactive_conditional_samples.py."""
    model, enc = load_for_generation(args)
    interactive = sys.stdin.isatty()
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
        print_samples(model, enc, enc.encode(raw), args, 0)
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
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; higher = more random")
    p.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--truncate", default=None, help="also end a reply where this text appears")
    p.add_argument("--user_tag", default="User:", help="the user's speaker tag (default %(default)s)")
    p.add_argument("--bot_tag", default="Bot:", help="the model's speaker tag (default %(default)s)")


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
    model, enc = load_for_generation(args)
    chat = ChatSession(model, enc, args.length, args.temperature, args.top_k, args.top_p, args.seed,
                       args.truncate, args.user_tag, args.bot_tag)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {args.model_name}; /help lists commands, Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input(args.user_tag + " ") if interactive else sys.stdin.readline()
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
            sys.stdout.write(f"{args.user_tag} {text}\n")
        sys.stdout.write(args.bot_tag + " ")
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
    from .server import Limits, Server
    limits = Limits(max_body=args.max_body, max_length=args.max_length, max_prompt_tokens=args.max_prompt_tokens,
                    timeout=args.timeout, max_queue=args.max_queue)
    limits.check()
    model, enc = load_for_generation(args)
    server = Server(model, enc, args.host, args.port, limits, args.user_tag, args.bot_tag,
                    model_name=args.model_name)
    print(f"serving {args.model_name} on {server.url} (Ctrl-C stops)", flush=True)
    try:
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
    print(convert(args.src, args.dst, fmt=args.fmt, src_fmt=args.src_fmt, force=args.force))


# ---------------------------------------------------------------- parser
def build_parser():
    parser = argparse.ArgumentParser(prog="npgpt2", description="GPT-2 in NumPy: generate, fine-tune, chat, serve.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True

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

    p = sub.add_parser("convert", help="convert weights: OpenAI TF folder <-> .npz <-> Hugging Face folder")
    p.add_argument("src", help="a model folder (OpenAI TF or Hugging Face) or a .npz")
    p.add_argument("dst", help="where to write; *.npz for a single file")
    p.add_argument("--to", dest="fmt", choices=["tf", "npz", "hf"], default=None,
                   help="output format (default: npz for *.npz, else hf from tf, tf from the others)")
    p.add_argument("--from", dest="src_fmt", choices=["tf", "npz", "hf"], default=None,
                   help="input format when the folder holds two")
    p.add_argument("--force", action="store_true", help="replace a model already at DST")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="unconditional samples (generate_unconditional_samples.py)")
    add_model_flags(p)
    add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("prompt", help="samples for prompts read from stdin (interactive_conditional_samples.py)")
    add_model_flags(p)
    add_sampling_flags(p)
    p.set_defaults(func=cmd_prompt)

    p = sub.add_parser("chat", help="a conversation with the model, with history (/help inside)")
    add_model_flags(p)
    add_chat_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="HTTP API (/v1/generate, /v1/chat, streaming) and a chat page")
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default %(default)s; 0 = any free port)")
    p.add_argument("--user_tag", default="User:", help="the user's speaker tag in /v1/chat (default %(default)s)")
    p.add_argument("--bot_tag", default="Bot:", help="the model's speaker tag in /v1/chat (default %(default)s)")
    p.add_argument("--max_body", type=int, default=256 * 1024, help="largest request body in bytes (default %(default)s)")
    p.add_argument("--max_length", type=int, default=None, help="most tokens one request may ask for (default n_ctx - 1)")
    p.add_argument("--max_prompt_tokens", type=int, default=None, help="longest /v1/generate prompt in tokens (default 8 * n_ctx)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request, queueing included (default %(default)s)")
    p.add_argument("--max_queue", type=int, default=64, help="requests queued or running before new ones get 503 (default %(default)s)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="npgpt2: %(message)s", stream=sys.stderr)
    try:
        return args.func(args) or 0
    except Npgpt2Error as e:
        print(f"npgpt2: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

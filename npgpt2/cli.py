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


# ---------------------------------------------------------------- parser
def build_parser():
    parser = argparse.ArgumentParser(prog="npgpt2", description="GPT-2 in NumPy: generate, fine-tune, chat, serve.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True

    p = sub.add_parser("generate", help="unconditional samples (generate_unconditional_samples.py)")
    add_model_flags(p)
    add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("prompt", help="samples for prompts read from stdin (interactive_conditional_samples.py)")
    add_model_flags(p)
    add_sampling_flags(p)
    p.set_defaults(func=cmd_prompt)
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

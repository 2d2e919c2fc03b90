"""One side of one benchmark, in its own process (so that its peak RSS is its own).

    python benchmarks/workers.py SIDE BENCH '{"json": "args"}'

SIDE is `npgpt2`, `npgpt2-int8` (the same model with 8-bit weights, npgpt2/quant.py),
`npgpt2-lora` (bench `train` with LoRA adapters on a frozen base, npgpt2/lora.py) or
`torch` (PyTorch + HF transformers' GPT2LMHeadModel). The worker builds its model, prints
`{"ready": ...}` as one JSON line, then answers each line `run` on stdin with
`{"seconds": ...}` after one repetition, and `quit` with `{"peak_rss_mib": ...}` (and the
resident set and its part in transparent huge pages at the end).
Three benchmarks are one-shot instead (one JSON line, then exit): `prepare` writes a model
folder with random weights, `startup` measures a fresh process from start to first token,
`quality` compares int8 with float32 on a trained model folder.
benchmarks/run.py drives the workers in turns, so every side sees the same machine noise.

Every model here is GPT-2 with random weights, float32 (int8 quantised from them), except
`quality`'s. Protocol lines go to the real stdout; anything a library prints is sent to stderr.
"""
import time

T_START = time.perf_counter()  # before the imports: `startup` counts them

import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {  # the released GPT-2 sizes (the same table as npgpt2.model.MODEL_HPARAMS)
    "124M": dict(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12),
    "774M": dict(n_vocab=50257, n_ctx=1024, n_embd=1280, n_head=20, n_layer=36),
    "1558M": dict(n_vocab=50257, n_ctx=1024, n_embd=1600, n_head=25, n_layer=48),
}


NPGPT2_SIDES = {"npgpt2": "float32", "npgpt2-int8": "int8"}  # side -> weight dtype


def _status_kib(path, field):
    """The `field:  N kB` line of a /proc file (Linux), or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def ru_maxrss_mib():
    """The kernel's other peak count (Linux: KiB): it starts at the parent's peak when the
    process is spawned (Linux keeps the larger across the exec)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mib():
    """This process's peak resident set: VmHWM, its own address space's; ru_maxrss_mib (the
    fallback off Linux) would show a big parent's peak in every worker."""
    kib = _status_kib("/proc/self/status", "VmHWM")
    return kib / 1024 if kib is not None else ru_maxrss_mib()


def huge_pages_mib():
    """The resident set's part in transparent huge pages now (AnonHugePages), or None."""
    kib = _status_kib("/proc/self/smaps_rollup", "AnonHugePages")
    return None if kib is None else kib / 1024


def rss_mib():
    """The resident set now (not the peak): /proc/self/statm's second field, in pages."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def tokens(rng_seed, shape, n_vocab=50257):
    import numpy as np
    return np.random.default_rng(rng_seed).integers(0, n_vocab, shape)


# ---------------------------------------------------------------- npgpt2
def npgpt2_info():
    import numba
    import numpy as np

    from npgpt2.jit import plain_requested
    info = {"numpy": np.__version__, "numba": numba.__version__}
    try:
        from threadpoolctl import threadpool_info
        # NumPy's BLAS first: importing Numba imports SciPy where it is installed, which loads
        # a second OpenBLAS of its own (idle; threadpoolctl lists it in load order)
        libs = sorted((d for d in threadpool_info() if d.get("user_api") == "blas"),
                      key=lambda d: "numpy" not in str(d.get("filepath", "")))
        info["blas"] = [{k: d.get(k) for k in ("internal_api", "version", "architecture",
                                                "num_threads", "threading_layer", "filepath")} for d in libs]
    except ImportError:
        info["blas"] = "threadpoolctl not installed"
    try:
        info["numba_threading_layer"] = numba.threading_layer()
    except ValueError:
        info["numba_threading_layer"] = "not started"
    info["plain"] = plain_requested()
    info["kernels"] = kernels_info()
    return info


def kernels_info():
    """Which decode kernels this process ran: gemv_pool's job counts by kind and threads, the
    int8 GEMV kernel chosen, and the multiply-add instructions LLVM picked for it here."""
    from npgpt2 import gemv_pool, int8_dot, quant_kernels, threads
    out = {"jobs": dict(gemv_pool.STATS), "int8_kernel": quant_kernels.KERNEL, "policy": threads.decisions(),
           "threads_env": os.environ.get("NPGPT2_THREADS")}
    if any(k.startswith("int8") for k in gemv_pool.STATS):
        out["int8_dot_asm"] = int8_dot.dot_instructions()
    return out


def npgpt2_setup(bench, args, dtype="float32"):
    """-> (a function running one repetition, extra info). dtype "int8": the same random
    weights quantised as load_model(dtype="int8") does (generation only). args["npgpt2_threads"]:
    run as under NPGPT2_THREADS=N (the thread-policy rows race the default against it)."""
    import numpy as np

    if args.get("npgpt2_threads"):
        os.environ["NPGPT2_THREADS"] = str(args["npgpt2_threads"])
        from npgpt2 import threads
        threads.reset()
    import npgpt2
    from npgpt2 import quant
    from npgpt2.model import GPT2, init_model
    from npgpt2.sampling import generate_stream

    if bench in ("forward", "prefill", "decode", "train"):
        model = init_model(SIZES["124M"])
        if dtype == "int8":
            model = GPT2(model.hparams, quant.quantize_params(model.params), np.float32)
    if bench == "forward":
        x = tokens(1, (1, args["T"]))
        return lambda: model.forward(x), {}
    if bench == "prefill":
        x = tokens(1, (1, args["T"]))
        return lambda: model.forward(x, cache=model.new_cache(1), last_only=True), {}
    if bench == "decode":
        prompt = [int(t) for t in tokens(2, args["prompt"])]
        out = {}

        def run():
            out["ids"] = [int(t[0]) for t in generate_stream(model, prompt, args["new"], temperature=0)]
        return run, {"result": out}
    if bench == "train":  # "memory_saving": true is `train --memory_saving_gradients`
        from npgpt2.optim import AdamW
        B, T = args["B"], args["T"]
        data = tokens(3, (B, T + 1))
        opt = AdamW(model.params, lr=1e-4, weight_decay=0.01)

        def run():
            loss, grads = model.loss_and_grads(data[:, :-1], data[:, 1:],
                                               memory_saving=args.get("memory_saving", False))
            opt.step(grads)
            return loss
        return run, {}
    if bench == "generate_big":
        # load (memory-mapped; int8: quantised tensor by tensor from the mapped float32
        # file) is part of what is measured: peak RSS is the point here
        def run():
            t0 = time.perf_counter()
            model = (npgpt2.load_model(args["dir"], dtype="int8") if dtype == "int8"
                     else npgpt2.load_model(args["dir"], mmap=True))
            t1 = time.perf_counter()
            ids = list(generate_stream(model, [int(t) for t in tokens(4, 8)], args["new"], temperature=0))
            t2 = time.perf_counter()
            extra.update(load_s=t1 - t0, generate_s=t2 - t1, tok_per_s=args["new"] / (t2 - t1),
                         new_tokens=len(ids))
        extra = {}
        return run, {"result": extra}
    raise SystemExit(f"unknown npgpt2 benchmark {bench!r}")


# ---------------------------------------------------------------- llama.cpp (llama-cpp-python)
LLAMA_SIDES = {"llama-f32": "f32", "llama-q8_0": "q8_0"}  # side -> GGUF type (benchmarks/gguf_anchor.py)


def llama_info():
    import llama_cpp
    return {"llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


def llama_extra_bufts_work(path, threads):
    """Whether llama.cpp decodes `path` with its extra buffer types (AMX, repacked weights), tried
    in a child process: on an Intel Xeon VM (Emerald Rapids, amx_int8 in cpuinfo) its AMX q8_0
    kernels die with SIGILL, so the anchor then runs with them off (what a user there must do)."""
    code = ("import sys; from llama_cpp import Llama; "
            "m = Llama(model_path=sys.argv[1], n_ctx=16, n_threads=int(sys.argv[2]), verbose=False); "
            "next(iter(m.generate([1, 2, 3], top_k=1, temp=0.0)))")
    r = subprocess.run([sys.executable, "-c", code, str(path), str(threads)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    if r.returncode:
        print(f"llama.cpp with extra buffer types exited with {r.returncode} on {path.name}: running without them",
              file=sys.stderr)
    return r.returncode == 0


def llama_setup(side, bench, args):
    """Decode with llama.cpp on GPT-2 124M random weights written by gguf_anchor.py (once,
    kept in the temp dir), 2 threads (the machine's cores), greedy (top_k=1), the same
    16-token prompt + args["new"] tokens as npgpt2's decode."""
    import tempfile

    from llama_cpp import Llama
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gguf_anchor import SIZES as GG_SIZES
    from gguf_anchor import random_params, write_gguf
    if bench != "decode":
        raise SystemExit(f"unknown llama.cpp benchmark {bench!r}")
    qtype = LLAMA_SIDES[side]
    folder = Path(tempfile.gettempdir()) / "npgpt2-bench-gguf"
    folder.mkdir(exist_ok=True)
    path = folder / f"gpt2-124M-random-{qtype}.gguf"
    if not path.exists():
        tmp = path.with_suffix(".part")
        write_gguf(random_params(GG_SIZES["124M"]), GG_SIZES["124M"], tmp, qtype)
        tmp.replace(path)
    n = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))
    extra = llama_extra_bufts_work(path, n)
    if not extra:  # AMX / repacked weights crash here: llama.cpp's plain CPU kernels instead
        import llama_cpp.llama_cpp as lc
        default = lc.llama_model_default_params

        def no_extra_bufts():
            p = default()
            p.use_extra_bufts = False
            return p
        lc.llama_model_default_params = no_extra_bufts
    llm = Llama(model_path=str(path), n_ctx=args["prompt"] + args["new"] + 8, n_threads=n, n_threads_batch=n,
                verbose=False)
    prompt = [int(t) for t in tokens(2, args["prompt"])]
    out = {"extra_buffer_types": extra}

    def run():
        ids = []
        for tok in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            ids.append(int(tok))
            if len(ids) == args["new"]:
                break
        out["ids"] = ids
    return run, {"result": out}


# ---------------------------------------------------------------- PyTorch + transformers
def torch_info():
    import torch
    import transformers
    blas = [line.strip() for line in torch.__config__.show().splitlines()
            if "BLAS_INFO" in line or "Math Kernel" in line or "CPU capability" in line]
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "build": blas}


def torch_setup(bench, args):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    hp = SIZES["124M"]
    # no dropout: npgpt2 has none, and it would only add work to the PyTorch side
    config = GPT2Config(vocab_size=hp["n_vocab"], n_positions=hp["n_ctx"], n_embd=hp["n_embd"],
                        n_layer=hp["n_layer"], n_head=hp["n_head"], resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).float()
    if bench in ("forward", "prefill", "decode"):
        model.eval()
    if bench == "forward":
        x = torch.from_numpy(tokens(1, (1, args["T"])))

        def run():
            with torch.inference_mode():
                return model(x, use_cache=False).logits
        return run, {}
    if bench == "prefill":
        x = torch.from_numpy(tokens(1, (1, args["T"])))

        def run():  # what generate() does for the prompt: logits of the last position only
            with torch.inference_mode():
                return model(x, use_cache=True, logits_to_keep=1).logits
        return run, {}
    if bench == "decode":
        prompt = torch.from_numpy(tokens(2, (1, args["prompt"])))
        out = {}

        def run():  # greedy, KV cache, the lean loop (no generate() bookkeeping)
            ids = []
            with torch.inference_mode():
                o = model(prompt, use_cache=True, logits_to_keep=1)
                for step in range(args["new"]):
                    nxt = o.logits[:, -1].argmax(-1)
                    ids.append(int(nxt[0]))
                    if step + 1 < args["new"]:
                        o = model(nxt[:, None], past_key_values=o.past_key_values, use_cache=True)
            out["ids"] = ids
        return run, {"result": out}
    if bench == "train":
        B, T = args["B"], args["T"]
        data = torch.from_numpy(tokens(3, (B, T + 1)))
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

        def run():
            logits = model(data[:, :-1], use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     data[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)
        return run, {}
    raise SystemExit(f"unknown torch benchmark {bench!r}")


# ---------------------------------------------------------------- LoRA
def random_base(hp, dtype):
    """GPT-2 of these shapes with init_model's random weights, built one tensor at a time;
    dtype "int8": each matrix quantised as soon as it is made (as load_model(dtype="int8")
    quantises a checkpoint tensor by tensor), so 1558M never exists in float32 (6.2 GB)."""
    import math

    import numpy as np

    from npgpt2 import quant
    from npgpt2.model import GPT2, param_shapes
    rng = np.random.default_rng(0)
    params = {}
    for name, shape in param_shapes(hp).items():
        leaf = name.rsplit("/", 1)[1]
        if leaf in ("g", "b"):
            w = (np.ones if leaf == "g" else np.zeros)(shape, np.float32)
        else:
            std = 0.01 if name == "model/wpe" else 0.02 / math.sqrt(2 * hp["n_layer"]) if name.endswith("c_proj/w") \
                else 0.02
            w = rng.standard_normal(shape, dtype=np.float32)
            w *= std
        params[name] = quant.quantize_params({name: w})[name] if dtype == "int8" and quant.is_matrix(name) else w
    return GPT2(hp, params, np.float32)


def jargon_tokens(n_bytes=400_000):
    """GPT-2 token ids of the start of the bundled Jargon File (public domain; None: all of it)."""
    import gzip

    import numpy as np

    from npgpt2.model import ASSETS
    from npgpt2.tokenizer import load_tokenizer
    with gzip.open(ASSETS / "jargon.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read(-1 if n_bytes is None else n_bytes)
    return np.array(load_tokenizer().encode(text), dtype=np.int64)


def lora_setup(args):
    """One training step of LoRA adapters (r = args["r"], default 8, on all four matrices of
    every block) on a frozen random base of args["size"] (default 124M) in args["dtype"]
    (float32 or int8): loss_and_grads (with memory_saving=True when args say so and the
    model has it), then AdamW over the adapters alone. Batches: random tokens, or with
    args["corpus"] windows of the Jargon File; each run's loss is kept in result["losses"]."""
    import inspect

    import numpy as np

    from npgpt2 import lora
    from npgpt2.optim import AdamW
    hp = SIZES[args.get("size", "124M")]
    model = random_base(hp, args.get("dtype", "float32"))
    r = args.get("r", 8)
    lora.attach(model, lora.init_adapters(hp, lora.LoraConfig(r=r, alpha=2 * r)))
    opt = AdamW(model.lora.params, lr=args.get("lr", 1e-4))
    B, T = args["B"], args["T"]
    kw = {}
    if args.get("memory_saving"):
        if "memory_saving" in inspect.signature(model.loss_and_grads).parameters:
            kw["memory_saving"] = True
    corpus = jargon_tokens() if args.get("corpus") else None
    rng = np.random.default_rng(3)
    out = {"losses": [], "memory_saving": bool(kw), "adapter_params": sum(a.size for a in model.lora.params.values())}

    def run():
        if corpus is None:
            data = tokens(3, (B, T + 1))
        else:
            starts = rng.integers(0, corpus.size - T - 1, B)
            data = corpus[starts[:, None] + np.arange(T + 1)]
        loss, grads = model.loss_and_grads(data[:, :-1], data[:, 1:], **kw)
        opt.step(grads)
        out["losses"].append(loss)
    return run, {"result": out}


DEVIL = Path(__file__).resolve().parent / "data" / "devil.txt.gz"  # tools/extract_devil.py


def corpus_tokens(path):
    """GPT-2 token ids of a gzipped UTF-8 text."""
    import gzip

    import numpy as np

    from npgpt2.tokenizer import load_tokenizer
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return np.array(load_tokenizer().encode(f.read()), dtype=np.int64)


def quality_base(args, hp, cfg):
    """The quality row's base: GPT-2's full vocabulary at small width (hp), trained from random
    init on the Jargon File's first 90 % (demo.split_corpus) for args["base_steps"] steps at
    args["base_lr"]; its loss on the first 10k tokens of the held-out last 10 % is measured
    every eighth of the way (the curve shows whether it has flattened), on all of it at the end. Kept in args["cache"]/lora_quality_base-<settings>
    (benchmarks/results, not committed): a second run loads it instead of training it again.
    -> (model, info)."""
    import numpy as np

    from npgpt2.demo import split_corpus
    from npgpt2.fsutil import atomic_write, read_json
    from npgpt2.model import init_model, load_model, save_model
    from npgpt2.train import evaluate, fit
    key = "-".join(f"{k}{args[k]}" for k in ("n_layer", "n_embd", "T", "B", "base_steps", "base_lr"))
    folder = Path(args["cache"]) / f"lora_quality_base-{key}"
    train_part, held_out = split_corpus(corpus_tokens(Path(__file__).resolve().parent.parent / "npgpt2" / "assets"
                                                      / "jargon.txt.gz"))
    if (folder / "base.json").is_file():
        model, info = load_model(folder), read_json(folder / "base.json")
        if "jargon_held_out" not in info:
            info["jargon_held_out"] = evaluate(model, held_out, hp["n_ctx"])[0]
        return model, {**info, "cached": str(folder)}
    t0 = time.perf_counter()
    model = init_model(hp, seed=0)
    steps, every = args["base_steps"], max(1, args["base_steps"] // 8)
    probe = held_out[:10_000]  # the curve's points on the held-out part's first 10k tokens (each costs seconds)
    curve = [[0, evaluate(model, probe, hp["n_ctx"])[0]]]

    def on_step(info):
        if info["step"] % every == 0:
            curve.append([info["step"], evaluate(model, probe, hp["n_ctx"])[0]])
    fit(model, train_part, cfg(steps, args["base_lr"]), on_step=on_step)
    info = {"jargon_held_out_curve": curve, "jargon_held_out": evaluate(model, held_out, hp["n_ctx"])[0], "base_train_s": time.perf_counter() - t0,
            "jargon_tokens": {"train": int(train_part.size), "held_out": int(held_out.size)}}
    assert np.isfinite(curve[-1][1])
    save_model(model, folder)
    with atomic_write(folder / "base.json", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    return model, {**info, "cached": None}


def lora_quality(args):
    """LoRA against a full fine-tune from the same base, on the same data and steps.

    The base (quality_base): full vocabulary, trained here on the Jargon File. The second
    corpus: Ambrose Bierce's The Devil's Dictionary (public domain; benchmarks/data/devil.txt.gz,
    tools/extract_devil.py), split in order: its first 80 % to fine-tune on, the next 10 % to
    pick each side's learning rate (validation), the last 10 % held out (the score). Each side
    trains `ft_steps` steps (batch B, context T, cosine schedule) from the base once per learning
    rate of its sweep (full: AdamW over every weight, `full_lrs`; LoRA r=`r`, alpha 2r on all four
    matrices of every block, `lora_lrs`; the same targets plus the tied token embedding / output
    head (target wte), all at rank `wte_r` (default r), `lora_wte_lrs`; and, to tell where a gap comes from, the transformer
    layers alone at full rank, `layers_lrs`, with wte, wpe and ln_f frozen as under LoRA); the
    learning rate with the lowest validation loss is that side's. Returns the held-out losses (base, full, LoRA,
    LoRA with wte), the sweep, and each LoRA's held-out loss reduction as a share of the full fine-tune's
    (`share`: the four block matrices; `share_wte`: with wte)."""
    import numpy as np

    from npgpt2 import lora
    from npgpt2.model import GPT2
    from npgpt2.train import TrainConfig, evaluate, fit
    t0 = time.perf_counter()
    T, B = args["T"], args["B"]
    hp = dict(n_vocab=50257, n_ctx=T, n_embd=args["n_embd"], n_head=args["n_head"], n_layer=args["n_layer"])

    def cfg(steps, lr, **kw):
        return TrainConfig(steps=steps, learning_rate=lr, batch_size=B, context=T, seed=1, sample_every=0,
                           plot=False, warmup=min(50, steps // 10), lr_schedule="cosine", log_every=10**9, **kw)
    base, base_info = quality_base(args, hp, cfg)
    base_params = {k: v.copy() for k, v in base.params.items()}
    devil = corpus_tokens(DEVIL)
    n = devil.size
    ft_part, val, held_out = devil[:n * 8 // 10], devil[n * 8 // 10:n * 9 // 10], devil[n * 9 // 10:]
    out = {"hparams": hp, "base": base_info, "base_s": time.perf_counter() - t0,
           "devil_tokens": {"fine_tune": int(ft_part.size), "validation": int(val.size), "held_out": int(held_out.size)},
           **{k: args[k] for k in ("ft_steps", "r", "B", "T")},
           "model_params": int(sum(v.size for v in base_params.values())),
           "base_val": evaluate(base, val, T)[0], "base_loss": evaluate(base, held_out, T)[0], "sweep": []}
    # "layers": a full fine-tune of the transformer layers alone (--only_train_transformer_layers:
    # wte, wpe and ln_f frozen, as under LoRA), the same weights LoRA adapts, at full rank
    sides = (("full", args["full_lrs"]), ("lora", args["lora_lrs"]), ("lora_wte", args.get("lora_wte_lrs", [])),
             ("layers", args.get("layers_lrs", [])))
    for side, lrs in sides:
        for lr in lrs:
            t1 = time.perf_counter()
            model = GPT2(hp, {k: v.copy() for k, v in base_params.items()})
            if side in ("lora", "lora_wte"):
                targets = lora.TARGETS + ((lora.WTE,) if side == "lora_wte" else ())
                r = args.get("wte_r", args["r"]) if side == "lora_wte" else args["r"]
                lora.attach(model, lora.init_adapters(hp, lora.LoraConfig(r=r, alpha=2 * r, targets=targets)))
                out[f"{side}_r"] = r
                out[f"{side}_trainable"] = int(sum(a.size for a in model.lora.params.values()))
            losses = fit(model, ft_part, cfg(args["ft_steps"], lr, only_train_transformer_layers=side == "layers")
                         )["history"]["loss"]
            if side in ("lora", "lora_wte"):  # the base stayed frozen
                assert all(np.array_equal(model.params[k], base_params[k]) for k in base_params)
            out["sweep"].append({"side": side, "lr": lr, "val": evaluate(model, val, T)[0],
                                 "held_out": evaluate(model, held_out, T)[0], "train_first": losses[0],
                                 "train_last": losses[-1], "seconds": time.perf_counter() - t1})
    for side, _ in sides:
        runs = [s for s in out["sweep"] if s["side"] == side]
        if runs:
            best = min(runs, key=lambda s: s["val"])
            out[f"{side}_lr"], out[f"{side}_loss"] = best["lr"], best["held_out"]
    out["share"] = (out["base_loss"] - out["lora_loss"]) / (out["base_loss"] - out["full_loss"])
    if "lora_wte_loss" in out:
        out["share_wte"] = (out["base_loss"] - out["lora_wte_loss"]) / (out["base_loss"] - out["full_loss"])
    if "layers_loss" in out:  # LoRA's reduction as a share of the layers-only full-rank fine-tune's
        out["share_of_layers"] = (out["base_loss"] - out["lora_loss"]) / (out["base_loss"] - out["layers_loss"])
    out.update(wall_s=time.perf_counter() - t0, peak_rss_mib=peak_rss_mib())
    return out


# ---------------------------------------------------------------- one-shot: prepare, startup
def prepare(side, args):
    """Write a model folder with random weights: npgpt2's writer (OpenAI layout, TF
    checkpoint with crc32c) or HF's save_pretrained (safetensors)."""
    t0 = time.perf_counter()
    if side == "npgpt2":
        from npgpt2.model import init_model, save_model
        save_model(init_model(SIZES[args["size"]]), args["dir"])
    else:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        hp = SIZES[args["size"]]
        GPT2LMHeadModel(GPT2Config(vocab_size=hp["n_vocab"], n_positions=hp["n_ctx"],
                                   n_embd=hp["n_embd"], n_layer=hp["n_layer"],
                                   n_head=hp["n_head"])).save_pretrained(args["dir"])
    return {"seconds": time.perf_counter() - t0}


def _numba_cache_stats():
    """(hits, misses) of Numba's on-disk cache over every jitted function of npgpt2 used."""
    from numba.core.registry import CPUDispatcher
    hits = misses = 0
    for name, mod in list(sys.modules.items()):
        if not name.startswith("npgpt2"):
            continue
        for obj in vars(mod).values():
            if isinstance(obj, CPUDispatcher):
                hits += sum(obj.stats.cache_hits.values())
                misses += sum(obj.stats.cache_misses.values())
    return hits, misses


def startup(side, args):
    """A fresh process: imports, loading the model folder (npgpt2 checks every crc32c),
    and the first generated token of a 16-token prompt. Seconds since T_START."""
    prompt = [int(t) for t in tokens(2, 16)]
    if side == "npgpt2":
        import npgpt2
        from npgpt2.sampling import generate_stream
        t_import = time.perf_counter()
        model = npgpt2.load_model(args["dir"])
        t_load = time.perf_counter()
        next(generate_stream(model, prompt, 1, temperature=0))
        t_first = time.perf_counter()
        hits, misses = _numba_cache_stats()
        extra = {"numba_cache_hits": hits, "numba_cache_misses": misses}
    else:
        import torch
        from transformers import GPT2LMHeadModel
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
        t_import = time.perf_counter()
        model = GPT2LMHeadModel.from_pretrained(args["dir"]).eval()
        t_load = time.perf_counter()
        with torch.inference_mode():
            model(torch.tensor([prompt]), logits_to_keep=1).logits[:, -1].argmax(-1)
        t_first = time.perf_counter()
        extra = {}
    return {"import_s": t_import - T_START, "load_s": t_load - t_import,
            "first_token_s": t_first - t_load, "total_s": t_first - T_START,
            "peak_rss_mib": peak_rss_mib(), **extra}


def quality(args):
    """int8 against float32 on a trained model (the folder `npgpt2 demo --out DIR` wrote, or
    benchmarks/train_124m.py's 124M-shaped one; both trained on the first 90 % of the bundled
    corpus): mean loss over the held-out text (the last 10 %, as the demo splits it) and greedy
    next-token agreement at every position of non-overlapping n_ctx windows of it. "int8" is load_model(dtype="int8"); two variants show what per-group scales or a
    float32 embedding would change."""
    import numpy as np

    import npgpt2
    from npgpt2 import quant
    from npgpt2.demo import load_corpus, split_corpus
    from npgpt2.model import GPT2
    from npgpt2.tokenizer import load_tokenizer
    from npgpt2.train import evaluate
    f32 = npgpt2.load_model(args["dir"])
    context = f32.hparams["n_ctx"]
    ids, _ = load_corpus(load_tokenizer())  # the demo's corpus, in GPT-2 ids
    tok = load_tokenizer(args["dir"])
    if hasattr(tok, "compact_ids"):  # the demo's model: its compact ids, as the demo does
        ids = tok.compact_ids(ids)
    held = split_corpus(ids)[1].astype(np.int64)  # the demo's held-out 10 %
    W = (held.size - 1) // context
    windows = held[:W * context].reshape(W, context)  # [W, n_ctx]
    per = max(1, 4096 // context)  # windows per forward: (per, n_ctx, n_vocab) logits stay small

    def greedy(model):  # [W * n_ctx] argmax next token at every position
        return np.concatenate([model.forward(windows[i:i + per]).argmax(-1).ravel() for i in range(0, W, per)])

    def weight_mib(model):
        return sum(p.nbytes for p in model.params.values()) / 2**20
    loss32, count = evaluate(f32, held, context, batch_size=per)
    g32 = greedy(f32)
    out = {"dir": args["dir"], "held_out_tokens": count, "context": context,
           "float32": {"loss": loss32, "weight_mib": weight_mib(f32)}}
    variants = {"int8": npgpt2.load_model(args["dir"], dtype="int8")}
    if args.get("variants", True):  # what per-group scales or a float32 embedding would change
        variants.update({
            "int8, wte float32": GPT2(f32.hparams, quant.quantize_params(f32.params, embedding=False)),
            "int8, groups of 32": GPT2(f32.hparams, quant.quantize_params(f32.params, group_size=32))})
    for name, m in variants.items():
        loss, _ = evaluate(m, held, context, batch_size=per)
        out[name] = {"loss": loss, "delta_loss": loss - loss32, "weight_mib": weight_mib(m),
                     "greedy_agreement": float((greedy(m) == g32).mean())}
    # decoding's kernel (<= GEMV_MAX_ROWS rows: activations quantised to int8 too, int8_dot.py)
    # on every position: the same held-out windows with that kernel forced for all rows
    from npgpt2 import quant_kernels
    rows_max = quant_kernels.GEMV_MAX_ROWS
    quant_kernels.GEMV_MAX_ROWS = 1 << 30
    try:
        m = variants["int8"]
        loss, _ = evaluate(m, held, context, batch_size=per)
        out["int8, decode kernel"] = {"loss": loss, "delta_loss": loss - loss32, "weight_mib": weight_mib(m),
                                      "greedy_agreement": float((greedy(m) == g32).mean()),
                                      "kernel": quant_kernels.KERNEL}
    finally:
        quant_kernels.GEMV_MAX_ROWS = rows_max
    out["peak_rss_mib"] = peak_rss_mib()
    return out


# ---------------------------------------------------------------- neighbours (under load)
def neighbour(kind):
    """Other work on the machine, until killed. `busy`: one thread in a pure-Python loop.
    `spin`: a 2-thread Numba prange job whose threads spin-wait at the barrier after each
    short parallel loop, as OpenMP programs such as a llama.cpp/ggml decode do (run with
    NUMBA_THREADING_LAYER=omp OMP_WAIT_POLICY=ACTIVE). Says "ready" once running."""
    if kind == "busy":
        print("ready", flush=True)
        while True:
            pass
    import math

    import numpy as np
    from numba import njit, prange

    @njit(parallel=True)
    def step(a):
        for i in prange(a.shape[0]):  # one short chunk per thread, then the barrier
            s = 0.0
            for j in range(2000):
                s += math.sqrt(j + a[i])
            a[i] = s * 1e-12

    a = np.ones(2)
    step(a)
    print("ready", flush=True)
    while True:
        step(a)


# ---------------------------------------------------------------- the loop
def main():
    if sys.argv[1] == "neighbour":
        return neighbour(sys.argv[2])
    side, bench, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr  # keep the protocol channel clean

    def send(obj):
        proto.write(json.dumps(obj) + "\n")

    if bench in ("prepare", "startup"):
        send((prepare if bench == "prepare" else startup)(side, args))
        return
    if bench == "quality":
        send(quality(args))
        return
    if bench == "lora_quality":
        send(lora_quality(args))
        return

    if side == "npgpt2-lora":
        run, extra = lora_setup(args)
        info = npgpt2_info
    elif side in LLAMA_SIDES:
        run, extra = llama_setup(side, bench, args)
        info = llama_info
    elif side in NPGPT2_SIDES:
        run, extra = npgpt2_setup(bench, args, NPGPT2_SIDES[side])
        info = npgpt2_info
    else:
        run, extra = torch_setup(bench, args)
        info = torch_info
    send({"ready": True, "rss_after_setup_mib": peak_rss_mib(), "rss_now_mib": rss_mib()})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            t0 = time.perf_counter()
            run()
            # the peak so far after each repetition (the warm-up's first): where a peak arose
            send({"seconds": time.perf_counter() - t0, "peak_rss_so_far_mib": peak_rss_mib(), **extra})
        elif cmd == "quit":
            # ru_maxrss beside VmHWM: they differ when the peak came from the parent. (The 2.77
            # GiB train B=1,T=1024 peaks of some full runs are not that: run i, 2026-12-06,
            # had 2.77 GiB in both; still unexplained, and 2.20 GiB in every shorter run.)
            send({"peak_rss_mib": peak_rss_mib(), "rss_now_mib": rss_mib(), "huge_pages_mib": huge_pages_mib(),
                  "ru_maxrss_mib": ru_maxrss_mib(), "info": info()})
            return


if __name__ == "__main__":
    main()

"""Data-parallel training over MPI: the measured gradient Allreduce and a scaling table on paper.

    python benchmarks/allreduce.py                 # needs mpirun (Debian openmpi-bin) and mpi4py
    python benchmarks/allreduce.py --models 124M   # fewer compute measurements

1. Times npgpt2's bucketed in-place `MPIComm.allreduce_grads` on the 124M gradient (every
   parameter, float32: 497 MB) between 2 ranks on this machine (`mpirun -n 2`), median of
   several repetitions, and prints the bus bandwidth it reached.
2. Times one single-process training step (forward + backward + AdamW, B=1, T=256: the
   README's CPU fine-tuning setting) for each model size, random weights of the real shapes.
3. Prints the expected step time and scaling efficiency for N = 2..16 machines on 1 and
   10 Gbit/s links: step(N) = compute + ring-allreduce time, where a ring allreduce sends
   2(N-1)/N x the gradient bytes over each link, with no overlap of the two. Efficiency =
   compute / step(N) (1.0 = perfect scaling of throughput with N).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from npgpt2.model import MODEL_HPARAMS, param_shapes  # noqa: E402

WORKER = r"""
import sys, time, json, numpy as np
from npgpt2 import dist
from npgpt2.model import MODEL_HPARAMS, param_shapes
comm = dist.get_comm()
shapes = param_shapes(MODEL_HPARAMS["124M"])
grads = {k: np.full(s, comm.rank + 1.0, np.float32) for k, s in shapes.items()}
names = list(grads)
times, ok, want = [], True, comm.world_size * (comm.world_size + 1) / 2
for i in range(int(sys.argv[1]) + 1):
    comm.comm.Barrier()
    t = time.perf_counter()
    comm.allreduce_sum(grads, names)
    times.append(time.perf_counter() - t)
    ok = ok and all(float(g.reshape(-1)[0]) == want == float(g.reshape(-1)[-1]) for g in grads.values())
    for g in grads.values():
        g.fill(comm.rank + 1.0)
if comm.rank == 0:
    print(json.dumps({"times": times[1:], "bytes": sum(g.nbytes for g in grads.values()), "ok": ok}))
"""


def measure_allreduce(repeat):
    import json
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "worker.py"
        script.write_text(WORKER)
        env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
               "OMPI_MCA_rmaps_base_oversubscribe": "1", "PYTHONPATH": str(ROOT)}
        out = subprocess.run(["mpirun", "-n", "2", sys.executable, str(script), str(repeat)],
                             env=env, capture_output=True, text=True, timeout=600)
    if out.returncode:
        sys.exit(f"mpirun failed:\n{out.stdout}{out.stderr}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ok"], "allreduce gave a wrong sum"
    return statistics.median(res["times"]), res["bytes"]


def measure_step(name, B=1, T=256, repeat=2):
    """Seconds for one forward+backward+AdamW step of `name` on one process."""
    from npgpt2 import optim
    from npgpt2.model import init_model
    model = init_model(MODEL_HPARAMS[name], seed=0)
    opt = optim.make_optimizer("adam", model.params, 1e-5, {k: 0.0 for k in model.params})
    batch = np.random.default_rng(0).integers(0, 50257, size=(B, T + 1))
    times = []
    for _ in range(repeat + 1):
        t = time.perf_counter()
        _, grads = model.loss_and_grads(batch[:, :-1], batch[:, 1:])
        opt.step(grads, 1e-5)
        times.append(time.perf_counter() - t)
        del grads
    del model, opt
    return statistics.median(times[1:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="allreduce repetitions (after a warm-up)")
    ap.add_argument("--models", default="124M,355M,774M", help="sizes whose step time is measured")
    args = ap.parse_args()
    models = args.models.split(",")

    load = os.getloadavg()
    secs, nbytes = measure_allreduce(args.repeat)
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; {os.cpu_count()} cores")
    print("\n| measured | value |\n|---|---|")
    print(f"| Allreduce of the 124M gradient ({nbytes / 1e6:.0f} MB float32), 2 local ranks | "
          f"{secs:.3f} s (bus bandwidth {nbytes / secs / 1e9:.2f} GB/s) |")
    steps = {}
    for name in models:
        steps[name] = measure_step(name)
        print(f"| one training step {name}, B=1, T=256, 1 process | {steps[name]:.2f} s |")

    links = {"1 Gbit/s": 1e9 / 8, "10 Gbit/s": 10e9 / 8}
    Ns = (2, 4, 8, 16)
    for accumulate in (1, 8):
        print(f"\nExpected step time (s) and scaling efficiency with --accumulate_gradients {accumulate} "
              f"(compute = {accumulate} x the measured step), compute + ring allreduce, no overlap:\n")
        head = " | ".join(f"N={n} {link}" for link in links for n in Ns)
        print(f"| model | grad MB | compute s | {head} |")
        print("|---" * (3 + len(links) * len(Ns)) + "|")
        for name in models:
            gbytes = 4 * sum(int(np.prod(s)) for s in param_shapes(MODEL_HPARAMS[name]).values())
            compute = accumulate * steps[name]
            cells = []
            for bw in links.values():
                for n in Ns:
                    step = compute + 2 * (n - 1) / n * gbytes / bw
                    cells.append(f"{step:.1f} ({compute / step:.0%})")
            print(f"| {name} | {gbytes / 1e6:.0f} | {compute:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

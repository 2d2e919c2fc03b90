"""Data-parallel training over MPI: what differs when `npgpt2 train` runs as N processes.

    mpirun -n 4 npgpt2 train --dataset corpus.npz --model_name 124M ...

Synchronous data parallelism, as Horovod (nshepperd's train-horovod.py) does it:
every rank holds the whole model and draws its own batches; after the backward pass
the gradients are summed over the ranks (`Allreduce`) and divided by N, so every rank
then applies the same clip + AdamW step to the same weights and the weights stay equal
on all ranks without ever being broadcast. Rank 0 alone logs, samples, validates and
writes checkpoints.

Nothing here imports mpi4py unless the process was started by an MPI launcher
(`get_comm()` looks at the launcher's environment variables), so a plain `npgpt2 train`
is unchanged and mpi4py stays an optional extra (`pip install ".[mpi]"`).

Memory: gradients are reduced in place. Tensors of at least BUCKET_BYTES go in slices of
their own buffer; smaller ones are packed into one reusable bucket, reduced, and copied
back, so the extra memory is one bucket, whatever the model size.
"""
import logging
import os
import signal

import numpy as np

from .errors import Npgpt2Error

log = logging.getLogger(__name__)

BUCKET_BYTES = 32 << 20  # 32 MiB: a few messages per step for 124M, one bucket of extra memory
# set by Open MPI, MPICH/Hydra, Intel MPI and PMIx launchers in every process they start
_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def launched_by_mpi(environ=os.environ):
    """True when an MPI launcher (mpirun/mpiexec/srun with PMI) started this process."""
    return any(v in environ for v in _LAUNCHER_VARS)


class SingleProcess:
    """The communicator of a run in one process: every collective is the identity.

    fit() calls a communicator where the processes of a data-parallel run (each drawing its
    own batches) must agree: allreduce_mean between loss_and_grads and the clip + optimizer
    step (so every process applies the same update), any() to stop together, gather() to
    save every rank's sampler state, and is_main for what only one of them does (logs,
    samples, validation, checkpoints). MPIComm is the multi-process one.
    """
    rank, world_size = 0, 1

    @property
    def is_main(self):
        return self.rank == 0

    def allreduce_mean(self, grads, loss, weight=None):
        """Average grads (in place) and the loss over every process; returns the loss.

        weight: this process's share, e.g. its count of masked target positions (a loss mask,
        chat_data.py): the average is then weighted, sum(weight * x) / sum(weight), so it is the
        mean over every masked position of the step whatever their split between processes.
        None: equal shares."""
        return loss

    def any(self, flag):
        """True on every rank when flag is true on any rank."""
        return bool(flag)

    def bcast(self, obj):
        """Rank 0's obj, on every rank (a small picklable object)."""
        return obj

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on rank 0; None elsewhere."""
        return [obj]

    def bcast_arrays(self, arrays):
        """Rank 0's {name: ndarray} on every rank (others pass None); large arrays go as buffers."""
        return arrays

    def abort(self, code):
        """End every rank now (after an error on this one)."""
        raise SystemExit(code)


class MPIComm(SingleProcess):
    """COMM_WORLD through mpi4py; gradients summed in place, bucketed (see the module doc)."""

    def __init__(self, comm=None, bucket_bytes=BUCKET_BYTES):
        from mpi4py import MPI
        self._mpi = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        self.bucket_bytes = bucket_bytes
        self._bucket = None  # reused between steps

    def allreduce_mean(self, grads, loss, weight=None):
        total = self.world_size if weight is None else self.comm.allreduce(float(weight), op=self._mpi.SUM)
        if weight is not None:
            for g in grads.values():
                g *= weight
            loss = float(loss) * weight
        self.allreduce_sum(grads, list(grads))
        scale = 1.0 / total
        for g in grads.values():
            g *= scale
        return self.comm.allreduce(float(loss), op=self._mpi.SUM) / total

    def allreduce_sum(self, grads, names):
        """Sum grads[k] over the ranks in place, for k in names."""
        small = []
        for k in names:
            g = grads[k]
            if not g.flags.c_contiguous:
                raise ValueError(f"gradient {k} is not contiguous")
            if g.nbytes >= self.bucket_bytes:
                flat = g.reshape(-1)
                step = max(1, self.bucket_bytes // g.itemsize)
                for i in range(0, flat.size, step):  # in place: no copy of a large tensor
                    self.comm.Allreduce(self._mpi.IN_PLACE, flat[i:i + step], op=self._mpi.SUM)
            else:
                small.append(g)
        for group in _packs(small, self.bucket_bytes):
            self._reduce_packed(group)

    def _reduce_packed(self, group):
        """Copy the small tensors of one group into the bucket, reduce it, copy back."""
        dtype = group[0].dtype
        n = sum(g.size for g in group)
        if self._bucket is None or self._bucket.dtype != dtype or self._bucket.size < n:
            self._bucket = np.empty(max(n, self.bucket_bytes // dtype.itemsize), dtype)
        buf = self._bucket[:n]
        offsets = np.cumsum([0] + [g.size for g in group])
        for g, a, b in zip(group, offsets[:-1], offsets[1:]):
            buf[a:b] = g.reshape(-1)
        self.comm.Allreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM)
        for g, a, b in zip(group, offsets[:-1], offsets[1:]):
            g.reshape(-1)[:] = buf[a:b]

    def any(self, flag):
        return bool(self.comm.allreduce(bool(flag), op=self._mpi.LOR))

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def gather(self, obj):
        return self.comm.gather(obj, root=0)

    def bcast_arrays(self, arrays):
        layout = self.bcast(None if arrays is None else
                            {k: (v.shape, v.dtype.str) for k, v in arrays.items()})
        out = {}
        for name, (shape, dtype) in layout.items():
            buf = np.require(arrays[name], requirements="C") if self.is_main else np.empty(shape, dtype)
            flat = buf.reshape(-1).view(np.uint8)
            step = self.bucket_bytes
            for i in range(0, flat.size, step):  # pieces: MPI counts are 32-bit ints
                self.comm.Bcast(flat[i:i + step], root=0)
            out[name] = buf
        return out

    def abort(self, code):
        self.comm.Abort(code)


def _packs(tensors, bucket_bytes):
    """Split a list of small tensors into groups of one dtype that fit in one bucket."""
    groups, cur, size = [], [], 0
    for g in tensors:
        if cur and (g.dtype != cur[0].dtype or size + g.nbytes > bucket_bytes):
            groups.append(cur)
            cur, size = [], 0
        cur.append(g)
        size += g.nbytes
    if cur:
        groups.append(cur)
    return groups


def get_comm(environ=os.environ):
    """MPIComm when an MPI launcher started this process with more than one rank, else SingleProcess.

    A launch by mpirun without mpi4py installed is a one-line error: N independent
    single-process runs writing the same run folder would be wrong and silent.
    """
    if not launched_by_mpi(environ):
        return SingleProcess()
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise Npgpt2Error("started by an MPI launcher, but mpi4py is not installed: "
                          "pip install \"npgpt2[mpi]\" (or run without mpirun)") from None
    comm = MPIComm()
    return comm if comm.world_size > 1 else SingleProcess()


def rank_seed(seed, rank):
    """The batch-order seed of one rank: independent streams from one --seed.

    Rank 0 of a one-process run keeps `seed` itself, so a single-process run draws the
    batches it always did.
    """
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(2, np.uint64)[0] >> 1)


class RankSlice:
    """A sampler wrapper for the equivalence test of data parallelism: every rank draws what
    all world_size ranks would draw from ONE shared stream and keeps micro-batch `rank`, so
    N ranks see exactly the batches a single process with N x --accumulate_gradients sees."""

    def __init__(self, sampler, rank, world_size):
        self.sampler, self.rank, self.world_size = sampler, rank, world_size

    def sample(self, batch_size):
        return self.sample_masked(batch_size)[0]

    def sample_masked(self, batch_size):
        batches = [self.sampler.sample_masked(batch_size) for _ in range(self.world_size)]
        return batches[self.rank]

    def get_state(self):
        return self.sampler.get_state()

    def set_state(self, state):
        self.sampler.set_state(state)


def stop_signals(comm):
    """The signals that ask a run to save and stop after the current step.

    SIGINT (Ctrl-C) and SIGTERM (kill, schedulers); in a multi-process run also SIGUSR1,
    because Open MPI's mpirun answers Ctrl-C by sending SIGTERM and, one second later
    (odls_base_sigkill_timeout), SIGKILL, which is too soon to finish a step and save,
    while it forwards SIGUSR1 to every rank and waits: `kill -USR1 <mpirun pid>`.
    """
    base = (signal.SIGINT, signal.SIGTERM)
    return base + (signal.SIGUSR1,) if comm.world_size > 1 else base

"""What Numba compiles the kernels for, and the LLVM intrinsics the kernel modules share.

gemv.py (float32) and int8_dot.py (int8) both choose code by the target's features (register
count, VNNI) and both prefetch the weights they will read next; both import these from here.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def target_features():
    """The LLVM features Numba compiles for (NUMBA_CPU_FEATURES, else the host's): a set of
    "+name" / "-name" strings."""
    from numba.core import config
    from numba.core.codegen import get_host_cpu_features
    f = config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features()
    return set(f.split(","))


def emit_prefetch(builder, ptr):
    """IR: ask for ptr's cache line into L2 without waiting: LLVM's llvm.prefetch (x86
    prefetcht1, ARM prfm; nothing where the CPU has none). Never faults."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                        "llvm.prefetch.p0")
    # read (0), locality 2 (L2: used a few passes, strips or rows later), data cache (1)
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])


@intrinsic
def prefetch(typingctx, arr, idx):
    """Ask for arr[idx]'s cache line (1-D arr) into L2 without waiting (emit_prefetch)."""
    def codegen(context, builder, sig, args):
        emit_prefetch(builder, builder.gep(context.make_array(sig.args[0])(context, builder, args[0]).data, [args[1]]))
        return context.get_dummy_value()
    return types.none(arr, idx), codegen

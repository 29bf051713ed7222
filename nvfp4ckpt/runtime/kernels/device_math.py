"""Device arithmetic shared by the Triton kernels: exact roundings (bf16, e4m3) and reduction combiners.

Only builtins and these @jit helpers are used inside the kernels (no tl.sum / tl.max / tl.zeros, which are @jit
functions of triton.language itself): under TRITON_INTERPRET=1 those only work if triton was first imported with the
variable already set, which a test session cannot guarantee. Tests that run kernels under the interpreter reload this
module before the kernel modules (tests/conftest.py: ``interpreted``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _to_bf16_rne(v):
    """fp32 -> bf16, round to nearest even, written out in integer ops.

    On a GPU ``.to(tl.bfloat16)`` already rounds to nearest even, but Triton 3.9's interpreter truncates; doing
    the rounding explicitly makes both produce torch's ``.to(torch.bfloat16)`` (NaN payloads aside). After the
    add-and-mask the fp32 value is exactly representable in bf16, so the final cast is exact everywhere.
    """
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 == 0xFFFF0000
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _round_to_e4m3(v):
    """Round non-negative fp32 ``v`` (already clamped to <= 448) to the nearest e4m3 value, ties to even.

    Same result as ``torch.Tensor.to(torch.float8_e4m3fn)`` on such inputs: the spacing of e4m3 values around
    ``v`` is ``2^(exp(v) - 3)`` for normals and ``2^-9`` below 2^-6; scale to integer units (exact, a power of
    two), round half to even with the 1.5*2^23 trick (|q| <= 16), scale back.
    """
    bits = v.to(tl.int32, bitcast=True)
    biased_exp = tl.maximum((bits >> 23) & 255, 127 - 6)
    quantum = ((biased_exp - 3) << 23).to(tl.float32, bitcast=True)
    inv_quantum = ((257 - biased_exp) << 23).to(tl.float32, bitcast=True)  # 1 / quantum
    q = v * inv_quantum
    q = (q + 12582912.0) - 12582912.0
    return q * quantum



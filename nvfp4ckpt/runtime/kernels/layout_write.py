"""Write (or compare) source matrices into live kernel-layout tensors on the GPU, from a table of addresses.

One launch moves every matrix of one kind (w13 weight halves, w13 scales, w2 weights, w2 scales) of an update, any
number of experts and layers: each table row names a source matrix (its address and row stride, wherever it lives on
the device: a trainer's separate per-expert tensors, views of a stacked buffer, a rank's slice), the start of its
expert's slice in the live tensor, and where its kernel rows are in a row map. No copy of the layer is made and no
per-expert launch is issued; the only per-shape state is the row map (a few KB, cached by the caller).

Row maps give the kernel row of each source row (gated interleave + 32-row shuffle, padding included: see
``runtime.update.views._maps``). Weights move whole rows in ``UNIT``-sized words; a block scale at (kernel row ``r``,
column ``c``) lands at the 128x4 swizzle's offset (docs/layout.md):

* words (``UNIT`` = 4 bytes, ``c`` a word): ``((r // 128) * KPW + c) * 128 + (r % 32) * 4 + (r % 128) // 32``
* bytes (``c`` a byte): ``((r // 128) * KPW + c // 4) * 512 + ((r % 32) * 4 + (r % 128) // 32) * 4 + c % 4``

with ``KPW`` the padded scale columns / 4. In ``CHECK`` mode nothing is written: each table row's count of differing
units is added to ``flags[row]`` (one read-back for the whole check).

Table rows are ``FIELDS`` int64 values: the source matrix's address, its row stride (units), the address of its
expert's live slice, the index of its first row in the row map, rows, units per source row, and for weights the live
row stride (units), for scales KPW; one spare. Runs under ``TRITON_INTERPRET=1`` on the CPU (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


FIELDS = 8  # int64 values per table row

_UNIT_DTYPES = {8: tl.int64, 4: tl.int32, 2: tl.int16, 1: tl.uint8}


@triton.jit
def _count(flag, differs):
    """Add the number of differing units to ``flag``: one atomic per differing unit and none where all agree (no
    reduction, which Triton's interpreter runs element by element in Python)."""
    where = flag + tl.full(differs.shape, 0, tl.int64)
    tl.atomic_add(where, tl.full(differs.shape, 1, tl.int32), mask=differs)


@triton.jit
def _scatter_kernel(
    table, row_map, flags, UNIT: tl.constexpr, SCALES: tl.constexpr, WORDS: tl.constexpr, CHECK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_R source rows of one table row's matrix, BLOCK_C units at a time. Weights go to whole kernel
    rows (``dst_stride`` units apart); scales to their 128x4-swizzled words (``WORDS``) or bytes."""
    entry = tl.program_id(0)
    t = table + entry * 8
    n_rows = tl.load(t + 4)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    src = tl.load(t + 0).to(tl.pointer_type(UNIT))
    src_stride = tl.load(t + 1)
    dst = tl.load(t + 2).to(tl.pointer_type(UNIT))
    map_off = tl.load(t + 3)
    n_cols = tl.load(t + 5)
    dst_stride = tl.load(t + 6)  # scales: KPW
    r = tl.load(row_map + map_off + rows, mask=rmask, other=0).to(tl.int64)  # kernel row of each source row
    inner = (r % 32) * 4 + (r % 128) // 32  # scales: word slot inside a 512-byte tile
    tile = (r // 128) * dst_stride
    src_rows = src + rows.to(tl.int64)[:, None] * src_stride
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = rmask[:, None] & (cols < n_cols)[None, :]
        v = tl.load(src_rows + cols[None, :], mask=m, other=0)
        if SCALES:
            if WORDS:
                off = (tile[:, None] + cols[None, :]) * 128 + inner[:, None]
            else:
                off = (tile[:, None] + cols[None, :] // 4) * 512 + inner[:, None] * 4 + cols[None, :] % 4
        else:
            off = r[:, None] * dst_stride + cols[None, :]
        if CHECK:
            cur = tl.load(dst + off, mask=m, other=0)
            _count(flags + entry, (cur != v) & m)
        else:
            tl.store(dst + off, v, mask=m)


def launch(
    table: torch.Tensor, row_map: torch.Tensor, max_rows: int, unit: int, scales: bool, flags: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """Run one write (``flags`` None) or compare launch over ``table`` (int64 ``[n, FIELDS]`` on the live device)."""
    n = table.shape[0]
    if n == 0:
        return
    block_r = 32 if scales else 16
    block_c = 32 if scales else max(16, 512 // unit)  # 512 bytes of a weight row per step
    grid = (n, triton.cdiv(max_rows, block_r))
    check = flags is not None
    args = (table, row_map, flags if check else table)
    _scatter_kernel[grid](
        *args, UNIT=_UNIT_DTYPES[unit], SCALES=scales, WORDS=scales and unit == 4, CHECK=check, BLOCK_R=block_r, BLOCK_C=block_c,
    )  # fmt: skip


def warmup(device: torch.device | str) -> None:
    """Compile (or load from Triton's cache) the common variants once per process: 8-byte weight rows and 4-byte
    scale words, write and compare. Shapes are runtime values, so no later update compiles again for a new shape."""
    device = torch.device(device)
    table = torch.zeros((1, FIELDS), dtype=torch.int64, device=device)  # zero rows: every access is masked off
    row_map = torch.zeros(1, dtype=torch.int32, device=device)
    flags = torch.zeros(1, dtype=torch.int32, device=device)
    for scales, unit in ((False, 8), (True, 4)):
        for check in (None, flags):
            launch(table, row_map, 1, unit, scales, check)

"""The rows a cut made on the device (AdaKV) gathers: head h's kept local indices (the per-head top-k's
(n_kv, width) output, row h's first counts[h] slots) shifted by the head's first row in the layer's buffer, heads
back to back at the layout's starts. `ragged_rows_triton` builds them in one launch, one program per head, in place
of the repeat_interleave / arange / sub / index / add of `kvbench.method.ragged_topk_indices` and
`LayerKV.keep_ragged`; `ragged_rows_ref` is those torch ops (the test oracle).
"""
from __future__ import annotations

import torch

from . import HAS_TRITON, check_triton_inputs

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _ragged_rows_kernel(order_ptr, layout_ptr, starts_ptr, rows_ptr, h, total, stride_o, BLOCK: tl.constexpr):
        """Program `head`: its rows. Nothing is written past `total` (a layout whose counts do not sum to it is
        wrong, and refused when its lengths are read: PendingLengths.resolve)."""
        head = tl.program_id(0)
        at = tl.load(layout_ptr + head)       # where head's rows go in the output
        n = tl.load(layout_ptr + h + head)    # how many it keeps
        first = tl.load(starts_ptr + head)    # its first row in the buffer
        for t0 in range(0, n, BLOCK):
            j = t0 + tl.arange(0, BLOCK)
            ok = (j < n) & (at + j < total)
            tl.store(rows_ptr + at + j, first + tl.load(order_ptr + head * stride_o + j, mask=ok, other=0), mask=ok)


def ragged_rows_ref(order: torch.Tensor, layout: torch.Tensor, starts: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64: for each head h, starts[h] + order[h, :layout[1, h]], written at layout[0, h]. order:
    (n_kv, width) per-head indices (slots past a head's count undefined); layout: the (3, n_kv) device layout
    (starts of the output, counts, caps); starts: (n_kv,) the heads' first rows in the buffer; total: the counts'
    sum, known on the host."""
    h, dev = order.shape[0], order.device
    offset, cnt = layout[0], layout[1]
    head = torch.repeat_interleave(torch.arange(h, device=dev), cnt, output_size=total)
    flat = order[head, torch.arange(total, device=dev) - offset[head]]
    return torch.repeat_interleave(starts, cnt, output_size=total) + flat


def ragged_rows_triton(order: torch.Tensor, layout: torch.Tensor, starts: torch.Tensor, total: int) -> torch.Tensor:
    """`ragged_rows_ref` in one launch, one program per head. No host read."""
    h = order.shape[0]
    if layout.shape != (3, h) or starts.shape != (h,) or not order.dtype == layout.dtype == starts.dtype == torch.long:
        raise ValueError(f"ragged_rows: order (n_kv, width), layout (3, n_kv), starts (n_kv,), all int64; got "
                         f"{tuple(order.shape)}, {tuple(layout.shape)}, {tuple(starts.shape)}")
    layout, starts = layout.contiguous(), starts.contiguous()
    check_triton_inputs(order, layout, starts)
    rows = torch.empty(total, dtype=torch.long, device=order.device)
    if total:
        _ragged_rows_kernel[(h,)](order, layout, starts, rows, h, total, order.stride(0), BLOCK=1024, num_warps=4)
    return rows


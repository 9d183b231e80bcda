"""The compressed KV cache: per layer, per KV head, ragged; a transformers `Cache` subclass.

Storage of one layer is *flat-packed per KV head* (batch size 1): `keys`/`values` are (T, d) tensors and
KV head h owns rows `starts[h] : starts[h] + lengths[h]` (plus `caps[h] - lengths[h]` spare rows for decoding).
Each head may hold a different number of tokens, so per-head budgets free real memory: a method's `keep()`
gathers the kept rows into a new, tightly packed buffer and the old one is released.
Keys are stored post-RoPE, so the order of rows inside a head does not matter for attention; `positions`
remembers each row's original position (recency windows, sinks).

Per-row side data (`side`: name -> (T,) tensor aligned with the rows) travels with its row through every keep,
append and removal. One name has a meaning for attention: `log_weight`, added to the row's attention logit, so a
row that merges w tokens counts as w of them (log w); rows appended later get 0 (weight 1).

`LayerKV` is the *plain* store (rows in the model's dtype). Other storage formats (kvbench/store.py: quantized,
channel-pruned, low-rank, cross-layer, page-selected) replace a layer's `LayerKV` by an encoded layer after the
method has chosen what to keep.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache


def exclusive_cumsum(xs: list[int]) -> list[int]:
    """Where each head starts when heads of these sizes sit back to back."""
    out, acc = [], 0
    for x in xs:
        out.append(acc)
        acc += x
    return out


def long_tensor(data, device: torch.device) -> torch.Tensor:
    """Host ints -> an int64 tensor on `device`. To a GPU through pinned memory: a copy from pageable host
    memory waits for the stream (a hidden sync per layer inside the prefill); a pinned one is queued."""
    t = torch.tensor(data, dtype=torch.long)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


_META: dict = {}  # (h, n, cap, device) -> (3, h) starts, lengths, caps of a uniform layer, kept to be cloned


def _uniform_meta(h: int, n: int, cap: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Device (starts, lengths, caps) of h heads of n rows in cap-row slots: one clone of a cached (3, h) tensor
    (every layer of a prefill has the same; each gets its own copy, since the decode step bumps lengths in
    place) instead of three or four small kernels per layer."""
    key = (h, n, cap, str(dev))
    base = _META.get(key)
    if base is None:
        if len(_META) > 256:
            _META.clear()
        with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode; built on the
            base = torch.empty((3, h), dtype=torch.long, device=dev)  # device (a host copy would wait for it)
            torch.arange(h, out=base[0])
            base[0].mul_(cap)
            base[1].fill_(n)
            base[2].fill_(cap)
        _META[key] = base
    meta = base.clone()
    return meta[0], meta[1], meta[2]


class PendingLengths:
    """Host copies of head lengths still on the device: layers cut there (AdaKV's per-head budgets) whose kept
    counts the host has not read, so the prefill never waits for the GPU per layer. `add` queues a layer's
    (h,) device lengths and returns the record the layer holds in place of its host lists; the first host
    read of any queued layer (`LayerKV._lens` / `_starts` / `_caps`), or `resolve()` (AdaKV.after_prefill),
    reads every queued layer at once: one device-to-host copy, a sync (the host waits until the GPU has cut
    the last queued layer). What the host needs before that, the layer's total rows (held bytes), it knows."""

    def __init__(self):
        self._queued: list[_PendingRecord] = []

    def add(self, lengths: torch.Tensor, rows: int) -> "_PendingRecord":
        """Queue a packed layer's device lengths; `rows`: their sum, known on the host."""
        record = _PendingRecord(self, lengths, int(rows))
        self._queued.append(record)
        return record

    def __len__(self) -> int:
        return len(self._queued)

    def resolve(self) -> None:
        queued, self._queued = self._queued, []
        if not queued:
            return
        flat = torch.cat([r.lengths for r in queued]).tolist()  # the one device-to-host read (a sync)
        at = 0
        for r in queued:
            lens, at = flat[at:at + r.lengths.shape[0]], at + r.lengths.shape[0]
            r.host = (exclusive_cumsum(lens), lens, list(lens))  # packed tightly: no spare capacity
        for r in queued:
            if sum(r.host[1]) != r.rows:
                raise RuntimeError(f"a layer cut on the device holds {sum(r.host[1])} rows, not the {r.rows} its "
                                   f"host side counted (head lengths {r.host[1]}; AdaKV.DEFER = 'never' cuts on "
                                   "the host)")


class _PendingRecord:
    """One queued layer of a `PendingLengths`: its device lengths, its rows, and its host lists once read."""

    def __init__(self, queue: PendingLengths, lengths: torch.Tensor, rows: int):
        self.queue, self.lengths, self.rows = queue, lengths, rows
        self.host: tuple[list[int], list[int], list[int]] | None = None

    def get(self) -> tuple[list[int], list[int], list[int]]:
        if self.host is None:
            self.queue.resolve()
        return self.host


class HeldBytes:
    """Key+value bytes a cache holds now, and the most it has held since `reset_peak()`. Every change in the
    rows held (an append, a keep, a removal) reports here, so the peak is exact: the most a query held at any
    point, e.g. a layer's whole prefill before its compression, or a decoded token before its eviction."""

    def __init__(self, now: int = 0):
        self.now = self.peak = int(now)

    def add(self, delta: int) -> None:
        self.now += delta
        if self.now > self.peak:
            self.peak = self.now

    def reset_peak(self) -> None:
        self.peak = self.now

    def observe(self, nbytes: int) -> None:
        """A peak known from outside (the GPU decode path's in-place steps never call update())."""
        self.peak = max(self.peak, int(nbytes))


def _host_list(i: int) -> property:
    """LayerKV's host list i of [starts, lengths, caps] as an attribute (see `LayerKV._host_lists`)."""
    def get(self) -> list[int]:
        return self._host_lists()[i]

    def set(self, value: list[int]) -> None:
        self._host_lists()[i] = value
    return property(get, set)


class LayerKV:
    meter: HeldBytes | None = None  # the owning cache's meter (a layer outside a cache reports nowhere)

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 starts: torch.Tensor, lengths: torch.Tensor, caps: torch.Tensor,
                 host: "tuple[list[int], list[int], list[int]] | _PendingRecord | None" = None,
                 side: dict[str, torch.Tensor] | None = None):
        self.keys, self.values, self.positions = keys, values, positions
        self.side: dict[str, torch.Tensor] = dict(side or {})  # per-row side data, row-aligned (see module doc)
        self.starts, self.lengths, self.caps = starts, lengths, caps
        # host copies of (starts, lengths, caps): every host-side decision reads these, so the GPU is never
        # waited on per layer; callers that know them pass `host` (reading the device tensors would sync). A
        # layer cut on the device passes a `PendingLengths` record instead: read on first use (`_host_lists`).
        if host is None:
            host = (starts.tolist(), lengths.tolist(), caps.tolist())
        self._host = host if isinstance(host, _PendingRecord) else [list(x) for x in host]

    def _host_lists(self) -> list[list[int]]:
        """[starts, lengths, caps] on the host. A layer whose lengths are still pending on the device reads them
        here, with every other pending layer of its queue: one device-to-host copy, which waits for the GPU."""
        host = self._host
        if isinstance(host, _PendingRecord):
            host = self._host = [list(x) for x in host.get()]
        return host

    # the host lists, read from the device on first use if pending (never a stale copy)
    _starts = _host_list(0)
    _lens = _host_list(1)
    _caps = _host_list(2)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, spare: int = 0) -> "LayerKV":
        """k, v: (n_kv, n, d); positions: (n,). spare: rows of capacity per head beyond the n (the question and
        answer of a full cache, `KVBenchCache.spare_rows`), so appending them later copies nothing."""
        h, n, d = k.shape
        if spare <= 0:
            return cls._packed(k.reshape(h * n, d).contiguous(), v.reshape(h * n, d).contiguous(),
                               positions.to(k.device, torch.long).reshape(-1).repeat(h), [n] * h)
        C, dev = n + spare, k.device
        # few ops: this runs in every layer of a small model's host-bound prefill (spare rows: undefined K/V, as
        # _grow leaves them, and position 0)
        keys = torch.cat([k, k.new_empty((h, spare, d))], dim=1).view(h * C, d)
        values = torch.cat([v, v.new_empty((h, spare, d))], dim=1).view(h * C, d)
        pos = torch.cat([positions.to(dev, torch.long), positions.new_zeros(spare, dtype=torch.long,
                                                                              device=dev)]).repeat(h)
        starts, lengths, caps = _uniform_meta(h, n, C, dev)
        return cls(keys, values, pos, starts, lengths, caps, host=([i * C for i in range(h)], [n] * h, [C] * h))

    @classmethod
    def _packed(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                counts: list[int] | torch.Tensor, side: dict[str, torch.Tensor] | None = None,
                pending: PendingLengths | None = None) -> "LayerKV":
        """Heads of counts[h] rows each, back to back, no spare capacity, without a device sync (equal
        counts: the metadata is built on the device; otherwise one pinned host-to-device copy). counts may
        instead be the (3, h) device layout (starts, lengths, caps) of a cut made on the device: its host
        lists then wait in `pending` (the rows, keys.shape[0], are known)."""
        if isinstance(counts, torch.Tensor):
            return cls(keys, values, positions, counts[0], counts[1], counts[2],
                       host=pending.add(counts[1], keys.shape[0]), side=side)
        dev, h = keys.device, len(counts)
        starts_h = exclusive_cumsum(counts)
        if len(set(counts)) <= 1:
            n = counts[0] if counts else 0
            starts, lengths, caps = _uniform_meta(h, n, n, dev)
        else:
            starts, lengths, caps = long_tensor([starts_h, counts, counts], dev)
        return cls(keys, values, positions, starts, lengths, caps, host=(starts_h, list(counts), list(counts)),
                   side=side)

    def _take_rows(self, rows: torch.Tensor, counts: list[int] | torch.Tensor,
                   pending: PendingLengths | None = None) -> None:
        """Replace the storage by these rows (head h's counts[h] rows, heads back to back): one gather per
        tensor into a tight buffer; the old buffers are freed. counts / pending: see `_packed`."""
        before = self.n_rows
        new = LayerKV._packed(self.keys.index_select(0, rows), self.values.index_select(0, rows),
                              self.positions.index_select(0, rows), counts,
                              {n: t.index_select(0, rows) for n, t in self.side.items()}, pending)
        self.__dict__.update(new.__dict__)
        self._held(self.n_rows - before)

    def _held(self, delta_rows: int) -> None:
        if self.meter is not None and delta_rows:
            self.meter.add(delta_rows * self.row_bytes)

    # -- shape facts ---------------------------------------------------------------------------------
    @property
    def n_heads(self) -> int:
        return self.lengths.shape[0]  # (not the host lists: no read of pending lengths)

    @property
    def head_lengths(self) -> list[int]:
        return list(self._lens)

    def is_uniform(self) -> bool:
        """All heads equally long and evenly strided, so the storage is a dense (h, cap, d) view."""
        L, C = self._lens[0], self._caps[0]
        return all(x == L for x in self._lens) and all(c == C for c in self._caps)

    @property
    def n_rows(self) -> int:
        host = self._host
        return host.rows if isinstance(host, _PendingRecord) else sum(host[1])  # pending lengths: no read

    @property
    def row_bytes(self) -> int:
        """Key+value bytes of one token of one head."""
        return self.keys.shape[1] * (self.keys.element_size() + self.values.element_size())

    def nbytes(self) -> int:
        """Bytes of key+value data actually held (what the method kept)."""
        return self.n_rows * self.row_bytes

    def attention_flops(self, extra_tokens: int, group: int) -> int:
        """Matmul FLOPs of a decode step's attention over every row (+ `extra_tokens` per head): 2·2·d·L·g."""
        return 4 * self.keys.shape[1] * group * (self.n_rows + extra_tokens * self.n_heads)

    def read_bytes(self, extra_tokens: int = 0) -> int:
        """Bytes a decode step's attention reads: every row, plus `extra_tokens` new ones per head."""
        return (self.n_rows + extra_tokens * self.n_heads) * self.row_bytes

    def allocated_bytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    # -- views ---------------------------------------------------------------------------------------
    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h, L, d) keys/values and (h, L) positions; only valid when `is_uniform()`."""
        h, C, L = self.n_heads, self._caps[0], self._lens[0]
        d = self.keys.shape[1]
        return (self.keys.view(h, C, d)[:, :L], self.values.view(h, C, d)[:, :L],
                self.positions.view(h, C)[:, :L])

    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self._starts[h]
        e = s + self._lens[h]
        return self.keys[s:e], self.values[s:e], self.positions[s:e]

    # -- mutation ------------------------------------------------------------------------------------
    def _repack(self, new_caps: list[int], keep: list[torch.Tensor] | None = None):
        """Copy (optionally a subset of) each head's rows into a fresh buffer with the given capacities."""
        dev = self.keys.device
        before = self.n_rows
        src, dst = [], []
        new_starts = exclusive_cumsum(new_caps)
        new_lens = []
        for h in range(self.n_heads):
            s = self._starts[h]
            idx = torch.arange(self._lens[h], device=dev) if keep is None else keep[h].to(dev)
            src.append(idx + s)
            dst.append(torch.arange(idx.numel(), device=dev) + new_starts[h])
            new_lens.append(idx.numel())
        src_i, dst_i = torch.cat(src), torch.cat(dst)
        total, d = sum(new_caps), self.keys.shape[1]
        k = self.keys.new_empty(total, d)
        v = self.values.new_empty(total, d)
        p = self.positions.new_zeros(total)
        k[dst_i] = self.keys[src_i]
        v[dst_i] = self.values[src_i]
        p[dst_i] = self.positions[src_i]
        for name, t in self.side.items():
            new = t.new_zeros(total)
            new[dst_i] = t[src_i]
            self.side[name] = new
        self.keys, self.values, self.positions = k, v, p  # the old buffers are freed here
        meta = long_tensor([new_starts, new_lens, list(new_caps)], dev)  # one copy for the three
        self.starts, self.lengths, self.caps = meta[0], meta[1], meta[2]
        self._lens, self._caps, self._starts = new_lens, list(new_caps), new_starts
        self._held(self.n_rows - before)

    def keep(self, indices, ascending: bool = False) -> None:
        """Keep, per head, the rows at these local indices (a (h, k) tensor or a list of 1-D tensors).
        The result is tightly packed: no spare capacity, so nbytes() == allocated_bytes(). ascending: the
        caller's promise that each head's indices are sorted already (no sort on the device)."""
        if isinstance(indices, torch.Tensor) and indices.dim() == 2 and self.is_uniform():
            return self._keep_uniform(indices, ascending)
        per_head = list(indices.unbind(0)) if isinstance(indices, torch.Tensor) else list(indices)
        if len(per_head) != self.n_heads:
            raise ValueError(f"keep(): got indices for {len(per_head)} heads, the layer has {self.n_heads}")
        per_head = [torch.sort(i.long())[0] for i in per_head]  # keep original order (cheaper to reason about)
        self._repack([int(i.numel()) for i in per_head], per_head)

    def _keep_uniform(self, indices: torch.Tensor, ascending: bool = False) -> None:
        """Same number k of kept rows in every head: one batched gather, no host loop, no device sync
        (this runs once per layer inside the prefill, where a sync would stall the GPU)."""
        h, k = indices.shape
        if h != self.n_heads:
            raise ValueError(f"keep(): got indices for {h} heads, the layer has {self.n_heads}")
        if k > self._lens[0]:
            raise ValueError(f"keep(): {k} indices per head, the heads hold {self._lens[0]} rows")
        idx = indices.long() if ascending else torch.sort(indices.long(), dim=-1).values
        self._take_rows((self.starts.view(h, 1) + idx).reshape(-1), [k] * h)

    def keep_ragged(self, flat_idx: torch.Tensor, counts: list[int] | torch.Tensor,
                    pending: PendingLengths | None = None) -> None:
        """Keep counts[h] rows of head h: `flat_idx` holds their local indices, head 0's first (each head's
        in the order to store). One batched gather into a tightly packed buffer, no host loop.
        A cut made on the device (AdaKV) passes counts as the (3, h) int64 device layout of the kept rows
        (starts: the counts' exclusive cumsum, lengths = caps: the counts) and a `pending` queue: nothing is
        read back, the total (flat_idx's length) is known on the host, and the head lengths wait in `pending`."""
        if isinstance(counts, torch.Tensor):
            if counts.shape != (3, self.n_heads) or pending is None:
                raise ValueError(f"keep_ragged(): a device layout must be (3, {self.n_heads}) with a pending queue")
            rows = torch.repeat_interleave(self.starts, counts[1], output_size=flat_idx.shape[0]) + flat_idx
            return self.keep_rows(rows, counts, pending)
        if len(counts) != self.n_heads:
            raise ValueError(f"keep_ragged(): got counts for {len(counts)} heads, the layer has {self.n_heads}")
        if any(c > n for c, n in zip(counts, self._lens)):
            raise ValueError(f"keep_ragged(): counts {counts} exceed the head lengths {self._lens}")
        dev = self.keys.device
        starts, cnt = long_tensor([self._starts, counts], dev)
        rows = torch.repeat_interleave(starts, cnt, output_size=sum(counts)) + flat_idx.to(dev).long()
        self._take_rows(rows, counts)

    def keep_rows(self, rows: torch.Tensor, layout: torch.Tensor, pending: PendingLengths) -> None:
        """`keep_ragged` of a device layout with the buffer rows to keep already built (head h's layout[1][h] rows
        back to back; methods/kernels/ragged_rows.py builds them in one launch): one gather per tensor, nothing
        read back."""
        if layout.shape != (3, self.n_heads) or pending is None:
            raise ValueError(f"keep_rows(): the device layout must be (3, {self.n_heads}) with a pending queue")
        self._take_rows(rows, layout, pending)

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more tokens per head (one reallocation instead of one per step)."""
        if any(c - n < extra for c, n in zip(self._caps, self._lens)):
            self._grow([n + extra for n in self._lens])

    def _grow(self, new_caps: list[int]) -> None:
        """More capacity, every row kept in place. A uniform layer (a full cache, or one compressed to one
        budget per head) grows as a dense (h, cap, d) view: one strided copy per tensor, no index tensors or
        host-to-device copies (this runs in every layer when a question is fed on top of a context)."""
        if not (self.is_uniform() and len(set(new_caps)) == 1):
            return self._repack(new_caps)
        h, C, L, cap = self.n_heads, self._caps[0], self._lens[0], new_caps[0]

        def grow(t: torch.Tensor, zeros: bool) -> torch.Tensor:
            shape = t.shape[1:]
            new = (t.new_zeros if zeros else t.new_empty)((h * cap, *shape))
            new.view(h, cap, *shape)[:, :L] = t.view(h, C, *shape)[:, :L]
            return new

        # positions and side data of spare rows are 0, as _repack leaves them
        self.keys, self.values = grow(self.keys, False), grow(self.values, False)
        self.positions = grow(self.positions, True)
        self.side = {n: grow(t, True) for n, t in self.side.items()}
        dev = self.keys.device
        self.starts = torch.arange(h, device=dev, dtype=torch.long) * cap
        self.caps = torch.full((h,), cap, device=dev, dtype=torch.long)
        self._starts, self._caps = [i * cap for i in range(h)], [cap] * h

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """k, v: (h, q, d) new tokens of every head; positions: (q,)."""
        q = k.shape[1]
        if any(c - n < q for c, n in zip(self._caps, self._lens)):
            grow = max(q, 64, max(self._lens) // 8)
            self._grow([n + grow for n in self._lens])
        dev = self.keys.device
        if self.is_uniform():  # dense (h, cap, d) views: strided copies, no index tensors
            h, C, L, d = self.n_heads, self._caps[0], self._lens[0], self.keys.shape[1]
            self.keys.view(h, C, d)[:, L:L + q] = k  # (copy_ casts: no .to(), one host op less per tensor)
            self.values.view(h, C, d)[:, L:L + q] = v
            self.positions.view(h, C)[:, L:L + q] = positions
            for t in self.side.values():
                t.view(h, C)[:, L:L + q] = 0  # a new row: no score yet, weight 1 (log_weight 0)
        else:
            rows = (self.starts + self.lengths).unsqueeze(1) + torch.arange(q, device=dev).unsqueeze(0)  # (h, q)
            rows = rows.reshape(-1)
            self.keys[rows] = k.reshape(-1, k.shape[-1]).to(self.keys.dtype)
            self.values[rows] = v.reshape(-1, v.shape[-1]).to(self.values.dtype)
            self.positions[rows] = positions.to(dev, torch.long).repeat(self.n_heads)
            for t in self.side.values():
                t[rows] = 0  # a new row: no score yet, weight 1 (log_weight 0)
        self.lengths = self.lengths + q
        self._lens = [n + q for n in self._lens]
        self._held(q * self.n_heads)

    def remove(self, head: int, local_idx: int) -> None:
        """Drop one token of one head in O(1): the head's last row moves into its slot (decode-time eviction)."""
        s = self._starts[head]
        last = s + self._lens[head] - 1
        dst = s + local_idx
        if dst != last:
            self.keys[dst] = self.keys[last]
            self.values[dst] = self.values[last]
            self.positions[dst] = self.positions[last]
            for t in self.side.values():
                t[dst] = t[last]
        self._lens[head] -= 1
        self.lengths[head] -= 1
        self._held(-1)

    def __deepcopy__(self, memo):
        # a cache layer belongs to the engine: method state that refers to one (CAKE's cascade, D2O's pending
        # layers) shares it when a method is forked, so forking a method never copies a cache
        return self

    def clone(self) -> "LayerKV":
        return LayerKV(self.keys.clone(), self.values.clone(), self.positions.clone(), self.starts.clone(),
                       self.lengths.clone(), self.caps.clone(), host=(self._starts, self._lens, self._caps),
                       side={n: t.clone() for n, t in self.side.items()})

    # -- side data -----------------------------------------------------------------------------------
    def set_side(self, name: str, per_head) -> None:
        """Attach row-aligned side data: `per_head` is a (h, L) tensor (uniform layer) or a list of (L_h,)
        tensors, one per head, in row order."""
        t = torch.zeros(self.keys.shape[0], dtype=torch.float32, device=self.keys.device)
        for h, x in enumerate(per_head.unbind(0) if isinstance(per_head, torch.Tensor) else per_head):
            s = self._starts[h]
            t[s:s + self._lens[h]] = x.to(t)
        self.side[name] = t

    def add_side(self, name: str, per_head) -> None:
        """Add to row-aligned side data (created as zeros if absent): `per_head` a (h, L) tensor (uniform
        layer) or one (L_h,) tensor per head. Accumulating scorers (H2O, D2O) keep their scores this way, so
        every keep, append and removal keeps them beside their rows."""
        if name not in self.side:
            self.side[name] = torch.zeros(self.keys.shape[0], dtype=torch.float32, device=self.keys.device)
        if isinstance(per_head, torch.Tensor) and per_head.dim() == 2 and self.is_uniform():
            self.side_dense(name).add_(per_head.to(torch.float32))
            return
        for h, x in enumerate(per_head.unbind(0) if isinstance(per_head, torch.Tensor) else per_head):
            self.side_head(name, h).add_(x.to(torch.float32))

    def side_dense(self, name: str) -> torch.Tensor:
        """(h, L) view of side data; only valid when `is_uniform()` (as `dense()`)."""
        h, C, L = self.n_heads, self._caps[0], self._lens[0]
        return self.side[name].view(h, C)[:, :L]

    def side_head(self, name: str, h: int) -> torch.Tensor:
        s = self._starts[h]
        return self.side[name][s:s + self._lens[h]]

    def log_weight(self) -> torch.Tensor | None:
        """(T,) per-row log-weights added to the attention logits, or None (every row weighs 1)."""
        return self.side.get("log_weight")


class KVBenchCache(Cache):
    """A transformers Cache whose layers are ragged `LayerKV`s.

    `update()` stores the new tokens and returns them unchanged: the kvbench attention function reads
    the whole (possibly compressed) layer from the cache itself. The engine sets `next_positions`
    (original positions of the tokens of the coming forward) before each forward.
    """

    def __init__(self, num_layers: int):
        super().__init__(layers=[])
        self.kv: list[LayerKV | None] = [None] * num_layers
        self.next_positions: torch.Tensor | None = None
        self.seen_tokens = 0  # original (uncompressed) number of positions covered
        self.held = HeldBytes()  # K+V bytes held now and at most (see HeldBytes)
        self.query_windows: dict[int, torch.Tensor] = {}  # layer -> last prefill queries, until encoded (store.py)
        self.spare_rows = 0  # capacity per head beyond the rows of the forward that creates a layer (Engine.prefill)

    # transformers calls this from every attention layer before the attention function; the extra arguments
    # (cache_kwargs before 5.24, kwargs= since) carry nothing we need: positions come from `next_positions`
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise ValueError("kvbench runs batch size 1 (one sample at a time)")
        k, v = key_states[0], value_states[0]
        pos = self.next_positions
        if pos is None:
            pos = torch.arange(self.seen_tokens, self.seen_tokens + k.shape[1])
        if self.kv[layer_idx] is None:
            layer = self.kv[layer_idx] = LayerKV.from_dense(k, v, pos, spare=self.spare_rows)
            layer.meter = self.held
            self.held.add(layer.nbytes())
        else:
            self.kv[layer_idx].append(k, v, pos)
        return key_states, value_states

    def layer(self, idx: int) -> LayerKV:
        return self.kv[idx]

    def __len__(self):
        return len(self.kv)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length, layer_idx=0):
        return self.seen_tokens + int(query_length), 0

    def get_query_offset(self, layer_idx=0):
        return self.seen_tokens

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.kv)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.kv)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.kv)

    def nbytes(self) -> int:
        return sum(l.nbytes() for l in self.kv if l is not None)

    def attention_flops(self, extra_tokens: int, group: int) -> int:
        """Matmul FLOPs of one decode step's attention, each layer in its own format (kvbench/store.py)."""
        return sum(l.attention_flops(extra_tokens, group) for l in self.kv if l is not None)

    def read_bytes(self, extra_tokens: int = 0) -> int:
        """K/V bytes one decode step's attention reads with `extra_tokens` new tokens per head appended
        (stored format; a selector reads only what it selects)."""
        return sum(l.read_bytes(extra_tokens) for l in self.kv if l is not None)

    def allocated_bytes(self) -> int:
        return sum(l.allocated_bytes() for l in self.kv if l is not None)

    def head_lengths(self) -> list[list[int]]:
        return [l.head_lengths if l is not None else [] for l in self.kv]

    def reserve(self, extra: int) -> None:
        for l in self.kv:
            if l is not None:
                l.reserve(extra)

    def clone(self) -> "KVBenchCache":
        c = KVBenchCache(len(self.kv))
        memo: dict = {}  # cross-layer stores (`shared_clone`): what several layers share is cloned once
        c.kv = [None if l is None else l.clone(memo) if getattr(l, "shared_clone", False) else l.clone()
                for l in self.kv]
        c.seen_tokens = self.seen_tokens
        c.held = HeldBytes(self.nbytes())
        for l in c.kv:
            if l is not None:
                l.meter = c.held
        return c

    def resync_held(self) -> None:
        """After code that changed the rows without telling the meter (the GPU decode path's in-place steps)."""
        self.held.add(self.nbytes() - self.held.now)

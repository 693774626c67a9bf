"""Several datasets in one stream, and who reads what: the torch-free planning behind
:class:`packds.torch.StreamingDataset` and :class:`packds.torch.MixedDataset`.

* :class:`Stream` names one source and how many of its samples an epoch draws: a weight
  (``proportion``), a multiple of its size (``repeat``) or a fixed count (``choose``), as
  MosaicML Streaming names them.
* :func:`epoch_counts` turns those into exact per-epoch sample counts.
* :func:`node_info` finds the node a rank runs on (Slurm, torchrun), so that the ranks of a node
  can be given a stable share of the data (the node-local shard cache then holds that share).
* :func:`group_ranges` lays out one epoch for one group of ranks (all ranks, or one node's):
  which sample ranges, in which order.

Everything here is deterministic for a seed and epoch, so every rank and worker computes the
same plan without talking to the others.
"""

from __future__ import annotations

import math
import os
import random
from array import array
from typing import Iterable, Optional, Sequence

__all__ = ["Stream", "epoch_counts", "node_info", "group_ranges", "share_bounds"]


class Stream:
    """One source of a mixed stream.

    ``path``: a dataset directory or an open :class:`packds.Dataset`. At most one of:

    * ``proportion`` (or ``weight``, the same thing): this source's share of the epoch, relative
      to the other weighted sources (weights need not add up to 1);
    * ``repeat``: draw ``repeat × len(source)`` samples per epoch (2.0 = every sample twice,
      0.5 = a different half each epoch);
    * ``choose``: draw exactly this many samples per epoch.

    None of them: every sample once per epoch (``repeat=1``). A source drawn less than once is
    sampled without replacement, a new subset every epoch; more than once, every sample
    ``floor(repeat)`` times plus a random subset for the fraction.
    """

    __slots__ = ("path", "proportion", "repeat", "choose")

    def __init__(self, path, *, proportion: Optional[float] = None, weight: Optional[float] = None,
                 repeat: Optional[float] = None, choose: Optional[int] = None) -> None:
        if weight is not None:
            if proportion is not None:
                raise ValueError("give proportion or weight, not both")
            proportion = weight
        given = [n for n, v in (("proportion", proportion), ("repeat", repeat), ("choose", choose)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of proportion/weight, repeat, choose (got {', '.join(given)})")
        for name, v in (("proportion", proportion), ("repeat", repeat), ("choose", choose)):
            if v is not None and (not math.isfinite(float(v)) or float(v) < 0):
                raise ValueError(f"{name}={v!r}: must be a finite number >= 0")
        self.path = path
        self.proportion = None if proportion is None else float(proportion)
        self.repeat = None if repeat is None else float(repeat)
        self.choose = None if choose is None else int(choose)

    def __repr__(self) -> str:
        how = (f"proportion={self.proportion}" if self.proportion is not None else f"repeat={self.repeat}"
               if self.repeat is not None else f"choose={self.choose}" if self.choose is not None else "repeat=1")
        return f"Stream({os.fspath(getattr(self.path, 'path', self.path))!r}, {how})"


def as_streams(spec) -> tuple[list[Stream], bool]:
    """The sources given as ``path``: one path or dataset, or a list of paths, datasets,
    ``(path, weight)`` pairs or :class:`Stream` objects. Returns (streams, several)."""
    if isinstance(spec, (list, tuple)) and not _is_pair(spec):
        if not spec:
            raise ValueError("no sources given: pass a dataset path or a list of (path, weight) pairs")
        out = []
        for item in spec:
            if isinstance(item, Stream):
                out.append(item)
            elif _is_pair(item):
                out.append(Stream(item[0], proportion=item[1]))
            else:
                out.append(Stream(item))
        return out, True
    if isinstance(spec, Stream):
        return [spec], True
    return [Stream(spec)], False


def _is_pair(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], (int, float)) and not isinstance(x[1], bool)


def _largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split in proportion to ``weights``, rounded so the parts add up exactly."""
    wsum = float(sum(weights))
    if total <= 0 or wsum <= 0:
        return [0] * len(weights)
    raw = [total * w / wsum for w in weights]
    out = [int(math.floor(r)) for r in raw]
    left = total - sum(out)
    for j in sorted(range(len(raw)), key=lambda j: (out[j] - raw[j], j))[:left]:
        out[j] += 1
    return out


def epoch_counts(sizes: Sequence[int], streams: Sequence[Stream], epoch_size: Optional[int] = None) -> list[int]:
    """Samples drawn from each source per epoch.

    ``choose`` is taken as is, ``repeat`` rounded to whole samples; the weighted sources share
    what is left of ``epoch_size`` in proportion to their weights. Without ``epoch_size`` the
    weighted sources share the sum of their own sizes (so an unweighted mix of equal weights
    draws as many samples as the sources hold), and a source with no setting draws itself once.
    """
    counts: list[Optional[int]] = []
    for n, st in zip(sizes, streams):
        if st.choose is not None:
            counts.append(st.choose)
        elif st.repeat is not None:
            counts.append(int(round(st.repeat * n)))
        elif st.proportion is None:
            counts.append(n if epoch_size is None or any(s.proportion is not None for s in streams) else None)
        else:
            counts.append(None)
    weighted = [j for j, st in enumerate(streams) if st.proportion is not None]
    fixed = sum(c for c in counts if c is not None)
    unset = [j for j, c in enumerate(counts) if c is None and streams[j].proportion is None]
    if weighted:
        if epoch_size is None:
            pool = sum(sizes[j] for j in weighted)
        else:
            pool = int(epoch_size) - fixed
            if pool < 0:
                raise ValueError(f"epoch_size={epoch_size} is smaller than the {fixed} samples fixed by choose/repeat")
        for j, c in zip(weighted, _largest_remainder(pool, [streams[j].proportion or 0.0 for j in weighted])):
            counts[j] = c
        if sum(streams[j].proportion or 0.0 for j in weighted) <= 0 and pool > 0:
            raise ValueError("every weight is 0: give at least one source a weight > 0")
    elif unset:
        # epoch_size with plain sources: split it in proportion to their sizes
        pool = int(epoch_size or 0) - fixed
        if pool < 0:
            raise ValueError(f"epoch_size={epoch_size} is smaller than the {fixed} samples fixed by choose/repeat")
        for j, c in zip(unset, _largest_remainder(pool, [sizes[j] for j in unset])):
            counts[j] = c
    out = [int(c or 0) for c in counts]
    for n, c, st in zip(sizes, out, streams):
        if c > 0 and n == 0:
            raise ValueError(f"{st!r}: the source is empty but {c} samples per epoch were asked from it")
    if epoch_size is not None and sum(out) != int(epoch_size):
        raise ValueError(f"epoch_size={epoch_size}, but choose/repeat fix {sum(out)} samples per epoch; "
                         "give a weight to at least one source, or leave epoch_size out")
    return out


def node_info(world: int, rank: int, nodes: Optional[int] = None, node: Optional[int] = None) -> tuple[int, int, int, int]:
    """(node, nodes, local_rank, ranks_per_node) of ``rank`` among ``world`` ranks.

    Explicit ``nodes`` (and optionally ``node``) win; else ``SLURM_NNODES`` with
    ``SLURM_NODEID``/``SLURM_LOCALID``, else torchrun's ``LOCAL_WORLD_SIZE`` with
    ``GROUP_RANK``/``LOCAL_RANK``; else one node. Without a node id from the environment the
    ranks are taken as laid out node by node (rank = node × ranks_per_node + local rank), as
    Slurm's default block distribution and torchrun do. Every node must run the same number of
    ranks.
    """
    env = os.environ
    local: Optional[int] = None
    if nodes is None:
        if env.get("SLURM_NNODES") and env.get("SLURM_NODEID") is not None and env.get("SLURM_LOCALID") is not None \
                and int(env.get("SLURM_NTASKS", world)) == world:
            nodes, node, local = int(env["SLURM_NNODES"]), int(env["SLURM_NODEID"]), int(env["SLURM_LOCALID"])
        elif env.get("LOCAL_WORLD_SIZE") and env.get("GROUP_RANK") is not None and env.get("LOCAL_RANK") is not None:
            nodes, node, local = world // max(1, int(env["LOCAL_WORLD_SIZE"])), int(env["GROUP_RANK"]), int(env["LOCAL_RANK"])
        else:
            nodes = 1
    nodes = max(1, int(nodes))
    if world % nodes:
        raise ValueError(f"{world} ranks do not split evenly over {nodes} nodes; give nodes= (or partition='global')")
    per = world // nodes
    if node is None or local is None:
        node = rank // per if node is None else int(node)
        local = rank % per
    if not (0 <= node < nodes and 0 <= local < per):
        raise ValueError(f"rank {rank}: node {node} of {nodes}, local rank {local} of {per} is out of range")
    return int(node), nodes, int(local), per


def share_bounds(n: int, groups: int, g: int) -> tuple[int, int]:
    """Samples [a, b) of a source of ``n`` samples that group ``g`` of ``groups`` reads: one
    contiguous run in storage order, so a node's share is a fixed set of whole shards (two at
    most shared with a neighbour)."""
    return n * g // groups, n * (g + 1) // groups


def group_count(n: int, count: int, groups: int, g: int) -> int:
    """Samples group ``g`` draws from a source of ``n`` drawing ``count`` per epoch: in
    proportion to its share, exactly its share when ``count == n``; adds up to ``count``."""
    if n == 0:
        return 0
    a, b = share_bounds(n, groups, g)
    return count * b // n - count * a // n


def _clip(blocks: Sequence[tuple[int, int]], a: int, b: int) -> list[tuple[int, int]]:
    out = []
    for lo, hi in blocks:
        lo, hi = max(lo, a), min(hi, b)
        if lo < hi:
            out.append((lo, hi))
    return out


def group_ranges(blocks: Sequence[Sequence[tuple[int, int]]], sizes: Sequence[int], offsets: Sequence[int],
                 counts: Sequence[int], seed: int, epoch: int, groups: int, g: int, shuffle: bool) -> list[tuple[int, int]]:
    """The epoch's sample ranges (global positions: source ``s`` starts at ``offsets[s]``) for
    group ``g``, in stream order. Each source contributes its share's blocks ``counts``-many
    samples' worth: whole passes over the share, then a random subset of its blocks (a new one
    each epoch; the last block cut to fit). With ``shuffle`` the blocks of all sources are
    mixed in a random order; without, they come in storage order.

    One source, one group, every sample once: the block order is the one this library has
    always used (``random.Random(f"packds-blocks-{seed}-{epoch}")``), so saved states and
    sample orders of earlier releases stay valid.
    """
    plain = len(sizes) == 1 and groups == 1 and counts[0] == sizes[0]
    out: list[tuple[int, int]] = []
    for s, (bl, n, off, c) in enumerate(zip(blocks, sizes, offsets, counts)):
        a, b = share_bounds(n, groups, g)
        want = group_count(n, c, groups, g)
        mine = list(bl) if (a, b) == (0, n) else _clip(bl, a, b)
        m = b - a
        if want == 0 or m == 0:
            continue
        full, rest = divmod(want, m)
        chosen = [(lo + off, hi + off) for lo, hi in mine] * full
        if rest:
            order = list(range(len(mine)))
            random.Random(f"packds-choose-{seed}-{epoch}-{s}-{g}").shuffle(order)
            pick = []
            for j in order:
                lo, hi = mine[j]
                take = min(hi - lo, rest)
                pick.append((lo + off, lo + off + take))
                rest -= take
                if not rest:
                    break
            chosen += sorted(pick) if not shuffle else pick
        out += chosen
    if shuffle:
        rng = random.Random(f"packds-blocks-{seed}-{epoch}" if plain else f"packds-blocks-{seed}-{epoch}-{g}-of-{groups}")
        rng.shuffle(out)
    return out


def ranges_length(ranges: Iterable[tuple[int, int]]) -> int:
    return sum(hi - lo for lo, hi in ranges)


def cut(ranges: Sequence[tuple[int, int]], total: int, start: int, stop: int) -> list[tuple[int, int]]:
    """The pieces of stream positions [start, stop) of ``ranges`` (laid end to end, ``total``
    samples long); positions past the end wrap around (padding)."""
    out: list[tuple[int, int]] = []
    if total == 0 or start >= stop:
        return out
    cum = array("q", [0])
    for lo, hi in ranges:
        cum.append(cum[-1] + hi - lo)
    import bisect

    pos = start
    while pos < stop:
        p = pos % total
        take = min(stop - pos, total - p)
        j = bisect.bisect_right(cum, p) - 1
        q = p
        while q < p + take:
            lo0, _ = ranges[j]
            lo = lo0 + (q - cum[j])
            hi = lo0 + min(cum[j + 1], p + take) - cum[j]
            out.append((lo, hi))
            q += hi - lo
            j += 1
        pos += take
    return out

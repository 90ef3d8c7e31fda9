"""Layers of one block solved together where they share an input.

q/k/v (or a fused qkv) read one tensor, as do gate/up: the statistics pass gives them one
`InputStats` object, hence one Hessian. A method that offers a stacked solve
(`method.solve_joint(weights, stats, pattern, sparsity, error_energies=None, **options)`, e.g.
SparseGPT) then prunes them as one matrix stacked along the output dimension, with one pass over
the columns instead of one per layer, and can report each layer's output error energy. Other
methods, and layers without statistics, are solved one at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from workbench.arch import LinearInfo, in_out_features, weight_of
from workbench.patterns import Pattern

# Blocks up to this many weights (a 1B model's; a 7B block has ~200M) solve their groups
# concurrently, holding every group's dense and solved copies at once.
CONCURRENT_MAX_WEIGHTS = 64 * 2**20
# torch's thread count is process-wide: prunes running side by side (two app sessions) take turns
# here, so each one restores the count it found rather than another prune's 1.
_THREAD_COUNT_LOCK = threading.Lock()


def input_groups(linears: list[LinearInfo], stats: dict) -> list[list[LinearInfo]]:
    """`linears` grouped by the statistics object they were given (the same object means the
    same input tensor), in block order of each group's first member; no statistics: alone."""
    groups: dict[int, list[LinearInfo]] = {}
    order: list[list[LinearInfo]] = []
    for lin in linears:
        st = stats.get(lin.full_name)
        if st is None:
            order.append([lin])
            continue
        key = id(st)
        if key not in groups:
            groups[key] = []
            order.append(groups[key])
        groups[key].append(lin)
    return order


def solve_by_input(method: Callable, linears: list[LinearInfo], stats: dict, pattern: Pattern,
                   target: float, blocksize: int, percdamp: float, measured: dict | None = None
                   ) -> Iterator[tuple[LinearInfo, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(linear, dense fp32 weight, new weight, keep mask) per layer, in block order within each
    input group. A small CPU block with a stacked solve runs its groups concurrently (see
    `_solve_concurrently`); otherwise one group's solves are alive at a time (a stacked solve
    holds its group's weights together, a per-layer one a single layer's). With `measured` (a
    dict), a stacked solve also stores each layer's relative output error there by full name
    (from the error energy the solve reports), for the caller to use instead of measuring it
    again; the module weights must still be the dense ones until a group's items are taken."""
    joint = getattr(method, "solve_joint", None)
    options = {"blocksize": blocksize, "percdamp": percdamp}
    groups = input_groups(linears, stats)
    workers = min(torch.get_num_threads(), len(groups))
    if joint is not None and workers > 1 and _small_cpu_block(linears):
        yield from _solve_concurrently(joint, groups, stats, pattern, target, options, workers, measured)
        return
    for group in groups:
        st = stats.get(group[0].full_name)
        if joint is None or len(group) == 1:
            for lin in group:
                dense = _dense(lin)
                new_weight, keep = method(dense, st, pattern, target, **options)
                yield lin, dense, new_weight, keep
                del dense, new_weight, keep  # not alive (in this frame) during the next solve
            continue
        energies = {} if measured is not None else None
        items = _solve_group(joint, group, st, pattern, target, options, energies)
        if energies:
            outputs = _output_energies(group, st)
            measured.update({name: st.relative_error(None, error_energy=energy, output_energy=outputs[name])
                             for name, energy in energies.items()})
        yield from items


def _solve_group(joint: Callable, group: list[LinearInfo], st, pattern: Pattern, target: float,
                 options: dict, energies: dict | None = None) -> list[tuple]:
    """The group's stacked solve; with `energies` (a dict), each layer's output error energy
    ||(W - W') X||^2 is stored there by full name."""
    denses = [_dense(lin) for lin in group]
    found = [] if energies is not None and st is not None else None
    solved = joint(denses, st, pattern, target, error_energies=found, **options)
    if found:
        energies.update(zip([lin.full_name for lin in group], found))
    return [(lin, dense, new_weight, keep) for lin, dense, (new_weight, keep) in zip(group, denses, solved)]


def _output_energies(group: list[LinearInfo], st) -> dict[str, float]:
    """||W X||^2 of each layer's current (dense) weight, by full name."""
    return {lin.full_name: st.output_energy(weight_of(lin.module)) for lin in group}


def _solve_concurrently(joint: Callable, groups: list[list[LinearInfo]], stats: dict, pattern: Pattern,
                        target: float, options: dict, workers: int, measured: dict | None) -> list[tuple]:
    """Every group of the block solved on `workers` threads, one torch thread each, largest first.

    The column sweep is a long chain of small ops: on CPU an op split across threads mostly waits
    for its partner thread (far worse on a busy machine), while independent groups (q/k/v, o,
    gate/up, down: all read statistics taken before any solve) keep every core busy. The output
    energies that relative errors divide by need only the dense weights: they are queued after
    the solves, so a thread that finishes its solves early computes them while the largest solve
    still runs. The whole block's results are alive together, hence `_small_cpu_block`."""
    def cost(group: list[LinearInfo]) -> float:
        cols, rows = in_out_features(group[0].module)[0], sum(in_out_features(lin.module)[1] for lin in group)
        return cols**3 + rows * cols**2

    energies = {} if measured is not None else None
    for st in stats.values():
        _ = st.gram  # mirrored into a symmetric matrix here, once, not by two threads at a time
    with _THREAD_COUNT_LOCK:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            # torch's thread count is also per thread (OpenMP's setting): a new thread starts at
            # the machine's count, so each solve thread is set to one itself
            with ThreadPoolExecutor(workers, thread_name_prefix="solve", initializer=torch.set_num_threads,
                                    initargs=(1,)) as pool:
                ordered = sorted(groups, key=cost, reverse=True)
                solves = {id(group): pool.submit(_solve_group, joint, group, stats.get(group[0].full_name),
                                                 pattern, target, options, energies) for group in ordered}
                outputs = [pool.submit(_output_energies, group, stats[group[0].full_name]) for group in ordered
                           if measured is not None and group[0].full_name in stats]
                items = [item for group in groups for item in solves[id(group)].result()]
                for future in outputs:
                    for name, output in future.result().items():
                        if name in energies:
                            measured[name] = stats[name].relative_error(None, error_energy=energies[name],
                                                                        output_energy=output)
                return items
        finally:
            torch.set_num_threads(threads)


def _small_cpu_block(linears: list[LinearInfo]) -> bool:
    weights = [weight_of(lin.module) for lin in linears]
    return all(w.device.type == "cpu" for w in weights) and \
        sum(w.numel() for w in weights) <= CONCURRENT_MAX_WEIGHTS


def _dense(lin: LinearInfo) -> torch.Tensor:
    return weight_of(lin.module).to(torch.float32, copy=True).contiguous()

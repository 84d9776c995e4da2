"""One calibration run on several processes (ranks) of `torch.distributed` (docs/methods.md §4,
"Several ranks").

Every rank holds the whole model and the same calibration batches, and takes a contiguous share of
the batches by index. The loop runs on every rank in step: each group's statistics are combined
across the ranks into their token-weighted mean before the solve, the rows of a group's stacked
solve are shared out and the results gathered, and every rank hands its own batches on through the
quantized block. Only rank 0 writes; the resume checkpoint holds the whole run's streams (gathered
onto rank 0), so it resumes on any number of ranks.

The library never starts a process group itself: `Ranks.current` reads the one the caller (the CLI,
`torchrun`, a user's script) initialised, and a run without one is a plain single-process run.
`ranks_from_environment` is the CLI's way of initialising one from torchrun's variables, and
`launch` its way of starting the ranks on one machine (``--nproc``).
"""
from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
from torch import Tensor, nn

from .checkpoint import BlockCheckpoint, Resumed
from .errors import CompquantError
from .qlinear import QuantizedLinear
from .quantizer import Grid
from .report import BlockReport, LayerReport
from .solver import LayerResult, Solver, SolverOptions
from .statistics import LayerStatistics, StatisticsAccumulator

T = TypeVar("T")

#: How long a rank waits in a collective for the others: long enough for rank 0 to write a big
#: block's checkpoint while the others wait for it at the next group (NCCL's default is 10 minutes).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
#: Variables torchrun (and torch.distributed.run) sets in every rank it starts.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether this process was started as a rank by torchrun (its variables are set)."""
    return all(name in os.environ for name in LAUNCHER_VARIABLES)


def backend_for(device: torch.device) -> str:
    """The collective backend of ranks that compute on ``device``: NCCL on CUDA, gloo on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


class NotCombinableError(CompquantError, TypeError):
    """A statistic's accumulator cannot combine the states of several ranks."""


class RankFailedError(CompquantError):
    """A rank of a launched run failed; the launcher stopped the others."""


@contextmanager
def ranks_from_environment(device: torch.device) -> Iterator[Ranks]:
    """This process's `Ranks` for the duration. In a process started by torchrun, the default process
    group is initialised from its variables with the backend for ``device`` (a CUDA rank takes the
    GPU of its local rank) and destroyed afterwards; elsewhere it is a single process. For the
    CLI: library code only reads a group (`Ranks.current`)."""
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        yield Ranks.current()
        return
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
    dist.init_process_group(backend_for(device), timeout=COLLECTIVE_TIMEOUT)
    try:
        yield Ranks.current()
    finally:
        dist.destroy_process_group()


_LAUNCHER_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
                          if hasattr(signal, name))


def launch(nproc: int, arguments: Sequence[str]) -> None:
    """Run ``python ARGUMENTS`` (e.g. ``-m compquant quantize ...``) as ``nproc`` ranks on this
    machine with torch's elastic launcher (what ``torchrun --standalone --nproc-per-node N`` does).
    The ranks print their own errors; the first to fail is named in a `RankFailedError`."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # the launcher installs signal handlers of its own and leaves them; the caller gets its own back
    handlers = {number: signal.getsignal(number) for number in _LAUNCHER_SIGNALS}
    try:
        run(parse_args(["--standalone", "--nproc-per-node", str(nproc), *arguments]))
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        how = f"exit code {failure.exitcode}" if failure.exitcode >= 0 else f"signal {-failure.exitcode}"
        raise RankFailedError(f"rank {rank} of {nproc} failed first ({how}; its error is above) and the other ranks "
                              "were stopped; the output was not written") from None
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)


def local_device(device: torch.device) -> torch.device:
    """``device`` for this rank: a CUDA device without an index becomes the GPU of the rank's local
    rank (torchrun's LOCAL_RANK), so that the ranks of one machine use one GPU each."""
    if device.type != "cuda" or device.index is not None or "LOCAL_RANK" not in os.environ:
        return device
    return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % max(torch.cuda.device_count(), 1))


def bounds(count: int, parts: int) -> list[int]:
    """Where ``count`` items are cut into ``parts`` contiguous shares whose sizes differ by at most
    one (the first shares take the remainder): ``parts + 1`` offsets from 0 to ``count``."""
    size, extra = divmod(count, parts)
    return [index * size + min(index, extra) for index in range(parts + 1)]


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a run: ``rank`` of ``world``. ``Ranks()`` is a
    single-process run, for which every method below does nothing beyond the local work."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The ranks of the initialised default process group, or a single process without one."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that writes."""
        return self.rank == 0

    def share(self, items: Sequence[T], what: str = "calibration batches") -> list[T]:
        """This rank's contiguous share of ``items`` (in order, so the ranks' shares laid end to end
        are ``items``); every rank must get at least one."""
        if self.world == 1:
            return list(items)
        if len(items) < self.world:
            raise ValueError(f"{len(items)} {what} cannot be shared by {self.world} ranks (each needs at least one); "
                             "use more calibration samples, a smaller batch size, or fewer ranks")
        cuts = bounds(len(items), self.world)
        return list(items[cuts[self.rank]:cuts[self.rank + 1]])

    def total(self, count: int) -> int:
        """The sum of ``count`` over the ranks."""
        if self.world == 1:
            return count
        import torch.distributed as dist

        summed = torch.tensor([count], dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(summed)
        return int(summed.item())

    def combine(self, statistics: StatisticsAccumulator) -> None:
        """Turn this rank's running statistics into those of every rank's tokens, in place: each
        state tensor (a mean over its accumulator's tokens, in the run's stats dtype) becomes the
        token-weighted mean of the ranks' states, and the token counts their sum."""
        if self.world == 1:
            return
        import torch.distributed as dist

        means = {statistic: accumulator.means() for statistic, accumulator in statistics.accumulators.items()}
        refused = [statistics.accumulators[statistic] for statistic, tensors in means.items() if tensors is None]
        if refused:
            names = ", ".join(f"{type(a).__module__}.{type(a).__qualname__}" for a in refused)
            raise NotCombinableError(f"the accumulator {names} cannot be combined across ranks (its means() returns "
                                     "None: its state is not a mean over its tokens); run on one process, or "
                                     "implement Accumulator.means for it")
        items = list(statistics.accumulators.items())
        local = [accumulator.tokens for _, accumulator in items] + [statistics.tokens]
        counts = torch.tensor(local, dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(counts)
        *totals, statistics.tokens = counts.tolist()
        for (statistic, accumulator), tokens, total in zip(items, local, totals):
            for tensor in means[statistic]:  # the sum over the ranks is then the mean over every token
                tensor.mul_(tokens / total if total else 0.0)  # (an expert no rank routed a token to: zeros)
                dist.all_reduce(tensor)
            accumulator.tokens = total

    def solve_rows(self, solver: Solver, weight: Tensor, stats: LayerStatistics | None, grid: Grid,
                   options: SolverOptions) -> LayerResult:
        """``solver.solve(weight, ...)`` for a solver whose rows are independent: each rank solves a
        contiguous share of the rows, and every rank receives the whole result."""
        rows = weight.shape[0]
        if self.world == 1 or rows < self.world:
            return solver.solve(weight, stats, grid, options)
        cuts = bounds(rows, self.world)
        mine = solver.solve(weight[cuts[self.rank]:cuts[self.rank + 1]], stats, grid, options)
        whole = [self._gather_rows(part, cuts) for part in (mine.weight, mine.codes, mine.scale, mine.zero)]
        return LayerResult(*whole, mine.g_idx, mine.perm)  # the column order is the statistics', the same on all

    def _gather_rows(self, part: Tensor, cuts: list[int]) -> Tensor:
        """Every rank's ``part`` (rows ``cuts[r]:cuts[r + 1]`` of one matrix), stacked in rank order.
        The rows travel as bytes: gloo gathers no int16 (the codes), and a copy of bytes is exact."""
        import torch.distributed as dist

        largest = max(b - a for a, b in zip(cuts, cuts[1:]))
        raw = part.contiguous().reshape(part.shape[0], -1).view(torch.uint8)
        padded = raw.new_zeros((largest, raw.shape[1]))
        padded[: raw.shape[0]] = raw
        received = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(received, padded)
        rows = torch.cat([tensor[: b - a] for tensor, a, b in zip(received, cuts, cuts[1:])])
        return rows.view(part.dtype).reshape(cuts[-1], *part.shape[1:])

    def gather(self, tensors: Sequence[Tensor]) -> list[Tensor] | None:
        """Every rank's ``tensors`` (its share of the batches), in batch order, on rank 0 (on the
        CPU); None on the other ranks."""
        import torch.distributed as dist

        if self.world == 1:
            return list(tensors)
        received: list[list[Tensor]] | None = [[] for _ in range(self.world)] if self.main else None
        dist.gather_object([tensor.cpu() for tensor in tensors], received, dst=0)
        return None if received is None else [tensor for share in received for tensor in share]

    def _collective_device(self) -> torch.device:
        """Where the backend wants the tensors of a collective: NCCL's on this rank's GPU."""
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


class SharedCheckpoint:
    """A `BlockCheckpoint` of a run on several ranks. Rank 0 writes it, with the streams of every
    rank's batches gathered in batch order, so that it is the checkpoint a single process would
    have written; every rank reloads the finished blocks and takes its own share of the streams."""

    def __init__(self, checkpoint: BlockCheckpoint, ranks: Ranks) -> None:
        self.checkpoint, self.ranks = checkpoint, ranks

    def blocks_done(self) -> int:
        return self.checkpoint.blocks_done()

    def restore(self, blocks: Sequence[nn.Module], prefix: str,
                grid: Grid) -> tuple[Resumed, dict[str, QuantizedLinear], list[LayerReport]]:
        resumed, records, reports = self.checkpoint.restore(blocks, prefix, grid)
        if resumed.blocks_done:
            resumed.hidden = self.ranks.share(resumed.hidden, "resumed batches")
            if resumed.fp_hidden is not None:
                resumed.fp_hidden = self.ranks.share(resumed.fp_hidden, "resumed batches")
        return resumed, records, reports

    def save_block(self, index: int, block: nn.Module, records: dict[str, QuantizedLinear], reports: list[LayerReport],
                   hidden: Sequence[Tensor] | None, fp_hidden: Sequence[Tensor] | None,
                   learning: BlockReport | None = None) -> None:
        hidden = None if hidden is None else self.ranks.gather(hidden)
        fp_hidden = None if fp_hidden is None else self.ranks.gather(fp_hidden)
        if self.ranks.main:
            self.checkpoint.save_block(index, block, records, reports, hidden, fp_hidden, learning)

    def discard(self) -> None:
        if self.ranks.main:
            self.checkpoint.discard()

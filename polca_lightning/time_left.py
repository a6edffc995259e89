"""How long a run with POLCA has left, from what it has measured so far.

A POLCA run's time is not proportional to its steps: snapshots come every ``snapshot_every``
steps, a basis step every ``basis_every`` (an eigensolve, then a backfill over every
earlier snapshot, which grows with the run), until ``max_basis`` vectors. A progress bar
that extrapolates the average time per step is wrong in both directions: too slow while the
basis grows, too fast after. :func:`time_left` counts the work left on the schedule and
prices each kind at the rate this process measured; :class:`TimeLeft` prints it every few
hundred steps as one line (a log file reads it as well as a terminal), e.g.::

    step 2000/10000 (20%) after 18.3 min: training 0.31 s/step, snapshots 14.2 s, eigensolves 41 s,
    backfill 9.1 s a snapshot; left: about 1 h 41 min (training 41 min, snapshots 38 min, basis 22 min),
    then the analysis

The work after training (the LCA baseline, the causal check, the analysis and the report)
is not in the estimate: it is measured only once training ends.

:class:`Stopwatch` keeps the wall and CPU time of work that is not a Lightning run (e.g.
:func:`~polca_lightning.from_checkpoints` over a long series) in a JSON file across the
processes that resume it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.callbacks import Callback

__all__ = ["TimeLeft", "Rates", "time_left", "format_seconds", "Stopwatch"]


def _clocks() -> tuple[float, float]:
    """This process's wall clock and CPU clock (every thread), in seconds."""
    return time.perf_counter(), time.process_time()


def _add_elapsed(prior: dict, since: tuple[float, float] | None) -> dict:
    """``prior``'s ``seconds`` and ``cpu_seconds`` plus the time since the :func:`_clocks`
    reading ``since`` (None: none yet); a ``cpu_seconds`` of None (not counted) stays None."""
    wall, cpu = (now - then for now, then in zip(_clocks(), since)) if since is not None else (0.0, 0.0)
    return {"seconds": prior["seconds"] + wall,
            "cpu_seconds": None if prior["cpu_seconds"] is None else prior["cpu_seconds"] + cpu}


@dataclass(frozen=True)
class Rates:
    """Seconds per unit of work, as measured: a training step (without POLCA's work), a
    snapshot (its derivatives and writes), an eigensolve, and one snapshot of a backfill
    (``None`` where nothing of that kind has run yet)."""

    train_step: float | None
    snapshot: float | None
    eigensolve: float | None
    backfill_snapshot: float | None


def _multiples(every: int, after: int, until: int) -> list[int]:
    """The multiples of ``every`` in ``(after, until]``."""
    first = (after // every + 1) * every
    return list(range(first, until + 1, every))


def time_left(step: int, max_steps: int, *, snapshot_every: int, basis_every: int, n_basis: int,
              max_basis: int, k: int, rates: Rates) -> dict[str, float]:
    """Seconds left in training at ``step`` of ``max_steps``, by kind of work.

    Args:
        step: the optimizer steps done.
        max_steps: the steps training will run.
        snapshot_every, basis_every, max_basis, k: the run's schedule (``POLCAConfig``).
        n_basis: the basis vectors so far.
        rates: the measured :class:`Rates` (a kind not measured yet counts as 0).

    Returns:
        ``{"training", "snapshots", "basis", "total"}`` in seconds. A basis step is an
        eigensolve and a backfill over every snapshot taken by then.

    Example:
        >>> r = Rates(train_step=0.3, snapshot=10.0, eigensolve=40.0, backfill_snapshot=2.0)
        >>> left = time_left(9000, 10000, snapshot_every=50, basis_every=200, n_basis=16, max_basis=16, k=1, rates=r)
        >>> left["training"], left["snapshots"], left["basis"]
        (300.0, 200.0, 0.0)
    """
    snapshots = _multiples(snapshot_every, step, max_steps)
    basis_steps = [s for s in snapshots if s % basis_every == 0]
    vectors_left = max(0, max_basis - n_basis)
    basis_steps = basis_steps[: -(-vectors_left // k) if vectors_left else 0]
    train = (max_steps - step) * (rates.train_step or 0.0)
    snap = len(snapshots) * (rates.snapshot or 0.0)
    # a basis step at `s` backfills the s // snapshot_every + 1 snapshots taken by then
    basis = sum(((rates.eigensolve or 0.0) + (s // snapshot_every + 1) * (rates.backfill_snapshot or 0.0)
                 for s in basis_steps), 0.0)  # a float, nothing left included
    return {"training": train, "snapshots": snap, "basis": basis, "total": train + snap + basis}


def format_seconds(seconds: float) -> str:
    """``'1 h 41 min'``, ``'12 min'``, ``'40 s'``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class TimeLeft(Callback):
    """Print the estimate of :func:`time_left` every ``every_n_steps`` optimizer steps.

    Put it beside a :class:`~polca_lightning.POLCACallback` in the ``Trainer``'s callbacks;
    it reads that callback's tracker (its measured timings and schedule). A resumed run
    measures its rates again from the step it resumed at. The wall time, the CPU time (of
    every thread of the process) and the tracker's timings travel in the checkpoint (the
    callback's state), so :meth:`totals` gives a run spread over several processes its whole
    cost: the time up to the checkpoint each resumed from, plus the last process's.

    Args:
        every_n_steps: steps between two lines (a positive int).
        printer: where each line goes (default ``print`` with ``flush=True``).

    Raises:
        ValueError: ``every_n_steps`` not a positive int.

    Example:
        >>> TimeLeft(every_n_steps=250)  # doctest: +ELLIPSIS
        <polca_lightning.time_left.TimeLeft object at ...>
    """

    def __init__(self, every_n_steps: int = 250, printer=None):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps: expected a positive int, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.printer = printer or (lambda line: print(line, flush=True))
        self._start: tuple[float, int] | None = None  # wall clock and step when training (re)started
        self._session = None
        self._setup_clock: tuple[float, float] | None = None  # _clocks() when this process's fit began
        self._prior: dict = {"seconds": 0.0, "cpu_seconds": 0.0, "timings": {}}  # earlier processes', to the checkpoint

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._setup_clock = _clocks()

    def totals(self) -> dict:
        """``{"seconds": wall seconds of fit, "cpu_seconds": CPU seconds of fit (None when the
        run resumed from a checkpoint written without them), "timings": the tracker's timings
        by kind}``, over every process of the run up to now (a resumed run's earlier ones up to
        its checkpoint)."""
        timings = dict(self._prior["timings"])
        tracker = self._session.tracker if self._session is not None else None
        for name, value in (tracker.timings.items() if tracker is not None else ()):
            timings[name] = timings.get(name, 0.0) + value
        return {**_add_elapsed(self._prior, self._setup_clock), "timings": timings}

    def state_dict(self) -> dict:
        return self.totals()

    def load_state_dict(self, state_dict: dict) -> None:
        cpu = state_dict.get("cpu_seconds")  # absent from a checkpoint written before CPU time was kept
        self._prior = {"seconds": float(state_dict["seconds"]), "timings": dict(state_dict["timings"]),
                       "cpu_seconds": None if cpu is None else float(cpu)}

    def on_train_start(self, trainer, pl_module) -> None:
        from polca_lightning.callback import POLCACallback

        found = [c for c in trainer.callbacks if isinstance(c, POLCACallback)]
        self._session = found[0].session if found else None
        self._start = (time.perf_counter(), trainer.global_step)
        tracker = self._session.tracker if self._session is not None else None
        # what the tracker had done before: a resumed run's restored snapshots, the first snapshot
        self._before = (dict(tracker.timings), tracker.n_snapshots) if tracker is not None else ({}, 0)

    def rates(self, tracker, steps_done: int, elapsed: float) -> Rates:
        """The rates ``tracker`` measured since training (re)started: ``steps_done`` steps in
        ``elapsed`` seconds."""
        before, snapshots_before = self._before
        t = {name: v - before.get(name, 0.0) for name, v in tracker.timings.items() if name != "setup"}
        snapshots = tracker.n_snapshots - snapshots_before
        new_basis = [s for s in tracker.basis_steps if s > self._start[1]]
        backfilled = sum(s // tracker.config.snapshot_every + 1 for s in new_basis)
        return Rates(
            train_step=max(0.0, elapsed - sum(t.values())) / steps_done if steps_done else None,
            snapshot=(t.get("interval", 0.0) + t.get("snapshot", 0.0) + t.get("io", 0.0)) / snapshots if snapshots else None,
            eigensolve=t.get("eigensolve", 0.0) / len(new_basis) if new_basis else None,
            backfill_snapshot=t.get("backfill", 0.0) / backfilled if backfilled else None,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._start is None or step % self.every_n_steps or step == self._start[1] or not trainer.is_global_zero:
            return
        elapsed = time.perf_counter() - self._start[0]
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        line = f"step {step}/{max_steps} ({step / max_steps:.0%}) after {format_seconds(elapsed)}"
        tracker = self._session.tracker if self._session is not None else None
        if tracker is None:
            rate = elapsed / (step - self._start[1])
            self.printer(f"{line}: {rate:.2f} s/step; left: about {format_seconds(rate * (max_steps - step))}")
            return
        rates = self.rates(tracker, step - self._start[1], elapsed)
        c = tracker.config
        left = time_left(step, int(max_steps), snapshot_every=c.snapshot_every, basis_every=c.basis_every,
                         n_basis=tracker.n_basis, max_basis=c.max_basis, k=c.k, rates=rates)
        measured = [f"{name} {value:.2f} s/step" if name == "training" else f"{name} {value:.1f} s"
                    for name, value in (("training", rates.train_step), ("snapshots", rates.snapshot),
                                        ("eigensolves", rates.eigensolve), ("backfill a snapshot", rates.backfill_snapshot))
                    if value is not None]
        parts = ", ".join(f"{name} {format_seconds(left[name])}" for name in ("training", "snapshots", "basis")
                          if left[name] > 0)
        self.printer(f"{line}: {', '.join(measured)}; left: about {format_seconds(left['total'])}"
                     + (f" ({parts})" if parts else "") + ", then the work after training")


class Stopwatch:
    """The wall and CPU time (every thread of the process) of work that may span several
    processes, kept in the JSON file ``path`` and brought up to date every ``every`` seconds,
    so that a process killed mid-way loses at most that much of the count; the next process
    that enters a ``Stopwatch`` on the same file adds to it.

    Args:
        path: the JSON file (``{"seconds", "cpu_seconds", "processes"}``); created if absent.
        every: seconds between two writes (a positive number).

    Raises:
        ValueError: ``every`` not positive.

    Example:
        >>> import tempfile
        >>> with Stopwatch(Path(tempfile.mkdtemp()) / "time.json") as clock:
        ...     pass
        >>> clock.totals()["processes"]
        1
    """

    def __init__(self, path, every: float = 30.0):
        if not every > 0:
            raise ValueError(f"every: expected a positive number of seconds, got {every!r}")
        self.path, self.every = Path(path), float(every)
        self._prior = {"seconds": 0.0, "cpu_seconds": 0.0, "processes": 0}
        self._clocks: tuple[float, float] | None = None  # _clocks() when this process entered
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def totals(self) -> dict:
        """``{"seconds", "cpu_seconds", "processes"}`` over every process so far, this one included."""
        return {**_add_elapsed(self._prior, self._clocks),
                "processes": self._prior["processes"] + (self._clocks is not None)}

    def _write(self, totals: dict) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")  # a kill mid-write leaves the last whole file
        tmp.write_text(json.dumps(totals))
        os.replace(tmp, self.path)

    def _keep_writing(self) -> None:
        while not self._stop.wait(self.every):
            self._write(self.totals())

    def __enter__(self) -> "Stopwatch":
        if self.path.exists():
            prior = json.loads(self.path.read_text())
            self._prior = {k: type(v)(prior[k]) for k, v in self._prior.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clocks = _clocks()
        self._stop.clear()
        self._thread = threading.Thread(target=self._keep_writing, daemon=True, name="polca-stopwatch")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._prior, self._clocks = self.totals(), None
        self._write(self._prior)

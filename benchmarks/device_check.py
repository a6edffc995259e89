"""The CUDA checks and the paper's scale in one command: what a GPU machine runs first.

    python benchmarks/device_check.py                # on a machine with CUDA: at most 8 minutes
    python benchmarks/device_check.py --dry-run      # the same steps at toy size (CPU: about a minute)

Steps, in order, each timed and guarded (one that fails leaves the others):

1. ``host_basis``: directions in pinned host memory streamed to the GPU in chunks of rows
   (``DirectionalDerivatives``), host rows orthonormalised with their products on the GPU
   (``orthonormalize_rows``), and a ``Trainer.fit`` with ``basis_on_device=False``, against
   the same numbers on the CPU in float64.
2. ``precision_scopes``: ``compute_precision`` float32 (with TF32 switched on outside, as
   training scripts do), tf32 and bf16 on the GPU against the CPU in float64.
3. ``streamed_eigensolver``: two basis steps of ``projected_hessian_eigs`` with the Krylov
   vectors in pinned host memory and every product chunked, in float64 and float32,
   against the CPU in float64.
4. ``engine_passes``: on the example's ``--paper`` model (9.5M parameters) and probe set,
   both engines and ``auto`` at K = 1, 16, 50 in plain forward passes (per direction,
   per loss position) against the cost model's figures and the calibration; also one HVP,
   one eigensolve, a training step and a weight snapshot's write and read.
5. ``paper_run``: ``examples/arithmetic.py --paper``, trimmed (fewer steps, never under
   2,000; sparser snapshots; fewer probe problems) to what the time model built from step 4
   predicts will fit; it prints what it trimmed and why, then the appendix G table, and
   records the hidden-breakthrough fractions of the analysed store.

Every comparison's bound and the reason for it are in the JSON beside its value. The JSON
(``--out``) is rewritten as each step starts and ends, so a run cut short keeps what it
did; the script stops itself at ``--budget`` seconds. Without CUDA the GPU side is the CPU
and every step says ``"cuda_check": false``. Exit status 0 when every step is ok.
"""

import time

_START = time.perf_counter()

import argparse  # noqa: E402 (timed from the first line)
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("host_basis", "precision_scopes", "streamed_eigensolver", "engine_passes", "paper_run")
#: what the package needs (import names): a machine's Python that lacks one runs nothing
REQUIRED = ("torch", "numpy", "lightning", "torchmetrics", "zarr", "numcodecs", "xarray", "hdbscan", "sklearn",
            "scipy", "matplotlib", "tqdm")


def elapsed() -> float:
    return time.perf_counter() - _START


def _clean(x):
    """JSON-able: NaN and inf as null, numpy and torch scalars as numbers, tuples as lists."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


class Record:
    """``device_check.json``: rewritten whole (atomically) at every change."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data, self.lock = path, data, threading.Lock()
        self.current: str | None = None
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, timeout: float = -1) -> None:
        if not self.lock.acquire(timeout=timeout):
            return
        try:
            self.data["wall_s"] = elapsed()
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(_clean(self.data), indent=1))
            os.replace(tmp, self.path)
        finally:
            self.lock.release()

    def skip(self, name: str, why: str) -> None:
        self.data["steps"][name] |= {"status": "skipped", "error": why}
        self.write()

    def run(self, name: str, fn, *args):
        """Run step ``name``: its figures, status (failed on an exception or a check out of bounds), wall time."""
        import torch

        entry = self.data["steps"][name]
        entry |= {"status": "running", "started_s": elapsed()}
        self.current = name
        self.write()
        print(f"\n=== {name} ({elapsed():.0f} s) ===", flush=True)
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        figures = None
        try:
            figures = fn(*args)
            entry["figures"] = figures
            failed = [c["name"] for c in figures.get("checks", []) if not c["passed"]]
            entry["status"] = "failed" if failed else "ok"
            if failed:
                entry["error"] = f"{len(failed)} check(s) out of bounds: " + "; ".join(failed)
        except Exception as err:  # noqa: BLE001 - a step's failure is recorded, the next step runs
            entry |= {"status": "failed", "error": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc(limit=12)[-4000:]}
        entry["wall_s"] = time.perf_counter() - start
        if cuda:
            entry["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
        else:
            import resource

            entry["peak_rss_bytes_so_far"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.current = None
        self.write()
        print(f"=== {name}: {entry['status']} in {entry['wall_s']:.1f} s"
              + (f" ({entry['error']})" if entry.get("error") else ""), flush=True)
        return figures


def describe(device) -> dict:
    """The machine: torch, CUDA, the GPU."""
    import torch

    out = {"type": device.type, "cuda_check": device.type == "cuda", "torch": torch.__version__,
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "python": platform.python_version(),
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out |= {"gpu": p.name, "gpu_memory_bytes": p.total_memory, "capability": f"{p.major}.{p.minor}",
                "multiprocessors": p.multi_processor_count, "cudnn": torch.backends.cudnn.version(),
                "driver_memory_free_bytes": torch.cuda.mem_get_info(device)[0]}
    return out


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def watchdog(record: Record, deadline: float) -> None:
    """At ``deadline`` (seconds since start): record the running step as timed out and exit (status 124)."""
    def stop():
        time.sleep(max(0.0, deadline - elapsed()))
        name = record.current
        try:
            if name is not None:
                entry = record.data["steps"][name]
                entry |= {"status": "failed", "wall_s": elapsed() - entry.get("started_s", 0.0),
                          "error": f"timed out: the script's budget of {deadline:.0f} s ran out"}
            for entry in record.data["steps"].values():
                if entry["status"] == "pending":
                    entry |= {"status": "skipped", "error": "not reached: the script's budget ran out"}
            record.data["complete"] = False
            record.write(timeout=5)
        except Exception as err:  # noqa: BLE001 - the main thread changed the record meanwhile: exit all the same
            print(f"device_check: could not write {record.path} at the deadline ({err})", flush=True)
        print(f"\ndevice_check: the budget of {deadline:.0f} s ran out during {name}; {record.path} keeps the rest",
              flush=True)
        os._exit(124)

    threading.Thread(target=stop, daemon=True).start()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every step at toy size (on the CPU where CUDA is absent)")
    p.add_argument("--out", default="runs/device_check/device_check.json",
                   help="the JSON; the stores go in its folder (default %(default)s)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole script, its setup included (default 470; --dry-run 170)")
    p.add_argument("--device", default=None, help="torch device of the GPU side (default: cuda where available)")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 170.0 if args.dry_run else 470.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    record = Record(out, {"script": "benchmarks/device_check.py", "commit": commit(), "argv": sys.argv[1:],
                          "dry_run": args.dry_run, "budget_s": args.budget, "complete": False,
                          "steps": {name: {"status": "pending"} for name in STEPS}})
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    record.data["missing_packages"] = missing
    if missing:
        why = f"missing Python packages: {', '.join(missing)} (pip install -e . installs them)"
        print(f"device_check: {why}", flush=True)
        for name in STEPS:
            record.skip(name, why)
        return 2
    if importlib.util.find_spec("polca_lightning") is None:  # a checkout that is not installed
        sys.path.insert(0, str(ROOT))
    import torch

    import _device_costs
    import _device_steps

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dry_run:
        torch.set_num_threads(1)  # toy sizes: one thread is faster than two contended ones on a shared machine
    record.data["device"] = describe(device)
    print(f"device_check: {record.data['device']}", flush=True)
    if device.type != "cuda":
        print("device_check: no CUDA device: the GPU side of every comparison is the CPU (cuda_check false)")
    watchdog(record, args.budget)
    setting = _device_steps.Setting(device, _device_steps.DRY if args.dry_run else _device_steps.DEVICE, out.parent)
    record.run("host_basis", _device_steps.check_host_basis, setting)
    record.run("precision_scopes", _device_steps.check_precision, setting)
    record.run("streamed_eigensolver", _device_steps.check_eigensolver, setting)
    costs = record.run("engine_passes", _device_costs.measure_costs, setting)
    from _device_run import paper_run

    record.run("paper_run", paper_run, setting, (costs or {}).get("costs"), record, args.dry_run,
               _START + args.budget)
    record.data["complete"] = True
    record.write()
    print(f"\ndevice_check: {elapsed():.0f} s; " + ", ".join(f"{k} {v['status']}" for k, v in
                                                             record.data["steps"].items()) + f"; wrote {out}")
    return 0 if all(v["status"] == "ok" for v in record.data["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

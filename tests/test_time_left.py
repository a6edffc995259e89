"""The time-left estimate against a hand count of the work left on a schedule."""

import threading
import time

import pytest

from polca_lightning.time_left import Rates, TimeLeft, format_seconds, time_left


def test_time_left_counts_the_snapshots_and_basis_steps_left_on_the_schedule():
    r = Rates(train_step=0.5, snapshot=10.0, eigensolve=100.0, backfill_snapshot=2.0)
    # at step 250 of 1000, snapshots every 50 (300, 350, ..., 1000: 15 left), basis steps every 200
    # at the snapshots 400, 600, 800 while vectors are left (2 of 4 so far, k=1: 400 and 600),
    # each an eigensolve and a backfill over the 9 and 13 snapshots taken by then
    left = time_left(250, 1000, snapshot_every=50, basis_every=200, n_basis=2, max_basis=4, k=1, rates=r)
    assert left["training"] == pytest.approx(750 * 0.5)
    assert left["snapshots"] == pytest.approx(15 * 10.0)
    assert left["basis"] == pytest.approx(2 * 100.0 + (9 + 13) * 2.0)
    assert left["total"] == pytest.approx(left["training"] + left["snapshots"] + left["basis"])
    # k = 3 vectors a step: the 2 left need one basis step; none left: none
    assert time_left(250, 1000, snapshot_every=50, basis_every=200, n_basis=2, max_basis=4, k=3,
                     rates=r)["basis"] == pytest.approx(100.0 + 9 * 2.0)
    assert time_left(250, 1000, snapshot_every=50, basis_every=200, n_basis=4, max_basis=4, k=1,
                     rates=r)["basis"] == 0.0
    # what is not measured yet counts as nothing
    assert time_left(0, 100, snapshot_every=10, basis_every=50, n_basis=0, max_basis=2, k=1,
                     rates=Rates(None, None, None, None))["total"] == 0.0


def test_format_seconds_and_argument_checks():
    assert [format_seconds(s) for s in (12, 90, 3600 + 41 * 60)] == ["12 s", "2 min", "1 h 41 min"]
    with pytest.raises(ValueError, match="every_n_steps: expected a positive int, got 0"):
        TimeLeft(every_n_steps=0)
    clock = TimeLeft(10)
    state = {"seconds": 30.0, "cpu_seconds": 50.0, "timings": {"interval": 4.0}}
    clock.load_state_dict(state)  # a resumed run's earlier time
    assert clock.totals() == state
    # a checkpoint written before CPU time was kept: the run's CPU time is not known, even after setup
    clock.load_state_dict({"seconds": 30.0, "timings": {"interval": 4.0}})
    clock.setup(None, None, "fit")
    assert clock.totals()["cpu_seconds"] is None and clock.totals()["seconds"] >= 30.0


def test_totals_count_the_cpu_time_of_every_thread_and_carry_it_through_a_checkpoint():
    clock = TimeLeft(10)
    clock.setup(None, None, "fit")
    wall, cpu = time.perf_counter(), time.process_time()

    def spin():  # 0.3 s of CPU in this thread: the second thread's counts as the process's too
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass

    worker = threading.Thread(target=spin)
    worker.start()
    spin()
    worker.join()
    measured_cpu, measured_wall = time.process_time() - cpu, time.perf_counter() - wall
    totals = clock.totals()
    assert totals["cpu_seconds"] >= 0.6  # both threads' 0.3 s
    assert measured_cpu <= totals["cpu_seconds"] <= measured_cpu + 0.05
    assert measured_wall <= totals["seconds"] <= measured_wall + 0.05
    resumed = TimeLeft(10)
    resumed.load_state_dict(clock.state_dict())
    resumed.setup(None, None, "fit")
    assert resumed.totals()["cpu_seconds"] >= totals["cpu_seconds"]


def test_stopwatch_adds_up_processes_and_keeps_a_killed_ones_time(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys

    from polca_lightning.time_left import Stopwatch

    path = tmp_path / "time.json"
    # a process that spins for ever inside a Stopwatch writing every 0.1 s, killed after 1.5 s
    code = ("import sys, time\nfrom polca_lightning.time_left import Stopwatch\n"
            "with Stopwatch(sys.argv[1], every=0.1):\n    print('in', flush=True)\n    while True:\n        pass\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline() == b"in\n"
    start = time.perf_counter()
    time.sleep(1.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = json.loads(path.read_text())
    assert killed["processes"] == 1 and 1.0 < killed["seconds"] <= time.perf_counter() - start + 0.5
    assert 0 < killed["cpu_seconds"] <= killed["seconds"] + 0.5  # one busy thread
    with Stopwatch(path, every=60) as clock:  # the next process adds to it
        end = time.thread_time() + 0.2
        while time.thread_time() < end:
            pass
        assert clock.totals()["processes"] == 2
    after = json.loads(path.read_text())
    assert after["processes"] == 2 and after["cpu_seconds"] >= killed["cpu_seconds"] + 0.2
    assert after["seconds"] >= killed["seconds"] + 0.2 and after == clock.totals()
    with pytest.raises(ValueError, match="every: expected a positive number of seconds, got 0"):
        Stopwatch(path, every=0)

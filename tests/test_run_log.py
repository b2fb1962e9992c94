"""The run log's records: throughput, training time summed over resumes, peak memory, and the
cut back to the checkpoint's step on resume."""

import json
import subprocess
import sys
import time

import numpy as np

from dit_video.training.log import RunLog, peak_memory_mib


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def run_steps(log, steps, samples=4, pause=0.02):
    for step in steps:
        time.sleep(pause)
        log.step(step, samples, {"loss": 1.0 / step}, write=True)
    log.close()


def test_time_adds_up_over_a_resume_and_memory_is_the_process_peak(tmp_path):
    run_steps(RunLog(tmp_path, 0, 4, 0, tensorboard=False), [1, 2, 3, 4])
    first = records(tmp_path)
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    assert all(0 < a < b for a, b in zip([r["elapsed_s"] for r in first], [r["elapsed_s"] for r in first[1:]]))
    assert first[-1]["elapsed_s"] >= 4 * 0.02
    # 4 samples every ~0.02 s (plus the bookkeeping)
    assert 20 < np.median([r["samples_per_s"] for r in first]) <= 4 / 0.02 * 1.01
    assert 0 < first[-1]["peak_memory_mib"] <= peak_memory_mib()

    # resumed from the checkpoint of step 2: steps 3 and 4 are cut, the time goes on from step 2's
    run_steps(RunLog(tmp_path, 0, 4, 2, tensorboard=False), [3, 4])
    second = records(tmp_path)
    assert [r["step"] for r in second] == [1, 2, 3, 4] and second[:2] == first[:2]
    assert second[2]["elapsed_s"] > first[1]["elapsed_s"] and second[2]["elapsed_s"] < first[1]["elapsed_s"] + 1


def test_peak_memory_is_the_processs_own_and_follows_what_it_holds():
    """In a fresh process started by this one, made large on purpose: Linux hands a parent's peak
    on to its children (ru_maxrss), yet a training run started by the A/B command must report its
    own. Its peak starts near what it holds, and 256 MiB written to raise it by about that."""
    ballast = np.ones(512 * 2**20 // 8)  # 512 MiB resident here
    code = ("import numpy as np; from dit_video.system import resident_bytes; "
            "from dit_video.training.log import peak_memory_mib; resident = resident_bytes() / 2**20; "
            "before = peak_memory_mib(); big = np.ones(256 * 2**20 // 8); print(resident, before, peak_memory_mib())")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    resident, before, after = map(float, out.split())
    assert resident <= before < resident + 128 < resident + ballast[0] * 512  # its own, not this process's
    assert resident + 240 < after < before + 256 + 40


def test_other_ranks_write_nothing(tmp_path):
    run_steps(RunLog(tmp_path, 1, 2, 0, tensorboard=False), [1, 2])
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_record_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    run_steps(RunLog(tmp_path, 0, 4, 0, tensorboard=False), [1, 2, 3])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.9')  # killed in the middle of the append
    run_steps(RunLog(tmp_path, 0, 5, 3, tensorboard=False), [4, 5])
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4, 5]

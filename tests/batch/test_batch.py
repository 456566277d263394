"""``omnigen2 batch`` end to end on the official-tiny checkpoint: errors, parity with ``generate``, two processes
under ``accelerate launch``, a killed run resumed, and the Ray engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omnigen2.cli import main

from .conftest import GOOD, SAMPLING, one_thread, read_manifest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # see conftest: files compare bit for bit at one thread


def pngs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".manifest"))


def test_bad_records_are_reported_and_the_rest_complete(job):
    records, out, rc, _ = job
    assert rc == 1  # some records failed
    lines = read_manifest(out / "manifest.jsonl")
    *items, last = lines
    assert [x["line"] for x in items] == [f"{records}:{n}" for n in range(1, 11)]  # record order
    done = [x["id"] for x in items if x["status"] == "done"]
    assert done == GOOD and sorted(pngs(out)) == sorted(f"{i}.png" for i in GOOD)
    errors = {x["line"].rsplit(":", 1)[1]: x["error"] for x in items if x["status"] == "failed"}
    assert sorted(errors, key=int) == ["2", "5", "6", "7", "10"]
    assert "unknown field 'sed' (did you mean 'seed'?)" in errors["2"]
    assert "nowhere.png' does not exist" in errors["5"]
    assert "corrupt.png' is not a readable image" in errors["6"]
    assert '"height" must be >= 1, got 0' in errors["7"]
    assert "\"steps\" must be an integer or null, got the string '3'" in errors["10"]
    assert all(e.startswith(f"{records}:") for e in errors.values())
    t2i = items[0]
    assert t2i["file"] == "t2i.png" and t2i["seed"] == 1 and t2i["process"] == 0 and t2i["seconds"] > 0
    assert t2i["settings"]["steps"] == 2 and t2i["settings"]["prompt"] == "A red circle in the park."
    assert last["summary"]["done"] == 5 and last["summary"]["failed"] == 5 and last["summary"]["skipped"] == 0
    assert last["summary"]["images_per_second"] > 0 and leftovers(out) == []


def test_images_equal_generate(job, tmp_path, monkeypatch):
    """Same seed and settings: the same PNG file, byte for byte (pixels and the "parameters" chunk)."""
    records, out, _, model = job
    monkeypatch.chdir(records.parent)  # generate's -i paths are relative to where it runs, batch's to the records
    cases = {
        "edit": ["Make it blue.", "-i", "imgs/red.png", "--seed", "2"],
        "ic/two": ["Both together.", "-i", "imgs/red.png", "-i", "imgs/blue.png", "--seed", "3"],
        "dpm": ["A cat.", "--seed", "7", "--steps", "3", "--height", "32", "--scheduler", "dpmsolver++"],
    }
    cases["ic/two"] += ["--image-guidance", "2.0"]
    for rid, args in cases.items():
        path = tmp_path / f"{rid.replace('/', '_')}.png"
        with one_thread():
            assert main(["generate", "--model", model, *SAMPLING, "-o", str(path), *args]) == 0  # args win
        assert path.read_bytes() == (out / f"{rid}.png").read_bytes(), rid


@pytest.mark.slow
def test_two_processes_match_one(job, tmp_path):
    records, out, _, model = job
    out2 = tmp_path / "out2"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "omnigen2.cli"]
    cmd += ["batch", str(records), "-o", str(out2), "--model", model, *SAMPLING]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, check=False)
    assert (out2 / "manifest.jsonl").is_file(), r.stderr[-3000:]
    assert r.returncode == 1, r.stderr[-3000:]  # the bad records
    assert pngs(out2) == pngs(out)
    assert read_manifest(out2 / "manifest.jsonl", comparable=True) == read_manifest(out / "manifest.jsonl", True)
    lines = read_manifest(out2 / "manifest.jsonl")
    assert {x["process"] for x in lines if x.get("status") == "done"} == {0, 1}
    assert lines[-1]["summary"]["processes"] == 2 and leftovers(out2) == []
    assert r.stderr.count("omnigen2 batch: ") >= 5 and "5 done, 0 skipped, 5 failed" in r.stdout


@pytest.mark.slow
def test_killed_run_resumes_without_redoing(tmp_path, official_tiny):
    """SIGKILL a run after a few images (a stale temporary file too), run again: each image is generated once."""
    records = tmp_path / "records.jsonl"
    ids = [f"r{k:02d}" for k in range(9)]
    records.write_text("".join(json.dumps({"id": i, "prompt": "A cat.", "seed": k}) + "\n" for k, i in enumerate(ids)))
    out = tmp_path / "out"
    # 20 steps: about 0.5 s an image, so the kill lands with most of the job left
    args = ["batch", str(records), "-o", str(out), "--model", str(official_tiny / "checkpoint"), "--steps", "20"]
    args += ["--height", "64", "--width", "64"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "omnigen2.cli", *args],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    part = out / ".manifest.part-0.jsonl"
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if part.is_file() and part.read_text().count('"status": "done"') >= 2:
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"the run ended (status {proc.returncode}) or timed out before two images")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert 2 <= len(first) < len(ids)
    (out / f"{ids[-1]}.png.tmp").write_bytes(b"half an image")  # as a kill during a write leaves it
    rc = main(args)
    assert rc == 0
    lines = read_manifest(out / "manifest.jsonl")
    status = {x["id"]: x["status"] for x in lines[:-1]}
    assert status == {i: "skipped" if f"{i}.png" in first else "done" for i in ids}
    assert lines[-1]["summary"] | {"seconds": 0, "images_per_second": 0} == {
        "records": 9,
        "done": 9 - len(first),
        "skipped": len(first),
        "failed": 0,
        "seconds": 0,
        "images_per_second": 0,
        "processes": 1,
        "engine": "accelerate",
    }
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name in first} == first  # untouched
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i}.png" for i in ids] and leftovers(out) == []
    assert main(args) == 0  # a third run has nothing left to do
    assert read_manifest(out / "manifest.jsonl")[-1]["summary"]["skipped"] == 9


def test_changed_settings_are_not_mixed_with_old_outputs(job, tmp_path):
    """An output written with other settings is reported, not kept silently nor overwritten."""
    records, out, _, model = job
    copy = tmp_path / "out"
    copy.mkdir()
    (copy / "t2i.png").write_bytes((out / "t2i.png").read_bytes())
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"id": "t2i", "prompt": "A red circle in the park.", "seed": 9}) + "\n")
    assert main(["batch", str(one), "-o", str(copy), "--model", model, *SAMPLING]) == 1
    (line, _) = read_manifest(copy / "manifest.jsonl")
    assert "t2i.png exists with other settings (seed 1 there, 9 here)" in line["error"]
    assert (copy / "t2i.png").read_bytes() == (out / "t2i.png").read_bytes()


@pytest.mark.slow
def test_ray_engine_gives_the_same_files(job, tmp_path):
    pytest.importorskip("ray.data", reason="--engine ray needs the ray extra: pip install 'omnigen2[ray]'")
    records, out, _, model = job
    out3 = tmp_path / "out3"
    cmd = [sys.executable, "-m", "omnigen2.cli", "batch", str(records), "-o", str(out3), "--model", model]
    cmd += [*SAMPLING, "--engine", "ray", "--actors", "2"]
    env = {**ENV, "RAY_DISABLE_USAGE_STATS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, check=False)
    assert (out3 / "manifest.jsonl").is_file(), r.stderr[-3000:]
    assert pngs(out3) == pngs(out)
    assert read_manifest(out3 / "manifest.jsonl", comparable=True) == read_manifest(out / "manifest.jsonl", True)
    assert leftovers(out3) == []

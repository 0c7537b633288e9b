"""benchmarks/trace_summary.py: the union of kernel intervals against a brute-force count, and a
two-stream trace read back into busy, idle and overlapped time per step."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "trace_summary.py"


def load():
    spec = importlib.util.spec_from_file_location("trace_summary", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["trace_summary"] = module
    spec.loader.exec_module(module)
    return module


def test_union_length_matches_counting_covered_microseconds():
    ts = load()
    rng = random.Random(0)
    for _ in range(50):
        ivs = [(s, s + rng.randint(0, 20)) for s in (rng.randint(0, 100) for _ in range(rng.randint(0, 12)))]
        covered = {t for s, e in ivs for t in range(s, e)}
        assert ts.union_length([(float(s), float(e)) for s, e in ivs]) == len(covered)


def kernel(name, ts, dur, stream):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": stream}


def test_two_streams_read_back_per_step(tmp_path, capsys):
    # Two steps of 100 µs: stream 7 runs a GEMM 0-60 and a triton kernel 70-80; stream 9 a GEMM
    # 40-90. Busy 0-90 (90), idle 10, kernel time 120, overlapped 30 µs.
    events = [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500}]
    for step in range(2):
        t0 = 100 * step
        events += [kernel("nvjet_sm90_tst_128x128", t0, 60, 7), kernel("triton_poi_fused_add_0", t0 + 70, 10, 7),
                   kernel("cutlass_80_wmma", t0 + 40, 50, 9)]
    events.append(kernel("nvjet_sm90_tst_128x128", 190, 10, 7))  # closes the second step's span at 200
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert load().main([str(path), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "span   0.100 ms, GPU busy   0.095 ms, idle   0.005 ms, kernel time   0.125 ms (streams overlapped   0.030 ms)" in out
    assert "matmul" in out and "triton pointwise" in out
    assert "stream      7:" in out and "stream      9:" in out


def test_timeline_slices_the_first_step_per_stream(tmp_path, capsys):
    events = []
    for step in range(2):
        t0 = 100 * step
        events += [kernel("nvjet_gemm", t0, 60, 7), kernel("triton_poi_add", t0 + 70, 10, 7),
                   kernel("cutlass_wmma", t0 + 40, 50, 9)]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert load().main([str(path), "--steps", "2", "--timeline", "60"]) == 0
    rows = capsys.readouterr().out.split("timeline of the first step")[1].splitlines()
    assert "stream 7 (first kernel at 0 µs)" in rows[1] and "stream 9 (first kernel at 40 µs)" in rows[1]
    # A step spans 95 µs. Slice 0-60: the GEMM on stream 7, 20 µs of the other on 9. Slice 60-95
    # ends with the step: without the cut, the second step's GEMM (100-160) would fall in it.
    assert [r.split() for r in rows[2:]] == [["0", "|", "60", "nvjet_gemm", "|", "20", "cutlass_wmma"],
                                             ["60", "|", "10", "triton_poi_add", "|", "30", "cutlass_wmma"]]


def host(cat, name, ts, dur, tid=1):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}


def launch(ts, correlation):
    return {**host("cuda_runtime", "cudaLaunchKernel", ts, 1), "args": {"correlation": correlation}}


def launched(name, ts, dur, correlation):
    return {**kernel(name, ts, dur, 7), "args": {"correlation": correlation}}


def test_origins_name_the_ops_and_frames_around_each_launch(tmp_path, capsys):
    # step() calls loss() twice (each an aten::sum launching a reduction) and then a compiled
    # graph launching a triton kernel; a sibling span that ended before a launch must not count.
    events = [host("python_function", "gpu_bench.py(230): step", 0, 100),
              host("python_function", "loss.py(40): contrastive_loss", 5, 30),
              host("cpu_op", "aten::sum", 10, 5), launch(11, 1),
              host("cpu_op", "aten::mul", 16, 2),
              host("cpu_op", "aten::sum", 20, 5), launch(21, 2),
              host("cpu_op", "CompiledFunction", 40, 30), launch(50, 3),
              launch(90, 4),
              launched("reduce_kernel<128, 4>", 200, 20, 1), launched("reduce_kernel<128, 4>", 230, 30, 2),
              launched("triton_red_fused_sum_0", 300, 7, 3), launched("reduce_kernel<512, 1>", 320, 4, 4),
              launched("reduce_kernel<128, 4>", 400, 9, 99)]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert load().main([str(path), "--origins", "reduce_kernel|triton_red", "--depth", "3"]) == 0
    out = capsys.readouterr().out.split("by where they were launched")[1].splitlines()[1:]
    assert [r.split(None, 2) for r in out] == [
        ["0.050", "ms", "2  gpu_bench.py(230): step > loss.py(40): contrastive_loss > aten::sum"],
        ["0.009", "ms", "1  (its launch is not in the trace)"],
        ["0.007", "ms", "1  gpu_bench.py(230): step > CompiledFunction"],
        ["0.004", "ms", "1  gpu_bench.py(230): step"]]


def test_a_bad_origins_pattern_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": [kernel("k", 0, 1, 7)]}))
    with pytest.raises(SystemExit):
        load().main([str(path), "--origins", "reduce_kernel<(128"])
    assert "--origins" in capsys.readouterr().err


def test_by_grid_ranks_one_kernel_per_shape(tmp_path, capsys):
    # One Triton kernel at two grids (the graph's attention and BERT's): by name it is one line of
    # 3 calls; by grid two lines, the larger grid's 2 calls first.
    events = [{**kernel("_forward", t, d, 7), "args": {"grid": g, "block": [128, 1, 1]}}
              for t, d, g in ((0, 30, [3072, 1, 1]), (40, 30, [3072, 1, 1]), (80, 5, [1536, 1, 1]))]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert load().main([str(path), "--by-grid"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if "_forward" in line]
    assert lines == [["0.060", "ms", "2", "30.0", "_forward", "grid=3072x1x1"],
                     ["0.005", "ms", "1", "5.0", "_forward", "grid=1536x1x1"]]
    assert load().main([str(path)]) == 0
    assert [line.split()[-1] for line in capsys.readouterr().out.splitlines() if "_forward" in line] == ["_forward"]


def replayed(name, ts, dur, stream, correlation):
    return {**kernel(name, ts, dur, stream), "args": {"correlation": correlation}}


def test_per_step_reads_each_graph_replay_by_its_launch(tmp_path, capsys):
    # Two replays of 100 µs (correlations 5 and 8), each after a copy of its own (4 and 7). In the
    # second, stream 9 starts 30 µs late; the first starts 10 µs after the copy before it.
    events = [replayed("Memcpy DtoD", 0, 5, 7, 4), replayed("nvjet_gemm", 10, 60, 7, 5),
              replayed("triton_poi_add", 80, 30, 7, 5), replayed("cutlass_wmma", 10, 40, 9, 5),
              replayed("Memcpy DtoD", 115, 5, 7, 7), replayed("nvjet_gemm", 120, 100, 7, 8),
              replayed("cutlass_wmma", 150, 20, 9, 8), replayed("cutlass_wmma", 160, 30, 9, 8)]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert load().main([str(path), "--steps", "2", "--per-step"]) == 0
    rows = capsys.readouterr().out.split("per step (")[1].splitlines()[1:]
    assert [r.split() for r in rows] == [
        ["1", "|", "|", "stream", "7", "0..", "100", "(", "90)", "|", "stream", "9", "0..", "40", "(", "40)", "|",
         "100"],
        ["2", "|", "10", "|", "stream", "7", "0..", "100", "(", "100)", "|", "stream", "9", "30..", "70", "(", "40)",
         "|", "100"]]


def test_per_step_without_graph_replays_is_an_error(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": [kernel("nvjet_gemm", 0, 10, 7)]}))
    with pytest.raises(SystemExit, match="fewer than 2 graph replays"):
        load().main([str(path), "--steps", "2", "--per-step"])

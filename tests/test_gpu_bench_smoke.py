"""benchmarks/gpu_bench.py on a CPU with tiny shapes: the eager fp32 and bf16w steps run and
report their batch; an unknown variant name is an error; gpu_suite.sh ab runs rows in turn.
Compile and CUDA-graph modes need a GPU."""

from __future__ import annotations

import dataclasses
import json
import sys
import tarfile

import pytest
from bench_helpers import BENCHMARKS, load_script, record_flat_adamw

BENCH = BENCHMARKS / "gpu_bench.py"


def load_bench():
    return load_script("gpu_bench")


TINY = dict(batch=4, regions=6, region_dim=32, grid=(3, 3), grid_dim=32, width=32, vocab=200)


def tiny_bench(bench, variant: str = "full-bigru-fp32", **shape):
    """The row ``variant`` on the CPU at tiny shapes, ``shape`` overriding Shape's fields."""
    v = next(v for v in bench.variants() if v.name == variant)
    return bench.build_bench(v, bench.Shape(**TINY, **shape), bench.torch.device("cpu"), None, tiny=True)


def test_variant_names_cover_every_precision_and_mode():
    names = {v.name for v in load_bench().variants()}
    for prec in ("fp32", "bf16", "bf16w"):
        for suffix in ("", "-default", "-graph", "-compile-graph", "-autotune-graph"):
            assert f"full-bert-{prec}{suffix}" in names


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_tiny_cpu_fp32_and_bf16w_steps(tmp_path, attention):
    out = tmp_path / "bench.json"
    only = "full-bigru-fp32,region-gpo-bigru-bf16w"
    argv = ["--device", "cpu", "--tiny", "--no-eval", "--iters", "2", "--warmup", "1", "--batch", "6",
            "--attention", attention]
    assert load_bench().main([*argv, "--only", only, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == only.split(",")
    for r in rows:
        assert "error" not in r, r
        assert r["batch"] == 6 and r["pairs_per_s"] > 0
    assert [r["precision"] for r in rows] == ["fp32", "bf16w"]
    assert json.loads(out.read_text())["shape"]["attention"] == attention


def test_passes_report_each_pass_median(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--tiny", "--no-eval", "--iters", "2", "--passes", "3", "--warmup", "1", "--batch", "4",
            "--only", "full-bigru-fp32", "--out", str(out)]
    assert load_bench().main(argv) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert len(row["step_ms_passes"]) == 3 and all(ms > 0 for ms in row["step_ms_passes"])
    assert min(row["step_ms_passes"]) <= row["step_ms"] <= max(row["step_ms_passes"])


def test_sm_carveout_and_blas_library_are_set_and_recorded(tmp_path):
    """cuBLAS, not cuBLASLt: a CPU build of torch refuses the latter."""
    bench = load_bench()
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--tiny", "--no-eval", "--iters", "1", "--warmup", "1", "--batch", "4",
            "--only", "full-bigru-fp32", "--sm-carveout", "16", "--blas", "cublas", "--out", str(out)]
    library = bench.torch.backends.cuda.preferred_blas_library()
    try:
        assert bench.main(argv) == 0
        assert bench.torch.backends.cuda.preferred_blas_library() == bench.torch._C._BlasBackend.Cublas
    finally:
        bench.torch._C._set_sm_carveout_experimental(None)
        bench.torch.backends.cuda.preferred_blas_library(library)
    assert json.loads(out.read_text())["sm_carveout"] == 16


def test_passes_below_one_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        load_bench().main(["--device", "cpu", "--tiny", "--no-eval", "--passes", "0"])
    assert exc.value.code == 2
    assert "--passes 0: at least 1" in capsys.readouterr().err


def test_unknown_variant_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        load_bench().main(["--device", "cpu", "--tiny", "--no-eval", "--only", "full-bigru-fp32,no-such-variant"])
    assert exc.value.code == 2
    assert "no-such-variant" in capsys.readouterr().err


def test_bad_inductor_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        load_bench().main(["--device", "cpu", "--tiny", "--no-eval", "--inductor", "no_such_option=1"])
    assert exc.value.code == 2
    assert "--inductor no_such_option=1" in capsys.readouterr().err


def test_image_inductor_options_reach_the_image_towers_compile_alone(monkeypatch, capsys):
    bench = load_bench()
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cpu", "--tiny", "--no-eval", "--image-inductor", "triton.no_such_option=1"])
    assert exc.value.code == 2 and "--image-inductor triton.no_such_option=1" in capsys.readouterr().err
    compiled = []
    monkeypatch.setattr(bench.torch, "compile", lambda fn, options: compiled.append((fn.__name__, options)) or fn)
    tiny_bench(bench, "full-bigru-fp32-default", image_inductor=(("triton.mix_order_reduction", False),))
    options = dict(compiled)
    assert options["images"]["triton.mix_order_reduction"] is False
    assert "triton.mix_order_reduction" not in options["captions"]


def run_with_launch(bench, tmp_path, capsys, flag: str, good: str, bad: tuple[str, ...]):
    """Each ``bad`` value of ``flag`` is a usage error naming it; a row then runs with ``good``.
    Returns the row's JSON file."""
    for value in bad:
        with pytest.raises(SystemExit) as exc:
            bench.main(["--device", "cpu", "--tiny", "--no-eval", flag, value])
        assert exc.value.code == 2 and f"{flag} {value}" in capsys.readouterr().err
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--tiny", "--no-eval", "--iters", "1", "--warmup", "1", "--batch", "4",
            "--only", "full-bigru-fp32", flag, good, "--out", str(out)]
    assert bench.main(argv) == 0
    return out


def test_attention_launch_options_are_set_and_recorded(tmp_path, monkeypatch, capsys):
    pytest.importorskip("triton")
    from rgfusion.trainer.model import _triton_attention_kernels as kernels

    bench = load_bench()
    monkeypatch.setattr(kernels, "LAUNCH", kernels.Launch())  # restored after the test
    out = run_with_launch(bench, tmp_path, capsys, "--attention-launch", "forward_keys=32",
                          bad=("no_such_option=1", "forward_keys=lots"))
    assert kernels.LAUNCH.forward_keys == 32
    assert json.loads(out.read_text())["attention_launch"]["forward_keys"] == 32


def test_geometry_launch_options_are_set_and_recorded(tmp_path, monkeypatch, capsys):
    pytest.importorskip("triton")
    from rgfusion.trainer.model import _triton_geometry_kernels as kernels

    bench = load_bench()
    monkeypatch.setattr(kernels, "LAUNCH", dict(kernels.LAUNCH))  # restored after the test
    out = run_with_launch(bench, tmp_path, capsys, "--geometry-launch", "backward=4x8x2",
                          bad=("sideways=8x4x3", "backward=8x4", "forward=eightx4x3"))
    assert kernels.LAUNCH["backward"] == kernels.Launch(rows=4, num_warps=8, num_stages=2)
    recorded = json.loads(out.read_text())["geometry_launch"]
    assert recorded["backward"] == {"rows": 4, "num_warps": 8, "num_stages": 2}
    assert recorded["forward"] == dataclasses.asdict(kernels.LAUNCH["forward"])


def test_profile_writes_a_gzipped_chrome_trace(tmp_path):
    import gzip

    trace = tmp_path / "t.json.gz"
    argv = ["--device", "cpu", "--tiny", "--no-eval", "--iters", "1", "--warmup", "1", "--batch", "4",
            "--only", "full-bigru-fp32", "--profile", "full-bigru-fp32", "--trace", str(trace)]
    assert load_bench().main(argv) == 0
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)


@pytest.mark.parametrize("towers", ["image", "text"])
def test_one_tower_row_trains_that_tower_and_counts_its_flops(towers):
    bench = load_bench()
    shape = bench.Shape(**TINY, towers=towers)
    built = tiny_bench(bench, towers=towers)
    before = {n: p.detach().clone() for n, p in built.model.named_parameters()}
    built.step(built.batches[0])
    moved = {n.split(".")[0] for n, p in built.model.named_parameters() if not bench.torch.equal(p, before[n])}
    assert moved == {towers}
    full = bench.row_flops(built, bench.dataclasses.replace(shape, towers="both"))
    assert 0 < bench.row_flops(built, shape) < full


def test_side_tower_image_gives_each_tower_its_own_embeddings():
    """On the CPU no stream is made, but the towers swap places in ``beside``: each embedding must
    still come back as its own."""
    bench = load_bench()
    embedded = []
    for side in ("caption", "image"):
        built = tiny_bench(bench, side_streams=True, side_tower=side)
        built.model.eval()  # no dropout: both see the same function
        embedded.append(built.step.embed(built.batches[0]))
    (img, cap), (img_swapped, cap_swapped) = embedded
    assert not bench.torch.allclose(img, cap)
    bench.torch.testing.assert_close(img_swapped, img)
    bench.torch.testing.assert_close(cap_swapped, cap)


def test_geometry_per_layer_gives_the_one_pass_biases(monkeypatch):
    """``--geometry per-layer`` (one kernel call per graph layer) against the default one pass for
    all layers, through Triton's interpreter: the same image embeddings."""
    pytest.importorskip("triton")
    from rgfusion.trainer.model import image

    bench = load_bench()
    monkeypatch.setattr(image, "edge_biases", image.edge_biases)  # restored after the test
    built = tiny_bench(bench, attention="triton")
    built.model.eval()
    b = built.batches[0]
    with bench.torch.no_grad():
        embed = lambda: built.model.embed_images(b["regions"], b["boxes"], b["region_mask"], b["grids"])  # noqa: E731
        one_pass = embed()
        bench.geometry_per_layer()
        assert image.edge_biases.__name__ == "per_layer"
        bench.torch.testing.assert_close(embed(), one_pass, atol=1e-6, rtol=1e-5)


def test_suite_ab_runs_each_named_row_twice_in_turn(tmp_path):
    # gpu_suite.sh ab with a tiny CPU row in place of the GPU one (AB_ROW).
    import os
    import subprocess

    suite = BENCH.parent / "gpu_suite.sh"
    row = f"{sys.executable} {BENCH} --device cpu --tiny --no-eval --iters 1 --warmup 1 --batch 4 --only full-bigru-fp32"
    env = {**os.environ, "OUT": str(tmp_path), "AB_ROW": row, "AB": "plain:;math:RGF_ROW=math --attention math"}
    subprocess.run(["bash", str(suite), "ab"], env=env, check=True, capture_output=True, timeout=600)
    with tarfile.open(tmp_path / "suite.tgz") as tar:  # past 8 files the suite packs them
        lines = tar.extractfile("ab.txt").read().decode().splitlines()
    assert [line.split(":")[0] for line in lines] == ["plain, pass 1", "math, pass 1", "plain, pass 2", "math, pass 2"]
    assert all('"step_ms":' in line and "error" not in line for line in lines)
    del env["AB"]
    missing = subprocess.run(["bash", str(suite), "ab"], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and 'AB="name:flags;name:flags"' in missing.stderr


def test_ffn_bench_reads_tiles_and_names_a_bad_one(capsys):
    """ffn_bench.py --tiles (the timing itself needs a GPU: tests/test_gpu.py)."""
    pytest.importorskip("triton")
    ffn_bench = load_script("ffn_bench")
    assert ffn_bench.tile("32x256x8") == ffn_bench.gelu.Launch(block_m=32, block_n=256, num_warps=8)
    for bad in ("32x256", "ax128x4"):
        with pytest.raises(ffn_bench.argparse.ArgumentTypeError, match=f"'{bad}': a tile is ROWSxCOLUMNSxWARPS"):
            ffn_bench.tile(bad)


def test_pipelined_update_steps_as_the_staged_end_of_step_one():
    """``--update pipelined`` against ``--update staged`` (its buffers' layout, updated at each
    step's end) on the bf16w row, through Triton's interpreter: the same losses, step by step."""
    pytest.importorskip("triton")
    bench = load_bench()
    losses = []
    for update in ("staged", "pipelined"):
        built = tiny_bench(bench, "full-bigru-bf16w", update=update, update_stages=3)
        losses.append([float(built.step(built.batches[i % 3])) for i in range(4)])
    assert losses[0] == losses[1] and len(set(losses[0])) == 4


def test_bf16_moments_reach_the_bf16w_rows_optimizer(monkeypatch):
    bench = load_bench()
    made = record_flat_adamw(bench, monkeypatch)
    built = tiny_bench(bench, "full-bigru-bf16w", moments="bf16")
    losses = [float(built.step(built.batches[i % 3])) for i in range(3)]
    (opt,) = made
    assert all(s["exp_avg_sq"].dtype == bench.torch.bfloat16 and s["step"] == 3 for s in opt.state.values())
    assert len(set(losses)) == 3

"""The benchmark suite's plumbing: bench_end_to_end, bench_scaling and bench_solvers at tiny sizes (--smoke) into a
temporary results directory (PYDIFFMED_BENCH_RESULTS, so benchmarks/results is never written), their JSON rows,
and results_md rendering RESULTS.md (tables, plots) and README's benchmarks block from them. No timing is
asserted: the rows' ratios are checked against the rows' own times."""
from __future__ import annotations

import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_script(script, args, results_dir, timeout=600):
    env = dict(os.environ, PYDIFFMED_BENCH_RESULTS=str(results_dir))
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def load(results_dir, name):
    with open(os.path.join(results_dir, f"{name}_cpu.json")) as f:
        return json.load(f)


def tiny_v_prediction_model(path):
    """A small UNet3D saved as a pydiffmed model like the demo one: cosine schedule, v-prediction, 8³."""
    from pydiffmed.models import UNet3D
    from pydiffmed.modelfile import save_model

    model = UNet3D(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, True),
                   num_res_blocks=1, num_head_channels=(0, 16), norm_num_groups=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # non-zero everywhere (zero-initialised output convs would hide errors)
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise / p[0].numel() ** 0.5 if p.ndim >= 2 else 1.0 + 0.1 * noise)
    save_model(path, model, {"name": "tinydemo", "prediction_type": "v_prediction", "clip_sample": 1.0,
                             "schedule": {"kind": "discrete", "num_train_timesteps": 1000, "beta_schedule": "cosine"},
                             "volume_shape": [8, 8, 8]})
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every smoke run writes into this one directory (as the suite writes into benchmarks/results)."""
    out = tmp_path_factory.mktemp("bench_results")
    model = tiny_v_prediction_model(str(tmp_path_factory.mktemp("models") / "tinydemo"))
    run_script("bench_end_to_end.py", ["--smoke", "--threads", "1", "--model", model], out)
    run_script("bench_scaling.py", ["--smoke", "--threads", "1"], out)
    run_script("bench_demo_quality.py", ["--smoke", "--model", model], out)
    run_script("bench_solvers.py", ["--quick", "--side", "2", "--samples", "40", "--solvers", "ddim,dpmpp_2m"], out)
    return out


def test_end_to_end_rows(results):
    res = load(results, "bench_end_to_end")
    assert "--smoke" in res["command"] and res["name"] == "bench_end_to_end"
    rows = res["rows"]
    assert {r["model"] for r in rows} >= {"tinydemo", "small", "Gaussian mixture (exact denoiser)"}
    gmm = {r["variant"]: r["gmm_sw2"] for r in rows if r["model"].startswith("Gaussian")}
    assert set(gmm) == {"ddpm 1000 steps", "dpmpp_2m 20 steps", "floor (exact vs exact)"}
    assert all(math.isfinite(v) and v > 0 for v in gmm.values())
    for model in ("tinydemo", "small"):
        ddim = {r["variant"]: r for r in rows if r["model"] == model and r["case"] == "DDIM 20 steps"}
        monai = ddim["MONAI fp32 (DiffusionInferer + DDIMScheduler)"]
        fp32 = ddim["pydiffmed fp32, state fp32"]
        best = ddim["pydiffmed bf16, state fp32"]
        assert monai["speedup_vs_MONAI"] == 1.0 and monai["steps"] == 20 == fp32["steps"]
        for row in (fp32, best):
            assert row["ms"] > 0
            assert row["speedup_vs_MONAI"] == pytest.approx(monai["ms"] / row["ms"])
            assert row["ms_per_eval"] == pytest.approx(row["ms"] / 20)
        # same weights, same noise, same sampler: fp32 pydiffmed reproduces MONAI's volume
        assert fp32["max_abs_diff_vs_MONAI"] <= 1e-4 * max(1.0, fp32["MONAI_max_abs"])
        assert math.isfinite(best["max_abs_diff_vs_MONAI"])
        gain = {r["variant"]: r for r in rows if r["model"] == model and r["case"].startswith("MONAI DDPM 1000")}
        ddpm = gain["MONAI fp32 (DiffusionInferer + DDPMScheduler)"]
        dpm = gain["pydiffmed bf16 dpmpp_2m, state fp32"]
        assert ddpm["steps"] == 1000 and "extrapolated ×1000/2 from 2 timed steps" in ddpm["note"]
        assert ddpm["ms"] == pytest.approx(ddpm["ms_per_eval"] * 1000)
        assert dpm["speedup_vs_MONAI"] == pytest.approx(ddpm["ms"] / dpm["ms"])
        assert ddpm["gmm_sw2"] == gmm["ddpm 1000 steps"] and dpm["gmm_sw2"] == gmm["dpmpp_2m 20 steps"]
    demo_note = next(r["note"] for r in rows if r["model"] == "tinydemo" and r["variant"].startswith("MONAI fp32 (D"))
    assert "v_prediction" in demo_note and "cosine" in demo_note


def test_end_to_end_reports_an_unloadable_model_as_skipped(tmp_path):
    missing = str(tmp_path / "no_such_model")
    out = tmp_path / "results"
    run_script("bench_end_to_end.py", ["--smoke", "--threads", "1", "--only", "demo", "--model", missing], out)
    rows = load(out, "bench_end_to_end")["rows"]
    skipped = [r for r in rows if r["case"] == "skipped"]
    assert len(skipped) == 1 and skipped[0]["model"] == "demo" and missing in skipped[0]["note"]
    assert not [r for r in rows if r["case"].startswith("DDIM")]
    assert len([r for r in rows if r["model"].startswith("Gaussian")]) == 3


def test_scaling_rows_and_plot(results):
    res = load(results, "bench_scaling")
    rows = res["rows"]
    points = {(r["impl"], r["volume"], r["batch"]) for r in rows}
    assert points == {(impl, v, b) for impl in ("pydiffmed", "MONAI") for v, b in (("8³", 1), ("16³", 1), ("8³", 2))}
    for r in rows:
        assert "note" not in r, r
        assert r["ms"] > 0 and r["runs"] >= 1 and r["voxels"] == r["batch"] * int(r["volume"][:-1]) ** 3
        assert r["peak_MB"] > 0 and r["est_activations_MB"] > 0 and r["est_total_MB"] > r["est_activations_MB"]
        assert r["memory_method"].startswith(("VmHWM", "ru_maxrss"))
        if r["impl"] == "pydiffmed":
            monai = next(m for m in rows if m["impl"] == "MONAI" and m["volume"] == r["volume"]
                         and m["batch"] == r["batch"])
            assert r["speedup_vs_MONAI"] == pytest.approx(monai["ms"] / r["ms"])
            assert r["memory_vs_MONAI"] == pytest.approx(r["peak_MB"] / monai["peak_MB"])
    for impl in ("pydiffmed", "MONAI"):
        peak = {r["volume"]: r["peak_MB"] for r in rows if r["impl"] == impl and r["batch"] == 1}
        assert peak["16³"] > peak["8³"], f"{impl}: 8× the voxels must need more memory: {peak}"
    with open(os.path.join(results, "bench_scaling_cpu.png"), "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_solvers_writes_its_plot(results):
    rows = load(results, "bench_solvers")["rows"]
    assert {r["solver"] for r in rows} == {"floor (exact vs exact)", "ddim", "dpmpp_2m"}
    assert all("flow_err" in r for r in rows if r["nfe"] > 0)  # both deterministic: compared with the exact flow
    with open(os.path.join(results, "bench_solvers_cpu.png"), "rb") as f:
        assert f.read(8) == PNG_MAGIC


def _write_result(results_dir, name, rows, columns):
    machine = {"cpu": "test cpu", "threads": 2, "torch": torch.__version__, "date": "2026-01-01", "commit": "abc"}
    with open(os.path.join(results_dir, f"{name}_cpu.json"), "w") as f:
        json.dump({"name": name, "command": f"python benchmarks/{name}.py --quick", "machine": machine,
                   "columns": columns, "rows": rows, "notes": ""}, f)


def _table_cells(line):
    """Cells of a markdown table line, honouring \\| escapes."""
    return line.replace("\\|", "").count("|") - 1


def test_results_md_renders_tables_plots_and_readme_block(results, tmp_path):
    sys.path.insert(0, BENCH)
    try:
        results_md = importlib.import_module("results_md")
    finally:
        sys.path.remove(BENCH)
    smoke_results = results
    results = tmp_path / "results"
    shutil.copytree(smoke_results, results)
    gn = [{"shape": "1×64×32³", "G": 32, "dtype": dt, "layout": "contiguous", "backend": be, "speedup": s}
          for dt, be, s in (("float32", "cpu", 1.5), ("float32", "torch", 1.0), ("bfloat16", "cpu", 3.25),
                            ("bfloat16", "triton", 2.0))]
    _write_result(results, "bench_group_norm", gn, ["shape", "G", "dtype", "layout", "backend", "speedup"])
    unet = [{"config": "small", "volume": "32³", "variant": v, "ms": ms, "MONAI_fp32_ms": 800.0, "speedup": 800 / ms}
            for v, ms in (("MONAI fp32", 800.0), ("UNet3D fp32", 400.0), ("UNet3D bf16", 160.0))]
    _write_result(results, "bench_unet", unet, ["config", "volume", "variant", "ms", "speedup"])

    readme = tmp_path / "README.md"
    before, after = "# project\n\n## Benchmarks\n\ntext before\n\n", "\n\n## Next\n\ntext after\n"
    readme.write_text(before + results_md.BEGIN + "\nstale numbers\n" + results_md.END + after)
    out = tmp_path / "RESULTS.md"
    results_md.main(["--results-dir", str(results), "--out", str(out), "--readme", str(readme)])

    text = out.read_text()
    for name in ("bench_end_to_end", "bench_scaling", "bench_solvers", "bench_group_norm", "bench_unet"):
        assert f"## {name} ({name}_cpu.json)" in text
    assert "`python benchmarks/bench_scaling.py --smoke --threads 1`" in text
    links = [line[line.index("](") + 2:-1] for line in text.splitlines() if line.startswith("![")]
    assert sorted(os.path.basename(link) for link in links) == ["bench_scaling_cpu.png", "bench_solvers_cpu.png"]
    assert all((tmp_path / link).resolve().exists() for link in links)  # relative to RESULTS.md

    new = readme.read_text()
    assert new.startswith(before) and new.endswith(after) and "stale numbers" not in new
    block = new[new.index(results_md.BEGIN):new.index(results_md.END)]
    table = [line for line in block.splitlines() if line.startswith("|")]
    assert all(_table_cells(line) == 4 for line in table), table
    by_subject = {line.split(" | ")[0][2:]: line for line in table[2:]}
    gn_line = by_subject["GroupNorm, fastest pydiffmed backend vs torch eager"]
    assert "×1.50 (worst: 1×64×32³ G=32 float32 contiguous (cpu))" in gn_line
    assert "×3.25 (best: 1×64×32³ G=32 bfloat16 contiguous (cpu)) over 2 cases" in gn_line
    assert "`python benchmarks/bench_group_norm.py --quick`" in gn_line
    assert "small 32³: ×5.00 (UNet3D bf16, 160 ms vs 800 ms)" in by_subject[
        "UNet forward: UNet3D vs MONAI DiffusionModelUNet fp32"]

    e2e = {r["variant"]: r for r in load(results, "bench_end_to_end")["rows"] if r["model"] == "small"}
    ddim_line = next(v for k, v in by_subject.items() if k.startswith("Sampling, DDIM 20 steps"))
    assert f"small 8³: {results_md._x(e2e['pydiffmed bf16, state fp32']['speedup_vs_MONAI'])}" in ddim_line
    gain_line = next(v for k, v in by_subject.items() if k.startswith("What a user gains"))
    assert "Gaussian-mixture sliced W2" in gain_line and "--smoke" in gain_line
    assert any(k.startswith("Forward time vs volume") for k in by_subject)
    quality = {r["volumes"]: r for r in load(results, "bench_demo_quality")["rows"]}
    assert sorted(quality) == ["2 clipped Gaussian noise", "2 demo samples", "2 fresh phantoms (floor)",
                               "2 untrained network, same sampler"]
    assert quality["2 clipped Gaussian noise"]["vs_noise_histogram"] == 1.0
    quality_line = next(v for k, v in by_subject.items() if k.startswith("Demo model sample quality"))
    floor = quality["2 fresh phantoms (floor)"]
    assert f"fresh phantoms (floor): {floor['histogram_W1']:.3g} / {floor['fractions_L1']:.3g}" in quality_line

    # without the markers README is left as it is
    plain = tmp_path / "plain.md"
    plain.write_text("no markers here\n")
    assert results_md.update_readme(str(plain), results_md.load_results(str(results))) is False
    assert plain.read_text() == "no markers here\n"


def test_the_tests_never_wrote_into_benchmarks_results():
    for name in ("bench_end_to_end", "bench_scaling", "bench_solvers", "bench_decode", "bench_inferer",
                 "bench_distributed", "bench_inverse"):
        path = os.path.join(BENCH, "results", f"{name}_cpu.json")
        if os.path.exists(path):
            with open(path) as f:
                assert "--smoke" not in json.load(f).get("command", ""), path


def test_determinism_rows(tmp_path):
    run_script("bench_determinism.py", ["--size", "8", "--batch", "2", "--steps", "1", "--repeats", "1"], tmp_path)
    rows = load(tmp_path, "bench_determinism")["rows"]
    assert [r["dtype"] for r in rows] == ["fp32", "fp32", "bf16", "bf16"]
    for r in rows:
        assert r["ms"] > 0 and r["baseline_ms"] > 0 and r["cost"] == pytest.approx(r["ms"] / r["baseline_ms"])


def test_decode_rows(tmp_path):
    run_script("bench_decode.py", ["--smoke", "--size", "16"], tmp_path)
    assert not (tmp_path / "bench_decode_cpu.json").exists()  # an explicit size keeps its own results file
    rows = load(tmp_path, "bench_decode_16")["rows"]
    assert [(r["network"], r["dtype"]) for r in rows] == [("MONAI", "fp32")] * 5 + [("MONAI", "bf16")] * 5 + \
        [("MAISI", "fp32")] * 4 + [("MAISI", "bf16")] * 4
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["peak_MB"] >= 0 and r["time_ratio"] > 0
    exact = [r for r in rows if r["dtype"] == "fp32" and r["variant"].startswith(("pydiffmed", "MAISI num_splits"))]
    assert len(exact) == 5 and all(r["max_abs_diff"] < 1e-3 for r in exact)


def test_decode_maisi_architecture_rows(tmp_path):
    """The GPU row's mode (MAISI's released architecture, MAISI num_splits as the baseline), at a smoke size."""
    run_script("bench_decode.py", ["--smoke", "--architecture", "maisi"], tmp_path)
    result = load(tmp_path, "bench_decode_maisi")
    assert "channels (64, 128, 256), num_res_blocks 2" in result["notes"]
    rows = result["rows"]
    assert [(r["variant"], r["dtype"]) for r in rows] == [("MAISI num_splits", "bf16"), ("pydiffmed tiled", "bf16")]
    assert rows[0]["time_ratio"] == 1 and rows[0]["max_abs_diff"] == 0
    assert rows[1]["peak_MB"] > 0 and 0 < rows[1]["max_abs_diff"] < 0.1  # bf16 rounding apart, the same decode


def test_inferer_rows_and_headline(tmp_path):
    run_script("bench_inferer.py", ["--smoke", "--threads", "1"], tmp_path)
    rows = load(tmp_path, "bench_inferer")["rows"]
    assert len(rows) == 16 and {r["case"] for r in rows} == {"DDIM, MONAI default (clip_sample=True)",
                                                            "DDIM, clip_sample=False", "LDM DDIM, clip_sample=False"}
    for model in ("latent small + autoencoder", "demo_latent"):  # random networks; the bundled latent demo
        latent = {r["variant"]: r for r in rows if r["case"].startswith("LDM") and r["model"] == model}
        assert list(latent) == ["MONAI fp32 (monai.inferers.LatentDiffusionInferer)", "MONAI bf16 (torch.autocast)",
                                "pydiffmed fp32", "pydiffmed bf16 networks"]
        fp32 = latent["pydiffmed fp32"]  # the same decoded sample as MONAI's
        assert fp32["max_abs_diff_vs_MONAI"] <= 1e-4 * max(1.0, fp32["MONAI_max_abs"]), model
        assert latent["pydiffmed bf16 networks"]["speedup_vs_MONAI_same_dtype"] == pytest.approx(
            latent["MONAI bf16 (torch.autocast)"]["ms"] / latent["pydiffmed bf16 networks"]["ms"])
    assert {r["volume"] for r in rows if r["model"] == "demo_latent"} == {"128³ (latent 32³)"}
    for case in {r["case"] for r in rows} - {"LDM DDIM, clip_sample=False"}:
        by_variant = {r["variant"]: r for r in rows if r["case"] == case}
        monai = by_variant.pop("MONAI fp32 (monai.inferers.DiffusionInferer)")
        assert monai["speedup_vs_MONAI"] == 1.0 and monai["max_abs_diff_vs_MONAI"] == 0.0
        monai_bf16 = by_variant.pop("MONAI bf16 (torch.autocast)")
        assert monai_bf16["speedup_vs_MONAI_same_dtype"] == 1.0
        assert set(by_variant) == {"pydiffmed drop-in fp32", "pydiffmed drop-in bf16 network"}
        for r in by_variant.values():
            same = monai if r["dtype"] == "fp32" else monai_bf16
            assert r["speedup_vs_MONAI_same_dtype"] == pytest.approx(same["ms"] / r["ms"])
            assert r["ms"] > 0 and r["speedup_vs_MONAI"] == pytest.approx(monai["ms"] / r["ms"])
            assert r["cpu_ms"] > 0 and r["cpu_speedup_vs_MONAI"] == pytest.approx(monai["cpu_ms"] / r["cpu_ms"])
            assert r["path"] == ("step by step" if "default" in case else "engine")
        fp32 = by_variant["pydiffmed drop-in fp32"]
        assert fp32["max_abs_diff_vs_MONAI"] <= 1e-4 * max(1.0, fp32["MONAI_max_abs"])  # the same sample
    sys.path.insert(0, BENCH)
    try:
        results_md = importlib.import_module("results_md")
    finally:
        sys.path.remove(BENCH)
    [(subject, result)] = results_md.headline_inferer(rows)
    assert "DDIM 2 steps" in subject and "LatentDiffusionInferer" in subject
    assert result.count("small 8³") == 2 and result.count("fp32 max |Δ|") == 4 and "latent 4³" in result


def test_distributed_rows_and_headline(tmp_path):
    """bench_distributed --smoke: 1 process × 1 and × 2 threads and 2 processes × 1 thread (torchrun, gloo), data
    parallel and spatial parallel, every row measured and its ratios those of the rows' own times; the parallel
    runs sample what one process samples."""
    run_script("bench_distributed.py", ["--smoke"], tmp_path, timeout=400)
    result = load(tmp_path, "bench_distributed")
    rows = result["rows"]
    assert "load average" in result["notes"] and "--smoke" in result["command"]
    assert [(r["mode"], r["measure"]) for r in rows] == [("data parallel", "sampling run")] * 3 + \
        [("spatial parallel", "forward")] * 3 + [("spatial parallel", "DDIM step")] * 3
    for r in rows:
        assert "note" not in r, r
        assert r["ms"] > 0 and r["cpu_s"] > 0 and r["peak_MB"] >= 0 and r["rss_peak_MB"] > r["peak_MB"]
    for group in (rows[:3], rows[3:6], rows[6:]):
        one, single, parallel = group
        assert (one["config"], single["config"], parallel["config"]) == (
            "1 process × 1 thread", "1 process × 2 threads", "2 processes × 1 thread")
        assert one["time_vs_1x1"] == 1.0 and single["time_vs_single"] == 1.0 and one["comm_share"] is None
        assert parallel["time_vs_single"] == pytest.approx(parallel["ms"] / single["ms"])
        assert parallel["efficiency"] == pytest.approx(one["ms"] / (2 * parallel["ms"]))
        assert parallel["memory_vs_single"] == pytest.approx(parallel["peak_MB"] / single["peak_MB"])
        assert parallel["memory_vs_1x1"] == pytest.approx(parallel["peak_MB"] / one["peak_MB"])
        assert parallel["cpu_vs_1x1"] == pytest.approx(parallel["cpu_s"] / one["cpu_s"])
        assert 0 <= parallel["comm_share"] <= 1 and len(parallel["comm_share_per_rank"]) == 2
        assert re.search(r"\(target [<>]= [0-9.]+\): (met|NOT met)", parallel["target"]), parallel["target"]
        # the same volumes as one process (data parallel: bit for bit on the CPU)
        assert parallel["max_abs_diff_vs_1x1"] <= (0.0 if parallel["mode"] == "data parallel" else 1e-4)
    assert rows[2]["throughput_vol_s"] == pytest.approx(2 / (rows[2]["ms"] / 1e3))
    sys.path.insert(0, BENCH)
    try:
        results_md = importlib.import_module("results_md")
    finally:
        sys.path.remove(BENCH)
    [(subject, line)] = results_md.headline_distributed(rows)
    assert "2 processes × 1 thread" in subject and "1 process × 2 threads" in subject
    assert "scaling efficiency" in line and "per-rank peak memory" in line and "one DDIM step" in line


def test_inverse_rows_and_headline(tmp_path):
    """bench_inverse --smoke: every section's rows, the speed ratios those of the rows' own times, pydiffmed and the
    plain diffusers + MONAI loop computing the same reconstruction in fp32, and the two headlines."""
    run_script("bench_inverse.py", ["--smoke", "--threads", "1"], tmp_path)
    result = load(tmp_path, "bench_inverse")
    rows = result["rows"]
    assert "--smoke" in result["command"] and "load average" in result["notes"]
    exact = [r for r in rows if r["section"] == "exact posterior"]
    assert len(exact) == 3 * 4  # per problem: the exact draws and the 3 posteriors (one solver, one NFE)
    assert {r["method"] for r in exact} == {"exact draws (Monte-Carlo floor)", "projection", "dds", "dps"}
    assert all(math.isfinite(r["mean_err"]) and math.isfinite(r["var_err"]) and r["weight_err"] >= 0 for r in exact)
    recon = [r for r in rows if r["section"] == "reconstruction"]
    assert {r["method"].split(" ")[0] for r in recon} == {"zero-filled", "FBP", "TV", "diffusion"}
    assert all(r["psnr_dB"] > 10 and 0 < r["ssim"] <= 1 and r["s_per_volume"] > 0 for r in recon)
    [anomaly] = [r for r in rows if r["section"] == "anomaly"]
    assert 0.5 < anomaly["auroc"] <= 1 and anomaly["nfe"] == 2
    speed = [r for r in rows if r["section"] == "speed"]
    assert [r["dtype"] for r in speed] == ["fp32", "fp32", "bf16", "bf16"]
    fp32_loop = speed[1]["ms"]
    for ours, loop in (speed[:2], speed[2:]):
        assert ours["method"].startswith("pydiffmed") and loop["method"].startswith("plain loop")
        assert ours["speedup"] == pytest.approx(loop["ms"] / ours["ms"]) and loop["speedup"] == 1.0
        assert ours["speedup_vs_fp32_loop"] == pytest.approx(fp32_loop / ours["ms"])
        assert abs(ours["psnr_dB"] - loop["psnr_dB"]) < 0.5
    # the same algorithm on the same x_T: the fp32 volumes differ by rounding (measured 9e-4 after these 2 coarse
    # steps, 2e-5 at NFE 20)
    assert speed[0]["max_abs_diff"] < 1e-2
    sys.path.insert(0, BENCH)
    try:
        results_md = importlib.import_module("results_md")
    finally:
        sys.path.remove(BENCH)
    lines = dict(results_md.headline_inverse(rows))
    assert len(lines) == 2
    assert any("mri_8x NFE 2 fp32" in line for line in lines.values())
    assert any("mri_4x:" in line and "ct_30:" in line and "FBP" in line for line in lines.values())


def test_gpu_suite_cpu_dry_run(tmp_path):
    """The GPU suite's CPU mode: every step up to the first GPU call, the GPU tests collected and every GPU
    benchmark's command line checked."""
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_suite.sh"), str(tmp_path / "out"), "--cpu-dry-run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:]
    assert "bench_determinism_help" in summary and "CPU dry run passed" in summary
    assert "bench_decode.py --architecture maisi --repeats 1" in summary


def test_contention_rows(tmp_path):
    run_script("bench_contention.py", ["--size", "8", "--repeats", "1", "--passes", "1", "--dtypes", "fp32",
                                       "--load", "1", "--load-seconds", "120", "--variants", "pydiffmed"], tmp_path)
    rows = load(tmp_path, "bench_contention")["rows"]
    assert [r["variant"] for r in rows] == ["pydiffmed UNet3D (adaptive threads)",
                                            "pydiffmed UNet3D (pydiffmed's OpenMP wait)",
                                            "pydiffmed UNet3D (libgomp default wait)"]
    for r in rows:
        assert not r["error"], r
        assert r["threads_quiet"] and r["threads_loaded"]
        assert r["quiet_ms"] > 0 and r["loaded_ms"] > 0
        assert r["slowdown"] == pytest.approx(r["loaded_ms"] / r["quiet_ms"], rel=0.01)
        assert r["vs_fastest_peer_loaded"] is None  # no peer ran


def test_unet_peers_floor_rows_and_headline(tmp_path):
    """bench_unet on a tiny model at 8³ with the fast peers (torch.compile left out: a minute to compile): every
    peer is a row, timed or with a note saying why it failed; the ratios are those of the rows' own times; every
    timed row computes MONAI fp32's output; the floor is UNet3D's own convolutions for UNet3D's rows."""
    run_script("bench_unet.py", ["--cases", "tiny:8", "--repeats", "1", "--threads", "1",
                                 "--peer-set", "autocast,onnxruntime,openvino"], tmp_path)
    rows = load(tmp_path, "bench_unet")["rows"]
    by_name = {r["variant"]: r for r in rows}
    assert list(by_name) == ["MONAI fp32", "ONNX Runtime fp32", "OpenVINO fp32", "MONAI+accelerate fp32",
                             "UNet3D fp32", "MONAI bf16", "MONAI autocast bf16", "OpenVINO bf16", "UNet3D bf16"]
    timed = [r for r in rows if "ms" in r]
    for r in rows:
        assert "ms" in r or r["note"].startswith("failed: "), r
    for name in ("MONAI fp32", "MONAI+accelerate fp32", "UNet3D fp32", "MONAI bf16", "UNet3D bf16",
                 "MONAI autocast bf16"):
        assert "ms" in by_name[name], by_name[name]
    for r in timed:
        assert r["speedup"] == pytest.approx(r["MONAI_fp32_ms"] / r["ms"])
        assert r["speedup_same_dtype"] == pytest.approx(by_name[f"MONAI {r['dtype']}"]["ms"] / r["ms"])
        assert r["rel_l2_vs_monai_fp32"] < (1e-4 if r["dtype"] == "fp32" else 0.1), r
        assert r["floor_of"] == ("UNet3D" if r["variant"].startswith("UNet3D") else "MONAI")
        assert r["floor_ms"] > 0 and r["vs_floor"] == pytest.approx(r["ms"] / r["floor_ms"])
        peers = {p["variant"]: p["ms"] for p in timed if p["dtype"] == r["dtype"] and not
                 p["variant"].startswith(("UNet3D", "MONAI+accelerate"))}
        if r["variant"].startswith(("UNet3D", "MONAI+accelerate")):
            assert r["fastest_peer"] == min(peers, key=peers.get)
            assert r["vs_fastest_peer"] == pytest.approx(min(peers.values()) / r["ms"])
        else:
            assert "vs_fastest_peer" not in r
    for name in ("ONNX Runtime fp32", "OpenVINO fp32", "OpenVINO bf16"):
        if "ms" in by_name[name]:
            assert by_name[name]["compile_s"] > 0 and by_name[name]["note"]
    sys.path.insert(0, BENCH)
    try:
        results_md = importlib.import_module("results_md")
    finally:
        sys.path.remove(BENCH)
    [(subject, line)] = results_md.headline_unet(rows)
    assert subject == "UNet forward: UNet3D vs MONAI DiffusionModelUNet at the same precision"
    ours = {r["dtype"]: r for r in rows if r["variant"].startswith("UNet3D")}
    assert line.startswith(f"tiny 8³: fp32 {results_md._x(ours['fp32']['speedup_same_dtype'])}")
    assert f"vs {ours['fp32']['fastest_peer']}" in line and "floor" in line

    run_script("bench_unet.py", ["--cases", "tiny:8", "--repeats", "1", "--threads", "1", "--no-peers",
                                 "--no-floor"], tmp_path)
    rows = load(tmp_path, "bench_unet")["rows"]
    assert [r["variant"] for r in rows] == ["MONAI fp32", "MONAI+accelerate fp32", "UNet3D fp32", "MONAI bf16",
                                            "UNet3D bf16"]
    assert all("floor_ms" not in r and r["ms"] > 0 for r in rows)

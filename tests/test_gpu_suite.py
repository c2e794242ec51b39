"""benchmarks/gpu_suite.py on the CPU: its dry-run end to end (tiny sizes), the time box, and the
logic of the paths only a GPU runs (the attention variants, compilation, the profiler's summary).
The chunked decode it measures is tested in test_sample.py."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_suite
from jobs.config import load_config
from models import Guidance, build_model
from models import sar as sar_model
from pipelines.evaluate import sampling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    assert gpu_suite.main(["--dry-run", "--out", str(out)]) == 0
    return out, json.loads((out / gpu_suite.JSON_NAME).read_text())


def test_dry_run_measures_every_cpu_path_and_says_why_the_others_wait(dry_run):
    out, data = dry_run
    assert data["dry_run"] and data["device"].startswith("cpu") and data["torch"] == torch.__version__
    assert data["finished"] and not data.get("stopped") and data["ceilings"]["matmul_tflops"] > 0
    cases = {c.name: c for c in gpu_suite.CORE}
    rows = [r for r in data["train"]
            if r["model"] == "main" and r["case"] in cases and r["batch"] == gpu_suite.DRY.batch]
    assert {(r["case"], r["mode"]) for r in rows} == {(c.name, m) for c in gpu_suite.CORE for m in c.modes}
    for r in rows:
        why = gpu_suite.cpu_skip(cases[r["case"]], r["mode"])
        if why:
            assert r["status"] == f"skipped: {why}"
        else:
            assert r["status"] == "ok", r
            assert r["ms_per_step"] > 0 and r["images_per_s"] > 0 and r["gflop_per_image"] > 0
            assert r["mfu"] is None  # no datasheet peak for a CPU
    by_name = {(r["case"], r["mode"]): r for r in rows}
    # The additive masks give the attention of the bool ones (fp32 on the CPU: rounding only).
    assert by_name[("fused AdamW, additive bf16 masks", "eager")]["rel_err_z"] < 1e-5
    loop = by_name[("loop (worker.train_step, as shipped)", "loop")]
    assert loop["profile"]["source"] == "cpu_op" and loop["profile"]["top"]
    with gzip.open(out / loop["profile"]["trace"]) as f:
        assert json.load(f)["traceEvents"]
    # extra: the best setting at a larger batch, the head variants (another model); sar-l.
    assert any(r["batch"] == gpu_suite.DRY.sweep[0] and r["status"] == "ok" for r in data["train"])
    heads = [r for r in data["train"] if not r["same_model"] and r["status"] == "ok"]
    assert {tuple(r["head"].items()) for r in heads} == {(("head_batch_mul", 2),), (("head_batch_mul", 1),),
                                                         (("head_width", 32),), (("head_width", 96),)}
    assert any(r["model"] == "large" and r["mode"] == "loop" and r["status"] == "ok" for r in data["train"])


def test_dry_run_samples_with_the_shipped_settings_and_decodes(dry_run):
    out, data = dry_run
    assert [r["decode_batch"] for r in data["decode"]] == list(gpu_suite.DRY.decode_chunks)
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in data["decode"])
    rows = data["sample"]
    assert all(r["status"] == "ok" and r["decode"] for r in rows)
    shipped = [r for r in rows if r["shipped_sampler"]]
    config = load_config(gpu_suite.CONFIG).sample
    assert {(r["solver"], r["guidance"]["kind"], r["guidance"]["w_x"], r["guidance"]["w_z"]) for r in shipped} == {
        (config.solver, config.guidance.kind, config.guidance.w_x, config.guidance.w_z)}
    assert not any(r["shipped_sampler"] for r in rows if r["solver"] != config.solver)
    fastest = max(shipped, key=lambda r: r["images_per_s"])
    assert data["images_per_s_50k"] == fastest["images_per_s"]
    assert data["minutes_50k"] == pytest.approx(50_000 / fastest["images_per_s"] / 60, abs=0.01)  # kept to 0.01 min
    assert data["sampler_50k"]["row"] == fastest["row"]
    text = (out / gpu_suite.TABLE_NAME).read_text()
    assert fastest["row"] in text and "loop (worker.train_step, as shipped)" in text and "DRY RUN" in text


def test_a_spent_budget_skips_every_case_and_still_writes_the_report(tmp_path):
    assert gpu_suite.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "0", "--sections", "train",
                           "sample"]) == 0
    data = json.loads((tmp_path / gpu_suite.JSON_NAME).read_text())
    assert data["train"] and data["sample"] and data["decode"]
    assert all(r["status"].startswith("skipped: ") for r in data["train"] + data["sample"] + data["decode"])
    assert any("time box" in r["status"] for r in data["train"])
    assert data["mfu_sar_b"] is None and data["minutes_50k"] is None
    assert "skipped: time box" in (tmp_path / gpu_suite.TABLE_NAME).read_text()


def test_trace_summary_finds_busy_time_gaps_and_the_top_kernels():
    def span(name, ts, dur, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    events = [span("ampere_bf16_gemm_128x64", 0, 10), span("fmha_cutlass_fwd", 5, 15),  # overlap: busy 0-20
              span("elementwise_kernel", 50, 10), span("Memcpy HtoD", 100, 1, "gpu_memcpy"),
              span("aten::mm", 0, 500, "cpu_op"), {"ph": "i", "name": "marker", "ts": 3}]
    s = gpu_suite.trace_summary(events, steps=2, top=2)
    assert s["source"] == "kernel" and s["window_ms"] == pytest.approx(0.101)
    assert s["busy_ms"] == pytest.approx(0.031) and s["idle_ms"] == pytest.approx(0.070)
    assert s["gaps"] == 2 and s["gaps_ms"] == pytest.approx(0.070) and s["largest_gaps_ms"] == [0.04, 0.03]
    assert [t["name"] for t in s["top"]] == ["fmha_cutlass_fwd", "ampere_bf16_gemm_128x64"]
    assert s["top"][0]["share"] == pytest.approx(15 / 36, abs=1e-4) and s["top"][0]["calls_per_step"] == 0.5
    assert s["classes"] == pytest.approx({"attention": 15 / 36, "matmul": 10 / 36, "other": 10 / 36,
                                          "memory": 1 / 36}, abs=1e-4)
    cpu = gpu_suite.trace_summary([span("aten::mm", 0, 500, "cpu_op")], steps=1)
    assert cpu["source"] == "cpu_op" and cpu["busy_share"] == 1.0
    assert gpu_suite.trace_summary([], steps=1)["source"] is None


@pytest.mark.parametrize("grouping", ["next-neighbour", "next-row"])  # two streams (a PrefixMask), one stream
def test_additive_masks_give_the_bool_masks_attention_and_are_restored(grouping):
    torch.manual_seed(0)
    model = build_model("tiny", token_dim=16, height=4, width=4, num_classes=10, grouping=grouping)
    x, labels = torch.randn(3, 16, 16), torch.tensor([1, 2, 3])
    keep = torch.zeros(3, dtype=torch.bool)
    with gpu_suite.isolated_masks():
        plain = model(x, labels, drop_labels=keep)
        bool_mask = model.attention_mask("cpu", split=True)
        with gpu_suite.additive_masks(model, torch.device("cpu"), torch.float32):
            mask = model.attention_mask("cpu", split=True)
            parts = [mask.head, mask.tail] if isinstance(mask, sar_model.PrefixMask) else [mask]
            assert all(p.dtype == torch.float32 and p.stride(0) % 16 == 0 for p in parts)
            assert torch.equal(parts[-1] == 0, bool_mask.tail if len(parts) == 2 else bool_mask)
            added = model(x, labels, drop_labels=keep)
        assert model.attention_mask("cpu", split=True) is bool_mask
    torch.testing.assert_close(added, plain)


def test_flex_masks_take_the_case_s_tile_and_the_cache_is_restored():
    model = build_model("tiny", token_dim=16, height=4, width=4, num_classes=10, attention="flex")
    before = dict(sar_model._BLOCK_MASKS)
    with gpu_suite.case_context(gpu_suite.Case("flex 16", attention="flex", flex_block=16)):
        assert model.attention_mask("cpu").BLOCK_SIZE == (16, 16)
    assert sar_model._BLOCK_MASKS == before
    with gpu_suite.isolated_masks():
        assert model.attention_mask("cpu").BLOCK_SIZE == (128, 128)  # torch's default again


def test_cudnn_case_leaves_sdpa_only_cudnn_attention():
    with gpu_suite.case_context(gpu_suite.Case("cudnn", sdpa_backend="cudnn")):
        assert torch.backends.cuda.cudnn_sdp_enabled()
        assert not (torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
                    or torch.backends.cuda.math_sdp_enabled())
    assert torch.backends.cuda.math_sdp_enabled()


def _context() -> gpu_suite.Context:
    return gpu_suite.Context(torch.device("cpu"), gpu_suite.DRY, gpu_suite.Clock(60), report=None, out="")


def test_compile_cases_compile_each_block_or_the_whole_objective(monkeypatch):
    calls = []

    def recorded(fn, **options):  # what build hands torch.compile (compiling itself is the GPU run's)
        calls.append((fn, options))
        return fn

    monkeypatch.setattr(torch, "compile", recorded)
    ctx = _context()
    regional = gpu_suite.build(gpu_suite.Case("regional", compile="regional"), ctx)
    blocks = [*regional.model.backbone.blocks, *regional.model.head.blocks]
    assert [fn.__self__ for fn, _ in calls] == blocks and all(b._compiled_call_impl for b in blocks)
    assert regional.ema.module.backbone.blocks[0]._compiled_call_impl is None  # the EMA's copy stays plain
    assert regional.call is regional.objective
    calls.clear()
    whole = gpu_suite.build(gpu_suite.Case("whole", compile="max-autotune-no-cudagraphs"), ctx)
    assert calls == [(whole.objective, {"mode": "max-autotune-no-cudagraphs", "dynamic": False})]
    calls.clear()
    default = gpu_suite.build(gpu_suite.Case("whole", compile="default"), ctx)
    assert calls == [(default.objective, {"mode": None, "dynamic": False})]


def test_shipped_settings_without_pydantic_match_jobs_config(monkeypatch):
    full, note = gpu_suite.shipped_settings()
    assert note is None
    monkeypatch.setitem(sys.modules, "jobs.config", None)  # as on the GPU machine: no pydantic
    read, note = gpu_suite.shipped_settings()
    assert "imagenet256-sar-b-klvae.yaml" in note and "jobs.config does not import" in note
    for name in ("solver", "flow_steps", "batch_size", "decode_batch", "compile_head", "temperature"):
        assert getattr(read, name) == getattr(full, name), name
    g, h = Guidance(**read.guidance), Guidance(**full.guidance)
    assert (g.kind, g.w_x, g.w_z, g.ramp) == (h.kind, h.w_x, h.w_z, h.ramp)
    assert isinstance(read, sampling.SampleSettings)


@pytest.mark.ray  # starts a process
def test_dry_run_needs_only_torch_and_the_repository(tmp_path):
    # The GPU machine's image has no pydantic, Ray, MLflow or diffusers: the suite runs without them
    # and says what it left out.
    blocked = ("pydantic", "ray", "mlflow", "diffusers", "s3fs")
    code = (f"import sys, runpy\nfor m in {blocked!r}: sys.modules[m] = None\n"
            f"sys.argv = ['gpu_suite.py', '--dry-run', '--out', {str(tmp_path)!r}, '--sections', 'env', 'train',"
            f" 'sample']\n"
            f"runpy.run_path({os.path.join(REPO, 'benchmarks', 'gpu_suite.py')!r}, run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / gpu_suite.JSON_NAME).read_text())
    assert any("jobs.config does not import" in n for n in data["notes"])
    assert any("KL-VAE decode is left out" in n for n in data["notes"])
    assert data["sample"] and all(r["status"] == "ok" and not r["decode"] for r in data["sample"])
    assert any(r["mode"] == "loop" and r["status"] == "ok" for r in data["train"])

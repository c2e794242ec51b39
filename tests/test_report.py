"""pipelines/report.py: a fake run directory in, one self-contained page out, checked in a real browser."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil

import pytest

from pipelines import latents, report, rundir, storage
from tests.conftest import upload_tree

CHROMIUM = "/usr/bin/chromium"
T0 = 1_790_000_000.0  # a fixed time for the stage records


def _png(w: int, h: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = (rng.random((h // 8, w // 8, 3)) * 255).astype("uint8").repeat(8, 0).repeat(8, 1)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _record(folder, stage: str, start: float, end: float, **kw) -> dict:
    """The stage record every stage writes (pipelines/rundir.py), started at `start`, `end - start` s long."""
    return rundir.write_stage_record(str(folder), stage, started=report._iso(start), seconds=end - start,
                                     **{"images": None, "inputs": {}, "outputs": {}, **kw})


def _jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _json(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def make_run(root, upto: str = "fid", preset: str = "sar-b") -> dict[str, str]:
    """A run directory with the files each stage writes, up to and including `upto`; returns the digests."""
    order = list(report.STAGE_DIRS)
    done = set(order[: order.index(upto) + 1])
    manifest = {"schema_version": 1, "encoder": "raw", "grid": [8, 8], "token_dim": 48, "num_rows": 960,
                "num_classes": 10, "shards": [{"file": "part-a.parquet", "rows": 960, "bytes": 1000}],
                "updated": "2026-09-21T10:00:00Z"}
    digests = {"latents": latents.manifest_digest(manifest), "pretrain": "a1b2c3d4e5f6" + "0" * 52,
               "refine": "f6e5d4c3b2a1" + "1" * 52}
    _json(root / "latents" / "_manifest.json", manifest)
    _record(root / "latents", "encode", T0, T0 + 95, images=960,
                              outputs={"latents": digests["latents"]})
    if "pretrain" in done:
        pre = root / "pretrain"
        for step in (200, 300):
            _json(pre / "checkpoints" / f"step_{step:08d}" / "meta.json",
                  {"step": step, "stage": "pretrain", "digest": digests["pretrain"] if step == 300 else "old" * 20,
                   "inputs": {"latents": digests["latents"]}, "config": {"pretrain": {"steps": 300}}})
        (pre / "checkpoints" / "step_00000400").mkdir()  # a save that never committed: no meta.json
        _jsonl(pre / "metrics.jsonl", [
            {"step": s, "epoch": s // 30, "loss": 1.2 * math.exp(-s / 120) + 0.3, "loss_early": 1.5 * math.exp(-s / 90) + 0.35,
             "loss_middle": 1.2 * math.exp(-s / 120) + 0.3, "loss_late": 1.0 * math.exp(-s / 150) + 0.25,
             "lr": 1e-3, "grad_norm": 1.0, "images_per_s": 300 + 20 * math.sin(s), "data_wait_fraction": 0.05}
            for s in range(20, 301, 20)])
        _jsonl(pre / "evals.jsonl", [
            {"step": s, "fid": 120.0 - s / 4, "accuracy": 0.2 + s / 1000, "precision": 0.3, "recall": 0.2,
             "evaluator": "domain", "num_samples": 80, "grid": f"evals/step_{s:08d}.png"} for s in (100, 200, 300)])
        for i, s in enumerate((100, 200, 300)):
            (pre / "evals").mkdir(exist_ok=True)
            (pre / "evals" / f"step_{s:08d}.png").write_bytes(_png(256, 128, i))
        _record(pre, "pretrain", T0 + 100, T0 + 400, images=9600,
                                  inputs={"latents": digests["latents"]}, outputs={"checkpoint": digests["pretrain"]})
    if "refine" in done:
        ref = root / "refine"
        _json(ref / "checkpoints" / "step_00000050" / "meta.json",
              {"step": 50, "stage": "refine", "digest": digests["refine"],
               "inputs": {"latents": digests["latents"], "init": digests["pretrain"]}, "config": {"refine": {"steps": 50}}})
        _jsonl(ref / "metrics.jsonl", [
            {"step": s, "loss": 0.5 - s / 500, "loss_tf": 0.4 - s / 600, "loss_csf": 0.1 - s / 1000,
             "gap_early": 0.02 + s / 5000, "gap_middle": 0.05 - s / 4000, "gap_late": 0.09 - s / 2000,
             "lr": 1e-4, "images_per_s": 150.0, "data_wait_fraction": 0.1} for s in range(10, 51, 10)])
        _jsonl(ref / "evals.jsonl", [{"step": 50, "fid": 40.5, "accuracy": 0.55, "precision": 0.4, "recall": 0.3,
                                      "evaluator": "domain", "num_samples": 80, "grid": "evals/step_00000050.png"}])
        (ref / "evals").mkdir()
        (ref / "evals" / "step_00000050.png").write_bytes(_png(256, 128, 9))
        _record(ref, "refine", T0 + 400, T0 + 520, images=1600,
                                  inputs={"init": digests["pretrain"]}, outputs={"checkpoint": digests["refine"]})
    if "sample" in done:
        _json(root / "samples" / "_manifest.json",
              {"num_samples": 80, "checkpoint_digest": digests["refine"], "checkpoint_step": 50,
               "guidance": {"kind": "xz_cfg", "w_x": 1.25, "w_z": 2.0}, "flow_steps": 10})
        _record(root / "samples", "sample", T0 + 520, T0 + 560, images=80,
                                  inputs={"checkpoint": digests["refine"]})
    if "fid" in done:
        _json(root / "eval" / "metrics.json",
              {"fid": 31.25, "inception_score": {"mean": 3.1, "std": 0.21}, "precision": 0.41, "recall": 0.33,
               "num_samples": 80, "checkpoint_digest": digests["refine"],
               "domain": {"fid": 12.5, "accuracy": 0.61, "precision": 0.5, "recall": 0.45, "kid": 0.012},
               "skipped": {"inception_score": "weights <missing> & offline"},
               "config": {"model": {"preset": preset}}})
        (root / "eval" / "grid.png").write_bytes(_png(640, 512, 42))
        _record(root / "eval", "fid", T0 + 560, T0 + 600, images=80,
                                  inputs={"samples": digests["refine"]})
    return digests


def _srcs(page_html: str) -> list[str]:
    return re.findall(r'\b(?:src|href)\s*=\s*["\']?([^"\'\s>]+)', page_html)


# Plain checks --------------------------------------------------------------------------------------
def test_full_run_report_is_self_contained(tmp_path):
    digests = make_run(tmp_path)
    url = report.write_report(str(tmp_path))
    assert url == str(tmp_path / "report.html")
    page = open(url).read()
    srcs = _srcs(page)
    assert len(srcs) == 1 + 4 + 5  # the final grid, four eval grids, five figures
    assert all(s.startswith("data:image/") for s in srcs)
    assert not re.search(r"https?://", page)
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    for d in digests.values():
        assert d[:12] in page
    assert page.count("&#10003; made from this") == 4  # dataset->pretrain->refine->samples->metrics
    assert "4.23" in page and "SAR-B" in page
    assert "FID from 80 samples is biased upward" in page
    assert "weights &lt;missing&gt; &amp; offline" in page and "<missing>" not in page
    assert "not run yet" not in page
    assert "5m00s" in page  # pretrain's wall time from _stage.json


def test_figures_cover_loss_gap_quality_and_throughput(tmp_path):
    make_run(tmp_path)
    captions = [c for c, _ in report.figures(report.collect(str(tmp_path)))]
    assert captions == ["pretrain loss (metrics.jsonl)", "refine loss (metrics.jsonl)",
                        "refine exposure gap by group third", "FID of the in-training evaluations (evals.jsonl)",
                        "images/s and the fraction of each log interval spent waiting for data"]


def test_partial_run_shows_not_run_yet(tmp_path):
    digests = make_run(tmp_path, upto="pretrain")
    page = open(report.write_report(str(tmp_path))).read()
    assert digests["pretrain"][:12] in page and digests["refine"][:12] not in page
    for title in ("refine checkpoint", "samples", "metrics"):
        assert re.search(rf"<h3>{title}</h3><p class=\"missing\">not run yet</p>", page), title
    assert "<h2>Final metrics</h2><p class=\"missing\">not run yet</p>" in page
    assert re.search(r"<td>refine</td><td colspan=7 class=missing>not run yet</td>", page)


def test_empty_and_damaged_run_directories(tmp_path):
    page = open(report.write_report(str(tmp_path / "nothing"))).read()
    assert page.count("not run yet") >= 10
    make_run(tmp_path / "run", upto="pretrain")
    with open(tmp_path / "run" / "pretrain" / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    (tmp_path / "run" / "pretrain" / "evals" / "step_00000200.png").write_bytes(b"not a png")
    page = open(report.write_report(str(tmp_path / "run"))).read()
    assert "pretrain/metrics.jsonl line 16: not valid JSON" in page
    assert "pretrain/evals/step_00000200.png: not an image" in page
    assert len(re.findall(r"<figure><img", page)) == 2 + 3  # two good thumbnails; loss, FID, throughput


def test_other_presets_have_no_paper_reference(tmp_path):
    make_run(tmp_path, preset="tiny")
    page = open(report.write_report(str(tmp_path))).read()
    assert 'no paper reference for preset "tiny"' in page and "4.23" not in page


def test_the_report_reads_the_stage_records_the_stages_write(tmp_path):
    rec = _record(tmp_path / "samples", "sample", T0, T0 + 40, images=80, inputs={"checkpoint": "c" * 64})
    assert rundir.read_stage_record(str(tmp_path / "samples")) == rec
    assert rec["started"] == "2026-09-21T14:13:20Z" and rec["wall_s"] == 40 and rec["images_per_s"] == 2.0
    assert _record(tmp_path / "eval", "fid", T0, T0, images=None)["images_per_s"] is None
    assert report.collect(str(tmp_path))["sample"].record == rec
    page = open(report.write_report(str(tmp_path))).read()
    assert re.search(r"<td>sample</td><td>2026-09-21 14:13:20 UTC</td><td>[^<]+</td><td>40s</td><td>80</td>"
                     r"<td>2</td><td>checkpoint <code>cccccccccccc</code></td>", page)


def test_report_on_an_object_store(tmp_path, s3_bucket):
    digests = make_run(tmp_path / "run")
    run_url = f"{s3_bucket}/runs/x"
    upload_tree(str(tmp_path / "run"), run_url)
    assert report.write_report(run_url) == f"{run_url}/report.html"
    page = storage.read_text(f"{run_url}/report.html")
    assert digests["refine"][:12] in page and "not run yet" not in page
    assert len(_srcs(page)) == 10


def test_sar_report_writes_the_report_of_a_run_directory(tmp_path, capsys):
    from jobs import cli
    from tests.conftest import DEMO_CONFIG

    digests = make_run(tmp_path / "run")
    assert cli.main(["report", "--config", DEMO_CONFIG, "--set", f"run_dir={tmp_path / 'run'}"]) == 0
    assert capsys.readouterr().out == f"report: {tmp_path / 'run' / 'report.html'}\n"
    page = (tmp_path / "run" / "report.html").read_text()
    assert all(d[:12] in page for d in digests.values())

    assert cli.main(["report", "--config", DEMO_CONFIG, "--set", f"run_dir={tmp_path / 'nothing'}"]) == 1
    err = capsys.readouterr().err
    assert err == f"sar report: error: no run directory at {tmp_path / 'nothing'}: set run_dir (--config, " \
                  "--set run_dir=DIR) to one that `sar run` or a stage wrote\n"
    assert not (tmp_path / "nothing").exists()


# In a real browser -----------------------------------------------------------------------------------
def test_report_in_a_headless_browser(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no browser for the report test: {CHROMIUM} not found (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (uv sync)")
    digests = make_run(tmp_path / "run")
    url = report.write_report(str(tmp_path / "run"))
    errors, failed, outside = [], [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: failed.append(r.url))

            def only_local(route):
                if route.request.url.startswith(("file:", "data:")):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", only_local)
            page.goto(f"file://{url}", wait_until="load")
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
            text = page.inner_text("body")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == [] and failed == [] and outside == []
    assert len(images) == 10 and all(done and width > 0 for done, width in images), images
    for d in digests.values():
        assert d[:12] in text
    assert "Lineage" in text and "Final metrics" in text
    assert shot.stat().st_size > 50_000
    if os.environ.get("SAR_REPORT_SCREENSHOT"):  # keep a copy to look at
        shutil.copy(shot, os.environ["SAR_REPORT_SCREENSHOT"])

"""pipelines/report/page.py: a fake run directory in, one self-contained page out, checked in a real browser."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil

import pytest

from jobs.config import load_config
from pipelines.core import rundir, storage
from pipelines.data import latents
from pipelines.report import collect, page
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


def outputs(run_dir, **moved) -> dict[str, str]:
    """Every stage's output folder in a run directory laid out by default, or moved by `{section}.output`."""
    return load_config(None, [f"run_dir={run_dir}", *(f"{k}.output={v}" for k, v in moved.items())]).outputs()


def write_report(run_dir, **moved) -> str:
    return page.write_report(str(run_dir), outputs(run_dir, **moved))


def _record(folder, stage: str, start: float, end: float, **kw) -> dict:
    """The stage record every stage writes (pipelines/core/rundir.py), started at `start`, `end - start` s long."""
    return rundir.write_stage_record(str(folder), stage, started=collect.iso_utc(start), seconds=end - start,
                                     **{"images": None, "inputs": {}, "outputs": {}, **kw})


def _jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _json(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def make_run(root, upto: str = "fid", preset: str = "sar-b") -> dict[str, str]:
    """A run directory with the files each stage writes, up to and including `upto`; returns the digests."""
    order = list(collect.STAGE_NAMES)
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
            (pre / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
            (pre / "checkpoints" / f"step_{step:08d}" / "state.pt").write_bytes(b"state")
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
        (ref / "checkpoints" / "step_00000050").mkdir(parents=True)
        (ref / "checkpoints" / "step_00000050" / "state.pt").write_bytes(b"state")
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
               "domain": {"fid": 12.5, "accuracy": 0.61, "precision": 0.5, "recall": 0.45, "num_samples": 80,
                          "num_reference": 60, "kid": {"mean": 0.012, "std": 0.003, "subset_size": 60, "subsets": 100},
                          "domain_is": {"mean": 4.2, "std": 0.3, "splits": 10},
                          "evaluator": {"path": "/data/evaluators/digits.pt", "sha256": "e" * 64,
                                        "heldout_accuracy": 0.99},
                          "floor": {"fid": 0.61, "accuracy": 0.985, "precision": 0.9, "recall": 0.91,
                                    "num_samples": 80, "num_reference": 60}},
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
    url = write_report(tmp_path)
    assert url == str(tmp_path / "report.html")
    html = open(url).read()
    srcs = _srcs(html)
    assert len(srcs) == 1 + 4 + 5  # the final grid, four eval grids, five figures
    assert all(s.startswith("data:image/") for s in srcs)
    assert not re.search(r"https?://", html)
    assert "<script" not in html.lower() and "@import" not in html and "url(" not in html
    for d in digests.values():
        assert d[:12] in html
    assert html.count("&#10003; made from this") == 4  # dataset->pretrain->refine->samples->metrics
    assert "4.23" in html and "SAR-B" in html
    assert "FID from 80 samples is biased upward" in html
    assert "weights &lt;missing&gt; &amp; offline" in html and "<missing>" not in html
    assert "not run yet" not in html
    assert "5m00s" in html  # pretrain's wall time from _stage.json


def test_final_metrics_are_rows_with_set_sizes_and_the_evaluator_is_in_the_lineage(tmp_path):
    make_run(tmp_path)
    html = open(write_report(tmp_path)).read()
    final = html[html.index("<h2>Final metrics</h2>"):]
    assert "{" not in final.split("<style>")[0]  # no raw Python dict anywhere in the section
    assert re.search(r"<th>domain FID \(lower is better\)</th><td>12\.5</td><td>0\.61</td>"
                     r"<td>samples 80 vs 60; floor 80 vs 60</td>", final)
    assert re.search(r"<th>KID</th><td>0\.012 ± 0\.003</td><td>—</td><td>100 subsets of 60</td>", final)
    assert re.search(r"<th>class accuracy</th><td>61\.0%</td><td>98\.5%</td><td>of 80; floor of 80</td>", final)
    assert "digits.pt" not in final and "eeeeeeeeeeee" not in final  # paths and digests: in the lineage
    lineage = html[html.index("<h2>Lineage</h2>"):html.index("<h2>Stages</h2>")]
    assert "eeeeeeeeeeee" in lineage and "digits.pt" in lineage and "99.0%" in lineage


def test_the_lineage_shows_the_domain_fid_when_no_inception_fid_was_computed(tmp_path):
    """A domain run (no Inception weights): the metrics card's headline is the domain FID, not "FID —"."""
    make_run(tmp_path)
    path = tmp_path / "eval" / "metrics.json"
    _json(path, {**json.loads(path.read_text()), "fid": None})
    html = open(write_report(tmp_path)).read()
    lineage = html[html.index("<h2>Lineage</h2>"):html.index("<h2>Stages</h2>")]
    assert "<tr><th>domain FID</th><td>12.5</td></tr>" in lineage, lineage
    assert "<tr><th>FID</th>" not in lineage


def test_the_report_follows_each_stage_s_output_setting(tmp_path):
    """A stage whose `output` is set outside run_dir is read from there, not reported as not run."""
    digests = make_run(tmp_path / "run")
    shutil.move(tmp_path / "run" / "pretrain", tmp_path / "elsewhere")
    html = open(write_report(tmp_path / "run", pretrain=tmp_path / "elsewhere")).read()
    assert digests["pretrain"][:12] in html and "5m00s" in html
    assert not re.search(r"<h3>pretrain checkpoint</h3><p class=\"missing\">", html)
    html = open(write_report(tmp_path / "run")).read()  # the default folder is empty now
    assert re.search(r"<h3>pretrain checkpoint</h3><p class=\"missing\">not run yet</p>", html)


def test_figures_cover_loss_gap_quality_and_throughput(tmp_path):
    make_run(tmp_path)
    captions = [c for c, _ in page.figures(collect.collect(outputs(tmp_path)))]
    assert captions == ["pretrain loss (metrics.jsonl)", "refine loss (metrics.jsonl)",
                        "refine exposure gap by group third", "FID of the in-training evaluations (evals.jsonl)",
                        "images/s and the fraction of each log interval spent waiting for data"]


def test_partial_run_shows_not_run_yet(tmp_path):
    digests = make_run(tmp_path, upto="pretrain")
    html = open(write_report(tmp_path)).read()
    assert digests["pretrain"][:12] in html and digests["refine"][:12] not in html
    for title in ("refine checkpoint", "samples", "metrics"):
        assert re.search(rf"<h3>{title}</h3><p class=\"missing\">not run yet</p>", html), title
    assert "<h2>Final metrics</h2><p class=\"missing\">not run yet</p>" in html
    assert re.search(r"<td>refine</td><td colspan=7 class=missing>not run yet</td>", html)


def test_empty_and_damaged_run_directories(tmp_path):
    html = open(write_report(tmp_path / "nothing")).read()
    assert html.count("not run yet") >= 10
    make_run(tmp_path / "run", upto="pretrain")
    with open(tmp_path / "run" / "pretrain" / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    (tmp_path / "run" / "pretrain" / "evals" / "step_00000200.png").write_bytes(b"not a png")
    html = open(write_report(tmp_path / "run")).read()
    assert "pretrain/metrics.jsonl line 16: not valid JSON" in html
    assert "pretrain/evals/step_00000200.png: not an image" in html
    assert len(re.findall(r"<figure><img", html)) == 2 + 3  # two good thumbnails; loss, FID, throughput


def test_other_presets_have_no_paper_reference(tmp_path):
    make_run(tmp_path, preset="tiny")
    html = open(write_report(tmp_path)).read()
    assert 'no paper reference for preset "tiny"' in html and "4.23" not in html


def test_the_report_reads_the_stage_records_the_stages_write(tmp_path):
    rec = _record(tmp_path / "samples", "sample", T0, T0 + 40, images=80, inputs={"checkpoint": "c" * 64})
    assert rundir.read_stage_record(str(tmp_path / "samples")) == rec
    assert rec["started"] == "2026-09-21T14:13:20Z" and rec["wall_s"] == 40 and rec["images_per_s"] == 2.0
    assert _record(tmp_path / "eval", "fid", T0, T0, images=None)["images_per_s"] is None
    assert collect.collect(outputs(tmp_path))["sample"].record == rec
    html = open(write_report(tmp_path)).read()
    assert re.search(r"<td>sample</td><td>2026-09-21 14:13:20 UTC</td><td>[^<]+</td><td>40s</td><td>80</td>"
                     r"<td>2</td><td>checkpoint <code>cccccccccccc</code></td>", html)


def test_report_on_an_object_store(tmp_path, s3_bucket):
    digests = make_run(tmp_path / "run")
    run_url = f"{s3_bucket}/runs/x"
    upload_tree(str(tmp_path / "run"), run_url)
    assert write_report(run_url) == f"{run_url}/report.html"
    html = storage.read_text(f"{run_url}/report.html")
    assert digests["refine"][:12] in html and "not run yet" not in html
    assert len(_srcs(html)) == 10


def test_sar_report_writes_the_report_of_a_run_directory(tmp_path, capsys):
    from jobs import cli
    from tests.conftest import DEMO_CONFIG

    digests = make_run(tmp_path / "run")
    assert cli.main(["report", "--config", DEMO_CONFIG, "--set", f"run_dir={tmp_path / 'run'}"]) == 0
    assert capsys.readouterr().out == f"report: {tmp_path / 'run' / 'report.html'}\n"
    html = (tmp_path / "run" / "report.html").read_text()
    assert all(d[:12] in html for d in digests.values())

    assert cli.main(["report", "--config", DEMO_CONFIG, "--set", f"run_dir={tmp_path / 'nothing'}"]) == 1
    err = capsys.readouterr().err
    assert err == f"sar report: error: no run directory at {tmp_path / 'nothing'}: set run_dir (--config, " \
                  "--set run_dir=DIR) to one that `sar run` or a stage wrote\n"
    assert not (tmp_path / "nothing").exists()


# In a real browser -----------------------------------------------------------------------------------
@pytest.mark.ray  # a browser process
def test_report_in_a_headless_browser(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no browser for the report test: {CHROMIUM} not found (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (uv sync)")
    digests = make_run(tmp_path / "run")
    url = write_report(tmp_path / "run")
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
            shot = tmp_path / "page.png"
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

"""The run report: one self-contained HTML page about a run directory, local or on an object store.

Reads (each part optional; a missing one is shown as "not run yet")
    latents/_manifest.json                    the dataset: encoder, grid, rows, updated
    {pretrain,refine}/checkpoints/step_N/meta.json   the newest checkpoint: step, digest, inputs
    {pretrain,refine}/metrics.jsonl           one row per log step: loss, loss_early.., lr, grad_norm,
                                              images_per_s, data_wait_fraction; refine adds loss_tf,
                                              loss_csf, gap_early/middle/late
    {pretrain,refine}/evals.jsonl             one row per in-training evaluation: step, fid, accuracy,
                                              precision, recall, evaluator, num_samples, grid (a path
                                              relative to the stage folder)
    samples/_manifest.json                    the sample set: checkpoint_digest, num_samples, guidance
    eval/metrics.json, eval/grid.png          the final metrics and sample grid
    {stage}/_stage.json                       wall time, images, images/s, input and output digests
                                              (pipelines/rundir.py's `write_stage_record`)
    _tracking.json                            the MLflow run of the run directory (pipelines/tracking.py)
Writes  {run_dir}/report.html, atomically: images are embedded as data URIs, the CSS is inline, and
        nothing is fetched from the network, so the file opens anywhere (a laptop, an object store's
        browser, an e-mail attachment).

Lineage: each link says whether the consumer was made from what the producer holds now
(the checkpoints' `inputs.latents` is the dataset digest, `latents.manifest_digest` of the latents
manifest; refine's `inputs.init` is the pretrain checkpoint's digest; the samples'
`checkpoint_digest` and the metrics' `checkpoint_digest` name the checkpoint sampled).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from pipelines import latents, rundir, storage, tracking

REPORT_FILE = "report.html"
STAGE_FILE = rundir.STAGE_RECORD
# Stage name -> its folder under run_dir.
STAGE_DIRS = {"encode": "latents", "pretrain": "pretrain", "refine": "refine", "sample": "samples", "fid": "eval"}
TRAINING = ("pretrain", "refine")
# Self-token prediction paper (Table 4): FID on ImageNet 256x256, 31 steps, 50,000 samples.
PAPER_FID = {"sar-b": 4.23, "sar-l": 2.52, "sar-h": 2.26}
PAPER_SAMPLES = 50_000
GRID_MAX_PX, THUMB_MAX_PX = 1024, 480
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# Reading the run directory ---------------------------------------------------------------------
@dataclass
class Stage:
    """What the report knows of one stage; None where the stage left nothing."""

    name: str
    folder: str
    record: dict[str, Any] | None = None  # _stage.json
    manifest: dict[str, Any] | None = None  # latents/samples manifest, or eval/metrics.json
    checkpoint: dict[str, Any] | None = None  # newest checkpoint's meta.json, with "_url" and "_time"
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    evals: list[dict[str, Any]] = field(default_factory=list)  # evals.jsonl, each with "_grid" bytes or None
    problems: list[str] = field(default_factory=list)  # unreadable files, named

    @property
    def ran(self) -> bool:
        return bool(self.record or self.manifest or self.checkpoint or self.rows)


class _Reader:
    """Reads files under the run directory; an unreadable file becomes a problem line, never an error."""

    def __init__(self, run_dir: str, storage_options: dict[str, Any] | None):
        self.run_dir, self.so = run_dir.rstrip("/"), storage_options

    def url(self, *parts: str) -> str:
        return storage.join(self.run_dir, *parts)

    def json(self, stage: Stage, *parts: str) -> dict[str, Any] | None:
        url = self.url(*parts)
        try:
            value = storage.read_json(url, self.so)
        except storage.NotFound:
            return None
        except storage.StorageError as err:
            stage.problems.append(str(err))
            return None
        if not isinstance(value, dict):
            stage.problems.append(f"{storage.redact(url)}: expected a JSON object, got {type(value).__name__}")
            return None
        return value

    def jsonl(self, stage: Stage, *parts: str) -> list[dict[str, Any]]:
        url = self.url(*parts)
        try:
            text = storage.read_text(url, self.so)
        except storage.NotFound:
            return []
        except (storage.StorageError, UnicodeDecodeError) as err:
            stage.problems.append(f"{storage.redact(url)}: {err}")
            return []
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                stage.problems.append(f"{storage.redact(url)} line {n}: not valid JSON ({err.msg}); skipped")
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
                stage.problems.append(f"{storage.redact(url)} line {n}: no numeric 'step'; skipped")
                continue
            rows.append(row)
        return rows

    def binary(self, stage: Stage, *parts: str, required: bool = True) -> bytes | None:
        """A file's bytes; a missing one is a problem only when something names it (`required`)."""
        try:
            return storage.read_bytes(self.url(*parts), self.so)
        except storage.NotFound:
            if required:
                stage.problems.append(f"{storage.redact(self.url(*parts))}: not found")
        except storage.StorageError as err:
            stage.problems.append(str(err))
        return None

    def mtime(self, *parts: str) -> str | None:
        """The modification time of a file as ISO UTC, when the filesystem tells it."""
        try:
            fs, path = storage.filesystem(self.url(*parts), self.so)
            info = fs.info(path)
        except (OSError, ValueError):
            return None
        t = info.get("mtime") or info.get("LastModified") or info.get("created")
        if isinstance(t, datetime.datetime):
            return t.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return _iso(float(t)) if isinstance(t, (int, float)) else None

    def newest_checkpoint(self, stage: Stage) -> dict[str, Any] | None:
        """meta.json of the newest committed checkpoint (a folder without meta.json is not one)."""
        names = storage.listdir(self.url(stage.folder, "checkpoints"), self.so)
        for name in sorted((n for n in names if _STEP_DIR.match(n)), key=lambda n: int(n[5:]), reverse=True):
            meta = self.json(stage, stage.folder, "checkpoints", name, "meta.json")
            if meta is not None:
                return {**meta, "_url": storage.redact(self.url(stage.folder, "checkpoints", name)),
                        "_time": self.mtime(stage.folder, "checkpoints", name, "meta.json")}
        return None


def collect(run_dir: str, storage_options: dict[str, Any] | None = None) -> dict[str, Stage]:
    """Every stage's files, read once."""
    r = _Reader(run_dir, storage_options)
    stages = {name: Stage(name, folder) for name, folder in STAGE_DIRS.items()}
    for s in stages.values():
        s.record = r.json(s, s.folder, STAGE_FILE)
    enc = stages["encode"]
    enc.manifest = r.json(enc, enc.folder, "_manifest.json")
    if enc.manifest is not None:
        enc.manifest["_time"] = r.mtime(enc.folder, "_manifest.json")
    for name in TRAINING:
        s = stages[name]
        s.checkpoint = r.newest_checkpoint(s)
        s.rows = r.jsonl(s, s.folder, "metrics.jsonl")
        s.evals = r.jsonl(s, s.folder, "evals.jsonl")
        for row in s.evals:
            grid = row.get("grid")
            row["_grid"] = r.binary(s, s.folder, *grid.split("/")) if isinstance(grid, str) and grid else None
    smp = stages["sample"]
    smp.manifest = r.json(smp, smp.folder, "_manifest.json")
    if smp.manifest is not None:
        smp.manifest["_time"] = r.mtime(smp.folder, "_manifest.json")
    ev = stages["fid"]
    ev.manifest = r.json(ev, ev.folder, "metrics.json")
    if ev.manifest is not None:
        ev.manifest["_time"] = r.mtime(ev.folder, "metrics.json")
        ev.manifest["_grid"] = r.binary(ev, ev.folder, "grid.png", required=False)
    return stages


# Formatting --------------------------------------------------------------------------------------
def esc(value: Any) -> str:
    """Any value as escaped HTML text."""
    return html.escape("" if value is None else str(value), quote=True)


def short(digest: Any, n: int = 12) -> str:
    return str(digest)[:n] if digest else "—"


def num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—" if value is None else esc(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or seconds < 0:
        return "—"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _when(iso: Any) -> str:
    return esc(str(iso).replace("T", " ").replace("Z", " UTC")) if iso else "—"


def image_uri(data: bytes, max_px: int) -> str | None:
    """A data URI of the image, scaled down to `max_px` on its long side; None when it is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    if max(im.size) > max_px:
        im.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if im.width * im.height > 256 * 256:  # photographs: JPEG is a tenth of the size
        im.save(buf, format="JPEG", quality=90)
        mime = "image/jpeg"
    else:
        im.save(buf, format="PNG")
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{esc(alt)}">'


# Figures ----------------------------------------------------------------------------------------
def _figure(draw, height_ratios: tuple[int, ...] = (1,)) -> str:
    """A matplotlib figure made by `draw(*axes)` (stacked, sharing x) as a PNG data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.grid": True, "grid.alpha": 0.3}):
        fig, axes = plt.subplots(len(height_ratios), 1, figsize=(6.0, 3.4), dpi=130, sharex=True,
                                 gridspec_kw={"height_ratios": height_ratios}, squeeze=False)
        try:
            draw(*axes[:, 0])
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
        finally:
            plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot_lines(rows: list[dict[str, Any]], keys: list[str], title: str, ylabel: str) -> str | None:
    present = [k for k in keys if _series(rows, k)[0]]
    if not present:
        return None

    def draw(ax):
        for k in present:
            xs, ys = _series(rows, k)
            ax.plot(xs, ys, label=k, lw=1.8 if k in ("loss", "fid") else 1.1, marker="o" if len(xs) < 12 else None,
                    ms=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8, frameon=False)

    return _figure(draw)


def figures(stages: dict[str, Stage]) -> list[tuple[str, str]]:
    """(caption, data URI) of every figure the run's metrics allow."""
    out = []
    for name in TRAINING:
        rows = stages[name].rows
        keys = ["loss", "loss_tf", "loss_csf", "loss_early", "loss_middle", "loss_late"]
        fig = _plot_lines(rows, keys, f"{name}: training loss", "loss")
        if fig:
            out.append((f"{name} loss (metrics.jsonl)", fig))
    fig = _plot_lines(stages["refine"].rows, ["gap_early", "gap_middle", "gap_late"],
                      "refine: exposure gap (student vs teacher)", "mean squared gap")
    if fig:
        out.append(("refine exposure gap by group third", fig))
    # Across stages the step axis runs on: refine's step 0 is where pretrain stopped.
    offset = {"pretrain": 0, "refine": pretrain_end(stages["pretrain"])}

    def mark_refine(ax):
        if offset["refine"] and (stages["refine"].rows or stages["refine"].evals):
            ax.axvline(offset["refine"], color="#9aa3b2", ls=":", lw=1)

    def shifted(name, rows, key):
        xs, ys = _series(rows, key)
        return [x + offset[name] for x in xs], ys

    if any(isinstance(r.get("fid"), (int, float)) for n in TRAINING for r in stages[n].evals):
        def draw(ax):
            for name in TRAINING:
                for evaluator in sorted({str(r.get("evaluator")) for r in stages[name].evals}):
                    xs, ys = shifted(name, [r for r in stages[name].evals if str(r.get("evaluator")) == evaluator],
                                     "fid")
                    if xs:
                        ax.plot(xs, ys, marker="o", ms=4, lw=1.5, label=f"{name} ({evaluator})")
            mark_refine(ax)
            ax.set_title("quality over training")
            ax.set_xlabel("step (refine continues after pretrain)")
            ax.set_ylabel("FID (lower is better)")
            ax.legend(fontsize=8, frameon=False)
        out.append(("FID of the in-training evaluations (evals.jsonl)", _figure(draw)))
    if any(_series(stages[n].rows, "images_per_s")[0] for n in TRAINING):
        def draw(top, bottom):
            for name in TRAINING:
                xs, ys = shifted(name, stages[name].rows, "images_per_s")
                if xs:
                    top.plot(xs, ys, lw=1.3, label=name)
                xs, ys = shifted(name, stages[name].rows, "data_wait_fraction")
                if xs:
                    bottom.plot(xs, ys, lw=1.1, label=name)
            for ax in (top, bottom):
                mark_refine(ax)
            top.set_title("training throughput")
            top.set_ylabel("images/s")
            top.set_ylim(bottom=0)
            top.legend(fontsize=8, frameon=False, loc="lower left")
            bottom.set_ylabel("data wait")
            bottom.set_ylim(0, 1)
            bottom.set_xlabel("step (refine continues after pretrain)")
        out.append(("images/s and the fraction of each log interval spent waiting for data",
                    _figure(draw, height_ratios=(3, 1))))
    return out


def pretrain_end(pre: Stage) -> int:
    """The step pretrain stopped at: its newest checkpoint, else its last metrics row."""
    step = (pre.checkpoint or {}).get("step")
    if isinstance(step, int):
        return step
    return int(pre.rows[-1]["step"]) if pre.rows else 0


# Sections -----------------------------------------------------------------------------------------
NOT_RUN = '<p class="missing">not run yet</p>'


def _link(consumer_input: Any, producer_digest: Any, producer: str) -> str:
    """Whether a consumer was made from what the producer holds now."""
    if not consumer_input:
        return '<span class="muted">input not recorded</span>'
    if producer_digest and consumer_input == producer_digest:
        return f'<span class="ok">&#10003; made from this {esc(producer)}</span>'
    return f'<span class="warn">&#8800; made from {esc(short(consumer_input))}</span>'


def _card(title: str, digest: Any, facts: list[tuple[str, str]], when: Any, link: str = "",
          digest_of: str = "digest") -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in facts)
    return (f'<div class="card"><h3>{esc(title)}</h3><div class="digest" title="{esc(digest)}">'
            f'<span class="label">{esc(digest_of)}</span> {esc(short(digest))}</div>'
            f'<table class="facts">{rows}</table><div class="when">{_when(when)}</div>'
            f'{f"<div class=link>{link}</div>" if link else ""}</div>')


def _missing_card(title: str, why: str = "not run yet") -> str:
    return f'<div class="card empty"><h3>{esc(title)}</h3><p class="missing">{esc(why)}</p></div>'


def lineage(stages: dict[str, Stage]) -> str:
    enc, pre, ref, smp, ev = (stages[k] for k in STAGE_DIRS)
    cards = []
    data_digest = latents.manifest_digest({k: v for k, v in enc.manifest.items() if not k.startswith("_")}) \
        if enc.manifest else None
    if enc.manifest:
        m = enc.manifest
        grid = m.get("grid")
        cards.append(_card("dataset", data_digest, [
            ("encoder", esc(m.get("encoder"))),
            ("grid", esc("×".join(str(g) for g in grid)) if isinstance(grid, list) else esc(grid)),
            ("rows", num(m.get("num_rows", m.get("rows")))),
            ("classes", num(m.get("num_classes")))], m.get("updated") or m.get("_time")))
    else:
        cards.append(_missing_card("dataset"))
    digests: dict[str, Any] = {}
    for s, key, producer in ((pre, "latents", "dataset"), (ref, "init", "pretrain checkpoint")):
        meta = s.checkpoint
        if not meta:
            cards.append(_missing_card(f"{s.name} checkpoint"))
            continue
        digests[s.name] = meta.get("digest")
        steps = ((meta.get("config") or {}).get(s.name) or {}).get("steps")
        inputs = meta.get("inputs") or {}
        upstream = data_digest if s.name == "pretrain" else digests.get("pretrain")
        finished = (s.record or {}).get("finished") or meta.get("_time")
        cards.append(_card(f"{s.name} checkpoint", meta.get("digest"), [
            ("step", f"{num(meta.get('step'))}" + (f" of {num(steps)}" if steps else "")),
            ("from", esc(short(inputs.get(key))))], finished, _link(inputs.get(key), upstream, producer)))
    newest = digests.get("refine") or digests.get("pretrain")
    if smp.manifest:
        m = smp.manifest
        which = "refine" if digests.get("refine") else "pretrain"
        guidance = m.get("guidance") or {}
        cards.append(_card("samples", m.get("checkpoint_digest"), [
            ("images", num(m.get("num_samples"))),
            ("checkpoint step", num(m.get("checkpoint_step"))),
            ("guidance", esc(guidance.get("kind") if isinstance(guidance, dict) else guidance)),
            ("flow steps", num(m.get("flow_steps")))],
            (smp.record or {}).get("finished") or m.get("_time"),
            _link(m.get("checkpoint_digest"), newest, f"{which} checkpoint"), digest_of="checkpoint"))
    else:
        cards.append(_missing_card("samples"))
    if ev.manifest:
        m = ev.manifest
        cards.append(_card("metrics", m.get("checkpoint_digest"), [
            ("FID", num(m.get("fid"))), ("images", num(m.get("num_samples")))],
            (ev.record or {}).get("finished") or m.get("_time"),
            _link(m.get("checkpoint_digest"), (smp.manifest or {}).get("checkpoint_digest"), "sample set"),
            digest_of="checkpoint"))
    else:
        cards.append(_missing_card("metrics"))
    arrow = '<div class="arrow">&#8594;</div>'
    return f'<div class="lineage">{arrow.join(cards)}</div>'


def _digest_list(named: Any) -> str:
    if not isinstance(named, dict) or not named:
        return "—"
    return "<br>".join(f"{esc(k)} <code>{esc(short(v))}</code>" for k, v in named.items())


def stage_table(stages: dict[str, Stage]) -> str:
    head = ("<tr><th>stage</th><th>started</th><th>finished</th><th>wall</th><th>images</th><th>images/s</th>"
            "<th>inputs</th><th>outputs</th></tr>")
    rows = []
    for s in stages.values():
        rec = s.record
        if rec:
            rows.append(f"<tr><td>{esc(s.name)}</td><td>{_when(rec.get('started'))}</td>"
                        f"<td>{_when(rec.get('finished'))}</td><td>{duration(rec.get('wall_s'))}</td>"
                        f"<td>{num(rec.get('images'))}</td><td>{num(rec.get('images_per_s'), 3)}</td>"
                        f"<td>{_digest_list(rec.get('inputs'))}</td><td>{_digest_list(rec.get('outputs'))}</td></tr>")
        elif s.rows:  # a training stage without its record: what the metrics rows show
            _, rates = _series(s.rows, "images_per_s")
            rate = sorted(rates)[len(rates) // 2] if rates else None
            rows.append(f"<tr><td>{esc(s.name)}</td><td colspan=3 class=muted>no {STAGE_FILE}; from metrics.jsonl: "
                        f"{len(s.rows)} rows to step {num(s.rows[-1]['step'])}</td><td>—</td>"
                        f"<td>{num(rate, 3)} <span class=muted>(median)</span></td><td>—</td><td>—</td></tr>")
        elif s.ran:
            rows.append(f"<tr><td>{esc(s.name)}</td><td colspan=7 class=muted>ran; no {STAGE_FILE}</td></tr>")
        else:
            rows.append(f"<tr><td>{esc(s.name)}</td><td colspan=7 class=missing>not run yet</td></tr>")
    return f'<table class="grid">{head}{"".join(rows)}</table>'


def evals_section(stages: dict[str, Stage]) -> str:
    parts = []
    for name in TRAINING:
        evals = stages[name].evals
        if not evals:
            continue
        rows, thumbs = [], []
        for r in evals:
            rows.append(f"<tr><td>{num(r.get('step'))}</td><td>{esc(r.get('evaluator'))}</td>"
                        f"<td>{num(r.get('num_samples'))}</td><td>{num(r.get('fid'))}</td>"
                        f"<td>{num(r.get('accuracy'))}</td><td>{num(r.get('precision'))}</td>"
                        f"<td>{num(r.get('recall'))}</td></tr>")
            uri = image_uri(r["_grid"], THUMB_MAX_PX) if r.get("_grid") else None
            if r.get("_grid") and uri is None:
                stages[name].problems.append(f"{name}/{r.get('grid')}: not an image")
            if uri:
                alt = f"{name} samples at step {r.get('step')}"
                caption = f"step {num(r.get('step'))} · {esc(r.get('evaluator'))} FID {num(r.get('fid'))}"
                thumbs.append(f"<figure>{_img(uri, alt)}<figcaption>{caption}</figcaption></figure>")
        head = ("<tr><th>step</th><th>evaluator</th><th>samples</th><th>FID</th><th>accuracy</th><th>precision</th>"
                "<th>recall</th></tr>")
        parts.append(f"<h3>{esc(name)}</h3><table class=\"grid\">{head}{''.join(rows)}</table>"
                     f"<div class=\"thumbs\">{''.join(thumbs)}</div>")
    return "".join(parts) or '<p class="missing">no in-training evaluations yet (evals.jsonl)</p>'


def final_section(stages: dict[str, Stage]) -> str:
    m = stages["fid"].manifest
    if not m:
        return NOT_RUN
    preset = ((m.get("config") or {}).get("model") or {}).get("preset")
    paper = PAPER_FID.get(str(preset).lower()) if preset else None
    isc = m.get("inception_score") if isinstance(m.get("inception_score"), dict) else {}
    ref = (f"{paper} <span class=muted>({esc(str(preset).upper())}, 31 steps, ImageNet 256×256)</span>"
           if paper is not None else f'<span class=muted>no paper reference for preset "{esc(preset)}"</span>')
    rows = [("FID", num(m.get("fid")), ref),
            ("Inception Score", f"{num(isc.get('mean'))} ± {num(isc.get('std'), 3)}" if isc else "—", "—"),
            ("precision", num(m.get("precision")), "—"), ("recall", num(m.get("recall")), "—"),
            ("samples", num(m.get("num_samples")), f"{PAPER_SAMPLES:,}" if paper is not None else "—")]
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td><td>{p}</td></tr>" for k, v, p in rows)
    left = f'<table class="grid metrics"><tr><th></th><th>this run</th><th>paper</th></tr>{body}</table>'
    n = m.get("num_samples")
    if paper is not None and isinstance(n, int) and n < PAPER_SAMPLES:
        left += (f'<p class="note">FID from {n:,} samples is biased upward against the paper\'s {PAPER_SAMPLES:,}; '
                 "compare numbers made with the same count.</p>")
    dom = m.get("domain")
    if isinstance(dom, dict) and dom:
        cells = "".join(f"<tr><th>{esc(k)}</th><td>{num(v)}</td></tr>" for k, v in dom.items())
        left += f'<h3>domain evaluator</h3><table class="grid metrics">{cells}</table>'
    skipped = m.get("skipped")
    if isinstance(skipped, dict) and skipped:
        items = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in skipped.items())
        left += f'<h3>not computed</h3><ul class="skipped">{items}</ul>'
    grid = m.get("_grid")
    uri = image_uri(grid, GRID_MAX_PX) if grid else None
    if grid and uri is None:
        stages["fid"].problems.append("eval/grid.png: not an image")
    right = (f'<figure class="final-grid">{_img(uri, "final sample grid")}<figcaption>eval/grid.png: '
             f'{num(n)} samples of the checkpoint {esc(short(m.get("checkpoint_digest")))}</figcaption></figure>'
             if uri else "")
    return f'<div class="final"><div>{left}</div>{right}</div>'


CSS = """
:root{--fg:#1d2430;--muted:#6b7280;--line:#e3e6eb;--bg:#f6f7f9;--card:#fff;--ok:#0f7b3f;--warn:#b45309;--acc:#2f5bd3}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
 font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
header{background:#18212f;color:#fff;padding:20px 32px}
header h1{margin:0 0 4px;font-size:22px;font-weight:600}
header .sub{color:#b9c2d0;font-size:13px}
header code{color:#e6ebf2}
.chips{margin-top:10px}
.chip{display:inline-block;margin:0 6px 4px 0;padding:2px 10px;border-radius:12px;font-size:12px;
 background:#2b3648;color:#cfd6e2}
.chip.done{background:#1f6f43;color:#fff}
main{max-width:1280px;margin:0 auto;padding:8px 32px 40px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:16px 20px;margin:18px 0}
h2{margin:0 0 12px;font-size:17px}
h3{margin:14px 0 8px;font-size:14px}
.lineage{display:flex;align-items:stretch;gap:6px;overflow-x:auto}
.card{flex:1 1 0;min-width:170px;border:1px solid var(--line);border-radius:6px;padding:10px 12px;background:#fbfcfd}
.card h3{margin:0 0 4px;font-size:13px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted)}
.card.empty{background:repeating-linear-gradient(45deg,#fafafa,#fafafa 6px,#f2f3f5 6px,#f2f3f5 12px)}
.digest{font:600 13px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;color:var(--acc);margin-bottom:6px}
.digest .label{font:11px -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Arial,sans-serif;color:var(--muted)}
.facts th{font-weight:normal;color:var(--muted);text-align:left;padding:1px 8px 1px 0}
.facts td{padding:1px 0}
.when{color:var(--muted);font-size:12px;margin-top:6px}
.link{font-size:12px;margin-top:4px}
.arrow{align-self:center;color:#9aa3b2;font-size:20px}
.ok{color:var(--ok)} .warn{color:var(--warn)} .muted{color:var(--muted)}
.missing{color:var(--muted);font-style:italic;margin:4px 0}
table.grid{border-collapse:collapse;width:100%;font-size:13px}
table.grid th,table.grid td{border-bottom:1px solid var(--line);padding:5px 8px;text-align:left;vertical-align:top}
table.grid th{background:#f3f5f8;font-weight:600}
table.metrics{width:auto;min-width:420px}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:14px}
figure{margin:0}
figure img{width:100%;height:auto;border:1px solid var(--line);border-radius:4px;background:#fff;display:block}
figcaption{color:var(--muted);font-size:12px;margin-top:4px}
.thumbs{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px;margin-top:12px}
.final{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.final>div{flex:1 1 420px}
figure.final-grid{flex:1 1 460px;max-width:640px}
.note{color:var(--warn);font-size:13px}
.problems li{color:var(--warn)}
footer{color:var(--muted);font-size:12px;text-align:center;padding:10px}
"""


def render(run_dir: str, stages: dict[str, Stage], tracking_line: str | None = None) -> str:
    """The report page."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    name = storage.redact(run_dir).rstrip("/").rsplit("/", 1)[-1] or run_dir
    chips = "".join(f'<span class="chip{" done" if s.ran else ""}">{esc(s.name)}</span>' for s in stages.values())
    figs = figures(stages)
    fig_html = ("<div class=\"figs\">" + "".join(f"<figure>{_img(uri, cap)}<figcaption>{esc(cap)}</figcaption></figure>"
                                                for cap, uri in figs) + "</div>") if figs else \
        '<p class="missing">no training metrics yet (metrics.jsonl)</p>'
    sections = [("Lineage", lineage(stages)), ("Stages", stage_table(stages)), ("Training curves", fig_html),
                ("Quality over training", evals_section(stages)), ("Final metrics", final_section(stages))]
    problems = [p for s in stages.values() for p in s.problems]
    if problems:
        items = "".join(f"<li>{esc(p)}</li>" for p in problems)
        sections.append(("Files that could not be read", f'<ul class="problems">{items}</ul>'))
    body = "".join(f"<section><h2>{esc(title)}</h2>{content}</section>" for title, content in sections)
    foot = esc(tracking_line) if tracking_line else ""
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>SAR run report: {esc(name)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>SAR run report: {esc(name)}</h1>"
            f"<div class=\"sub\"><code>{esc(storage.redact(run_dir))}</code>"
            f" &middot; generated {esc(now)}</div><div class=\"chips\">{chips}</div></header>"
            f"<main>{body}</main><footer>{foot}</footer></body></html>\n")


def write_report(run_dir: str, storage_options: dict[str, Any] | None = None) -> str:
    """Write `{run_dir}/report.html` from whatever the run directory holds; returns its URL."""
    stages = collect(run_dir, storage_options)
    tracking_line = None
    try:
        record = storage.read_json(storage.join(run_dir, tracking.RECORD), storage_options)
        tracking_line = f"MLflow run {record.get('run_id')} (store: {record.get('store')})"
    except (storage.StorageError, AttributeError):
        pass
    url = storage.join(run_dir, REPORT_FILE)
    storage.write_text(url, render(run_dir, stages, tracking_line), storage_options)
    return url

"""The run report: one self-contained HTML page about a run directory, local or on an object store.

Reads   what collect.py reads of each stage's output folder (every part optional).
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
import math
from typing import Any, Mapping

from pipelines.core import storage
from pipelines.core.rundir import STAGE_RECORD
from pipelines.data import latents
from pipelines.evaluate.fidelity import GRID_FILE
from pipelines.report.collect import STAGE_NAMES, TRAINING, StageFiles, collect, tracking_line
from pipelines.train.plan import Plan

REPORT_FILE = "report.html"
# Self-token prediction paper (Table 4): FID on ImageNet 256x256, 31 steps, 50,000 samples.
PAPER_FID = {"sar-b": 4.23, "sar-l": 2.52, "sar-h": 2.26}
PAPER_SAMPLES = 50_000
GRID_MAX_PX, THUMB_MAX_PX = 1024, 480


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


def figures(stages: dict[str, StageFiles]) -> list[tuple[str, str]]:
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


def pretrain_end(pre: StageFiles) -> int:
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


def lineage(stages: dict[str, StageFiles]) -> str:
    enc, pre, ref, smp, ev = (stages[k] for k in STAGE_NAMES)
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
        dom = m.get("domain") if isinstance(m.get("domain"), dict) else {}
        if m.get("fid") is None and dom:
            headline = [("domain FID", num(dom.get("fid")))]
        else:
            headline = [("FID", num(m.get("fid")))]
        cards.append(_card("metrics", m.get("checkpoint_digest"), [
            *headline, ("images", num(m.get("num_samples"))), *scorer_facts(m)],
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


def stage_table(stages: dict[str, StageFiles]) -> str:
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
            rows.append(f"<tr><td>{esc(s.name)}</td><td colspan=3 class=muted>no {STAGE_RECORD}; from metrics.jsonl: "
                        f"{len(s.rows)} rows to step {num(s.rows[-1]['step'])}</td><td>—</td>"
                        f"<td>{num(rate, 3)} <span class=muted>(median)</span></td><td>—</td><td>—</td></tr>")
        elif s.ran:
            rows.append(f"<tr><td>{esc(s.name)}</td><td colspan=7 class=muted>ran; no {STAGE_RECORD}</td></tr>")
        else:
            rows.append(f"<tr><td>{esc(s.name)}</td><td colspan=7 class=missing>not run yet</td></tr>")
    return f'<table class="grid">{head}{"".join(rows)}</table>'


def evals_section(stages: dict[str, StageFiles]) -> str:
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


def scorer_facts(m: dict[str, Any]) -> list[tuple[str, str]]:
    """What scored a set (the lineage's place for paths and digests): the domain evaluator's file, or
    the Inception weights and reference."""
    dom = m.get("domain") if isinstance(m.get("domain"), dict) else {}
    ev = dom.get("evaluator") if isinstance(dom.get("evaluator"), dict) else None
    if ev:
        acc = ev.get("heldout_accuracy")
        return [("evaluator", f'<code title="{esc(ev.get("path"))}">{esc(short(ev.get("sha256")))}</code>'),
                ("its accuracy", pct(acc) if isinstance(acc, (int, float)) else "—")]
    facts = []
    if m.get("inception_weights_id"):
        facts.append(("Inception", f'<code title="{esc(m.get("inception_weights"))}">'
                                   f'{esc(short(str(m["inception_weights_id"]).removeprefix("sha256:")))}</code>'))
    if m.get("reference"):
        facts.append(("reference", f'<span title="{esc(m["reference"])}">{esc(str(m["reference"]).rsplit("/", 1)[-1])}</span>'))
    return facts


def pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _mean_std(d: Any, digits: int = 4) -> str:
    """`mean ± std` of a {mean, std} dict; — when absent."""
    if not isinstance(d, dict) or not isinstance(d.get("mean"), (int, float)):
        return "—"
    return f"{num(d['mean'], digits)} ± {num(d.get('std'), 2)}"


def _sets(n: Any, m: Any) -> str:
    return f"{num(n)} vs {num(m)}" if n is not None and m is not None else "—"


def inception_rows(m: dict[str, Any], paper: float | None, preset: Any) -> list[tuple[str, str, str, str]]:
    """(metric, this run, set sizes, paper) rows of torch-fidelity's Inception metrics."""
    n, isc = m.get("num_samples"), m.get("inception_score")
    ref = (f"{paper} <span class=muted>({esc(str(preset).upper())}, 31 steps, ImageNet 256×256, "
           f"{PAPER_SAMPLES:,} samples)</span>" if paper is not None
           else f'<span class=muted>no paper reference for preset "{esc(preset)}"</span>')
    ref_count = m.get("reference_count") or ("statistics" if m.get("reference") else None)
    splits = isc.get("splits") if isinstance(isc, dict) else None
    return [("FID (lower is better)", num(m.get("fid")), _sets(n, ref_count), ref),
            ("Inception Score", _mean_std(isc), f"{num(n)} in {num(splits)} splits" if splits else num(n), "—"),
            ("precision (k=3)", num(m.get("precision")), _sets(n, ref_count), "—"),
            ("recall (k=3)", num(m.get("recall")), _sets(n, ref_count), "—")]


def domain_rows(dom: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, samples, real floor, set sizes) rows of the domain evaluator's metrics: the samples against
    the reference images, and real images against the same reference (the floor, `floor` or, in files
    written before it had that name, `real_heldout`)."""
    floor = dom.get("floor") or dom.get("real_heldout") or {}
    n, m = dom.get("num_samples"), dom.get("num_reference")
    fn, fm = floor.get("num_samples"), floor.get("num_reference")
    sets = f"samples {_sets(n, m)}" + (f"; floor {_sets(fn, fm)}" if floor else "")
    kid = dom.get("kid") if isinstance(dom.get("kid"), dict) else None
    dis = dom.get("domain_is") if isinstance(dom.get("domain_is"), dict) else None
    return [("domain FID (lower is better)", num(dom.get("fid")), num(floor.get("fid")), sets),
            ("KID", _mean_std(kid, 3), "—",
             f"{num(kid.get('subsets'))} subsets of {num(kid.get('subset_size'))}" if kid else "—"),
            ("precision (k=3)", num(dom.get("precision")), num(floor.get("precision")), sets),
            ("recall (k=3)", num(dom.get("recall")), num(floor.get("recall")), sets),
            ("class accuracy", pct(dom.get("accuracy")), pct(floor.get("accuracy")),
             f"of {num(n)}" + (f"; floor of {num(fn)}" if fn is not None else "")),
            ("domain Inception Score", _mean_std(dis), "—", f"{num(dis.get('splits'))} splits" if dis else "—")]


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr><th>" + esc(r[0]) + "</th>" + "".join(f"<td>{c}</td>" for c in r[1:]) + "</tr>" for r in rows)
    return f'<table class="grid metrics"><tr>{th}</tr>{body}</table>'


def final_section(stages: dict[str, StageFiles]) -> str:
    m = stages["fid"].manifest
    if not m:
        return NOT_RUN
    preset = ((m.get("config") or {}).get("model") or {}).get("preset")
    paper = PAPER_FID.get(str(preset).lower()) if preset else None
    left = ""
    if m.get("evaluator", "inception") != "domain" or m.get("fid") is not None:
        left += _table(("", "this run", "sets", "paper"), inception_rows(m, paper, preset))
        n = m.get("num_samples")
        if paper is not None and isinstance(n, int) and n < PAPER_SAMPLES:
            left += (f'<p class="note">FID from {n:,} samples is biased upward against the paper\'s {PAPER_SAMPLES:,}; '
                     "compare numbers made with the same count.</p>")
    dom = m.get("domain")
    if isinstance(dom, dict) and dom:
        left += ('<h3>domain evaluator</h3>' + _table(("", "samples", "real floor", "sets"), domain_rows(dom))
                 + '<p class="muted">FIDs compare only between sets of the same sizes: the floor scores real '
                 "images against the same reference.</p>")
        notes = [n for n in ((dom.get("floor") or {}).get("note"), (dom.get("kid") or {}).get("note")
                             if isinstance(dom.get("kid"), dict) else None) if n]
        left += "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    skipped = {**(m.get("skipped") if isinstance(m.get("skipped"), dict) else {}),
               **{f"domain {k}": v for k, v in ((dom or {}).get("skipped") or {}).items()}}
    if skipped:
        items = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in skipped.items())
        left += f'<h3>not computed</h3><ul class="skipped">{items}</ul>'
    grid, grid_name = m.get("_grid"), storage.redact(storage.join(stages["fid"].url, GRID_FILE))
    uri = image_uri(grid, GRID_MAX_PX) if grid else None
    if grid and uri is None:
        stages["fid"].problems.append(f"{grid_name}: not an image")
    right = (f'<figure class="final-grid">{_img(uri, "final sample grid")}<figcaption>{esc(grid_name)}: '
             f'{num(m.get("num_samples"))} samples of the checkpoint {esc(short(m.get("checkpoint_digest")))}'
             f'</figcaption></figure>' if uri else "")
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
table.plan th.sec{background:#fff;padding-top:10px;text-transform:uppercase;font-size:11px;color:var(--muted)}
table.plan td.num{text-align:right;white-space:nowrap}
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


def plan_section(plan: Plan) -> str:
    """The run's plan (pipelines/train/plan.py), figure by figure with where each comes from."""
    rows, section = [], None
    for sec, what, value, source in plan.table():
        if sec != section:
            rows.append(f'<tr><th colspan="3" class="sec">{esc(sec)}</th></tr>')
            section = sec
        rows.append(f"<tr><td>{esc(what)}</td><td class=num>{esc(value)}</td><td class=muted>{esc(source)}</td></tr>")
    notes = "".join(f'<p class="muted">{esc(n)}</p>' for n in plan.notes)
    return (f'<p>{esc(plan.title)}</p><table class="grid plan">{"".join(rows)}</table>{notes}'
            '<p class="muted">`sar plan` prints the same; measured figures come from docs/benchmarks.md, projected '
            "ones are arithmetic on them.</p>")


def render(run_dir: str, stages: dict[str, StageFiles], tracking_line: str | None = None,
           plan: Plan | None = None) -> str:
    """The report page; with `plan`, a section of the run's plan."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    name = storage.redact(run_dir).rstrip("/").rsplit("/", 1)[-1] or run_dir
    chips = "".join(f'<span class="chip{" done" if s.ran else ""}">{esc(s.name)}</span>' for s in stages.values())
    figs = figures(stages)
    fig_html = ("<div class=\"figs\">" + "".join(f"<figure>{_img(uri, cap)}<figcaption>{esc(cap)}</figcaption></figure>"
                                                for cap, uri in figs) + "</div>") if figs else \
        '<p class="missing">no training metrics yet (metrics.jsonl)</p>'
    sections = [("Lineage", lineage(stages)), ("Stages", stage_table(stages)), ("Training curves", fig_html),
                ("Quality over training", evals_section(stages)), ("Final metrics", final_section(stages))]
    if plan is not None:
        sections.append(("Plan", plan_section(plan)))
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


def write_report(run_dir: str, outputs: Mapping[str, str], storage_options: dict[str, Any] | None = None,
                 plan: Plan | None = None) -> str:
    """Write `{run_dir}/report.html` from whatever the stages' folders hold (`outputs`: stage name ->
    its output folder) and the run's `plan`; returns the page's URL."""
    stages = collect(outputs, storage_options)
    url = storage.join(run_dir, REPORT_FILE)
    storage.write_text(url, render(run_dir, stages, tracking_line(run_dir, storage_options), plan), storage_options)
    return url

"""Run reports: a markdown + HTML page with plots, from a run's lineage.

A lineage is the dict the distill flow registers with a model version (and that a version's
``manifest.json`` holds): ``metrics`` {teacher, sft_student, opd_student: {accuracy, sampled_accuracy, reverse_kl, n}},
``gates`` {passed, checks}, ``rounds`` [per-round metrics], ``cost`` [per-phase ledger rows],
``run_key``, ``flow_run_id``.  `lineage_from_run_dir` rebuilds one from a run directory's
``done.json`` files (a run that never got registered); `lineage_from_registry` reads a manifest.

Pure functions over dicts and paths: no Prefect here (`tasks.stages.report` wraps this).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from opd.records import RoundMetrics, RunLayout, read_done
from opd_ops.gates import verdict

SAVED_LINEAGE = "lineage.json"  # build_report writes the lineage it rendered next to the report
PLOT_DPI = 100
ARTIFACT_DPI = 60  # plots embedded into a Prefect artifact as data URIs: keep the payload small

EVAL_LABELS = {"teacher": "teacher", "sft_student": "student after SFT", "opd_student": "student after OPD",
               "incumbent": "incumbent", "candidate": "candidate"}
TIMING_KEYS = RoundMetrics.TIMINGS
ROUND_COLUMNS = ("round", "reverse_kl", "eval_slice_accuracy", "student_entropy", "loss", "grad_norm",
                 "mean_completion_tokens", "eos_fraction", *TIMING_KEYS)
ROUND_COLUMNS_COMPACT = ("round", "reverse_kl", "eval_slice_accuracy", "student_entropy", *TIMING_KEYS)
COST_COLUMNS = ("phase", "wall_s", "student_train_tokens", "student_train_flops", "sample_tokens", "sample_flops",
                "teacher_tokens", "teacher_flops")


@dataclass(frozen=True)
class Report:
    out_dir: Path
    markdown: Path  # report.md, images linked as relative PNG paths
    html: Path  # report.html, self-contained (PNGs embedded as base64)
    plots: dict[str, Path] = field(default_factory=dict)  # "metrics" / "timings" -> PNG
    lineage: Path | None = None  # the lineage.json the report was rendered from

    @property
    def paths(self) -> list[Path]:
        return [self.html, self.markdown, *self.plots.values(), *([self.lineage] if self.lineage else [])]


# ------------------------------------------------------------------------------ lineage sources

def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def lineage_from_run_dir(run_dir: str | Path) -> dict:
    """A lineage-like dict from a run directory, for runs that were never registered (or are still going).

    Per-round metrics and the cost ledger come from the completed stages' ``done.json``.
    Evaluation and gates are not stored by the stages; they come from ``report/lineage.json``
    when the flow got as far as writing its report.
    """
    run = RunLayout(Path(run_dir))
    if not run.root.is_dir():
        raise FileNotFoundError(f"no run directory {run.root}")
    lin: dict = {"run_key": run.root.name, "source": f"run directory {run.root}", "metrics": {}, "gates": {},
                 "rounds": [], "cost": []}
    sft = read_done(run.sft)
    if sft:
        lin["sft"] = sft.get("metrics", {})
        lin["student_params"] = sft.get("params")
        lin["cost"] += [c for c in (sft.get("data_cost"), sft.get("cost")) if c]
    for d in run.rounds():  # completed rounds only: one in progress or crashed is not part of the run (yet)
        meta = read_done(d)
        lin["rounds"].append(RoundMetrics.from_dict(meta.get("metrics", {})).as_dict())
        if meta.get("cost"):
            lin["cost"].append(meta["cost"])
    if (reg := _read_json(run.registered)) is not None:
        lin["registered"] = reg
    if (saved := _read_json(run.report / SAVED_LINEAGE)) is not None:
        saved.pop("source", None)
        lin.update({k: v for k, v in saved.items() if v not in (None, {}, [])})
    return lin


def lineage_from_registry(s3, bucket: str, prefix: str, ref: str) -> dict:
    """The lineage a model version was registered with (its manifest), for MODEL, MODEL:N or MODEL@alias."""
    from opd_ops.registry.refs import resolve
    from opd_ops.registry.store import read_manifest

    model, version = resolve(s3, bucket, prefix, ref)
    man = read_manifest(s3, bucket, prefix, model, version)
    lin = {k: v for k, v in man.items() if k != "files"}
    lin["registered"] = {"model": model, "version": version,
                         "uri": f"s3://{bucket}/{prefix.strip('/')}/{model}/versions/{version}/"}
    lin["source"] = f"registry {model}:{version}" + (f" (resolved from {ref})" if ref != f"{model}:{version}" else "")
    return lin


# ------------------------------------------------------------------------------ numbers

def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.{digits}f}"
    return str(v)


def duration(s) -> str:
    s = _num(s)
    if s is None:
        return "–"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def student_flops(row: dict) -> float:
    """Work done by the student model in a phase: its training plus its own sampling."""
    return (_num(row.get("student_train_flops")) or 0.0) + (_num(row.get("sample_flops")) or 0.0)


def cost_totals(costs: list[dict]) -> dict:
    tot: dict = {"phase": "total"}
    for c in costs:
        for k, v in c.items():
            if k != "phase" and _num(v) is not None:
                tot[k] = tot.get(k, 0) + v
    return tot


def flops_ratio(costs: list[dict]) -> float | None:
    """OPD student FLOPs (all rounds) / SFT student FLOPs; None without both phases."""
    sft = sum(student_flops(c) for c in costs if c.get("phase") == "sft")
    opd = sum(student_flops(c) for c in costs if str(c.get("phase", "")).startswith("opd_round"))
    has_opd = any(str(c.get("phase", "")).startswith("opd_round") for c in costs)
    return opd / sft if sft > 0 and has_opd else None


# ------------------------------------------------------------------------------ plots

def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _series(rounds: list[dict], key: str) -> list[float]:
    return [v if (v := _num(r.get(key))) is not None else float("nan") for r in rounds]


def _round_numbers(rounds: list[dict]) -> list[int]:
    return [int(r.get("round", i + 1)) for i, r in enumerate(rounds)]


def _round_ticks(ax, x: list[int]) -> None:
    if len(x) <= 20:
        ax.set_xticks(x)
    else:  # many rounds: let matplotlib pick integer ticks
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _png(fig, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    _plt().close(fig)
    return buf.getvalue()


def plot_metrics(lineage: dict, dpi: int = PLOT_DPI) -> bytes:
    """Two panels: reverse KL and eval-slice accuracy per round (SFT's accuracy as a baseline)."""
    plt = _plt()
    rounds = lineage.get("rounds") or []
    x = _round_numbers(rounds)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(x, _series(rounds, "reverse_kl"), marker="o", color="tab:red")
    a.set(title="Reverse KL to the teacher (on-policy, per token)", xlabel="OPD round", ylabel="reverse KL")
    b.plot(x, _series(rounds, "eval_slice_accuracy"), marker="o", color="tab:blue", label="after round")
    sft_acc = _num((lineage.get("sft") or {}).get("eval_slice_accuracy"))
    if sft_acc is not None:
        b.axhline(sft_acc, color="gray", linestyle="--", label="after SFT")
    b.set(title="Eval-slice accuracy", xlabel="OPD round", ylabel="accuracy")
    b.legend(loc="lower right", fontsize="small")
    if all(math.isnan(v) for v in _series(rounds, "eval_slice_accuracy")):
        b.text(0.5, 0.5, "not measured (no answers in the eval split)", ha="center", va="center",
               transform=b.transAxes, color="gray")
    for ax in (a, b):
        _round_ticks(ax, x)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig, dpi)


def plot_timings(lineage: dict, dpi: int = PLOT_DPI) -> bytes:
    """Stacked bars: seconds spent sampling, scoring, updating and syncing weights, per round."""
    plt = _plt()
    rounds = lineage.get("rounds") or []
    x = _round_numbers(rounds)
    fig, ax = plt.subplots(figsize=(10, 3.8))
    bottom = [0.0] * len(rounds)
    colors = {"sample_s": "tab:blue", "score_s": "tab:orange", "update_s": "tab:green", "sync_s": "tab:purple"}
    for key in TIMING_KEYS:
        vals = [v if (v := _num(r.get(key))) is not None else 0.0 for r in rounds]
        ax.bar(x, vals, bottom=bottom, label=key.removesuffix("_s"), color=colors[key], width=0.6)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set(title="Where each round's time goes", xlabel="OPD round", ylabel="seconds")
    _round_ticks(ax, x)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig, dpi)


PLOTS = {"metrics": (plot_metrics, "Reverse KL and eval-slice accuracy per round"),
         "timings": (plot_timings, "Sample / score / update / sync seconds per round")}


def render_plots(lineage: dict, dpi: int = PLOT_DPI) -> dict[str, bytes]:
    """PNG bytes per plot name; none without completed rounds."""
    if not lineage.get("rounds"):
        return {}
    return {name: fn(lineage, dpi) for name, (fn, _) in PLOTS.items()}


# ------------------------------------------------------------------------------ document model
# A report is a list of blocks rendered twice (markdown, HTML) from the same data.

def _cell(col: str, v) -> str:
    if isinstance(v, str):
        return v
    if (col.endswith("_s") or col == "wall s") and isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:.2f}"  # seconds
    return fmt(v)


def _table(headers: list[str], rows: list[list], status_col: int | None = None) -> tuple:
    return ("table", headers, [[_cell(h, c) for h, c in zip(headers, r)] for r in rows], status_col)


def stages(lineage: dict) -> list[dict]:
    """(phase, wall_s) from the cost ledger, in run order."""
    return [{"phase": c.get("phase", "?"), "wall_s": _num(c.get("wall_s"))} for c in lineage.get("cost") or []]


def blocks(lineage: dict, compact: bool = False) -> list[tuple]:
    """`compact`: fewer per-round columns (for a terminal)."""
    run_key = lineage.get("run_key") or "?"
    out: list[tuple] = [("h1", f"OPD run report: {run_key}")]
    facts = [("source", lineage.get("source")), ("run key", lineage.get("run_key")),
             ("flow run", lineage.get("flow_run_id"))]
    if reg := lineage.get("registered"):
        facts.append(("registered", f"{reg.get('model')}:{reg.get('version')}  {reg.get('uri', '')}".strip()))
    facts += [("created", lineage.get("created_at")), ("teacher", lineage.get("teacher")),
              ("teacher params", lineage.get("teacher_params")), ("student params", lineage.get("student_params")),
              ("dataset fingerprint", lineage.get("dataset_fingerprint"))]
    out.append(("facts", [(k, fmt(v)) for k, v in facts if v not in (None, "", "None")]))

    st = stages(lineage)
    out.append(("h2", "Stages"))
    if st:
        total = sum(s["wall_s"] or 0.0 for s in st)
        out.append(_table(["stage", "duration", "wall s", "share"],
                          [[s["phase"], duration(s["wall_s"]), s["wall_s"],
                            f"{100 * (s['wall_s'] or 0) / total:.0f}%" if total else "–"] for s in st]
                          + [["total", duration(total), total, "100%" if total else "–"]]))
    else:
        out.append(("p", "No stage finished yet (the cost ledger is empty)."))

    gates = lineage.get("gates") or {}
    out.append(("h2", "Gates"))
    if gates.get("checks"):
        out.append(("p", f"Overall: **{'PASS' if gates.get('passed') else 'FAIL'}**"))
        out.append(_table(["gate", "result", "detail"],
                          [[c.get("name", "?"), verdict(c), c.get("detail", "")]
                           for c in gates["checks"]], status_col=1))
    else:
        out.append(("p", "No gate results recorded for this run."))

    metrics = lineage.get("metrics") or {}
    out.append(("h2", "Evaluation (held-out)"))
    if metrics:
        sft_kl = _num((metrics.get("sft_student") or {}).get("reverse_kl"))
        rows = []
        for name, m in metrics.items():
            label = EVAL_LABELS.get(name, name) + (f" (v{m['version']})" if m.get("version") else "")
            kl = _num(m.get("reverse_kl"))
            rel = f"{100 * (kl - sft_kl) / sft_kl:+.0f}%" if kl is not None and sft_kl and name != "teacher" \
                and name != "sft_student" else "–"
            rows.append([label, m.get("accuracy"), m.get("sampled_accuracy"), kl, rel, m.get("n")])
        out.append(_table(["model", "accuracy (greedy)", "accuracy (sampled, T=1)", "mean reverse KL / token",
                           "KL vs SFT", "n"], rows))
    else:
        out.append(("p", "No held-out evaluation recorded (the run has not reached `evaluate`, or it was "
                         "never registered: report the registered version, `opd report MODEL:N`)."))

    rounds = lineage.get("rounds") or []
    out.append(("h2", "OPD rounds"))
    if rounds:
        cols = [c for c in (ROUND_COLUMNS_COMPACT if compact else ROUND_COLUMNS) if any(c in r for r in rounds)]
        out.append(_table(cols, [[r.get(c) for c in cols] for r in rounds]))
        for name, (_, caption) in PLOTS.items():
            out.append(("img", name, caption))
    else:
        out.append(("p", "No completed OPD round."))

    costs = lineage.get("cost") or []
    out.append(("h2", "Cost ledger"))
    if costs:
        cols = [c for c in COST_COLUMNS if any(c in r for r in costs)]
        tot = cost_totals(costs)
        out.append(_table(cols, [[c.get(k) for k in cols] for c in costs] + [[tot.get(k) for k in cols]]))
        ratio = flops_ratio(costs)
        sft = sum(student_flops(c) for c in costs if c.get("phase") == "sft")
        opd = sum(student_flops(c) for c in costs if str(c.get("phase", "")).startswith("opd_round"))
        out.append(("p", "OPD student FLOPs vs SFT student FLOPs: "
                         + (f"**{ratio:.2f}x** ({opd:.3g} vs {sft:.3g}; student FLOPs = its training + its own "
                            f"sampling; teacher scoring is counted separately: {tot.get('teacher_flops', 0):.3g})"
                            if ratio is not None else "n/a (needs both an SFT phase and OPD rounds)")))
        out.append(("p", "FLOPs: training 6·N·tokens, sampling and scoring 2·N·tokens (N = parameters of the "
                         "model doing the work)."))
    else:
        out.append(("p", "Empty cost ledger."))
    return out


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def to_markdown(bl: list[tuple], images: dict[str, str]) -> str:
    """`images`: plot name -> URL (a relative path or a data URI)."""
    parts = []
    for b in bl:
        kind = b[0]
        if kind == "h1":
            parts.append(f"# {b[1]}")
        elif kind == "h2":
            parts.append(f"## {b[1]}")
        elif kind == "p":
            parts.append(b[1])
        elif kind == "facts":
            parts.append("\n".join(f"- **{k}**: {_md_cell(v)}" for k, v in b[1]))
        elif kind == "table":
            _, headers, rows, _ = b
            lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            parts.append("\n".join(lines))
        elif kind == "img" and b[1] in images:
            parts.append(f"![{b[2]}]({images[b[1]]})")
    return "\n\n".join(parts) + "\n"


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ddd;padding:.3em .6em}
th{background:#f4f4f4;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#0a7a2a;font-weight:600}.skip{color:#8a6d00;font-weight:600}.fail{color:#b00020;font-weight:600}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}ul.facts{list-style:none;padding:0}
ul.facts li{margin:.15em 0}figcaption{color:#666;font-size:.9em}"""

_NUMERIC = re.compile(r"^[-+]?[\d,.]+(e[-+]?\d+)?%?x?$|^–$")


def _inline(s: str) -> str:
    """Escape, then the one markdown feature the blocks use: **bold**."""
    s = html.escape(str(s))
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)


def to_html(bl: list[tuple], images: dict[str, str], title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>"]
    for b in bl:
        kind = b[0]
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{html.escape(b[1])}</{kind}>")
        elif kind == "p":
            p = _inline(b[1]).replace("<b>PASS</b>", "<b class='pass'>PASS</b>").replace(
                "<b>FAIL</b>", "<b class='fail'>FAIL</b>")
            parts.append(f"<p>{p}</p>")
        elif kind == "facts":
            parts.append("<ul class='facts'>" + "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>"
                                                       for k, v in b[1]) + "</ul>")
        elif kind == "table":
            _, headers, rows, status_col = b
            head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
            body = []
            for r in rows:
                cells = []
                for i, c in enumerate(r):
                    cls = _STATUS_CLASS.get(c, "fail") if i == status_col else \
                        ("num" if _NUMERIC.match(str(c)) else "")
                    cells.append(f"<td class='{cls}'>{html.escape(str(c))}</td>" if cls else
                                 f"<td>{html.escape(str(c))}</td>")
                body.append("<tr>" + "".join(cells) + "</tr>")
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
        elif kind == "img" and b[1] in images:
            parts.append(f"<figure><img alt='{html.escape(b[2])}' src='{images[b[1]]}'>"
                         f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


_STATUS_STYLE = {"PASS": "bold green", "FAIL": "bold red"}
_STATUS_CLASS = {"PASS": "pass", "SKIP": "skip", "FAIL": "fail"}  # SKIP: a gate with nothing to check (no answers)
_STATUS_COLOR = {"PASS": "green", "SKIP": "yellow", "FAIL": "red"}


def _styled(text: str):
    """A report paragraph as rich Text: ``**x**`` bold (PASS green, FAIL red), everything else literal."""
    from rich.text import Text

    out = Text()
    for i, part in enumerate(re.split(r"\*\*(.+?)\*\*", text)):
        out.append(part, style=None if i % 2 == 0 else _STATUS_STYLE.get(part, "bold"))
    return out


def print_report(lineage: dict, console) -> None:
    """The report's text and tables on a rich console (gate results in green / red).

    Every string from the lineage (model names, keys, details) goes in as rich Text, never as
    markup, so it prints literally on any console."""
    from rich.table import Table
    from rich.text import Text

    title = None
    for b in blocks(lineage, compact=True):
        kind = b[0]
        if kind == "h1":
            console.rule(Text(b[1], style="bold"))
        elif kind == "h2":
            title = b[1]
        elif kind == "facts":
            for k, v in b[1]:
                console.print(Text.assemble((k, "bold"), ": ", v), soft_wrap=True)
        elif kind == "p":
            if title:
                console.print(Text("\n" + title, style="bold"))
                title = None
            console.print(_styled(b[1]))
        elif kind == "table":
            _, headers, rows, status_col = b
            t = Table(title=None if title is None else Text(title), title_justify="left", title_style="bold")
            title = None
            for i, h in enumerate(headers):
                t.add_column(Text(h), justify="left" if i == 0 or i == status_col or h == "detail" else "right")
            for r in rows:
                t.add_row(*[Text(str(c), style=_STATUS_COLOR.get(c, "red") if i == status_col else "")
                            for i, c in enumerate(r)])
            console.print(t)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ------------------------------------------------------------------------------ entry points

def build_report(lineage: dict, out_dir: str | Path, dpi: int = PLOT_DPI) -> Report:
    """Write report.md, report.html (self-contained), <plot>.png and lineage.json under out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = render_plots(lineage, dpi)
    plots = {}
    for name, data in pngs.items():
        (p := out / f"{name}.png").write_bytes(data)
        plots[name] = p
    bl = blocks(lineage)
    md = out / "report.md"
    md.write_text(to_markdown(bl, {n: p.name for n, p in plots.items()}))
    page = out / "report.html"
    page.write_text(to_html(bl, {n: data_uri(d) for n, d in pngs.items()},
                            f"OPD run report: {lineage.get('run_key') or '?'}"))
    lin = out / SAVED_LINEAGE
    tmp = lin.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(lineage, indent=2, default=str))
    tmp.replace(lin)
    return Report(out, md, page, plots, lin)


def artifact_markdown(lineage: dict, dpi: int = ARTIFACT_DPI) -> str:
    """The report as one markdown string with the plots inlined as data URIs (for a Prefect artifact)."""
    return to_markdown(blocks(lineage), {n: data_uri(d) for n, d in render_plots(lineage, dpi).items()})

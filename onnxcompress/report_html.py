"""The report a person reads: one self-contained HTML page (no scripts, no downloads).

What went in and what came out, where the bytes went (a bar per layer, before and after),
which representation each layer got and why, each step's fidelity against the original and
the gate that decided it, and latency before/after when it was measured.
"""

from __future__ import annotations

__all__ = ["html_report"]

import html
from collections.abc import Mapping
from typing import Any

from onnxcompress.pass_base import LayerChange
from onnxcompress.pipeline import PipelineResult, StepResult

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:72em;color:#222}
table{border-collapse:collapse;margin:1em 0}\
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}.ok{color:#176c2f}.bad{color:#a31515}
.bar-before{fill:#c9ced6}.bar-after{fill:#2f6fb3}svg text{font-size:11px}
"""
_CHART_LAYERS = 40  # the largest layers get a bar; the table lists all


def _e(value: object) -> str:
    return html.escape(str(value))


def _ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}×" if after else "∞"


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary(result: PipelineResult, extra: Mapping[str, Any]) -> str:
    b, a = result.before, result.after
    rows: list[list[object]] = [
        [
            "weight params",
            f"{b['weight_params']:,}",
            f"{a['weight_params']:,}",
            _ratio(b["weight_params"], a["weight_params"]),
        ],
        [
            "tensor bytes",
            f"{b['tensor_bytes']:,}",
            f"{a['tensor_bytes']:,}",
            _ratio(b["tensor_bytes"], a["tensor_bytes"]),
        ],
    ]
    latency = extra.get("latency_ms")
    if latency:
        rows.append(
            [
                f"latency ms (batch {latency['batch']})",
                f"{latency['before']:.3f}",
                f"{latency['after']:.3f}",
                f"{latency['ratio']:.2f}× the original's time",
            ]
        )
    return _table(["", "before", "after", "ratio"], rows)


def _changes(result: PipelineResult) -> list[LayerChange]:
    """The last change of each layer over all applied steps, in graph order of first change."""
    latest: dict[str, LayerChange] = {}
    for step in result.steps:
        if step.status == "applied":
            for change in step.report.changes:
                latest[change.name] = change
    return list(latest.values())


def _chart(changes: list[LayerChange]) -> str:
    """Horizontal bars: each layer's bytes before (grey) and after (blue), largest first."""
    shown = sorted(changes, key=lambda c: c.bytes_before, reverse=True)[:_CHART_LAYERS]
    if not shown:
        return "<p>No layer changed.</p>"
    widest = max(c.bytes_before for c in shown) or 1
    label, width, row = 260, 460, 18
    bars = []
    for index, change in enumerate(shown):
        y = index * row
        before_w = width * change.bytes_before / widest
        after_w = width * change.bytes_after / widest
        bars.append(
            f'<text x="0" y="{y + 12}">{_e(change.name[-40:])}</text>'
            f'<rect class="bar-before" x="{label}" y="{y + 2}" width="{before_w:.1f}" height="14"/>'
            f'<rect class="bar-after" x="{label}" y="{y + 2}" width="{after_w:.1f}" height="14"/>'
            f'<text x="{label + before_w + 4:.1f}" y="{y + 12}">'
            f"{change.bytes_before:,} → {change.bytes_after:,}</text>"
        )
    height = row * len(shown)
    return (f'<svg width="{label + width + 180}" height="{height}" role="img" '
            f'aria-label="bytes by layer">{"".join(bars)}</svg>')


def _step(index: int, step: StepResult) -> str:
    status = "ok" if step.status != "rolled back" else "bad"
    parts = [
        f"<h3>Step {index}: {_e(step.step.pass_name)} — "
        f'<span class="{status}">{_e(step.status)}</span> '
        f"({step.seconds:.2f} s)</h3>"
    ]
    if step.metrics:
        parts.append(f"<p>Fidelity against the original: {_e(step.metrics)}</p>")
    gate = {k: v for k, v in step.step.gate.model_dump().items() if v is not None}
    parts.append(f"<p>Gate: {_e(gate)}, verified with margin {step.step.margin}; decided by: "
                 f"{_e(', '.join(step.decided_by) or 'n/a')}</p>")
    if step.failures:
        parts.append(f'<p class="bad">Failed: {_e("; ".join(step.failures))}</p>')
    if step.report.notes:
        parts.append(f"<p>Notes: {_e(step.report.notes)}</p>")
    return "".join(parts)


def html_report(result: PipelineResult, extra: Mapping[str, Any] | None = None,
                title: str = "onnxcompress report") -> str:
    """The whole page as a string."""
    extra = extra or {}
    changes = _changes(result)
    layer_rows: list[list[object]] = [
        [
            c.name,
            c.op,
            f"{c.bytes_before:,}",
            f"{c.bytes_after:,}",
            _ratio(c.bytes_before, c.bytes_after),
            c.detail,
        ]
        for c in changes
    ]
    skipped = {
        s.name: s.reason
        for step in result.steps
        for s in step.report.skipped
        if s.name not in {c.name for c in changes}
    }
    sections = [
        f"<h1>{_e(title)}</h1>",
        _summary(result, extra),
        f"<p>Final fidelity against the original: {_e(result.final_metrics)}</p>",
        "<h2>Bytes by layer</h2>",
        _chart(changes),
        "<h2>Layers</h2>",
        _table(
            ["layer", "op", "bytes before", "after", "ratio", "representation and why"], layer_rows
        ),
    ]
    if skipped:
        sections += [
            "<h2>Left as they were</h2>",
            _table(["layer", "reason"], [[n, r] for n, r in skipped.items()]),
        ]
    sections += ["<h2>Steps</h2>"] + [_step(i, s) for i, s in enumerate(result.steps, start=1)]
    body = "\n".join(sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")

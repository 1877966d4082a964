"""Reports of a pipeline run: JSON for machines, Markdown or HTML for people (by file extension)."""

from __future__ import annotations

__all__ = ["write_report", "render_report", "markdown"]

import json
import math
import os
from pathlib import Path
from typing import Any

from onnxcompress import io, writer
from onnxcompress.errors import UserError
from onnxcompress.pipeline import PipelineResult


def _ratio(before: int, after: int) -> str:
    return f"{before / after:.2f}×" if after else "∞"


def markdown(result: PipelineResult, title: str = "onnxcompress report") -> str:
    """The run as a Markdown report: the before/after table, then one section per step."""
    b, a = result.before, result.after
    lines = [
        f"# {title}",
        "",
        "| | before | after | ratio |",
        "|---|---:|---:|---:|",
        f"| weight params | {b['weight_params']:,} | {a['weight_params']:,} | "
        f"{_ratio(b['weight_params'], a['weight_params'])} |",
        f"| non-zero weights | {b['nonzero_weight_params']:,} | {a['nonzero_weight_params']:,} | "
        f"{_ratio(b['nonzero_weight_params'], a['nonzero_weight_params'])} |",
        f"| tensor bytes | {b['tensor_bytes']:,} | {a['tensor_bytes']:,} | "
        f"{_ratio(b['tensor_bytes'], a['tensor_bytes'])} |",
        "",
        f"Final fidelity: {result.final_metrics}",
        "",
    ]
    for index, step in enumerate(result.steps, start=1):
        lines += [
            f"## Step {index}: {step.step.pass_name} — {step.status} ({step.seconds:.2f} s)",
            "",
        ]
        if step.metrics:
            lines += [f"Fidelity: {step.metrics}", ""]
        if step.failures:
            lines += [f"Gate failures: {'; '.join(step.failures)}", ""]
        if step.report.changes:
            lines += [
                "| layer | op | params before | after | bytes before | after | detail |",
                "|---|---|---:|---:|---:|---:|---|",
            ]
            lines += [
                f"| {c.name} | {c.op} | {c.params_before:,} | {c.params_after:,} | "
                f"{c.bytes_before:,} | {c.bytes_after:,} | {c.detail} |"
                for c in step.report.changes
            ]
            lines.append("")
        if step.report.skipped:
            lines += (
                ["Skipped:", ""] + [f"- `{s.name}`: {s.reason}" for s in step.report.skipped] + [""]
            )
    return "\n".join(lines)


def _strict_json(value: Any) -> Any:
    """NaN and infinities (a failed metric) become null: strict JSON parsers reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(item) for item in value]
    return value


def render_report(
    result: PipelineResult, path: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> str:
    """The report's text, `.json`, `.md` or `.html` by the path's extension."""
    path = Path(path)
    if path.suffix == ".json":
        return json.dumps(
            _strict_json({**result.to_dict(), **(extra or {})}),
            indent=2,
            default=str,
            allow_nan=False,
        )
    if path.suffix in (".md", ".markdown"):
        return markdown(result)
    if path.suffix in (".html", ".htm"):
        from onnxcompress.report_html import html_report

        return html_report(result, extra)
    raise UserError(f"{path}: report format must be .json, .md or .html")


def write_report(
    result: PipelineResult, path: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> Path:
    """Write `.json`, `.md` or `.html` through the guarded writer, never over the model's files."""
    path = Path(path)
    text = render_report(result, path, extra)
    if not path.parent.is_dir():
        raise UserError(f"{path.parent}: report folder does not exist")
    writer.write_text(path, text, "report", io.protected(result.model))
    return path

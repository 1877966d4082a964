"""A compression report laid out like Table 1 of Deep Compression (Han et al., ICLR 2016).

Per shared-weight layer: parameters, weights kept after pruning (%), bits per weight and per
relative index with fixed-width storage (P+Q) and after entropy coding (P+Q+coding), and the
compressed size as a share of dense float32 after each stage:

* P (pruning only): each kept entry (padding included) as a float32 value + an r-bit
  relative index; a layer without zeros stays dense (32 bits per weight, no index).
* P+Q (plus weight sharing): each entry as a b-bit codebook index + r-bit relative index,
  plus the codebook (k float values).
* P+Q+coding: the archive's entropy-coded streams plus the codebook, as written.

These stage sizes are computed from the packed model (the first two by the paper's fixed-width
accounting, the last measured). Tensors outside the shared-weight layers (biases, layers left
dense) count at their raw size in every total; the archive's real file size, with the graph
and the manifest, is reported beside the totals.
"""

from __future__ import annotations

__all__ = ["compression_table", "table_markdown"]

from typing import Any

from onnxcompress.archive.format import PackedLayer, PackResult


def _layer_row(layer: PackedLayer) -> dict[str, Any]:
    pruned = layer.fixed_entries != layer.params or layer.nonzero < layer.params
    index_bits = layer.index_bits if pruned else 0
    dense_bits = 32 * layer.params
    bits_p = layer.fixed_entries * (32 + index_bits) if pruned else dense_bits
    bits_pq = layer.fixed_entries * (layer.bits + index_bits) + layer.k * layer.codebook_bits
    bits_coded = 8 * layer.coded_bytes
    return {
        "layer": layer.weight,
        "op": layer.op,
        "params": layer.params,
        "kept_percent": 100.0 * layer.nonzero / max(layer.params, 1),
        "weight_bits_pq": layer.bits,
        "weight_bits_coded": 8 * layer.value_bytes / max(layer.entries, 1),
        "index_bits_pq": index_bits,
        "index_bits_coded": 8 * layer.diff_bytes / max(layer.entries, 1),
        "coded_mode": layer.mode,
        "bits_dense": dense_bits,
        "bits_p": bits_p,
        "bits_pq": bits_pq,
        "bits_coded": bits_coded,
        "rate_p_percent": 100.0 * bits_p / dense_bits,
        "rate_pq_percent": 100.0 * bits_pq / dense_bits,
        "rate_coded_percent": 100.0 * bits_coded / dense_bits,
    }


def compression_table(result: PackResult) -> dict[str, Any]:
    """Rows per layer and totals (bytes and ×) for a pack result."""
    rows = [_layer_row(layer) for layer in result.layers]
    other_bits = 8 * result.other_tensor_bytes
    totals: dict[str, Any] = {"params": sum(r["params"] for r in rows) + result.other_params}
    for stage in ("dense", "p", "pq", "coded"):
        totals[f"bytes_{stage}"] = (sum(r[f"bits_{stage}"] for r in rows) + other_bits) / 8
    kept = sum(layer.nonzero for layer in result.layers)
    weights = sum(layer.params for layer in result.layers)
    totals["kept_percent"] = 100.0 * kept / max(weights, 1)
    for stage in ("p", "pq", "coded"):
        totals[f"ratio_{stage}"] = totals["bytes_dense"] / max(totals[f"bytes_{stage}"], 1e-9)
    totals["archive_bytes"] = len(result.data)
    totals["ratio_archive"] = totals["bytes_dense"] / len(result.data)
    totals["other_tensor_bytes"] = result.other_tensor_bytes
    return {"layers": rows, "totals": totals}


def table_markdown(table: dict[str, Any], title: str = "") -> str:
    """The table as Markdown, columns as in the paper's Table 1."""
    lines = [f"**{title}**", ""] if title else []
    lines += [
        "| layer | #weights | weights kept (P) | weight bits (P+Q) | weight bits (coded) "
        "| index bits (P+Q) | index bits (coded) | size (P) | size (P+Q) | size (coded) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table["layers"]:
        index_coded = (
            f"{row['index_bits_coded']:.2f}" if row["coded_mode"] == "sparse" else "in values"
        )
        lines.append(
            f"| {row['layer']} | {row['params']:,} | {row['kept_percent']:.1f}% "
            f"| {row['weight_bits_pq']} "
            f"| {row['weight_bits_coded']:.2f} | {row['index_bits_pq']} | {index_coded} "
            f"| {row['rate_p_percent']:.2f}% | {row['rate_pq_percent']:.2f}% "
            f"| {row['rate_coded_percent']:.2f}% |"
        )
    t = table["totals"]
    kept = f"{t['kept_percent']:.1f}%" if table["layers"] else "—"
    lines.append(
        f"| **total** (other tensors raw: {t['other_tensor_bytes']:,} B) | {t['params']:,} "
        f"| {kept} | | | | | {t['bytes_p'] / 1000:.1f} KB ({t['ratio_p']:.1f}×) "
        f"| {t['bytes_pq'] / 1000:.1f} KB ({t['ratio_pq']:.1f}×) "
        f"| {t['bytes_coded'] / 1000:.1f} KB ({t['ratio_coded']:.1f}×) |"
    )
    lines += [
        "",
        f"Dense float32: {t['bytes_dense'] / 1000:.1f} KB (KB = 1000 bytes). "
        "Archive file (graph and manifest included): "
        f"{t['archive_bytes'] / 1000:.1f} KB ({t['ratio_archive']:.1f}×).",
    ]
    if not table["layers"]:
        lines += [
            "",
            "No weight-shared layer: every tensor is stored raw in the zlib-compressed graph. "
            "Run `onnxcompress cluster` first for Deep Compression coding.",
        ]
    return "\n".join(lines)

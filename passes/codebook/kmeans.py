"""`codebook.kmeans`: weight sharing by per-layer 1-D k-means (Han et al., ICLR 2016, §3).

Each weight tensor W is replaced by k = 2^b shared values (its codebook) and a b-bit index per
weight: W ≈ C[I]. The centroids minimise sum_i |w_i - C[I_i]|^2 over the layer (exact Lloyd
on sorted data, see `kmeans1d`). Pruned layers (any exact zero in W) keep every zero exactly:
entry 0 of the codebook is the constant 0 and only the non-zeros are clustered, into 2^b - 1
centroids, so pruning and sharing compose as in the paper's pipeline.

Bits per layer by op, as in the paper's experiments: Conv/ConvTranspose 8, MatMul/Gemm and
recurrent weights 5, embedding tables (Gather) 6; `bits` sets all layers, `overrides` maps
weight-name globs to bits (first match wins).

Lossy, bounded per weight: |w - C[I]| <= half the largest gap between adjacent centroids
(the nearest centroid is chosen), and zero error when a layer has at most k distinct values.
Exact: zeros stay 0.0. Index storage (`pack_indices`, on by default): below 8 bits the
indices are bit-packed, bits/8 bytes per weight (`onnxcompress.formats.packed`; needs opset
>= 9), except that 4-bit layers of opset >= 21 models keep ONNX uint4 (same size, fewer
nodes); otherwise uint8, 1 byte per weight. See `graph` for the in-graph forms and why stock
onnxruntime runs them at the dense model's speed (the decoders are constant-folded at load).

Where the weight is held does not matter: an initializer, a Constant node, inside an If branch
or a Loop/Scan body at any depth, or read by the layer through data-movement ops (silero-vad's
LSTM weights are sliced and concatenated first). The codebook is written in the main graph and
read from there (`formats.hoist` says why).
"""

from __future__ import annotations

__all__ = ["KMeansClusterConfig", "KMeansClusterPass", "default_bits", "cluster_weights"]

import fnmatch
import logging
from typing import Literal

import numpy as np
import onnx_ir as ir
import pydantic

from onnxcompress.errors import UnsupportedModelError
from onnxcompress.formats.codebook import insert_codebook
from onnxcompress.formats.packed import (
    pack_codebook_indices,
    packed_nbytes,
    packing_pays,
    packs_indices,
)
from onnxcompress.pass_base import CompressionPass, PassConfig, PassReport, register
from onnxcompress.passes.codebook.kmeans1d import kmeans_1d
from onnxcompress.sites import WeightSite, find_weight_sites

logger = logging.getLogger(__name__)

#: Default bits per op type (the paper: 8 for conv, 5 for fc).
DEFAULT_BITS = {
    "Conv": 8,
    "ConvTranspose": 8,
    "MatMul": 5,
    "Gemm": 5,
    "LSTM": 5,
    "GRU": 5,
    "RNN": 5,
    "Gather": 6,
}
_CLUSTERABLE = (np.float32, np.float16, np.float64)


class KMeansClusterConfig(PassConfig):
    """Options of `codebook.kmeans`; the reconstruction variant inherits them unchanged."""

    bits: int | None = pydantic.Field(
        None,
        ge=1,
        le=8,
        description="Bits for every layer (1..8); "
        "default: by op (Conv 8, MatMul/Gemm 5, Gather 6).",
    )
    overrides: dict[str, int] = pydantic.Field(
        default_factory=dict,
        description="Bits per weight-name glob (first match wins), e.g. {'conv1.*': 8}.",
    )
    init: Literal["linear", "density", "random", "optimal"] = pydantic.Field(
        "linear",
        description="Centroid initialisation: linear (paper's choice), density (CDF), "
        "random (Forgy), "
        "optimal (DP on atoms; lowest squared error).",
    )
    max_iter: int = pydantic.Field(
        300, ge=1, le=100_000, description="Most Lloyd iterations per layer."
    )
    pack_4bit: bool = pydantic.Field(
        True, description="Store indices as uint4 when bits <= 4 and the model's opset is >= 21."
    )
    pack_indices: bool = pydantic.Field(
        True,
        description="Bit-pack indices below 8 bits "
        "(bits/8 bytes per weight, decoded by constant-foldable "
        "standard ops; opset >= 9); off: uint8 (or uint4) indices.",
    )
    exclude: tuple[str, ...] = pydantic.Field((), description="Weight-name globs never clustered.")
    min_params: int = pydantic.Field(
        64,
        ge=0,
        description="Weights with fewer parameters are left alone (a codebook would not pay).",
    )
    ops: tuple[str, ...] | None = pydantic.Field(
        None, description="Only weights of these op types."
    )

    @pydantic.model_validator(mode="after")
    def _valid_overrides(self) -> KMeansClusterConfig:
        for pattern, bits in self.overrides.items():
            if not 1 <= bits <= 8:
                raise ValueError(f"overrides[{pattern!r}] = {bits} is outside 1..8")
        return self


def default_bits(op_type: str) -> int:
    """Bits by op as Deep Compression found them safe (`DEFAULT_BITS`); 5 for any other op."""
    return DEFAULT_BITS.get(op_type, 5)


def cluster_weights(
    weights: np.ndarray, bits: int, *, init: str = "linear", seed: int = 0, max_iter: int = 300
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(uint8 indices of W's shape, codebook, zero_entry) for one weight tensor.

    With any exact zero in `weights`, codebook[0] == 0 and only the non-zeros are clustered
    into at most 2^bits - 1 centroids; otherwise all values share at most 2^bits centroids.
    """
    flat = np.asarray(weights).reshape(-1)
    k = 1 << bits
    zero = flat == 0
    if np.any(zero):
        result = kmeans_1d(flat[~zero], k - 1, init=init, seed=seed, max_iter=max_iter)  # type: ignore[arg-type]
        codebook = np.concatenate([np.zeros(1, flat.dtype), result.centroids])
        indices = np.zeros(flat.size, dtype=np.uint8)
        indices[~zero] = result.labels.astype(np.uint8) + 1
        return indices.reshape(weights.shape), codebook, True
    result = kmeans_1d(flat, k, init=init, seed=seed, max_iter=max_iter)  # type: ignore[arg-type]
    return result.labels.astype(np.uint8).reshape(weights.shape), result.centroids, False


@register
class KMeansClusterPass(CompressionPass):
    """Share weights: per-layer k-means codebook, uint8/uint4 indices, Gather in the graph."""

    name = "codebook.kmeans"
    summary = (
        "Weight sharing by per-layer 1-D k-means (Deep Compression): indices + codebook + Gather."
    )
    Config = KMeansClusterConfig
    config: KMeansClusterConfig

    def bits_for(self, site: WeightSite) -> int:
        """The first matching override, else `bits`, else the op's default."""
        for pattern, bits in self.config.overrides.items():
            if fnmatch.fnmatchcase(site.name, pattern):
                return bits
        return self.config.bits if self.config.bits is not None else default_bits(site.op_type)

    def _reason_to_skip(self, model: ir.Model, site: WeightSite) -> str | None:
        if site.value.is_graph_output():
            return "the weight is also a graph output"
        dtype = site.array().dtype
        if dtype.type not in _CLUSTERABLE:
            return f"dtype {dtype} is not supported (float32, float16, float64)"
        if not np.all(np.isfinite(site.array())):
            return "holds NaN or inf"
        bits = self.bits_for(site)
        index_bytes = self._index_bytes(self._storage(model, site, bits), site.size, bits)
        if index_bytes + (1 << bits) * dtype.itemsize >= site.size * dtype.itemsize:
            return f"a {bits}-bit codebook would not be smaller than the dense tensor"
        return None

    def _storage(
        self, model: ir.Model, site: WeightSite, bits: int
    ) -> Literal["uint8", "uint4", "packed"]:
        """How a layer's indices are stored.

        uint4 wins ties with packing (4 bits, opset >= 21); packing only where it saves more
        than its decoder costs.
        """
        opset = model.opset_imports.get("", 0)
        uint4 = self.config.pack_4bit and bits <= 4 and opset >= 21
        pays = packing_pays(site.name, site.size, bits)
        packs = self.config.pack_indices and pays and packs_indices(model)
        if packs and not (uint4 and bits == 4):
            return "packed"
        return "uint4" if uint4 else "uint8"

    @staticmethod
    def _index_bytes(storage: str, count: int, bits: int) -> int:
        if storage == "packed":
            return packed_nbytes(count, bits)
        return (count + 1) // 2 if storage == "uint4" else count

    def rewrite(self, model: ir.Model, report: PassReport) -> bool:
        """Cluster every eligible weight, then rewrite them all; the rest get their reason."""
        scan = find_weight_sites(
            model,
            min_params=self.config.min_params,
            exclude=self.config.exclude,
            ops=self.config.ops,
            derived=True,  # element-wise: a weight read through Slice/Concat/... is fine too
        )
        for skip in scan.skipped:
            report.skip(skip.name, skip.reason)
        todo = []
        for site in scan.sites:
            reason = self._reason_to_skip(model, site)
            if reason is not None:
                report.skip(site.name, reason)
            else:
                todo.append(site)
        # Compute everything first, then edit: the pass applies fully or not at all.
        planned = []
        for site in todo:
            bits = self.bits_for(site)
            weights = site.array()
            try:
                indices, codebook, zero_entry = cluster_weights(
                    weights,
                    bits,
                    init=self.config.init,
                    seed=self.context.seed,
                    max_iter=self.config.max_iter,
                )
            except ValueError as error:  # pragma: no cover - preconditions above rule these out
                raise UnsupportedModelError(f"{site.name}: {error}") from None
            planned.append((site, bits, weights, indices, codebook, zero_entry))
        to_pack = set()
        for site, bits, weights, indices, codebook, zero_entry in planned:
            storage = self._storage(model, site, bits)
            insert_codebook(
                model.graph, site.value, indices, codebook, bits=bits, zero_entry=zero_entry,
                packed=storage == "uint4",
            )
            if storage == "packed":
                to_pack.add(site.name)
            index_bytes = self._index_bytes(storage, indices.size, bits)
            report.changed(
                site.name,
                site.op_type,
                weights,
                params_after=int(np.count_nonzero(codebook[indices])),
                bytes_after=int(index_bytes + codebook.nbytes),
                detail=f"{bits} bits, {codebook.size} shared values"
                + (" (entry 0 = exact zero)" if zero_entry else "")
                + {"packed": f", {bits}-bit packed indices", "uint4": ", uint4 indices"}.get(
                    storage, ", uint8 indices"
                ),
            )
        if to_pack:
            pack_codebook_indices(model, names=to_pack)
        return bool(planned)

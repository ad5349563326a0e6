"""Store every large initializer of an engine's graphs once, in one weights file that all graphs refer to.

The exporter writes prefill and decode as separate graphs over the same parameters (under different generated
names: the dynamo exporter folds each transposed Linear weight into a constant of its own). Left so, each ONNX
Runtime session loads a copy: twice the model's weights held at run time. This pass names each large initializer
by a digest of its dtype, shape and bytes, writes each distinct tensor once into `weights.bin` (page-aligned, so
it can be memory-mapped), and turns the graphs' initializers into standard ONNX external-data references to it.

The graphs stay plain ONNX: any ONNX Runtime or TensorRT parser loads them (each on its own copy);
targets/ort.py's `open_sessions` maps the file once and hands the same buffers to every session.

Tensors are read and written one at a time (from the graph or from the external data it already had), so the
pass holds one tensor in memory, never a model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo

ALIGN = 1 << 16  # offsets on 64 KiB boundaries: mmap-able on every page size ONNX Runtime meets
MIN_BYTES = 1024  # smaller tensors (scalars, shapes, norms' epsilons) stay inline in their graph
NAME_PREFIX = "w."


@dataclass(frozen=True)
class SharedWeights:
    """What the pass wrote: distinct tensors and their bytes, and the bytes the graphs refer to in all."""

    tensors: int
    unique_bytes: int
    referenced_bytes: int  # what separate copies per graph would hold


def tensor_bytes(tensor: onnx.TensorProto, base_dir: Path | None) -> bytes:
    """The tensor's data as raw little-endian bytes, wherever the proto keeps them."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        if base_dir is None:
            raise ValueError(f"initializer {tensor.name!r} has external data but no base directory was given")
        info = ExternalDataInfo(tensor)
        with open(base_dir / info.location, "rb") as f:
            f.seek(info.offset or 0)
            return f.read(info.length) if info.length else f.read()
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def tensor_digest(tensor: onnx.TensorProto, data: bytes) -> str:
    h = hashlib.sha256(f"{tensor.data_type}:{tuple(tensor.dims)}:".encode())
    h.update(data)
    return h.hexdigest()[:32]


def subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every graph nested in its nodes' attributes (If / Loop / Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                yield from subgraphs(g)


def rename_uses(graph: onnx.GraphProto, names: Mapping[str, str]) -> None:
    """Point every node input and value_info of `graph` and its subgraphs at the new names."""
    for g in subgraphs(graph):
        for node in g.node:
            for i, name in enumerate(node.input):
                if name in names:
                    node.input[i] = names[name]
        for info in g.value_info:
            if info.name in names:
                info.name = names[info.name]


class WeightsFile:
    """The weights file being written: each distinct tensor once, at an aligned offset."""

    def __init__(self, path: Path) -> None:
        self.path, self.offsets = path, {}
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close(), after every graph is done
        self.referenced = 0

    def add(self, digest: str, data: bytes) -> tuple[int, int]:
        self.referenced += len(data)
        if digest not in self.offsets:
            offset = self.file.tell()
            pad = -offset % ALIGN
            self.file.write(b"\0" * pad)
            self.file.write(data)
            self.offsets[digest] = (offset + pad, len(data))
        return self.offsets[digest]

    def close(self) -> SharedWeights:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        unique = sum(n for _, n in self.offsets.values())
        return SharedWeights(len(self.offsets), unique, self.referenced)


def externalize(model: onnx.ModelProto, base_dir: Path | None, weights: WeightsFile) -> None:
    """Move `model`'s large top-level initializers into `weights`, renamed by content."""
    graph = model.graph
    interface = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}
    for tensor in graph.initializer:
        if tensor.name in interface:
            continue
        data = tensor_bytes(tensor, base_dir)
        if len(data) < MIN_BYTES:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:  # small but stored outside: bring it in
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = data
            continue
        digest = tensor_digest(tensor, data)
        offset, length = weights.add(digest, data)
        names[tensor.name] = tensor.name = NAME_PREFIX + digest
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            tensor.ClearField(field)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", weights.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    # One name per content: a graph that held the same tensor twice now lists it twice; keep the first.
    seen: set[str] = set()
    kept = [t for t in graph.initializer if not (t.name in seen or seen.add(t.name))]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    rename_uses(graph, names)


def share_weights(models: Mapping[str, tuple[onnx.ModelProto, Path | None]], path: Path) -> SharedWeights:
    """Externalize the initializers of every model (name -> (model, directory its external data is relative
    to)) into the one weights file `path`; the models are changed in place and must be saved next to it."""
    weights = WeightsFile(path)
    try:
        for model, base_dir in models.values():
            externalize(model, base_dir, weights)
    finally:
        report = weights.close()
    return report

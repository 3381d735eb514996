"""FAISS index helpers shared by the offline build and the retrieval service: what kind an index
is, its search-time parameter, loading it, and moving it to the GPU when faiss has one.

faiss (>= 1.7) serializes efSearch and nprobe with write_index, and copying an index to the GPU
carries nprobe along. The build still records the tuned values in the manifest and retrieval sets
them again at load, so the manifest stays the one place that says how an index is searched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import faiss

SEARCH_PARAM = {"hnsw": "efSearch", "ivf": "nprobe"}   # exact search has no knob
GPU_KINDS = ("flat", "ivf")   # faiss has no GPU HNSW, nor a GPU copy of a flat scalar quantizer (flat16)
GPU_MAX_K = 2048   # faiss GPU k-selection limit: k and nprobe above it are refused
FAISS_GPU_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class IndexInfo:
    kind: str                                              # "flat" | "flat16" | "hnsw" | "ivf"
    search: dict[str, int] = field(default_factory=dict)   # set at search time (efSearch / nprobe)
    build: dict[str, int] = field(default_factory=dict)    # fixed when built (M / nlist)


def inner_index(index: faiss.Index) -> faiss.Index:
    """The index doing the search, under the IndexIDMap(2) wrapper if there is one."""
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def index_info(index: faiss.Index) -> IndexInfo:
    """Kind and parameters of a CPU index (as built, or as read back from disk)."""
    inner = inner_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        h = inner.hnsw
        return IndexInfo("hnsw", {"efSearch": int(h.efSearch)},
                         {"M": int(h.nb_neighbors(1)), "efConstruction": int(h.efConstruction)})
    if isinstance(inner, faiss.IndexIVF):
        return IndexInfo("ivf", {"nprobe": int(inner.nprobe)}, {"nlist": int(inner.nlist)})
    if isinstance(inner, faiss.IndexFlat):
        return IndexInfo("flat")
    if isinstance(inner, faiss.IndexScalarQuantizer):   # exhaustive over float16 rows (CPU only)
        return IndexInfo("flat16")
    raise ValueError(f"unsupported FAISS index type {type(inner).__name__}")


def set_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Apply efSearch / nprobe to a CPU index (ParameterSpace looks through IndexIDMap)."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, int(value))


def gpu_count() -> int:
    """GPUs visible to faiss; 0 on a faiss-cpu build."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def resolve_faiss_gpu(mode: str) -> bool:
    """auto|on|off -> whether to search on the GPU. `on` without a GPU is an error at start."""
    if mode not in FAISS_GPU_MODES:
        raise ValueError(f"faiss_gpu must be one of {'|'.join(FAISS_GPU_MODES)}, got {mode!r}")
    if mode == "on" and gpu_count() == 0:
        raise RuntimeError("faiss_gpu=on but no GPU is visible to faiss (a faiss-cpu build, or no "
                           "CUDA device); install faiss-gpu or use --faiss-gpu auto|off")
    return mode != "off" and gpu_count() > 0


def to_gpu(index: faiss.Index, ngpu: int = -1) -> faiss.Index:
    """A GPU copy of a flat or IVF index (an IndexIDMap wrapper stays on the CPU around it)."""
    return faiss.index_cpu_to_all_gpus(index, ngpu=ngpu)


def load_index(path: Path, search: dict[str, int], gpu: bool) -> tuple[faiss.Index, bool]:
    """Read an index, apply the manifest's search parameters, move it to the GPU if asked and its
    kind runs there. Returns (index, on_gpu)."""
    index = faiss.read_index(str(path))
    set_search_params(index, search)   # before the GPU copy, which takes nprobe along
    if gpu and index_info(index).kind in GPU_KINDS:
        return to_gpu(index), True
    return index, False

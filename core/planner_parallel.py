"""Several GPUs and machines: the tensor/pipeline-parallel layout, its divisibility rules, which
layers each card holds, and per-card memory (each card must hold its own share; a pooled sum
hides the card that overflows).

    vllm          tp × pp cards (TP inside a machine, PP across machines by default); each rank
                  holds 1/tp of its stage's weights, the KV heads of its rank (see planner_kv), a
                  1/tp share of the activations and its own CUDA context, graphs and NCCL buffers.
                  vLLM refuses a TP size that does not divide the attention heads, and needs the
                  KV heads divisible by TP or TP divisible by the KV heads.
    llama.cpp     --split-mode layer: whole layers per card in proportion to each card's memory
                  (llama.cpp's default tensor split follows free VRAM), output layer on the last
                  card, token embeddings in CPU RAM; cards may differ (e.g. a 4090 and a 3090).
    transformers  device_map="auto": whole layers per card in order, embeddings on the first card.
Stages run one after another for one sequence; only TP ranks read in parallel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.catalog import GPUSpec
from core.param_count import ModelSpec

GIB = 2**30
MAX_GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    nodes: int
    cards: tuple[GPUSpec, ...]  # stage-major: cards[s * tp + r] is rank r of stage s
    interconnect: str  # of the TP all-reduces: "nvlink", "pcie" or "network"

    @property
    def n_cards(self) -> int:
        return len(self.cards)

    def stage_cards(self, s: int) -> tuple[GPUSpec, ...]:
        return self.cards[s * self.tp:(s + 1) * self.tp]

    def to_json(self) -> dict[str, Any]:
        return {"tp": self.tp, "pp": self.pp, "nodes": self.nodes, "num_cards": self.n_cards,
                "interconnect": self.interconnect, "gpus": [g.id for g in self.cards]}


def _divisors(n: int, upto: int = 64) -> str:
    return ", ".join(str(d) for d in range(1, min(n, upto) + 1) if n % d == 0)


def check_tensor_parallel(spec: ModelSpec, tp: int) -> None:
    """vLLM's rules: attention heads divisible by TP; KV heads divisible by TP or TP by them."""
    if tp <= 1:
        return
    if spec.num_heads % tp:
        raise ValueError(f"tensor parallel size {tp} does not divide the model's {spec.num_heads} attention heads "
                         f"(vLLM refuses it); use a TP size of {_divisors(spec.num_heads, 16)}, or add pipeline stages")
    if spec.mla is None and spec.num_kv_heads % tp and tp % spec.num_kv_heads:
        raise ValueError(f"tensor parallel size {tp} and the model's {spec.num_kv_heads} KV heads do not divide "
                         "one another (vLLM refuses it); choose a TP size that divides the KV heads or a multiple of them")


def make_layout(spec: ModelSpec, gpus: list[GPUSpec], engine: str, *, num_gpus: int = 1, tp: int | None = None,
                pp: int | None = None, nodes: int = 1, interconnect: str | None = None) -> Layout:
    """The cards and their TP × PP arrangement.

    gpus: one catalog GPU (repeated num_gpus × nodes times) or one per card (unequal cards).
    num_gpus: cards per machine; nodes: machines. tp/pp default to vLLM's usual choice (TP across
    a machine's cards, PP across machines) and to a layer split for llama.cpp and transformers."""
    if not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes must be a positive number of machines, got {nodes}")
    for name, v in (("tp", tp), ("pp", pp)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v}")
    if len(gpus) > 1:
        total = len(gpus)
        if num_gpus not in (1, total) and num_gpus * nodes != total:
            raise ValueError(f"{total} GPUs were listed but num_gpus is {num_gpus}; list one GPU per card")
    elif tp is not None or pp is not None:
        total = (tp or 1) * (pp or 1)
        if num_gpus > 1 and num_gpus * nodes != total:
            raise ValueError(f"tp {tp or 1} × pp {pp or 1} = {total} cards, but num_gpus {num_gpus} × nodes {nodes} "
                             f"= {num_gpus * nodes}; make them agree")
    else:
        total = num_gpus * nodes
    if total % nodes:
        raise ValueError(f"{total} cards do not spread evenly over {nodes} machines")
    if total // nodes > MAX_GPUS_PER_NODE:
        raise ValueError(f"num_gpus must be between 1 and {MAX_GPUS_PER_NODE} cards per machine, "
                         f"got {total // nodes}; add machines with nodes")
    per_node = total // nodes
    if engine != "vllm":
        if tp not in (None, 1):
            raise ValueError(f"{engine} splits the model by layers across cards (llama.cpp --split-mode layer, "
                             "transformers device_map); tensor parallel (tp) is planned for vllm only")
        tp, pp = 1, total
    else:
        if tp is None and pp is None:
            tp, pp = per_node, nodes
        elif tp is None:
            tp = total // pp  # type: ignore[operator]
        elif pp is None:
            pp = total // tp
        if tp * pp != total:
            raise ValueError(f"tp {tp} × pp {pp} must equal the {total} cards")
        check_tensor_parallel(spec, tp)
    if pp > spec.num_layers:
        raise ValueError(f"{pp} pipeline stages exceed the model's {spec.num_layers} decoder layers")
    cards = tuple(gpus) if len(gpus) > 1 else tuple(gpus[0] for _ in range(total))
    if interconnect is None:
        if tp > per_node:
            interconnect = "network"
        else:
            interconnect = "nvlink" if all(g.nvlink for g in cards) else "pcie"
    return Layout(tp=tp, pp=pp, nodes=nodes, cards=cards, interconnect=interconnect)


def stage_layers(n_layers: int, weights: list[float]) -> list[list[int]]:
    """Consecutive decoder layers per stage, in proportion to `weights` (each stage's memory;
    largest remainder, ties to the earlier stages); every stage gets at least one layer when
    there are enough layers (with fewer, the first stages get one each)."""
    if n_layers < len(weights):
        return [[i] for i in range(n_layers)] + [[] for _ in range(len(weights) - n_layers)]
    total = sum(weights)
    exact = [n_layers * w / total for w in weights]
    counts = [max(1, int(x)) for x in exact]
    while sum(counts) > n_layers:
        i = max(range(len(counts)), key=lambda k: (counts[k] - exact[k], k))
        counts[i] -= 1
    order = sorted(range(len(counts)), key=lambda k: (-(exact[k] - counts[k]), k))
    j = 0
    while sum(counts) < n_layers:
        counts[order[j % len(order)]] += 1
        j += 1
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


@dataclass
class Card:
    index: int
    gpu: GPUSpec
    stage: int
    layers: list[int]
    weights: float
    kv: float
    activations: float
    overhead: float
    capacity: float

    @property
    def total(self) -> float:
        return self.weights + self.kv + self.activations + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def to_json(self) -> dict[str, Any]:
        r = lambda x: round(x / GIB, 3)  # noqa: E731 - a local formatter
        return {"index": self.index, "gpu": self.gpu.id, "stage": self.stage,
                "layers": [self.layers[0], self.layers[-1] + 1] if self.layers else [0, 0],
                "weights_gib": r(self.weights), "kv_cache_gib": r(self.kv), "activations_gib": r(self.activations),
                "overhead_gib": r(self.overhead), "total_gib": r(self.total), "capacity_gib": r(self.capacity),
                "fits": self.fits}
